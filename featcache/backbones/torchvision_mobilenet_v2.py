"""MobileNetV2 laid out exactly as torchvision builds it, so torchvision's ImageNet weights load as-is.

keras.applications.MobileNetV2 differs from torchvision in three ways that change every output:
stride-2 convs pad only bottom/right ("same") where torchvision pads 1 pixel on every side,
BatchNormalization uses epsilon 1e-3 instead of 1e-5, and inputs are scaled to [-1, 1] instead of
normalised with the ImageNet mean and std. This builder fixes all three and otherwise keeps the
Keras layer names (``block_13_expand_relu``, ``out_relu``), so ``--layer`` and fine-tuning from a
layer index mean the same thing for both. The only extra layer is ``Conv1_pad`` before the stem.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from featcache import FeatcacheError
from featcache.backbones.converters import copy_torch_state

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
BN_EPSILON = 1e-5
STEM_FILTERS = 32
LAST_FILTERS = 1280
CLASSES = 1000

# The paper's Table 2: expansion t, output channels c, repeats n, stride s of the first repeat.
INVERTED_RESIDUAL_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def preprocess_input(x):
    """Float RGB pixels in [0, 255] (NHWC array or tensor) -> torchvision's ImageNet normalisation."""
    return (x / 255.0 - MEAN) / STD


def _blocks() -> list[tuple[str, int, int, int]]:
    """(Keras name prefix, expansion, output channels, stride) of the 17 inverted residual blocks."""
    rows = []
    for expansion, channels, repeats, first_stride in INVERTED_RESIDUAL_SETTINGS:
        for repeat in range(repeats):
            index = len(rows)
            prefix = "expanded_conv" if index == 0 else f"block_{index}"
            rows.append((prefix, expansion, channels, first_stride if repeat == 0 else 1))
    return rows


def build(include_top: bool = False, weights: str | None = None, input_shape=(224, 224, 3)) -> keras.Model:
    """The torchvision MobileNetV2 graph; ``weights`` is None (random init) or a Keras .weights.h5 file."""
    if weights is not None and not Path(weights).is_file():
        raise FeatcacheError(
            f"weights {weights!r}: expected a Keras .weights.h5 file "
            "(`featcache weights install mobilenet_v2` converts torchvision's ImageNet weights)"
        )
    inputs = keras.Input(shape=input_shape)
    x = layers.ZeroPadding2D(1, name="Conv1_pad")(inputs)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="valid", use_bias=False, name="Conv1")(x)
    x = _batch_norm(x, "bn_Conv1", "Conv1_relu")
    for prefix, expansion, channels, stride in _blocks():
        x = _inverted_residual(x, prefix, expansion, channels, stride)
    x = layers.Conv2D(LAST_FILTERS, 1, use_bias=False, name="Conv_1")(x)
    x = _batch_norm(x, "Conv_1_bn", "out_relu")
    if include_top:
        # torchvision's classifier is Dropout(0.2) + Linear: logits, no softmax.
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(CLASSES, name="predictions")(x)
    model = keras.Model(inputs, x, name="mobilenetv2_torchvision")
    if weights is not None:
        model.load_weights(weights)
    return model


def _batch_norm(x, name: str, relu_name: str | None = None):
    """Inference BN with torchvision's epsilon, then ReLU6 unless the conv is a linear bottleneck."""
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=name)(x)
    return layers.ReLU(6.0, name=relu_name)(x) if relu_name else x


def _inverted_residual(x, prefix: str, expansion: int, channels: int, stride: int):
    """Expand 1x1, depthwise 3x3, linear project 1x1; add the input back when the shapes match."""
    shortcut, in_channels = x, x.shape[-1]
    if expansion != 1:
        x = layers.Conv2D(in_channels * expansion, 1, use_bias=False, name=f"{prefix}_expand")(x)
        x = _batch_norm(x, f"{prefix}_expand_BN", f"{prefix}_expand_relu")
    if stride == 1:
        padding = "same"  # 3x3 at stride 1: "same" pads 1 on every side, as torchvision does
    else:
        # Keras's "same" would pad bottom/right only and shift every feature by half a pixel.
        x, padding = layers.ZeroPadding2D(1, name=f"{prefix}_pad")(x), "valid"
    x = layers.DepthwiseConv2D(3, stride, padding, use_bias=False, name=f"{prefix}_depthwise")(x)
    x = _batch_norm(x, f"{prefix}_depthwise_BN", f"{prefix}_depthwise_relu")
    x = layers.Conv2D(channels, 1, use_bias=False, name=f"{prefix}_project")(x)
    x = _batch_norm(x, f"{prefix}_project_BN")
    if stride == 1 and in_channels == channels:
        x = layers.Add(name=f"{prefix}_add")([shortcut, x])
    return x


def _torch_modules() -> list[tuple[str, str, str, str]]:
    """(Keras conv, Keras BN, torchvision conv module, torchvision BN module) for every conv, in order.

    torchvision numbers modules by position: ``features.{block + 1}.conv`` holds the expand pair
    (absent when t = 1), the depthwise pair, then the bare project conv and its BN.
    """
    rows = [("Conv1", "bn_Conv1", "features.0.0", "features.0.1")]
    for index, (prefix, expansion, _, _) in enumerate(_blocks()):
        module = f"features.{index + 1}.conv"
        steps = ["expand", "depthwise"] if expansion != 1 else ["depthwise"]
        rows += [(f"{prefix}_{step}", f"{prefix}_{step}_BN", f"{module}.{i}.0", f"{module}.{i}.1")
                 for i, step in enumerate(steps)]
        rows.append((f"{prefix}_project", f"{prefix}_project_BN",
                     f"{module}.{len(steps)}", f"{module}.{len(steps) + 1}"))
    rows.append(("Conv_1", "Conv_1_bn", "features.18.0", "features.18.1"))
    return rows


def load_torch_state(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Copy a torchvision MobileNetV2 state dict into a model from ``build``, checking every shape."""
    copy_torch_state(model, state, _torch_modules(), "classifier.1", "torchvision MobileNetV2")
