"""extract --also-layer: a second layer from the same backbone pass, which finetune's prefix copies."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from featcache import FeatcacheError, cache
from featcache.cli import main
from featcache.finetune import finetune
from featcache.heads import FitOptions, fit_head, head_dir
from tests.conftest import flip_bits, make_split_folders, run_extract

QUICK = FitOptions(epochs=1, batch_size=4, learning_rate=1e-3, optimizer="adam")
ALSO = "layers/block4_pool"


def also_rows(store: cache.Cache, split: str) -> np.ndarray:
    parts = []
    for shard in store.shard_paths(split):
        with h5py.File(shard, "r") as f:
            parts.append(f[ALSO][:])
    return np.concatenate(parts)


def test_also_layer_rows_equal_a_cache_cut_there_and_the_features_are_unchanged(tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 4, "validation": 2, "test": 2})
    both = run_extract(data, tmp_path / "both", augment=1, also_layer="block4_pool").cache
    plain = run_extract(data, tmp_path / "plain", augment=1).cache
    cut = run_extract(data, tmp_path / "cut", augment=1, layer="block4_pool", pooling="none").cache

    also = both.manifest["also_layer"]
    assert also == {"name": "block4_pool", "dataset": ALSO, "shape": [2, 2, 512],
                    "row_key": cut.manifest["row_key"]}
    assert both.key != plain.key and both.manifest["row_key"] == plain.manifest["row_key"]
    for field in ("output_layer", "feature_shape", "backbone_params"):
        assert both.manifest[field] == plain.manifest[field]
    for split in ("train", "validation", "test"):
        features, labels, paths = both.read(split)
        plain_features, plain_labels, plain_paths = plain.read(split)
        assert paths == plain_paths and (labels == plain_labels).all()
        np.testing.assert_allclose(features, plain_features, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(also_rows(both, split), cut.read(split)[0], rtol=1e-5, atol=1e-5)
    assert len(also_rows(both, "train")) == 16  # the augmented views have their rows too
    info = CliRunner().invoke(main, ["info", "--workdir", str(tmp_path / "both")])
    assert info.exit_code == 0 and "also-layer shape" in info.output and "(2, 2, 512)" in info.output


def test_finetune_copies_its_prefix_from_the_also_layer_without_a_backbone_pass(tmp_path, monkeypatch):
    data = make_split_folders(tmp_path / "data", counts={"train": 3, "validation": 2, "test": 2})
    workdir = tmp_path / "out"
    head_cache = run_extract(data, workdir, augment=1, also_layer="block4_pool").cache
    fit_head(head_cache, "dense256", QUICK).save(head_dir(head_cache, "dense256"))
    separate = run_extract(data, tmp_path / "separate", augment=1, layer="block4_pool", pooling="none").cache

    def no_backbone(*args):
        raise AssertionError("the backbone ran for a prefix the also-layer holds")

    monkeypatch.setattr("featcache.extract.extraction_model", no_backbone)
    said = []
    head, prefix = finetune(head_cache, "dense256", "block5_conv1", workdir, options=QUICK, say=said.append,
                            show_progress=False)
    rows = sum(prefix.manifest["splits"][s]["rows"] for s in prefix.splits)
    assert rows == 20  # 2 classes; training images doubled by their views
    assert prefix.manifest["rows_computed"] == 0 and prefix.manifest["rows_reused"] == rows
    assert f"prefix cache {prefix.key[:16]}: 0 rows through the backbone, 20 copied" in said
    assert prefix.key == separate.key  # the very cache a backbone pass would have made
    for split in prefix.splits:
        np.testing.assert_array_equal(prefix.read(split)[0], separate.read(split)[0])
        np.testing.assert_array_equal(prefix.views(split), separate.views(split))
    assert head.record["finetune"]["prefix_layer"] == "block4_pool" and head.record["epochs_run"] == 1


def test_an_also_layer_that_is_not_the_prefix_is_said_and_the_backbone_runs(tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 3, "validation": 2, "test": 2})
    head_cache = run_extract(data, tmp_path / "out", also_layer="block3_pool").cache
    fit_head(head_cache, "dense256", QUICK).save(head_dir(head_cache, "dense256"))
    said = []
    _, prefix = finetune(head_cache, "dense256", "block5_conv1", tmp_path / "out", options=QUICK,
                         say=said.append, show_progress=False)
    assert any("stores block3_pool, not block4_pool" in line and "--also-layer block4_pool" in line
               for line in said)
    assert prefix.manifest["rows_computed"] == 14


@pytest.mark.parametrize("args, message", [
    (["--layer", "block4_pool", "--also-layer", "block5_conv1"], "at or below the cached layer"),
    (["--also-layer", "block9_pool"], "--also-layer 'block9_pool': not a layer of vgg16"),
    (["--layer", "block4_pool", "--also-layer", "block4_pool"], "is the cached layer itself"),
    (["--pooling", "avg", "--also-layer", "block4_pool", "--average-views", "flips"],
     "cannot train through --average-views"),
])
def test_an_unusable_also_layer_is_a_one_line_error_and_writes_nothing(args, message, tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 2, "validation": 1, "test": 1})
    result = CliRunner().invoke(main, ["extract", "--data", str(data), "--weights", "none",
                                       "--image-size", "32", "--workdir", str(tmp_path / "out"), *args])
    assert result.exit_code == 1 and "Traceback" not in result.output
    error = result.stderr.strip().splitlines()[-1]  # the whole error, on the last line of stderr
    assert error.startswith("Error: --") and message in error and len(error) < 300
    assert result.stderr.count("Error") == 1 and not list(tmp_path.glob("out/*/*.h5"))


def _flip_also_bits(shard):
    flip_bits(shard, ALSO)


def _delete_also(shard):
    with h5py.File(shard, "a") as f:
        del f[ALSO]


@pytest.mark.parametrize("corrupt", [_flip_also_bits, _delete_also])
def test_a_damaged_also_layer_fails_the_shard_check_and_extract_rebuilds_it(corrupt, tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 4, "validation": 2, "test": 2})
    first = run_extract(data, tmp_path / "out", also_layer="block4_pool")
    shard = first.cache.shard_paths("train")[0]
    expected = also_rows(first.cache, "train")
    corrupt(shard)
    assert not cache.shard_is_intact(shard, first.cache.key)
    rebuilt = run_extract(data, tmp_path / "out", also_layer="block4_pool")
    assert rebuilt.computed == 4 and cache.shard_is_intact(shard, first.cache.key)
    np.testing.assert_array_equal(also_rows(rebuilt.cache, "train"), expected)


def test_caches_without_an_also_layer_keep_their_keys(tmp_path):
    config = cache.ExtractionConfig("vgg16", "w", None, "avg", 150, "squash", "backbone", "float16")
    assert "also_layer" not in config.identity()
    also = config.__class__(**{**config.__dict__, "also_layer": "block4_pool"})
    assert also.row_key() == config.row_key() and also.identity() != config.identity()
    assert also.also_row_key() == config.at_layer("block4_pool").row_key() != config.row_key()
    with pytest.raises(FeatcacheError):
        run_extract(make_split_folders(tmp_path / "d"), tmp_path / "o", layer="block3_pool", also_layer="fc1")
