"""Feature scaling chosen per head: standardise, L2-normalise rows, or leave the features as cached.

No one choice wins everywhere: standardising 8,192 unpooled VGG16 features weights noise as much
as signal on small data, where the raw or L2-normalised features (the tutorials' recipe) win;
pooled features of many images prefer standardising. Linear heads therefore try all three on
validation ("auto"); every choice folds into plain Keras layers for export.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CHOICES = ("standard", "l2", "none")


@dataclass(frozen=True)
class Scaling:
    """x -> (x - mean) / scale, or x / ||x||, or x, on flattened float32 rows."""

    kind: str
    mean: np.ndarray | None = None
    scale: np.ndarray | None = None

    @classmethod
    def fit(cls, kind: str, x: np.ndarray) -> Scaling:
        if kind != "standard":
            return cls(kind)
        mean = x.mean(axis=0, dtype=np.float64)
        std = x.std(axis=0, dtype=np.float64)
        return cls(kind, mean.astype(np.float32), np.where(std > 0, std, 1).astype(np.float32))

    @classmethod
    def from_moments(cls, kind: str, count: int, total: np.ndarray, squares: np.ndarray) -> Scaling:
        """A standardisation from streamed sums (float64), as ``fit`` computes it in memory."""
        if kind != "standard":
            return cls(kind)
        mean = total / max(count, 1)
        std = np.sqrt(np.maximum(squares / max(count, 1) - mean**2, 0))
        return cls(kind, mean.astype(np.float32), np.where(std > 0, std, 1).astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        if self.kind == "standard":
            return (x - self.mean) / self.scale
        if self.kind == "l2":
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            return x / np.maximum(norms, 1e-12)
        return x

    def arrays(self) -> dict[str, np.ndarray]:
        return {} if self.mean is None else {"scaling_mean": self.mean, "scaling_scale": self.scale}

    @classmethod
    def from_arrays(cls, kind: str, arrays) -> Scaling:
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
