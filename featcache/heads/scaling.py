"""Feature scaling chosen per head: standardise, L2-normalise rows, divide by one number, or leave the
features as cached.

No one choice wins everywhere: standardising 8,192 unpooled VGG16 features weights noise as much
as signal on small data, where the raw or L2-normalised features (the tutorials' recipe) win;
pooled features of many images prefer standardising. Linear heads therefore try standard, l2 and
the raw features on validation ("auto"). ``rms`` divides every feature by one number, the training
features' root mean square: the raw features' relative sizes (a rare activation stays small, where
standardising makes it tens of deviations) at the scale Adam's defaults suit, the Keras heads'
default. For a linear head, whose C grid is relative to the rows' norm, ``rms`` is ``none``'s model
(the same minimum, to the solver's tolerance), reached in fewer iterations: elpv's logistic path took
3.8 s instead of 5.4 s, so "auto" searches it in place of ``none``. Every choice folds into plain
Keras layers for export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHOICES = ("standard", "l2", "rms")  # what "auto" searches for the linear heads


@dataclass(frozen=True)
class Scaling:
    """x -> (x - mean) / scale, or x / ||x||, or x / scale (one number), or x, on flattened float32 rows."""

    kind: str
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    @classmethod
    def fit(cls, kind: str, x: np.ndarray) -> Scaling:
        if kind not in ("rms", "standard"):
            return cls(kind)
        # einsum sums squares in float64 without a float64 copy of the rows (rms on elpv: 0.28 s -> 0.02 s)
        flat = np.asarray(x, np.float32).reshape(len(x), -1)
        if kind == "rms":
            return cls.of_rms(float(np.einsum("ij,ij->", flat, flat, dtype=np.float64)) / max(flat.size, 1))
        mean = flat.mean(axis=0, dtype=np.float64)
        centred = flat - mean.astype(np.float32)
        std = np.sqrt(np.einsum("ij,ij->j", centred, centred, dtype=np.float64) / max(len(flat), 1))
        return cls(kind, mean.astype(np.float32), np.where(std > 0, std, 1).astype(np.float32))

    @classmethod
    def from_moments(cls, kind: str, count: int, total: np.ndarray, squares: np.ndarray) -> Scaling:
        """A standardisation from streamed sums (float64), as ``fit`` computes it in memory."""
        if kind == "rms":
            return cls.of_rms(float(np.sum(squares)) / max(count * len(squares), 1))
        if kind != "standard":
            return cls(kind)
        mean = total / max(count, 1)
        std = np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0))
        return cls(kind, mean.astype(np.float32), np.where(std > 0, std, 1).astype(np.float32))

    @classmethod
    def of_rms(cls, mean_square: float) -> Scaling:
        """x / sqrt(mean square) (1 for all-zero features)."""
        return cls("rms", None, np.array([np.sqrt(mean_square) or 1.0], np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        if self.kind == "standard":
            return (x - self.mean) / self.scale
        if self.kind == "l2":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            return x / np.maximum(norms, 1e-12)
        if self.kind == "rms":
            return x / self.scale
        return x

    def arrays(self) -> dict[str, np.ndarray]:
        if self.scale is None:
            return {}
        return {"scaling_scale": self.scale} if self.mean is None else {"scaling_mean": self.mean,
                                                                          "scaling_scale": self.scale}

    @classmethod
    def from_arrays(cls, kind: str, arrays) -> Scaling:
        if kind == "rms":
            return cls(kind, None, np.asarray(arrays["scaling_scale"]))
        if kind != "standard":
            return cls(kind)
        return cls(kind, np.asarray(arrays["scaling_mean"]), np.asarray(arrays["scaling_scale"]))

    def keras_layer(self, name: str = "scaling"):
        """The scaling as one built-in Keras layer on flat rows (None for "none")."""
        import keras

        if self.kind == "l2":
            return keras.layers.UnitNormalization(axis=-1, name=name)
        if self.kind == "standard":
            return keras.layers.Normalization(axis=-1, mean=self.mean, variance=self.scale**2, name=name)
        if self.kind == "rms":  # in float32 always: under a bfloat16 policy the divisor itself would round
            return keras.layers.Rescaling(1.0 / float(self.scale[0]), name=name, dtype="float32")
        return None


def streamed_moments(batches) -> tuple[int, np.ndarray, np.ndarray]:
    """(rows, sum, sum of squares) in float64 over (x, y) batches of flattened rows."""
    count, total, squares = 0, None, None
    for x, _ in batches:
        x = np.asarray(x, np.float64).reshape(len(x), -1)
        if total is None:
            total, squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        count += len(x)
        total += x.sum(axis=0)
        squares += (x * x).sum(axis=0)
    return count, total, squares
