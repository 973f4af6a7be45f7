"""Heads as plain Keras layers, for exports that must load anywhere.

An exported end-to-end model is loaded with ``keras.saving.load_model(path, safe_mode=True)`` by
people who have neither featcache nor a reason to trust a custom layer, so it holds built-in Keras
layers only. A linear head fits that exactly: a standardisation (or one divisor) folds into the first Dense layer,
an L2 normalisation is ``UnitNormalization``, and each link is a Dense and an activation:
softmax(z); a sigmoid column as softmax([0, z]); one-vs-rest sigmoids normalised, σ(z_k) / Σ σ(z_j),
as softmax(log σ(z)) = softmax(-softplus(-z)); Platt's p = σ(-(a s + b)) per score column likewise
(two classes: softmax([0, -(a s + b)])).
"""

from __future__ import annotations

import numpy as np


def folded(scaling, x, weights: np.ndarray, bias: np.ndarray):
    """(x, kernel, bias) with the scaling folded into the Dense layer's weights where it is affine
    (standard, rms), else applied to ``x`` as a layer (l2)."""
    kernel, bias = np.asarray(weights, np.float64), np.asarray(bias, np.float64)
    if scaling.kind == "standard":
        kernel = kernel / scaling.scale[:, None].astype(np.float64)
        bias = bias - scaling.mean.astype(np.float64) @ kernel
    elif scaling.kind == "rms":
        kernel = kernel / float(scaling.scale[0])
    elif scaling.kind == "l2":
        x = scaling.keras_layer()(x)
    return x, kernel, bias


def linear_keras_model(model, feature_shape: tuple[int, ...], name: str = "head"):
    """A Keras model from cached features of ``feature_shape`` to the head's (N, k) probabilities."""
    import keras

    features = keras.Input(tuple(feature_shape), name="features")
    x = keras.layers.Flatten(name="flatten")(features) if len(feature_shape) > 1 else features
    x, kernel, bias = folded(model.scaling, x, model.weights, model.bias)
    if model.link == "platt":
        slope, offset = model.platt
        kernel, bias = kernel * slope, bias * slope + offset  # u = a s + b
        if kernel.shape[1] == 1:
            return keras.Model(features, _two_class(x, -kernel, -bias), name=name)
        return keras.Model(features, _normalised_sigmoids(x, -kernel, -bias), name=name)
    if kernel.shape[1] == 1:
        return keras.Model(features, _two_class(x, kernel, bias), name=name)
    if model.link == "ovr-sigmoid":
        return keras.Model(features, _normalised_sigmoids(x, kernel, bias), name=name)
    return keras.Model(features, dense(x, kernel, bias, "probabilities", "softmax"), name=name)


def _two_class(x, kernel, bias):
    """[1 - σ(z), σ(z)] == softmax([0, z]) for z = x @ kernel + bias."""
    kernel = np.hstack([np.zeros_like(kernel), kernel])
    return dense(x, kernel, np.concatenate([[0.0], bias]), "probabilities", "softmax")


def _normalised_sigmoids(x, kernel, bias):
    """σ(z_k) / Σ σ(z_j) == softmax(-softplus(-z)) for z = x @ kernel + bias."""
    import keras

    minus_scores = dense(x, -kernel, -bias, "minus_scores")
    minus_log_p = keras.layers.Activation("softplus", name="minus_log_sigmoid")(minus_scores)
    return dense(minus_log_p, -np.eye(kernel.shape[1]), None, "probabilities", "softmax")


def dense(x, kernel: np.ndarray, bias: np.ndarray | None, name: str, activation=None, trainable: bool = True):
    """A Dense layer holding fixed float32 weights (computed in float64), applied to x."""
    import keras

    layer = keras.layers.Dense(kernel.shape[1], activation=activation, use_bias=bias is not None, name=name,
                               trainable=trainable)
    layer.build((None, kernel.shape[0]))
    weights = [kernel] if bias is None else [kernel, bias]
    layer.set_weights([np.asarray(w, np.float32) for w in weights])
    return layer(x)


def two_column_output(model, feature_shape: tuple[int, ...], name: str):
    """A Keras head with one sigmoid output, given a second column: [1 - p, p]."""
    import keras

    features = keras.Input(tuple(feature_shape), name="features")
    p = model(features)
    both = keras.layers.Dense(2, name="probabilities", trainable=False)
    both.build((None, 1))
    both.set_weights([np.array([[-1.0, 1.0]], np.float32), np.array([1.0, 0.0], np.float32)])
    return keras.Model(features, both(p), name=name)


def value_keras_model(scaling, weights: np.ndarray, bias: np.ndarray, feature_shape: tuple[int, ...],
                      n_classes: int = 0, name: str = "head"):
    """A Keras model from cached features to a linear score: the (N, 1) value itself, or, for K ordered
    classes, their (N, K) soft-rounded probabilities (``ridge.soft_round``) in three Dense+ReLU layers:
    the score clipped to [0, K-1] as relu(s) - relu(s - K + 1), its distances above and below each class
    k as relu(c - k) and relu(k - c), and p_k = relu(1 - both)."""
    import keras

    features = keras.Input(tuple(feature_shape), name="features")
    x = keras.layers.Flatten(name="flatten")(features) if len(feature_shape) > 1 else features
    x, kernel, offset = folded(scaling, x, weights, bias)
    value = dense(x, kernel, offset, "value")
    if not n_classes:
        return keras.Model(features, value, name=name)
    top, ranks = n_classes - 1, np.arange(n_classes, dtype=np.float64)
    # fixed arithmetic, not weights to learn: frozen
    ends = dense(value, np.array([[1.0, 1.0]]), np.array([0.0, -top]), "clip", "relu", trainable=False)
    above = np.vstack([np.ones(n_classes), -np.ones(n_classes)])  # c - k from ends: ends[0] - ends[1] - k
    distances = dense(ends, np.hstack([above, -above]), np.concatenate([-ranks, ranks]), "distances", "relu",
                      trainable=False)
    both = np.vstack([-np.eye(n_classes), -np.eye(n_classes)])
    p = dense(distances, both, np.ones(n_classes), "probabilities", "relu", trainable=False)
    return keras.Model(features, p, name=name)
