"""The end-to-end model: RGB pixels -> the cached features -> a head's class probabilities.

Extraction and prediction build their feature model with the same function, so new images get,
op for op, the preprocessing the head was trained on: ``images.load_image`` decodes and resizes,
the backbone's ``preprocess_input`` runs as a fixed 1x1 convolution (exact for the per-channel
affine maps every registered backbone uses), then the conv base cut at the cached layer, the
pooling, and a rounding to the cache's dtype. Only built-in Keras layers are used, so an exported
model loads with plain Keras, without featcache and without unpickling anything.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from featcache import FeatcacheError, __version__, backbones, precision, views
from featcache.backbones import weights
from featcache.cache import PIXELS, Cache, ExtractionConfig
from featcache.dataset import file_sha256
from featcache.files import raise_if_out_of_space
from featcache.heads import Head


def preprocessing_affine(backbone: backbones.Backbone, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(matrix, offset) with preprocess(x) == x @ matrix + offset per pixel, measured on the function.

    Probing the backbone's own ``preprocess_input`` (rather than re-typing its constants) keeps
    one source of truth; a function that is not per-pixel affine is refused, not approximated.
    """
    function = backbone.preprocess_fn(mode)

    def apply(x: np.ndarray) -> np.ndarray:
        return np.asarray(function(x.copy()), dtype=np.float64)  # some modify their input in place

    probe = np.concatenate([np.zeros((1, 3)), np.eye(3)]).reshape(4, 1, 1, 3)
    out = apply(probe).reshape(4, 3)
    offset, matrix = out[0], out[1:] - out[0]
    check = np.random.default_rng(0).uniform(0, 255, (2, 3, 3, 3))
    if not np.allclose(check @ matrix + offset, apply(check), rtol=1e-6, atol=1e-4):
        raise FeatcacheError(
            f"{backbone.name}'s preprocessing ({mode}) is not a per-pixel affine map, so it cannot be "
            "part of the model; register the backbone with preprocessing inside the network"
        )
    return matrix, offset


def preprocessing_layer(backbone: backbones.Backbone, mode: str, image_size: int):
    """A frozen float32 1x1 convolution applying the backbone's preprocessing (channel order included)."""
    import keras

    matrix, offset = preprocessing_affine(backbone, mode)
    layer = keras.layers.Conv2D(3, 1, name="preprocess", trainable=False, dtype="float32")
    layer.build((None, image_size, image_size, 3))
    layer.set_weights([matrix.reshape(1, 1, 3, 3).astype(np.float32), offset.astype(np.float32)])
    return layer


def feature_model(config: ExtractionConfig, weights_arg: str | None):
    """float32 RGB pixels in [0, 255], (N, size, size, 3) -> features as extract computes them.

    With ``config.average_views`` the features are the mean over the image's turned and mirrored
    copies (views.py), made inside the model.

    The output is float32 (float16 under mixed precision); the cache stores it rounded to
    ``config.dtype``.
    """
    import keras

    if config.layer == PIXELS:
        return pixel_model(config.image_size)
    pixels, preprocessed = _preprocessed_input(config)
    features = views.averaged(backbone_model(config, weights_arg), preprocessed, config.average_views,
                              config.image_size)
    return keras.Model(pixels, features, name=f"{config.backbone}_features")


def extraction_model(config: ExtractionConfig, weights_arg: str | None):
    """What extract runs: ``feature_model``, and with ``config.also_layer`` a second output, that layer's
    unpooled output from the same pass (the rows a fine-tune prefix cut there would hold)."""
    import keras

    if not config.also_layer:
        return feature_model(config, weights_arg)
    base = backbone_model(config, weights_arg)
    try:
        also = base.get_layer(config.also_layer).output
    except ValueError:
        raise FeatcacheError(
            f"--also-layer {config.also_layer!r}: not a layer of {config.backbone} at or below the cached "
            f"layer {config.layer or '(its last)'}; `featcache backbones {config.backbone}` lists them"
        ) from None
    both = keras.Model(base.input, [base.output, also], name=base.name)
    pixels, preprocessed = _preprocessed_input(config)
    return keras.Model(pixels, both(preprocessed), name=f"{config.backbone}_features")


def pixel_model(size: int):
    """The feature model of a pixel cache (``cache.PIXELS``): the decoded, resized pixels as they are,
    what a whole-network fine-tune trains on. Its one nested model stands where a conv base would."""
    import keras

    pixels = keras.Input((size, size, 3), name="image")
    identity = keras.Sequential([keras.Input((size, size, 3)), keras.layers.Identity(name=PIXELS)],
                                name="pixel_cache")
    return keras.Model(pixels, identity(pixels), name="pixels")


def _preprocessed_input(config: ExtractionConfig):
    import keras

    size = config.image_size
    pixels = keras.Input((size, size, 3), name="image")
    return pixels, preprocessing_layer(backbones.get(config.backbone), config.preprocess, size)(pixels)


def conv_base(features):
    """The cut, pooled conv base inside a feature model: its one nested model, however many views call it."""
    import keras

    return next(layer for layer in features.layers if isinstance(layer, keras.Model))


def backbone_model(config: ExtractionConfig, weights_arg: str | None):
    """The conv base with its weights, cut at the config's layer and pooled; input already preprocessed."""
    import keras

    if weights_arg is None:
        keras.utils.set_random_seed(weights.RANDOM_INIT_SEED)
    try:
        with precision.using(config.precision):
            return backbones.build_extractor(backbones.get(config.backbone), weights_arg, config.image_size,
                                             config.layer, config.pooling)
    except FeatcacheError:
        raise
    except Exception as exc:  # Keras raises many types for download and file problems
        raise weights.load_failure(config.backbone, weights_arg, exc) from exc


def cache_config(cache: Cache) -> ExtractionConfig:
    return ExtractionConfig(**cache.config)


def cache_weights(cache: Cache) -> str | None:
    """The weights file the cache's features came from, found by the identity in its key."""
    config = cache.config
    identity = config["weights"]
    if identity.startswith("random-init:"):
        current = weights.resolve(config["backbone"], "none").identity
        if current != identity:
            raise FeatcacheError(
                f"cache {cache.key[:16]} was made with a random init ({identity}) this Keras cannot "
                f"reproduce ({current}); extract again"
            )
        return None
    entry = weights.store_index().get(config["backbone"])
    if entry and entry.get("weights_sha256") == identity:
        return weights.resolve(config["backbone"], "imagenet").keras_arg
    source = cache.manifest.get("weights_source", "")
    if source.startswith("file "):
        path = source.removeprefix("file ")
        if Path(path).is_file() and file_sha256(path) == identity:
            return path
    raise FeatcacheError(
        f"cache {cache.key[:16]} needs {config['backbone']} weights {identity[:12]}… "
        f"({source or 'unknown source'}), which are neither in the weights store nor at their recorded path; "
        f"run `featcache weights install {config['backbone']}` or restore the file"
    )


def head_model(head: Head, feature_shape: tuple[int, ...]):
    """The head as a Keras model from cached features to (N, n_classes) probabilities."""
    return head.to_keras(tuple(feature_shape))


def end_to_end(cache: Cache, head: Head, compute: str | None = None):
    """One Keras model: pixels -> features rounded as cached -> the head's probabilities.

    ``compute`` (a concrete precision) replaces the cache's and the head's mixed precision: an
    exported model is float32 by default, so it runs anywhere at full speed.
    """
    import keras

    head.check_cache(cache)
    config = cache_config(cache)
    if compute is not None:
        precision.check("--precision", compute, precision.CONCRETE)
        config = replace(config, precision=compute)
    features = feature_model(config, cache_weights(cache))
    pixels = keras.Input((config.image_size, config.image_size, 3), name="image")
    dtype = "float32" if config.layer == PIXELS else config.dtype  # pixels are whole numbers already
    cached = keras.layers.Activation("linear", dtype=dtype, name="as_cached")(features(pixels))
    head_layers = head_model(head, cache.feature_shape)
    if compute == "float32":
        head_layers = precision.model_in(head_layers, compute)
    probabilities = head_layers(cached)
    return keras.Model(pixels, probabilities, name=f"{config.backbone}_{head.name}")


def export(
    cache: Cache, head: Head, output: Path, saved_model: bool = False, tflite: bool = False,
    compute: str = "float32",
) -> list[Path]:
    """Write the end-to-end model as ``output`` (.keras), plus a SavedModel folder and/or a .tflite file.

    ``compute`` is the precision it runs in: float32 unless asked (a bfloat16 model crawls on a CPU
    without bfloat16). A ``.json`` beside it records what the model expects and where it came from.
    Every file is built as a hidden temporary first and renamed into place only once all are
    built, so a killed or failed export leaves the previous files as they were, all of one head;
    temporaries of killed exports are removed by the next.
    """
    import keras

    output = Path(output)
    if output.suffix != ".keras":
        raise FeatcacheError(f"--output {output}: the file name must end in .keras")
    model = end_to_end(cache, head, compute)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(output)
    folder = output.with_name(f"{output.stem}_savedmodel")
    built: dict[Path, Path] = {}  # final path -> its temporary
    try:
        built[output] = _temporary(output)
        model.save(built[output])
        if saved_model or tflite:
            built[folder] = _temporary(folder)
            model.export(built[folder], format="tf_saved_model", verbose=False)
        if tflite:
            import tensorflow as tf

            built[output.with_suffix(".tflite")] = _temporary(output.with_suffix(".tflite"))
            flatbuffer = tf.lite.TFLiteConverter.from_saved_model(str(built[folder])).convert()
            built[output.with_suffix(".tflite")].write_bytes(flatbuffer)
        if not saved_model and folder in built:  # built only for the .tflite conversion
            _remove(built.pop(folder))
        names = [path.name for path in built]
        built[output.with_suffix(".json")] = _temporary(output.with_suffix(".json"))
        card = model_card(cache, head, names, keras.__version__, compute)
        built[output.with_suffix(".json")].write_text(json.dumps(card, indent=2))
        for final, tmp in built.items():  # the .json last: it names the files of one head
            if final.is_dir():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except OSError as exc:
        raise_if_out_of_space(exc, f"export to {output}")
        raise
    finally:
        for tmp in built.values():
            _remove(tmp)
    return list(built)


def _temporary(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}{final.suffix}")


def _remove_stale_temporaries(output: Path) -> None:
    """Temporaries of exports to ``output`` whose process is gone (killed mid-export: a SavedModel is
    a hundred MB)."""
    for tmp in output.parent.glob(f".{output.stem}*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def model_card(cache: Cache, head: Head, files: list[str], keras_version: str, compute: str = "float32") -> dict:
    """What an exported model expects, what it returns, and the cache and head it was made from."""
    config = cache.config
    size = config["image_size"]
    return {
        "files": files,
        "input": {
            "name": "image", "shape": [None, size, size, 3], "dtype": "float32",
            "pixels": f"RGB in [0, 255], decoded and resized ({config['resize']}, bilinear) to {size}x{size} "
                      "as featcache.images.load_image does; the backbone's preprocessing is inside the model",
        },
        "task": cache.task,
        **_output(cache, head),
        "backbone": config["backbone"], "layer": cache.manifest.get("output_layer"),
        "pooling": config["pooling"], "average_views": config.get("average_views", "none"),
        "preprocess": config["preprocess"], "dtype": config["dtype"], "precision": compute,
        "cache_precision": config.get("precision", "float32"),
        "weights": config["weights"], "weights_source": cache.manifest.get("weights_source"),
        "cache_key": cache.key, "head": head.name, "head_files": head.record.get("files"),
        "head_metrics": head.record.get("metrics"), "featcache_version": __version__,
        "keras_version": keras_version, "exported": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _output(cache: Cache, head: Head) -> dict:
    """What the model returns and how a class is read from it: probabilities of the classes (ordered
    classes: soft-rounded from one score when the head is a regression on their rank), or one number."""
    if head.predicts_values:
        return {"output": {"name": "value", "shape": [None, 1], "meaning": f"the predicted {cache.task} target "
                           f"(CSV column {cache.manifest['dataset'].get('label_column', 'label')!r})"},
                "decision": {"rule": "the value itself"}}
    output = {"name": "probabilities", "shape": [None, len(cache.classes)], "classes": cache.classes}
    if head.predicts_sets:
        output["meaning"] = "one independent probability per class (sigmoid); they need not sum to 1"
    if cache.task == "ordinal":
        output["order"] = "classes are listed first to last"
    return {"output": output, "decision": _decision(cache.classes, head.threshold)}


def _decision(classes: list[str], threshold: float | list[float] | None) -> dict:
    """How a class is read from the probabilities, as ``predict`` reads it."""
    if isinstance(threshold, list):
        return {"rule": "every class whose probability reaches its threshold (maybe none)",
                "thresholds": dict(zip(classes, threshold, strict=True))}
    if threshold is None:
        return {"rule": "the class of the highest probability"}
    return {"rule": f"{classes[1]} where probabilities[:, 1] >= threshold, else {classes[0]}",
            "threshold": threshold}
