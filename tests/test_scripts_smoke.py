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
    """The whole-network recipe: extract, dense256, the whole VGG16 fine-tuned on the pixel cache, then the
    fine-tuned base's features extracted and three heads on them, every row read back from head.json."""
    data = make_split_folders(tmp_path / "data", counts=TINY)
    run = run_script("bench_accuracy", "--data", data, "--workdir", tmp_path / "work", "--only",
                     "vgg16-150-whole", "--tiny", "--json", tmp_path / "out.json")
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    based = "vgg16-150-whole+base"
    assert [(r["recipe"], r["head"]) for r in rows] == [
        ("vgg16-150-whole", "dense256"), ("vgg16-150-whole", "dense256-finetuned"),
        (based, "logreg"), (based, "svm-rbf"), (based, "dense256"),
    ]
    assert all(0 <= r["test_accuracy"] <= 1 and r["cache_key"] for r in rows)
    assert all(r["precision"] == "mixed_bfloat16" for r in rows)
    assert rows[2]["cache_key"] not in {rows[0]["cache_key"], rows[1]["cache_key"]}
    assert rows[2]["extract"][rows[2]["extract"].index("--weights") + 1].endswith(".weights.h5")
    assert "vgg16-150-whole dense256-finetuned: 1 epochs" in run.stdout and "CPU flags" in run.stdout
    assert "finetune epoch 1/1" in run.stderr  # long runs show their epochs as they come


def load_script(name: str):
    """A script of scripts/ as a module, to test its functions without running it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_accuracy_checks_each_bf16_row_against_its_float32_pair():
    """The bf16 recipes repeat a float32 one (pinned: never auto); each head is read against its pair's interval."""
    module = load_script("bench_accuracy")
    recipes = {r.name: r for r in module.RECIPES}
    for recipe in recipes.values():
        assert recipe.precision in ("float32", "mixed_bfloat16") and recipe.pair in (None, *recipes)
    assert recipes["vgg16-150-bf16"].pair == "vgg16-150" and recipes["vgg16-150-bf16"].precision == "mixed_bfloat16"

    def row(recipe, head, accuracy, precision="float32", pair=None):
        return {"recipe": recipe, "head": head, "test_accuracy": accuracy, "precision": precision, "pair": pair,
                "test_ci95": module.wilson_interval(accuracy, 656)}

    rows = [row("vgg16-150", "logreg", 0.752), row("vgg16-150", "svm", 0.764),
            row("vgg16-150-bf16", "logreg", 0.747, "mixed_bfloat16", "vgg16-150"),
            row("vgg16-150-bf16", "svm", 0.70, "mixed_bfloat16", "vgg16-150"),
            row("vgg16-150-bf16", "dense256", 0.75, "mixed_bfloat16", "vgg16-150")]  # no float32 partner: no line
    lines = module.pair_lines(rows)
    assert len(lines) == 2
    assert lines[0].startswith("vgg16-150-bf16 logreg: test 74.7% (mixed_bfloat16); test accuracy within the "
                               "float32 row's 95% interval: yes (vgg16-150 75.2%, 71.8%-78.4%)")
    assert "vgg16-150-bf16 svm: test 70.0%" in lines[1] and "interval: no" in lines[1]


def test_bench_accuracy_reads_a_regression_heads_numbers_as_the_nearest_grade(tmp_path):
    """elpv's regression recipe: numbers rounded to the nearest training level give the class metrics, the
    mean grade error and the defective-read-as-functional count of every other row."""
    import hashlib

    import numpy as np

    from featcache.dataset import Dataset, Sample
    from featcache.heads import fit_and_save
    from tests.conftest import write_cache

    module = load_script("bench_accuracy")
    rng, levels = np.random.default_rng(0), np.array([0, 1 / 3, 2 / 3, 1])
    samples, features = [], {}
    for split, n in (("train", 40), ("validation", 12), ("test", 20)):
        for i in range(n):
            sha = hashlib.sha256(f"{split}{i}".encode()).hexdigest()
            grade = i % 4
            features[sha] = (np.eye(4)[grade] * 3 + rng.normal(0, 0.6, 4)).astype(np.float32)
            samples.append(Sample(Path(f"{split}/{i}.png"), f"{split}/{i}.png", float(levels[grade]), split, sha))
    dataset = Dataset(tmp_path, "synthetic", (), samples, task="regression")
    cache = write_cache(tmp_path, dataset, (4,), "float32", 0,
                        lambda plan: np.stack([features[s.sha256] for s in plan.samples]), 8)
    head, _ = fit_and_save(cache, "ridge")
    metrics = module.graded_metrics(head_dir(cache, "ridge"))
    x, values, _ = cache.read("test")
    predicted = np.abs(head.predict_values(x)[:, None] - levels).argmin(axis=1)
    truth = np.rint(values * 3).astype(int)
    confusion = np.array(metrics["test"]["confusion"])
    assert confusion.shape == (4, 4) and confusion.sum() == 20 and metrics["test"]["log_loss"] is None
    assert metrics["test"]["accuracy"] == pytest.approx((predicted == truth).mean())
    assert module.mean_class_error(confusion.tolist()) == pytest.approx(np.abs(predicted - truth).mean())
    assert module.mean_class_error([[2, 0, 0], [0, 0, 0], [1, 0, 1]]) == pytest.approx(0.5)  # one miss by 2 of 4


def test_readme_command_reference_is_each_commands_help():
    """The README's reference is what --help prints now; a stale one fails, naming the command."""
    run_script("command_reference", "--check")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stale = readme.replace("Rows per HDF5 shard", "Rows per shard", 1)
    module = load_script("command_reference")
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
