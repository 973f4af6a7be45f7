"""The benchmark scripts run on tiny input, so they cannot rot between the hand-run measurements."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import synthetic_cache

ROOT = Path(__file__).resolve().parents[1]
BENCH_HEADS = ROOT / "scripts" / "bench_heads.py"
HEADS = ("dense256", "linear", "logreg", "svm", "svm-rbf")


def bench_heads_module():
    spec = importlib.util.spec_from_file_location("bench_heads", BENCH_HEADS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_heads_tables_run_on_a_tiny_cache_and_write_json(tmp_path):
    cache = synthetic_cache(tmp_path / "out", classes=("a", "b", "c"), per_class=(20, 8, 8), shape=(2, 2, 8))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, str(BENCH_HEADS), "--caches", f"tiny={cache.path}", "--seeds", "0,1",
                          "--json", str(tmp_path / "heads.json")], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "bench_heads.py --caches tiny=" in out.stdout and "bf16 flags:" in out.stdout
    assert "| dataset | head | recipe | val | test |" in out.stdout
    assert "| dataset | train rows x features | head | head fit s |" in out.stdout
    results = json.loads((tmp_path / "heads.json").read_text())
    assert [r["head"] for r in results["speed"]] == list(HEADS)
    assert [(r["head"], r["default"]) for r in results["accuracy"]] == [(h, d) for h in HEADS for d in (True, False)]
    assert results["seeds"] == [0, 1] and "the mean over seeds 0, 1" in out.stdout
    for row in results["accuracy"]:
        assert 0 <= row["test_accuracy"] <= 1 and row["fit_seconds"] > 0
        assert f"| tiny | {row['head']} | {row['recipe']} | " in out.stdout
        if row["head"] in ("dense256", "linear"):  # Keras: one fit per seed, the mean reported
            assert row["seeds"] == [0, 1] and len(row["test_accuracy_by_seed"]) == 2
            assert row["test_accuracy"] == pytest.approx(np.mean(row["test_accuracy_by_seed"]))
            assert "test by seed " in out.stdout
        else:
            assert "seeds" not in row
    for row in results["speed"]:
        assert row["ratio"] == row["head_fit_seconds"] / row["reference_seconds"] > 0
        assert row["one_thread_ratio"] == row["head_fit_seconds"] / row["one_thread_seconds"] > 0
        assert (row["train_rows"], row["features"]) == (60, 32)
        assert len(row["reference_runs"]) == len(row["one_thread_runs"]) == 2
    assert {r["head"]: r["goal"] for r in results["speed"]} == {"dense256": 3.0, "linear": 3.0, "logreg": 1.0,
                                                                "svm": 1.0, "svm-rbf": None}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_loader_reads_idx_files_and_draws_stratified_splits(tmp_path):
    bench = bench_heads_module()
    rng = np.random.default_rng(0)
    for part, n in (("train", 200), ("t10k", 100)):
        labels = np.repeat(np.arange(10), n // 10)
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        images[:, 0, 0] = labels  # each image names its label
        write_idx(tmp_path / f"{part}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{part}-labels-idx1-ubyte.gz", labels)
    assert bench.read_idx(tmp_path / "t10k-images-idx3-ubyte.gz").shape == (100, 28, 28)

    images, labels, splits = bench.fashion_mnist(tmp_path, 100, 50, seed=0)
    assert images.shape == (150, 28, 28) and images.dtype == np.uint8
    assert (images[:, 0, 0] == labels).all()
    splits = np.array(splits)
    for split, n in (("train", 80), ("validation", 20), ("test", 50)):
        assert (np.bincount(labels[splits == split], minlength=10) == n // 10).all()
    again = bench.fashion_mnist(tmp_path, 100, 50, seed=0)
    assert (again[0] == images).all()
