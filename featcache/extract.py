"""The extract stage: run the frozen conv base once per image and fill the shard store.

Decoding runs in parallel in a tf.data pipeline with prefetch, so the backbone never waits for
images. Shards already on disk are kept, rows shared with other caches of the same config are
copied, and only the rest goes through the backbone. With ``augment`` K > 0 every training image
also goes through the backbone as K augmented views (augment.py), each a row of its own;
validation and test are never augmented.

This module is the driver: it plans the shards, holds the cache lock and writes the manifest. An
engine writes the missing shards, each through ``write_shards``: ``LocalEngine`` in this process,
``ray_engine.RayEngine`` on Ray actors; both leave the same cache.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np

from featcache import FeatcacheError, __version__, augment, backbones, cache, views
from featcache import precision as precisions
from featcache.backbones import weights
from featcache.dataset import Dataset, Sample
from featcache.images import RESIZE_MODES, RejectedImage, load_image
from featcache.model import conv_base, extraction_model
from featcache.progress import ImageProgress

DTYPES = ("float16", "float32")


@dataclass
class ExtractResult:
    cache: cache.Cache
    computed: int  # rows that went through the backbone in this run
    reused: int  # rows copied from other caches of the same config
    shards_kept: int  # shards already complete on disk (resumed or unchanged)
    seconds: float
    rejects: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def make_config(
    backbone: str = "vgg16", weights_spec: str = "imagenet", layer: str | None = None,
    pooling: str | None = None, image_size: int | None = None, resize: str = "squash",
    preprocess: str = "backbone", dtype: str = "float16", precision: str = "auto",
    augment: int = 0, seed: int = 0, average_views: str = "none", also_layer: str | None = None,
    say=lambda message: None,
) -> tuple[cache.ExtractionConfig, weights.ResolvedWeights]:
    """Validate options, fill defaults from the backbone registry, and resolve the weights.

    ``precision="auto"`` is resolved here (``choose_precision``, its line to ``say``): the config
    holds the precision the backbone will run in, and with it the cache key.

    ``augment`` is the number of augmented views per training image, ``seed`` the seed they are
    drawn from; both are part of the cache key. ``average_views`` (views.py) averages each
    image's features over its turned and mirrored copies. ``also_layer`` stores a second,
    unpooled layer from the same pass (cache.py).
    """
    check_options(backbone, pooling, image_size, resize, preprocess, dtype, precision, augment, seed,
                  average_views, also_layer)
    spec = backbones.get(backbone)
    size = image_size or spec.input_size
    if precision == "auto":
        choice = choose_precision(backbone, layer, pooling, size, precision)
        say(choice.line())
        precision = choice.precision
    resolved = weights.resolve(backbone, weights_spec, say)
    config = cache.ExtractionConfig(
        backbone=backbone, weights=resolved.identity, layer=layer or spec.default_layer,
        pooling=pooling or spec.default_pooling, image_size=size, resize=resize,
        preprocess=preprocess, dtype=dtype, precision=precision, augment=augment, seed=seed,
        average_views=average_views, also_layer=also_layer,
    )
    if also_layer and config.also_row_key() == config.row_key():
        raise FeatcacheError(f"--also-layer {also_layer} is the cached layer itself, unpooled: leave it out")
    return config, resolved


def check_options(backbone: str, pooling: str | None, image_size: int | None, resize: str,
                  preprocess: str, dtype: str, precision: str, augment: int = 0, seed: int = 0,
                  average_views: str = "none", also_layer: str | None = None) -> None:
    """Cheap checks to run before scanning a dataset or fetching weights."""
    spec = backbones.get(backbone)
    _choice("--pooling", pooling or spec.default_pooling, backbones.POOLINGS)
    _choice("--average-views", average_views, tuple(views.VIEW_SETS))
    if average_views != "none" and (pooling or spec.default_pooling) == "none":
        raise FeatcacheError(
            f"--average-views {average_views} averages pooled features (a turned image turns its feature "
            "map too): add --pooling avg or --pooling max"
        )
    if average_views != "none" and also_layer:
        raise FeatcacheError(
            f"--also-layer {also_layer} stores a layer for fine-tuning, which cannot train through "
            f"--average-views {average_views}: extract them as two caches"
        )
    _choice("--resize", resize, RESIZE_MODES)
    _choice("--preprocess", preprocess, backbones.PREPROCESSINGS)
    _choice("--dtype", dtype, DTYPES)
    precisions.check("--precision", precision)
    size = spec.input_size if image_size is None else image_size  # 0 is a bad size, not the default
    if size < spec.min_size:
        raise FeatcacheError(f"--image-size {size} is below {backbone}'s minimum of {spec.min_size} px")
    if augment < 0:
        raise FeatcacheError(f"--augment {augment}: give the number of views per training image, 0 or more")
    if seed < 0:
        raise FeatcacheError(f"--seed {seed}: the augmentation seed must be 0 or more")


def choose_precision(backbone: str, layer: str | None = None, pooling: str | None = None,
                     image_size: int | None = None, requested: str = "auto") -> precisions.Choice:
    """The precision to run ``backbone`` (cut and pooled as given) in; ``auto`` times its forward pass
    in float32 and the machine's mixed candidate once (random weights time like real ones)."""
    spec = backbones.get(backbone)
    size = image_size or spec.input_size
    layer, pooling = layer or spec.default_layer, pooling or spec.default_pooling

    def timer(candidates: tuple[str, ...]) -> dict[str, float]:
        return precisions.timed_rates(lambda: backbones.build_extractor(spec, None, size, layer, pooling),
                                      (size, size, 3), candidates)

    network = f"{backbone} ({layer or 'last layer'}, {pooling} pooling, {size} px)"
    return precisions.resolve(requested, network, timer)


def _choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FeatcacheError(f"{option} {value!r}: choose one of {', '.join(choices)}")


def extract(
    dataset: Dataset, config: cache.ExtractionConfig, resolved: weights.ResolvedWeights,
    workdir: Path, batch_size: int = 32, shard_size: int = 1024, xla: bool = False,
    lock_timeout: float = 0.0, show_progress: bool = True, engine: Engine | None = None,
    precision_choice: precisions.Choice | None = None,
) -> ExtractResult:
    """Make sure the cache for (config, dataset) is complete on disk and return it.

    ``precision_choice``, how ``config.precision`` was chosen, goes into the manifest.

    ``engine`` writes the missing shards (default: this process, ``LocalEngine``); whatever it is,
    this driver plans the shards, holds the lock and writes the manifest, so every engine leaves
    the same cache.
    """
    started = time.monotonic()
    key = cache.cache_key(config, dataset)
    cache_dir = Path(workdir) / key[:16]
    if (cache.read_manifest(cache_dir) or {}).get("status") == "complete" and _shards_intact(cache_dir):
        kept = len(list(cache_dir.glob("*.h5")))
        return ExtractResult(cache.Cache(cache_dir), 0, 0, kept, time.monotonic() - started)
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        with cache.locked(cache_dir, lock_timeout):
            return _fill(dataset, config, resolved, cache_dir, key, batch_size, shard_size, xla,
                         show_progress, started, engine or LocalEngine(), precision_choice)
    except BaseException:
        if not any(cache_dir.glob("*.h5")) and not (cache_dir / cache.MANIFEST).exists():
            shutil.rmtree(cache_dir, ignore_errors=True)
        raise


def _shards_intact(cache_dir: Path) -> bool:
    manifest = cache.read_manifest(cache_dir)
    names = [n for split in manifest["splits"].values() for n in split["shards"]]
    return all(cache.shard_is_intact(cache_dir / n, manifest["key"], classes=manifest["classes"]) for n in names)


def _fill(dataset, config, resolved, cache_dir, key, batch_size, shard_size, xla, show_progress, started,
          engine, precision_choice=None):
    """Write every missing shard (the unit of resume) with ``engine``, then mark the cache complete."""
    cache.remove_temporaries(cache_dir)
    plans = cache.plan_shards(dataset, shard_size, config.augment, config.seed)
    todo = [p for p in plans if not cache.shard_is_intact(cache_dir / p.name, key, p)]
    row_keys = (config.row_key(), config.also_row_key()) if config.also_layer else (config.row_key(),)
    source = cache.RowSource(cache_dir.parent, row_keys, exclude=cache_dir)
    damaged = source.drop_damaged([s.sha256 for p in todo for s in p.samples])
    pending = pending_rows(todo, source)
    # built here even when an engine builds its own: a bad layer or weights file fails before any
    # work starts, and the manifest records the output layer and shape
    model = extraction_model(config, resolved.keras_arg) if pending else None
    if model is not None:
        check_batch_memory(model, batch_size, config.image_size)
    manifest = _manifest(cache_dir, dataset, config, resolved, key, shard_size, plans, model)
    manifest["engine"] = engine.name
    manifest["warnings"] += [f"row reuse skipped {shard} (damaged: its checksums fail); its rows were computed "
                             f"again, and that cache needs extracting again" for shard in damaged]
    choice = precision_choice or precisions.Choice(config.precision, "given in the config", config.precision)
    manifest["precision"] = choice.to_json()
    cache.write_manifest(cache_dir, manifest)

    provenance = {"key": key, "row_key": config.row_key(), "also_row_key": config.also_row_key(),
                  "config": asdict(config), "classes": list(dataset.classes), "task": dataset.task}
    job = ShardJob(cache_dir, config, resolved.keras_arg, provenance, batch_size, xla)
    computed = engine(job, todo, source, model, show_progress)
    return _finish(cache_dir, manifest, dataset, plans, computed,
                   sum(len(p.samples) for p in todo) - len(pending), len(plans) - len(todo), started)


def activation_bytes(model) -> int:
    """Bytes one image's forward pass holds at its peak, in float32: the largest layer input plus output
    (inference frees the rest), over the layers of the conv base and of the model around it."""
    import keras

    peak = 0
    for layer in [*model.layers, *conv_base(model).layers]:
        if isinstance(layer, keras.Model):
            continue
        inputs = layer.input if isinstance(layer.input, list | tuple) else [layer.input]
        outputs = layer.output if isinstance(layer.output, list | tuple) else [layer.output]
        size = sum(int(np.prod(t.shape[1:])) for t in [*inputs, *outputs])
        peak = max(peak, 4 * size)
    return peak


def check_batch_memory(model, batch_size: int, image_size: int) -> None:
    """Refuse, in one line, a batch whose activations exceed the memory available (TensorFlow would be
    killed or crash without a message, e.g. VGG16 at --image-size 2000: 2 GB per image)."""
    from featcache.streaming import available_memory, format_size

    available = available_memory()
    per_image = activation_bytes(model)
    if available is None or per_image * batch_size <= available:
        return
    fits = available // per_image
    fix = f"use --batch-size {fits} or less" if fits else "lower --image-size"
    raise FeatcacheError(
        f"--image-size {image_size} with --batch-size {batch_size} needs about {format_size(per_image * batch_size)} "
        f"of activations ({format_size(per_image)} per image), over the {format_size(available)} available: {fix}"
    )


@dataclass(frozen=True)
class ShardJob:
    """What writing any shard of one cache needs; small and picklable, so a Ray actor can receive it."""

    cache_dir: Path
    config: cache.ExtractionConfig
    weights_arg: str | None  # ResolvedWeights.keras_arg: None (random init) or a weights file
    provenance: dict  # key, row_key, config and classes: the attrs every shard carries
    batch_size: int
    xla: bool = False


class Engine(Protocol):
    """Writes the missing shards of a job (``write_shards`` for each) and returns the rows computed.

    ``model`` is the feature model the driver built, None when no row needs the backbone.
    """

    name: str  # recorded in the manifest

    def __call__(self, job: ShardJob, todo: list[cache.ShardPlan], source: cache.RowSource, model,
                 show_progress: bool) -> int: ...


class LocalEngine:
    """Write the missing shards in this process: one decode pipeline over all of them, so the
    backbone never waits at a shard boundary."""

    name = "local"

    def __call__(self, job: ShardJob, todo: list[cache.ShardPlan], source: cache.RowSource, model,
                 show_progress: bool) -> int:
        backbone = FeaturePass(model, job.xla) if model else None
        with ImageProgress(len(pending_rows(todo, source)), enabled=show_progress) as progress:
            return write_shards(job, todo, source, backbone, progress.advance_to)


def pending_rows(plans: list[cache.ShardPlan], source: cache.RowSource) -> list[Sample]:
    """The rows of ``plans`` that need the backbone: those no other cache of the same config holds."""
    return [s for p in plans for s in p.samples if s.sha256 not in source]


class FeaturePass:
    """A feature model with its compiled forward pass: traced once for uint8 batches of any size (a last,
    partial batch does not retrace), then reused for every shard. The pass returns a tuple: the
    features, then the also-layer's output when the model has one."""

    def __init__(self, model, xla: bool = False):
        import tensorflow as tf

        self.output_shapes = [tuple(output.shape[1:]) for output in model.outputs]
        images = tf.TensorSpec((None, *model.input_shape[1:]), tf.uint8)

        @tf.function(jit_compile=xla, input_signature=[images])
        def forward(batch):
            outputs = model(tf.cast(batch, tf.float32), training=False)
            outputs = outputs if isinstance(outputs, list) else [outputs]
            return tuple(tf.cast(output, tf.float32) for output in outputs)

        self.forward = forward


def write_shards(job: ShardJob, plans: list[cache.ShardPlan], source: cache.RowSource,
                 backbone: FeaturePass | None, advance=lambda resolved: None) -> int:
    """Decode -> feature model -> write each plan's shard as soon as its rows are through.

    Every engine writes shards through here: the local engine once over all missing shards, a
    Ray actor once per shard. Rows ``source`` holds are copied, not computed; ``backbone`` may be
    None only when it holds them all. ``advance(n)`` is told how many pending rows are resolved
    (computed or rejected). Returns the number of rows computed.
    """
    pending = pending_rows(plans, source)
    computed: dict[tuple[str, int], tuple[np.ndarray, ...]] = {}  # by (relpath, view): features[, also]
    rejected: dict[str, str] = {}  # by relpath: a rejected image takes its views with it

    def flush(plan: cache.ShardPlan) -> None:
        reused = source.read([s.sha256 for s in plan.samples if s.sha256 in source])
        rows = [s for s in plan.samples if s.relpath not in rejected]
        shapes = backbone.output_shapes if backbone else [part.shape for part in next(iter(reused.values()))]
        arrays = [np.zeros((len(rows), *shape), dtype=job.config.dtype) for shape in shapes]
        for i, s in enumerate(rows):
            parts = reused[s.sha256] if s.sha256 in reused else computed.pop((s.relpath, s.view))
            for array, part in zip(arrays, parts, strict=True):
                array[i] = part
        shard_rejects = {s.relpath: rejected[s.relpath] for s in plan.samples if s.relpath in rejected}
        cache.write_shard(job.cache_dir / plan.name, plan, job.provenance, arrays[0], rows, shard_rejects,
                          also=arrays[1] if len(arrays) > 1 else None)

    # pending holds the plans' rows in order: shard i is done once ends[i] rows are
    ends = np.cumsum([sum(s.sha256 not in source for s in p.samples) for p in plans]).tolist()
    flushed = 0
    batches = _run_backbone(backbone, job, pending, computed, rejected) if pending else iter([0])
    try:
        for resolved_upto in batches:
            advance(resolved_upto)
            while flushed < len(plans) and ends[flushed] <= resolved_upto:
                flush(plans[flushed])
                flushed += 1
    finally:
        if pending:  # stop the decode threads now, not during interpreter shutdown
            batches.close()
    return sum(s.relpath not in rejected for s in pending)


def _run_backbone(backbone: FeaturePass, job: ShardJob, pending: list[Sample], computed, rejected):
    """Stream pending rows through decode (-> augment) -> feature model, filling ``computed``.

    Yields, after each batch, how many pending rows are resolved (computed or rejected).
    """
    config = job.config

    def reject(i: int, reason: str) -> None:
        rejected[pending[i].relpath] = reason

    def view_of(i: int, image: np.ndarray) -> np.ndarray:
        s = pending[i]
        return augment.augmented_view(image, config.seed, s.source_sha256, s.view) if s.view else image

    paths = [s.path for s in pending]
    hashes = [s.source_sha256 or s.sha256 for s in pending]  # a view's row identity is not its file's hash
    batches = decoded_batches(paths, config.image_size, config.resize, job.batch_size, reject, view_of, hashes)
    for indices, batch in batches:
        outputs = [output.numpy().astype(config.dtype) for output in backbone.forward(batch)]
        for j, i in enumerate(indices):
            computed[(pending[i].relpath, pending[i].view)] = tuple(output[j] for output in outputs)
        yield int(indices[-1]) + 1
    yield len(pending)  # trailing rejects after the last batch


def decoded_batches(paths: list[Path], size: int, resize: str, batch_size: int, reject, transform=None,
                    hashes: list[str] | None = None):
    """(indices, uint8 images) batches, decoded in parallel by ``load_image`` in a tf.data pipeline.

    A file that cannot be used is skipped and reported as ``reject(index, reason)``; order is kept.
    ``transform(index, image)``, if given, replaces each decoded image (extraction's augmented
    views); ``hashes``, the scan's sha256 of each file, which the decoded bytes must match.
    Extraction and prediction both read images through here.
    """
    import tensorflow as tf

    blank = np.zeros((size, size, 3), np.uint8)

    def decode(i):
        try:
            image = load_image(paths[int(i)], size, resize, hashes[int(i)] if hashes else None)
        except RejectedImage as exc:
            reject(int(i), str(exc))
            return blank, False
        return (transform(int(i), image) if transform else image), True

    def tf_decode(i):
        image, ok = tf.numpy_function(decode, [i], (tf.uint8, tf.bool), stateful=False)
        image.set_shape((size, size, 3))
        ok.set_shape(())
        return i, image, ok

    # No autotuning: when an iterator is deleted, tf.data's autotune thread can miss its wake-up and
    # the deletion (GIL held, so the whole process) waits out its optimisation period, up to 60 s
    # after every pipeline. A decoder per core and two batches ahead keep any backbone fed.
    options = tf.data.Options()
    options.autotune.enabled = False
    images = (
        tf.data.Dataset.range(len(paths))
        .map(tf_decode, num_parallel_calls=usable_cpus(), deterministic=True)
        .filter(lambda i, image, ok: ok)
        .map(lambda i, image, ok: (i, image))
        .batch(batch_size)
        .prefetch(2)
        .with_options(options)
    )
    for indices, batch in images:
        yield indices.numpy(), batch


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _manifest(cache_dir, dataset, config, resolved, key, shard_size, plans, model) -> dict:
    previous = cache.read_manifest(cache_dir) or {}
    return {
        "format": cache.FORMAT,
        "featcache_version": __version__,
        "key": key,
        "row_key": config.row_key(),
        "status": "incomplete",
        "created": previous.get("created") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": asdict(config),
        "weights_source": resolved.source,
        "dataset": {"root": str(dataset.root.resolve()), "layout": dataset.layout,
                    "images": len(dataset.samples), "label_column": dataset.label_column,
                    **({"csv": str(dataset.csv)} if dataset.csv else {})},
        "task": dataset.task,
        "classes": list(dataset.classes),
        "augmentation": augment.RECIPE if config.augment else None,
        "shard_size": shard_size,
        "splits": {
            split: {"shards": [p.name for p in plans if p.split == split]} for split in dataset.splits
        },
        "output_layer": conv_base(model).layers[-1].name if model else previous.get("output_layer"),
        "feature_shape": list(model.outputs[0].shape[1:]) if model else previous.get("feature_shape"),
        "also_layer": {"name": config.also_layer, "row_key": config.also_row_key(), "dataset":
                       cache.also_dataset(config.also_layer)} if config.also_layer else None,
        "backbone_params": int(conv_base(model).count_params()) if model else previous.get("backbone_params"),
        "warnings": list(dataset.warnings),
    }


def _finish(cache_dir, manifest, dataset, plans, computed, reused, kept, started) -> ExtractResult:
    """Read back what every shard holds, refuse empty splits, and mark the cache complete."""
    rejects = [{"relpath": r.relpath, "split": None, "reason": r.reason} for r in dataset.rejects]
    rows_by_split: dict[str, list[Sample]] = {split: [] for split in dataset.splits}
    for plan in plans:
        with h5py.File(cache_dir / plan.name, "r") as f:
            shard_rejects = json.loads(f.attrs["rejects"])
            if manifest["feature_shape"] is None:
                manifest["feature_shape"] = list(f["features"].shape[1:])
            if also := manifest["also_layer"]:
                also["shape"] = list(f[also["dataset"]].shape[1:])
        rejects += [{"relpath": p, "split": plan.split, "reason": r} for p, r in shard_rejects.items()]
        rows_by_split[plan.split] += [s for s in plan.samples if s.relpath not in shard_rejects]
    for split, rows in rows_by_split.items():
        if not rows:
            raise FeatcacheError(
                f"split {split!r} has no usable images (all {len(dataset.split(split))} rejected); "
                f"fix or replace them, see the rejects in {cache_dir / cache.MANIFEST}"
            )
        manifest["splits"][split].update(cache.split_summary(rows, list(dataset.classes)))
    manifest.update(
        status="complete", completed=time.strftime("%Y-%m-%dT%H:%M:%S%z"), rejects=rejects,
        seconds=round(time.monotonic() - started, 3), rows_computed=computed, rows_reused=reused,
    )
    cache.write_manifest(cache_dir, manifest)
    return ExtractResult(cache.Cache(cache_dir), computed, reused, kept, manifest["seconds"], rejects,
                         list(manifest["warnings"]))
