"""The public Python API: what a script or notebook calls, and what the CLI's commands are built on.

    import featcache                                    # starts no TensorFlow
    cache = featcache.extract("data/elpv", backbone="vgg16", weights="imagenet")
    cache = featcache.extract(images=x, labels=y)       # uint8 arrays (N, H, W[, 3]) as a dataset
    X, y, paths = cache.to_numpy("train")               # also to_pandas, to_tf_dataset
    head = featcache.fit_head(cache, "logreg")
    rows = featcache.compare(cache)                     # the rows of `featcache compare --format json`
    featcache.predict(["new.png"], cache=cache, head="logreg")
    featcache.export("model.keras", cache=cache, head="logreg")

Every function takes the options of its command as keywords (checked once, here: an unknown name
or a value of the wrong type is one line naming the valid ones) and raises ``FeatcacheError``
with one line. Paths may be ``str`` or ``Path``. ``workdir`` None is the CLI's default:
``$FEATCACHE_HOME``, else ``./featcache-out``. A ``cache`` is a ``Cache``, a key (or a prefix of
one), a cache folder, or None for the workdir's current cache (the last extracted). Progress and
notes go to stderr unless ``show_progress=False``.
"""

from __future__ import annotations

import math
import sys
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from featcache import FeatcacheError, quiet
from featcache import cache as cache_store
from featcache.cache import Cache
from featcache.dataset import DEFAULT_FRACTIONS
from featcache.files import READ_ONLY

quiet.quiet_tensorflow()  # before any TensorFlow import; FEATCACHE_VERBOSE=1 shows TensorFlow's log

__all__ = ["ExtractOptions", "compare", "export", "extract", "fit_head", "open_cache", "predict",
           "run_extraction"]


@dataclass(frozen=True)
class ExtractOptions:
    """Every option of extract besides the data, the backbone and the workdir, with its default; the
    CLI's ``extract`` reads its defaults from here. Checked for type when built; values are checked
    by ``extract.check_options`` and ``make_config`` before any work."""

    layer: str | None = None  # cut the base at this named layer (None: the backbone's default)
    pooling: str | None = None  # none, avg or max (None: the backbone's default)
    image_size: int | None = None  # square input size in px (None: the backbone's)
    resize: str = "squash"  # squash like Keras, or crop the centred square first
    batch_size: int = 32
    dtype: str = "float16"  # storage type of the features
    preprocess: str = "backbone"  # the backbone's preprocess_input, or the tutorials' 1/255
    weights: str = "imagenet"  # imagenet, none (random init, fixed seed) or a weights file
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS  # for data without splits
    task: str = "classification"  # classification, ordinal, multilabel or regression (targets.TASKS)
    class_order: tuple[str, ...] | None = None  # ordered classes, first to last (default: natural order)
    label_column: str = "label"  # a CSV's label column (a regression target: a column of numbers)
    shard_size: int = 1024  # rows per HDF5 shard, the unit of resume
    xla: bool = False
    precision: str = "auto"  # auto (measured once per machine), float32, mixed_bfloat16, mixed_float16
    lock_timeout: float = 0.0  # seconds to wait for another run writing the same cache
    augment: int = 0  # augmented views per training image
    seed: int = 0  # seed of the augmented views
    average_views: str = "none"  # none, flips or d4
    also_layer: str | None = None  # also store this earlier layer's unpooled output
    show_progress: bool = True

    def __post_init__(self):
        given = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in checked("extract", type(self), given).items():
            object.__setattr__(self, name, value)
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise FeatcacheError(f"extract: {name}={getattr(self, name)}: give 1 or more")
        if not 0 <= self.lock_timeout < math.inf:  # nan compares false: it would wait forever
            raise FeatcacheError(f"extract: lock_timeout={self.lock_timeout}: give 0 or more seconds")
        _ = self.target  # checks task and class_order

    @property
    def target(self):
        from featcache.targets import Target

        return Target(self.task, self.class_order)

    @classmethod
    def of(cls, owner: str, options: dict) -> ExtractOptions:
        """Options given by name; an unknown name is one line listing the valid ones."""
        checked(owner, cls, options, types=False)
        return cls(**options)


def checked(owner: str, cls, values: dict, types: bool = True) -> dict:
    """``values`` for the fields of dataclass ``cls``, numpy scalars made Python numbers, lists tuples and
    paths strings; one line naming the valid options for an unknown name, or the type expected."""
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise FeatcacheError(f"{owner}: unknown option {', '.join(unknown)}; "
                             f"valid options: {', '.join(valid)}")
    if not types:
        return values
    plain = {}
    for name, value in values.items():
        value = _plain(value, hints[name])
        if not _matches(value, hints[name]):
            raise FeatcacheError(f"{owner}: {name}={value!r} is not {_describe(hints[name])}")
        plain[name] = value
    return plain


def _plain(value, hint):
    if hasattr(value, "item") and hasattr(value, "dtype") and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy scalars
    if isinstance(value, list):
        value = tuple(v.item() if hasattr(v, "item") else v for v in value)
    if isinstance(value, Path) and _matches("", hint):
        value = str(value)
    return value


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if origin is tuple:
        return (isinstance(value, tuple) and len(value) == len(args)
                and all(_matches(v, a) for v, a in zip(value, args, strict=True)))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is tuple:
        return f"a tuple of {len(args)} numbers"
    return "None" if hint is type(None) else hint.__name__


# ---------------------------------------------------------------- extract


def extract(data: str | Path | None = None, *, images=None, labels=None, splits=None, classes=None,
            backbone: str = "vgg16", workdir: str | Path | None = None, **options) -> Cache:
    """The cache of a dataset's features: complete on disk after this call, computing only what no
    cache in ``workdir`` holds yet, and made the workdir's current cache.

    ``data`` is a dataset folder (split or class folders), a CSV (path,label[,split]) or an .npz
    (images, labels, optional splits and classes). Instead, ``images`` (uint8, (N, H, W) or
    (N, H, W, 3)) with ``labels`` (class indices named by ``classes``, or class names) and optional
    ``splits`` (train/validation/test per image) are a dataset too, written once as PNG files under
    ``WORKDIR/arrays`` (arrays.py) and keyed by content like any files. ``options`` are those of
    ``ExtractOptions`` (the CLI's extract options: layer, pooling, image_size, weights, ...).
    """
    extract_options = ExtractOptions.of("extract", options)
    source = _data_source(data, images, labels, splits, classes)
    say = _say(extract_options.show_progress)
    result = run_extraction(source, backbone=_text("backbone", backbone), workdir=_workdir(workdir),
                            options=extract_options, say=say, warn=lambda warning: say(f"warning: {warning}"))
    say(f"{result.computed} rows through the backbone, {result.reused} reused, {result.shards_kept} shards "
        f"kept; features {result.cache.feature_shape}; cache {result.cache.path}")
    return result.cache


def run_extraction(data, *, backbone: str, workdir: Path, options: ExtractOptions, engine=None,
                   say=lambda message: None, warn=lambda warning: None):
    """Extract ``data`` (a path, or ``arrays.ArrayData``) into ``workdir`` and make its cache current;
    the ``ExtractResult``. What ``extract`` and the CLI's extract command both run.

    Cheap checks come first, then the dataset is scanned (``warn`` receives its warnings), then the
    weights are resolved and the backbone runs; ``say`` receives notes (weights fetched, the model).
    """
    from featcache.extract import check_options, choose_precision, make_config
    from featcache.extract import extract as extract_dataset

    o = options
    check_options(backbone, o.pooling, o.image_size, o.resize, o.preprocess, o.dtype, o.precision, o.augment,
                  o.seed, o.average_views, o.also_layer)
    dataset = load_data(data, o.split_fractions, workdir, o.target, o.label_column)  # bad data fails here
    choice = choose_precision(backbone, o.layer, o.pooling, o.image_size, o.precision)
    say(choice.line())  # the run's first line
    for warning in dataset.warnings:
        warn(warning)
    config, resolved = make_config(backbone, o.weights, o.layer, o.pooling, o.image_size, o.resize,
                                   o.preprocess, o.dtype, choice.precision, o.augment, o.seed, o.average_views,
                                   o.also_layer, say=say)
    averaging = "" if o.average_views == "none" else f", features averaged over {o.average_views} views"
    also = f", also storing {o.also_layer}" if o.also_layer else ""
    say(f"{backbone} at {config.image_size} px{averaging}{also}, weights: {resolved.source}")
    result = extract_dataset(dataset, config, resolved, workdir, batch_size=o.batch_size,
                             shard_size=o.shard_size, xla=o.xla, lock_timeout=o.lock_timeout,
                             show_progress=o.show_progress, engine=engine, precision_choice=choice)
    for warning in result.warnings[len(dataset.warnings):]:  # found while extracting (a damaged source)
        warn(warning)
    try:
        cache_store.set_current(workdir, result.cache.key)
    except OSError as exc:  # a read-only workdir still serves a complete cache
        if exc.errno not in READ_ONLY:
            raise
        warn(f"{workdir} is not writable ({exc.strerror}): cache {result.cache.key[:16]} is complete but not "
             f"the default of later commands; pass them --cache {result.cache.key[:16]}")
    return result


def load_data(data, fractions: tuple[float, float, float], workdir: Path, target=None, label_column: str = "label"):
    """The ``Dataset`` of a folder or CSV, or of arrays (``ArrayData`` or an .npz path) written as
    image files under ``workdir``; labels read as ``target`` (a ``targets.Target``) says."""
    from featcache import arrays
    from featcache.dataset import load_dataset
    from featcache.targets import Target

    target = target or Target()
    if isinstance(data, arrays.ArrayData):
        return arrays.materialise(data, workdir, fractions, target)
    if Path(data).suffix.lower() == ".npz" and Path(data).is_file():
        return arrays.materialise(arrays.ArrayData.from_npz(data), workdir, fractions, target)
    return load_dataset(data, fractions, target=target, label_column=label_column)


def _data_source(data, images, labels, splits, classes):
    from featcache import arrays

    if images is not None:
        if data is not None:
            raise FeatcacheError("extract: give data (a path) or images= (arrays), not both")
        if labels is None:
            raise FeatcacheError("extract: images= needs labels= (a class index or name per image)")
        return arrays.ArrayData.of(images, labels, splits, classes)
    if any(value is not None for value in (labels, splits, classes)):
        raise FeatcacheError("extract: labels=, splits= and classes= go with images=; with data, the "
                             "labels come from its folders or CSV")
    if data is None:
        raise FeatcacheError("extract: give data (a dataset folder, CSV or .npz) or images= and labels=")
    if not isinstance(data, str | Path):
        hint = "; pass arrays as images= and labels=" if hasattr(data, "shape") else ""
        raise FeatcacheError(f"extract: data must be a path (str or Path), not {type(data).__name__}{hint}")
    return Path(data)


# ---------------------------------------------------------------- caches


def open_cache(workdir: str | Path | None = None, key: str | None = None) -> Cache:
    """A complete cache of ``workdir``: the one ``key`` (or a prefix of it) names, else the current one
    (the last extracted), else the newest."""
    if key is not None:
        _text("key", key)
    return cache_store.open_cache(_workdir(workdir), key)


def resolve_cache(cache, workdir, head=None) -> Cache:
    """A Cache from what a user gave: a Cache, a key, a cache folder, or None (with a head name: the
    current cache when it has the head, else the newest that has; a Head: the cache it was fitted on)."""
    if isinstance(cache, Cache):
        return cache
    workdir = _workdir(workdir)
    if cache is None:
        from featcache.finetune import cache_with_head
        from featcache.heads import Head

        if isinstance(head, Head):
            return cache_store.open_cache(workdir, str(head.record.get("cache_key")))
        return cache_with_head(workdir, head) if isinstance(head, str) else cache_store.open_cache(workdir)
    if isinstance(cache, Path) or (isinstance(cache, str) and Path(cache).is_dir()):
        return Cache(Path(cache))
    if isinstance(cache, str):
        return cache_store.open_cache(workdir, cache)
    raise FeatcacheError(f"cache={_short(cache)}: give a Cache, a cache key (or prefix), a cache folder, or "
                         "None for the current cache")


def resolve_head(cache: Cache, head):
    """The Head to use: given, or by name (None: the best by validation accuracy), checked against cache."""
    from featcache.heads import Head
    from featcache.predict import open_head

    if head is None or isinstance(head, str):
        return open_head(cache, head)
    if isinstance(head, Head):
        head.check_cache(cache)
        return head
    raise FeatcacheError(f"head={_short(head)}: give a head name (`featcache heads`), a Head from fit_head, "
                         "or None for the best fitted")


# ---------------------------------------------------------------- heads


def fit_head(cache: Cache | str | Path | None, name: str, *, workdir: str | Path | None = None,
             refit: bool = False, memory_budget: int | str | None = None, show_progress: bool = True,
             **options):
    """A head fitted on the cache's train split, chosen and stopped on validation, evaluated and saved
    beside the cache; the saved one when already fitted with the same options (unless ``refit``).

    ``options`` are the fields of ``heads.FitOptions`` (epochs, batch_size, learning_rate, optimizer,
    seed, class_weight, patience, scaling). ``memory_budget`` bounds the feature bytes held at once:
    bytes, a size such as "2G", "none" for no limit, or None for half the memory available (as the CLI).
    """
    from featcache.heads import FitOptions, fit_and_save, get_spec

    get_spec(_text("name", name))
    fit_options = FitOptions(**checked("fit_head", FitOptions, options))
    cache = resolve_cache(cache, workdir)
    say = _say(show_progress)
    head, kept = fit_and_save(cache, name, fit_options, refit=_flag("refit", refit), say=say,
                              memory_budget=_memory_budget(memory_budget))
    if kept:
        say(f"{name}: already fitted on cache {cache.key[:16]} with these options; kept (refit=True to train "
            "again)")
    return head


def compare(cache: Cache | str | Path | None = None, *, cv: int | None = None,
            memory_budget: int | str | None = None, workdir: str | Path | None = None,
            plots: str | Path | None = None, report: str | Path | None = None,
            select_by: str | None = None) -> list[dict]:
    """Every head fitted on the cache, as the rows of ``featcache compare --format json``: validation and
    test accuracy, balanced accuracy, macro F1, log loss, times, ``cv`` fold accuracy, per-class
    precision, recall, F1 and support on test, ``best`` on one row (by ``select_by`` on validation, one of
    ``featcache.report.SELECT_BY`` that fits the target; None: accuracy for classes, macro-f1 for sets
    of classes, rmse for numbers, as the command). With ``plots`` (a folder) or ``report`` (an .html
    path), also the PNG plots and the HTML report."""
    import json

    from featcache import report as tables
    from featcache.compare import compare as compare_heads
    from featcache.compare import write_outputs

    if cv is not None and (isinstance(cv, bool) or not isinstance(cv, int) or cv < 2):
        raise FeatcacheError(f"compare: cv={cv!r}: give a number of folds, 2 or more, or None")
    cache = resolve_cache(cache, workdir)
    select_by = None if select_by is None else _text("select_by", select_by)
    comparison = compare_heads(cache, cv, _memory_budget(memory_budget), select_by)
    if plots is not None or report is not None:
        write_outputs(comparison, cache, Path(plots) if plots is not None else None,
                      Path(report) if report is not None else None, cv)
    return json.loads(tables.format_table(comparison.rows, "json"))


def predict(paths, *, workdir: str | Path | None = None, cache: Cache | str | Path | None = None, head=None,
            batch_size: int = 32, show_progress: bool = True, precision: str = "auto") -> list[dict]:
    """Class probabilities for image files (or the images under folders), as ``predict --format json``:
    one dict per usable image with path, class, probability and every class's probabilities. Files
    that cannot be used are reported on stderr and skipped.

    ``head`` is a name, a Head from ``fit_head``, or None for the best fitted on the cache.
    ``precision`` of the feature model: auto is the cache's own where this machine runs it natively.
    """
    from featcache.predict import Predictor, image_files

    files = image_files(_paths(paths))
    cache = resolve_cache(cache, workdir, head)
    chosen = resolve_head(cache, head)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise FeatcacheError(f"predict: batch_size={batch_size!r}: give 1 or more")
    predictions = Predictor(cache, chosen, _text("precision", precision)).predict(
        files, batch_size, show_progress=show_progress)
    for path, reason in predictions.rejects:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not predictions.paths:
        raise FeatcacheError(f"none of the {len(files)} files could be used (reasons on stderr)")
    return predictions.rows()


def export(output: str | Path | None = None, *, workdir: str | Path | None = None,
           cache: Cache | str | Path | None = None, head=None, saved_model: bool = False,
           tflite: bool = False, precision: str = "float32") -> list[Path]:
    """Write backbone + head as one Keras model from pixels to class probabilities (``output``, a
    .keras file; None: ``WORKDIR/exports/BACKBONE_HEAD.keras``), and a SavedModel folder and/or a
    .tflite file beside it; the paths written. ``precision``: what the model computes in, float32
    unless asked, so it runs anywhere."""
    from featcache.model import export as export_model

    cache = resolve_cache(cache, workdir, head)
    chosen = resolve_head(cache, head)
    if output is None:
        output = _workdir(workdir) / "exports" / f"{cache.config['backbone']}_{chosen.name}.keras"
    output = Path(_text("output", output))
    return export_model(cache, chosen, output, saved_model=_flag("saved_model", saved_model),
                        tflite=_flag("tflite", tflite), compute=_text("precision", precision))


# ---------------------------------------------------------------- arguments


def _workdir(workdir) -> Path:
    folder = cache_store.default_workdir() if workdir is None else Path(_text("workdir", workdir))
    if folder.exists() and not folder.is_dir():
        raise FeatcacheError(f"workdir {folder} is a file, not a folder; give a folder for the caches")
    return folder


def _text(name: str, value) -> str:
    """A str or Path argument as a string; anything else is one line."""
    if isinstance(value, str | Path) and str(value):
        return str(value)
    raise FeatcacheError(f"{name}={_short(value)}: give a non-empty str (or Path)")


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise FeatcacheError(f"{name}={_short(value)}: give True or False")
    return value


def _paths(paths) -> list[Path]:
    if isinstance(paths, str | Path):
        return [Path(paths)]
    if isinstance(paths, list | tuple) and paths and all(isinstance(p, str | Path) for p in paths):
        return [Path(p) for p in paths]
    raise FeatcacheError(f"paths={_short(paths)}: give an image file or folder, or a non-empty list of them "
                         "(str or Path)")


def _memory_budget(budget) -> int | None:
    from featcache import streaming

    if budget is None:
        return streaming.default_budget()
    if isinstance(budget, str):
        return streaming.parse_size(budget)
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        return budget
    raise FeatcacheError(f"memory_budget={_short(budget)}: give bytes (an int above 0), a size such as "
                         "'512M' or '2G', 'none' for no limit, or None for half the memory available")


def _say(enabled: bool):
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return say if _flag("show_progress", enabled) else (lambda message: None)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
