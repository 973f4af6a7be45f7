"""The backbone registry: every entry resolves in keras.applications with its own preprocessing."""

from __future__ import annotations

import numpy as np
import pytest

from featcache import FeatcacheError, backbones


@pytest.mark.parametrize("name", backbones.names())
def test_every_entry_resolves_constructor_and_preprocess(name):
    entry = backbones.get(name)
    assert callable(entry.constructor_fn())
    assert callable(entry.preprocess_fn())


def test_each_backbone_uses_its_own_preprocessing():
    pixels = np.full((1, 2, 2, 3), 255.0, dtype="float32")
    vgg = np.asarray(backbones.get("vgg16").preprocess_fn()(pixels.copy()))
    mobilenet = np.asarray(backbones.get("mobilenet_v2_keras").preprocess_fn()(pixels.copy()))
    rescale = np.asarray(backbones.get("vgg16").preprocess_fn("rescale")(pixels.copy()))
    np.testing.assert_allclose(vgg[0, 0, 0], [255 - 103.939, 255 - 116.779, 255 - 123.68], rtol=1e-5)
    np.testing.assert_allclose(mobilenet, 1.0)
    np.testing.assert_allclose(rescale, 1.0)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(FeatcacheError, match="did you mean resnet50"):
        backbones.get("resnet5O")


def test_tutorial_defaults():
    vgg, mobilenet = backbones.get("vgg16"), backbones.get("mobilenet_v2")
    assert (vgg.input_size, vgg.default_layer, vgg.default_pooling) == (150, "block5_pool", "none")
    assert (mobilenet.input_size, mobilenet.default_pooling) == (160, "avg")


def test_weights_of_another_architecture_are_one_line_naming_the_file(tmp_path):
    """Keras' own refusal lists the mismatching kernels' values (over a hundred lines)."""
    import keras

    from featcache.backbones import build_extractor, get

    inputs = keras.Input((8,))
    other = keras.Model(inputs, keras.layers.Dense(3)(inputs))
    other.save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(FeatcacheError, match=r"--weights .*other\.weights\.h5: not weights of vgg16") as refusal:
        build_extractor(get("vgg16"), str(tmp_path / "other.weights.h5"), 32, None, "none")
    assert "\n" not in str(refusal.value)
