"""Images/s of `featcache extract` vs the tutorials' feature-extraction loop and the machine's matmul rate.

Every repeat measures, one after the other in this process, on the same images, backbone and size:

- sgemm: a large float32 ``np.matmul`` through NumPy's BLAS, a few reps before, between and after
  the two passes (median); divided by the backbone's FLOPs per image (counted from the Keras
  model) it gives the img/s of a pipeline running at matmul speed, the "limit";
- tutorial: Chollet's loop, ImageDataGenerator(rescale=1/255).flow_from_directory, ``predict`` per
  batch of 20, each batch copied into a NumPy array (``class_mode="sparse"``: elpv has 4 classes);
- extract: ``featcache extract`` through its Python API into a fresh workdir: scan and hash,
  decode, backbone, HDF5 shards and manifest.

Both passes build their model outside the timing (the tutorials build ``conv_base`` in an earlier
cell; ``+build`` is extract with it) and pay their first call's tracing inside it. The passes
alternate order between repeats so load drifts hit both alike. Wall-clock ratios are only
meaningful within one run, and on a shared machine they swing with other processes' load, so CPU
time is reported too: GFLOP per CPU-second of each pass against the sgemm's (``cpu`` columns) is
work efficiency, which load moves much less (the passes' own figures stay within a few %; BLAS
threads spin while they wait for a descheduled partner, so sgemm's drops under load and these
ratios rise); ``cores`` is CPU-seconds per wall second, how much of the machine extract got.
Prints a table and writes JSON:

    python scripts/bench_extract.py --data data/elpv [--images 240] [--repeats 3] [--json out.json]
    python scripts/bench_extract.py --data DIR --images 8 --repeats 1 --image-size 32 --weights none \
        --matmul-size 64 --matmul-reps 1     # the smoke test's tiny run
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

TUTORIAL_BATCH = 20  # the notebook's batch size


def image_tree(data: Path, n: int, root: Path) -> int:
    """Hard-link (or copy) ``n`` images of ``data`` (any layout featcache reads) into ROOT/<class>/, classes
    interleaved.

    flow_from_directory and featcache both read this tree, so both see exactly the same files.
    """
    from featcache.dataset import load_dataset
    from featcache.files import link_or_copy

    dataset = load_dataset(data)
    by_class = defaultdict(list)
    for s in dataset.samples:
        by_class[s.label].append(s)
    rows = itertools.zip_longest(*by_class.values())
    chosen = [s for row in rows for s in row if s is not None][:n]
    for s in chosen:
        link = root / dataset.classes[s.label] / s.relpath.replace("/", "__")
        link.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(s.path.resolve(), link)
    return len(chosen)


def cpu_seconds() -> float:
    """CPU time of this process, all threads: work done, whatever share of the machine it got."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Matmul:
    """float32 n x n x n matmuls through NumPy's BLAS; every rep's wall and CPU seconds are kept."""

    def __init__(self, n: int):
        rng = np.random.default_rng(0)
        self.a = rng.standard_normal((n, n), dtype=np.float32)
        self.b = rng.standard_normal((n, n), dtype=np.float32)
        self.flop = 2 * n**3
        self.a @ self.b  # warm-up: BLAS threads, pages

    def reps(self, count: int) -> list[tuple[float, float]]:
        timings = []
        for _ in range(count):
            started, cpu = time.perf_counter(), cpu_seconds()
            self.a @ self.b
            timings.append((time.perf_counter() - started, cpu_seconds() - cpu))
        return timings


def model_flop(model) -> float:
    """2 x multiply-adds of every convolution and dense layer (nested models included), per image."""
    import keras

    flop = 0.0
    for layer in model.layers:
        if hasattr(layer, "layers"):
            flop += model_flop(layer)
            continue
        outputs = int(np.prod(layer.output.shape[1:])) if hasattr(layer, "output") else 0
        if isinstance(layer, keras.layers.DepthwiseConv2D):  # kernel (kh, kw, channels, multiplier)
            flop += 2 * outputs * int(np.prod(layer.kernel.shape[:2]))
        elif isinstance(layer, keras.layers.SeparableConv2D):
            kh, kw, cin, multiplier = layer.depthwise_kernel.shape
            spatial = outputs // layer.filters
            flop += 2 * spatial * cin * multiplier * (kh * kw + layer.filters)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):  # (kh, kw, cin/groups, cout)
            flop += 2 * outputs * int(np.prod(layer.kernel.shape[:-1]))
    return flop


def tutorial_pass(tree: Path, n: int, backbone: str, weights_file: str | None, size: int) -> dict:
    """The notebook's extract_features(directory, sample_count), timed once ``conv_base`` is built."""
    from tensorflow.keras.preprocessing.image import ImageDataGenerator

    from featcache import backbones

    conv_base = backbones.get(backbone).build(weights_file, size)
    started, cpu = time.perf_counter(), cpu_seconds()
    datagen = ImageDataGenerator(rescale=1.0 / 255)
    features = np.zeros(shape=(n, *conv_base.output_shape[1:]))
    labels = np.zeros(shape=(n,))
    with contextlib.redirect_stdout(io.StringIO()):  # "Found N images belonging to K classes."
        generator = datagen.flow_from_directory(tree, target_size=(size, size), batch_size=TUTORIAL_BATCH,
                                                class_mode="sparse")
    i = 0
    for inputs_batch, labels_batch in generator:
        features_batch = conv_base.predict(inputs_batch, verbose=0)
        features[i * TUTORIAL_BATCH : (i + 1) * TUTORIAL_BATCH] = features_batch
        labels[i * TUTORIAL_BATCH : (i + 1) * TUTORIAL_BATCH] = labels_batch
        i += 1
        if i * TUTORIAL_BATCH >= n:
            break
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "rows": generator.samples}


def extract_pass(tree: Path, backbone: str, size: int, batch_size: int, xla: bool, weights: str) -> dict:
    """`featcache extract` on ``tree`` into a fresh workdir; the model build is timed apart."""
    from featcache import extract
    from featcache.dataset import load_dataset

    build = {"seconds": 0.0, "cpu_seconds": 0.0}
    extraction_model = extract.extraction_model  # what extract builds its model with

    def timed_extraction_model(*args, **kwargs):
        started, cpu = time.perf_counter(), cpu_seconds()
        model = extraction_model(*args, **kwargs)
        build["seconds"] += time.perf_counter() - started
        build["cpu_seconds"] += cpu_seconds() - cpu
        return model

    extract.extraction_model = timed_extraction_model
    try:
        with tempfile.TemporaryDirectory(prefix="bench-extract-") as workdir:
            started, cpu = time.perf_counter(), cpu_seconds()
            dataset = load_dataset(tree)
            config, resolved = extract.make_config(backbone, weights, image_size=size)
            result = extract.extract(dataset, config, resolved, Path(workdir), batch_size=batch_size,
                                     xla=xla, show_progress=False)
            total, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    finally:
        extract.extraction_model = extraction_model
    return {"seconds": total - build["seconds"], "cpu_seconds": cpu - build["cpu_seconds"],
            "seconds_with_build": total, "build_seconds": build["seconds"], "rows": result.computed}


def repeat_row(repeat: int, n: int, gflop: float, matmul_gflop: float, matmul: list[tuple[float, float]],
               passes: dict) -> dict:
    """One repeat's figures: img/s, ratios, and GFLOP per wall and per CPU second."""
    for name, measured in passes.items():
        if measured["rows"] != n:
            raise SystemExit(f"{name} computed {measured['rows']} rows, expected {n}")
    sgemm = statistics.median(matmul_gflop / wall for wall, _ in matmul)
    sgemm_cpu = statistics.median(matmul_gflop / cpu for _, cpu in matmul)
    tutorial, extract = passes["tutorial"], passes["extract"]
    return {
        "repeat": repeat + 1,
        "sgemm_gflops": sgemm, "sgemm_gflops_best": max(matmul_gflop / wall for wall, _ in matmul),
        "sgemm_gflop_per_cpu_s": sgemm_cpu,
        "limit_img_s": sgemm / gflop,
        "tutorial_img_s": n / tutorial["seconds"],
        "extract_img_s": n / extract["seconds"],
        "extract_img_s_with_build": n / extract["seconds_with_build"],
        "extract_build_seconds": extract["build_seconds"],
        "extract_vs_tutorial": tutorial["seconds"] / extract["seconds"],
        "tutorial_vs_limit": n * gflop / tutorial["seconds"] / sgemm,
        "extract_vs_limit": n * gflop / extract["seconds"] / sgemm,
        "extract_gflops": n * gflop / extract["seconds"],
        "tutorial_cores": tutorial["cpu_seconds"] / tutorial["seconds"],
        "extract_cores": extract["cpu_seconds"] / extract["seconds"],
        "tutorial_vs_limit_cpu": n * gflop / tutorial["cpu_seconds"] / sgemm_cpu,
        "extract_vs_limit_cpu": n * gflop / extract["cpu_seconds"] / sgemm_cpu,
    }


COLUMNS = (  # header, key, format
    ("repeat", "repeat", "{}"), ("sgemm GF/s", "sgemm_gflops", "{:.0f}"),
    ("limit img/s", "limit_img_s", "{:.2f}"),
    ("tutorial img/s", "tutorial_img_s", "{:.2f}"), ("extract img/s", "extract_img_s", "{:.2f}"),
    ("+build", "extract_img_s_with_build", "{:.2f}"), ("ext/tut", "extract_vs_tutorial", "{:.2f}x"),
    ("tut/limit", "tutorial_vs_limit", "{:.0%}"), ("ext/limit", "extract_vs_limit", "{:.0%}"),
    ("ext GF/s", "extract_gflops", "{:.0f}"), ("cores", "extract_cores", "{:.2f}"),
    ("tut/limit cpu", "tutorial_vs_limit_cpu", "{:.0%}"), ("ext/limit cpu", "extract_vs_limit_cpu", "{:.0%}"),
)


def print_row(row: dict) -> None:
    print("".join(f"{f.format(row[k]):>{len(h) + 2}}" for h, k, f in COLUMNS), flush=True)


def main() -> None:
    from featcache import quiet

    quiet.quiet_tensorflow()  # before TensorFlow starts: featcache's lines only, as the CLI prints
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/elpv"),
                        help="Images in any layout featcache reads; a subset is linked into a temp tree.")
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--image-size", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=32, help="featcache extract's batch size.")
    parser.add_argument("--xla", action="store_true", help="featcache extract --xla.")
    parser.add_argument("--weights", default="imagenet", help="featcache extract --weights (none: random init).")
    parser.add_argument("--matmul-size", type=int, default=4096)
    parser.add_argument("--matmul-reps", type=int, default=3,
                        help="sgemm reps before, between and after the passes.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import tensorflow as tf

    from featcache.extract import make_config
    from featcache.model import feature_model

    config, resolved = make_config(args.backbone, args.weights, image_size=args.image_size)
    gflop = model_flop(feature_model(config, resolved.keras_arg)) / 1e9
    matmul = Matmul(args.matmul_size)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-extract-images-") as tmp:
        tree = Path(tmp) / "images"
        n = image_tree(args.data, args.images, tree)
        print(f"{args.backbone} at {args.image_size} px ({gflop:.2f} GFLOP/image), {n} images from "
              f"{args.data}; extract batch {args.batch_size}{' + XLA' if args.xla else ''}, "
              f"tutorial batch {TUTORIAL_BATCH}; "
              f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f}\n"
              f"limit = median sgemm {args.matmul_size}^3 GFLOP/s / GFLOP per image; "
              f"cpu = GFLOP per CPU-second vs sgemm's; cores = CPU-seconds per second of extract")
        print("".join(f"{h:>{len(h) + 2}}" for h, _, _ in COLUMNS))
        for repeat in range(args.repeats):
            timings = matmul.reps(args.matmul_reps)
            passes = {}
            for name in ("tutorial", "extract") if repeat % 2 == 0 else ("extract", "tutorial"):
                if name == "tutorial":
                    passes[name] = tutorial_pass(tree, n, args.backbone, resolved.keras_arg, args.image_size)
                else:
                    passes[name] = extract_pass(tree, args.backbone, args.image_size, args.batch_size,
                                                args.xla, args.weights)
                gc.collect()
                timings += matmul.reps(args.matmul_reps)
            rows.append(repeat_row(repeat, n, gflop, matmul.flop / 1e9, timings, passes))
            print_row(rows[-1])

    median = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "repeat"}
    print_row({"repeat": "median", **median})
    beats = sum(r["extract_img_s"] > r["tutorial_img_s"] for r in rows)
    load_after = os.getloadavg()
    print(f"extract beat the tutorials' loop in {beats} of {len(rows)} repeats; median extract "
          f"{median['extract_gflops']:.0f} GFLOP/s = {median['extract_vs_limit']:.0%} of the sgemm limit "
          f"({median['extract_img_s'] * gflop / median['sgemm_gflops_best']:.0%} of its best rep), "
          f"{median['extract_vs_limit_cpu']:.0%} per CPU-second; load average {load_after[0]:.1f}")
    if args.json:
        results = {
            "command": " ".join(["python", *sys.argv]),
            "backbone": args.backbone, "weights": args.weights, "image_size": args.image_size, "images": n,
            "gflop_per_image": gflop, "batch_size": args.batch_size, "tutorial_batch_size": TUTORIAL_BATCH,
            "xla": args.xla, "matmul_size": args.matmul_size, "repeats": rows, "median": median,
            "extract_beat_tutorial": beats, "cpus": os.cpu_count(), "machine": platform.processor(),
            "load_average_before": load_before, "load_average_after": load_after,
            "tensorflow": tf.__version__, "numpy": np.__version__,
        }
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
