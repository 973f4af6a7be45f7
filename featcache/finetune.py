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

``--unfreeze-from all`` trains the whole network. What stays cached is then the pixel cache (an
ordinary cache cut at the input, ``cache.PIXELS``: decoded, resized uint8 images), so no epoch
decodes a file, and each training batch gets a fresh random view (``--augment-online``,
online_augment.py), which a feature cache cannot offer. The preprocessing runs inside the trained
model, as in every featcache model. The fine-tuned base is saved as a weights file that ``extract
--weights`` takes, so cheap heads can be compared on its domain-adapted features.
"""

from __future__ import annotations

import math
import os
import shlex
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from featcache import FeatcacheError, backbones, online_augment, precision, streaming, views
from featcache.backbones.weights import ResolvedWeights, weights_digest
from featcache.cache import PIXELS, Cache, cache_key
from featcache.dataset import DEFAULT_FRACTIONS, file_sha256, load_dataset
from featcache.evaluate import decision_threshold
from featcache.extract import ExtractResult, choose_precision, extract
from featcache.heads import FitOptions, Head, head_dir, keras_head_of, load_head
from featcache.heads.keras_heads import compile_head, one_hot_labels, parameter_counts
from featcache.heads.protocol import class_weight_of
from featcache.model import backbone_model, cache_config, cache_weights, preprocessing_layer
from featcache.streaming import errors_from_tf, split_batches, split_labels
from featcache.targets import CLASSIFICATION

DEFAULTS = FitOptions(epochs=30, batch_size=20, learning_rate=1e-5, optimizer="rmsprop", seed=0, patience=5)
WHOLE = "all"  # --unfreeze-from all: every layer of the base trains, on a pixel cache
SCHEDULES = ("constant", "cosine")
WHOLE_BATCH_ROWS = 32  # validation batches through a whole network: activations, not rows, fill memory


@dataclass(frozen=True)
class Recipe:
    """How fine-tuning trains, beyond the head's ``FitOptions``; checked when built, recorded in the head.

    ``head_epochs`` first train the head alone on the frozen base at ``head_learning_rate`` (the
    paper's first stage, Adam 1e-3); then everything unfrozen trains at the options' learning rate,
    warmed up linearly over ``warmup_epochs`` and, with ``cosine``, decayed to zero by the last epoch.
    ``augment_online`` and ``average_views`` (test-time averaging, inside the saved model) need the
    whole network: a prefix cache holds feature maps, not images.
    """

    augment_online: str = "none"
    schedule: str = "constant"
    warmup_epochs: int = 0
    head_epochs: int = 0
    head_learning_rate: float = 1e-3
    label_smoothing: float = 0.0
    average_views: str = "none"

    def __post_init__(self):
        online_augment.get(self.augment_online)
        if self.schedule not in SCHEDULES:
            raise FeatcacheError(f"--schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.average_views not in views.VIEW_SETS:
            raise FeatcacheError(f"--average-views {self.average_views!r}: choose one of {', '.join(views.VIEW_SETS)}")
        if min(self.warmup_epochs, self.head_epochs) < 0 or not 0 <= self.label_smoothing < 1:
            raise FeatcacheError(
                f"--warmup-epochs {self.warmup_epochs} and --head-epochs {self.head_epochs} must be 0 or more, "
                f"--label-smoothing {self.label_smoothing} in [0, 1)"
            )
        if not self.head_learning_rate > 0:
            raise FeatcacheError(f"--head-learning-rate {self.head_learning_rate} must be positive")

    def check_cut(self, unfreeze_from: str) -> None:
        """Pixel-level options on a prefix cut: one line saying what they need."""
        for option, value in (("--augment-online", self.augment_online), ("--average-views", self.average_views)):
            if value != "none" and unfreeze_from != WHOLE:
                raise FeatcacheError(f"{option} {value} transforms images, which only a whole-network fine-tune "
                                     f"sees (the prefix cache holds feature maps): add --unfreeze-from {WHOLE}")

    def to_json(self) -> dict:
        recipe = asdict(self)
        recipe["augment_online"] = online_augment.get(self.augment_online).to_json()
        return recipe


BATCH_NORM_POLICY = "frozen: BatchNormalization layers keep their ImageNet statistics and run in inference mode"


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
    if unfreeze_from == WHOLE:
        return Cut(names[1], PIXELS, tuple(names[1:]))
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


def trainable_model(extractor, cut: Cut, head_model, config=None):
    """prefix features -> top of the base (BatchNorm in inference mode) -> head; for a whole-network
    cut, pixels -> the backbone's preprocessing (frozen) -> the whole base -> head (``config`` says
    which preprocessing).

    Only ``cut.trainable`` layers and the head train. The layers are the extractor's own objects,
    so trained weights are shared with it.
    """
    import keras

    whole = cut.prefix_layer == PIXELS
    start = extractor.input if whole else extractor.get_layer(cut.prefix_layer).output
    top = keras.Model(start, extractor.output, name="top")
    set_trainable(top, cut)
    prefix = keras.Input(tuple(top.input.shape[1:]), name="image" if whole else "prefix")
    x = prefix
    if whole:  # pixels in [0, 255], as cached and as predict decodes them
        x = preprocessing_layer(backbones.get(config.backbone), config.preprocess, config.image_size)(prefix)
    return keras.Model(prefix, head_model(top(x, training=False)), name="finetune")


def set_trainable(top, cut: Cut, head_only: bool = False) -> None:
    """Unfreeze ``cut.trainable`` in the top (nothing with ``head_only``); BatchNorm stays frozen."""
    import keras

    for layer in top.layers:
        # A frozen BatchNormalization runs in inference mode. Keras 3 lets an outer training=True
        # override a nested call's training=False, so freezing is the dependable way to keep the
        # ImageNet statistics (the tests check training and inference outputs agree).
        batch_norm = isinstance(layer, keras.layers.BatchNormalization)
        layer.trainable = not head_only and layer.name in cut.trainable and not batch_norm


def prefix_cache(
    head_cache: Cache, cut: Cut, workdir: Path, data: Path | None = None,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, show_progress: bool = True,
) -> ExtractResult:
    """The cache of the frozen prefix's output for exactly the head cache's images (extracted once, or
    copied from the head cache's also-layer)."""
    config = cache_config(head_cache)
    root = data or data_of(head_cache)
    label_column = head_cache.manifest["dataset"].get("label_column", "label")
    dataset = load_dataset(root, fractions, target=head_cache.target, label_column=label_column)
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
    say=lambda message: None, show_progress: bool = True, recipe: Recipe = Recipe(),
) -> tuple[Head, Cache]:
    """Extract the prefix (or pixel) cache once, then train the unfrozen layers and the head on it.

    Returns the fine-tuned head (not yet saved) and the prefix cache it belongs to. Training stops
    early on validation loss, keeping the best weights. A whole-network fine-tune also writes its
    base as a weights file (``save_base``), named in the head's record.
    """
    import keras

    recipe.check_cut(unfreeze_from)
    if recipe.warmup_epochs and recipe.warmup_epochs >= options.epochs:
        raise FeatcacheError(f"--warmup-epochs {recipe.warmup_epochs} leaves none of the {options.epochs} epochs at "
                             "the learning rate: fewer warm-up epochs, or more --epochs")
    keras.utils.set_random_seed(options.seed)  # the head's and the base's layers draw their seeds when built
    head = load_head(head_dir(head_cache, head_name))
    head.check_cache(head_cache)
    if head.predicts_values and head.kind != "keras" or head.kind == "ridge":
        raise FeatcacheError(f"finetune trains a Keras head's layers; {head_name} is a {head.kind} head on numbers "
                             "(a regression, or the rank of ordered classes): fit dense256 or linear on a cache "
                             "extracted with --task regression and fine-tune that")
    if head.predicts_values and (options.class_weight or recipe.label_smoothing):
        raise FeatcacheError(f"--class-weight and --label-smoothing act on classes; {head_name} predicts numbers "
                             "(trained on their mean squared error): leave them out")
    if head.predicts_sets:
        raise FeatcacheError(f"finetune trains one class per image (softmax or sigmoid cross-entropy); {head_name} "
                             "predicts sets of classes (multi-label), which it does not train yet: fit-head's "
                             "Keras heads learn them on the cache")
    head_layers = head.to_keras(head_cache.feature_shape)  # refuses a head with no Keras form
    if (views_averaged := head_cache.config.get("average_views", "none")) != "none":
        raise FeatcacheError(
            f"cache {head_cache.key[:16]} averages {views_averaged} views, which fine-tuning cannot train "
            "through (the top would run once per view on a prefix cached per view); fine-tune a head fitted "
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
    cached = "the decoded pixels" if cut.prefix_layer == PIXELS else f"the frozen prefix up to {cut.prefix_layer}"
    say(f"unfreezing {len(cut.trainable)} layers from {cut.unfreeze_from}; caching {cached}")
    if (also := head_cache.config.get("also_layer")) and also != cut.prefix_layer and cut.prefix_layer != PIXELS:
        say(f"cache {head_cache.key[:16]} stores {also}, not {cut.prefix_layer}: running the backbone for it "
            f"(extract with --also-layer {cut.prefix_layer} to skip this)")
    extracted = prefix_cache(head_cache, cut, workdir, data, fractions, show_progress)
    prefix = extracted.cache
    computed = "decoded" if cut.prefix_layer == PIXELS else "through the backbone"
    say(f"{'pixel' if cut.prefix_layer == PIXELS else 'prefix'} cache {prefix.key[:16]}: {extracted.computed} "
        f"rows {computed}, {extracted.reused} copied")
    keras.utils.set_random_seed(options.seed)
    with precision.using(choice.precision):  # the model's policy: mixed_float16 compiles with loss scaling
        model = trainable_model(extractor, cut, head_layers, config)
    one_column = head_layers.output_shape[-1] == 1
    started = time.perf_counter()
    with errors_from_tf():
        history = train_stages(model, cut, prefix, options, recipe, one_column, say)
    seconds = time.perf_counter() - started
    counts = parameter_counts(model)  # before test-time averaging wraps it
    model = keras.Model(model.input, model.output, name=model.name)  # uncompiled: saved without Adam's state
    if recipe.average_views != "none":
        model = averaged_model(model, recipe.average_views, config.image_size)
    before = head.record.get("history", {})
    epochs_run = len(history["loss"])
    info = {
        "name": f"{head.name}-finetuned", "kind": "keras", "cache_key": prefix.key,
        "classes": prefix.classes, "feature_shape": list(prefix.feature_shape), "output": head.record.get("output"),
        "options": options.to_json(), "seed": options.seed, "precision": choice.to_json(),
        "finetune": {
            "from_head": head.name, "from_cache": head_cache.key, "requested": unfreeze_from,
            "unfreeze_from": cut.unfreeze_from, "prefix_layer": cut.prefix_layer,
            "trainable_layers": list(cut.trainable), "started_at_epoch": len(before.get("loss", [])),
            "recipe": recipe.to_json(), "batch_norm": BATCH_NORM_POLICY,
        },
        "history": {k: before.get(k, []) + history[k] for k in history},
        "epochs_run": epochs_run,
        "seconds_per_epoch": round(seconds / epochs_run, 3),
        **counts,
        "fit_seconds": round(seconds, 3), "fitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if cut.prefix_layer == PIXELS:
        path = save_base(extractor, config, cache_weights(head_cache), workdir, info["name"])
        info["finetune"]["base_weights"] = {"file": str(path.resolve()), "sha256": file_sha256(path),
                                            "extract": extract_command(head_cache, path, data, fractions)}
        say(f"fine-tuned base saved: {path}")
    tuned = keras_head_of(info["name"], model, options, info)
    if threshold := decision_threshold(tuned, prefix, options.threshold):  # two classes: chosen on validation
        tuned.record["threshold"] = threshold
    return tuned, prefix


def train_stages(model, cut: Cut, prefix: Cache, options: FitOptions, recipe: Recipe, one_column: bool,
                 say) -> dict[str, list[float]]:
    """The head alone for ``recipe.head_epochs`` (Adam at the head learning rate), then every unfrozen layer
    for ``options.epochs``; each stage stops early on validation loss. Returns the joined histories."""
    import keras

    train, validation = training_data(prefix, options, recipe, one_column)
    steps = math.ceil(prefix.rows("train") / options.batch_size)
    weights = class_weight_of(split_labels(prefix, "train"), len(prefix.classes), options.class_weight)
    history: dict[str, list[float]] = {}
    for stage, epochs, head_only in (("head", recipe.head_epochs, True), ("finetune", options.epochs, False)):
        if not epochs:
            continue
        set_trainable(model.get_layer("top"), cut, head_only)
        rate = recipe.head_learning_rate if head_only else learning_rate(options, recipe, steps)
        compile_head(model, len(prefix.classes), "adam" if head_only else options.optimizer, rate, one_column,
                     recipe.label_smoothing)

        def report(epoch, logs, stage=stage, epochs=epochs):
            score = "mae" if "mae" in logs else "accuracy"  # a number's mean absolute error, in its units
            shown = ".4g" if score == "mae" else ".1%"
            say(f"{stage} epoch {epoch + 1}/{epochs}: loss {logs['loss']:.4f}, {score} {logs[score]:{shown}}, "
                f"val loss {logs['val_loss']:.4f}, val {score} {logs['val_' + score]:{shown}}")

        callbacks = [keras.callbacks.LambdaCallback(on_epoch_end=report)]
        if options.patience:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience,
                                                           restore_best_weights=True))
        run = model.fit(train, validation_data=validation, epochs=epochs, callbacks=callbacks, verbose=0,
                        class_weight=weights, shuffle=False)  # split_batches shuffles shards, rows and a buffer
        for key, values in run.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    return history


def training_data(prefix: Cache, options: FitOptions, recipe: Recipe, one_column: bool):
    """(train, validation) pipelines streamed from the cache; training batches augmented online by the recipe,
    labels one-hot where a smoothed categorical loss needs them."""
    whole = prefix.config["layer"] == PIXELS
    plan = streaming.keras_plan(prefix, streaming.default_budget(), options.batch_size)
    online = online_augment.get(recipe.augment_online)
    transform = None if online.name == "none" else (lambda x, rng: online_augment.augment_batch(x, online, rng))
    train = split_batches(prefix, "train", options.batch_size, options.seed, plan.buffer_rows, transform=transform)
    validation = split_batches(prefix, "validation", WHOLE_BATCH_ROWS if whole else 256, None)
    if recipe.label_smoothing and not one_column:
        n_classes = len(prefix.classes)
        train, validation = one_hot_labels(train, n_classes), one_hot_labels(validation, n_classes)
    return train, validation


def learning_rate(options: FitOptions, recipe: Recipe, steps_per_epoch: int):
    """The options' learning rate, or a Keras schedule: linear warm-up, then constant or cosine decay to 0."""
    if recipe.schedule == "constant" and not recipe.warmup_epochs:
        return options.learning_rate
    import keras

    warmup = recipe.warmup_epochs * steps_per_epoch
    decay = max(1, options.epochs * steps_per_epoch - warmup)
    alpha = 0.0 if recipe.schedule == "cosine" else 1.0  # alpha 1: the decay ends where it starts
    if not warmup:
        return keras.optimizers.schedules.CosineDecay(options.learning_rate, decay, alpha=alpha)
    return keras.optimizers.schedules.CosineDecay(0.0, decay, alpha=alpha, warmup_target=options.learning_rate,
                                                  warmup_steps=warmup)


def averaged_model(model, name: str, size: int):
    """``model`` (pixels -> probabilities) averaged over the views of ``name`` (views.py): test-time
    averaging inside the saved model, so evaluation, predict and export all average alike."""
    import keras

    pixels = keras.Input((size, size, 3), name="image")
    return keras.Model(pixels, views.averaged(model, pixels, name, size), name=f"finetune_{name}")


def save_base(extractor, config, weights_arg: str | None, workdir: Path, name: str) -> Path:
    """The fine-tuned base as a weights file of the whole backbone (layers above the cached cut as they
    came), named by the sha256 of its values; written under a temporary name and renamed."""
    spec = backbones.get(config.backbone)
    with precision.using("float32"):
        base = spec.build(weights_arg, config.image_size)
    trained = {layer.name: layer for layer in extractor.layers}
    for layer in base.layers:
        if layer.weights and layer.name in trained:
            layer.set_weights(trained[layer.name].get_weights())
    folder = Path(workdir) / "bases"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config.backbone}-{name}-{weights_digest(base)[:12]}.weights.h5"
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}.weights.h5")
    try:
        base.save_weights(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def extract_command(head_cache: Cache, base: Path, data: Path | None = None,
                    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The extract command that caches features of the fine-tuned base for exactly the head cache's images,
    splits and preprocessing (another split would put images the base trained on into test)."""
    config = head_cache.config
    options = {"--backbone": config["backbone"], "--weights": str(base), "--layer": config.get("layer"),
               "--pooling": config["pooling"], "--image-size": config["image_size"],
               "--resize": config["resize"], "--preprocess": config["preprocess"], "--dtype": config["dtype"],
               "--data": str(data or data_of(head_cache))}
    target, label_column = head_cache.target, head_cache.manifest["dataset"].get("label_column", "label")
    if target.task != CLASSIFICATION:
        options["--task"] = target.task
    if target.task == "ordinal":
        options["--class-order"] = ",".join(head_cache.classes)
    if label_column != "label":
        options["--label-column"] = label_column
    if fractions != DEFAULT_FRACTIONS:
        options["--split-fractions"] = ",".join(map(str, fractions))
    return "featcache extract " + " ".join(f"{option} {shlex.quote(str(value))}" for option, value in options.items()
                                           if value is not None)


def data_of(cache: Cache) -> Path:
    """What the cache was extracted from: its CSV file where it had one (its folder would read as class
    folders), else its folder."""
    dataset = cache.manifest["dataset"]
    return Path(dataset.get("csv") or dataset["root"])


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

