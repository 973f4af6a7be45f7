"""Online augmentation of cached pixels: the views each recipe may give, seeded, on training batches only."""

from __future__ import annotations

import numpy as np
import pytest

from featcache import FeatcacheError, online_augment
from featcache.finetune import Recipe, training_data
from featcache.heads import FitOptions
from featcache.views import VIEW_SETS, apply_view
from tests.conftest import synthetic_cache


def test_d4_gives_exactly_the_eight_symmetries_of_the_square():
    image = np.arange(6 * 6 * 3, dtype=np.float32).reshape(6, 6, 3)  # no symmetry of its own
    batch = np.repeat(image[None], 200, axis=0)
    out = online_augment.augment_batch(batch, online_augment.get("d4"), np.random.default_rng(0))
    drawn = {row.tobytes() for row in out}
    expected = {np.ascontiguousarray(apply_view(image, view)).tobytes() for view in VIEW_SETS["d4"]}
    assert drawn == expected and len(drawn) == 8


def test_paper_recipe_is_a_small_seeded_jitter_within_the_pixel_range():
    smooth = np.add.outer(np.linspace(0, 200, 24), np.linspace(0, 50, 24))  # a gradient: jitter moves it a little
    batch = np.repeat(np.stack([smooth] * 3, -1)[None].astype(np.float32), 16, axis=0)
    recipe = online_augment.get("paper")
    first = online_augment.augment_batch(batch, recipe, np.random.default_rng(7))
    again = online_augment.augment_batch(batch, recipe, np.random.default_rng(7))
    other = online_augment.augment_batch(batch, recipe, np.random.default_rng(8))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert first.shape == batch.shape and first.min() >= 0 and first.max() <= 255
    # each output is near one of the 8 symmetries of its input: +-3 degrees, 2% and 10% change little
    views = np.stack([apply_view(batch[0], view) for view in VIEW_SETS["d4"]])
    nearest = [np.abs(views - out).mean(axis=(1, 2, 3)).min() for out in first]
    assert max(nearest) < 0.15 * 255 and min(nearest) > 0  # never the plain view: brightness always moves


def test_unknown_recipe_is_a_one_line_error():
    with pytest.raises(FeatcacheError, match="choose one of none, d4, paper"):
        online_augment.get("flip")


def test_training_batches_are_augmented_reproducibly_and_validation_is_untouched(tmp_path):
    cache = synthetic_cache(tmp_path / "out", shape=(4, 4, 3), per_class=(6, 4, 4), shard_size=4)
    options = FitOptions(batch_size=4, seed=11)

    def epochs(seed):
        train, validation = training_data(cache, options.pinned(seed=seed), Recipe(augment_online="d4"),
                                          one_column=True)
        return ([np.concatenate([x for x, _ in train]) for _ in range(2)],
                np.concatenate([x for x, _ in validation]))

    (first, second), validation = epochs(11)
    (again, _), _ = epochs(11)
    np.testing.assert_array_equal(first, again)  # same seed, same views in the same order
    assert not np.array_equal(first, second)  # each epoch draws new views
    np.testing.assert_array_equal(validation, cache.read("validation")[0].astype(np.float32))
    stored = cache.read("train")[0].astype(np.float32)
    symmetries = {np.ascontiguousarray(apply_view(row, view)).tobytes() for row in stored for view in VIEW_SETS["d4"]}
    assert all(row.tobytes() in symmetries for row in first)  # every training row is a view of a stored row
    assert not all(row.tobytes() in {r.tobytes() for r in stored} for row in first)
