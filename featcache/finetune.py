"""The fine-tune stage at cache speed: train the top of the conv base and the head on cached prefix features.

Fine-tuning unfreezes the top block (``--unfreeze-from block5_conv1``, or a layer index such as
100 for MobileNetV2) and trains it with the head at a low learning rate. Everything below that
layer is frozen, so its output never changes: featcache extracts it once, as an ordinary cache
(same store, key, atomic shards, row reuse, augmented views), and each epoch runs only the
unfrozen layers. A head cache extracted with ``--also-layer`` at the cut already holds those rows,
so the prefix cache is copied from it without a backbone pass. BatchNorm layers stay in inference
mode (frozen), as the Keras and TensorFlow tutorials prescribe. The result is saved as a Keras
head of that prefix cache, so ``predict``, ``export`` and ``compare`` treat it like any other head;
its history continues the head's, with the epoch where fine-tuning began recorded for the
learning-curve marker.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from featcache import FeatcacheError, precision
from featcache.backbones.weights import ResolvedWeights
from featcache.cache import Cache, cache_key
from featcache.dataset import DEFAULT_FRACTIONS, load_dataset
from featcache.extract import ExtractResult, choose_precision, extract
from featcache.heads import FitOptions, Head, head_dir, keras_head_of, load_head
from featcache.heads.keras_heads import compile_head, parameter_counts
from featcache.heads.protocol import class_weight_of
from featcache.model import backbone_model, cache_config, cache_weights
from featcache.streaming import errors_from_tf, split_batches, split_labels

DEFAULTS = FitOptions(epochs=30, batch_size=20, learning_rate=1e-5, optimizer="rmsprop", seed=0, patience=5)


@dataclass(frozen=True)
class Cut:
    """Where the conv base splits into a cached frozen prefix and a trained top."""

    unfreeze_from: str  # the first trainable layer
    prefix_layer: str  # the layer whose output is cached: the single tensor the top starts from
    trainable: tuple[str, ...]  # every layer that trains (from unfreeze_from to the cached cut)


def plan_cut(extractor, backbone: str, unfreeze_from: str) -> Cut:
    """Resolve ``unfreeze_from`` (a layer name, or an index into the backbone's layers) to a Cut.

    The top must start from one tensor. When the requested layer sits inside a block whose
    residual connection reaches back past it, the cached prefix moves back to that block's
    input, and the layers in between run in the top but stay frozen.
    """
    import keras

    names = [layer.name for layer in extractor.layers]
    first = _layer_name(backbone, extractor, unfreeze_from)
    start = names.index(first)
    for index in range(start, 0, -1):
        inbound = extractor.layers[index].input
        if isinstance(inbound, list | tuple):
            continue
        try:
            keras.Model(inbound, extractor.output)
        except ValueError:  # another tensor crosses the cut (a residual connection)
            continue
        prefix = inbound._keras_history.operation.name
        if prefix == names[0]:
            break
        return Cut(first, prefix, tuple(names[start:]))
    raise FeatcacheError(
        f"--unfreeze-from {unfreeze_from}: nothing of {backbone} below it can be cached as one tensor; "
        f"choose a later layer (`featcache backbones {backbone}` lists them)"
    )


def _layer_name(backbone: str, extractor, unfreeze_from: str) -> str:
    """A name, or an index as in ``base_model.layers[index]`` of the tutorials."""
    names = [layer.name for layer in extractor.layers]
    if unfreeze_from.isdigit():
        index = int(unfreeze_from)
        if not 0 < index < len(names):
            raise FeatcacheError(
                f"--unfreeze-from {index}: the cached {backbone} has layers 1..{len(names) - 1}"
            )
        return names[index]
    if unfreeze_from not in names:
        raise FeatcacheError(
            f"--unfreeze-from {unfreeze_from!r}: not a layer of the cached {backbone} "
            f"(cut at {names[-1]}); `featcache backbones {backbone}` lists them"
        )
    return unfreeze_from


def trainable_model(extractor, cut: Cut, head_model):
    """prefix features -> top of the base (BatchNorm in inference mode) -> head.

    Only ``cut.trainable`` layers and the head train. The layers are the extractor's own objects,
    so trained weights are shared with it.
    """
    import keras

    top = keras.Model(extractor.get_layer(cut.prefix_layer).output, extractor.output, name="top")
    for layer in top.layers:
        # A frozen BatchNormalization runs in inference mode. Keras 3 lets an outer training=True
        # override a nested call's training=False, so freezing is the dependable way to keep the
        # ImageNet statistics (the tests check training and inference outputs agree).
        batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = layer.name in cut.trainable and not batch_norm
    prefix = keras.Input(tuple(top.input.shape[1:]), name="prefix")
    return keras.Model(prefix, head_model(top(prefix, training=False)), name="finetune")


def prefix_cache(
    head_cache: Cache, cut: Cut, workdir: Path, data: Path | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, show_progress: bool = True,
) -> ExtractResult:
    """The cache of the frozen prefix's output for exactly the head cache's images (extracted once, or
    copied from the head cache's also-layer)."""
    config = cache_config(head_cache)
    root = data or Path(head_cache.manifest["dataset"]["root"])
    dataset = load_dataset(root, fractions)
    if cache_key(config, dataset) != head_cache.key:
        raise FeatcacheError(
            f"the data at {root} is not the data of cache {head_cache.key[:16]} (images, labels or "
            f"splits changed since it was extracted); pass the same --data and --split-fractions, or "
            f"extract and fit the head again"
        )
    resolved = ResolvedWeights(cache_weights(head_cache), config.weights,
                               head_cache.manifest.get("weights_source", ""))
    return extract(dataset, config.at_layer(cut.prefix_layer), resolved, workdir, show_progress=show_progress)


def finetune(
    head_cache: Cache, head_name: str, unfreeze_from: str, workdir: Path, data: Path | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, options: FitOptions = DEFAULTS,
    say=lambda message: None, show_progress: bool = True,
) -> tuple[Head, Cache]:
    """Extract the prefix cache (once), then train the top block and the head on it.

    Returns the fine-tuned head (not yet saved) and the prefix cache it belongs to. Training stops
    early on validation loss, keeping the best weights.
    """
    import keras

    head = load_head(head_dir(head_cache, head_name))
    head.check_cache(head_cache)
    head_layers = head.to_keras(head_cache.feature_shape)  # refuses a head with no Keras form
    if (views := head_cache.config.get("average_views", "none")) != "none":
        raise FeatcacheError(
            f"cache {head_cache.key[:16]} averages {views} views, which fine-tuning cannot train through "
            "(the top would run once per view on a prefix cached per view); fine-tune a head fitted "
            "on a cache extracted without --average-views"
        )
    config = cache_config(head_cache)
    # the top block trains in the precision its backbone's forward pass gains from (the gains of a
    # training step follow those of the forward pass: VGG16 7.2x / 4.5x, MobileNetV2 0.74x / 0.84x);
    # the frozen prefix is cached in the cache's own precision, like the rows the head was fitted on
    choice = choose_precision(config.backbone, config.layer, config.pooling, config.image_size, options.precision)
    say(choice.line())
    extractor = backbone_model(replace(config, precision=choice.precision), cache_weights(head_cache))
    cut = plan_cut(extractor, head_cache.config["backbone"], unfreeze_from)
    say(f"unfreezing {len(cut.trainable)} layers from {cut.unfreeze_from}; caching the frozen prefix "
        f"up to {cut.prefix_layer}")
    if (also := head_cache.config.get("also_layer")) and also != cut.prefix_layer:
        say(f"cache {head_cache.key[:16]} stores {also}, not {cut.prefix_layer}: running the backbone for it "
            f"(extract with --also-layer {cut.prefix_layer} to skip this)")
    extracted = prefix_cache(head_cache, cut, workdir, data, fractions, show_progress)
    prefix = extracted.cache
    say(f"prefix cache {prefix.key[:16]}: {extracted.computed} rows through the backbone, "
        f"{extracted.reused} copied")
    keras.utils.set_random_seed(options.seed)
    with precision.using(choice.precision):  # the model's policy: mixed_float16 compiles with loss scaling
        model = trainable_model(extractor, cut, head_layers)
    model = compile_head(model, len(prefix.classes), options.optimizer, options.learning_rate,
                         one_column=head_layers.output_shape[-1] == 1)

    def report_epoch(epoch: int, logs: dict) -> None:
        say(f"finetune epoch {epoch + 1}/{options.epochs}: loss {logs['loss']:.4f}, "
            f"accuracy {logs['accuracy']:.1%}, val loss {logs['val_loss']:.4f}, "
            f"val accuracy {logs['val_accuracy']:.1%}")

    callbacks = [keras.callbacks.LambdaCallback(on_epoch_end=report_epoch)]
    if options.patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience,
                                                       restore_best_weights=True))
    started = time.perf_counter()
    with errors_from_tf():
        history = model.fit(
            split_batches(prefix, "train", options.batch_size, options.seed),
            validation_data=split_batches(prefix, "validation", 256, None), epochs=options.epochs,
            callbacks=callbacks, verbose=0,
            class_weight=class_weight_of(split_labels(prefix, "train"), len(prefix.classes), options.class_weight),
            shuffle=False,  # split_batches shuffles shards, rows and a buffer itself
        )
    seconds = time.perf_counter() - started
    before = head.record.get("history", {})
    after = {k: [float(v) for v in values] for k, values in history.history.items()}
    info = {
        "name": f"{head.name}-finetuned", "kind": "keras", "cache_key": prefix.key,
        "classes": prefix.classes, "feature_shape": list(prefix.feature_shape),
        "options": options.to_json(), "seed": options.seed, "precision": choice.to_json(),
        "finetune": {
            "from_head": head.name, "from_cache": head_cache.key, "requested": unfreeze_from,
            "unfreeze_from": cut.unfreeze_from, "prefix_layer": cut.prefix_layer,
            "trainable_layers": list(cut.trainable), "started_at_epoch": len(before.get("loss", [])),
        },
        "history": {k: before.get(k, []) + after[k] for k in after},
        "epochs_run": len(after["loss"]),
        "seconds_per_epoch": round(seconds / len(after["loss"]), 3),
        **parameter_counts(model),
        "fit_seconds": round(seconds, 3), "fitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return keras_head_of(info["name"], model, options, info), prefix


def cache_with_head(workdir: Path, head_name: str) -> Cache:
    """The default cache if ``head_name`` is fitted there, else the newest complete cache that has it."""
    from featcache.cache import list_caches, open_cache
    from featcache.predict import check_head_name

    check_head_name(head_name)  # a name no command makes: the real ones, not "run fit-head --head X"

    try:
        default = open_cache(workdir)
    except FeatcacheError:
        default = None
    if default and (default.path / "heads" / head_name / "head.json").is_file():
        return default
    for manifest in reversed(list_caches(workdir)):
        folder = workdir / manifest["key"][:16]
        if manifest.get("status") == "complete" and (folder / "heads" / head_name / "head.json").is_file():
            return Cache(folder)
    raise FeatcacheError(f"no cache in {workdir} has head {head_name} fitted; run `featcache fit-head --head "
                         f"{head_name}` first")

