"""Ridge regression: a number from the features, for a regression target or the rank of ordered classes.

Fitted exactly, for every penalty at once. On the centred scaled rows X (n x d), with fewer rows than
features, the weights lie in the span of the rows: w = Xᵀ a, a = (G + α I)⁻¹ (y - ȳ) for the Gram
matrix G = X Xᵀ = U Λ Uᵀ, so one eigendecomposition makes each α of the grid a diagonal solve, and
validation predictions are (Xv Xᵀ) a; with more rows than features the same on Xᵀ X. The grid is
relative (α = t x mean ‖x‖², as the linear heads' C), scaling x α chosen on validation: the lowest
RMSE for numbers; for ordered classes the most accurate rounded class (ties: lower RMSE).

An ordinal head reads its score back as classes by "soft rounding": the score clipped to [0, K-1]
and shared between its two nearest classes, p_k = max(0, 1 - |s - k|). These sum to 1, their most
probable class is the rounded score, and they are built-in Dense and ReLU layers in an export. They
state no uncertainty beyond the score's distance to a class, so a wrong class costs a large log loss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from featcache import FeatcacheError
from featcache.heads.linear import sample_weights
from featcache.heads.protocol import Head
from featcache.heads.scaling import CHOICES, Scaling

# alpha = t x the mean squared norm of the centred rows: seven decades around the rows' own scale
GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


@dataclass(frozen=True)
class RidgeModel:
    """value = scaling(x) @ w + b; for K ordered classes, probabilities by soft rounding of the value."""

    scaling: Scaling
    weights: np.ndarray  # (d, 1)
    bias: np.ndarray  # (1,)
    n_classes: int  # 0: a number; K: the rank of K ordered classes

    def values(self, x: np.ndarray) -> np.ndarray:
        return (self.scaling.apply(x) @ self.weights + self.bias)[:, 0].astype(np.float64)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weights": self.weights, "bias": self.bias, **self.scaling.arrays()}

    @classmethod
    def from_arrays(cls, scaling: str, n_classes: int, arrays) -> RidgeModel:
        return cls(Scaling.from_arrays(scaling, arrays), np.asarray(arrays["weights"]), np.asarray(arrays["bias"]),
                   n_classes)


def soft_round(values: np.ndarray, n_classes: int) -> np.ndarray:
    """(N, K) probabilities of K ordered classes from scores on the class ranks: max(0, 1 - |s - k|) of
    the score clipped to [0, K-1]; they sum to 1 and their argmax is the rounded score."""
    clipped = np.clip(np.asarray(values, np.float64), 0, n_classes - 1)[:, None]
    return np.maximum(0.0, 1.0 - np.abs(clipped - np.arange(n_classes)))


class RidgeHead(Head):
    """Ridge regression on the cached features; ``choices`` pins scaling and alpha (cross-validation folds)."""

    kind = "ridge"
    streams = False  # the Gram matrix needs every training row at once

    def __init__(self, name: str, options, *, choices: dict | None = None):
        super().__init__(name, options)
        self.choices = choices
        self.model: RidgeModel | None = None

    def fit(self, x, y, *, n_classes, validation=None, say=None):
        say = say or (lambda message: None)
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        y = np.asarray(y, np.float64)
        if self.choices:
            scalings, grid = [self.choices["scaling"]], [self.choices["alpha"]]
        else:
            scalings = list(CHOICES) if self.options.scaling == "auto" else [self.options.scaling]
            grid = None
        if validation is None and grid is None:  # pinned choices (a fold) need none
            raise FeatcacheError(f"{self.name}: choosing scaling and alpha needs validation rows")
        weights = sample_weights(y, n_classes, self.options.class_weight) if n_classes else None
        best, scores = None, {}
        for kind in scalings:
            started, path_best = time.perf_counter(), None
            for candidate in _path(kind, x, y, grid, validation, n_classes, weights):
                if candidate["score"] is not None:
                    scores[f"{kind} alpha={candidate['alpha']:.3g}"] = candidate["rmse"]
                if path_best is None or candidate["score"] is None or candidate["score"] > path_best["score"]:
                    path_best = candidate
            if best is None or path_best["score"] is None or path_best["score"] > best["score"]:
                best = path_best
            rmse = "" if path_best["rmse"] is None else f"best val RMSE {path_best['rmse']:.4g}, "
            say(f"{self.name} {kind}: {rmse}alpha {path_best['alpha']:.3g} ({time.perf_counter() - started:.1f} s)")
        self.model = RidgeModel(best["scaling"], best["weights"], best["bias"], n_classes)
        self.record.update(chosen={"scaling": best["scaling"].kind, "alpha": best["alpha"]},
                           validation_rmse=scores, output="ordinal" if n_classes else "value",
                           trainable_params=int(self.model.weights.size + 1))
        return self

    def predict_values(self, features):
        return self.model.values(features)

    def predict_proba(self, features):
        if self.predicts_values:
            raise FeatcacheError(f"{self.name} predicts numbers on this regression cache, not class probabilities")
        return soft_round(self.model.values(features), self.model.n_classes)

    def for_fold(self):
        return RidgeHead(self.name, self.options, choices=dict(self.record["chosen"]))

    def to_keras(self, feature_shape):
        from featcache.heads.export import value_keras_model

        m = self.model
        return value_keras_model(m.scaling, m.weights, m.bias, feature_shape, m.n_classes, name=f"head_{self.name}")

    def _write(self, folder):
        np.savez(folder / "model.npz", **self.model.arrays())
        self.record.update(scaling=self.model.scaling.kind)
        return ["model.npz"]

    def _read(self, folder):
        with np.load(folder / "model.npz", allow_pickle=False) as arrays:
            self.model = RidgeModel.from_arrays(self.record["scaling"], len(self.record["classes"]), arrays)


def _path(kind: str, x: np.ndarray, y: np.ndarray, grid, validation, n_classes: int,
          sample_weight: np.ndarray | None = None):
    """Candidates of one scaling along the alpha grid: dicts of alpha, weights, bias, scaling, validation
    RMSE and score (higher is better; None without validation). ``sample_weight`` (class weights of ordered
    classes) weighs each row's squared error: rows centred by the weighted means, then scaled by its root."""
    scaling = Scaling.fit(kind, x)
    rows = scaling.apply(x).astype(np.float64)
    weight = np.ones(len(y)) if sample_weight is None else sample_weight / sample_weight.mean()
    mean, target_mean = np.average(rows, axis=0, weights=weight), float(np.average(y, weights=weight))
    root = np.sqrt(weight)
    rows = (rows - mean) * root[:, None]
    centred = (y - target_mean) * root
    mean_square = max(float(np.einsum("ij,ij->", rows, rows)) / len(rows), 1e-12)
    dual = len(rows) <= rows.shape[1]
    # eigenvectors of the smaller of X Xᵀ (dual) and Xᵀ X (primal); float64: the small eigenvalues matter
    eigenvalues, vectors = np.linalg.eigh(rows @ rows.T if dual else rows.T @ rows)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    projected = vectors.T @ (centred if dual else rows.T @ centred)
    xv = None if validation is None else scaling.apply(validation[0]).astype(np.float64) - mean
    for alpha in grid or [t * mean_square for t in GRID]:
        coefficients = vectors @ (projected / (eigenvalues + alpha))
        weights = rows.T @ coefficients if dual else coefficients
        bias = target_mean - float(mean @ weights)  # on uncentred scaled rows
        candidate = {"alpha": float(alpha), "weights": weights[:, None].astype(np.float32),
                     "bias": np.array([bias], np.float32), "scaling": scaling, "score": None, "rmse": None}
        if xv is not None:
            predicted = xv @ weights + target_mean
            rmse = float(np.sqrt(np.mean((predicted - validation[1]) ** 2)))
            candidate["rmse"] = rmse
            if n_classes:  # the class predict reads back (ties: the lower class, as argmax takes them)
                rounded = soft_round(predicted, n_classes).argmax(axis=1)
                candidate["score"] = (float(np.mean(rounded == validation[1])), -rmse)
            else:
                candidate["score"] = (-rmse,)
        yield candidate
