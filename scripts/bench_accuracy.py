"""elpv 4-class test accuracy of featcache recipes beside Deitsch et al. 2019 and the tutorials' recipe.

Every recipe runs through the real CLI (`featcache extract`, `fit-head`, `finetune`) in one
workdir, so caches and fitted heads are reused: a second run only prints. Each row of the table is
one saved head; its numbers are read back from the head's `head.json` (cache key, options and seed
recorded there), so every figure traces to the cache and the head that made it. The split is
`featcache datasets elpv`'s: 25% test stratified by class and module type, as in the paper, and
15% of the rest for validation; heads choose C / stop on validation only. Each test accuracy comes
with its 95% Wilson interval: on 656 test images about ±3 points, the least gap worth reading.

Every recipe names its compute precision (``--precision`` of extract, fit-head and finetune):
float32 unless it says otherwise, never ``auto``, which would choose by this machine's timing and
change the figures from one machine to another. A ``-bf16`` recipe repeats its ``pair``, a float32
recipe, in ``mixed_bfloat16``; after the table each of its heads is checked against the float32
row's 95% interval (does bfloat16's rounding cost accuracy?).

    python scripts/bench_accuracy.py [--data data/elpv] [--workdir featcache-out/bench-accuracy]
                                     [--only NAME ...] [--json accuracy.json] [--tiny]

``--tiny`` runs each recipe at 32 px from a random init with 2 epochs (1 of fine-tuning): it checks
that the recipes still run on any small dataset (the smoke test's), its figures mean nothing.

Targets: elpv's four classes are ordered grades of defect (probability 0, 1/3, 2/3, 1). The
``-ordinal`` recipe extracts them with ``--task ordinal`` (ridge on the grade, read back as the
nearest grade, beside the classification heads); the ``-regression`` recipe reads the probability
column of ``elpv-split.csv`` with ``--task regression`` (the paper's regression), and its numbers
are read as the nearest grade for the class metrics. Every row has balanced accuracy, macro F1, the
mean grade error and how many defective test cells it reads as functional.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PAPER = [("Deitsch et al. 2019: SVM on hand-crafted features (KAZE/VGG + VLAD)", 0.8244),
         ("Deitsch et al. 2019: fine-tuned VGG19", 0.8842)]


@dataclass(frozen=True)
class Recipe:
    """One cache (extract options) and the heads fitted on it; ``finetune`` fine-tunes dense256 from
    that layer afterwards."""

    name: str
    extract: tuple[str, ...]
    heads: tuple[str, ...] = ("logreg", "svm", "svm-rbf", "dense256")
    fit: tuple[str, ...] = ()
    finetune: tuple[str, ...] = ()
    note: str = ""
    tags: tuple[str, ...] = field(default=())
    precision: str = "float32"  # extract, fit-head and finetune --precision; never auto (machine-dependent)
    pair: str | None = None  # the float32 recipe this one repeats in another precision
    rebase: tuple[str, ...] = ()  # heads fitted on the features of a whole-network fine-tune's base
    csv: str | None = None  # extract --data this CSV beside the data folder (with --label-column)


# dense256 on a pooled 1280-vector learns slower than on VGG16's 4x4x512 map: more epochs, a higher rate
POOLED_DENSE = ("--epochs", "100", "--patience", "10", "--learning-rate", "1e-4")
MOBILENET_FINETUNE = ("--unfreeze-from", "100", "--epochs", "30", "--learning-rate", "1e-5",
                      "--patience", "5")

# The whole network on the pixel cache, from dense256 fitted on the cached features: the paper's augmentation
# online, Adam at the block5 fine-tune's rate with a warm-up and cosine decay, early stopping on validation
WHOLE_FINETUNE = ("--unfreeze-from", "all", "--augment-online", "paper", "--optimizer", "adam",
                  "--learning-rate", "2e-5", "--schedule", "cosine", "--warmup-epochs", "1", "--epochs", "8",
                  "--patience", "3")

RECIPES = [
    Recipe("tutorial", ("--backbone", "vgg16", "--image-size", "150", "--preprocess", "rescale"),
           heads=("dense256",), fit=("--patience", "0"),
           note="the tutorials' recipe: VGG16 150 px, 1/255, block5_pool, dense256, 30 epochs"),
    Recipe("vgg16-150", ("--backbone", "vgg16", "--image-size", "150"),
           note="Chollet's setup with VGG16's own preprocessing"),
    Recipe("vgg16-150-bf16", ("--backbone", "vgg16", "--image-size", "150"), precision="mixed_bfloat16",
           pair="vgg16-150", note="vgg16-150 in bfloat16 (about 6x faster with AMX)"),
    Recipe("vgg16-150-whole", ("--backbone", "vgg16", "--image-size", "150"), heads=("dense256",),
           finetune=WHOLE_FINETUNE, rebase=("logreg", "svm-rbf", "dense256"), precision="mixed_bfloat16",
           note="the whole VGG16 fine-tuned on the pixel cache; then heads on its base's features"),
    Recipe("vgg16-150-ordinal", ("--backbone", "vgg16", "--image-size", "150", "--task", "ordinal"),
           heads=("ridge", "logreg", "svm-rbf", "dense256"), precision="mixed_bfloat16",
           note="the four grades as ordered classes: ridge on the grade beside the classification heads"),
    Recipe("vgg16-150-regression", ("--backbone", "vgg16", "--image-size", "150", "--task", "regression",
                                    "--label-column", "probability"),
           heads=("ridge", "dense256"), precision="mixed_bfloat16", csv="elpv-split.csv",
           note="the defect probability as a number (the paper's regression), read as the nearest grade"),
    Recipe("vgg16-224-block4-avg", ("--backbone", "vgg16", "--image-size", "224", "--layer", "block4_pool",
                                    "--pooling", "avg"), heads=("logreg", "svm-rbf"),
           note="a mid-level layer, averaged"),
    Recipe("mobilenet_v2-300", ("--backbone", "mobilenet_v2", "--image-size", "300"),
           heads=("logreg", "svm-rbf", "dense256"), fit=POOLED_DENSE,
           finetune=MOBILENET_FINETUNE,
           note="TF tutorial's backbone at the images' own 300 px; fine-tuned from layer 100"),
    Recipe("mobilenet_v2-300-bf16", ("--backbone", "mobilenet_v2", "--image-size", "300"),
           heads=("logreg", "svm-rbf"), precision="mixed_bfloat16", pair="mobilenet_v2-300",
           note="mobilenet_v2-300 in bfloat16 (slower than float32 even with AMX: accuracy only)"),
    Recipe("mobilenet_v2-300-aug4", ("--backbone", "mobilenet_v2", "--image-size", "300", "--augment", "4"),
           heads=("logreg",), note="4 augmented views (Chollet's recipe) per training image"),
    Recipe("mobilenet_v2-448", ("--backbone", "mobilenet_v2", "--image-size", "448"),
           heads=("logreg", "svm", "svm-rbf"), note="upsampled: thin cracks span more pixels"),
    Recipe("efficientnet_lite0-300", ("--backbone", "efficientnet_lite0", "--image-size", "300"),
           heads=("logreg", "svm-rbf")),
    Recipe("efficientnet_lite0-448", ("--backbone", "efficientnet_lite0", "--image-size", "448"),
           heads=("logreg", "svm-rbf")),
    Recipe("mobilenet_v2-448-d4",
           ("--backbone", "mobilenet_v2", "--image-size", "448", "--average-views", "d4"),
           heads=("logreg", "svm-rbf", "dense256"), fit=POOLED_DENSE,
           note="features averaged over the 8 turns and mirrorings of each cell (a cell has no up)"),
    Recipe("efficientnet_lite0-448-d4",
           ("--backbone", "efficientnet_lite0", "--image-size", "448", "--average-views", "d4"),
           heads=("logreg", "svm-rbf"), note="the best backbone by validation, its views averaged"),
]


def featcache(*args: str) -> str:
    """Run one featcache command, its epoch lines passed on to stderr as they come (a whole-network epoch
    takes minutes); fail loudly with its output. Returns its stdout."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = Path(sys.executable).with_name("featcache")  # this environment's entry point
    with tempfile.TemporaryFile("w+") as stdout:  # a file, not a pipe: read after stderr, it never fills up
        with subprocess.Popen([str(command), *args], stdout=stdout, stderr=subprocess.PIPE, text=True,
                              env=env) as run:
            stderr = _pass_on_epochs(run.stderr)
        stdout.seek(0)
        printed = stdout.read()
    if run.returncode:
        sys.exit(f"featcache {' '.join(args)} failed:\n{printed}{stderr}")
    return printed


def _pass_on_epochs(lines) -> str:
    """A command's stderr, read line by line, its epoch lines passed on to this script's stderr."""
    kept = []
    for line in lines:
        kept.append(line)
        if " epoch " in line:
            print(f"  {line.rstrip()}", file=sys.stderr, flush=True)
    return "".join(kept)


# --tiny: appended to each command's options (a repeated option's last value wins)
TINY = {"extract": ("--image-size", "32", "--weights", "none"), "fit-head": ("--epochs", "2"),
        "finetune": ("--epochs", "1", "--warmup-epochs", "0")}


def run_recipe(recipe: Recipe, data: Path, workdir: Path, tiny: bool = False) -> list[dict]:
    common = ("--workdir", str(workdir))
    precision = ("--precision", recipe.precision)
    extra = TINY if tiny else {}
    started = time.perf_counter()
    source = data / recipe.csv if recipe.csv else data  # `featcache datasets elpv` writes it inside DEST
    featcache("extract", "--data", str(source), *recipe.extract, *precision, *extra.get("extract", ()), *common)
    key = (workdir / "current").read_text().strip()
    extract_seconds = time.perf_counter() - started
    cache_args = (*common, "--cache", key)
    featcache("fit-head", *(a for h in recipe.heads for a in ("--head", h)), *recipe.fit, *precision,
              *extra.get("fit-head", ()), *cache_args)
    folders = {head: workdir / key[:16] / "heads" / head for head in recipe.heads}
    rows = []
    if recipe.finetune:
        printed = featcache("finetune", "--head", "dense256", "--data", str(data), *recipe.finetune,
                            *precision, *extra.get("finetune", ()), *cache_args)
        prefix = re.search(r"prefix cache: (\S+)", printed).group(1)  # the fine-tuned head lives there
        folders["dense256-finetuned"] = Path(prefix) / "heads" / "dense256-finetuned"
        if recipe.rebase:
            rows = run_rebase(recipe, printed, workdir, extra)
    return [row_of(recipe, head, folder, extract_seconds) for head, folder in folders.items()] + rows


def run_rebase(recipe: Recipe, printed: str, workdir: Path, extra: dict) -> list[dict]:
    """Run the extract command finetune printed (the fine-tuned base's features), then the cheap heads on them."""
    command = shlex.split(re.search(r"fine-tuned base's features: featcache (.+)", printed).group(1))
    common = ("--workdir", str(workdir), "--precision", recipe.precision)
    started = time.perf_counter()
    featcache(*command, *common)
    key = (workdir / "current").read_text().strip()
    seconds = time.perf_counter() - started
    featcache("fit-head", *(a for h in recipe.rebase for a in ("--head", h)), *recipe.fit,
              *extra.get("fit-head", ()), *common, "--cache", key)
    based = Recipe(f"{recipe.name}+base", tuple(command[1:]), precision=recipe.precision,
                   note="cheap heads on the fine-tuned base's features (the base saw the training split)")
    return [row_of(based, head, workdir / key[:16] / "heads" / head, seconds) for head in recipe.rebase]


def row_of(recipe: Recipe, head: str, folder: Path, extract_seconds: float) -> dict:
    """One table row from a saved head's record; a regression head's numbers read as the nearest grade."""
    info = json.loads((folder / "head.json").read_text())
    metrics = info["metrics"] if "rmse" not in info["metrics"]["test"] else graded_metrics(folder)
    test = metrics["test"]
    test_images = sum(map(sum, test["confusion"]))
    return {"recipe": recipe.name, "head": head, "note": recipe.note, "extract": list(recipe.extract),
            "precision": recipe.precision, "pair": recipe.pair,
            "cache_key": info["cache_key"], "options": info.get("options"), "chosen": info.get("chosen"),
            "validation_accuracy": metrics["validation"]["accuracy"],
            "validation_log_loss": metrics["validation"]["log_loss"],
            "test_accuracy": test["accuracy"],
            "test_ci95": wilson_interval(test["accuracy"], test_images),
            "test_balanced_accuracy": test.get("balanced_accuracy"), "test_macro_f1": test.get("macro_f1"),
            "test_mean_class_error": mean_class_error(test["confusion"]),
            "defective_as_functional": test["confusion"][-1][0] if len(test["confusion"]) > 2 else None,
            "test_rmse": info["metrics"]["test"].get("rmse"),
            "test_confusion": test.get("confusion"), "fit_seconds": info.get("fit_seconds"),
            "epochs_run": info.get("epochs_run"), "seconds_per_epoch": info.get("seconds_per_epoch"),
            "trained_precision": (info.get("precision") or {}).get("precision"),
            "extract_seconds_this_run": extract_seconds}


def graded_metrics(folder: Path) -> dict:
    """A regression head's class metrics: its numbers (elpv: defect probabilities) scaled to the grades
    0..K-1 of the probabilities found in training and rounded to the nearest, on validation and test.
    Log loss is undefined (no probabilities): None."""
    import numpy as np

    from featcache.cache import Cache
    from featcache.evaluate import SplitResult, predict_split
    from featcache.heads import load_head

    cache, head = Cache(folder.parent.parent), load_head(folder)
    levels = np.unique(cache.read("train")[1])  # elpv: 0, 1/3, 2/3, 1

    def grades(values: np.ndarray) -> np.ndarray:
        return np.abs(np.asarray(values)[:, None] - levels[None, :]).argmin(axis=1)

    metrics = {}
    for split in ("validation", "test"):
        numbers = predict_split(head, cache, split)
        one_hot = np.eye(len(levels))[grades(numbers.outputs)]
        graded = SplitResult(one_hot, grades(numbers.labels), numbers.paths, numbers.predict_seconds)
        metrics[split] = {**graded.metrics(len(levels)), "log_loss": None}
    return metrics


def mean_class_error(confusion: list[list[int]]) -> float:
    """The mean distance in classes between the true and the predicted class (classes in their order)."""
    total = sum(map(sum, confusion))
    return sum(abs(i - j) * n for i, row in enumerate(confusion) for j, n in enumerate(row)) / total


def wilson_interval(accuracy: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of an accuracy measured on n images: how far apart two rows must be to differ."""
    centre = (accuracy + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def print_table(rows: list[dict]) -> None:
    print(f"{'recipe':<26}{'head':<20}{'val':>7}{'test':>7}{'test 95% CI':>15}{'test bal':>10}{'macro F1':>10}"
          f"{'grade err':>10}{'def->func':>10}")
    for row in rows:
        bal, f1, missed = row["test_balanced_accuracy"], row["test_macro_f1"], row["defective_as_functional"]
        interval = "{:.1%}-{:.1%}".format(*row["test_ci95"])
        print(f"{row['recipe']:<26}{row['head']:<20}{row['validation_accuracy']:>7.1%}"
              f"{row['test_accuracy']:>7.1%}{interval:>15}{'' if bal is None else f'{bal:.1%}':>10}"
              f"{'' if f1 is None else f'{f1:.1%}':>10}{row['test_mean_class_error']:>10.3f}"
              f"{'' if missed is None else missed:>10}")
    for name, accuracy in PAPER:
        print(f"{name:<53}{accuracy:>7.2%}")
    cached = [r for r in rows if not r["head"].endswith("finetuned")]
    best = max(cached, key=lambda r: (r["validation_accuracy"], -(r["validation_log_loss"] or 0)))  # as compare
    print(f"best cached head by validation: {best['recipe']} {best['head']}, "
          f"test {best['test_accuracy']:.1%}")
    for line in pair_lines(rows):
        print(line)
    from featcache import precision

    for row in rows:
        if row["head"].endswith("finetuned"):
            print(f"{row['recipe']} {row['head']}: {row['epochs_run']} epochs, {row['seconds_per_epoch']:.0f} s each "
                  f"({row['fit_seconds'] / 60:.1f} min) in {row['trained_precision']}, "
                  f"{precision.hardware_line(precision.cpu_flags(), [])}")


def pair_lines(rows: list[dict]) -> list[str]:
    """Per head of each recipe with a ``pair`` that ran: is its test accuracy inside the pair's interval?"""
    partner = {(r["recipe"], r["head"]): r for r in rows}
    lines = []
    for row in rows:
        if row["pair"] and (other := partner.get((row["pair"], row["head"]))):
            low, high = other["test_ci95"]
            inside = "yes" if low <= row["test_accuracy"] <= high else "no"
            lines.append(f"{row['recipe']} {row['head']}: test {row['test_accuracy']:.1%} ({row['precision']}); "
                         f"test accuracy within the {other['precision']} row's 95% interval: {inside} "
                         f"({other['recipe']} {other['test_accuracy']:.1%}, {low:.1%}-{high:.1%})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/elpv"))
    parser.add_argument("--workdir", type=Path, default=Path("featcache-out/bench-accuracy"))
    parser.add_argument("--only", nargs="*", choices=[r.name for r in RECIPES], help="Recipes to run.")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="32 px, random init, 2 epochs: a smoke test.")
    args = parser.parse_args()
    if not args.data.exists():
        featcache("datasets", "elpv", "--dest", str(args.data.parent))
    rows = []
    for recipe in RECIPES:
        if args.only and recipe.name not in args.only:
            continue
        rows += run_recipe(recipe, args.data, args.workdir, args.tiny)
        print(f"{recipe.name}: " + ", ".join(f"{r['head']} {r['test_accuracy']:.1%}" for r in rows
                                               if r["recipe"] == recipe.name), flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "paper": dict(PAPER)}, indent=2))


if __name__ == "__main__":
    main()
