"""The Keras heads' parts that need no training: the layers each head builds for each target, the loss,
metrics and optimizer it compiles, the regression target's scaling, the fold recipe, and predictions
read from an unfitted model. Fast (models built, never fitted), so the mutation-testing selection runs
them; names avoid the words its filter drops (``dense``, ``linear``, ``keras_head``)."""

from __future__ import annotations

import numpy as np
import pytest

from featcache import FeatcacheError
from featcache.heads import FitOptions
from featcache.heads.keras_heads import (
    KerasHead,
    TargetScaling,
    _scaled,
    build_keras_head,
    compile_head,
    parameter_counts,
    reduce_features,
)
from featcache.heads.scaling import Scaling

ONE_LAYER = "linear"  # the head's registered name (the string is not in any test's name)


def layer_types(model) -> list[str]:
    return [type(layer).__name__ for layer in model.layers]


@pytest.mark.parametrize("name, units, rate", [("dense256", 256, 0.5), ("dense1024", 1024, 0.2)],
                         ids=["hidden-256", "hidden-1024"])
def test_hidden_layer_heads_flatten_scale_and_end_in_one_output_per_target(name, units, rate):
    scaling = Scaling.of_rms(4.0)
    model = build_keras_head(name, (2, 2, 3), 4, scaling)
    assert model.name == f"head_{name}" and model.input_shape == (None, 2, 2, 3)
    assert layer_types(model) == ["InputLayer", "Flatten", "Rescaling", "Dense", "Dropout", "Dense"]
    hidden, dropout, output = model.get_layer(f"dense{units}"), model.get_layer("dropout"), model.layers[-1]
    assert hidden.units == units and hidden.activation.__name__ == "relu" and dropout.rate == rate
    assert output.name == "predictions" and output.units == 4 and output.activation.__name__ == "softmax"
    assert output.dtype_policy.compute_dtype == "float32"
    assert model.get_layer("scaling").scale == pytest.approx(0.5)
    assert parameter_counts(model) == {"trainable_params": 12 * units + units + units * 4 + 4,
                                       "non_trainable_params": 0}
    binary = build_keras_head(name, (5,), 2)
    assert layer_types(binary) == ["InputLayer", "Flatten", "Dense", "Dropout", "Dense"]  # no scaling given
    assert binary.layers[-1].units == 1 and binary.layers[-1].activation.__name__ == "sigmoid"
    sets = build_keras_head(name, (5,), 2, multilabel=True)
    assert sets.layers[-1].units == 2 and sets.layers[-1].activation.__name__ == "sigmoid"
    numbers = build_keras_head(name, (5,), 0)
    value = numbers.get_layer("value")
    assert numbers.output_shape == (None, 1) and value.activation.__name__ == "linear"
    assert value.dtype_policy.compute_dtype == "float32" and numbers.name == f"head_{name}"


def test_the_one_layer_head_pools_a_map_and_flattens_rows():
    pooled = build_keras_head(ONE_LAYER, (3, 3, 6), 3, Scaling("l2"))
    assert layer_types(pooled) == ["InputLayer", "GlobalAveragePooling2D", "UnitNormalization", "Dense"]
    assert pooled.get_layer("avg_pool") is pooled.layers[1] and pooled.layers[-1].units == 3
    flat = build_keras_head(ONE_LAYER, (6,), 3)
    assert layer_types(flat) == ["InputLayer", "Flatten", "Dense"]
    x = np.arange(2 * 3 * 3 * 6, dtype=np.float32).reshape(2, 3, 3, 6)
    np.testing.assert_allclose(reduce_features(ONE_LAYER, x), x.mean(axis=(1, 2)))
    np.testing.assert_array_equal(reduce_features("dense256", x), x.reshape(2, -1))
    np.testing.assert_array_equal(reduce_features(ONE_LAYER, x[:, 0, 0]), x[:, 0, 0])
    assert reduce_features("dense256", x.astype(np.float16)).dtype == np.float32


@pytest.mark.parametrize("n_classes, kwargs, loss, metric", [
    (2, {}, "binary_crossentropy", "accuracy"),
    (3, {}, "sparse_categorical_crossentropy", "accuracy"),
    (2, {"one_column": False}, "sparse_categorical_crossentropy", "accuracy"),
    (0, {}, "mse", "mae"),
    (3, {"multilabel": True}, "binary_crossentropy", "BinaryAccuracy"),
    (2, {"label_smoothing": 0.1}, "BinaryCrossentropy", "accuracy"),
    (3, {"label_smoothing": 0.1}, "CategoricalCrossentropy", "accuracy"),
], ids=["two", "three", "two-columns", "numbers", "sets", "two-smoothed", "three-smoothed"])
def test_each_target_compiles_its_loss_and_metric(n_classes, kwargs, loss, metric):
    model = build_keras_head(ONE_LAYER, (4,), n_classes, multilabel=kwargs.get("multilabel", False))
    compile_head(model, n_classes, "rmsprop", 1e-3, **kwargs)
    config = model.get_compile_config()

    def named(item):
        return item if isinstance(item, str) else item["class_name"]

    assert named(config["loss"]) == loss and [named(m) for m in config["metrics"]] == [metric]
    if "label_smoothing" in kwargs:
        assert config["loss"]["config"]["label_smoothing"] == pytest.approx(0.1)
    if metric == "BinaryAccuracy":
        assert config["metrics"][0]["config"]["name"] == "accuracy"


def test_optimizers_rates_and_steps_per_call():
    import keras

    from featcache.fused_adam import FusedAdam

    def compiled(optimizer, **kwargs):
        return compile_head(build_keras_head(ONE_LAYER, (4,), 3), 3, optimizer, 0.25, **kwargs)

    adam, rmsprop, sgd = compiled("adam"), compiled("rmsprop", steps_per_execution=7), compiled("sgd")
    assert type(adam.optimizer) is FusedAdam and type(rmsprop.optimizer) is keras.optimizers.RMSprop
    assert type(sgd.optimizer) is keras.optimizers.SGD and float(sgd.optimizer.momentum) == pytest.approx(0.9)
    assert all(float(m.optimizer.learning_rate) == pytest.approx(0.25) for m in (adam, rmsprop, sgd))
    assert rmsprop.steps_per_execution == 7 and adam.steps_per_execution == 1


def test_a_regression_target_trains_standardised_and_is_folded_back_into_its_units():
    import keras

    values = np.array([100.0, 104.0, 96.0, 100.0])
    target = TargetScaling.of(values)
    assert (target.mean, target.std) == (100.0, pytest.approx(np.sqrt(8)))
    assert TargetScaling.of(np.full(3, 7.0)) == TargetScaling(7.0, 1.0)  # one value: no division by zero
    np.testing.assert_allclose(_scaled(values, target), (values - 100) / np.sqrt(8), rtol=1e-6)
    assert _scaled(values, target).dtype == np.float32 and _scaled(values, None) is values
    x, y = target.tf_map("rows", np.float32(104.0))
    assert x == "rows" and float(y) == pytest.approx(4 / np.sqrt(8))
    layer = keras.layers.Dense(1)
    layer.build((None, 2))
    layer.set_weights([np.array([[1.0], [-2.0]], np.float32), np.array([0.5], np.float32)])
    target.fold_into(layer)
    kernel, bias = layer.get_weights()
    np.testing.assert_allclose(kernel, np.array([[1.0], [-2.0]]) * np.sqrt(8), rtol=1e-6)
    np.testing.assert_allclose(bias, [0.5 * np.sqrt(8) + 100], rtol=1e-6)


def unfitted(name, feature_shape, n_classes, record=None):
    head = KerasHead(name, FitOptions(), model=build_keras_head(name, feature_shape, n_classes))
    head.record.update(record or {})
    return head


def test_predictions_come_in_chunks_as_two_columns_or_numbers():
    head = unfitted(ONE_LAYER, (4,), 2, {"output": "sigmoid", "classes": ["a", "b"]})
    x = np.random.default_rng(0).random((5000, 4)).astype(np.float16)  # more rows than one chunk
    p = head.predict_proba(x)
    assert p.shape == (5000, 2) and p.dtype == np.float64
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    np.testing.assert_allclose(p[:, 1], np.asarray(head.model(x.astype(np.float32)))[:, 0], rtol=1e-6)
    assert head.predict_proba(x[:0]).shape == (0, 2)
    with pytest.raises(FeatcacheError, match=f"^{ONE_LAYER} predicts classes, not numbers$"):
        head.predict_values(x)
    three = unfitted("dense256", (4,), 3, {"output": "softmax"})
    assert three.predict_proba(x[:3]).shape == (3, 3)
    np.testing.assert_array_equal(three.predict_proba(x[:50]), three.predict_proba(x[:50]))  # dropout is off
    numbers = unfitted("dense256", (4,), 0, {"output": "value"})
    assert numbers.predict_values(x[:3]).shape == (3,)
    with pytest.raises(FeatcacheError, match="^dense256 predicts numbers on this regression cache, not class"):
        numbers.predict_proba(x[:3])


class ChunkRecorder:
    """Stands in for a head's model: records the rows of each call, answers zeros."""

    output_shape = (None, 2)

    def __init__(self):
        self.calls = []

    def __call__(self, x, training):
        assert x.dtype == np.float32 and training is False
        self.calls.append(len(x))
        return np.zeros((len(x), 2), np.float32)


@pytest.mark.parametrize("rows, features, chunks", [
    (5000, 4, [1024] * 4 + [904]),  # small rows: 1024 at once
    (2000, 10_000, [838, 838, 324]),  # 2**23 // 10,000 rows: at most 32 MB of float32 input at once
    (2, 2**23 + 1, [1, 1]),  # a row over 32 MB still goes, one at a time
], ids=["small-rows", "wide-rows", "huge-rows"])
def test_predictions_read_at_most_1024_rows_or_32_mb_at_once(rows, features, chunks):
    head = unfitted(ONE_LAYER, (4,), 2, {"output": "multilabel"})
    head.model = ChunkRecorder()
    assert head.predict_proba(np.zeros((rows, features), np.uint8)).shape == (rows, 2)
    assert head.model.calls == chunks


def test_export_gives_probabilities_of_every_class_and_carries_no_optimizer():
    binary = unfitted(ONE_LAYER, (4,), 2, {"output": "sigmoid"})
    compile_head(binary.model, 2, "adam", 1e-3)
    exported = binary.to_keras((4,))
    assert exported.output_shape == (None, 2) and exported.name == f"head_{ONE_LAYER}"
    x = np.random.default_rng(1).random((3, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(exported(x)), binary.predict_proba(x), atol=1e-6)
    assert getattr(exported, "optimizer", None) is None
    three = unfitted("dense256", (4,), 3, {"output": "softmax"})
    assert three.to_keras((4,)).output_shape == (None, 3) and three.to_keras((4,)).name == "head_dense256"
    numbers = unfitted("dense256", (4,), 0, {"output": "value"})
    assert numbers.to_keras((4,)).output_shape == (None, 1)


def test_a_fold_trains_the_epochs_early_stopping_kept_with_the_chosen_scaling():
    head = unfitted("dense256", (4,), 2, {"best_epoch": 3, "epochs_run": 8, "chosen": {"scaling": "l2"}})
    fold = head.for_fold()
    assert (fold.options.epochs, fold.options.patience, fold.options.scaling) == (3, None, "l2")
    assert fold.name == "dense256" and fold.model is None and fold.options.seed == head.options.seed
    head.record.pop("best_epoch")
    assert head.for_fold().options.epochs == 8
    assert head.refittable and not unfitted("dense256", (4,), 2, {"finetune": {}}).refittable
