"""svm-rbf: an RBF-kernel SVM with gamma, C and scaling chosen on validation, stored as arrays.

One Gram matrix per scaling gives every squared distance, so the whole gamma x C grid fits on
precomputed kernels (scikit-learn's SVC, kernel="precomputed") without touching the features again.
gamma is relative to the mean squared distance between training rows (t / mean d², where
scikit-learn's "scale" default is about t = 2 on standardised features), so one grid fits every
scaling. Probabilities are Platt's sigmoids on the one-vs-rest decision values, fitted on held-out
decision values of shuffled stratified folds, as ``CalibratedClassifierCV(ensemble=False)`` does.

Stored as data only: the support vectors (scaled), the dual coefficients and intercepts in
libsvm's one-vs-one layout, gamma, and Platt's (a, b); ``decision`` recomputes scikit-learn's
decision function from them (tested against it). An RBF kernel has no exact form in Keras layers,
so ``to_keras`` refuses in one line.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import numpy as np

from featcache import FeatcacheError
from featcache.heads.linear import calibration_folds, sample_weights
from featcache.heads.protocol import Head, class_weight_of, two_columns
from featcache.heads.scaling import CHOICES, Scaling

GAMMAS = (0.5, 2.0, 8.0)  # x 1 / mean squared distance
CS = (0.1, 1.0, 10.0, 100.0)


@dataclass(frozen=True)
class RbfModel:
    scaling: Scaling
    support: np.ndarray  # (n_sv, d) scaled support vectors, ordered by class
    dual_coef: np.ndarray  # (k - 1, n_sv)
    intercept: np.ndarray  # one per pair of classes (i < j)
    n_support: np.ndarray  # support vectors per class
    gamma: float
    platt: np.ndarray  # (2, columns)

    def kernel(self, x: np.ndarray) -> np.ndarray:
        xs = self.scaling.apply(x)
        return rbf(squared_distances(xs, self.support), self.gamma)

    def decision(self, x: np.ndarray) -> np.ndarray:
        return decision(self.kernel(x), self.dual_coef, self.intercept, self.n_support)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        from scipy.special import expit

        p = expit(-(self.platt[0] * self.decision(x) + self.platt[1]))
        if p.shape[1] == 1:
            return two_columns(p)
        total = p.sum(axis=1, keepdims=True)
        return np.where(total > 0, p / np.where(total > 0, total, 1), 1 / p.shape[1])

    def arrays(self) -> dict[str, np.ndarray]:
        return {"support": self.support, "dual_coef": self.dual_coef, "intercept": self.intercept,
                "n_support": self.n_support, "gamma": np.array(self.gamma), "platt": self.platt,
                **self.scaling.arrays()}

    @classmethod
    def from_arrays(cls, scaling: str, arrays) -> RbfModel:
        return cls(Scaling.from_arrays(scaling, arrays), *(np.asarray(arrays[k]) for k in
                   ("support", "dual_coef", "intercept", "n_support")), float(arrays["gamma"]),
                   np.asarray(arrays["platt"]))


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2 * (a @ b.T)
    return np.maximum(d2, 0)


def rbf(d2: np.ndarray, gamma: float) -> np.ndarray:
    return np.exp(-gamma * d2.astype(np.float64))


def scalings_to_try(options, pinned: dict | None) -> list[str]:
    """The scalings a kernel head tries: the pinned one, every choice for "auto", else the one asked."""
    if pinned:
        return [pinned["scaling"]]
    return list(CHOICES) if options.scaling == "auto" else [options.scaling]


def kernel_matrices(kind: str, x: np.ndarray, validation_x: np.ndarray | None = None, gamma: float | None = None):
    """(scaling of ``kind`` fitted on x, the scaled rows, and per gamma (gamma, training kernel,
    validation kernel or None)): GAMMAS relative to the mean squared distance between training rows,
    or the pinned ``gamma``. One matrix of squared distances serves every gamma."""
    scaling = Scaling.fit(kind, x)
    xs = scaling.apply(x)
    d2 = squared_distances(xs, xs)
    mean_d2 = max(float(d2.mean()), 1e-12)
    d2_val = None if validation_x is None else squared_distances(scaling.apply(validation_x), xs)
    gammas = [gamma] if gamma is not None else [t / mean_d2 for t in GAMMAS]
    return scaling, xs, ((g, rbf(d2, g), None if d2_val is None else rbf(d2_val, g)) for g in gammas)


def decision(kernel_rows: np.ndarray, dual_coef: np.ndarray, intercept: np.ndarray,
             n_support: np.ndarray) -> np.ndarray:
    """scikit-learn's SVC.decision_function (shape "ovr") from libsvm's one-vs-one layout: for
    classes i < j, the support vectors of i weighted by dual_coef[j - 1], those of j by dual_coef[i]."""
    k = len(n_support)
    if k == 2:
        return (kernel_rows @ dual_coef[0] + intercept[0])[:, None]
    starts = np.concatenate([[0], np.cumsum(n_support)])
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    values = np.column_stack([
        kernel_rows[:, starts[i]:starts[i + 1]] @ dual_coef[j - 1, starts[i]:starts[i + 1]]
        + kernel_rows[:, starts[j]:starts[j + 1]] @ dual_coef[i, starts[j]:starts[j + 1]] + intercept[p]
        for p, (i, j) in enumerate(pairs)
    ])
    votes, confidence = np.zeros((len(values), k)), np.zeros((len(values), k))
    for p, (i, j) in enumerate(pairs):  # a positive value votes for i
        votes[:, i] += values[:, p] >= 0
        votes[:, j] += values[:, p] < 0
        confidence[:, i] += values[:, p]
        confidence[:, j] -= values[:, p]
    return votes + confidence / (3 * (np.abs(confidence) + 1))  # confidences only break ties of votes


class RbfSvmHead(Head):
    kind = "rbf-svm"
    streams = False  # a kernel SVM needs every training row at once: refused before fit_streamed

    def __init__(self, name: str, options, *, choices: dict | None = None):
        super().__init__(name, options)
        self.choices = choices
        self.model: RbfModel | None = None

    def fit(self, x, y, *, n_classes, validation=None, say=None):
        from sklearn.svm import SVC

        say = say or (lambda message: None)
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        y = np.asarray(y)
        pinned = self.choices
        if validation is None and not pinned:
            raise FeatcacheError(f"{self.name}: choosing scaling, gamma and C needs validation rows")
        weights = class_weight_of(y, n_classes, self.options.class_weight)
        best, best_score, scores = None, None, {}
        for kind in scalings_to_try(self.options, pinned):
            started = time.perf_counter()
            scaling, xs, grid = kernel_matrices(kind, x, None if validation is None else validation[0],
                                                pinned["gamma"] if pinned else None)
            for gamma, k_train, k_val in grid:
                for c in [pinned["C"]] if pinned else CS:
                    svc = SVC(kernel="precomputed", C=c, class_weight=weights).fit(k_train, y)
                    candidate = (kind, gamma, c, scaling, xs, k_train)
                    if k_val is None:
                        best = candidate
                        continue
                    score = float((svc.predict(k_val) == validation[1]).mean())
                    scores[f"{kind} gamma={gamma:.3g} C={c:g}"] = score
                    if best_score is None or score > best_score:
                        best, best_score = candidate, score
            say(f"{self.name} {kind}: best val accuracy "
                f"{max(v for k, v in scores.items() if k.startswith(kind)) if scores else 0:.1%} "
                f"({time.perf_counter() - started:.1f} s)")
        kind, gamma, c, scaling, xs, k_train = best
        self.model = self._calibrated(gamma, c, scaling, xs, k_train, y, n_classes)
        majority = float(np.bincount(validation[1]).max() / len(validation[1])) if validation is not None else None
        self.record.update(chosen={"scaling": kind, "gamma": gamma, "C": c}, validation_accuracy=scores,
                           validation_majority_rate=majority, output="proba",
                           support_vectors=int(len(self.model.support)))
        return self

    def _calibrated(self, gamma, c, scaling, xs, k_train, y, n_classes: int) -> RbfModel:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.model_selection import StratifiedKFold
        from sklearn.svm import SVC

        folds = calibration_folds(y, n_classes, self.name)
        cv = StratifiedKFold(folds, shuffle=True, random_state=self.options.seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            calibrated = CalibratedClassifierCV(SVC(kernel="precomputed", C=c), cv=cv, ensemble=False)
            calibrated.fit(k_train, y, sample_weight=sample_weights(y, n_classes, self.options.class_weight))
        (fold,) = calibrated.calibrated_classifiers_
        svc = fold.estimator
        if not np.array_equal(svc.classes_, np.arange(len(svc.classes_))):
            raise FeatcacheError(f"the training rows hold only classes {list(svc.classes_)}; "
                                 "every class needs training rows")
        platt = np.array([[cal.a_ for cal in fold.calibrators], [cal.b_ for cal in fold.calibrators]])
        return RbfModel(scaling, xs[svc.support_], np.asarray(svc.dual_coef_, np.float64),
                        np.asarray(svc.intercept_, np.float64), np.asarray(svc.n_support_), float(gamma), platt)

    def predict_proba(self, features):
        return self.model.predict_proba(features)

    def for_fold(self):
        return RbfSvmHead(self.name, self.options,
                          choices={k: self.record["chosen"][k] for k in ("scaling", "gamma", "C")})

    def to_keras(self, feature_shape):
        raise FeatcacheError(
            f"{self.name}: an RBF-kernel SVM has no exact Keras layer equivalent; export a Keras head, "
            "logreg or svm instead, or use `featcache predict`, which runs any head"
        )

    def _write(self, folder):
        np.savez(folder / "model.npz", **self.model.arrays())
        self.record["scaling"] = self.model.scaling.kind
        return ["model.npz"]

    def _read(self, folder):
        with np.load(folder / "model.npz", allow_pickle=False) as arrays:
            self.model = RbfModel.from_arrays(self.record["scaling"], arrays)
