"""Heads: small classifiers fitted on cached features, all behind one interface.

Every head fits on a cache, predicts class probabilities, saves and loads; whatever library is
inside (Keras or scikit-learn). A saved head lives in ``CACHE/heads/NAME/`` with ``head.json``
(cache key, classes, options, seed, chosen hyperparameters, history, fit time, metrics, and the
sha256 of the model file) next to ``model.keras`` or ``model.joblib``. Loading refuses a head of
another cache, loads Keras models in safe mode, and unpickles joblib files only after their
sha256 matches the one recorded at save time.

Memory: every head fits within a budget of bytes for its feature data (``streaming``). Keras heads
always stream shards through a shuffle buffer sized from the budget; scikit-learn heads read the
cache into memory when it fits, and otherwise logreg and svm train by SGD over streamed shards
(svm-rbf cannot, and is refused). ``head.json`` records the path taken under ``memory``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from featcache import FeatcacheError, streaming
from featcache.cache import Cache
from featcache.dataset import file_sha256
from featcache.files import raise_if_out_of_space

OPTIMIZERS = ("rmsprop", "adam")
# Raised when fitting changes what a head learns from the same options (2: svm/svm-rbf calibrate on
# shuffled folds); fit-head keeps an already fitted head only when it was made by this recipe.
FIT_RECIPE = 2
C_GRIDS = {"logreg": (0.001, 0.01, 0.1, 1.0, 10.0), "svm": (0.001, 0.01, 0.1, 1.0, 10.0),
           "svm-rbf": (0.1, 1.0, 10.0, 100.0)}


@dataclass(frozen=True)
class FitOptions:
    """Training options; the defaults follow Chollet's feature-extraction recipe."""

    epochs: int = 30
    batch_size: int = 20
    learning_rate: float = 2e-5
    optimizer: str = "rmsprop"
    seed: int = 0
    class_weight: str | None = None  # None or "balanced"
    patience: int | None = 5  # early stopping on validation loss (best weights restored)


@dataclass(frozen=True)
class HeadSpec:
    name: str
    library: str  # "keras" or "sklearn"
    description: str


HEADS = {
    spec.name: spec
    for spec in (
        HeadSpec("dense256", "keras", "Flatten, Dense 256 relu, Dropout 0.5, sigmoid/softmax (Chollet)"),
        HeadSpec("dense1024", "keras", "Flatten, Dense 1024 relu, Dropout 0.2, sigmoid/softmax"),
        HeadSpec("linear", "keras", "global average pooling (on a map), one Dense (TF MobileNetV2 tutorial)"),
        HeadSpec("logreg", "sklearn", "standardise, LogisticRegression, C chosen on validation"),
        HeadSpec("svm", "sklearn", "standardise, linear SVM (calibrated), C chosen on validation"),
        HeadSpec("svm-rbf", "sklearn", "standardise, RBF SVM (calibrated), C chosen on validation"),
    )
}


def get_spec(name: str) -> HeadSpec:
    if name not in HEADS:
        raise FeatcacheError(f"unknown head {name!r}: choose one of {', '.join(HEADS)} (`featcache heads`)")
    return HEADS[name]


@dataclass
class Head:
    """A fitted head: its model and everything needed to trace a number back to it."""

    name: str
    model: object
    info: dict = field(default_factory=dict)

    @property
    def library(self) -> str:
        """"keras" or "sklearn"; a fine-tuned head records it, since its name is not in the registry."""
        return self.info.get("library") or get_spec(self.name).library

    @property
    def binary_sigmoid(self) -> bool:
        return self.info.get("output") == "sigmoid"

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """(N, n_classes) probabilities for a batch of cached features."""
        features = np.asarray(features, dtype=np.float32)
        if self.library == "sklearn":
            return self.model.predict_proba(features.reshape(len(features), -1))
        chunks = [self.model(features[i : i + 1024], training=False) for i in range(0, len(features), 1024)]
        p = np.concatenate([np.asarray(c, dtype=np.float64) for c in chunks]) if chunks else np.zeros((0, 1))
        return np.column_stack([1 - p[:, 0], p[:, 0]]) if self.binary_sigmoid else p

    def check_cache(self, cache: Cache) -> None:
        if self.info["cache_key"] != cache.key:
            raise FeatcacheError(
                f"head {self.name} was fitted on cache {self.info['cache_key'][:16]}, not {cache.key[:16]}; "
                f"fit it again with `featcache fit-head --head {self.name} --cache {cache.key[:16]}`"
            )

    def save(self, folder: Path) -> Path:
        """Write the head to a temporary folder, then swap it in: never a half-written head."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._write(tmp)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_out_of_space(exc, f"saving head {self.name} to {folder}")
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder


    def _write(self, tmp: Path) -> None:
        model_file = tmp / ("model.joblib" if self.library == "sklearn" else "model.keras")
        if model_file.suffix == ".joblib":
            import joblib

            joblib.dump(self.model, model_file)
        else:
            self.model.save(model_file)
        self.info["model_file"] = model_file.name
        self.info["model_sha256"] = file_sha256(model_file)
        (tmp / "head.json").write_text(json.dumps(self.info, indent=2))


def head_dir(cache: Cache, name: str) -> Path:
    return cache.path / "heads" / name


def saved_heads(cache: Cache) -> list[str]:
    folder = cache.path / "heads"
    if not folder.is_dir():
        return []
    saved = (p for p in folder.iterdir() if not p.name.startswith("."))  # skip half-written temporaries
    return sorted(p.name for p in saved if (p / "head.json").is_file())


def head_info(folder: Path) -> dict:
    """A saved head's ``head.json``: provenance and metrics, without loading the model."""
    try:
        return json.loads((Path(folder) / "head.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FeatcacheError(
            f"{folder}: not a saved head ({exc}); fit it with `featcache fit-head`"
        ) from None


def load_head(folder: Path) -> Head:
    """Load a saved head without ever executing untrusted code."""
    folder = Path(folder)
    info = head_info(folder)
    model_file = folder / info["model_file"]
    if not model_file.is_file() or file_sha256(model_file) != info["model_sha256"]:
        raise FeatcacheError(
            f"{model_file} is missing or does not match the sha256 recorded when it was saved; "
            f"refusing to load it (fit the head again with `featcache fit-head --head {info['name']}`)"
        )
    if model_file.suffix == ".joblib":
        import joblib

        model = joblib.load(model_file)
    else:
        import keras

        model = keras.saving.load_model(model_file, safe_mode=True)
    return Head(info["name"], model, info)


def memory_plan(cache: Cache, name: str, options: FitOptions, budget: int | None):
    """("in-memory" or "streamed", its StreamPlan) for head ``name`` under ``budget`` bytes (None: no
    limit); refuses what cannot fit, before any work."""
    if get_spec(name).library == "keras":
        return "streamed", streaming.keras_plan(cache, budget, options.batch_size)
    needed = streaming.in_memory_bytes(cache)
    if budget is None or needed <= budget:
        return "in-memory", streaming.in_memory_plan(cache, budget)
    if name not in streaming.SGD_LOSSES:
        raise FeatcacheError(
            f"{name} cannot stream (a kernel SVM needs every training row in memory at once: about "
            f"{streaming.format_size(needed)} for this cache, over --memory-budget "
            f"{streaming.format_size(budget)}); raise --memory-budget, or fit logreg or svm, which stream"
        )
    return "streamed", streaming.sgd_plan(cache, budget)


def fit_head(cache: Cache, name: str, options: FitOptions = FitOptions(), say=lambda message: None,
             memory_budget: int | None = None) -> Head:
    """Fit head ``name`` on the cache's train split, choosing/stopping on validation.

    ``say`` receives one progress line per epoch (Keras, streamed SGD) or per C tried (scikit-learn
    in memory). ``memory_budget`` bounds the bytes of feature data held at once (None: no limit).
    """
    spec = get_spec(name)
    if options.optimizer not in OPTIMIZERS:
        raise FeatcacheError(f"--optimizer {options.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    if options.class_weight not in (None, "balanced"):
        raise FeatcacheError(f"--class-weight {options.class_weight!r}: only 'balanced' is supported")
    if "validation" not in cache.splits:
        raise FeatcacheError(f"cache {cache.key[:16]} has no validation split; heads choose and stop on it")
    path, plan = memory_plan(cache, name, options, memory_budget)
    started = time.perf_counter()
    if spec.library == "keras":
        model, details = _fit_keras(cache, name, options, plan, say)
    elif path == "streamed":
        model, details = streaming.fit_sgd(cache, name, C_GRIDS[name], class_weights(cache, options),
                                           options.seed, options.epochs, options.patience, plan, say)
    else:
        model, details = _fit_sklearn(cache, name, options, say)
    details["memory"] = {"path": path, **plan.record(), **details.get("memory", {})}
    if spec.library == "keras":
        details["memory"]["epochs"] = details["epochs_run"]
    else:
        details["memory"]["in_memory_bytes"] = streaming.in_memory_bytes(cache)
    info = {
        "name": name, "library": spec.library, "cache_key": cache.key, "classes": cache.classes,
        "feature_shape": cache.manifest["feature_shape"], "options": asdict(options),
        "fit_recipe": FIT_RECIPE, "seed": options.seed,
        "fit_seconds": round(time.perf_counter() - started, 3),
        "fitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **details,
    }
    return Head(name, model, info)


def class_weights(cache: Cache, options: FitOptions) -> dict[int, float] | None:
    """'balanced' weights as scikit-learn defines them: n / (k * n_class)."""
    if options.class_weight is None:
        return None
    counts = np.array([cache.manifest["splits"]["train"]["class_counts"][c] for c in cache.classes], float)
    return {i: float(counts.sum() / (len(counts) * max(n, 1))) for i, n in enumerate(counts)}


# --- Keras heads ------------------------------------------------------------------------------------

def build_keras_head(name: str, feature_shape: tuple[int, ...], n_classes: int):
    """The head alone, on the cached feature shape; sigmoid for two classes, softmax otherwise."""
    import keras

    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = inputs
    if name == "linear":
        if len(feature_shape) == 3:
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    else:
        units, dropout = {"dense256": (256, 0.5), "dense1024": (1024, 0.2)}[name]
        x = keras.layers.Flatten(name="flatten")(x)
        x = keras.layers.Dense(units, activation="relu", name=f"dense{units}")(x)
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    binary = n_classes == 2
    outputs = keras.layers.Dense(1 if binary else n_classes, activation="sigmoid" if binary else "softmax",
                                 name="predictions")(x)
    return keras.Model(inputs, outputs, name=f"head_{name}")


def compiled_keras_head(name: str, feature_shape, n_classes: int, optimizer: str, learning_rate: float):
    import keras

    model = build_keras_head(name, feature_shape, n_classes)
    optimizer_class = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam}[optimizer]
    loss = "binary_crossentropy" if n_classes == 2 else "sparse_categorical_crossentropy"
    model.compile(optimizer=optimizer_class(learning_rate=learning_rate), loss=loss, metrics=["accuracy"])
    return model


def split_batches(cache: Cache, split: str, batch_size: int, shuffle_seed: int | None,
                  buffer_rows: int = streaming.KERAS_SHUFFLE_ROWS, rows: np.ndarray | None = None):
    """A tf.data pipeline of float32 batches streamed from shards (never the whole cache in memory).

    With a seed, every epoch visits shards, blocks and rows in a new order drawn from (seed, epoch),
    mixed in a buffer of ``buffer_rows`` rows (``streaming.batches``); memory holds that buffer and
    two prefetched batches, whatever the size of the cache. ``rows`` (a mask over the split) keeps
    only those rows.
    """
    import tensorflow as tf

    epochs = itertools.count()

    def generate():
        rng = np.random.default_rng([shuffle_seed, next(epochs)]) if shuffle_seed is not None else None
        yield from streaming.batches(cache, split, batch_size, max(buffer_rows, batch_size), rng, rows)

    signature = (tf.TensorSpec((None, *cache.manifest["feature_shape"]), tf.float32),
                 tf.TensorSpec((None,), tf.int32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    count = cache.manifest["splits"][split]["rows"] if rows is None else int(rows.sum())
    steps = math.ceil(count / batch_size)
    return dataset.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)


def _fit_keras(cache: Cache, name: str, options: FitOptions, plan: streaming.StreamPlan, say):
    import keras

    def report_epoch(epoch: int, logs: dict) -> None:
        say(f"{name} epoch {epoch + 1}/{options.epochs}: loss {logs['loss']:.4f}, "
            f"accuracy {logs['accuracy']:.1%}, val loss {logs['val_loss']:.4f}, "
            f"val accuracy {logs['val_accuracy']:.1%}")

    keras.utils.set_random_seed(options.seed)
    n_classes = len(cache.classes)
    model = compiled_keras_head(name, cache.manifest["feature_shape"], n_classes, options.optimizer,
                                options.learning_rate)
    callbacks = [keras.callbacks.LambdaCallback(on_epoch_end=report_epoch)]
    if options.patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience,
                                                       restore_best_weights=True))
    history = model.fit(
        split_batches(cache, "train", options.batch_size, options.seed, plan.buffer_rows),
        validation_data=split_batches(cache, "validation", plan.batch_rows, None),
        epochs=options.epochs, callbacks=callbacks, class_weight=class_weights(cache, options), verbose=0,
        shuffle=False,  # split_batches shuffles shard order, blocks and rows in a buffer itself
    )
    details = {
        "history": {k: [float(v) for v in values] for k, values in history.history.items()},
        "epochs_run": len(history.history["loss"]),
        "output": "sigmoid" if n_classes == 2 else "softmax",
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "non_trainable_params": int(sum(np.prod(w.shape) for w in model.non_trainable_weights)),
    }
    return model, details


# --- scikit-learn heads -----------------------------------------------------------------------------

def sklearn_model(name: str, c: float, seed: int, class_weight):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC, LinearSVC

    # Calibration folds are shuffled: cache rows come sorted by path, and unshuffled folds of sorted
    # rows are blocks of neighbouring files (on elpv, whole modules), whose scores calibrate nothing.
    folds = StratifiedKFold(3, shuffle=True, random_state=seed)
    if name == "logreg":
        estimator = LogisticRegression(C=c, max_iter=2000, class_weight=class_weight, random_state=seed)
    elif name == "svm":
        svc = LinearSVC(C=c, class_weight=class_weight, random_state=seed)
        estimator = CalibratedClassifierCV(svc, cv=folds)
    else:
        svc = SVC(C=c, kernel="rbf", class_weight=class_weight, random_state=seed)
        estimator = CalibratedClassifierCV(svc, cv=folds, ensemble=False)
    return make_pipeline(StandardScaler(), estimator)


def _fit_sklearn(cache: Cache, name: str, options: FitOptions, say):
    """In memory: try every C of the grid on train, keep the best validation accuracy (ties: smaller C)."""
    x_train, y_train, _ = cache.read("train")
    x_val, y_val, _ = cache.read("validation")
    x_train, x_val = (x.reshape(len(x), -1).astype(np.float32) for x in (x_train, x_val))
    class_weight = options.class_weight  # scikit-learn understands "balanced" itself
    scores = {}
    best = None
    for c in C_GRIDS[name]:
        started = time.perf_counter()
        model = sklearn_model(name, c, options.seed, class_weight).fit(x_train, y_train)
        scores[c] = float((model.predict(x_val) == y_val).mean())
        say(f"{name} C={c}: val accuracy {scores[c]:.1%} ({time.perf_counter() - started:.1f} s)")
        if best is None or scores[c] > scores[best[0]]:
            best = (c, model)
    c, model = best
    return model, {"chosen": {"C": c}, "validation_accuracy_by_C": {str(k): v for k, v in scores.items()},
                   "output": "proba"}
