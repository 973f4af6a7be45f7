"""Keras heads: dense256 (Chollet), dense1024, and linear (the MobileNetV2 tutorial's pooling + Dense).

A head is ``reduce`` (Flatten, or global average pooling of a map for ``linear``), the scaling
(by default ``rms``, one divisor for all features: unpooled VGG16 features reach hundreds, and a first
epoch on them has a loss near 19, while standardising each feature blows rare activations up to tens
of deviations and cost 2-3 points on elpv and Fashion-MNIST), then its layers and a sigmoid (two
classes) or softmax output, a sigmoid per class for a multi-label target (binary cross-entropy on
each), or for a regression target (``n_classes=0``) one linear output trained on the mean squared
error. With the default Adam 1e-3 and early stopping on validation loss the heads learn from 30
images as from thousands (an epoch is at least 20 steps: a few dozen images are repeated within it);
Chollet's recipe is ``--optimizer rmsprop --learning-rate 2e-5 --scaling none``. In memory it
trains on arrays; over the budget on shards streamed through a shuffle buffer (``split_batches``).
Stored as ``model.keras``, loaded in safe mode: built-in layers only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featcache import FeatcacheError
from featcache import precision as precisions
from featcache.heads.export import two_column_output
from featcache.heads.protocol import Head, class_weight_of, two_columns
from featcache.heads.scaling import Scaling, streamed_moments

ARCHITECTURES = {"dense256": (256, 0.5), "dense1024": (1024, 0.2), "linear": None}
# Training steps per call into TensorFlow: a head's step is small enough that returning to Python after
# each one was most of an epoch (Fashion-MNIST's 2,400 x 512 rows: 0.46 s an epoch, 0.15 s at 32).
STEPS_PER_EXECUTION = 32
# An epoch is at least this many steps: a smaller training set is repeated (each pass in a new order).
# Early stopping's patience and the epoch cap count epochs, and at 2 steps an epoch (36 images) the
# linear head moved too little in 50 of them: 22-56% validation on a 3-class test cache, 100% at 20.
MIN_STEPS_PER_EPOCH = 20
OUTPUTS = {0: "value", 2: "sigmoid"}  # by the number of classes; softmax for more


def reduce_features(name: str, x: np.ndarray) -> np.ndarray:
    """What the head's first layer computes, in NumPy: flat rows, or a map's spatial average."""
    x = np.asarray(x, np.float32)
    if ARCHITECTURES.get(name) is None and x.ndim == 4:
        return x.mean(axis=(1, 2))
    return x.reshape(len(x), -1)


def build_keras_head(name: str, feature_shape: tuple[int, ...], n_classes: int, scaling: Scaling | None = None,
                     multilabel: bool = False):
    """The head alone, on the cached feature shape; sigmoid for two classes, softmax for more, one linear
    ``value`` for none (a regression target), one sigmoid per class for a ``multilabel`` target."""
    import keras

    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    layers = ARCHITECTURES[name]
    if layers is None and len(feature_shape) == 3:
        x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(inputs)
    else:
        x = keras.layers.Flatten(name="flatten")(inputs)
    scale = scaling.keras_layer() if scaling is not None else None
    if scale is not None:
        x = scale(x)
    if layers is not None:
        units, dropout = layers
        x = keras.layers.Dense(units, activation="relu", name=f"dense{units}")(x)
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    if not n_classes:
        outputs = keras.layers.Dense(1, name="value", dtype="float32")(x)
        return keras.Model(inputs, outputs, name=f"head_{name}")
    binary = n_classes == 2 and not multilabel
    outputs = keras.layers.Dense(1 if binary else n_classes,
                                 activation="sigmoid" if binary or multilabel else "softmax",
                                 name="predictions", dtype="float32")(x)  # probabilities in float32 always
    return keras.Model(inputs, outputs, name=f"head_{name}")


def compile_head(model, n_classes: int, optimizer: str, learning_rate, one_column: bool | None = None,
                 label_smoothing: float = 0.0, multilabel: bool = False, steps_per_execution: int = 1):
    """Compiled with cross-entropy: binary on one sigmoid column, sparse categorical on k columns.

    ``learning_rate`` is a number or a Keras schedule. With ``label_smoothing`` on k columns the loss
    is categorical: the labels must come one-hot (``one_hot_labels``). ``multilabel``: binary cross-entropy
    on each of k sigmoid columns, and the share of right (image, class) decisions as accuracy (Keras'
    "accuracy" would take the most probable column as one class). ``steps_per_execution`` runs that many
    training steps per call into TensorFlow (the same steps, fewer returns to Python). Adam is Keras' Adam
    with TensorFlow's fused update (``fused_adam``)."""
    import keras

    from featcache.fused_adam import FusedAdam

    optimizers = {"rmsprop": keras.optimizers.RMSprop, "adam": FusedAdam,
                  "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate, momentum=0.9)}
    one_column = n_classes == 2 if one_column is None else one_column
    metrics = ["accuracy"]
    if not n_classes:  # a number: mean squared error, and the mean absolute error to read
        loss, metrics = "mse", ["mae"]
    elif multilabel:
        loss, metrics = "binary_crossentropy", [keras.metrics.BinaryAccuracy(name="accuracy")]
    elif not label_smoothing:
        loss = "binary_crossentropy" if one_column else "sparse_categorical_crossentropy"
    elif one_column:
        loss = keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    model.compile(optimizer=optimizers[optimizer](learning_rate=learning_rate), loss=loss, metrics=metrics,
                  steps_per_execution=steps_per_execution)
    return model


def epoch_of(train, rows: int, batch_size: int):
    """The training pipeline, repeated to at least MIN_STEPS_PER_EPOCH steps when one pass has fewer."""
    steps = -(-rows // batch_size)
    return train.repeat(-(-MIN_STEPS_PER_EPOCH // steps)) if 0 < steps < MIN_STEPS_PER_EPOCH else train


def one_hot_labels(dataset, n_classes: int):
    """A tf.data pipeline of (x, class index) as (x, one-hot row): what a smoothed categorical loss takes."""
    import tensorflow as tf

    return dataset.map(lambda x, y: (x, tf.one_hot(y, n_classes)))


@dataclass(frozen=True)
class TargetScaling:
    """A regression target standardised for training (an output layer starts near 0 with unit-scale
    weights: numbers in the hundreds took it hundreds of epochs), folded back into the value layer after."""

    mean: float
    std: float

    @classmethod
    def of(cls, values: np.ndarray) -> TargetScaling:
        values = np.asarray(values, np.float64)
        return cls(float(values.mean()), float(values.std()) or 1.0)

    def tf_map(self, x, y):
        return x, (y - self.mean) / self.std

    def fold_into(self, layer) -> None:
        """value = std * (x @ W + b) + mean, as one Dense layer."""
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * self.std, bias * self.std + self.mean])


def _scaled(labels: np.ndarray, target: TargetScaling | None) -> np.ndarray:
    return labels if target is None else ((labels - target.mean) / target.std).astype(np.float32)


class KerasHead(Head):
    kind = "keras"

    @property
    def refittable(self) -> bool:
        """A fine-tuned head's recipe includes its parent's training and the top block: not refitted."""
        return "finetune" not in self.record

    def __init__(self, name: str, options, *, model=None):
        super().__init__(name, options)
        self.model = model
        self.multilabel = False  # set by fitting: labels as rows of 0 and 1, one sigmoid per class

    def stream_plan(self, cache, budget):
        from featcache import streaming

        return streaming.keras_plan(cache, budget, self.options.batch_size)

    def _scaling_kind(self) -> str:
        return "rms" if self.options.scaling == "auto" else self.options.scaling

    def _compiled(self, feature_shape, n_classes: int, scaling: Scaling):
        import keras

        choice = self._precision(tuple(feature_shape), n_classes, scaling)
        self.record["precision"] = choice.to_json()
        keras.utils.set_random_seed(self.options.seed)  # after the timing, which builds models too
        with precisions.using(choice.precision):
            model = build_keras_head(self.name, tuple(feature_shape), n_classes, scaling, self.multilabel)
        return compile_head(model, n_classes, self.options.optimizer, self.options.learning_rate,
                            multilabel=self.multilabel, steps_per_execution=STEPS_PER_EXECUTION)

    def _precision(self, feature_shape, n_classes: int, scaling: Scaling) -> precisions.Choice:
        """The requested precision; ``auto`` times a training step of this head in float32 and in the
        machine's mixed candidate (small heads rarely gain: their steps are mostly overhead)."""
        batch = self.options.batch_size

        def timer(candidates):
            return precisions.timed_rates(lambda: build_keras_head(self.name, feature_shape, n_classes, scaling,
                                                                   self.multilabel),
                                          feature_shape, candidates, batch=batch, train=True)

        shape = "x".join(map(str, feature_shape))
        network = f"head {self.name} training on {shape} features, {n_classes} classes, batch {batch}"
        return precisions.resolve(self.options.precision, network, timer)

    def fit(self, x, y, *, n_classes, validation=None, say=None):
        import tensorflow as tf

        x = np.asarray(x, np.float32)
        self.multilabel = np.ndim(y) == 2
        scaling = Scaling.fit(self._scaling_kind(), reduce_features(self.name, x))
        self.model = self._compiled(x.shape[1:], n_classes, scaling)
        order = np.random.default_rng(self.options.seed).permutation(len(x))
        y = np.asarray(y, np.float32 if not n_classes else np.int32)
        target = TargetScaling.of(y) if not n_classes else None
        train = tf.data.Dataset.from_tensor_slices((x[order], _scaled(y[order], target)))
        train = epoch_of(train.shuffle(len(x), seed=self.options.seed).batch(self.options.batch_size), len(x),
                         self.options.batch_size)
        val = None
        if validation is not None:
            val = tf.data.Dataset.from_tensor_slices(
                (np.asarray(validation[0], np.float32), _scaled(np.asarray(validation[1], y.dtype), target))).batch(256)
        weights = class_weight_of(y, n_classes, self.options.class_weight)
        return self._train(train, val, weights, n_classes, say, target)

    def fit_streamed(self, cache, plan, *, rows=None, say=None):
        from featcache.streaming import batches, split_batches, split_labels

        kind = self._scaling_kind()
        if kind in ("standard", "rms"):
            reduced = ((reduce_features(self.name, x), y) for x, y in batches(cache, "train", plan.batch_rows,
                                                                              rows=rows))
            scaling = Scaling.from_moments(kind, *streamed_moments(reduced))
        else:
            scaling = Scaling(kind)
        n_classes = len(cache.classes)
        self.multilabel = cache.task == "multilabel"
        self.model = self._compiled(cache.feature_shape, n_classes, scaling)
        train = split_batches(cache, "train", self.options.batch_size, self.options.seed, plan.buffer_rows, rows)
        val = split_batches(cache, "validation", plan.batch_rows, None) if rows is None else None
        labels = split_labels(cache, "train")
        labels = labels if rows is None else labels[rows]
        train = epoch_of(train, len(labels), self.options.batch_size)
        target = TargetScaling.of(labels) if not n_classes else None
        if target is not None:
            train, val = (None if part is None else part.map(target.tf_map) for part in (train, val))
        weights = class_weight_of(labels, n_classes, self.options.class_weight)
        return self._train(train, val, weights, n_classes, say, target)

    def _train(self, train, val, weights, n_classes, say, target: TargetScaling | None = None):
        import keras

        from featcache import streaming

        options = self.options
        callbacks = []
        if say is not None:
            say(f"{self.name}: {precisions.Choice(**self.record['precision']).line()}")
            def report(epoch, logs):
                if "mae" in logs:  # of the standardised target: in standard deviations
                    scores = f"loss {logs['loss']:.4g}, MAE {logs['mae']:.4g} sd"
                    if "val_loss" in logs:
                        scores += f", val loss {logs['val_loss']:.4g}, val MAE {logs['val_mae']:.4g} sd"
                else:
                    per = " per label" if self.multilabel else ""  # the share of right (image, class) decisions
                    scores = f"loss {logs['loss']:.4f}, accuracy{per} {logs['accuracy']:.1%}"
                    if "val_loss" in logs:
                        scores += f", val loss {logs['val_loss']:.4f}, val accuracy{per} {logs['val_accuracy']:.1%}"
                say(f"{self.name} epoch {epoch + 1}/{options.epochs}: {scores}")

            callbacks.append(keras.callbacks.LambdaCallback(on_epoch_end=report))
        if options.patience and val is not None:
            callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=options.patience,
                                                           restore_best_weights=True))
        with streaming.errors_from_tf():
            history = self.model.fit(train, validation_data=val, epochs=options.epochs, callbacks=callbacks,
                                     class_weight=weights, verbose=0, shuffle=False)
        if target is not None:  # the value layer learnt standardised numbers: give it the target's own units
            target.fold_into(self.model.get_layer("value"))
            self.record["target_scaling"] = {"mean": target.mean, "std": target.std}
        self.record.update(
            history={k: [float(v) for v in values] for k, values in history.history.items()},
            epochs_run=len(history.history["loss"]),
            output="multilabel" if self.multilabel else OUTPUTS.get(n_classes, "softmax"),
            chosen={"scaling": self._scaling_kind()}, **parameter_counts(self.model),
        )
        if options.patience and val is not None:
            losses = history.history["val_loss"]
            self.record["best_epoch"] = int(np.argmin(losses)) + 1
        return self

    def predict_proba(self, features):
        if self.predicts_values:
            raise FeatcacheError(f"{self.name} predicts numbers on this regression cache, not class probabilities")
        p = self._outputs(features)
        return two_columns(p) if p.shape[1] == 1 else p

    def predict_values(self, features):
        if not self.predicts_values:
            raise FeatcacheError(f"{self.name} predicts classes, not numbers")
        return self._outputs(features)[:, 0]

    def _outputs(self, features) -> np.ndarray:
        features = np.asarray(features)  # float32 chunk by chunk: a pixel cache's uint8 rows are 4x smaller
        # at most 1024 rows and 32 MB of input at once: a whole fine-tuned network on pixels holds
        # activations of ~100x its input per image (VGG16's first block), a head on features next to none
        rows = max(1, min(1024, 2**23 // max(1, int(np.prod(features.shape[1:])))))
        chunks = [np.asarray(self.model(features[i : i + rows].astype(np.float32), training=False), np.float64)
                  for i in range(0, len(features), rows)]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.output_shape[-1]))

    def for_fold(self):
        """Same layers and scaling; the epochs the fitted head kept (early stopping chose them)."""
        epochs = self.record.get("best_epoch") or self.record["epochs_run"]
        options = self.options.pinned(epochs=epochs, patience=None, scaling=self.record["chosen"]["scaling"])
        return KerasHead(self.name, options)

    def to_keras(self, feature_shape):
        model = self._uncompiled()
        if model.output_shape[-1] != 1 or self.predicts_values:  # probabilities, or a value
            return model
        return two_column_output(model, feature_shape, name=f"head_{self.name}")

    def _uncompiled(self):
        """The same layers without the training setup: what is saved and exported carries no optimizer
        (its state tripled a whole fine-tuned VGG16 to 209 MB, and featcache's fused Adam is no built-in
        Keras class), which nothing reads back: a loaded head only predicts, fine-tuning compiles afresh."""
        import keras

        return keras.Model(self.model.input, self.model.output, name=self.model.name)

    def _write(self, folder):
        self._uncompiled().save(folder / "model.keras")
        return ["model.keras"]

    def _read(self, folder):
        import keras

        self.model = keras.saving.load_model(folder / "model.keras", safe_mode=True, compile=False)


def parameter_counts(model) -> dict[str, int]:
    return {"trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
            "non_trainable_params": int(sum(np.prod(w.shape) for w in model.non_trainable_weights))}
