"""Heads as plain Keras layers (featcache/heads/export.py), built straight from small hand-made weights:
no training. Every link and scaling gives the probabilities numpy computes from the same weights, and
the names an exported model promises (input ``features``, output layer ``probabilities``) hold."""

from __future__ import annotations

import numpy as np
import pytest

from featcache.heads.export import dense, linear_keras_model, two_column_output
from featcache.heads.linear import LinearModel
from featcache.heads.scaling import Scaling

RNG = np.random.default_rng(7)
ROWS = RNG.normal(0, 2, (6, 2, 2, 3)).astype(np.float32)  # 6 rows of (2, 2, 3) cached features
FLAT = ROWS.reshape(6, -1)


def expit(z):
    return 1 / (1 + np.exp(-z))


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def scaled(kind: str) -> tuple[Scaling, np.ndarray]:
    """A scaling with nontrivial arrays, and the rows it gives, computed here in float64."""
    x = FLAT.astype(np.float64)
    if kind == "standard":
        mean = RNG.normal(0, 1, x.shape[1]).astype(np.float32)
        scale = RNG.uniform(0.5, 3, x.shape[1]).astype(np.float32)
        return Scaling(kind, mean, scale), (x - mean) / scale
    if kind == "l2":
        return Scaling(kind), x / np.linalg.norm(x, axis=1, keepdims=True)
    if kind == "rms":
        return Scaling(kind, None, np.array([2.5], np.float32)), x / 2.5
    return Scaling(kind), x


def reference(link: str, z: np.ndarray, platt: np.ndarray | None) -> np.ndarray:
    """The probabilities of scores z under each link, as the export's module docstring defines them."""
    if link == "platt":
        p = expit(-(platt[0] * z + platt[1]))
        return np.column_stack([1 - p[:, 0], p[:, 0]]) if z.shape[1] == 1 else p / p.sum(axis=1, keepdims=True)
    if z.shape[1] == 1:
        return np.column_stack([1 - expit(z[:, 0]), expit(z[:, 0])])
    if link == "ovr-sigmoid":
        return expit(z) / expit(z).sum(axis=1, keepdims=True)
    return softmax(z)


CASES = [(link, k) for link in ("softmax", "ovr-sigmoid", "platt") for k in (1, 3)] + [("sigmoid", 1)]


@pytest.mark.parametrize("kind", ["standard", "l2", "none", "rms"])
@pytest.mark.parametrize(("link", "k"), CASES)
def test_exported_head_gives_each_links_probabilities_from_its_weights(link, k, kind):
    scaling, x = scaled(kind)
    weights = RNG.normal(0, 0.5, (FLAT.shape[1], k))
    bias = RNG.normal(0, 1, k)
    platt = np.vstack([RNG.uniform(-3, -0.5, k), RNG.normal(0, 1, k)]) if link == "platt" else None
    model = LinearModel(scaling, weights, bias, link, platt)
    exported = linear_keras_model(model, (2, 2, 3), name="head_x")
    expected = reference(link, x @ weights + bias, platt)
    got = np.asarray(exported(ROWS), np.float64)
    assert got.shape == (6, max(k, 2))
    np.testing.assert_allclose(got, expected, atol=2e-6)
    np.testing.assert_allclose(got, model.predict_proba(ROWS), atol=2e-6)
    assert exported.name == "head_x"
    assert exported.input_shape == (None, 2, 2, 3)
    assert exported.inputs[0].name == "features"
    assert exported.layers[-1].name == "probabilities"
    assert exported.get_layer("probabilities").get_config()["activation"] == "softmax"


def test_exported_head_on_flat_features_and_its_default_name():
    weights, bias = RNG.normal(0, 0.5, (12, 3)), RNG.normal(0, 1, 3)
    exported = linear_keras_model(LinearModel(Scaling("none"), weights, bias, "softmax"), (12,))
    assert exported.name == "head" and exported.input_shape == (None, 12)
    assert [layer.name for layer in exported.layers] == ["features", "probabilities"]
    np.testing.assert_allclose(np.asarray(exported(FLAT)), softmax(FLAT.astype(np.float64) @ weights + bias),
                               atol=2e-6)


def test_features_of_two_axes_are_flattened_too():
    weights, bias = RNG.normal(0, 0.5, (12, 3)), RNG.normal(0, 1, 3)
    exported = linear_keras_model(LinearModel(Scaling("none"), weights, bias, "softmax"), (4, 3))
    got = np.asarray(exported(FLAT.reshape(6, 4, 3)))
    assert got.shape == (6, 3)
    np.testing.assert_allclose(got, softmax(FLAT.astype(np.float64) @ weights + bias), atol=2e-6)


def test_one_vs_rest_sigmoids_export_as_softplus_of_the_negated_scores():
    """Names of the intermediate layers stay stable: converters and `--layer`-style lookups rely on them."""
    import keras

    keras.layers.Flatten()  # takes Keras' own default name, so a layer left unnamed would be flatten_N
    weights, bias = RNG.normal(0, 0.5, (12, 3)), RNG.normal(0, 1, 3)
    exported = linear_keras_model(LinearModel(Scaling("l2"), weights, bias, "ovr-sigmoid"), (2, 2, 3))
    assert [layer.name for layer in exported.layers] == [
        "features", "flatten", "scaling", "minus_scores", "minus_log_sigmoid", "probabilities"]
    z = (FLAT / np.linalg.norm(FLAT, axis=1, keepdims=True)).astype(np.float64) @ weights + bias
    minus_log_p = exported.get_layer("minus_log_sigmoid").output
    inner = keras.Model(exported.input, minus_log_p)
    np.testing.assert_allclose(np.asarray(inner(ROWS)), np.log1p(np.exp(-z)), atol=2e-5)
    assert exported.get_layer("probabilities").get_weights()[0].shape == (3, 3)
    assert not exported.get_layer("probabilities").use_bias


def test_a_fixed_layer_holds_float32_weights_and_no_bias_when_none():
    kernel = np.array([[1.0, -2.0], [0.5, 3.0]])
    import keras

    x = keras.Input((2,))
    biased = keras.Model(x, dense(x, kernel, np.array([0.25, -1.0]), "with_bias"))
    unbiased = keras.Model(x, dense(x, kernel, None, "without_bias", "softmax"))
    row = np.array([[2.0, 1.0]], np.float32)
    np.testing.assert_allclose(np.asarray(biased(row)), [[2.75, -2.0]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(unbiased(row)), softmax(np.array([[2.5, -1.0]])), atol=1e-6)
    layer = biased.get_layer("with_bias")
    assert layer.units == 2 and [w.dtype for w in layer.get_weights()] == [np.float32, np.float32]
    assert unbiased.get_layer("without_bias").get_config()["activation"] == "softmax"
    assert [w.shape for w in unbiased.get_layer("without_bias").get_weights()] == [(2, 2)]


def sigmoid_model(feature_shape=(2, 2, 3)):
    """A tiny untrained Keras head with one sigmoid output, as a two-class Keras head is built."""
    import keras

    inputs = keras.Input(feature_shape, name="features")
    x = keras.layers.Flatten()(inputs)
    out = keras.layers.Dense(1, activation="sigmoid", kernel_initializer=keras.initializers.RandomNormal(seed=1),
                             bias_initializer="ones")(x)
    return keras.Model(inputs, out)


def test_two_column_output_gives_one_minus_p_and_p():
    model = sigmoid_model()
    p = np.asarray(model(ROWS), np.float64)[:, 0]
    assert 0.01 < p.min() and p.max() < 0.99  # both columns carry information
    exported = two_column_output(model, (2, 2, 3), name="head_dense")
    got = np.asarray(exported(ROWS), np.float64)
    np.testing.assert_allclose(got, np.column_stack([1 - p, p]), atol=1e-6)
    assert exported.name == "head_dense"
    assert exported.input_shape == (None, 2, 2, 3)
    assert exported.inputs[0].name == "features"
    assert exported.layers[-1].name == "probabilities"
    both = exported.get_layer("probabilities")
    assert not both.trainable and both.trainable_weights == []
    assert both.get_config()["activation"] == "linear"
