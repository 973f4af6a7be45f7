"""Tiny synthetic datasets in every layout, and a fast extraction (VGG16, 32 px, random init)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def run_extract(data: Path, workdir: Path, shard_size=4, batch_size=4, lock_timeout=0.0, **options):
    """Extract with the fast defaults; any option of make_config can be overridden."""
    config, resolved = make_config(**{**FAST, **options})
    return extract(load_dataset(data), config, resolved, workdir, batch_size=batch_size,
                   shard_size=shard_size, lock_timeout=lock_timeout, show_progress=False)
