"""Tiny synthetic datasets in every layout, and a fast extraction (VGG16, 32 px, random init)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# `--precision auto` times the backbone once per machine and may choose bfloat16 on some CI machines
# and not others; tests pin float32 (scripts they start inherit it). tests/test_precision.py lifts it.
os.environ["FEATCACHE_PRECISION"] = "float32"

import numpy as np
import pytest
from PIL import Image

from featcache.dataset import load_dataset
from featcache.extract import extract, make_config

CLASS_COLOURS = {"cat": (200, 60, 40), "dog": (40, 80, 200)}


def write_image(path: Path, colour=(128, 128, 128), size=(40, 40), seed=0, fmt=None) -> Path:
    """A noisy solid-colour image: classes are separable by colour, rows distinguishable by noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size[1], size[0], 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path, format=fmt)
    return path


def make_split_folders(root: Path, counts=None, val_name="validation") -> Path:
    counts = counts or {"train": 6, val_name: 3, "test": 3}
    seed = 0
    for split, n in counts.items():
        for name, colour in CLASS_COLOURS.items():
            for i in range(n):
                seed += 1
                write_image(root / split / name / f"{name}_{i:03d}.png", colour, seed=seed)
    return root


def make_class_folders(root: Path, per_class=14) -> Path:
    seed = 1000
    for name, colour in CLASS_COLOURS.items():
        for i in range(per_class):
            seed += 1
            write_image(root / name / f"{name}_{i:03d}.png", colour, seed=seed)
    return root


@pytest.fixture(autouse=True)
def private_weights_store(tmp_path_factory, monkeypatch):
    """Tests never read or fill the user's own weights store."""
    if "FEATCACHE_WEIGHTS" not in os.environ:
        monkeypatch.setenv("FEATCACHE_WEIGHTS", str(tmp_path_factory.getbasetemp() / "weights-store"))


@pytest.fixture
def split_data(tmp_path) -> Path:
    return make_split_folders(tmp_path / "split-data")


@pytest.fixture
def class_data(tmp_path) -> Path:
    return make_class_folders(tmp_path / "class-data")


FAST = dict(backbone="vgg16", weights_spec="none", image_size=32, dtype="float32")


def run_extract(data: Path, workdir: Path, shard_size=4, batch_size=4, lock_timeout=0.0, engine=None,
                **options):
    """Extract with the fast defaults; any option of make_config can be overridden."""
    config, resolved = make_config(**{**FAST, **options})
    return extract(load_dataset(data), config, resolved, workdir, batch_size=batch_size,
                   shard_size=shard_size, lock_timeout=lock_timeout, show_progress=False, engine=engine)


def synthetic_cache(workdir: Path, classes=("a", "b"), per_class=(30, 10, 10), shape=(2, 2, 8),
                    shuffle_labels=False, seed=0, shard_size=16, separation=None, views=0,
                    misleading_originals=False, task="classification"):
    """A complete cache written straight from Gaussian blobs (one mean per class), no backbone.

    per_class gives rows per class in train, validation and test: a number (every class as many)
    or one count per class, e.g. ``((60, 6), (30, 3), (40, 40))`` for a 10:1 imbalance in train and
    validation. shuffle_labels permutes the labels within every split, so no head can do better
    than chance. separation (None: the means as drawn, far apart) rescales the class means about
    their centre so that the nearest two are that many noise standard deviations apart: 2 makes
    the classes overlap. views: every training image is followed by that many augmented view rows
    (as ``extract --augment`` stores them), each drawn from its class's blob; with misleading_originals
    the original training rows are drawn from the next class's blob instead, so that a head that
    learns from the originals alone gets the classes wrong, and one that learns from every row
    follows the views. ``task="ordinal"`` stores the classes as ordered ones.
    """
    import hashlib

    from featcache.dataset import Dataset, Sample

    rng = np.random.default_rng(seed)
    per_channel = rng.normal(0, 2, (len(classes),) + (1,) * (len(shape) - 1) + (shape[-1],))
    means = np.broadcast_to(per_channel, (len(classes), *shape))  # same mean at every position
    if separation is not None:
        flat = means.reshape(len(classes), -1)
        nearest = min(np.linalg.norm(flat[i] - flat[j]) for i in range(len(flat)) for j in range(i))
        centre = means.mean(axis=0)
        means = centre + (means - centre) * (separation / nearest)
    samples, features = [], {}
    for split, n in zip(("train", "validation", "test"), per_class, strict=True):
        labels = np.repeat(np.arange(len(classes)), n)
        shown = rng.permutation(labels) if shuffle_labels else labels
        for i, (true, label) in enumerate(zip(labels, shown, strict=True)):
            relpath = f"{split}/{classes[label]}/{i:04d}.png"
            sha = hashlib.sha256(f"{seed}{relpath}".encode()).hexdigest()
            samples.append(Sample(Path(relpath), relpath, int(label), split, sha))
            blob = (true + 1) % len(classes) if misleading_originals and split == "train" else true
            features[sha, 0] = (means[blob] + rng.normal(0, 1, shape)).astype(np.float32)
            for view in range(1, views + 1 if split == "train" else 1):
                features[sha, view] = (means[true] + rng.normal(0, 1, shape)).astype(np.float32)
    dataset = Dataset(workdir, "synthetic", tuple(classes), samples, task=task)

    def features_of(plan):
        return np.stack([features[s.source_sha256 or s.sha256, s.view] for s in plan.samples])

    return write_cache(workdir, dataset, shape, "float32", seed, features_of, shard_size, views)


def value_cache(workdir: Path, rows=(48, 16, 16), shape=(2, 2, 8), noise=0.1, seed=0, shard_size=16, offset=0.0):
    """A complete regression cache (no backbone): Gaussian rows, each labelled with ``offset`` plus a fixed
    linear function of its features plus ``noise``; returns the cache and that function's weights."""
    import hashlib

    from featcache.dataset import Dataset, Sample

    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1, int(np.prod(shape)))
    samples, features = [], {}
    for split, n in zip(("train", "validation", "test"), rows, strict=True):
        for i in range(n):
            relpath = f"{split}/{i:04d}.png"
            sha = hashlib.sha256(f"{seed}{relpath}".encode()).hexdigest()
            features[sha] = rng.normal(0, 1, shape).astype(np.float32)
            value = float(offset + features[sha].ravel() @ weights + rng.normal(0, noise))
            samples.append(Sample(Path(relpath), relpath, value, split, sha))
    dataset = Dataset(workdir, "synthetic", (), samples, task="regression")
    cache = write_cache(workdir, dataset, shape, "float32", seed,
                        lambda plan: np.stack([features[s.sha256] for s in plan.samples]), shard_size)
    return cache, weights


def blob_cache(workdir: Path, per_class=(3072, 512, 512), shape=(4, 4, 512), dtype="float16", seed=0,
               shard_size=1024):
    """A large cache of two separable Gaussian blobs (VGG16 block5_pool-sized rows by default),
    generated one shard at a time so that building it never holds the whole cache in memory."""
    import hashlib
    import zlib

    from featcache.dataset import Dataset, Sample

    samples = []
    for split, n in zip(("train", "validation", "test"), per_class, strict=True):
        for label in (0, 1):
            for i in range(n):
                relpath = f"{split}/{'ab'[label]}/{i:06d}.png"
                sha = hashlib.sha256(f"{seed}{relpath}".encode()).hexdigest()
                samples.append(Sample(Path(relpath), relpath, label, split, sha))
    dataset = Dataset(workdir, "blobs", ("a", "b"), samples)
    mean = np.random.default_rng(seed).normal(0, 0.5, shape).astype(np.float32)

    def features(plan):
        rng = np.random.default_rng([seed, zlib.crc32(plan.split.encode()), plan.index])
        signs = np.array([1 if s.label else -1 for s in plan.samples], np.float32)
        rows = rng.normal(0, 1, (len(signs), *shape)).astype(np.float32)
        return (rows + signs.reshape(-1, *[1] * len(shape)) * mean).astype(dtype)

    return write_cache(workdir, dataset, shape, dtype, seed, features, shard_size)


def write_cache(workdir: Path, dataset, shape, dtype: str, seed: int, features_of, shard_size: int,
                views: int = 0):
    """A complete cache written with the project's own shard writer, ``features_of(plan)`` giving
    each shard's rows; no backbone. ``views``: every training image is followed by that many
    augmented view rows (augmentation seed 0), as ``extract --augment`` plans them."""
    from featcache import augment, cache

    classes = dataset.classes
    config = cache.ExtractionConfig("synthetic", f"seed{seed}", None, "none", 32, "squash", "backbone", dtype,
                                    augment=views)
    key = cache.cache_key(config, dataset)
    cache_dir = workdir / key[:16]
    cache_dir.mkdir(parents=True)
    provenance = {"key": key, "row_key": config.row_key(), "config": config.__dict__,
                  "classes": list(classes), "task": dataset.task}
    manifest = {"format": 1, "featcache_version": "test", "key": key, "row_key": config.row_key(),
                "status": "complete", "created": "", "completed": "", "config": config.__dict__,
                "classes": list(classes), "feature_shape": list(shape), "splits": {}, "rejects": [],
                "task": dataset.task,
                "dataset": {"root": str(workdir), "layout": "synthetic", "images": len(dataset.samples)}}
    if views:
        manifest["augmentation"] = augment.RECIPE
    rows = {}
    for plan in cache.plan_shards(dataset, shard_size, views):
        cache.write_shard(cache_dir / plan.name, plan, provenance, features_of(plan), list(plan.samples), {})
        split = manifest["splits"].setdefault(plan.split, {"shards": []})
        split["shards"].append(plan.name)
        rows.setdefault(plan.split, []).extend(plan.samples)  # views included
    for split in manifest["splits"]:
        manifest["splits"][split].update(cache.split_summary(rows[split], list(classes)))
    cache.write_manifest(cache_dir, manifest)
    return cache.Cache(cache_dir)


def flip_bits(shard: Path, dataset: str = "features") -> None:
    """Corrupt the first stored chunk of a shard's dataset on disk, behind HDF5's back (its checksum
    then fails)."""
    import h5py

    with h5py.File(shard, "r") as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    data = bytearray(shard.read_bytes())
    for i in range(16):
        data[offset + 8 * i] ^= 0xFF
    shard.write_bytes(bytes(data))


class _RunsCode:
    """Unpickling this opens (creates) ``marker``: proof that loading ran stored code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(folder: Path, marker: Path) -> Path:
    """Replace every array of a saved head's model.npz by a pickle that creates ``marker`` when loaded (so
    whichever array the loader reads first runs it), and plant a model.joblib, their hashes recorded in
    head.json as if genuine (a hash beside the file proves nothing)."""
    import json
    import pickle

    from featcache.dataset import file_sha256

    with np.load(folder / "model.npz") as genuine:
        names = list(genuine.files)
    np.savez(folder / "model.npz", **{name: np.array([_RunsCode(marker)], dtype=object) for name in names})
    (folder / "model.joblib").write_bytes(pickle.dumps(_RunsCode(marker)))
    record = json.loads((folder / "head.json").read_text())
    record["files"] = {name: file_sha256(folder / name) for name in ("model.npz", "model.joblib")}
    (folder / "head.json").write_text(json.dumps(record))
    return marker


def _skips_fail_in_ci(report):
    """Where CI is set (CI=true), a skip is a failure: CI installs every extra and Chromium, so a test
    that skips there (Ray, onnx, Chromium missing) would hide a broken environment behind a pass."""
    ci = os.environ.get("CI", "")
    if report.skipped and ci.lower() not in ("", "0", "false") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped where CI={ci} (CI must run every test): {reason}"
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    return _skips_fail_in_ci((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    return _skips_fail_in_ci((yield))


def cli_in(workdir: Path):
    """A function running ``featcache ARGS --workdir WORKDIR`` in this process: its stdout, or the test fails
    with the command's output."""
    from click.testing import CliRunner

    from featcache.cli import main

    runner = CliRunner()

    def run(*args) -> str:
        result = runner.invoke(main, [*map(str, args), "--workdir", str(workdir)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    return run
