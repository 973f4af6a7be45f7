"""Metrics of a fitted head on a cache: accuracy, balanced accuracy, log loss, confusion matrix,
the misclassified images, and K-fold cross-validation on the training split."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from featcache import FeatcacheError, streaming
from featcache.cache import Cache
from featcache.heads import Head, compiled_keras_head, get_spec, sklearn_model


@dataclass
class SplitResult:
    """A head's predictions on one split, kept with the rows they belong to."""

    probabilities: np.ndarray
    labels: np.ndarray
    paths: list[str]
    predict_seconds: float

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def metrics(self, n_classes: int) -> dict:
        from sklearn.metrics import balanced_accuracy_score, confusion_matrix, log_loss

        everything = list(range(n_classes))
        return {
            "accuracy": float((self.predicted == self.labels).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(self.labels, self.predicted)),
            "log_loss": float(log_loss(self.labels, _clipped(self.probabilities), labels=everything)),
            "confusion": confusion_matrix(self.labels, self.predicted, labels=everything).tolist(),
            "rows": len(self.labels),
            "predict_seconds": round(self.predict_seconds, 4),
        }

    def misclassified(self, classes: list[str]) -> list[dict]:
        wrong = np.flatnonzero(self.predicted != self.labels)
        return [
            {"relpath": self.paths[i], "true": classes[self.labels[i]],
             "predicted": classes[self.predicted[i]], "probability": float(self.probabilities[i].max())}
            for i in wrong
        ]


def _clipped(probabilities: np.ndarray) -> np.ndarray:
    """float32 probabilities clipped away from 0 and renormalised, so log loss stays finite."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-7, 1)
    return p / p.sum(axis=1, keepdims=True)


def predict_split(head: Head, cache: Cache, split: str, batch_size: int = 2048) -> SplitResult:
    """Stream the split's shards through the head, ``batch_size`` rows at a time."""
    head.check_cache(cache)
    started = time.perf_counter()
    parts = [(head.predict_proba(x), y, p) for x, y, p in cache.iter_batches(split, batch_size)]
    probabilities = np.concatenate([p for p, _, _ in parts])
    labels = np.concatenate([y for _, y, _ in parts])
    return SplitResult(probabilities, labels, [q for _, _, ps in parts for q in ps],
                       time.perf_counter() - started)


def evaluate(head: Head, cache: Cache, batch_size: int = 2048) -> dict[str, dict]:
    """Metrics on validation and (when present) test; ``batch_size`` rows in memory at a time."""
    return {
        split: predict_split(head, cache, split, batch_size).metrics(len(cache.classes))
        for split in ("validation", "test") if split in cache.splits
    }


def cross_validation_bytes(cache: Cache) -> int:
    """What ``cross_validate`` holds: the training split as float32, a few copies at once."""
    rows = cache.manifest["splits"]["train"]["rows"]
    return streaming.IN_MEMORY_COPIES * rows * streaming.RowSize.of(cache).float32


def check_cross_validation_fits(cache: Cache, folds: int, budget: int | None) -> None:
    """Refuse, before any work, cross-validation whose in-memory refits would exceed ``budget`` bytes."""
    needed = cross_validation_bytes(cache)
    if budget is not None and needed > budget:
        raise FeatcacheError(
            f"--cv {folds} refits each head on the training split in memory: about "
            f"{streaming.format_size(needed)} for cache {cache.key[:16]}, over --memory-budget "
            f"{streaming.format_size(budget)}; raise --memory-budget, or compare without --cv"
        )


def cross_validate(head: Head, cache: Cache, folds: int) -> list[float]:
    """Accuracy of each of K stratified folds of the training split, refitting the head's recipe.

    Folds group rows by source image, so an image and its augmented views are never on both
    sides; held-out folds are scored on original images only. scikit-learn heads keep the C
    chosen on validation; Keras heads train for the epochs the fitted head actually ran (early
    stopping already chose them on validation).
    """
    import keras
    from sklearn.model_selection import StratifiedGroupKFold

    options = head.info["options"]
    x, y, paths = cache.read("train")
    x, originals = x.astype(np.float32), cache.views("train") == 0
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=options["seed"])
    scores = []
    for train, held_out in splitter.split(x, y, groups=paths):
        held_out = held_out[originals[held_out]]
        if get_spec(head.name).library == "sklearn":
            class_weight = "balanced" if options["class_weight"] == "balanced" else None
            model = sklearn_model(head.name, head.info["chosen"]["C"], options["seed"], class_weight)
            model.fit(x[train].reshape(len(train), -1), y[train])
            predicted = model.predict(x[held_out].reshape(len(held_out), -1))
        else:
            keras.utils.set_random_seed(options["seed"])
            binary = len(cache.classes) == 2
            model = compiled_keras_head(head.name, x.shape[1:], len(cache.classes), options["optimizer"],
                                        options["learning_rate"])
            model.fit(x[train], y[train], epochs=head.info["epochs_run"], batch_size=options["batch_size"],
                      verbose=0)
            p = model.predict(x[held_out], verbose=0)
            predicted = (p[:, 0] > 0.5).astype(int) if binary else p.argmax(axis=1)
        scores.append(float((predicted == y[held_out]).mean()))
    return scores
