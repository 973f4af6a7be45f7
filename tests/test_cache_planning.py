"""Extract's planning, without a backbone: which rows each shard holds (plan_shards), whether a shard on
disk can be kept (shard_is_intact), which rows other caches already hold (RowSource) and so which rows
need the backbone (pending_rows). Caches are written by the project's own shard writer from arrays."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from featcache import augment, cache
from featcache.dataset import Dataset, Sample
from featcache.extract import _shards_intact, pending_rows
from tests.conftest import flip_bits, synthetic_cache, write_cache


def sample(split: str, i: int, label: int = 0, tag: str = "") -> Sample:
    relpath = f"{split}/{'ab'[label]}/{i:04d}.png"
    return Sample(Path(relpath), relpath, label, split, hashlib.sha256(f"{tag}{relpath}".encode()).hexdigest())


def dataset(counts=(5, 3, 0), tag: str = "", root: Path = Path(".")) -> Dataset:
    samples = [sample(split, i, i % 2, tag) for split, n in zip(("train", "validation", "test"), counts, strict=True)
               for i in range(n)]
    return Dataset(root, "synthetic", ("a", "b"), samples)


def features_of(plan) -> np.ndarray:
    """Each row's features derived from its sha256, so a copied row can be told from a recomputed one."""
    return np.stack([np.frombuffer(bytes.fromhex(s.sha256)[:8], np.uint8).astype(np.float32) for s in plan.samples])


# --- plan_shards ---------------------------------------------------------------------------------------

def test_shards_hold_shard_size_rows_in_dataset_order_split_by_split():
    data = dataset((5, 3, 0))
    plans = cache.plan_shards(data, 2)
    assert [(p.split, p.index, p.name) for p in plans] == [
        ("train", 0, "train-00000.h5"), ("train", 1, "train-00001.h5"), ("train", 2, "train-00002.h5"),
        ("validation", 0, "validation-00000.h5"), ("validation", 1, "validation-00001.h5")]
    assert [list(p.samples) for p in plans] == [data.samples[0:2], data.samples[2:4], data.samples[4:5],
                                                data.samples[5:7], data.samples[7:8]]
    assert cache.plan_shards(data, 100) == [cache.ShardPlan("train", 0, tuple(data.samples[:5])),
                                            cache.ShardPlan("validation", 0, tuple(data.samples[5:]))]
    assert [len(p.samples) for p in cache.plan_shards(data, 1)] == [1] * 8


def test_every_training_image_is_followed_by_its_views_in_the_same_shard():
    data = dataset((5, 3, 0))
    plans = cache.plan_shards(data, 7, views=2, seed=3)  # 7 rows fit two whole images of three rows
    train = [p for p in plans if p.split == "train"]
    assert [len(p.samples) for p in train] == [6, 6, 3]
    first = train[0].samples
    assert [s.view for s in first] == [0, 1, 2, 0, 1, 2]
    assert first[1].sha256 == augment.view_identity(data.samples[0].sha256, 3, 1)
    assert first[1].source_sha256 == data.samples[0].sha256 and first[0].source_sha256 is None
    assert [len(p.samples) for p in plans if p.split == "validation"] == [3]  # no views outside train
    assert all(s.view == 0 for p in plans if p.split == "validation" for s in p.samples)
    assert [len(p.samples) for p in cache.plan_shards(data, 2, views=2) if p.split == "train"] == [3] * 5
    assert cache.plan_shards(data, 7, views=2)[0].samples[1].sha256 == augment.view_identity(
        data.samples[0].sha256, 0, 1)  # seed 0 by default


def test_a_plans_digest_is_its_rows_paths_and_hashes():
    plan = cache.plan_shards(dataset((3, 0, 0)), 8)[0]
    expected = hashlib.sha256(json.dumps([[s.relpath, s.sha256] for s in plan.samples]).encode()).hexdigest()
    assert plan.digest == expected
    changed = cache.ShardPlan("train", 0, (*plan.samples[:2], sample("train", 2, tag="new pixels")))
    assert changed.digest != plan.digest


# --- shard_is_intact -----------------------------------------------------------------------------------

@pytest.fixture
def written(tmp_path):
    """A small complete cache, its first training shard and that shard's plan."""
    c = synthetic_cache(tmp_path, per_class=(3, 1, 1), shard_size=4)
    plans = {p.name: p for p in cache.plan_shards(
        Dataset(tmp_path, "synthetic", ("a", "b"), _samples_of(c)), 4)}
    shard = c.path / "train-00000.h5"
    return c, shard, plans["train-00000.h5"]


def _samples_of(c) -> list[Sample]:
    samples = []
    for split in c.splits:
        for shard in c.shard_paths(split):
            with h5py.File(shard, "r") as f:
                for label, path, sha in zip(f["labels"][:], f["paths"][:], f["sha256"][:], strict=True):
                    relpath = path.decode()
                    samples.append(Sample(Path(relpath), relpath, int(label), split, sha.decode()))
    return samples


def test_a_whole_shard_of_this_key_and_plan_is_kept(written):
    c, shard, plan = written
    assert cache.shard_is_intact(shard, c.key, plan)
    assert cache.shard_is_intact(shard, c.key)
    assert not cache.shard_is_intact(shard, "0" * 64, plan)
    other = cache.ShardPlan(plan.split, plan.index, plan.samples[:-1])
    assert not cache.shard_is_intact(shard, c.key, other)


@pytest.mark.parametrize("damage", ["missing", "not hdf5", "flipped bits", "no labels", "short paths",
                                    "short views", "bad config"])
def test_a_damaged_or_incomplete_shard_is_not_kept(damage, written):
    c, shard, plan = written
    if damage == "missing":
        shard.unlink()
    elif damage == "not hdf5":
        shard.write_bytes(b"not an HDF5 file")
    elif damage == "flipped bits":
        flip_bits(shard)
    else:
        with h5py.File(shard, "r+") as f:
            if damage == "no labels":
                del f["labels"]
            elif damage == "short paths":
                paths = f["paths"][:-1]
                del f["paths"]
                f.create_dataset("paths", data=paths)
            elif damage == "short views":
                del f["views"]
                f.create_dataset("views", data=np.zeros(1, np.int32))
            else:
                f.attrs["config"] = "{not json"
    assert not cache.shard_is_intact(shard, c.key, plan)


def test_a_shard_without_the_optional_views_is_kept(written):
    c, shard, plan = written
    with h5py.File(shard, "r+") as f:
        del f["views"], f.attrs["rows_sha256"]  # shards before views existed had no rows checksum either
    assert cache.shard_is_intact(shard, c.key, plan)
    with h5py.File(shard, "r+") as f:
        del f.attrs["config"]  # what it tells (an also-layer) is absent: no also-layer, not a crash
    assert cache.shard_is_intact(shard, c.key, plan)


@pytest.fixture(scope="module")
def long_shard(tmp_path_factory):
    """One shard of 2,100 rows: 33 chunks of 64, read in blocks of 1,024 rows (three blocks)."""
    root = tmp_path_factory.mktemp("long")
    data = dataset((2100, 0, 0))
    c = write_cache(root, data, (2,), "float32", 0, lambda p: np.ones((len(p.samples), 2), np.float32), 4000)
    return c, (c.path / "train-00000.h5").read_bytes()


@pytest.mark.parametrize("chunk", [0, 15, 16, 31, 32], ids=lambda c: f"chunk{c}")
def test_every_chunk_of_a_long_shard_is_checked(chunk, long_shard, tmp_path):
    """A flipped bit in any block a shard is read in (at its first and last chunk, past 2,048 rows too) is caught."""
    c, clean = long_shard
    shard = tmp_path / "train-00000.h5"
    shard.write_bytes(clean)
    assert cache.shard_is_intact(shard, c.key)
    with h5py.File(shard, "r") as f:
        assert f["features"].id.get_num_chunks() == 33
        offset = f["features"].id.get_chunk_info(chunk).byte_offset
    raw = bytearray(clean)
    raw[offset] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert not cache.shard_is_intact(shard, c.key)


def test_an_also_layer_shard_needs_its_layer_rows_whole(tmp_path):
    data = dataset((3, 0, 0))
    plan = cache.plan_shards(data, 8)[0]
    config = {"also_layer": "block4_pool"}
    provenance = {"key": "k", "row_key": "r", "also_row_key": "r2", "config": config, "classes": ["a", "b"]}
    features = np.ones((3, 2), np.float32)
    shard = tmp_path / plan.name
    cache.write_shard(shard, plan, provenance, features, list(plan.samples), {}, also=np.ones((3, 4), np.float32))
    assert cache.shard_is_intact(shard, "k", plan)
    with h5py.File(shard, "r+") as f:
        del f[cache.also_dataset("block4_pool")]
        f.create_dataset(cache.also_dataset("block4_pool"), data=np.ones((2, 4), np.float32))
    assert not cache.shard_is_intact(shard, "k", plan)
    with h5py.File(shard, "r+") as f:
        del f[cache.also_dataset("block4_pool")]
    assert not cache.shard_is_intact(shard, "k", plan)


def test_an_also_layer_with_flipped_bits_is_not_kept(tmp_path):
    data = dataset((3, 0, 0))
    plan = cache.plan_shards(data, 8)[0]
    provenance = {"key": "k", "row_key": "r", "also_row_key": "r2", "config": {"also_layer": "mixed"},
                  "classes": ["a", "b"]}
    shard = tmp_path / plan.name
    also = cache.also_dataset("mixed")
    cache.write_shard(shard, plan, provenance, np.ones((3, 2), np.float32), list(plan.samples), {},
                      also=np.arange(3 * 64, dtype=np.float32).reshape(3, 64))
    flip_bits(shard, also)  # 128 bytes inside the layer's one chunk of 768: nothing else is touched
    with h5py.File(shard, "r") as f:
        assert f["features"][:].sum() == 6 and cache._rows_error(f, shard) is None
        with pytest.raises(OSError):
            f[also][:]
    assert not cache.shard_is_intact(shard, "k", plan)  # so the layer's own checksum is what refuses it


def test_a_cache_is_whole_only_while_every_shard_its_manifest_lists_is(written):
    c, shard, _ = written
    assert _shards_intact(c.path)
    other = c.path / "validation-00000.h5"
    other.write_bytes(other.read_bytes()[:100])
    assert not _shards_intact(c.path)


# --- RowSource and pending_rows ------------------------------------------------------------------------

def two_versions(workdir: Path):
    """Two caches of one config: v1 of 4 training images, v2 with two of them and two new ones."""
    v1 = dataset((4, 0, 0), root=workdir)
    new = [sample("train", i, tag="v2") for i in (10, 11)]
    v2 = Dataset(workdir, "synthetic", ("a", "b"), [*v1.samples[2:], *new])
    c1 = write_cache(workdir, v1, (8,), "float32", 0, features_of, 3)
    c2_key = cache.cache_key(cache.ExtractionConfig("synthetic", "seed0", None, "none", 32, "squash", "backbone",
                                                    "float32"), v2)
    return v1, v2, c1, workdir / c2_key[:16]


def test_rows_another_cache_of_the_same_config_holds_are_copied_not_computed(tmp_path):
    v1, v2, c1, c2_dir = two_versions(tmp_path)
    source = cache.RowSource(tmp_path, (c1.manifest["row_key"],), exclude=c2_dir)
    assert all(s.sha256 in source for s in v1.samples)
    plans = cache.plan_shards(v2, 3)
    assert pending_rows(plans, source) == v2.samples[2:]  # the two new images, in plan order
    shas = [s.sha256 for s in v2.samples[:2]]
    rows = source.read(shas)
    assert list(rows) == shas
    for s in v2.samples[:2]:
        (row,) = rows[s.sha256]
        np.testing.assert_array_equal(row, features_of(cache.ShardPlan("train", 0, (s,)))[0])


def test_rows_are_read_back_from_every_shard_in_the_order_asked(tmp_path):
    v1, _, c1, _ = two_versions(tmp_path)
    source = cache.RowSource(tmp_path, (c1.manifest["row_key"],))
    shas = [s.sha256 for s in reversed(v1.samples)]  # across two shards (3 + 1 rows), backwards
    rows = source.read(shas)
    assert list(rows) == shas
    expected = features_of(cache.ShardPlan("train", 0, tuple(reversed(v1.samples))))
    np.testing.assert_array_equal(np.stack([rows[s][0] for s in shas]), expected)
    assert all(len(parts) == 1 for parts in rows.values())


def test_no_rows_are_found_in_the_excluded_cache_another_config_or_a_broken_cache(tmp_path):
    v1, _, c1, _ = two_versions(tmp_path)
    row_key = c1.manifest["row_key"]
    assert not any(s.sha256 in cache.RowSource(tmp_path, (row_key,), exclude=c1.path) for s in v1.samples)
    assert not any(s.sha256 in cache.RowSource(tmp_path, ("another config",)) for s in v1.samples)
    assert not any(s.sha256 in cache.RowSource(tmp_path, (row_key, "another config")) for s in v1.samples)
    (c1.path / "train-00000.h5").write_bytes(b"broken")
    source = cache.RowSource(tmp_path, (row_key,))
    assert [s.sha256 in source for s in v1.samples] == [False, False, False, True]  # the second shard's row


def test_rows_are_found_past_caches_that_lend_none(tmp_path):
    """Caches scanned before the one holding the rows (in path order) that are excluded, unreadable or of
    another config are passed over, not the end of the scan."""
    v1, _, c1, _ = two_versions(tmp_path)
    row_key = c1.manifest["row_key"]
    for name, manifest in (("00-excluded", c1.manifest), ("01-unreadable", None),
                           ("02-other-config", {**c1.manifest, "row_key": "another config"})):
        (tmp_path / name).mkdir()
        for shard in c1.path.glob("*.h5"):
            (tmp_path / name / shard.name).write_bytes(shard.read_bytes())
        (tmp_path / name / cache.MANIFEST).write_text(json.dumps(manifest) if manifest else "{not json")
    source = cache.RowSource(tmp_path, (row_key,), exclude=tmp_path / "00-excluded")
    assert all(s.sha256 in source for s in v1.samples)
    assert {shard.parent for shard, _, _ in source.where[row_key].values()} == {c1.path}


def test_a_cache_without_a_manifest_lends_no_rows(tmp_path):
    v1, _, c1, _ = two_versions(tmp_path)
    (c1.path / cache.MANIFEST).unlink()
    assert not any(s.sha256 in cache.RowSource(tmp_path, (c1.manifest["row_key"],)) for s in v1.samples)


def test_the_first_cache_holding_a_row_is_where_it_is_read(tmp_path):
    v1, _, c1, _ = two_versions(tmp_path)
    source = cache.RowSource(tmp_path, (c1.manifest["row_key"],))
    first = v1.samples[0].sha256
    assert source.where[c1.manifest["row_key"]][first] == (c1.path / "train-00000.h5", 0, "features")


def test_only_keeps_the_rows_asked_with_absolute_shard_paths(tmp_path, monkeypatch):
    v1, _, c1, _ = two_versions(tmp_path)
    monkeypatch.chdir(tmp_path)
    source = cache.RowSource(Path("."), (c1.manifest["row_key"],))
    wanted = [v1.samples[1].sha256, v1.samples[3].sha256, "not held"]
    part = source.only(wanted)
    assert part.row_keys == source.row_keys
    (where,) = part.where.values()
    assert sorted(where) == sorted(wanted[:2])
    assert all(shard.is_absolute() for shard, _, _ in where.values())
    assert where[wanted[1]][1:] == (0, "features") and where[wanted[1]][0].name == "train-00001.h5"
    np.testing.assert_array_equal(part.read(wanted[:2])[wanted[0]][0], source.read(wanted[:1])[wanted[0]][0])
    assert wanted[0] in part and "not held" not in part


def test_a_prefix_stored_as_an_also_layer_is_found_by_its_row_key(tmp_path):
    """A row needs every part: features by one row key, the also-layer's by another."""
    data = dataset((2, 0, 0), root=tmp_path)
    plan = cache.plan_shards(data, 8)[0]
    folder = tmp_path / "c1"
    folder.mkdir()
    provenance = {"key": "k", "row_key": "main", "also_row_key": "prefix", "config": {"also_layer": "block4"},
                  "classes": ["a", "b"]}
    main, prefix = np.ones((2, 2), np.float32), np.arange(8, dtype=np.float32).reshape(2, 4)
    cache.write_shard(folder / plan.name, plan, provenance, main, list(plan.samples), {}, also=prefix)
    cache.write_manifest(folder, {"row_key": "main", "also_layer": {"row_key": "prefix"}})
    sha = data.samples[1].sha256
    only_prefix = cache.RowSource(tmp_path, ("prefix",))
    assert sha in only_prefix
    np.testing.assert_array_equal(only_prefix.read([sha])[sha][0], prefix[1])
    both = cache.RowSource(tmp_path, ("main", "prefix"))
    got = both.read([sha])[sha]
    assert len(got) == 2
    np.testing.assert_array_equal(got[0], main[1])
    np.testing.assert_array_equal(got[1], prefix[1])


@pytest.mark.parametrize("damage", ["features", "rows"])
def test_rows_in_a_damaged_shard_are_dropped_to_be_computed_and_the_shard_is_named(tmp_path, damage):
    """drop_damaged verifies only the shards the asked rows come from; a flipped bit in the features, or a
    label changed behind the rows checksum, drops every row of that shard and names it."""
    v1, _, c1, _ = two_versions(tmp_path)  # 4 training rows in shards of 3: train-00000 (3), train-00001 (1)
    first, second = sorted(c1.path.glob("train-*.h5"))
    if damage == "features":
        flip_bits(first)
    else:
        with h5py.File(first, "r+") as f:
            f["labels"][0] = 1 - f["labels"][0]
    source = cache.RowSource(tmp_path, (c1.manifest["row_key"],))
    shas = [s.sha256 for s in v1.samples]
    assert source.drop_damaged(shas[3:]) == []  # only the whole second shard was asked for
    assert source.drop_damaged(shas) == [first]
    assert [sha in source for sha in shas] == [False, False, False, True]
    assert source.drop_damaged(shas) == []  # forgotten: not verified again


def test_a_flipped_bit_in_an_also_layer_drops_its_shards_rows(tmp_path):
    data = dataset((2, 0, 0), root=tmp_path)
    plan = cache.plan_shards(data, 8)[0]
    (tmp_path / "c1").mkdir()
    shard = tmp_path / "c1" / plan.name
    provenance = {"key": "k", "row_key": "main", "also_row_key": "prefix", "config": {"also_layer": "block4"},
                  "classes": ["a", "b"]}
    cache.write_shard(shard, plan, provenance, np.ones((2, 2), np.float32), list(plan.samples), {},
                      also=np.zeros((2, 64), np.float32))
    cache.write_manifest(tmp_path / "c1", {"row_key": "main", "also_layer": {"row_key": "prefix"}})
    flip_bits(shard, "layers/block4")
    source = cache.RowSource(tmp_path, ("main", "prefix"))
    assert source.drop_damaged([s.sha256 for s in data.samples]) == [shard]
    assert not any(s.sha256 in source for s in data.samples)
