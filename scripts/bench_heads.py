"""Epoch time of a head on the cache vs through the frozen base; re-extract cost; fit-head's peak RSS.

Three measurements in one run, on one machine:

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

    python scripts/bench_heads.py --data /tmp/demo/data/elpv [--images 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BATCH = 20  # Chollet's batch size, and fit-head's default
MiB = 2**20


def image_tree(data: Path, n: int, root: Path) -> tuple[int, int]:
    """Symlink about ``n`` images of ``data`` into ROOT/<split>/<class>/: every (split, class) keeps its
    share of the dataset, and at least one image. Returns (images linked, images in the whole training
    split)."""
    from featcache.dataset import load_dataset

    dataset = load_dataset(data)
    groups = defaultdict(list)
    for s in dataset.samples:
        groups[s.split, s.label].append(s)
    share = n / len(dataset.samples)
    chosen = [s for group in groups.values() for s in group[: max(1, round(share * len(group)))]]
    for s in chosen:
        link = root / s.split / dataset.classes[s.label] / s.relpath.replace("/", "__")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(s.path.resolve())
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

    args = ("extract", "--data", str(tree), "--workdir", str(workdir), "--image-size", str(size))
    first, _, _ = featcache(*args)
    second, _, text = featcache(*args)
    if "nothing to compute" not in text:
        raise SystemExit(f"the second extract computed rows:\n{text[-2000:]}")
    started = time.perf_counter()
    config, resolved = make_config("vgg16", image_size=size)
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
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    args.rss_heads = args.rss_heads.split(",")
    factors = [float(f) for f in args.rss_factors.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-heads-") as tmp:
        tree, workdir = Path(tmp) / "images", Path(tmp) / "featcache-out"
        args.images_used, full_rows = image_tree(args.data, args.images, tree)
        extract = reextract(tree, workdir, args.image_size)
        from featcache.cache import Cache

        epoch = epoch_times(Cache(Path(extract["cache"])), args.epochs, args.e2e_steps, full_rows)
        rss = peak_rss(Path(tmp) / "rss", args.rss_budget, factors, args.rss_heads, args.rss_epochs)
    print_tables(args, epoch, extract, rss)
    if args.json:
        import tensorflow as tf

        results = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "data": str(args.data),
                   "images": args.images_used, "epoch": epoch, "reextract": extract, "peak_rss": rss,
                   "cpus": os.cpu_count(), "machine": platform.processor(), "tensorflow": tf.__version__}
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
