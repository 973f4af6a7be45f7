"""Augmented views: a reproducible recipe, stored as training rows with every guarantee of the cache."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from featcache import evaluate
from featcache import extract as extract_module
from featcache.augment import RECIPE, Transform, apply_transform, augmented_view, random_transform
from featcache.dataset import file_sha256
from featcache.heads import FitOptions, fit_head
from featcache.images import load_image
from tests.conftest import run_extract
from tests.test_extract import assert_same_cache, direct_features

SHA = "9f" * 32
OTHER_SHA = "3c" * 32
TRAIN_IMAGES = 12  # split_data: 6 per class and split


def noise(size=32, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_augmented_view_is_reproducible_and_differs_by_view_seed_and_source():
    image = noise()
    view = augmented_view(image, 0, SHA, 1)
    assert view.shape == image.shape and view.dtype == np.uint8
    np.testing.assert_array_equal(view, augmented_view(image.copy(), 0, SHA, 1))
    others = (image, augmented_view(image, 0, SHA, 2), augmented_view(image, 1, SHA, 1),
              augmented_view(image, 0, OTHER_SHA, 1))
    for other in others:
        assert (view != other).mean() > 0.5


def test_view_zero_is_the_original_and_never_drawn():
    with pytest.raises(ValueError, match="numbered from 1"):
        augmented_view(noise(), 0, SHA, 0)


def test_known_transforms_are_exact():
    image = noise()
    np.testing.assert_array_equal(apply_transform(image, Transform()), image)
    np.testing.assert_array_equal(apply_transform(image, Transform(flip=True)), image[:, ::-1])
    np.testing.assert_array_equal(apply_transform(image, Transform(theta=90)), np.rot90(image, -1))
    up = apply_transform(image, Transform(tx=3))  # content moves up 3 rows, the bottom row fills in
    np.testing.assert_array_equal(up[:-3], image[3:])
    np.testing.assert_array_equal(up[-3:], np.repeat(image[-1:], 3, axis=0))
    right = apply_transform(image, Transform(ty=-2))
    np.testing.assert_array_equal(right[:, 2:], image[:, :-2])
    ramp = np.broadcast_to((4 * np.arange(32))[:, None, None], (32, 32, 3)).astype(np.uint8)
    zoomed = apply_transform(ramp, Transform(zx=0.5))  # rows magnified 2x about row 15.5: 4r -> 2r + 31
    np.testing.assert_array_equal(zoomed[:, 0, 0], 2 * np.arange(32) + 31)
    assert (zoomed == zoomed[:, :1, :1]).all()


def test_drawn_transforms_span_the_tutorial_ranges():
    rng = np.random.default_rng(0)
    drawn = [random_transform(rng, 150, 150) for _ in range(2000)]
    theta, tx, ty, shear, zx, zy = (np.array([getattr(t, a) for t in drawn])
                                    for a in ("theta", "tx", "ty", "shear", "zx", "zy"))
    assert 38 < np.abs(theta).max() <= 40
    assert 28 < np.abs(tx).max() <= 30 and 28 < np.abs(ty).max() <= 30  # 20 % of 150 px
    assert 0.19 < np.abs(shear).max() <= 0.2
    assert 0.8 <= min(zx.min(), zy.min()) < 0.81 and 1.19 < max(zx.max(), zy.max()) <= 1.2
    assert 0.45 < np.mean([t.flip for t in drawn]) < 0.55


def expected_rows(data, paths, views, seed):
    """What each row must hold: the features of exactly that view of its source image."""
    images = []
    for relpath, view in zip(paths, views, strict=True):
        image = load_image(data / relpath, 32)
        images.append(augmented_view(image, seed, file_sha256(data / relpath), view) if view else image)
    return direct_features(np.stack(images))


def test_extract_adds_k_views_of_every_training_image_only(split_data, tmp_path):
    result = run_extract(split_data, tmp_path / "out", augment=2, seed=7)
    c = result.cache
    features, labels, paths = c.read("train")
    views = c.views("train")
    assert c.manifest["splits"]["train"]["rows"] == len(paths) == 3 * TRAIN_IMAGES
    assert c.manifest["splits"]["train"]["images"] == TRAIN_IMAGES
    assert views.tolist() == [0, 1, 2] * TRAIN_IMAGES
    assert paths[0::3] == paths[1::3] == paths[2::3] and len(set(paths)) == TRAIN_IMAGES
    assert (labels[0::3] == labels[1::3]).all() and (labels[0::3] == labels[2::3]).all()
    for split in ("validation", "test"):
        assert c.manifest["splits"][split]["rows"] == len(c.read(split)[2]) == 6
        assert not c.views(split).any()
    assert (c.config["augment"], c.config["seed"], c.manifest["augmentation"]) == (2, 7, RECIPE)
    np.testing.assert_allclose(features, expected_rows(split_data, paths, views, 7), rtol=1e-4, atol=1e-4)
    assert not np.allclose(features[1::3], features[0::3]) and not np.allclose(features[2::3], features[1::3])


def test_original_rows_equal_a_plain_extraction(split_data, tmp_path):
    plain = run_extract(split_data, tmp_path / "plain")
    augmented = run_extract(split_data, tmp_path / "augmented", augment=2)
    assert augmented.cache.key != plain.cache.key and augmented.computed == 3 * TRAIN_IMAGES + 12
    features, _, paths = augmented.cache.read("train")
    originals = augmented.cache.views("train") == 0
    plain_features, _, plain_paths = plain.cache.read("train")
    assert [p for p, keep in zip(paths, originals, strict=True) if keep] == plain_paths
    np.testing.assert_allclose(features[originals], plain_features, rtol=1e-5, atol=1e-5)
    for split in ("validation", "test"):
        np.testing.assert_allclose(augmented.cache.read(split)[0], plain.cache.read(split)[0],
                                   rtol=1e-5, atol=1e-5)


def test_rows_are_reused_by_source_bytes_view_and_seed(split_data, tmp_path):
    out = tmp_path / "out"
    run_extract(split_data, out)
    two = run_extract(split_data, out, augment=2)
    assert (two.computed, two.reused) == (2 * TRAIN_IMAGES, TRAIN_IMAGES + 12)  # only the views are new
    three = run_extract(split_data, out, augment=3)
    assert (three.computed, three.reused) == (TRAIN_IMAGES, 3 * TRAIN_IMAGES + 12)  # only view 3 is new
    reseeded = run_extract(split_data, out, augment=2, seed=1)
    assert len({two.cache.key, three.cache.key, reseeded.cache.key}) == 3
    assert (reseeded.computed, reseeded.reused) == (2 * TRAIN_IMAGES, TRAIN_IMAGES + 12)
    rows = {name: (r.cache.read("train")[0], r.cache.views("train")) for name, r in
            (("two", two), ("three", three), ("reseeded", reseeded))}
    np.testing.assert_array_equal(rows["three"][0][rows["three"][1] < 3], rows["two"][0])
    same_seed, other_seed = rows["two"][0], rows["reseeded"][0]
    originals = rows["two"][1] == 0
    np.testing.assert_array_equal(other_seed[originals], same_seed[originals])
    assert not np.allclose(other_seed[~originals], same_seed[~originals])


def test_rerun_with_views_does_no_backbone_work(split_data, tmp_path, monkeypatch):
    first = run_extract(split_data, tmp_path / "out", augment=2)
    monkeypatch.setattr(extract_module, "extraction_model", lambda *a: pytest.fail("backbone built"))
    second = run_extract(split_data, tmp_path / "out", augment=2)
    assert second.cache.key == first.cache.key and second.computed == 0


def test_missing_shard_with_views_is_rebuilt_alone(split_data, tmp_path):
    reference = run_extract(split_data, tmp_path / "ref", augment=2, shard_size=6)
    first = run_extract(split_data, tmp_path / "out", augment=2, shard_size=6)
    shards = list(first.cache.path.glob("*.h5"))
    train = first.cache.shard_paths("train")
    assert len(train) == TRAIN_IMAGES // 2  # 6 rows: two images and their views per shard
    train[2].unlink()
    rebuilt = run_extract(split_data, tmp_path / "out", augment=2, shard_size=6)
    assert (rebuilt.computed, rebuilt.shards_kept) == (6, len(shards) - 1)
    assert_same_cache(reference.cache, rebuilt.cache)


def test_rejected_training_image_has_no_views_and_is_reported_once(split_data, tmp_path):
    (split_data / "train" / "cat" / "broken.jpg").write_text("not an image")
    result = run_extract(split_data, tmp_path / "out", augment=2)
    assert [r for r in result.cache.manifest["rejects"] if r["relpath"] == "train/cat/broken.jpg"] == [
        {"relpath": "train/cat/broken.jpg", "split": "train", "reason": "not an image (unrecognised format)"}
    ]
    _, _, paths = result.cache.read("train")
    assert "train/cat/broken.jpg" not in paths and len(paths) == 3 * TRAIN_IMAGES
    assert result.computed == 3 * TRAIN_IMAGES + 12


def test_cross_validation_keeps_views_with_their_source_image(split_data, tmp_path, monkeypatch):
    c = run_extract(split_data, tmp_path / "out", augment=2).cache
    x, _, paths = c.read("train")
    views = c.views("train")
    rows = zip(x.reshape(len(x), -1), paths, views, strict=True)
    row_of = {row.tobytes(): (p, int(v)) for row, p, v in rows}
    assert len(row_of) == len(x)
    folds = []

    class Recorder:
        """Stands in for the fold's head and records which rows each fold fits and scores."""

        def fit(self, features, labels, **_):
            folds.append({"train": [row_of[r.tobytes()] for r in features]})
            return self

        def predict(self, features):
            folds[-1]["held_out"] = [row_of[r.tobytes()] for r in features]
            return np.zeros(len(features), int)

    head = fit_head(c, "logreg")
    monkeypatch.setattr(type(head), "for_fold", lambda self: Recorder())
    assert len(evaluate.cross_validate(head, c, folds=3)) == len(folds) == 3
    for fold in folds:
        trained_on = {p for p, _ in fold["train"]}
        assert not trained_on & {p for p, _ in fold["held_out"]}
        assert len(fold["train"]) == 3 * len(trained_on)  # every training image comes with its views
        assert all(v == 0 for _, v in fold["held_out"])
    assert sorted(p for fold in folds for p, _ in fold["held_out"]) == sorted(set(paths))


@pytest.mark.parametrize("budget", [None, 200_000], ids=["in-memory", "streamed"])
def test_keras_heads_train_on_every_view(budget, split_data, tmp_path, monkeypatch):
    """Each epoch feeds the model every training row, the augmented views included, in memory and
    streamed: the rows that reach keras' fit are counted, and each one is an original image or a view
    (as often as the epoch's passes: a split of fewer than 20 batches is repeated to 20 steps or more)."""
    from collections import Counter

    import keras

    from featcache.heads.keras_heads import MIN_STEPS_PER_EPOCH

    c = run_extract(split_data, tmp_path / "out", augment=2).cache
    assert c.rows("train") == 3 * TRAIN_IMAGES
    x, _, _ = c.read("train")
    known = {row.tobytes() for row in x.astype(np.float32)}
    seen = []
    fit = keras.Model.fit

    def counting_fit(self, data, *args, **kwargs):
        seen.extend(row.tobytes() for features, _ in data for row in np.asarray(features, np.float32))
        return fit(self, data, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", counting_fit)
    head = fit_head(c, "linear", FitOptions(epochs=1, batch_size=8), memory_budget=budget)
    assert head.record["epochs_run"] == 1
    assert head.record["memory"]["path"] == ("streamed" if budget else "in-memory")
    passes = -(-MIN_STEPS_PER_EPOCH // -(-c.rows("train") // 8))
    assert passes > 1 and set(seen) == known
    assert len(seen) == passes * c.rows("train") and set(Counter(seen).values()) == {passes}


def test_caches_written_before_views_existed_still_read_and_stay_complete(split_data, tmp_path, monkeypatch):
    first = run_extract(split_data, tmp_path / "out")
    for shard in first.cache.path.glob("*.h5"):
        with h5py.File(shard, "a") as f:
            del f["views"], f.attrs["rows_sha256"]  # shards before views existed had no rows checksum either
    assert len(first.cache.read("train")[2]) == len(first.cache.views("train")) == TRAIN_IMAGES
    assert not first.cache.views("train").any()
    monkeypatch.setattr(extract_module, "extraction_model", lambda *a: pytest.fail("backbone built"))
    assert run_extract(split_data, tmp_path / "out").computed == 0


def test_extract_command_augment_option_multiplies_training_rows(split_data, tmp_path):
    from click.testing import CliRunner

    from featcache.cli import main

    args = ["extract", "--data", str(split_data), "--workdir", str(tmp_path / "out"), "--weights", "none",
            "--image-size", "32", "--augment", "2", "--seed", "7"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(next((tmp_path / "out").glob("*/manifest.json")).read_text())
    assert manifest["config"]["augment"] == 2 and manifest["config"]["seed"] == 7
    assert manifest["splits"]["train"]["rows"] == 3 * manifest["splits"]["train"]["images"]
    assert manifest["splits"]["test"]["rows"] == manifest["splits"]["test"]["images"]
