"""logreg and svm over streamed shards, for caches over the memory budget: SGD in bounded memory.

A first pass takes the scaling's moments; then every C of the grid (as alpha = 1 / (C * n_train),
the same regularisation as the in-memory fit, with the same relative grid) trains on the same
shuffled mini-batches, one read of the cache per epoch for all of them. Each keeps its best
validation epoch and stops after ``patience`` epochs without gain; the best validation accuracy
picks C (ties: the smaller). An svm is then Platt-calibrated on validation rows, as many as half the
budget holds.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import numpy as np

from featcache import FeatcacheError
from featcache.cache import Cache
from featcache.heads.linear import GRID, sample_weights
from featcache.heads.protocol import class_weight_of
from featcache.heads.scaling import Scaling, streamed_moments
from featcache.streaming import RowSize, StreamPlan, batches, split_labels


@dataclass
class _Candidate:
    """One C of the grid trained by SGD, with the state of its best validation epoch so far."""

    c: float
    model: object
    accuracy: float = -1.0
    epoch: int = 0
    best: object = None


def fit_sgd(cache: Cache, name: str, loss: str, scaling_kind: str, cs, options, plan: StreamPlan, say,
            rows: np.ndarray | None = None):
    """(Scaling, fitted estimator, details) of logreg (log loss) or a linear svm (hinge) trained by
    SGD over streamed shards within ``plan``, on the training rows the mask ``rows`` keeps."""
    from sklearn.linear_model import SGDClassifier

    labels = split_labels(cache, "train")
    labels = labels if rows is None else labels[rows]
    n_train, n_classes = len(labels), len(cache.classes)
    classes = np.arange(n_classes)
    missing = sorted(set(classes.tolist()) - set(split_labels(cache, "validation").tolist()))
    if loss == "hinge" and missing:  # refused before training, not after
        raise FeatcacheError(
            f"the validation split has no rows of class {', '.join(cache.classes[i] for i in missing)}, "
            "and a streamed svm is calibrated on validation rows; fit logreg, or raise --memory-budget "
            "to fit svm in memory"
        )
    count, total, squares = streamed_moments(batches(cache, "train", plan.batch_rows, rows=rows))
    scaling = Scaling.from_moments(scaling_kind, count, total, squares)
    # The relative C grid divides by the centred, scaled rows' mean squared norm, as in memory (SpanBasis):
    # the sum of the scaled features' variances. Standardised, that is 1 per varying feature and 0 per
    # constant one (dead ReLU units; counting them moved the grid); L2 rows are taken at their norm, 1
    # (centring them would take another pass over the cache).
    mean = total / max(count, 1)
    variance = np.maximum(squares / max(count, 1) - mean**2, 0)
    if scaling_kind == "standard":
        mean_square = float(np.sum(variance > 0))
    elif scaling_kind == "l2":
        mean_square = 1.0
    elif scaling_kind == "rms":
        mean_square = float(variance.sum()) / float(scaling.scale[0]) ** 2
    else:
        mean_square = float(variance.sum())
    cs = cs or [t / max(mean_square, 1e-12) for t in GRID]
    weights = class_weight_of(labels, n_classes, options.class_weight)
    candidates = [
        _Candidate(c, SGDClassifier(loss=loss, alpha=1 / (c * n_train), class_weight=weights,
                                    shuffle=False, random_state=options.seed))  # the stream shuffles
        for c in sorted(cs)
    ]
    active, epoch = list(candidates), 0
    while active and epoch < options.epochs:
        epoch += 1
        rng = np.random.default_rng([options.seed, epoch])
        for x, y in batches(cache, "train", plan.batch_rows, plan.buffer_rows, rng, rows):
            x = scaling.apply(x)
            for candidate in active:
                candidate.model.partial_fit(x, y, classes=classes)
        for candidate, accuracy in zip(active, _accuracies(cache, scaling, active, plan), strict=True):
            if accuracy > candidate.accuracy:
                candidate.accuracy, candidate.epoch = accuracy, epoch
                candidate.best = copy.deepcopy(candidate.model)
        say(f"{name} epoch {epoch}/{options.epochs} (streamed SGD): val accuracy "
            + ", ".join(f"C={c.c:.3g} {c.accuracy:.1%}" for c in active))
        active = [c for c in active if not options.patience or epoch - c.epoch < options.patience]
    chosen = max(candidates, key=lambda candidate: candidate.accuracy)  # first of equals: smaller C
    details = {"chosen": {"C": chosen.c, "alpha": 1 / (chosen.c * n_train), "epoch": chosen.epoch},
               "validation_accuracy": {f"{scaling_kind} C={c.c:.3g}": c.accuracy for c in candidates},
               "solver": f"SGDClassifier({loss})",
               "memory": {"path": "streamed", "estimator": f"SGDClassifier({loss})", "epochs": epoch}}
    model = chosen.best
    if loss == "hinge":
        model, details["memory"]["calibration_rows"] = _calibrated(cache, scaling, model, plan, options)
    return scaling, model, details


def _accuracies(cache: Cache, scaling: Scaling, candidates: list[_Candidate], plan: StreamPlan) -> list[float]:
    """Validation accuracy of every candidate, in one streamed pass."""
    correct, rows = np.zeros(len(candidates)), 0
    for x, y in batches(cache, "validation", plan.batch_rows):
        x = scaling.apply(x)
        correct += [np.sum(candidate.model.predict(x) == y) for candidate in candidates]
        rows += len(y)
    return list(correct / max(rows, 1))


def _calibrated(cache: Cache, scaling: Scaling, svm, plan: StreamPlan, options):
    """Platt's sigmoid on the SVM's scores for validation rows, weighted by class as the SVM was: all
    of them, or a random sample that half the budget holds (scaled float32, with scikit-learn's copy
    of it), with at least one row of every class. One fold of all the rows: the SVM is frozen, so no
    rows are held out from it, and no class needs as many rows as cross-validation folds."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    y_val = split_labels(cache, "validation")
    rng = np.random.default_rng(options.seed)
    order = rng.permutation(len(y_val))
    keep = np.zeros(len(y_val), bool)
    keep[order[: plan.budget // 2 // (2 * RowSize.of(cache).float32)]] = True
    keep[order[np.unique(y_val[order], return_index=True)[1]]] = True  # a first row of every class
    rows = int(keep.sum())
    sample, labels = np.empty((rows, RowSize.of(cache).features), np.float32), np.empty(rows, np.int32)
    start = taken = 0
    for x, y in batches(cache, "validation", plan.batch_rows):
        mask = keep[start : start + len(y)]
        start, k = start + len(y), int(mask.sum())
        if k:
            sample[taken : taken + k] = scaling.apply(x[mask])
            labels[taken : taken + k] = y[mask]
            taken += k
    every_row = [(np.arange(rows), np.arange(rows))]
    calibrated = CalibratedClassifierCV(FrozenEstimator(svm), method="sigmoid", cv=every_row)
    weights = sample_weights(labels, len(cache.classes), options.class_weight)  # as the SVM was weighted
    with warnings.catch_warnings():
        # scikit-learn warns that the frozen SVM ignores sample_weight: it is already fitted, and the
        # weights are meant for the sigmoid alone
        warnings.filterwarnings("ignore", message=".*sample_weight.*", category=UserWarning)
        return calibrated.fit(sample, labels, sample_weight=weights), rows
