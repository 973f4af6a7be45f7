"""Heads: small classifiers fitted on cached features, all behind one protocol (``protocol.py``).

The registry maps a head's name to what builds it; nothing outside this package asks what kind a
head is. ``fit_head`` builds one, fits it in memory when the cache's training and validation rows
fit the memory budget and from streamed shards otherwise, and records its provenance (cache key,
classes, options, seed, fit time, memory path). A saved head lives in ``CACHE/heads/NAME/``:
``head.json`` beside its data (``model.npz`` arrays or ``model.keras``), each file's sha256 in the
record; loading dispatches on the record's ``kind`` and runs no stored code.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from featcache import FeatcacheError, streaming
from featcache.heads.keras_heads import KerasHead
from featcache.heads.kernel import RbfSvmHead
from featcache.heads.linear import LinearHead
from featcache.heads.protocol import (
    FIT_RECIPE,
    OPTIMIZERS,
    SCALINGS,
    FitOptions,
    Head,
    check_files,
    read_record,
)
from featcache.heads.ridge import RidgeHead
from featcache.heads.svr import SvrHead

__all__ = ["FIT_RECIPE", "HEADS", "OPTIMIZERS", "SCALINGS", "FitOptions", "Head", "build_head", "check_task",
           "fit_head", "get_spec", "head_dir", "head_info", "heads_for", "load_head", "memory_plan", "saved_heads"]


CLASSES_TASKS = ("classification", "ordinal")
EVERY_TASK = (*CLASSES_TASKS, "multilabel", "regression")


@dataclass(frozen=True)
class HeadSpec:
    """A registry row: the name, what it is, what builds an unfitted head from options, and the targets
    (targets.TASKS) it learns."""

    name: str
    description: str
    build: Callable[[str, FitOptions], Head]
    tasks: tuple[str, ...] = CLASSES_TASKS


HEADS = {
    spec.name: spec
    for spec in (
        HeadSpec("dense256", "standardise, Flatten, Dense 256 relu, Dropout 0.5, sigmoid/softmax (Chollet); "
                 "a sigmoid per class for multi-label, a linear output for numbers", KerasHead, EVERY_TASK),
        HeadSpec("dense1024", "standardise, Flatten, Dense 1024 relu, Dropout 0.2, sigmoid/softmax; a sigmoid "
                 "per class for multi-label, a linear output for numbers", KerasHead, EVERY_TASK),
        HeadSpec("linear", "global average pooling (on a map), standardise, one Dense (TF MobileNetV2 "
                 "tutorial)", KerasHead, EVERY_TASK),
        HeadSpec("logreg", "logistic regression; scaling and C chosen on validation",
                 lambda name, options: LinearHead(name, options, loss="log_loss")),
        HeadSpec("svm", "linear SVM, Platt-calibrated; scaling and C chosen on validation",
                 lambda name, options: LinearHead(name, options, loss="hinge")),
        HeadSpec("svm-rbf", "RBF SVM, Platt-calibrated; scaling, gamma and C chosen on validation",
                 RbfSvmHead),
        HeadSpec("ridge", "ridge regression (numbers, or the rank of ordered classes, soft-rounded back); "
                 "scaling and alpha chosen on validation", RidgeHead, ("ordinal", "regression")),
        HeadSpec("svr", "support vector regression, RBF kernel (numbers); scaling, gamma and C chosen on "
                 "validation", SvrHead, ("regression",)),
    )
}
DEFAULT_OPTIONS = FitOptions()
KINDS = {cls.kind: cls for cls in (KerasHead, LinearHead, RbfSvmHead, RidgeHead, SvrHead)}


def heads_for(task: str) -> list[str]:
    """The registered heads that learn a ``task`` target."""
    return [name for name, spec in HEADS.items() if task in spec.tasks]


def check_task(name: str, task: str) -> None:
    """Refuse, in one line, a head that does not learn this cache's kind of target."""
    if task not in get_spec(name).tasks:
        raise FeatcacheError(f"head {name} does not learn a {task} target; heads for {task}: "
                             f"{', '.join(heads_for(task))}")


def get_spec(name: str) -> HeadSpec:
    if name not in HEADS:
        raise FeatcacheError(f"unknown head {name!r}: choose one of {', '.join(HEADS)} (`featcache heads`)")
    return HEADS[name]


def build_head(name: str, options: FitOptions = DEFAULT_OPTIONS) -> Head:
    """An unfitted head from the registry."""
    return get_spec(name).build(name, options)


def memory_plan(cache, name: str, options: FitOptions, budget: int | None):
    """("in-memory" or "streamed", its StreamPlan) for head ``name`` under ``budget`` bytes (None: no
    limit); refuses what cannot fit, before any work."""
    head = build_head(name, options)
    needed = streaming.in_memory_bytes(cache)
    if budget is None or needed <= budget:
        return "in-memory", streaming.in_memory_plan(cache, budget)
    if not head.streams:
        *others, last = [other for other in heads_for(cache.task) if build_head(other).streams]
        raise FeatcacheError(
            f"{name} cannot stream (it needs every training row in memory at once: about "
            f"{streaming.format_size(needed)} for this cache, over --memory-budget "
            f"{streaming.format_size(budget)}); raise --memory-budget, or fit {', '.join(others)} or {last}, "
            "which stream"
        )
    return "streamed", head.stream_plan(cache, budget)


def fit_head(cache, name: str, options: FitOptions = DEFAULT_OPTIONS, say=lambda message: None,
             memory_budget: int | None = None) -> Head:
    """Fit head ``name`` on the cache's train split, choosing and stopping on validation.

    ``say`` receives progress lines (per epoch, or per scaling tried). ``memory_budget`` bounds the
    bytes of feature data held at once (None: no limit): within it the head fits in memory,
    over it from streamed shards.
    """
    from featcache.evaluate import decision_threshold

    check_task(name, cache.task)
    if "validation" not in cache.splits:
        raise FeatcacheError(f"cache {cache.key[:16]} has no validation split; heads choose and stop on it")
    if not cache.target.has_classes and (options.class_weight or options.threshold is not None):
        raise FeatcacheError(f"--class-weight and --threshold act on classes; cache {cache.key[:16]} has a "
                             "regression target (numbers): leave them out")
    if cache.task == "multilabel" and (options.class_weight or isinstance(options.threshold, str)):
        raise FeatcacheError(f"cache {cache.key[:16]} has a multi-label target: each class is decided by its own "
                             "threshold, chosen for F1 on validation; leave out --class-weight and "
                             "--threshold balanced-accuracy (a number pins every class's threshold)")
    if cache.target.has_classes and len(cache.classes) < 2:
        raise FeatcacheError(f"cache {cache.key[:16]} has one class ({', '.join(cache.classes)}); no head can learn "
                             "from one class: extract a dataset with images of two classes or more (one class "
                             "of sets, yes or no, is --task classification with two labels)")
    path, plan = memory_plan(cache, name, options, memory_budget)
    head = build_head(name, options)
    started = time.perf_counter()
    if path == "in-memory":
        x, y, _ = cache.read("train")
        x_val, y_val, _ = cache.read("validation")
        head.fit(x, y, n_classes=len(cache.classes), validation=(x_val, y_val), say=say)
    else:
        head.fit_streamed(cache, plan, say=say)
    memory = {"path": path, **plan.record(), **head.record.pop("memory", {}),
              "in_memory_bytes": streaming.in_memory_bytes(cache)}
    head.record.update(
        name=name, kind=head.kind, cache_key=cache.key, classes=cache.classes,
        feature_shape=list(cache.feature_shape), task=cache.task, options=options.to_json(), fit_recipe=FIT_RECIPE,
        seed=options.seed, fit_seconds=round(time.perf_counter() - started, 3),
        fitted=time.strftime("%Y-%m-%dT%H:%M:%S%z"), memory=memory,
    )
    if threshold := decision_threshold(head, cache, options.threshold):
        head.record["threshold"] = threshold
    return head


def head_dir(cache, name: str) -> Path:
    return cache.path / "heads" / name


def saved_heads(cache) -> list[str]:
    folder = cache.path / "heads"
    if not folder.is_dir():
        return []
    saved = (p for p in folder.iterdir() if not p.name.startswith("."))  # skip half-written temporaries
    return sorted(p.name for p in saved if (p / "head.json").is_file())


def head_info(folder: Path) -> dict:
    """A saved head's record (``head.json``): provenance and metrics, without loading the model."""
    return read_record(folder)


def load_head(folder: Path) -> Head:
    """Load a saved head: its record, then its data files, checked against their recorded sha256.
    Nothing in them can run code (arrays without pickle, Keras in safe mode)."""
    folder = Path(folder)
    record = read_record(folder)
    check_files(folder, record)
    cls = KINDS.get(record.get("kind"))
    if cls is None:
        raise FeatcacheError(f"{folder}: unknown head kind {record.get('kind')!r}; fit it again with "
                             f"`featcache fit-head --head {record.get('name', folder.name)} --refit`")
    options = FitOptions.from_json(record.get("options", {}))
    head = cls.restore(record.get("name", folder.name), options, record)
    head.record = record
    try:
        head._read(folder)
    except (ValueError, KeyError, OSError) as exc:  # e.g. an object array, which np.load refuses to unpickle
        raise FeatcacheError(
            f"{folder}: the head's files cannot be read as data ({exc}); fit it again with "
            f"`featcache fit-head --head {head.name} --refit`"
        ) from None
    return head


def keras_head_of(name: str, model, options: FitOptions, record: dict) -> Head:
    """A fitted Keras model (a fine-tuned top and head) as a head of this package."""
    head = KerasHead(name, options, model=model)
    head.record = record
    return head


def fitted_with(cache, name: str, options: FitOptions) -> dict | None:
    """The record of head ``name`` when it is already fitted on this cache with these options by
    this recipe (so fitting again would learn the same), else None."""
    folder = head_dir(cache, name)
    try:
        record = read_record(folder)
    except FeatcacheError:  # none, or one an older featcache saved: fit it
        return None
    same = record.get("options") == options.to_json() and record.get("fit_recipe") == FIT_RECIPE
    return record if same and record.get("metrics") else None


def fit_and_save(cache, name: str, options: FitOptions = DEFAULT_OPTIONS, *, refit: bool = False,
                 say=lambda message: None, memory_budget: int | None = None) -> tuple[Head, bool]:
    """(head, kept): the saved head when already fitted with these options (unless ``refit``), else
    a head fitted, evaluated on validation and test, and saved beside the cache."""
    from featcache.evaluate import evaluate

    if not refit and fitted_with(cache, name, options):
        return load_head(head_dir(cache, name)), True
    head = fit_head(cache, name, options, say=say, memory_budget=memory_budget)
    head.record["metrics"] = evaluate(head, cache, batch_size=head.record["memory"]["batch_rows"])
    head.save(head_dir(cache, name))
    return head, False
