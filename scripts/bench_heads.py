"""Epoch time of a head on the cache vs through the frozen base; re-extract cost; peak RSS; default heads vs tutorials.

Four measurements in one run, on one machine:

- epoch: Chollet's dense256 head (Flatten, Dense 256 relu, Dropout 0.5, softmax/sigmoid) trained on
  the cached VGG16 features, streamed from the shards as `featcache fit-head` trains it, vs the same
  head trained end to end: decoded images -> the frozen conv base (same weights, layer, size and
  preprocessing as the cache) -> the head, RMSprop 2e-5, batch 20 on both sides. Cache epochs are
  timed whole with ``model.fit`` (after one warm-up epoch); the end-to-end epoch is extrapolated from
  ``--e2e-steps`` timed steps (after two warm-up steps), decoding included, as every end-to-end epoch
  decodes its images again.
- re-extract: `featcache extract` (the CLI, in a subprocess) twice on the same images in a fresh
  workdir; the second finds the cache complete. Wall time of the command, interpreter start-up and
  imports included; the in-process work of the second (hash the images, check the shards' checksums)
  is timed too.
- peak RSS: `featcache fit-head --memory-budget` in a subprocess on synthetic float16 caches of
  VGG16 block5_pool rows, ``--rss-factors`` times the budget; peak RSS from the child's rusage.

- heads tables (also alone, on existing caches, with ``--caches``/``--cache``/``--fashion-mnist``):
  (A) accuracy: each default head, ``featcache.heads.fit_head(cache, name)`` with default
  ``FitOptions()``, beside the tutorials' recipe on the same features: Chollet's dense256 (RMSprop
  2e-5, 30 epochs, batch 20, unscaled) and the TF MobileNetV2 tutorial's linear head (RMSprop 1e-4,
  10 epochs, batch 32) through the same fit_head; plain scikit-learn on the flattened arrays for the
  others: ``LogisticRegression(C=0.01)`` unscaled, ``LinearSVC()`` and ``SVC()`` standardised.
  Validation and test accuracy, and whether each default head is at least as accurate on test.
  (B) speed: each default head's whole fit (its search over scaling, C and gamma; a Keras head's
  whole training) against one ``LogisticRegression()`` with default options on the standardised
  training arrays, timed in the same run, before and after the heads, with default threads (the
  goal's reference) and held to one thread. Printed as markdown with the command, the date, the
  CPU's bf16 flags, the load average and the featcache commit measured.

    python scripts/bench_heads.py --data /tmp/demo/data/elpv [--images 400] [--json out.json]
    python scripts/bench_heads.py --workdir /tmp/bench-out --cache 3f2a [--cache ...] \\
        [--fashion-mnist 3000 [--fashion-mnist-test 1000]] [--json heads.json]
    python scripts/bench_heads.py --caches elpv=/tmp/bench-out/3f2a... [--json heads.json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import re
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from featcache.heads import FitOptions

ROOT = Path(__file__).resolve().parents[1]
BATCH = 20  # Chollet's batch size, and fit-head's default
MiB = 2**20


def image_tree(data: Path, n: int, root: Path) -> tuple[int, int]:
    """Hard-link (or copy) about ``n`` images of ``data`` into ROOT/<split>/<class>/: every (split, class) keeps its
    share of the dataset, and at least one image. Returns (images linked, images in the whole training
    split)."""
    from featcache.dataset import load_dataset
    from featcache.files import link_or_copy

    dataset = load_dataset(data)
    groups = defaultdict(list)
    for s in dataset.samples:
        groups[s.split, s.label].append(s)
    share = n / len(dataset.samples)
    chosen = [s for group in groups.values() for s in group[: max(1, round(share * len(group)))]]
    for s in chosen:
        link = root / s.split / dataset.classes[s.label] / s.relpath.replace("/", "__")
        link.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(s.path.resolve(), link)
    return len(chosen), len(dataset.split("train"))


# Runs `featcache ARGS` and prints its peak RSS. The command is started from this small process, not
# from the benchmark's own (TensorFlow-sized) one: Linux counts a parent's memory at fork time in the
# child's ru_maxrss.
MEASURED = """
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-m", "featcache.cli", *sys.argv[1:]])
_, status, usage = os.wait4(child.pid, 0)
print(f"peak_rss_kib={usage.ru_maxrss}", flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def featcache(*args: str, rss: bool = False) -> tuple[float, int | None, str]:
    """(wall seconds, peak RSS bytes if ``rss``, stdout + stderr) of one `featcache` command, run as
    `python -m featcache.cli` (with ``rss``, through MEASURED, whose start-up adds a few ms)."""
    command = ["-c", MEASURED] if rss else ["-m", "featcache.cli"]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "200"})
    seconds = time.perf_counter() - started
    if done.returncode:
        what = shlex.join(["featcache", *args])
        raise SystemExit(f"{what} failed ({done.returncode}):\n{done.stdout[-3000:]}")
    peak = int(done.stdout.rsplit("peak_rss_kib=", 1)[1].split()[0]) * 1024 if rss else None
    return seconds, peak, done.stdout


# ---------------------------------------------------------------- re-extract


def reextract(tree: Path, workdir: Path, size: int) -> dict:
    """`featcache extract` twice on the same images; then the second's work alone, in process."""
    from featcache.dataset import load_dataset
    from featcache.extract import extract, make_config

    args = ("extract", "--data", str(tree), "--workdir", str(workdir), "--image-size", str(size),
            "--precision", "float32")  # never auto: comparable runs, the same cache as the in-process call
    first, _, _ = featcache(*args)
    second, _, text = featcache(*args)
    if "nothing to compute" not in text:
        raise SystemExit(f"the second extract computed rows:\n{text[-2000:]}")
    started = time.perf_counter()
    config, resolved = make_config("vgg16", image_size=size, precision="float32")
    result = extract(load_dataset(tree), config, resolved, workdir, show_progress=False)
    work = time.perf_counter() - started
    return {"command": shlex.join(["featcache", *args]), "first_seconds": first, "second_seconds": second,
            "fraction": second / first, "second_work_seconds": work, "work_fraction": work / first,
            "cache": str(result.cache.path)}


# ---------------------------------------------------------------- epoch on the cache vs end to end


def epoch_times(cache, epochs: int, e2e_steps: int, full_rows: int) -> dict:
    """Seconds per epoch of dense256 on the cache and end to end, for the subset's training split and
    for one of ``full_rows`` rows (the whole dataset's): the cache side runs that epoch for real,
    cycling the subset's cached rows; the end-to-end side scales its seconds per step."""
    import keras

    from featcache.heads.keras_heads import build_keras_head, compile_head
    from featcache.streaming import split_batches

    n_classes = len(cache.classes)
    n_train = cache.manifest["splits"]["train"]["rows"]
    steps, full_steps = math.ceil(n_train / BATCH), math.ceil(full_rows / BATCH)

    keras.utils.set_random_seed(0)
    head = compile_head(build_keras_head("dense256", cache.manifest["feature_shape"], n_classes), n_classes,
                        "rmsprop", 2e-5)
    train = split_batches(cache, "train", BATCH, shuffle_seed=0)
    head.fit(train, epochs=1, verbose=0, shuffle=False)  # warm-up: tracing
    started = time.perf_counter()
    head.fit(train, epochs=epochs, verbose=0, shuffle=False)
    cache_epoch = (time.perf_counter() - started) / epochs
    started = time.perf_counter()
    head.fit(train.repeat(), steps_per_epoch=full_steps, epochs=1, verbose=0, shuffle=False)
    cache_full_epoch = time.perf_counter() - started

    e2e_step, frozen = end_to_end_step(cache, e2e_steps)
    return {
        "train_rows": n_train, "full_train_rows": full_rows, "batch_size": BATCH, "steps_per_epoch": steps,
        "full_steps_per_epoch": full_steps, "feature_shape": cache.manifest["feature_shape"],
        "cache_epochs_timed": epochs, "cache_seconds_per_epoch": cache_epoch,
        "cache_seconds_per_step": cache_epoch / steps, "cache_seconds_per_full_epoch": cache_full_epoch,
        "e2e_steps_timed": e2e_steps, "e2e_seconds_per_step": e2e_step,
        "e2e_seconds_per_epoch": e2e_step * steps, "e2e_seconds_per_full_epoch": e2e_step * full_steps,
        "speedup": e2e_step * steps / cache_epoch, "full_speedup": e2e_step * full_steps / cache_full_epoch,
        "trainable_params": int(sum(np.prod(w.shape) for w in head.trainable_weights)),
        "frozen_params": frozen,
    }


def end_to_end_step(cache, steps: int) -> tuple[float, int]:
    """(seconds per training step, frozen parameters) of Chollet's model: images -> frozen conv base
    (the cache's backbone, weights, layer, size and preprocessing) -> dense256, on the cache's
    training images, decoded again every epoch as end-to-end training does."""
    import keras
    import tensorflow as tf

    from featcache.extract import decoded_batches
    from featcache.heads.keras_heads import build_keras_head, compile_head
    from featcache.model import cache_config, cache_weights, feature_model

    config = cache_config(cache)
    base = feature_model(config, cache_weights(cache))
    base.trainable = False
    keras.utils.set_random_seed(0)
    n_classes = len(cache.classes)
    head = compile_head(build_keras_head("dense256", base.output.shape[1:], n_classes), n_classes, "rmsprop", 2e-5)
    pixels = keras.Input((config.image_size, config.image_size, 3))
    full = keras.Model(pixels, head(base(pixels)))
    full.compile(optimizer=keras.optimizers.RMSprop(2e-5), loss=head.loss, metrics=["accuracy"])

    root = Path(cache.manifest["dataset"]["root"])
    _, labels, relpaths = cache.read("train")

    def image_batches():
        while True:
            for indices, images in decoded_batches([root / p for p in relpaths], config.image_size,
                                                   config.resize, BATCH, lambda i, reason: None):
                yield tf.cast(images, tf.float32), labels[indices]

    batches = image_batches()
    for _ in range(2):  # warm-up: tracing, allocation
        full.train_on_batch(*next(batches))
    started = time.perf_counter()
    for _ in range(steps):
        full.train_on_batch(*next(batches))
    seconds = (time.perf_counter() - started) / steps
    return seconds, int(sum(np.prod(w.shape) for w in full.non_trainable_weights))


# ---------------------------------------------------------------- peak RSS of fit-head


def peak_rss(workdir: Path, budget: int, factors: list[float], heads: list[str], epochs: int) -> list[dict]:
    """Peak RSS of `featcache fit-head` on two-class caches of ``factor * budget`` bytes of features."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import blob_cache

    shape, row_bytes = (4, 4, 512), 4 * 4 * 512 * 2
    rows = []
    for factor in factors:
        train = max(64, round(factor * budget / row_bytes * 7 / 16))  # per class; 7:1 train:validation
        cache = blob_cache(workdir / f"x{factor:g}", per_class=(train, max(32, train // 7), 0), shape=shape,
                           dtype="float16", shard_size=1024)
        cache_bytes = sum(p.stat().st_size for p in cache.path.glob("*.h5"))
        for name in heads:
            seconds, peak, text = featcache(
                "fit-head", "--workdir", str(cache.path.parent), "--cache", cache.key[:16], "--head", name,
                "--memory-budget", str(budget), "--epochs", str(epochs), "--patience", "0", "--refit",
                rss=True)
            path = next(p for p in ("streamed", "in-memory") if f"; {p}; fit" in text)
            rows.append({"head": name, "factor": factor, "cache_bytes": cache_bytes, "budget_bytes": budget,
                         "peak_rss_bytes": peak, "path": path, "seconds": seconds, "epochs": epochs})
    return rows


# ---------------------------------------------------------------- default heads vs the tutorials' recipes


@dataclass(frozen=True)
class Recipe:
    """A tutorial's recipe on the cached features, beside the default head ``head`` it is compared with:
    the featcache head with the tutorial's options (``options``), or a plain scikit-learn estimator
    (``estimator()``) on the flattened arrays, standardised on the training rows or raw."""

    head: str
    name: str
    options: FitOptions | None = None
    estimator: Callable | None = None
    standardise: bool = False


def tutorial_recipes() -> list[Recipe]:
    """One tutorial recipe per default head (the linear head's is the TF MobileNetV2 tutorial's)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import SVC, LinearSVC

    from featcache.heads import FitOptions

    return [
        Recipe("dense256", "Chollet: RMSprop 2e-5, 30 epochs, batch 20, unscaled",
               FitOptions(optimizer="rmsprop", learning_rate=2e-5, epochs=30, batch_size=20, scaling="none",
                          patience=None)),
        Recipe("linear", "TF tutorial: RMSprop 1e-4, 10 epochs, batch 32, unscaled",
               FitOptions(optimizer="rmsprop", learning_rate=1e-4, epochs=10, batch_size=32, scaling="none",
                          patience=None)),
        Recipe("logreg", f"LogisticRegression(C=0.01, max_iter={LOGREG_MAX_ITER}), unscaled",
               estimator=lambda: LogisticRegression(C=0.01, max_iter=LOGREG_MAX_ITER)),
        Recipe("svm", "LinearSVC(), standardised", estimator=LinearSVC, standardise=True),
        Recipe("svm-rbf", "SVC(), standardised", estimator=SVC, standardise=True),
    ]


LOGREG_MAX_ITER = 1000
SPEED_GOALS = {"linear": 1.0, "keras": 3.0}  # head kind -> fit seconds / one plain LogisticRegression()


@dataclass
class Arrays:
    """A cache's splits in memory as float32, in the stored shape (heads) and flattened (scikit-learn)."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]

    @classmethod
    def of(cls, cache) -> Arrays:
        x, y = {}, {}
        for split in ("train", "validation", "test"):
            x[split], y[split], _ = cache.to_numpy(split, flatten=False)
        return cls(x, y)

    def flat(self, split: str) -> np.ndarray:
        return self.x[split].reshape(len(self.x[split]), -1)


def head_tables(cache, label: str, seeds: tuple[int, ...] = (0,)) -> tuple[list[dict], list[dict]]:
    """(accuracy rows, speed rows) of one cache: every default head and its tutorial recipe, and every
    default head's fit time against one plain LogisticRegression() timed before and after the heads.
    Keras heads train once per seed (their accuracy is the mean; fit seconds are the first seed's):
    one seed moves elpv's test accuracy by a point or two, as much as the recipes differ."""
    import keras

    arrays = Arrays.of(cache)
    warm_up(cache, arrays)
    reference = [reference_seconds(arrays)]
    accuracy, speed = [], []
    for recipe in tutorial_recipes():
        say(f"{label}: {recipe.head} (default options)")
        default, head = fit_default(cache, recipe.head, arrays, seeds)
        say(f"{label}: {recipe.head}, {recipe.name}")
        tutorial = fit_tutorial(cache, recipe, arrays, seeds)
        better = default["test_accuracy"] >= tutorial["test_accuracy"]
        default.update(at_least_tutorial=better, tutorial_test_accuracy=tutorial["test_accuracy"])
        accuracy += [{"dataset": label, **default}, {"dataset": label, **tutorial}]
        speed.append({"dataset": label, "head": recipe.head, "kind": head.kind,
                      "head_fit_seconds": default["fit_seconds"], "goal": SPEED_GOALS.get(head.kind)})
        keras.backend.clear_session()
    reference.append(reference_seconds(arrays))
    seconds = float(np.mean([r["default"] for r in reference]))
    one_thread = float(np.mean([r["one_thread"] for r in reference]))
    for row in speed:
        ratio = row["head_fit_seconds"] / seconds
        row.update(reference_seconds=seconds, reference_runs=[r["default"] for r in reference], ratio=ratio,
                   met=None if row["goal"] is None else ratio <= row["goal"],
                   one_thread_seconds=one_thread, one_thread_runs=[r["one_thread"] for r in reference],
                   one_thread_ratio=row["head_fit_seconds"] / one_thread,
                   train_rows=len(arrays.y["train"]), features=arrays.flat("train").shape[1])
    return accuracy, speed


def warm_up(cache, arrays: Arrays) -> None:
    """One untimed plain fit and one Keras epoch, so that no timed fit pays for first imports, TensorFlow's
    start-up or allocating the arrays' first copies."""
    from featcache.heads import FitOptions, fit_head

    reference_seconds(arrays)
    fit_head(cache, "linear", FitOptions(epochs=1, patience=None))


def fit_default(cache, name: str, arrays: Arrays, seeds: tuple[int, ...] = (0,)):
    """(row, head): head ``name`` with default FitOptions (but the seed) through featcache.heads.fit_head;
    its fit seconds as fit_head records them (reading train and validation from the shards included)."""
    from featcache.heads import FitOptions, fit_head

    heads = [fit_head(cache, name, FitOptions(seed=seed)) for seed in seeds_of(name, seeds)]
    row = {"head": name, "recipe": "featcache default", "default": True,
           "fit_seconds": heads[0].record["fit_seconds"], "notes": default_notes(heads[0].record),
           **seed_accuracies([{split: head.predict(arrays.x[split]) for split in SCORED} for head in heads],
                             arrays, seeds_of(name, seeds))}
    return row, heads[0]


SCORED = ("validation", "test")


def seeds_of(name: str, seeds: tuple[int, ...]) -> tuple[int, ...]:
    """The seeds a head is trained with: every one for a Keras head, the first for the others (their
    fit draws no random numbers that change it)."""
    from featcache.heads import build_head

    return seeds if build_head(name).kind == "keras" else seeds[:1]


def seed_accuracies(predictions: list[dict[str, np.ndarray]], arrays: Arrays, seeds: tuple[int, ...]) -> dict:
    """Validation and test accuracy, the mean over one prediction per seed (and each seed's, with several)."""
    each = {split: [float(np.mean(p[split] == arrays.y[split])) for p in predictions] for split in SCORED}
    row = {f"{split}_accuracy": float(np.mean(each[split])) for split in SCORED}
    if len(predictions) > 1:
        row.update(seeds=list(seeds), **{f"{split}_accuracy_by_seed": each[split] for split in SCORED})
    return row


def default_notes(record: dict) -> str:
    """What validation chose: scaling, C, gamma, or the epochs a Keras head ran and kept."""
    chosen = record.get("chosen", {})
    parts = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in chosen.items()]
    if "epochs_run" in record:
        parts.append(f"{record['epochs_run']} epochs" + (f", best {record['best_epoch']}"
                                                          if "best_epoch" in record else ""))
    return ", ".join(parts)


def fit_tutorial(cache, recipe: Recipe, arrays: Arrays, seeds: tuple[int, ...] = (0,)) -> dict:
    """A tutorial recipe's validation and test accuracy (and fit seconds) on the same arrays, the
    Keras recipes' a mean over ``seeds``."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.preprocessing import StandardScaler

    from featcache.heads import fit_head

    row = {"head": recipe.head, "recipe": recipe.name, "default": False}
    if recipe.options is not None:
        heads = [fit_head(cache, recipe.head, recipe.options.pinned(seed=seed)) for seed in seeds]
        row.update(fit_seconds=heads[0].record["fit_seconds"], notes=default_notes(heads[0].record),
                   **seed_accuracies([{split: head.predict(arrays.x[split]) for split in SCORED} for head in heads],
                                     arrays, seeds))
        return row
    scaler = StandardScaler().fit(arrays.flat("train")) if recipe.standardise else None
    x = {split: scaler.transform(arrays.flat(split)) if scaler else arrays.flat(split)
         for split in ("train", "validation", "test")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        started = time.perf_counter()
        estimator = recipe.estimator().fit(x["train"], arrays.y["train"])
        row["fit_seconds"] = time.perf_counter() - started
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    row["notes"] = "" if converged else "did not converge (ConvergenceWarning)"
    return {**row, **seed_accuracies([{split: estimator.predict(x[split]) for split in SCORED}], arrays, seeds[:1])}


def plain_logreg_seconds(arrays: Arrays, threads: int | None = None) -> float:
    """Seconds of one LogisticRegression() fit, default options, on the standardised training arrays
    (standardising not timed); with ``threads``, BLAS and OpenMP held to that many threads."""
    import warnings
    from contextlib import nullcontext

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    x = StandardScaler().fit_transform(arrays.flat("train"))
    with warnings.catch_warnings(), (threadpool_limits(threads) if threads else nullcontext()):
        warnings.simplefilter("ignore", ConvergenceWarning)
        started = time.perf_counter()
        LogisticRegression().fit(x, arrays.y["train"])
        return time.perf_counter() - started


def reference_seconds(arrays: Arrays) -> dict[str, float]:
    """One plain LogisticRegression() fit as a user runs it (default threads: the goal's reference), and
    held to one thread, as the linear heads hold their solves."""
    return {"default": plain_logreg_seconds(arrays), "one_thread": plain_logreg_seconds(arrays, threads=1)}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- caches to measure


def open_caches(args) -> list[tuple[str, object]]:
    """(label, Cache) of every cache the heads tables run on: --caches [LABEL=]FOLDER, --workdir with
    --cache KEY, and the Fashion-MNIST subset when --fashion-mnist N is given."""
    import featcache
    from featcache.cache import Cache

    caches = []
    for given in args.caches:
        label, _, folder = given.rpartition("=")
        cache = Cache(Path(folder))
        caches.append((label or dataset_label(cache), cache))
    for key in args.cache:
        cache = featcache.open_cache(args.workdir, key)
        caches.append((dataset_label(cache), cache))
    if args.fashion_mnist:
        cache = fashion_mnist_cache(args.fashion_mnist_dir, args.fashion_mnist, args.fashion_mnist_test,
                                    args.workdir, args.seed)
        caches.append(("fashion-mnist", cache))
    return caches


def dataset_label(cache) -> str:
    """The name of the folder a cache's images came from (``elpv``), or its key's first 8 digits."""
    root = Path(cache.manifest.get("dataset", {}).get("root", ""))
    return cache.key[:8] if root.parent.name == "arrays" or not root.name else root.name


def describe(cache) -> str:
    config, splits = cache.config, cache.manifest["splits"]
    rows = "/".join(str(splits[s]["rows"]) for s in ("train", "validation", "test") if s in splits)
    model = " ".join(str(v) for v in (config["backbone"], config.get("layer"), config["image_size"]) if v)
    return (f"cache {cache.key[:16]}: {model} px, pooling {config.get('pooling')}, features {cache.feature_shape} "
            f"{config['dtype']}, {len(cache.classes)} classes, {rows} train/validation/test rows")


# Fashion-MNIST (Xiao et al. 2017) as the Debian package dataset-fashion-mnist installs it.
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle_boot")
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: magic 0x0000 0x08 NDIM, NDIM big-endian uint32 sizes."""
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    if data[:3] != b"\0\0\x08":
        raise SystemExit(f"{path}: not an IDX file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def idx_file(folder: Path, stem: str) -> Path:
    for path in (folder / f"{stem}.gz", folder / stem):
        if path.is_file():
            return path
    raise SystemExit(f"{folder}: no {stem}[.gz]; `apt-get install dataset-fashion-mnist` installs it in "
                     f"{FASHION_DIR}, or give --fashion-mnist-dir")


def fashion_mnist(folder: Path, n_train: int, n_test: int, seed: int):
    """(images (N, 28, 28) uint8, labels, splits): a stratified ``n_train`` of the training set, 4/5 train
    and 1/5 validation, and a stratified ``n_test`` of the test set, drawn with ``seed``."""
    from sklearn.model_selection import train_test_split

    parts = {}
    for part, (images, labels) in FASHION_FILES.items():
        parts[part] = read_idx(idx_file(folder, images)), read_idx(idx_file(folder, labels))
    x, y = parts["train"]
    chosen, _ = train_test_split(np.arange(len(y)), train_size=n_train, stratify=y, random_state=seed)
    train, validation = train_test_split(chosen, test_size=0.2, stratify=y[chosen], random_state=seed)
    x_test, y_test = parts["test"]
    test, _ = train_test_split(np.arange(len(y_test)), train_size=n_test, stratify=y_test, random_state=seed)
    images = np.concatenate([x[train], x[validation], x_test[test]])
    labels = np.concatenate([y[train], y[validation], y_test[test]])
    splits = ["train"] * len(train) + ["validation"] * len(validation) + ["test"] * len(test)
    return images, labels, splits


def fashion_mnist_cache(folder: Path, n_train: int, n_test: int, workdir: Path, seed: int):
    """The cache of a Fashion-MNIST subset: VGG16 (ImageNet weights) at 32 px, its smallest input,
    average-pooled, extracted through the public API (computed once; a second run finds it)."""
    import featcache

    images, labels, splits = fashion_mnist(folder, n_train, n_test, seed)
    return featcache.extract(images=images, labels=labels, splits=splits, classes=FASHION_CLASSES,
                             backbone="vgg16", workdir=workdir, image_size=32, pooling="avg",
                             precision="float32")


# ---------------------------------------------------------------- printing the heads tables


def cpu_flags() -> str:
    """The bf16 matmul flags of this CPU, as `grep -o 'amx_bf16\\|avx512_bf16' /proc/cpuinfo | sort -u`."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown (no /proc/cpuinfo)"
    flags = sorted({flag for flag in ("amx_bf16", "avx512_bf16") if re.search(rf"\b{flag}\b", text)})
    return " ".join(flags) or "none"


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else platform.processor()


def context() -> dict:
    """Where and when the tables were measured."""
    return {"command": shlex.join(["python", *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M %Z"),
            "cpu_flags": cpu_flags(), "cpu": cpu_model(), "cpus": os.cpu_count(),
            "load_average": [round(v, 2) for v in os.getloadavg()], "git": git_state()}


def git_state() -> str:
    """The commit measured, and the product files changed in the working tree since (heads may be)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "featcache"], capture_output=True, text=True,
                               cwd=ROOT, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    changed = sorted(line[3:] for line in dirty if line.strip())
    return commit + (f" + uncommitted {', '.join(changed)}" if changed else "")


def heads_markdown(where: dict, caches: list[tuple[str, object]], accuracy: list[dict], speed: list[dict]) -> str:
    """The two tables as markdown, with the command, date and CPU that made them."""
    lines = [f"    {where['command']}", "",
             f"{where['date']}; {where['cpu']}, {where['cpus']} CPUs, bf16 flags: {where['cpu_flags']}; load "
             f"average {load(where.get('load_average_at_start'))} at the start, {load(where['load_average'])} at "
             f"the end; featcache {where.get('git_at_start', where['git'])}", ""]
    if where.get("git_at_start", where["git"]) != where["git"]:
        lines[-1:-1] = [f"**featcache changed during the run**: {where['git']} at the end (the heads measured are "
                        "the code imported at the start)."]
    lines += [f"- {label}: {describe(cache)}" for label, cache in caches]
    seeds = where.get("seeds", [0])
    several = f", Keras heads and recipes the mean over seeds {', '.join(map(str, seeds))}" if len(seeds) > 1 else ""
    lines += ["", "Accuracy: each default head (`fit_head(cache, name)`, default `FitOptions()`) and the tutorial "
              f"recipe on the same features{several}; the last column compares test accuracy.", "",
              "| dataset | head | recipe | val | test | fit s | chosen / notes | default >= tutorial on test |",
              "|---|---|---|---:|---:|---:|---|---|"]
    for row in accuracy:
        verdict = ""
        if row["default"]:
            gap = 100 * (row["test_accuracy"] - row["tutorial_test_accuracy"])
            verdict = f"{'yes' if row['at_least_tutorial'] else '**no**'} ({gap:+.1f} points)"
        lines.append(f"| {row['dataset']} | {row['head']} | {row['recipe']} | {row['validation_accuracy']:.1%} | "
                     f"{row['test_accuracy']:.1%} | {row['fit_seconds']:.1f} | {notes_of(row)} | {verdict} |")
    lines += ["", "Speed: each default head's whole fit (`head.json` fit_seconds: reading train and validation, "
              "the search over scaling, C and gamma, or the whole training) against one "
              "`LogisticRegression()` (default options) on the StandardScaler-standardised train arrays, "
              "timed before and after the heads (mean; both runs in brackets), with default threads (the "
              "goal's reference) and held to one thread (threadpoolctl), as the linear heads hold their solves.",
              "",
              "| dataset | train rows x features | head | head fit s | LogisticRegression() s | ratio | goal | met "
              "| 1-thread LogisticRegression() s | ratio |",
              "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for row in speed:
        goal = "—" if row["goal"] is None else f"<= {row['goal']:g}x"
        met = "—" if row["met"] is None else ("yes" if row["met"] else "**no**")
        runs = " / ".join(f"{s:.2f}" for s in row["reference_runs"])
        one = " / ".join(f"{s:.2f}" for s in row["one_thread_runs"])
        lines.append(f"| {row['dataset']} | {row['train_rows']} x {row['features']} | {row['head']} | "
                     f"{row['head_fit_seconds']:.2f} | {row['reference_seconds']:.2f} ({runs}) | "
                     f"{row['ratio']:.1f}x | {goal} | {met} | {row['one_thread_seconds']:.2f} ({one}) | "
                     f"{row['one_thread_ratio']:.1f}x |")
    return "\n".join(lines)


def notes_of(row: dict) -> str:
    """The row's notes, and each seed's test accuracy where there were several."""
    if "test_accuracy_by_seed" not in row:
        return row["notes"]
    each = " / ".join(f"{a:.1%}" for a in row["test_accuracy_by_seed"])
    return ", ".join(part for part in (row["notes"], f"test by seed {each}") if part)


def load(averages: list[float] | None) -> str:
    return "/".join(f"{v:.1f}" for v in averages) if averages else "?"


def run_head_tables(caches: list[tuple[str, object]], seeds: tuple[int, ...] = (0,)) -> tuple[str, dict]:
    """(markdown, JSON-ready results) of the heads tables over ``caches``."""
    import featcache.heads  # noqa: F401  (imported now: the code measured is the working tree's at this moment)

    accuracy, speed = [], []
    load_at_start, git_at_start = [round(v, 2) for v in os.getloadavg()], git_state()
    for label, cache in caches:
        say(describe(cache))
        rows, times = head_tables(cache, label, seeds)
        accuracy += rows
        speed += times
    where = {**context(), "load_average_at_start": load_at_start, "git_at_start": git_at_start, "seeds": list(seeds)}
    results = {**where, "caches": {label: {"key": cache.key, "path": str(cache.path), "description": describe(cache)}
                                   for label, cache in caches}, "accuracy": accuracy, "speed": speed}
    return heads_markdown(where, caches, accuracy, speed), results


# ---------------------------------------------------------------- printing, main


def print_tables(args, epoch: dict, extract: dict, rss: list[dict]) -> None:
    print(f"\n{platform.node()}: {os.cpu_count()} CPUs; {args.images_used} images of {args.data}; vgg16 at "
          f"{args.image_size} px, features {tuple(epoch['feature_shape'])} float16")
    print(f"\ndense256, batch {BATCH}, {epoch['trainable_params']:,} trainable parameters "
          f"(+ {epoch['frozen_params']:,} frozen end to end); epochs of the subset's {epoch['train_rows']} "
          f"training rows ({epoch['steps_per_epoch']} steps) and of the dataset's {epoch['full_train_rows']} "
          f"({epoch['full_steps_per_epoch']} steps)")
    print(f"{'path':<46}{'s/step':>9}{'s/epoch':>10}{'s/epoch':>10}  how")
    print(f"{'':<46}{'':>9}{'subset':>10}{'dataset':>10}")
    print(f"{'cached features (streamed shards)':<46}{epoch['cache_seconds_per_step']:>9.4f}"
          f"{epoch['cache_seconds_per_epoch']:>10.3f}{epoch['cache_seconds_per_full_epoch']:>10.3f}"
          f"  measured: model.fit, mean of {epoch['cache_epochs_timed']} epochs; 1 epoch cycling the subset")
    print(f"{'end to end (decode, frozen vgg16, dense256)':<46}{epoch['e2e_seconds_per_step']:>9.4f}"
          f"{epoch['e2e_seconds_per_epoch']:>10.1f}{epoch['e2e_seconds_per_full_epoch']:>10.1f}"
          f"  extrapolated: {epoch['e2e_steps_timed']} timed steps x steps per epoch")
    print(f"{'speed-up per epoch (target >= 200x)':<46}{'':>9}{epoch['speedup']:>9.0f}x"
          f"{epoch['full_speedup']:>9.0f}x")
    print(f"\n{'re-extract, unchanged dataset':<46}{'seconds':>10}")
    print(f"{'first `featcache extract`':<46}{extract['first_seconds']:>10.2f}")
    print(f"{'second `featcache extract` (wall)':<46}{extract['second_seconds']:>10.2f}"
          f"  {extract['fraction']:.2%} of the first (target < 2%)")
    print(f"{'second, in-process work (hash, checksums)':<46}{extract['second_work_seconds']:>10.2f}"
          f"  {extract['work_fraction']:.2%} of the first")
    print(f"\n`featcache fit-head --memory-budget {format_mib(args.rss_budget)} --epochs {args.rss_epochs}`")
    print(f"{'head':<10}{'cache':>10}{'x budget':>10}{'path':>11}{'peak RSS':>11}{'seconds':>9}")
    for row in rss:
        times = row["cache_bytes"] / row["budget_bytes"]
        print(f"{row['head']:<10}{format_mib(row['cache_bytes']):>10}{times:>10.1f}{row['path']:>11}"
              f"{format_mib(row['peak_rss_bytes']):>11}{row['seconds']:>9.1f}")
    for name in args.rss_heads:
        peaks = [r for r in rss if r["head"] == name]
        low, high = min(peaks, key=lambda r: r["factor"]), max(peaks, key=lambda r: r["factor"])
        if low is not high:
            print(f"{name}: cache {high['cache_bytes'] / low['cache_bytes']:.0f}x larger, peak RSS "
                  f"{round((high['peak_rss_bytes'] - low['peak_rss_bytes']) / MiB):+d} MiB")


def format_mib(size: int) -> str:
    return f"{size / MiB:.0f} MiB"


def main() -> None:
    from featcache import quiet

    quiet.quiet_tensorflow()  # before TensorFlow starts: featcache's lines only, as the CLI prints
    from featcache.streaming import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/elpv"),
                        help="Image dataset (any layout featcache reads); a subset is linked to a temp tree.")
    parser.add_argument("--images", type=int, default=400, help="Images of --data to use (splits kept).")
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--epochs", type=int, default=5, help="Timed epochs of the head on the cache.")
    parser.add_argument("--e2e-steps", type=int, default=6, help="Timed end-to-end steps (batch 20).")
    parser.add_argument("--rss-budget", type=parse_size, default="64M", help="fit-head --memory-budget.")
    parser.add_argument("--rss-factors", default="0.5,4", help="Cache sizes as multiples of the budget.")
    parser.add_argument("--rss-heads", default="logreg,dense256")
    parser.add_argument("--rss-epochs", type=int, default=1)
    heads = parser.add_argument_group(
        "heads tables only", "Given any of these, only the accuracy and speed tables of the default heads run, "
        "on existing caches (and the Fashion-MNIST subset), without the measurements above.")
    heads.add_argument("--caches", nargs="+", default=[], metavar="[LABEL=]FOLDER", help="Cache folders.")
    heads.add_argument("--workdir", type=Path, default=None,
                       help="Workdir of --cache keys, and where --fashion-mnist extracts.")
    heads.add_argument("--cache", action="append", default=[], metavar="KEY",
                       help="A cache of --workdir by key or prefix (repeatable).")
    heads.add_argument("--fashion-mnist", type=int, default=0, metavar="N",
                       help="Also a stratified N of Fashion-MNIST's training set (4/5 train, 1/5 validation), "
                            "VGG16 at 32 px, average-pooled, extracted into --workdir.")
    heads.add_argument("--fashion-mnist-test", type=int, default=1000, metavar="N",
                       help="Stratified test images of Fashion-MNIST's test set.")
    heads.add_argument("--fashion-mnist-dir", type=Path, default=FASHION_DIR,
                       help="Folder of the four IDX files (gzipped or not).")
    heads.add_argument("--seed", type=int, default=0, help="Seed of the Fashion-MNIST subset.")
    heads.add_argument("--seeds", type=lambda text: tuple(int(s) for s in text.split(",")), default=(0,),
                       help="Seeds the Keras heads and recipes train with, comma separated; their accuracy is "
                            "the mean (default 0).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.caches or args.cache or args.fashion_mnist:
        markdown, results = run_head_tables(open_caches(args), args.seeds)
        print(markdown)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
        return
    args.rss_heads = args.rss_heads.split(",")
    factors = [float(f) for f in args.rss_factors.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-heads-") as tmp:
        tree, workdir = Path(tmp) / "images", Path(tmp) / "featcache-out"
        args.images_used, full_rows = image_tree(args.data, args.images, tree)
        extract = reextract(tree, workdir, args.image_size)
        from featcache.cache import Cache

        cache = Cache(Path(extract["cache"]))
        epoch = epoch_times(cache, args.epochs, args.e2e_steps, full_rows)
        rss = peak_rss(Path(tmp) / "rss", args.rss_budget, factors, args.rss_heads, args.rss_epochs)
        markdown, heads = run_head_tables([(f"{args.data.name} subset", cache)])
    print_tables(args, epoch, extract, rss)
    print(f"\n{markdown}")
    if args.json:
        import tensorflow as tf

        results = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "data": str(args.data),
                   "images": args.images_used, "epoch": epoch, "reextract": extract, "peak_rss": rss,
                   "heads": heads, "cpus": os.cpu_count(), "machine": platform.processor(),
                   "tensorflow": tf.__version__}
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
