"""--average-views: features averaged over turned and mirrored copies, in extraction, predict and export."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import FeatcacheError, cache
from featcache.cli import main
from featcache.dataset import Dataset, Sample
from featcache.extract import make_config
from featcache.finetune import finetune
from featcache.heads import FitOptions, fit_head, head_dir, load_head
from featcache.images import load_image
from featcache.model import export, feature_model
from featcache.predict import Predictor
from featcache.views import VIEW_SETS, apply_view
from tests.conftest import make_split_folders
from tests.test_extract import direct_features

QUICK = FitOptions(epochs=2, batch_size=4, learning_rate=1e-3, optimizer="adam")


def test_view_sets_are_the_symmetries_of_the_square():
    image = np.arange(3 * 3 * 2).reshape(3, 3, 2)
    turned_and_mirrored = [np.rot90(m, k) for m in (image, image[:, ::-1]) for k in range(4)]
    mirrored = [image, image[::-1], image[:, ::-1], image[::-1, ::-1]]
    for name, expected in (("d4", turned_and_mirrored), ("flips", mirrored), ("none", [image])):
        views = [apply_view(image, v) for v in VIEW_SETS[name]]
        assert len({v.tobytes() for v in views}) == len(views) == len(expected)
        assert {v.tobytes() for v in views} == {e.tobytes() for e in expected}


def averaged_reference(images: np.ndarray, name: str) -> np.ndarray:
    """The mean of an independently built base's features over NumPy's views of the images."""
    return np.mean([direct_features(apply_view(images, v), pooling="avg") for v in VIEW_SETS[name]], 0)


def config_with(average_views: str, pooling: str = "avg"):
    return make_config("vgg16", "none", pooling=pooling, image_size=32, dtype="float32",
                       average_views=average_views)[0]


@pytest.mark.parametrize("name", ["flips", "d4"])
def test_feature_model_averages_the_views_and_ignores_their_orientation(name):
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    model = feature_model(config_with(name), None)
    averaged = model.predict(images, verbose=0)
    reference = averaged_reference(images, name)
    np.testing.assert_allclose(averaged, reference, rtol=1e-4, atol=1e-4)
    plain = feature_model(config_with("none"), None).predict(images, verbose=0)
    assert not np.allclose(averaged, plain, atol=1e-3)
    for view in VIEW_SETS[name]:  # every view of the image has the features of the image
        np.testing.assert_allclose(model.predict(apply_view(images, view), verbose=0), averaged,
                                   rtol=1e-4, atol=1e-4)
    if name == "flips":  # a quarter turn is not among its views
        turned = model.predict(np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2))), verbose=0)
        assert not np.allclose(turned, averaged, atol=1e-3)


def test_keys_of_caches_made_before_average_views_are_unchanged():
    """The field left at its default stays out of the key: existing caches keep being found."""
    samples = [Sample(Path("train/a/1.png"), "train/a/1.png", 0, "train", "ab" * 32),
               Sample(Path("test/b/2.png"), "test/b/2.png", 1, "test", "cd" * 32)]
    dataset = Dataset(Path("/nowhere"), "synthetic", ("a", "b"), samples)
    config = cache.ExtractionConfig("vgg16", "w" * 64, "block5_pool", "avg", 150, "squash", "backbone",
                                    "float16")
    key = cache.cache_key(config, dataset)
    assert key == "623845331982fe27a51a81b3deeed7a78482a63a3c00a6058ad08c4644eb9c59"  # as computed before
    assert config.row_key() == "61fdc438d58944b8ac683fa94ce43a93f8c902bfa22a22ac571613b2b092d7c9"
    d4 = cache.ExtractionConfig(**{**config.__dict__, "average_views": "d4"})
    assert cache.cache_key(d4, dataset) != key and d4.row_key() != config.row_key()


@pytest.fixture(scope="module")
def d4_cache(tmp_path_factory):
    """A d4-averaged VGG16 cache of the cat/dog images, made through the CLI, with logreg fitted."""
    root = tmp_path_factory.mktemp("views")
    data = make_split_folders(root / "data", counts={"train": 6, "validation": 3, "test": 3})
    result = CliRunner().invoke(main, [
        "extract", "--data", str(data), "--weights", "none", "--image-size", "32", "--pooling", "avg",
        "--dtype", "float32", "--average-views", "d4", "--workdir", str(root / "out"),
    ])
    assert result.exit_code == 0, result.output
    assert "averaged over d4 views" in result.output
    [entry] = cache.list_caches(root / "out")
    store = cache.open_cache(root / "out", entry["key"])
    fit_head(store, "logreg", QUICK).save(head_dir(store, "logreg"))
    return data, store


def test_extract_stores_the_view_averaged_features_of_every_split(d4_cache):
    data, store = d4_cache
    assert store.config["average_views"] == "d4"
    for split in ("train", "validation", "test"):
        features, _, paths = store.read(split)
        images = np.stack([load_image(data / p, 32) for p in paths]).astype(np.float32)
        expected = averaged_reference(images, "d4")
        np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_predict_and_export_average_the_views_as_extraction_did(d4_cache, tmp_path):
    data, store = d4_cache
    head = load_head(head_dir(store, "logreg"))
    x, _, paths = store.read("test")
    expected = head.predict_proba(x)
    files = [str(data / p) for p in paths]
    predicted = Predictor(store, head).predict(files, batch_size=2, show_progress=False)
    np.testing.assert_allclose(predicted.probabilities, expected, atol=1e-5)

    export(store, head, tmp_path / "model.keras")
    assert json.loads((tmp_path / "model.json").read_text())["average_views"] == "d4"
    turned = np.stack([np.rot90(load_image(f, 32)) for f in files]).astype(np.float32)
    np.save(tmp_path / "turned.npy", turned)
    script = textwrap.dedent(f"""
        import sys, numpy as np, keras
        model = keras.saving.load_model({str(tmp_path / "model.keras")!r}, safe_mode=True)
        assert "featcache" not in sys.modules
        turned = np.load({str(tmp_path / "turned.npy")!r})
        np.save({str(tmp_path / "out.npy")!r}, model.predict(turned, verbose=0))
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-4)  # turned, same answer


def test_unpooled_features_and_unknown_view_sets_are_refused_in_one_line():
    with pytest.raises(FeatcacheError, match="--pooling avg") as unpooled:
        config_with("d4", pooling="none")
    with pytest.raises(FeatcacheError, match="choose one of none, flips, d4") as unknown:
        config_with("rot45")
    assert [len(str(error.value).splitlines()) for error in (unpooled, unknown)] == [1, 1]


def test_finetune_refuses_a_view_averaged_cache(d4_cache, tmp_path):
    _, store = d4_cache
    fit_head(store, "linear", QUICK).save(head_dir(store, "linear"))
    with pytest.raises(FeatcacheError, match="averages d4 views"):
        finetune(store, "linear", "block5_conv1", tmp_path)
