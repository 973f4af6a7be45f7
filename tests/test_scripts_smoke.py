"""Every script in scripts/ runs on tiny input (32 px, random init, a few images), so none can rot
between the hand-run measurements. Their figures mean nothing here; that they run and write what
they promise does. (bench_heads.py: tests/test_bench_scripts.py; chaos.py: tests/test_reliability.py;
walkthrough.py: tests/test_api.py; command_reference.py: below.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from featcache import quiet
from featcache.heads import FitOptions, fit_head, head_dir
from tests.conftest import make_split_folders, run_extract

ROOT = Path(__file__).resolve().parents[1]
TINY = {"train": 4, "validation": 2, "test": 2}  # per class: 16 images


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    """``python scripts/NAME.py ARGS`` as a user runs it; fails the test with its output if it fails."""
    command = [sys.executable, str(ROOT / "scripts" / f"{name}.py"), *map(str, args)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    noise = [line for line in run.stderr.splitlines() if quiet.is_noise(line)]
    assert not noise, f"TensorFlow's log on the script's stderr: {noise[:3]}"
    return run


def test_bench_extract_runs_on_tiny_input(tmp_path):
    data = make_split_folders(tmp_path / "data", counts=TINY)
    run = run_script("bench_extract", "--data", data, "--images", 8, "--repeats", 1, "--image-size", 32,
                     "--weights", "none", "--matmul-size", 64, "--matmul-reps", 1, "--json", tmp_path / "out.json")
    results = json.loads((tmp_path / "out.json").read_text())
    assert (results["images"], results["image_size"], results["weights"]) == (8, 32, "none")
    assert len(results["repeats"]) == 1 and results["gflop_per_image"] > 0
    median = results["median"]
    assert median["extract_img_s"] > 0 and median["tutorial_img_s"] > 0 and median["extract_bf16_img_s"] > 0
    assert median["sgemm_gflops"] > 0 and median["bf16_gflops"] > 0 and median["bf16_limit_img_s"] > 0
    assert median["bf16_vs_float32"] == pytest.approx(median["extract_bf16_img_s"] / median["extract_img_s"])
    assert set(results["cpu_flags"]) == {"amx_bf16", "avx512_bf16"} and results["bf16_case"]
    assert re.search(r"CPU flags: amx_bf16 (present|absent), avx512_bf16 (present|absent); case: "
                     r"(native bf16 \(AMX\)|native bf16 \(AVX512-BF16, no AMX\)|no native bf16: TensorFlow emulates)",
                     run.stdout)
    for precision in ("float32", "bf16"):
        assert f"extract {precision} beat the tutorials' loop in" in run.stdout
    assert re.search(r"bf16 matmul limit \d+ GFLOP/s", run.stdout) and "bf16/float32 extract speed" in run.stdout
    assert re.search(r"goal bf16 extract >= 5x its float32 rate: (met|MISSED)", run.stdout)
    integrity = results["integrity"]
    assert integrity["decode_checked_ms"] > 0 and integrity["decode_ms"] > 0 and "integrity checks" in run.stdout
    assert re.search(r"goal bf16 extract >= 80% of the bf16 matmul limit: (met|MISSED)", run.stdout)
    assert re.search(r"goal extract beat the tutorials' loop in every repeat: (met|MISSED)", run.stdout)


def test_bench_also_layer_runs_on_tiny_input(tmp_path):
    data = make_split_folders(tmp_path / "data", counts=TINY)
    run_script("bench_also_layer", "--data", data, "--image-size", 32, "--weights", "none",
               "--json", tmp_path / "out.json")
    results = json.loads((tmp_path / "out.json").read_text())
    assert results["prefix_layer"] == "block4_pool" and results["images"] == 16
    assert results["same_prefix_key"] and results["prefix_rows_identical"]
    second_pass, also_layer = results["paths"]["second pass"], results["paths"]["--also-layer"]
    assert (second_pass["backbone_rows"], also_layer["backbone_rows"]) == (32, 16)
    assert also_layer["prefix_rows_copied"] == 16


def test_bench_finetune_runs_on_tiny_input(tmp_path):
    data = make_split_folders(tmp_path / "data")  # 12 training images: warm-up and timed steps of 4
    cache = run_extract(data, tmp_path / "out").cache
    fit_head(cache, "dense256", FitOptions(epochs=1, batch_size=4)).save(head_dir(cache, "dense256"))
    run = run_script("bench_finetune", "--workdir", tmp_path / "out", "--data", data, "--steps", 1,
                     "--batch-size", 4, "--json", tmp_path / "out.json")
    results = json.loads((tmp_path / "out.json").read_text())
    assert (results["train_rows"], results["prefix_layer"], results["steps_timed"]) == (12, "block4_pool", 1)
    assert results["prefix_seconds_per_step"] > 0 and results["full_seconds_per_step"] > 0
    assert results["prefix_bf16_seconds_per_step"] > 0 and set(results["cpu_flags"]) == {"amx_bf16", "avx512_bf16"}
    assert results["bf16_vs_float32"] == pytest.approx(
        results["prefix_seconds_per_step"] / results["prefix_bf16_seconds_per_step"])
    assert re.search(r"CPU flags: amx_bf16 (present|absent), avx512_bf16 (present|absent); case: ", run.stdout)
    assert re.search(r"cached prefix \(block4_pool\), float32 +\d", run.stdout)
    assert re.search(r"cached prefix, mixed_bfloat16 +\d", run.stdout)
    assert "bf16/float32 step speed on the cached prefix:" in run.stdout


@pytest.mark.ray
def test_bench_ray_runs_on_tiny_input(tmp_path):
    pytest.importorskip("ray")
    data = make_split_folders(tmp_path / "data", counts=TINY)
    run_script("bench_ray", "--data", data, "--images", 8, "--workers", 1, "--repeats", 1, "--image-size", 32,
               "--shard-size", 4, "--weights", "none", "--json", tmp_path / "out.json")
    results = json.loads((tmp_path / "out.json").read_text())
    assert set(results["seconds"]) == {"local", "ray x1"} and results["images"] == 8
    assert all(rate > 0 for rate in results["images_per_second"].values())


def test_bench_accuracy_runs_a_recipe_with_fine_tuning_on_tiny_input(tmp_path):
    """The MobileNetV2 recipe: extract, four heads, fine-tuning, and the rows read back from head.json; beside it
    its bfloat16 pair, each head checked against the float32 row's interval."""
    data = make_split_folders(tmp_path / "data", counts=TINY)
    run = run_script("bench_accuracy", "--data", data, "--workdir", tmp_path / "work", "--only",
                     "mobilenet_v2-300", "mobilenet_v2-300-bf16", "--tiny", "--json", tmp_path / "out.json")
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [(r["recipe"], r["head"], r["precision"]) for r in rows] == [
        ("mobilenet_v2-300", "logreg", "float32"), ("mobilenet_v2-300", "svm-rbf", "float32"),
        ("mobilenet_v2-300", "dense256", "float32"), ("mobilenet_v2-300", "dense256-finetuned", "float32"),
        ("mobilenet_v2-300-bf16", "logreg", "mixed_bfloat16"), ("mobilenet_v2-300-bf16", "svm-rbf", "mixed_bfloat16"),
    ]
    assert all(0 <= r["test_accuracy"] <= 1 and r["cache_key"] for r in rows)
    assert rows[0]["cache_key"] != rows[4]["cache_key"]  # the precision is part of the cache key
    assert "best cached head by validation: mobilenet_v2-300" in run.stdout
    for head in ("logreg", "svm-rbf"):
        assert re.search(rf"mobilenet_v2-300-bf16 {head}: .*test accuracy within the float32 row's 95% interval: "
                         "(yes|no)", run.stdout)


def test_readme_command_reference_is_each_commands_help():
    """The README's reference is what --help prints now; a stale one fails, naming the command."""
    run_script("command_reference", "--check")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stale = readme.replace("Rows per HDF5 shard", "Rows per shard", 1)
    import importlib.util

    spec = importlib.util.spec_from_file_location("command_reference", ROOT / "scripts" / "command_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    _, current, _ = module.split_readme(stale)
    assert module.differing(current, module.section()) == ["featcache extract"]


def test_precision_choices_prints_auto_s_choice_and_the_flags_it_saw():
    run = run_script("precision_choices", "--networks", "vgg16:32")
    machine, _, header, _, row = run.stdout.strip().splitlines()[:5]
    assert "cores" in machine and "tensorflow" in machine and "candidate:" in machine
    assert header.startswith("| network | float32 img/s")
    assert row.startswith("| vgg16, 32 px |") and row.rstrip(" |").rsplit("| ", 1)[1].split(":")[0] in (
        "float32", "mixed_bfloat16", "mixed_float16")
    if "none (float32 only)" not in machine:  # a candidate was timed: both rates and their ratio
        rates = [float(cell.split()[0].rstrip("x")) for cell in row.split("|")[2:5]]
        assert min(rates) > 0
