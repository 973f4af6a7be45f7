"""The write side of the cache, without a backbone: the keys caches and rows are found by (pinned, so a
change that would orphan every user's caches fails here), what a shard holds and says of itself, the
manifest's checks, and the labels and per-split summaries as stored."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache import FeatcacheError, __version__, augment, cache
from featcache.dataset import Dataset, Sample

CONFIG = cache.ExtractionConfig(backbone="vgg16", weights="sha256:abc", layer=None, pooling="none", image_size=32,
                                resize="bilinear", preprocess="caffe", dtype="float16")


def sample(split: str, i: int, label=0, view: int = 0) -> Sample:
    relpath = f"{split}/{i:04d}.png"
    return Sample(Path(relpath), relpath, label, split, hashlib.sha256(relpath.encode()).hexdigest(), view)


def dataset(task: str = "classification", classes=("a", "b")) -> Dataset:
    samples = [sample("train", 0, 0), sample("train", 1, 1), sample("validation", 2, 1)]
    return Dataset(Path("."), "synthetic", classes, samples, task=task)


def sha256_json(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --- keys ----------------------------------------------------------------------------------------------

def test_row_and_cache_keys_are_pinned_so_existing_caches_keep_their_keys():
    """sha256 of the sorted JSON of the identity: these values are what every cache on disk was found by."""
    assert CONFIG.row_key() == sha256_json(CONFIG.identity())
    assert CONFIG.row_key() == "fe520547939b24cb77bcb97dd8f655b6ebe2013b659fad40530a2a539cef1426"
    assert cache.cache_key(CONFIG, dataset()) == "e7fbc7f2ddf32d193b5fd8a4db3fdd09aaddae72937b5be8a84cd140670da1ff"
    numbers = dataset(task="regression", classes=())  # a target that is not classes is part of the key
    assert cache.cache_key(CONFIG, numbers) == "3f35c090c73c3ed462ac9aca2d216d27561ac61837ab5ba18274ed22f202d1c9"


def test_identity_leaves_out_options_at_their_later_added_defaults_only():
    fields = dataclasses.asdict(CONFIG)
    assert CONFIG.identity() == {k: v for k, v in fields.items() if k not in ("average_views", "also_layer")}
    viewed = dataclasses.replace(CONFIG, average_views="d4", also_layer="block4_pool")
    assert viewed.identity() == {**fields, "average_views": "d4", "also_layer": "block4_pool"}


@pytest.mark.parametrize("field, value", [("backbone", "mobilenet_v2"), ("weights", "sha256:def"), ("layer", "block4"),
                                          ("pooling", "avg"), ("image_size", 64), ("resize", "nearest"),
                                          ("preprocess", "tf"), ("dtype", "float32"),
                                          ("precision", "mixed_bfloat16"), ("average_views", "d4")])
def test_what_changes_a_rows_features_changes_the_row_key_and_the_cache_key(field, value):
    changed = dataclasses.replace(CONFIG, **{field: value})
    assert changed.row_key() != CONFIG.row_key()
    assert cache.cache_key(changed, dataset()) != cache.cache_key(CONFIG, dataset())


def test_views_seed_and_an_also_layer_keep_the_row_key_but_change_the_cache_key():
    """An original row does not depend on them (views carry their own identities), so their rows are shared."""
    for changed in (dataclasses.replace(CONFIG, augment=2), dataclasses.replace(CONFIG, seed=7),
                    dataclasses.replace(CONFIG, also_layer="block4_pool")):
        assert changed.row_key() == CONFIG.row_key()
        assert cache.cache_key(changed, dataset()) != cache.cache_key(CONFIG, dataset())


def test_the_cache_key_covers_classes_samples_and_a_target_that_is_not_classes():
    key = cache.cache_key(CONFIG, dataset())
    assert cache.cache_key(CONFIG, dataset(classes=("b", "a"))) != key
    relabelled = dataset()
    relabelled.samples[0] = dataclasses.replace(relabelled.samples[0], label=1)
    assert cache.cache_key(CONFIG, relabelled) != key
    moved = dataset()
    moved.samples[2] = dataclasses.replace(moved.samples[2], split="test")
    assert cache.cache_key(CONFIG, moved) != key
    reordered = dataset()
    reordered.samples.reverse()
    assert cache.cache_key(CONFIG, reordered) == key  # the samples' order on disk is not data
    assert cache.cache_key(CONFIG, dataset(task="regression")) != key
    payload = {"config": CONFIG.identity(), "classes": ["a", "b"],
               "samples": sorted((s.relpath, s.label, s.split, s.sha256) for s in dataset().samples)}
    assert key == sha256_json(payload)
    augmented = dataclasses.replace(CONFIG, augment=1)
    payload.update(config=augmented.identity(), augmentation=augment.RECIPE)
    assert cache.cache_key(augmented, dataset()) == sha256_json(payload)


def test_a_layers_config_is_its_unpooled_output_and_the_pixel_layer_is_the_exact_images():
    at = dataclasses.replace(CONFIG, pooling="avg", also_layer="block4_pool", augment=2, seed=3).at_layer("block4_pool")
    assert (at.layer, at.pooling, at.also_layer, at.augment, at.seed, at.dtype) == ("block4_pool", "none", None, 2, 3,
                                                                                    "float16")
    pixels = dataclasses.replace(CONFIG, pooling="avg", precision="mixed_bfloat16", augment=2, seed=3,
                                 average_views="d4", also_layer="block4_pool").at_layer(cache.PIXELS)
    assert pixels == dataclasses.replace(CONFIG, layer=cache.PIXELS, pooling="none", dtype="uint8",
                                         precision="float32")
    also = dataclasses.replace(CONFIG, also_layer="block4_pool")
    assert also.also_row_key() == CONFIG.at_layer("block4_pool").row_key() != CONFIG.row_key()
    assert CONFIG.also_row_key() is None


# --- shards --------------------------------------------------------------------------------------------

def provenance(task=None, also=None, classes=("a", "b")) -> dict:
    config = dataclasses.asdict(dataclasses.replace(CONFIG, also_layer=also))
    return {"key": "k" * 64, "row_key": CONFIG.row_key(), "config": config, "classes": list(classes),
            **({"task": task} if task else {}), **({"also_row_key": "r" * 64} if also else {})}


def test_a_shard_holds_its_rows_checksums_and_provenance(tmp_path):
    rows = [sample("train", i, i % 2, view=i % 3) for i in range(70)]  # more rows than one chunk
    features = np.arange(70 * 6, dtype=np.float16).reshape(70, 2, 3)
    also = np.ones((70, 4), np.float16)
    plan = cache.ShardPlan("train", 3, tuple(rows))
    path = tmp_path / plan.name
    cache.write_shard(path, plan, provenance(also="block4_pool"), features, rows, {"x.png": "not an image"}, also)
    with h5py.File(path, "r") as f:
        assert np.array_equal(f["features"][:], features) and f["features"].fletcher32
        assert f["features"].chunks == (cache.CHUNK_ROWS, 2, 3)
        assert np.array_equal(f["layers/block4_pool"][:], also) and f["layers/block4_pool"].chunks == (64, 4)
        assert f["labels"].dtype == np.int32 and list(f["labels"][:]) == [i % 2 for i in range(70)]
        assert [p.decode() for p in f["paths"][:]] == [s.relpath for s in rows]
        assert f["sha256"].dtype == "S64" and f["sha256"][5].decode() == rows[5].sha256
        assert f["views"].dtype == np.int32 and list(f["views"][:4]) == [0, 1, 2, 0]
        attrs = dict(f.attrs)
        assert attrs["rows_sha256"] == cache.rows_digest(f)
    assert attrs["also_row_key"] == "r" * 64 and attrs["cache_key"] == "k" * 64
    assert attrs["row_key"] == CONFIG.row_key() and json.loads(attrs["config"])["also_layer"] == "block4_pool"
    assert json.loads(attrs["classes"]) == ["a", "b"] and attrs["split"] == "train" and attrs["shard_index"] == 3
    assert attrs["plan_digest"] == plan.digest and json.loads(attrs["rejects"]) == {"x.png": "not an image"}
    assert attrs["featcache_version"] == __version__
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", attrs["created"])
    assert cache.shard_is_intact(path, "k" * 64, plan, ["a", "b"])
    assert [p.name for p in tmp_path.iterdir()] == [plan.name]  # no temporary left beside it


def test_a_shard_without_an_also_layer_has_no_layers_and_no_also_key(tmp_path):
    rows = [sample("train", i) for i in range(3)]
    plan = cache.ShardPlan("train", 0, tuple(rows))
    cache.write_shard(tmp_path / plan.name, plan, provenance(), np.zeros((3, 2), np.float16), rows, {})
    with h5py.File(tmp_path / plan.name, "r") as f:
        assert "layers" not in f and "also_row_key" not in f.attrs and f["features"].chunks == (3, 2)


def test_an_empty_shard_is_written_unchunked_and_reads_as_no_rows(tmp_path):
    plan = cache.ShardPlan("test", 0, ())
    cache.write_shard(tmp_path / plan.name, plan, provenance(), np.zeros((0, 2), np.float16), [], {})
    with h5py.File(tmp_path / plan.name, "r") as f:
        assert f["features"].shape == (0, 2) and f["features"].chunks is None and not f["features"].fletcher32
        assert len(f["paths"]) == 0 and f.attrs["rows_sha256"] == cache.rows_digest(f)


@pytest.mark.parametrize("task, labels, stored", [
    ("regression", [0.5, 2.25], np.array([0.5, 2.25], np.float32)),
    ("multilabel", [(0, 2), ()], np.array([[1, 0, 1], [0, 0, 0]], np.int32)),
    (None, [2, 0], np.array([2, 0], np.int32)),
])
def test_labels_are_stored_as_their_target_needs(tmp_path, task, labels, stored):
    rows = [sample("train", i, label) for i, label in enumerate(labels)]
    plan = cache.ShardPlan("train", 0, tuple(rows))
    cache.write_shard(tmp_path / plan.name, plan, provenance(task, classes=("a", "b", "c")),
                      np.zeros((2, 2), np.float16), rows, {})
    with h5py.File(tmp_path / plan.name, "r") as f:
        assert f["labels"].dtype == stored.dtype and np.array_equal(f["labels"][:], stored)
    assert np.array_equal(cache.label_array(labels, task, 3), stored)


def test_the_rows_digest_covers_labels_paths_hashes_and_views_and_is_pinned(tmp_path):
    def digest(**arrays):
        with h5py.File(tmp_path / "d.h5", "w") as f:
            for name, data in {"labels": np.array([1, 0], np.int32), "sha256": np.array([b"a" * 64, b"b" * 64]),
                               "views": np.array([0, 1], np.int32), "paths": ["x.png", "y.png"], **arrays}.items():
                if data is not None:
                    f.create_dataset(name, data=data, dtype=h5py.string_dtype() if name == "paths" else None)
            return cache.rows_digest(f)

    base = digest()
    expected = hashlib.sha256()
    for part in (np.array([1, 0], np.int32), np.array([b"a" * 64, b"b" * 64]), np.array([0, 1], np.int32)):
        expected.update(part.tobytes())
    expected.update(b"x.png\0y.png")
    assert base == expected.hexdigest()
    assert digest(labels=np.array([0, 0], np.int32)) != base and digest(paths=["x.png", "z.png"]) != base
    assert digest(sha256=np.array([b"a" * 64, b"c" * 64])) != base and digest(views=np.array([0, 2], np.int32)) != base
    assert digest(views=None) != base  # shards written before views existed: the digest of what they hold


# --- the manifest --------------------------------------------------------------------------------------

def manifest(**changes) -> dict:
    return {"format": cache.FORMAT, "key": "k", "classes": ["a"], "config": dataclasses.asdict(CONFIG),
            "splits": {"train": {"shards": ["train-00000.h5"]}}, "feature_shape": [2], "dataset": {}, **changes}


def test_a_manifest_round_trips_and_a_missing_or_torn_one_reads_as_none(tmp_path):
    cache.write_manifest(tmp_path, manifest())
    assert cache.read_manifest(tmp_path) == manifest()
    assert (tmp_path / cache.MANIFEST).read_text() == json.dumps(manifest(), indent=2)  # for people to read
    assert [p.name for p in tmp_path.iterdir()] == [cache.MANIFEST]
    assert cache.read_manifest(tmp_path / "elsewhere") is None
    (tmp_path / cache.MANIFEST).write_text('{"format": 1, "key"')
    assert cache.read_manifest(tmp_path) is None
    cache.check_manifest(manifest(), tmp_path)  # a whole one passes


@pytest.mark.parametrize("changes, message", [
    ({"format": 2}, "cache format 2, not 1 (written by another featcache version)"),
    ({"format": None}, "cache format None, not 1"),
    ({"key": 5}, "not a valid manifest (key missing or of the wrong type)"),
    ({"classes": "a"}, "not a valid manifest (classes missing or of the wrong type)"),
    ({"config": None, "feature_shape": (2,)}, "(config, feature_shape missing or of the wrong type)"),
    ({"dataset": []}, "(dataset missing or of the wrong type)"),
    ({"splits": []}, "(splits missing or of the wrong type)"),
    ({"splits": {"train": {"shards": "x"}}}, "not a valid manifest (splits missing or of the wrong type)"),
    ({"splits": {"train": []}}, "not a valid manifest (splits missing"),
    ({"config": {"backbone": "vgg16"}}, "the manifest's config is not an extraction config ("),
])
def test_a_manifest_of_another_format_or_missing_what_readers_use_is_one_line_naming_the_file(changes, message):
    with pytest.raises(FeatcacheError) as caught:
        cache.check_manifest(manifest(**changes), Path("/w/abc/manifest.json"))
    text = str(caught.value)
    assert text.startswith("/w/abc/manifest.json: ") and message in text and "\n" not in text
    assert text.endswith("; run the same `featcache extract` again to rebuild the cache")


# --- per-split summaries -------------------------------------------------------------------------------

def test_a_split_summary_counts_rows_source_images_and_each_class():
    rows = [sample("train", 0, 0), sample("train", 0, 0, view=1), sample("train", 1, 2), sample("train", 2, (0, 2))]
    assert cache.split_summary(rows, ["a", "b", "c"]) == {"rows": 4, "images": 3,
                                                          "class_counts": {"a": 3, "b": 0, "c": 2}}
    numbers = [sample("train", 0, 1.5), sample("train", 1, 3.0), sample("train", 2, -1.5, view=1)]
    assert cache.split_summary(numbers, []) == {"rows": 3, "images": 2,
                                                "values": {"min": -1.5, "mean": 1.0, "max": 3.0}}


# --- the workdir ---------------------------------------------------------------------------------------

def test_the_workdir_is_featcache_home_or_featcache_out(monkeypatch):
    monkeypatch.delenv("FEATCACHE_HOME", raising=False)
    assert cache.default_workdir() == Path("featcache-out")
    monkeypatch.setenv("FEATCACHE_HOME", "/data/fc")
    assert cache.default_workdir() == Path("/data/fc")


def test_the_current_cache_is_one_line_naming_its_key_written_whole(tmp_path):
    cache.set_current(str(tmp_path), "abc123")
    assert (tmp_path / cache.CURRENT).read_text() == "abc123\n"
    assert [p.name for p in tmp_path.iterdir()] == [cache.CURRENT]


def test_only_a_killed_runs_temporaries_are_removed(tmp_path):
    for name in ("train-00000.h5.tmp-123", ".manifest.json.tmp-9", "train-00000.h5", "manifest.json", "tmp-notes"):
        (tmp_path / name).write_text("x")
    cache.remove_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "tmp-notes", "train-00000.h5"]


def test_paths_beyond_ascii_are_stored_and_read_back_as_written(tmp_path):
    paths = ("train/café/ñ.png", "a.png")
    rows = [Sample(Path(p), p, 0, "train", hashlib.sha256(p.encode()).hexdigest()) for p in paths]
    plan = cache.ShardPlan("train", 0, tuple(rows))
    cache.write_shard(tmp_path / plan.name, plan, provenance(), np.zeros((2, 2), np.float16), rows, {})
    with h5py.File(tmp_path / plan.name, "r") as f:
        assert [p.decode() for p in f["paths"][:]] == ["train/café/ñ.png", "a.png"]
