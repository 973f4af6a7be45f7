"""Images/s of `featcache extract` with the local engine and with the Ray engine at 1..N workers.

Every configuration extracts the same images into a fresh workdir (nothing reused), interleaved
over the repeats so that load drifts touch all alike; the table shows the median. Seconds are
the whole command (Ray start, actors loading the backbone, decode, backbone, shard writes,
manifest), so small runs show Ray's fixed cost and larger ones its scaling.

    python scripts/bench_ray.py --data data/elpv [--images 512] [--workers 1 2] [--repeats 2]
                                [--weights imagenet|none|PATH] [--json ray.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def subset(data: Path, images: int, root: Path) -> Path:
    """A class-folder tree of hard links (or copies) of the first ``images`` training images (same files every run)."""
    from featcache.files import link_or_copy

    files = sorted(p for p in (data / "train").rglob("*") if p.is_file())[:images]
    for path in files:
        link = root / path.parent.name / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path.absolute(), link)
    return root


def extract_seconds(data: Path, workdir: Path, args: list[str]) -> float:
    shutil.rmtree(workdir, ignore_errors=True)
    command = [str(Path(sys.executable).with_name("featcache")), "extract", "--data", str(data),
               "--workdir", str(workdir), "--split-fractions", "1,0,0", *args]
    started = time.perf_counter()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run(command, capture_output=True, text=True, env=env)
    if run.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{run.stdout}{run.stderr}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/elpv"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--image-size", default="150")
    parser.add_argument("--shard-size", default="32")
    parser.add_argument("--weights", default="imagenet", help="featcache extract --weights (none: random init).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cpus = os.cpu_count() or 1
    common = ["--backbone", args.backbone, "--image-size", args.image_size, "--shard-size", args.shard_size,
              "--weights", args.weights]
    configs = {"local": common}
    for n in args.workers:
        per_worker = max(1, cpus // n)
        configs[f"ray x{n}"] = [*common, "--engine", "ray", "--workers", str(n),
                                "--cpus-per-worker", str(per_worker)]
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(args.data, args.images, Path(tmp) / "data")
        for _ in range(args.repeats):
            for name, config in configs.items():
                seconds[name].append(extract_seconds(data, Path(tmp) / "work", config))
                print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    results = {"images": args.images, "cpus": cpus, "backbone": args.backbone, "image_size": args.image_size,
               "weights": args.weights,
               "seconds": seconds,
               "images_per_second": {n: args.images / statistics.median(s) for n, s in seconds.items()}}
    print(f"{args.images} images, {args.backbone} at {args.image_size} px, {cpus} CPUs, "
          f"median of {args.repeats}")
    print(f"{'engine':<12}{'seconds':>9}{'images/s':>10}")
    for name, values in seconds.items():
        print(f"{name:<12}{statistics.median(values):>9.1f}{results['images_per_second'][name]:>10.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
