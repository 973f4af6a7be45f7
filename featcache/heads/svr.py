"""svr: support vector regression with an RBF kernel, for numbers; scaling, gamma and C chosen on
validation RMSE, stored as arrays.

As svm-rbf does, one Gram matrix per scaling serves the whole gamma x C grid (scikit-learn's SVR on
``kernel="precomputed"``), gamma relative to the mean squared distance between training rows. The
target is standardised before fitting, so that epsilon (0.1, scikit-learn's default) is a tenth of
a standard deviation whatever its units, and folded back into the prediction. Stored as data: the
support vectors (scaled), their dual coefficients, the intercept, gamma and the target's mean and
standard deviation. An RBF kernel has no exact Keras form: ``to_keras`` refuses in one line.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from featcache import FeatcacheError
from featcache.heads.kernel import CS, kernel_matrices, rbf, scalings_to_try, squared_distances
from featcache.heads.protocol import Head
from featcache.heads.scaling import Scaling

EPSILON = 0.1  # the tube without loss, in standard deviations of the target


@dataclass(frozen=True)
class SvrModel:
    scaling: Scaling
    support: np.ndarray  # (n_sv, d) scaled support vectors
    dual_coef: np.ndarray  # (n_sv,)
    intercept: float
    gamma: float
    target: np.ndarray  # the target's (mean, standard deviation)

    def values(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        kernel = rbf(squared_distances(self.scaling.apply(x), self.support), self.gamma)
        return (kernel @ self.dual_coef + self.intercept) * self.target[1] + self.target[0]

    def arrays(self) -> dict[str, np.ndarray]:
        return {"support": self.support, "dual_coef": self.dual_coef, "intercept": np.array(self.intercept),
                "gamma": np.array(self.gamma), "target": self.target, **self.scaling.arrays()}

    @classmethod
    def from_arrays(cls, scaling: str, arrays) -> SvrModel:
        return cls(Scaling.from_arrays(scaling, arrays), np.asarray(arrays["support"]),
                   np.asarray(arrays["dual_coef"]), float(arrays["intercept"]), float(arrays["gamma"]),
                   np.asarray(arrays["target"]))


class SvrHead(Head):
    """RBF support vector regression; ``choices`` pins scaling, gamma and C (cross-validation folds)."""

    kind = "svr"
    streams = False  # a kernel machine needs every training row at once: refused before fit_streamed

    def __init__(self, name: str, options, *, choices: dict | None = None):
        super().__init__(name, options)
        self.choices = choices
        self.model: SvrModel | None = None

    def fit(self, x, y, *, n_classes, validation=None, say=None):
        from sklearn.svm import SVR

        say = say or (lambda message: None)
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        y = np.asarray(y, np.float64)
        target = np.array([y.mean(), y.std() or 1.0])
        pinned = self.choices
        if validation is None and not pinned:
            raise FeatcacheError(f"{self.name}: choosing scaling, gamma and C needs validation rows")
        validation_x = None if validation is None else np.asarray(validation[0], np.float32).reshape(
            len(validation[0]), -1)
        best, scores = None, {}
        for kind in scalings_to_try(self.options, pinned):
            started = time.perf_counter()
            scaling, xs, grid = kernel_matrices(kind, x, validation_x, pinned["gamma"] if pinned else None)
            for gamma, k_train, k_val in grid:
                for c in [pinned["C"]] if pinned else CS:
                    svr = SVR(kernel="precomputed", C=c, epsilon=EPSILON).fit(k_train, (y - target[0]) / target[1])
                    model = SvrModel(scaling, xs[svr.support_], np.asarray(svr.dual_coef_[0], np.float64),
                                     float(svr.intercept_[0]), float(gamma), target)
                    rmse = None
                    if k_val is not None:
                        predicted = k_val[:, svr.support_] @ model.dual_coef + model.intercept
                        rmse = float(np.sqrt(np.mean((predicted * target[1] + target[0] - validation[1]) ** 2)))
                        scores[f"{kind} gamma={gamma:.3g} C={c:g}"] = rmse
                    if best is None or (rmse is not None and rmse < best[1]):
                        best = (model, rmse, kind, c)
            errors = [rmse for key, rmse in scores.items() if key.startswith(f"{kind} ")]
            said = f"best val RMSE {min(errors):.4g}" if errors else f"gamma {pinned['gamma']:.3g}, C {pinned['C']:g}"
            say(f"{self.name} {kind}: {said} ({time.perf_counter() - started:.1f} s)")
        self.model, _, kind, c = best
        self.record.update(chosen={"scaling": kind, "gamma": self.model.gamma, "C": c}, validation_rmse=scores,
                           output="value", support_vectors=int(len(self.model.support)))
        return self

    def predict_values(self, features):
        return self.model.values(features)

    def predict_proba(self, features):
        raise FeatcacheError(f"{self.name} predicts numbers, not class probabilities")

    def for_fold(self):
        return SvrHead(self.name, self.options, choices=dict(self.record["chosen"]))

    def to_keras(self, feature_shape):
        raise FeatcacheError(f"{self.name}: an RBF kernel has no exact Keras layer equivalent; export ridge or a "
                             "Keras head instead, or use `featcache predict`, which runs any head")

    def _write(self, folder):
        np.savez(folder / "model.npz", **self.model.arrays())
        self.record["scaling"] = self.model.scaling.kind
        return ["model.npz"]

    def _read(self, folder):
        with np.load(folder / "model.npz", allow_pickle=False) as arrays:
            self.model = SvrModel.from_arrays(self.record["scaling"], arrays)
