"""The extract stage and the shard store: exact features, alignment, reuse, resume, locking."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import h5py
import keras
import numpy as np
import pytest

from featcache import FeatcacheError, cache
from featcache import extract as extract_module
from featcache.backbones import build_extractor, get
from featcache.dataset import file_sha256
from featcache.images import load_image
from featcache.model import conv_base
from tests.conftest import run_extract, write_image


def direct_predict(paths, size=32, weights=None, layer="block5_pool", pooling="none", seed=0):
    """The reference: build the same base independently and predict the preprocessed images."""
    return direct_features(np.stack([load_image(p, size) for p in paths]), weights, layer, pooling, seed)


def direct_features(images, weights=None, layer="block5_pool", pooling="none", seed=0):
    """Features of already decoded (N, size, size, 3) uint8 images, from an independently built base."""
    keras.utils.set_random_seed(seed)
    model = build_extractor(get("vgg16"), weights, images.shape[1], layer, pooling)
    return model.predict(keras.applications.vgg16.preprocess_input(images.astype("float32")), verbose=0)


def test_features_equal_direct_predict_and_rows_stay_aligned(split_data, tmp_path):
    result = run_extract(split_data, tmp_path / "out")
    for split in ("train", "validation", "test"):
        features, labels, paths = result.cache.read(split)
        assert len(paths) == len(set(paths)) == len(labels) == len(features)
        assert [result.cache.classes[y] for y in labels] == [p.split("/")[1] for p in paths]
        expected = direct_predict([split_data / p for p in paths])
        np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_float16_storage_and_pooling(class_data, tmp_path):
    result = run_extract(class_data, tmp_path / "out", dtype="float16", pooling="avg")
    features, _, paths = result.cache.read("train")
    assert features.dtype == np.float16 and features.shape[1:] == (512,)
    expected = direct_predict([class_data / p for p in paths], pooling="avg")
    np.testing.assert_allclose(features.astype("float32"), expected, rtol=2e-3, atol=2e-3)


def test_rerun_on_unchanged_dataset_does_no_backbone_work(class_data, tmp_path, monkeypatch):
    first = run_extract(class_data, tmp_path / "out")
    monkeypatch.setattr(extract_module, "extraction_model", lambda *a: pytest.fail("backbone built"))
    second = run_extract(class_data, tmp_path / "out")
    assert second.cache.key == first.cache.key and second.computed == 0


def test_changed_image_bytes_change_key_and_cost_one_image(class_data, tmp_path):
    first = run_extract(class_data, tmp_path / "out")
    write_image(class_data / "cat" / "cat_003.png", (10, 250, 10), seed=99)
    second = run_extract(class_data, tmp_path / "out")
    assert second.cache.key != first.cache.key
    total = sum(s["rows"] for s in first.cache.manifest["splits"].values())
    assert (second.computed, second.reused) == (1, total - 1)
    split = next(s for s in second.cache.splits if any("cat_003" in p for p in second.cache.read(s)[2]))
    features, _, paths = second.cache.read(split)
    expected = direct_predict([class_data / p for p in paths])
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_changed_weights_change_the_key(class_data, tmp_path):
    keras.utils.set_random_seed(7)
    weights_file = tmp_path / "other.weights.h5"
    get("vgg16").build(None, 32).save_weights(weights_file)
    a = run_extract(class_data, tmp_path / "out")
    b = run_extract(class_data, tmp_path / "out", weights_spec=str(weights_file))
    assert a.cache.key != b.cache.key and b.computed == a.computed
    features, _, paths = b.cache.read("train")
    expected = direct_predict([class_data / p for p in paths], weights=str(weights_file))
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("augment", [0, 2])
def test_interrupted_run_resumes_at_first_missing_shard(augment, split_data, tmp_path, monkeypatch):
    reference = run_extract(split_data, tmp_path / "ref", augment=augment)
    real_write, written = cache.write_shard, []

    def write_two_then_die(path, *args, **kwargs):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.name)
        real_write(path, *args, **kwargs)

    monkeypatch.setattr(cache, "write_shard", write_two_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_extract(split_data, tmp_path / "out", augment=augment)
    monkeypatch.setattr(cache, "write_shard", real_write)
    with pytest.raises(FeatcacheError, match="only interrupted ones"):
        cache.open_cache(tmp_path / "out")
    resumed = run_extract(split_data, tmp_path / "out", augment=augment)
    assert resumed.shards_kept == 2
    assert_same_cache(reference.cache, resumed.cache)
    assert (resumed.cache.views("train") == reference.cache.views("train")).all()


def test_sigkilled_run_resumes_to_identical_cache(split_data, tmp_path):
    reference = run_extract(split_data, tmp_path / "ref")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "featcache.cli", "extract", "--data", str(split_data), "--workdir",
               str(out), "--weights", "none", "--image-size", "32", "--dtype", "float32",
               "--shard-size", "2", "--batch-size", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache_dir = out / reference.cache.key[:16]
    deadline = time.monotonic() + 120
    while not list(cache_dir.glob("*.h5")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cache.read_manifest(cache_dir) or {}).get("status") != "complete", "killed too late"
    resumed = run_extract(split_data, out, shard_size=2)
    assert resumed.shards_kept >= 1 and not list(cache_dir.glob("*.tmp-*"))
    assert_same_cache(reference.cache, resumed.cache)


def assert_same_cache(a: cache.Cache, b: cache.Cache):
    assert a.key == b.key and a.splits == b.splits
    for split in a.splits:
        fa, la, pa = a.read(split)
        fb, lb, pb = b.read(split)
        assert pa == pb and (la == lb).all()
        np.testing.assert_allclose(fa, fb, rtol=1e-5, atol=1e-5)


def test_concurrent_run_on_same_key_fails_clearly(class_data, tmp_path):
    first = run_extract(class_data, tmp_path / "out")
    (first.cache.path / cache.MANIFEST).unlink()  # force the second run to need the lock
    with cache.locked(first.cache.path):
        with pytest.raises(FeatcacheError, match="being written by another featcache run .pid"):
            run_extract(class_data, tmp_path / "out")


def test_a_waiting_run_waits_for_the_lock_then_finishes(class_data, tmp_path, monkeypatch, capsys):
    first = run_extract(class_data, tmp_path / "out")
    (first.cache.path / cache.MANIFEST).unlink()
    held, events = threading.Event(), []

    def hold_lock_briefly():
        with cache.locked(first.cache.path):
            held.set()
            time.sleep(0.5)
            events.append("holder releases")

    real_write_manifest = cache.write_manifest

    def write_manifest(*args, **kwargs):
        events.append("waiting run writes the manifest")
        return real_write_manifest(*args, **kwargs)

    monkeypatch.setattr(cache, "write_manifest", write_manifest)
    holder = threading.Thread(target=hold_lock_briefly)
    holder.start()
    held.wait()
    started = time.monotonic()
    assert run_extract(class_data, tmp_path / "out", lock_timeout=5).cache.key == first.cache.key
    waited = time.monotonic() - started
    holder.join()
    assert events[:2] == ["holder releases", "waiting run writes the manifest"], events
    assert 0.3 < waited < 5, waited  # the rest of the holder's 0.5 s, not the whole --lock-timeout
    assert "waiting up to 5 s for featcache run" in capsys.readouterr().err


def test_corrupt_shard_is_named_by_readers_and_rebuilt_alone(class_data, tmp_path):
    result = run_extract(class_data, tmp_path / "out")
    shard = result.cache.shard_paths("train")[1]
    with h5py.File(shard, "r") as f:
        rows = len(f["labels"])
    shard.write_bytes(shard.read_bytes()[:300])
    with pytest.raises(FeatcacheError, match=f"shard {shard} is missing or corrupt"):
        result.cache.read("train")
    rebuilt = run_extract(class_data, tmp_path / "out")
    assert rebuilt.computed == rows and rebuilt.shards_kept == len(list(result.cache.path.glob("*.h5"))) - 1
    assert len(rebuilt.cache.read("train")[2]) == result.cache.manifest["splits"]["train"]["rows"]


def test_reader_refuses_a_shard_from_another_cache(class_data, tmp_path):
    a = run_extract(class_data, tmp_path / "out")
    b = run_extract(class_data, tmp_path / "out", pooling="avg")
    target = b.cache.shard_paths("train")[0]
    target.write_bytes(a.cache.shard_paths("train")[0].read_bytes())
    with pytest.raises(FeatcacheError, match="belongs to another cache"):
        b.cache.read("train")


def test_bad_images_are_skipped_and_reported_and_the_run_goes_on(split_data, tmp_path):
    (split_data / "train" / "cat" / "broken.jpg").write_text("not an image")
    (split_data / "train" / "dog" / "empty.png").touch()
    write_image(split_data / "test" / "dog" / "dot.png", size=(1, 1))
    result = run_extract(split_data, tmp_path / "out")
    reasons = {r["relpath"]: r["reason"] for r in result.cache.manifest["rejects"]}
    assert reasons == {
        "train/cat/broken.jpg": "not an image (unrecognised format)",
        "train/dog/empty.png": "empty file",
        "test/dog/dot.png": "too small (1x1 px; minimum 8 px per side)",
    }
    _, _, paths = result.cache.read("train")
    assert "train/cat/broken.jpg" not in paths and len(paths) == 12


def test_split_with_no_usable_image_is_an_error(split_data, tmp_path):
    for f in (split_data / "test").rglob("*.png"):
        f.write_text("garbage")
    with pytest.raises(FeatcacheError, match="split 'test' has no usable images"):
        run_extract(split_data, tmp_path / "out")


def test_unknown_layer_is_one_error_and_leaves_nothing(class_data, tmp_path):
    with pytest.raises(FeatcacheError, match="no such layer; did you mean block5_conv3"):
        run_extract(class_data, tmp_path / "out", layer="block5_conv7")
    assert not list((tmp_path / "out").glob("*/*"))


def test_inception_v3_cut_at_mixed7(class_data, tmp_path):
    result = run_extract(class_data, tmp_path / "out", backbone="inception_v3", image_size=75,
                         layer="mixed7", pooling="none", batch_size=16, shard_size=64)
    assert result.cache.manifest["output_layer"] == "mixed7"
    assert result.cache.read("train")[0].shape[1:] == (3, 3, 768)


def test_imagenet_from_the_weights_store(class_data, tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    keras.utils.set_random_seed(3)
    get("vgg16").build(None, 32).save_weights(store / "abc.weights.h5")
    sha = file_sha256(store / "abc.weights.h5")
    entry = {"vgg16": {"file": "abc.weights.h5", "sha256": sha, "weights_sha256": "abc", "source": "test"}}
    (store / "index.json").write_text(json.dumps(entry))
    monkeypatch.setenv("FEATCACHE_WEIGHTS", str(store))
    result = run_extract(class_data, tmp_path / "out", weights_spec="imagenet")
    assert result.cache.config["weights"] == "abc"
    features, _, paths = result.cache.read("test")
    expected = direct_predict([class_data / p for p in paths], weights=str(store / "abc.weights.h5"))
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


def test_mixed_precision_computes_in_float16_close_to_float32_and_has_its_own_key(class_data, tmp_path,
                                                                                    monkeypatch):
    full = run_extract(class_data, tmp_path / "out", pooling="avg")
    built = []

    def recording(*args):
        built.append(extract_module.extraction_model.__wrapped__(*args))
        return built[-1]

    recording.__wrapped__ = extract_module.extraction_model
    monkeypatch.setattr(extract_module, "extraction_model", recording)
    mixed = run_extract(class_data, tmp_path / "out", pooling="avg", precision="mixed_float16")
    assert mixed.cache.key != full.cache.key and mixed.computed == full.computed
    assert keras.mixed_precision.global_policy().name == "float32"
    convolutions = [layer for layer in conv_base(built[0]).layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convolutions) == 13  # VGG16's, all of them computing in float16 with float32 weights
    assert {(layer.dtype_policy.name, layer.compute_dtype) for layer in convolutions} == {
        ("mixed_float16", "float16")}
    a, b = full.cache.read("train")[0], mixed.cache.read("train")[0]
    tolerance = 0.005 * np.abs(a).max()  # float16 rounding is about 0.001 of it here
    closest = min(np.abs(a[i] - a[j]).max() for i in range(len(a)) for j in range(i))
    assert tolerance < closest / 2  # so rows of the wrong images, or in the wrong order, fail
    np.testing.assert_allclose(b, a, rtol=0, atol=tolerance)
    assert np.abs(b - a).max() > 0  # float16 arithmetic rounds: identical rows mean it ran in float32
