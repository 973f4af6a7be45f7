"""Reading a cache: which cache a workdir opens, and the rows every reader gives, in one order.

Written straight from synthetic features (no backbone), so they run in the mutation-testing selection.
"""

import json
import re

import numpy as np
import pytest

from featcache import FeatcacheError
from featcache.cache import CURRENT, Cache, list_caches, open_cache, set_current, write_manifest
from tests.conftest import synthetic_cache, value_cache


def restamp(cache: Cache, **fields) -> Cache:
    """The cache with manifest fields changed (completion time, status) as an extract run would leave them."""
    write_manifest(cache.path, {**cache.manifest, **fields})
    return Cache(cache.path) if fields.get("status", "complete") == "complete" else cache


@pytest.fixture
def two_caches(tmp_path):
    """Two complete caches in one workdir, the second completed later."""
    older = restamp(synthetic_cache(tmp_path, seed=0, per_class=(2, 1, 1)), completed="2026-01-02T10:00:00")
    newer = restamp(synthetic_cache(tmp_path, seed=1, per_class=(2, 1, 1)), completed="2026-01-03T09:00:00")
    return tmp_path, older, newer


def test_caches_are_listed_oldest_first_by_completion_then_creation(two_caches):
    workdir, older, newer = two_caches
    assert [m["key"] for m in list_caches(str(workdir))] == [older.key, newer.key]
    # an interrupted cache has no completion time: its creation time places it
    restamp(older, status="interrupted", completed=None, created="2026-01-04T00:00:00")
    assert [m["key"] for m in list_caches(workdir)] == [newer.key, older.key]
    (workdir / "not-a-cache").mkdir()  # a folder without a manifest is not listed
    assert len(list_caches(workdir)) == 2
    undated = synthetic_cache(workdir, seed=2, per_class=(2, 1, 1))  # neither time recorded: listed first
    write_manifest(undated.path, {k: v for k, v in undated.manifest.items() if k not in ("created", "completed")})
    assert [m["key"] for m in list_caches(workdir)] == [undated.key, newer.key, older.key]


def test_open_cache_takes_the_newest_complete_cache_when_none_is_current(two_caches):
    workdir, _, newer = two_caches
    assert not (workdir / CURRENT).exists()
    assert open_cache(str(workdir)).path == newer.path


def test_open_cache_takes_the_current_cache_while_it_is_complete(two_caches):
    workdir, older, newer = two_caches
    set_current(workdir, older.key)
    assert (workdir / CURRENT).read_text() == older.key + "\n"  # the full key; 16 characters name the folder
    assert open_cache(workdir).path == older.path
    restamp(older, status="interrupted")  # current, but no longer complete: the newest complete instead
    assert open_cache(workdir).path == newer.path
    (workdir / CURRENT).write_text("0" * 64)  # a current cache that is gone
    assert open_cache(workdir).path == newer.path


def test_a_key_prefix_names_one_cache_and_a_bad_one_says_how_to_list_them(two_caches):
    workdir, older, newer = two_caches
    set_current(workdir, newer.key)
    assert open_cache(workdir, older.key[:6]).path == older.path  # a key wins over the current cache
    assert open_cache(workdir, older.key).path == older.path
    with pytest.raises(FeatcacheError) as none:
        open_cache(workdir, "xyz")
    assert str(none.value) == f"--cache xyz: no cache in {workdir} match; `featcache info --all` lists them"
    with pytest.raises(FeatcacheError) as both:
        open_cache(workdir, "")
    assert str(both.value) == f"--cache : 2 caches in {workdir} match; `featcache info --all` lists them"


def test_no_complete_cache_is_one_line_saying_what_to_run(two_caches, tmp_path):
    workdir, older, newer = two_caches
    for cache in (older, newer):
        restamp(cache, status="interrupted")
    with pytest.raises(FeatcacheError) as interrupted:
        open_cache(workdir)
    assert str(interrupted.value) == (
        f"no complete cache in {workdir} (only interrupted ones: run the same `featcache extract` again to "
        "finish); run `featcache extract` first")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FeatcacheError) as nothing:
        open_cache(empty)
    assert str(nothing.value) == f"no complete cache in {empty}; run `featcache extract` first"


def test_a_folder_without_a_manifest_or_with_an_interrupted_one_is_refused(two_caches):
    workdir, older, _ = two_caches
    with pytest.raises(FeatcacheError, match=re.escape(f"{workdir} is not a featcache cache (no manifest.json)")):
        Cache(workdir)
    restamp(older, status="interrupted")
    with pytest.raises(FeatcacheError, match="incomplete .* run the same `featcache extract` again"):
        Cache(older.path)
    write_manifest(older.path, {**older.manifest, "status": "complete", "format": 0})
    with pytest.raises(FeatcacheError) as foreign:
        Cache(older.path)
    assert str(foreign.value).startswith(f"{older.path / 'manifest.json'}: cache format 0, not 1")


@pytest.fixture
def viewed(tmp_path):
    """Three classes in shards of 4 rows; every training image followed by one augmented view."""
    return synthetic_cache(tmp_path, classes=("a", "b", "c"), per_class=(3, 2, 2), shard_size=4, views=1)


def test_every_reader_gives_the_rows_of_read_in_the_same_order(viewed):
    x, y, paths = viewed.read("train")
    assert x.shape == (18, 2, 2, 8) and x.dtype == np.float32 and y.dtype == np.int32
    assert y.tolist() == [0] * 6 + [1] * 6 + [2] * 6 and len(viewed.shard_paths("train")) == 5
    assert paths[:2] == ["train/a/0000.png"] * 2  # the image, then its view
    assert viewed.rows("train") == 18 and viewed.rows("test") == 6
    labels, indexed, views = viewed.row_index("train")
    np.testing.assert_array_equal(labels, y)
    assert indexed == paths and views.tolist() == [0, 1] * 9
    assert viewed.views("validation").tolist() == [0] * 6  # views are of training images only
    flat, flat_y, flat_paths = viewed.to_numpy("train")
    assert flat.shape == (18, 32) and flat.dtype == np.float32
    np.testing.assert_array_equal(flat, x.reshape(18, -1))
    np.testing.assert_array_equal(flat_y, y)
    assert flat_paths == paths
    maps, _, _ = viewed.to_numpy("train", flatten=False)
    np.testing.assert_array_equal(maps, x)


def test_shards_written_before_augmented_views_existed_read_as_originals(viewed):
    import h5py

    for shard in viewed.shard_paths("validation"):
        with h5py.File(shard, "a") as f:  # as written then: no views, and no checksum of the rows
            del f["views"]
            del f.attrs["rows_sha256"]
    views = viewed.views("validation")
    assert views.tolist() == [0] * 6 and views.dtype == np.int32


def test_batches_stop_at_each_shards_end_and_hold_at_most_batch_size_rows(viewed):
    batches = list(viewed.iter_batches("train", batch_size=3))
    assert [len(b[0]) for b in batches] == [3, 1, 3, 1, 3, 1, 3, 1, 2]  # shards of 4, 4, 4, 4, 2 rows
    x, y, paths = viewed.read("train")
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    assert [p for b in batches for p in b[2]] == paths and all(isinstance(p, str) for p in paths)


def test_an_unknown_split_names_the_splits_there_are(viewed):
    for read in (viewed.read, viewed.rows, viewed.to_numpy, viewed.views):
        with pytest.raises(FeatcacheError) as refusal:
            read("holdout")
        assert str(refusal.value) == (f"cache {viewed.key[:16]} has no 'holdout' split; it has train, "
                                      "validation, test")


def test_an_empty_split_reads_as_no_rows_of_the_stored_shape_and_dtype(viewed):
    manifest = json.loads((viewed.path / "manifest.json").read_text())
    manifest["splits"]["test"].update(shards=[], rows=0)
    write_manifest(viewed.path, manifest)
    emptied = Cache(viewed.path)
    x, y, paths = emptied.read("test")
    assert x.shape == (0, 2, 2, 8) and x.dtype == np.float32 and y.shape == (0,) and y.dtype == np.int32
    assert paths == [] and emptied.views("test").shape == (0,) and emptied.views("test").dtype == np.int32
    flat, labels, _ = emptied.to_numpy("test")
    assert flat.shape == (0, 32) and labels.shape == (0,)


def test_to_pandas_has_a_column_per_feature_then_the_label_its_class_and_the_path(viewed):
    frame = viewed.to_pandas("validation")
    x, y, paths = viewed.to_numpy("validation")
    assert list(frame.columns) == [f"f{i}" for i in range(32)] + ["label", "class", "path"]
    np.testing.assert_array_equal(frame[[f"f{i}" for i in range(32)]].to_numpy(), x)
    assert frame["label"].tolist() == y.tolist() == [0, 0, 1, 1, 2, 2]
    assert frame["class"].tolist() == ["a", "a", "b", "b", "c", "c"] and frame["path"].tolist() == paths


def test_to_pandas_of_numbers_has_their_value(tmp_path):
    cache, _ = value_cache(tmp_path, rows=(4, 3, 2))
    frame = cache.to_pandas("validation")
    _, values, paths = cache.to_numpy("validation")
    assert list(frame.columns)[-2:] == ["value", "path"] and "label" not in frame
    np.testing.assert_allclose(frame["value"].to_numpy(), values)
    assert frame["path"].tolist() == paths


def test_to_tf_dataset_streams_the_rows_of_to_numpy_in_batches_shuffled_by_its_seed(viewed):
    x, y, _ = viewed.to_numpy("train")
    batches = list(viewed.to_tf_dataset("train", batch_size=5).as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [5, 5, 5, 3] and batches[0][0].dtype == np.float32
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    maps = np.concatenate([b[0] for b in viewed.to_tf_dataset("train", 4, flatten=False).as_numpy_iterator()])
    np.testing.assert_array_equal(maps, viewed.read("train")[0])

    def shuffled(seed):
        return np.concatenate([b[1] for b in viewed.to_tf_dataset("train", 18, True, seed=seed).as_numpy_iterator()])

    assert sorted(shuffled(0).tolist()) == sorted(y.tolist()) and not np.array_equal(shuffled(0), y)
    np.testing.assert_array_equal(shuffled(0), shuffled(0))
    assert not np.array_equal(shuffled(0), shuffled(1))
    unseeded = viewed.to_tf_dataset("train", 18, shuffle=True)  # seed 0 unless given
    np.testing.assert_array_equal(np.concatenate([b[1] for b in unseeded.as_numpy_iterator()]), shuffled(0))
    assert [len(b[1]) for b in viewed.to_tf_dataset("train", 1).as_numpy_iterator()] == [1] * 18


def test_to_tf_dataset_batches_32_rows_unless_told(tmp_path):
    many = synthetic_cache(tmp_path, per_class=(20, 2, 2), shard_size=64)
    assert [len(b[1]) for b in many.to_tf_dataset("train").as_numpy_iterator()] == [32, 8]


@pytest.mark.parametrize("batch_size", [0, True, 2.5, "8"])
def test_to_tf_dataset_refuses_a_batch_size_that_is_not_a_whole_number_of_rows(viewed, batch_size):
    with pytest.raises(FeatcacheError, match=re.escape(f"batch_size {batch_size!r}: give a whole number of rows, "
                                                       "1 or more")):
        viewed.to_tf_dataset("train", batch_size=batch_size)
    with pytest.raises(FeatcacheError, match="has no 'holdout' split; it has train, validation, test"):
        viewed.to_tf_dataset("holdout")
