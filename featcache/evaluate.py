"""Metrics of a fitted head on a cache: accuracy, balanced accuracy, log loss, confusion matrix,
the misclassified images, and K-fold cross-validation on the training split."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass

import numpy as np

from featcache import FeatcacheError, streaming
from featcache.cache import Cache
from featcache.heads import Head, compiled_keras_head, get_spec, head_dir, sklearn_model, split_batches


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
    """What in-memory cross-validation holds: the training split as float32, a few copies at once."""
    rows = cache.manifest["splits"]["train"]["rows"]
    return streaming.IN_MEMORY_COPIES * rows * streaming.RowSize.of(cache).float32


def check_cross_validation_fits(cache: Cache, names: list[str], folds: int, budget: int | None) -> None:
    """Refuse, before any work, cross-validation of a head that cannot refit within ``budget`` bytes.

    A training split that fits is refitted in memory; one that does not is streamed fold by fold,
    as fit-head streams (Keras heads; logreg and svm by SGD). A kernel SVM cannot stream.
    """
    needed = cross_validation_bytes(cache)
    if budget is None or needed <= budget:
        return
    for name in names:
        info = json.loads((head_dir(cache, name) / "head.json").read_text())
        if "finetune" in info:  # not refitted per fold (see compare)
            continue
        if get_spec(name).library == "keras":
            streaming.keras_plan(cache, budget, info["options"]["batch_size"])
        elif name in streaming.SGD_LOSSES:
            streaming.sgd_plan(cache, budget)
        else:
            raise FeatcacheError(
                f"--cv {folds} refits {name}, which needs the training split in memory (a kernel SVM "
                f"cannot stream): about {streaming.format_size(needed)} for cache {cache.key[:16]}, over "
                f"--memory-budget {streaming.format_size(budget)}; raise --memory-budget, or compare "
                "without --cv"
            )


def cross_validate(head: Head, cache: Cache, folds: int, budget: int | None = None) -> list[float]:
    """Accuracy of each of K stratified folds of the training split, refitting the head's recipe.

    Folds group rows by source image, so an image and its augmented views are never on both
    sides; held-out folds are scored on original images only. scikit-learn heads keep the C
    chosen on validation; Keras heads train for the epochs the fitted head actually ran (early
    stopping already chose them on validation). A training split over ``budget`` bytes is never
    read whole: each fold streams its rows (``check_cross_validation_fits`` says which heads can).
    """
    from sklearn.model_selection import StratifiedGroupKFold

    options = head.info["options"]
    labels, paths, views = cache.row_index("train")
    in_memory = budget is None or cross_validation_bytes(cache) <= budget
    x = cache.read("train")[0].astype(np.float32) if in_memory else None
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=options["seed"])
    scores = []
    for train, held_out in splitter.split(np.zeros((len(labels), 1)), labels, groups=paths):
        held_out = held_out[views[held_out] == 0]
        if in_memory:
            predicted = _refit_in_memory(head, cache, x, labels, train, held_out)
        else:
            fold = _mask(train, len(labels)), _mask(held_out, len(labels))
            predicted = _refit_streamed(head, cache, labels, *fold, budget)
        scores.append(float((predicted == labels[held_out]).mean()))
        gc.collect()  # a fold's model and its pipelines sit in reference cycles: free them before the next
    return scores


def _mask(indices: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[indices] = True
    return mask


def _fold_class_weights(labels: np.ndarray, n_classes: int, options: dict) -> dict[int, float] | None:
    """'balanced' weights of the fold's own rows, as scikit-learn computes them."""
    if options["class_weight"] != "balanced":
        return None
    counts = np.bincount(labels, minlength=n_classes)
    return {i: float(len(labels) / (n_classes * max(n, 1))) for i, n in enumerate(counts)}


def _refit_in_memory(head: Head, cache: Cache, x: np.ndarray, y: np.ndarray, train: np.ndarray,
                     held_out: np.ndarray) -> np.ndarray:
    import keras

    options = head.info["options"]
    if get_spec(head.name).library == "sklearn":
        class_weight = "balanced" if options["class_weight"] == "balanced" else None
        model = sklearn_model(head.name, head.info["chosen"]["C"], options["seed"], class_weight)
        model.fit(x[train].reshape(len(train), -1), y[train])
        return model.predict(x[held_out].reshape(len(held_out), -1))
    keras.utils.set_random_seed(options["seed"])
    model = compiled_keras_head(head.name, x.shape[1:], len(cache.classes), options["optimizer"],
                                options["learning_rate"])
    model.fit(x[train], y[train], epochs=head.info["epochs_run"], batch_size=options["batch_size"],
              class_weight=_fold_class_weights(y[train], len(cache.classes), options), verbose=0)
    return _classes(model.predict(x[held_out], verbose=0))


def _refit_streamed(head: Head, cache: Cache, labels: np.ndarray, train: np.ndarray, held_out: np.ndarray,
                    budget: int) -> np.ndarray:
    """The fold (masks over the training split) refitted on streamed rows within ``budget``: a Keras
    head as fit-head trains it, logreg or svm by SGD (its C kept; epochs and patience on validation,
    as in a streamed fit)."""
    import keras

    options = head.info["options"]
    weights = _fold_class_weights(labels[train], len(cache.classes), options)
    if get_spec(head.name).library == "keras":
        plan = streaming.keras_plan(cache, budget, options["batch_size"])
        keras.utils.set_random_seed(options["seed"])
        model = compiled_keras_head(head.name, cache.manifest["feature_shape"], len(cache.classes),
                                    options["optimizer"], options["learning_rate"])
        fold_rows = split_batches(cache, "train", options["batch_size"], options["seed"], plan.buffer_rows,
                                  train)
        model.fit(fold_rows, epochs=head.info["epochs_run"], class_weight=weights, verbose=0, shuffle=False)
        held_out_rows = streaming.batches(cache, "train", plan.batch_rows, rows=held_out)
        parts = [_classes(model.predict_on_batch(x)) for x, _ in held_out_rows]
    else:
        plan = streaming.sgd_plan(cache, budget)
        model, _ = streaming.fit_sgd(cache, head.name, [head.info["chosen"]["C"]], weights, options["seed"],
                                     options["epochs"], options["patience"], plan, lambda _: None, train)
        held_out_rows = streaming.batches(cache, "train", plan.batch_rows, rows=held_out)
        parts = [model.predict(x.reshape(len(x), -1)) for x, _ in held_out_rows]
    return np.concatenate([np.zeros(0, int), *parts])


def _classes(probabilities: np.ndarray) -> np.ndarray:
    """Class indices from a Keras head's output: one sigmoid column, or a softmax row."""
    if probabilities.shape[1] == 1:
        return (probabilities[:, 0] > 0.5).astype(int)
    return probabilities.argmax(axis=1)
