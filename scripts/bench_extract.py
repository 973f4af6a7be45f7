"""Images/s of `featcache extract` in float32 and in bfloat16 vs the tutorials' loop and the machine's matmul rates.

Every repeat measures, one after the other in this process, on the same images, backbone and size:

- the two limits, a few reps of each before, between and after the passes (median): ``sgemm``, a
  large float32 ``np.matmul`` through NumPy's BLAS, and ``bf16``, the same matmul of bfloat16
  tensors through ``tf.matmul`` (TensorFlow's oneDNN kernels, what a bfloat16 backbone runs on);
  divided by the backbone's FLOPs per image (counted from the Keras model) each gives the img/s of
  a pipeline running at that matmul's speed, the "limit" of extract in that precision;
- tutorial: Chollet's loop, ImageDataGenerator(rescale=1/255).flow_from_directory, ``predict`` per
  batch of 20, each batch copied into a NumPy array (``class_mode="sparse"``: elpv has 4 classes);
  float32, as the tutorials run it;
- extract f32 and extract bf16: ``featcache extract`` through its Python API into a fresh workdir
  (scan and hash, decode, backbone, HDF5 shards and manifest) with ``precision`` given explicitly,
  ``float32`` and ``mixed_bfloat16`` (never ``auto``, which would choose one by timing).

Each extract is set against the limit of its own precision (``f32/limit``: sgemm, ``bf16/limit``: the
bf16 matmul), and ``bf16/f32`` is how much faster extract ran in bfloat16. The CPU flags read from
/proc/cpuinfo say which case ran: native bfloat16 with AMX tiles (``amx_bf16``, where the issue's
goals apply: bf16 extract at least 5x its float32 rate and 80% of the bf16 limit), native bfloat16
dot products without AMX (``avx512_bf16``), or neither, where TensorFlow emulates bfloat16 and the
bf16 figures show what that emulation costs.

All passes build their model outside the timing (the tutorials build ``conv_base`` in an earlier
cell; ``+build`` is extract with it) and pay their first call's tracing inside it. The passes
alternate order between repeats so load drifts hit all alike. Wall-clock ratios are only
meaningful within one run, and on a shared machine they swing with other processes' load, so CPU
time is reported too: GFLOP per CPU-second of each pass against its limit's matmul (``cpu``
columns) is work efficiency, which load moves much less (the passes' own figures stay within a few
%; BLAS threads spin while they wait for a descheduled partner, so the matmuls' drop under load and
these ratios rise); ``cores`` is CPU-seconds per wall second, how much of the machine extract got.
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
CASES = (  # (CPU flag, what runs bfloat16 then), the first flag present wins
    ("amx_bf16", "native bf16 (AMX)"),
    ("avx512_bf16", "native bf16 (AVX512-BF16, no AMX)"),
)
EMULATED = "no native bf16: TensorFlow emulates it; bf16 figures show the emulation cost"
BF16_SPEEDUP_GOAL, BF16_LIMIT_GOAL = 5.0, 0.8  # the goals on an AMX machine


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


def sgemm(a: np.ndarray, b: np.ndarray):
    """float32 matmul through NumPy's BLAS."""
    return lambda: a @ b


def bf16_matmul(a: np.ndarray, b: np.ndarray):
    """bfloat16 matmul through TensorFlow (eager ops on the CPU run to completion; one element is read
    back to be sure, not the whole product, whose copy would be timed too)."""
    import tensorflow as tf

    a, b = (tf.cast(tf.constant(m), tf.bfloat16) for m in (a, b))
    return lambda: tf.matmul(a, b)[0, 0].numpy()


class Matmul:
    """n x n x n matmuls by ``kernel`` (``sgemm``, ``bf16_matmul``); every rep's wall and CPU seconds are kept."""

    def __init__(self, n: int, kernel):
        rng = np.random.default_rng(0)
        self.multiply = kernel(rng.standard_normal((n, n), dtype=np.float32),
                               rng.standard_normal((n, n), dtype=np.float32))
        self.flop = 2 * n**3
        self.multiply()  # warm-up: threads, pages, kernel selection

    def reps(self, count: int) -> list[tuple[float, float]]:
        timings = []
        for _ in range(count):
            started, cpu = time.perf_counter(), cpu_seconds()
            self.multiply()
            timings.append((time.perf_counter() - started, cpu_seconds() - cpu))
        return timings


# each extract precision: (its limit's matmul kernel, that matmul's JSON key, its limit's key, its extract key)
PRECISIONS = {
    "float32": (sgemm, "sgemm", "limit_img_s", "extract"),
    "mixed_bfloat16": (bf16_matmul, "bf16", "bf16_limit_img_s", "extract_bf16"),
}


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


def extract_pass(tree: Path, backbone: str, size: int, batch_size: int, xla: bool, weights: str,
                 precision: str) -> dict:
    """`featcache extract` on ``tree`` in ``precision`` into a fresh workdir; the model build is timed apart."""
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
            config, resolved = extract.make_config(backbone, weights, image_size=size, precision=precision)
            result = extract.extract(dataset, config, resolved, Path(workdir), batch_size=batch_size,
                                     xla=xla, show_progress=False)
            total, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    finally:
        extract.extraction_model = extraction_model
    return {"seconds": total - build["seconds"], "cpu_seconds": cpu - build["cpu_seconds"],
            "seconds_with_build": total, "build_seconds": build["seconds"], "rows": result.computed}


def integrity_cost(tree: Path, size: int, rounds: int = 3) -> dict:
    """The integrity checks extract added, side by side with the code without them: decoding each image
    with and without hashing the decoded bytes against the scan (alternating, median of ``rounds``),
    and the rows checksum of a 1,024-row shard."""
    import h5py

    from featcache.cache import rows_digest
    from featcache.dataset import file_sha256
    from featcache.images import load_image

    paths = sorted(p for p in tree.rglob("*") if p.is_file())
    hashes = {p: file_sha256(p) for p in paths}
    plain, checked = [], []
    for _ in range(rounds):
        for timings, check in ((plain, False), (checked, True)):
            started = time.perf_counter()
            for p in paths:
                load_image(p, size, "squash", hashes[p] if check else None)
            timings.append((time.perf_counter() - started) / len(paths))
    with tempfile.TemporaryDirectory() as tmp, h5py.File(Path(tmp) / "shard.h5", "w") as f:
        rows = 1024
        f["labels"], f["views"] = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        f["sha256"] = np.array([b"0" * 64] * rows, dtype="S64")
        f.create_dataset("paths", data=[f"train/class/image_{i:06d}.png" for i in range(rows)],
                         dtype=h5py.string_dtype())
        started = time.perf_counter()
        rows_digest(f)
        digest_seconds = time.perf_counter() - started
    return {"decode_ms": 1000 * statistics.median(plain), "decode_checked_ms": 1000 * statistics.median(checked),
            "rows_digest_ms_per_1024_rows": 1000 * digest_seconds}


def repeat_row(repeat: int, n: int, gflop: float, matmuls: dict[str, tuple[float, list[tuple[float, float]]]],
               passes: dict) -> dict:
    """One repeat's figures: img/s, ratios, and GFLOP per wall and per CPU second, each extract against the
    limit of its precision (``matmuls``: per matmul key, its GFLOP per rep and the reps' timings)."""
    for name, measured in passes.items():
        if measured["rows"] != n:
            raise SystemExit(f"{name} computed {measured['rows']} rows, expected {n}")
    row = {"repeat": repeat + 1}
    rate, rate_cpu = {}, {}
    for key, (matmul_gflop, timings) in matmuls.items():
        rate[key] = statistics.median(matmul_gflop / wall for wall, _ in timings)
        rate_cpu[key] = statistics.median(matmul_gflop / cpu for _, cpu in timings)
        row |= {f"{key}_gflops": rate[key], f"{key}_gflops_best": max(matmul_gflop / wall for wall, _ in timings),
                f"{key}_gflop_per_cpu_s": rate_cpu[key]}
    tutorial = passes["tutorial"]
    row |= {"tutorial_img_s": n / tutorial["seconds"],
            "tutorial_vs_limit": n * gflop / tutorial["seconds"] / rate["sgemm"],
            "tutorial_cores": tutorial["cpu_seconds"] / tutorial["seconds"],
            "tutorial_vs_limit_cpu": n * gflop / tutorial["cpu_seconds"] / rate_cpu["sgemm"]}
    for _, matmul, limit, name in PRECISIONS.values():
        extract = passes[name]
        row |= {
            limit: rate[matmul] / gflop,
            f"{name}_img_s": n / extract["seconds"],
            f"{name}_img_s_with_build": n / extract["seconds_with_build"],
            f"{name}_build_seconds": extract["build_seconds"],
            f"{name}_vs_tutorial": tutorial["seconds"] / extract["seconds"],
            f"{name}_vs_limit": n * gflop / extract["seconds"] / rate[matmul],
            f"{name}_gflops": n * gflop / extract["seconds"],
            f"{name}_cores": extract["cpu_seconds"] / extract["seconds"],
            f"{name}_vs_limit_cpu": n * gflop / extract["cpu_seconds"] / rate_cpu[matmul],
        }
    row["bf16_vs_float32"] = passes["extract"]["seconds"] / passes["extract_bf16"]["seconds"]
    return row


COLUMNS = (  # header, key, format
    ("repeat", "repeat", "{}"), ("sgemm GF/s", "sgemm_gflops", "{:.0f}"), ("bf16 mm GF/s", "bf16_gflops", "{:.0f}"),
    ("f32 limit", "limit_img_s", "{:.2f}"), ("bf16 limit", "bf16_limit_img_s", "{:.2f}"),
    ("tutorial img/s", "tutorial_img_s", "{:.2f}"),
    ("f32 img/s", "extract_img_s", "{:.2f}"), ("+build", "extract_img_s_with_build", "{:.2f}"),
    ("bf16 img/s", "extract_bf16_img_s", "{:.2f}"), ("+build", "extract_bf16_img_s_with_build", "{:.2f}"),
    ("f32/tut", "extract_vs_tutorial", "{:.2f}x"), ("bf16/tut", "extract_bf16_vs_tutorial", "{:.2f}x"),
    ("bf16/f32", "bf16_vs_float32", "{:.2f}x"),
    ("tut/limit", "tutorial_vs_limit", "{:.0%}"), ("f32/limit", "extract_vs_limit", "{:.0%}"),
    ("bf16/limit", "extract_bf16_vs_limit", "{:.0%}"),
    ("f32 GF/s", "extract_gflops", "{:.0f}"), ("bf16 GF/s", "extract_bf16_gflops", "{:.0f}"),
    ("cores", "extract_cores", "{:.2f}"), ("tut/limit cpu", "tutorial_vs_limit_cpu", "{:.0%}"),
    ("f32/limit cpu", "extract_vs_limit_cpu", "{:.0%}"), ("bf16/limit cpu", "extract_bf16_vs_limit_cpu", "{:.0%}"),
)


def bf16_case(flags: frozenset[str]) -> str:
    """Which bfloat16 hardware this CPU has, in words (the first of ``CASES`` whose flag is present)."""
    return next((case for flag, case in CASES if flag in flags), EMULATED)


def goal_lines(rows: list[dict], median: dict, beats: dict[str, int], flags: frozenset[str]) -> list[str]:
    """The issue's goals, met or missed, from this run's figures (``beats``: repeats each extract won)."""
    def verdict(met: bool) -> str:
        return "met" if met else "MISSED"

    amx = "" if "amx_bf16" in flags else " (this CPU has no AMX: the goal is an AMX machine's, shown for reference)"
    return [
        f"goal bf16 extract >= {BF16_SPEEDUP_GOAL:.0f}x its float32 rate: "
        f"{verdict(median['bf16_vs_float32'] >= BF16_SPEEDUP_GOAL)} (median {median['bf16_vs_float32']:.2f}x){amx}",
        f"goal bf16 extract >= {BF16_LIMIT_GOAL:.0%} of the bf16 matmul limit: "
        f"{verdict(median['extract_bf16_vs_limit'] >= BF16_LIMIT_GOAL)} "
        f"(median {median['extract_bf16_vs_limit']:.0%}){amx}",
        f"goal extract beat the tutorials' loop in every repeat: {verdict(min(beats.values()) == len(rows))} "
        f"(float32 in {beats['extract']} of {len(rows)}, bf16 in {beats['extract_bf16']} of {len(rows)})",
    ]


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
    parser.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n x n sgemm and bf16 matmul.")
    parser.add_argument("--matmul-reps", type=int, default=3,
                        help="Reps of each matmul before, between and after the passes.")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import tensorflow as tf

    from featcache.extract import make_config
    from featcache.model import feature_model
    from featcache.precision import BF16_FLAGS, cpu_flags

    config, resolved = make_config(args.backbone, args.weights, image_size=args.image_size, precision="float32")
    gflop = model_flop(feature_model(config, resolved.keras_arg)) / 1e9
    matmuls = {key: Matmul(args.matmul_size, kernel) for kernel, key, _, _ in PRECISIONS.values()}
    flags = cpu_flags()
    case = bf16_case(flags)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-extract-images-") as tmp:
        tree = Path(tmp) / "images"
        n = image_tree(args.data, args.images, tree)
        print(f"{args.backbone} at {args.image_size} px ({gflop:.2f} GFLOP/image), {n} images from "
              f"{args.data}; extract batch {args.batch_size}{' + XLA' if args.xla else ''}, "
              f"tutorial batch {TUTORIAL_BATCH}; "
              f"{os.cpu_count()} CPUs, load average {load_before[0]:.1f}\n"
              f"limits = median {args.matmul_size}^3 matmul GFLOP/s / GFLOP per image: f32 limit sgemm (NumPy), "
              f"bf16 limit tf.matmul of bfloat16; extract f32 and bf16 = precision float32 and mixed_bfloat16;\n"
              f"cpu = GFLOP per CPU-second vs its limit's matmul's; cores = CPU-seconds per second of extract f32\n"
              f"CPU flags: " + ", ".join(f"{flag} {'present' if flag in flags else 'absent'}" for flag in BF16_FLAGS)
              + f"; case: {case}")
        print("".join(f"{h:>{len(h) + 2}}" for h, _, _ in COLUMNS))
        names = ("tutorial", *(name for *_, name in PRECISIONS.values()))
        for repeat in range(args.repeats):
            timings = {key: matmul.reps(args.matmul_reps) for key, matmul in matmuls.items()}
            passes = {}
            for name in names if repeat % 2 == 0 else names[::-1]:
                if name == "tutorial":
                    passes[name] = tutorial_pass(tree, n, args.backbone, resolved.keras_arg, args.image_size)
                else:
                    precision = next(p for p, (*_, extract) in PRECISIONS.items() if extract == name)
                    passes[name] = extract_pass(tree, args.backbone, args.image_size, args.batch_size,
                                                args.xla, args.weights, precision)
                gc.collect()
                for key, matmul in matmuls.items():
                    timings[key] += matmul.reps(args.matmul_reps)
            rows.append(repeat_row(repeat, n, gflop, {k: (m.flop / 1e9, timings[k]) for k, m in matmuls.items()},
                                   passes))
            print_row(rows[-1])
        integrity = integrity_cost(tree, args.image_size)

    median = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "repeat"}
    print_row({"repeat": "median", **median})
    beats = {name: sum(r[f"{name}_img_s"] > r["tutorial_img_s"] for r in rows) for *_, name in PRECISIONS.values()}
    load_after = os.getloadavg()
    for _, matmul, _, name in PRECISIONS.values():
        label = "float32" if name == "extract" else "bf16"
        print(f"extract {label} beat the tutorials' loop in {beats[name]} of {len(rows)} repeats; median "
              f"{median[f'{name}_gflops']:.0f} GFLOP/s = {median[f'{name}_vs_limit']:.0%} of the {matmul} limit "
              f"({median[f'{name}_img_s'] * gflop / median[f'{matmul}_gflops_best']:.0%} of its best rep), "
              f"{median[f'{name}_vs_limit_cpu']:.0%} per CPU-second")
    print(f"bf16 matmul limit {median['bf16_gflops']:.0f} GFLOP/s = "
          f"{median['bf16_gflops'] / median['sgemm_gflops']:.2f}x sgemm's {median['sgemm_gflops']:.0f}; "
          f"bf16/float32 extract speed {median['bf16_vs_float32']:.2f}x ({case}); load average {load_after[0]:.1f}")
    goals = goal_lines(rows, median, beats, flags)
    print("\n".join(goals))
    per_image_ms = 1000 / median["extract_img_s"]
    added = integrity["decode_checked_ms"] - integrity["decode_ms"]
    print(f"integrity checks, side by side: decode {integrity['decode_ms']:.2f} ms/image, with the decoded bytes "
          f"hashed against the scan {integrity['decode_checked_ms']:.2f} ms ({added:+.2f} ms = "
          f"{added / per_image_ms:+.2%} of extract's float32 {per_image_ms:.1f} ms/image; decoding runs beside "
          f"the backbone); rows checksum {integrity['rows_digest_ms_per_1024_rows']:.2f} ms per 1,024-row shard")
    if args.json:
        results = {
            "command": " ".join(["python", *sys.argv]),
            "backbone": args.backbone, "weights": args.weights, "image_size": args.image_size, "images": n,
            "gflop_per_image": gflop, "batch_size": args.batch_size, "tutorial_batch_size": TUTORIAL_BATCH,
            "xla": args.xla, "matmul_size": args.matmul_size, "repeats": rows, "median": median,
            "extract_beat_tutorial": beats["extract"], "extract_bf16_beat_tutorial": beats["extract_bf16"],
            "precisions": {p: {"limit": limit, "matmul": matmul, "extract": name}
                           for p, (_, matmul, limit, name) in PRECISIONS.items()},
            "cpu_flags": {flag: flag in flags for flag in BF16_FLAGS}, "bf16_case": case, "goals": goals,
            "integrity": integrity,
            "cpus": os.cpu_count(), "machine": platform.processor(),
            "load_average_before": load_before, "load_average_after": load_after,
            "tensorflow": tf.__version__, "numpy": np.__version__,
        }
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
