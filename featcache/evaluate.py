"""Metrics of a fitted head on a cache: accuracy, balanced accuracy, macro F1, log loss, confusion
matrix and the misclassified images for classes (and the mean class error for ordered classes); for
sets of classes (multi-label) exact-match accuracy, micro and macro F1, Hamming loss and per-class
scores; MAE, RMSE, R² and the worst predicted images for numbers; K-fold cross-validation on the
training split."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np

from featcache import FeatcacheError, streaming
from featcache.cache import Cache
from featcache.heads import Head, head_dir, load_head
from featcache.heads.protocol import choose_label_thresholds, choose_threshold, decide


@dataclass
class SplitResult:
    """A head's predictions on one split, kept with the rows they belong to: (N, K) class probabilities
    (independent ones for a multi-label target, whose labels are (N, K) rows of 0 and 1), or for a
    regression target (N,) predicted numbers."""

    outputs: np.ndarray
    labels: np.ndarray
    paths: list[str]
    predict_seconds: float
    threshold: float | list[float] | None = None  # a two-class head's decision threshold, or one per class

    @property
    def numbers(self) -> bool:
        return self.outputs.ndim == 1

    @property
    def sets(self) -> bool:
        """Whether each row has a set of classes (multi-label)."""
        return self.labels.ndim == 2

    @property
    def predicted(self) -> np.ndarray:
        return self.outputs if self.numbers else decide(self.outputs, self.threshold)

    def metrics(self, n_classes: int, task: str = "classification") -> dict:
        """What fits the target: regression metrics for numbers; for classes, accuracy, balanced accuracy,
        macro F1, per-class scores, log loss and confusion, and the mean class error when they are ordered."""
        if self.numbers:
            return self._value_metrics()
        if self.sets:
            return self._set_metrics()
        from sklearn.metrics import balanced_accuracy_score, confusion_matrix, log_loss, precision_recall_fscore_support

        everything = list(range(n_classes))
        precision, recall, f1, support = precision_recall_fscore_support(
            self.labels, self.predicted, labels=everything, zero_division=0)
        ordered = {}
        if task == "ordinal":
            ordered["mean_class_error"] = float(np.mean(np.abs(self.predicted - self.labels)))
        return {**ordered,
            "accuracy": float((self.predicted == self.labels).mean()),
            "balanced_accuracy": float(balanced_accuracy_score(self.labels, self.predicted)),
            "macro_f1": float(np.mean(f1)),  # every class counts alike, however rare: imbalance shows
            "per_class": [{"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for p, r, f, s in zip(precision, recall, f1, support, strict=True)],
            "log_loss": float(log_loss(self.labels, _clipped(self.outputs), labels=everything)),
            "confusion": confusion_matrix(self.labels, self.predicted, labels=everything).tolist(),
            "rows": len(self.labels),
            "predict_seconds": round(self.predict_seconds, 4),
        }

    def _value_metrics(self) -> dict:
        from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

        return {"mae": float(mean_absolute_error(self.labels, self.outputs)),
                "rmse": float(root_mean_squared_error(self.labels, self.outputs)),
                "r2": float(r2_score(self.labels, self.outputs)) if len(self.labels) > 1 else None,
                "rows": len(self.labels), "predict_seconds": round(self.predict_seconds, 4)}

    def _set_metrics(self) -> dict:
        """Multi-label: exact-match accuracy (every class right), micro F1 (over all decisions), macro F1
        (classes alike), the Hamming loss (share of wrong decisions), per-class scores, and the mean
        binary cross-entropy as log loss."""
        from sklearn.metrics import f1_score, hamming_loss, multilabel_confusion_matrix, precision_recall_fscore_support

        predicted = self.predicted
        precision, recall, f1, support = precision_recall_fscore_support(self.labels, predicted, zero_division=0)
        p = np.clip(np.asarray(self.outputs, np.float64), 1e-7, 1 - 1e-7)
        cross_entropy = -(self.labels * np.log(p) + (1 - self.labels) * np.log(1 - p))
        return {
            "accuracy": float(np.all(predicted == self.labels, axis=1).mean()),
            "micro_f1": float(f1_score(self.labels, predicted, average="micro", zero_division=0)),
            "macro_f1": float(np.mean(f1)),
            "hamming_loss": float(hamming_loss(self.labels, predicted)),
            "per_class": [{"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for p, r, f, s in zip(precision, recall, f1, support, strict=True)],
            "log_loss": float(cross_entropy.mean()) if cross_entropy.size else 0.0,
            "confusion_per_class": multilabel_confusion_matrix(self.labels, predicted).tolist(),  # [[TN FP] [FN TP]]
            "rows": len(self.labels),
            "predict_seconds": round(self.predict_seconds, 4),
        }

    def misclassified(self, classes: list[str], worst: int = 24) -> list[dict]:
        """The wrongly classified rows; for numbers, the ``worst`` rows by absolute error, largest first;
        for sets of classes, the rows whose set is not exactly right."""
        if self.numbers:
            errors = np.abs(self.outputs - self.labels)
            return [{"relpath": self.paths[i], "true": f"{self.labels[i]:.4g}", "predicted": f"{self.outputs[i]:.4g}",
                     "error": float(errors[i])} for i in np.argsort(-errors, kind="stable")[:worst]]
        if self.sets:
            predicted = self.predicted

            def names(row):
                return ";".join(classes[i] for i in np.flatnonzero(row)) or "(none)"

            # a row's surest wrong decision: the probability of a class wrongly named, or one minus that of a
            # class wrongly left out (a near miss of a threshold scores low, a confident mistake high)
            sure = np.where(predicted == 1, self.outputs, 1 - self.outputs)
            confidence = np.where(predicted != self.labels, sure, -np.inf).max(axis=1)
            wrong = np.flatnonzero(np.any(predicted != self.labels, axis=1))
            return [{"relpath": self.paths[i], "true": names(self.labels[i]), "predicted": names(predicted[i]),
                     "probability": float(confidence[i])} for i in wrong]
        wrong = np.flatnonzero(self.predicted != self.labels)
        return [
            {"relpath": self.paths[i], "true": classes[self.labels[i]],
             "predicted": classes[self.predicted[i]], "probability": float(self.outputs[i].max())}
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
    predict = head.predict_values if head.predicts_values else head.predict_proba
    parts = [(predict(x), y, p) for x, y, p in cache.iter_batches(split, batch_size)]
    outputs = np.concatenate([p for p, _, _ in parts])
    labels = np.concatenate([y for _, y, _ in parts])
    return SplitResult(outputs, labels, [q for _, _, ps in parts for q in ps],
                       time.perf_counter() - started, head.threshold)


def decision_threshold(head: Head, cache: Cache, threshold: float | str | None = None) -> dict | None:
    """What decides a two-class head, as ``FitOptions.threshold`` asks: None (the most probable class), a
    pinned threshold, or the one with the best balanced accuracy on validation (``protocol.choose_threshold``),
    with both scores recorded. A multi-label head always has one per class: pinned, or each chosen for
    its class's F1 on validation (``protocol.choose_label_thresholds``)."""
    if cache.task == "multilabel":
        if threshold is not None:
            return {"value": [float(threshold)] * len(cache.classes), "chosen_by": "--threshold"}
        validation = predict_split(head, cache, "validation")
        return {"value": choose_label_thresholds(validation.labels, validation.outputs),
                "chosen_by": "F1 of each class on validation"}
    if len(cache.classes) != 2 or threshold is None:
        return None
    if not isinstance(threshold, str):
        return {"value": float(threshold), "chosen_by": "--threshold"}
    validation = predict_split(head, cache, "validation")
    if len(set(validation.labels.tolist())) < 2:
        return {"value": 0.5, "chosen_by": "default (validation holds one class)"}
    value, balanced, at_half = choose_threshold(validation.labels, validation.outputs[:, 1])
    return {"value": value, "chosen_by": "balanced accuracy on validation",
            "validation_balanced_accuracy": balanced, "validation_balanced_accuracy_at_0.5": at_half}


def evaluate(head: Head, cache: Cache, batch_size: int = 2048) -> dict[str, dict]:
    """Metrics on validation and (when present) test; ``batch_size`` rows in memory at a time."""
    return {
        split: predict_split(head, cache, split, batch_size).metrics(len(cache.classes), cache.task)
        for split in ("validation", "test") if split in cache.splits
    }


def cross_validation_bytes(cache: Cache) -> int:
    """What in-memory cross-validation holds: the training split as float32, a few copies at once, and
    the linear heads' n x n matrices."""
    rows, size = cache.rows("train"), streaming.RowSize.of(cache)
    return streaming.IN_MEMORY_COPIES * rows * size.float32 + streaming.gram_bytes(rows, size)


def check_cross_validation_fits(cache: Cache, names: list[str], folds: int, budget: int | None) -> None:
    """Refuse, before any work, cross-validation of a head that cannot refit within ``budget`` bytes.

    A training split that fits is refitted in memory; one that does not is streamed fold by fold,
    as fit-head streams. A head that cannot stream (a kernel SVM) is refused then, and so are more
    folds than training images (each fold holds out at least one).
    """
    images = len(set(cache.row_index("train")[1]))
    if folds > images:
        raise FeatcacheError(f"--cv {folds}: cache {cache.key[:16]} has {images} training images, so at most "
                             f"{images} folds; 5 or 10 is usual")
    needed = cross_validation_bytes(cache)
    if budget is None or needed <= budget:
        return
    for name in names:
        head = load_head(head_dir(cache, name))
        if not head.refittable:  # a fine-tuned head is not refitted per fold (see compare)
            continue
        if not head.streams:
            raise FeatcacheError(
                f"--cv {folds} refits {name}, which needs the training split in memory (a kernel SVM "
                f"cannot stream): about {streaming.format_size(needed)} for cache {cache.key[:16]}, over "
                f"--memory-budget {streaming.format_size(budget)}; raise --memory-budget, or compare "
                "without --cv"
            )
        head.stream_plan(cache, budget)


def cross_validate(head: Head, cache: Cache, folds: int, budget: int | None = None) -> list[float]:
    """Accuracy of each of K stratified folds of the training split (RMSE of K folds for a regression
    target; exact-match accuracy of K folds, not stratified, for a multi-label one), refitting the head's
    recipe (``head.for_fold()``: every choice validation made kept, e.g. C, scaling, the epochs early
    stopping chose, the decision thresholds).

    Folds group rows by source image, so an image and its augmented views are never on both
    sides; held-out folds are scored on original images only. A training split over ``budget``
    bytes is never read whole: each fold streams its rows.
    """
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    labels, paths, views = cache.row_index("train")
    in_memory = budget is None or cross_validation_bytes(cache) <= budget
    x = cache.read("train")[0].astype(np.float32) if in_memory else None
    numbers = not cache.target.has_classes
    kind = StratifiedGroupKFold if cache.target.one_class_each else GroupKFold  # numbers and sets: not stratified
    splitter = kind(folds, shuffle=True, random_state=head.options.seed)
    scores = []
    for train, held_out in splitter.split(np.zeros((len(labels), 1)), labels, groups=paths):
        held_out = held_out[views[held_out] == 0]
        fold = head.for_fold()
        if threshold := head.record.get("threshold"):  # the decision validation chose, pinned like C or epochs
            fold.record["threshold"] = threshold
        if in_memory:
            fold.fit(x[train], labels[train], n_classes=len(cache.classes))
            predicted = fold.predict(x[held_out])
        else:
            plan = head.stream_plan(cache, budget)
            fold.fit_streamed(cache, plan, rows=_mask(train, len(labels)))
            held_out_rows = streaming.batches(cache, "train", plan.batch_rows, rows=_mask(held_out, len(labels)))
            predicted = np.concatenate([cache.no_labels(), *(fold.predict(x) for x, _ in held_out_rows)])
        truth = labels[held_out]
        right = (predicted == truth).reshape(len(truth), -1).all(axis=1)  # a multi-label row: every class right
        scores.append(float(np.sqrt(np.mean((predicted - truth) ** 2)) if numbers else right.mean()))
        gc.collect()  # a fold's model and its pipelines sit in reference cycles: free them before the next
    return scores


def _mask(indices: np.ndarray, n: int) -> np.ndarray:
    mask = np.zeros(n, bool)
    mask[indices] = True
    return mask
