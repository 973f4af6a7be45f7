"""Kill `featcache extract` with SIGKILL at random moments and check that nothing is ever lost.

Each fault runs the real CLI in a child process that kills itself at a chosen point of one phase:

- decode:   inside the Nth image decode (tf.data's parallel decode threads)
- backbone: a few ms after the Nth batch went into the backbone
- shard:    halfway through writing the Nth shard's bytes to its temporary file
- rename:   just before, or just after, the Nth shard is renamed into place
- manifest: halfway through writing the manifest, or just after it was renamed into place
- rewrite:  not a kill: the Nth image is overwritten with another image's bytes just before it is
  decoded (after the scan hashed it); the run must finish with that image refused, no row of it,
  and the next run, once the file is restored, must read it again

After every kill the cache is opened the way `fit-head` would open it (it must be refused until
complete), and every fifth kill damages one finished shard on disk, alternately a bit flip in its
features and a swap with another shard (if that kill left no shard, the finished cache's, which
must then be refused until it is run once more). The next run resumes;
when a run finally completes, its cache is compared with an uninterrupted run's: same key, same
rows in the same order (no duplicates, no missing image), same labels and rejects, features equal
within float tolerance. Prints a table and writes JSON:

    python scripts/chaos.py                      # 20 faults, 120 images (about 4 min here)
    python scripts/chaos.py --faults 5 --images 24 --json chaos.json

The child side (`python scripts/chaos.py child PHASE N SEED -- EXTRACT ARGS`) is this same file.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PHASES = ("decode", "backbone", "shard", "rename", "manifest", "rewrite")
REWRITTEN = "CHAOS_REWRITTEN"  # env: the file where a rewrite run notes which image it overwrote


# ---------------------------------------------------------------- child: the run that gets killed

def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(phase: str, nth: int, seed: int) -> None:
    """Patch featcache so that the ``nth`` event of ``phase`` kills this process."""
    from featcache import cache, extract, files

    rng = random.Random(seed)
    calls = {"n": 0}

    def count() -> bool:
        calls["n"] += 1
        return calls["n"] == nth

    if phase == "decode":
        load_image = extract.load_image

        def dying_load_image(*args, **kwargs):
            if count():
                die()
            return load_image(*args, **kwargs)

        extract.load_image = dying_load_image
    elif phase == "backbone":
        decoded_batches = extract.decoded_batches

        def dying_batches(*args, **kwargs):
            for batch in decoded_batches(*args, **kwargs):
                if count():  # the batch goes into the backbone as this generator yields it
                    threading.Timer(rng.uniform(0.0, 0.05), die).start()
                yield batch

        extract.decoded_batches = dying_batches
    elif phase in ("shard", "manifest"):
        atomic_write = cache.atomic_write
        half_written = rng.random() < 0.5 or phase == "shard"

        def dying_atomic_write(path, data):
            is_target = Path(path).suffix == ".h5" if phase == "shard" else Path(path).name == cache.MANIFEST
            if is_target and count():
                if half_written:  # the bytes as far as they got, under the temporary name
                    raw = data.encode() if isinstance(data, str) else bytes(data)
                    tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
                    tmp.write_bytes(raw[: len(raw) // 2])
                    die()
                atomic_write(path, data)
                die()
            return atomic_write(path, data)

        cache.atomic_write = dying_atomic_write
    elif phase == "rename":
        replace = os.replace
        after = rng.random() < 0.5

        def dying_replace(src, dst, *args, **kwargs):
            if Path(dst).suffix == ".h5" and count():
                if after:
                    replace(src, dst, *args, **kwargs)
                die()
            return replace(src, dst, *args, **kwargs)

        files.os.replace = dying_replace
    elif phase == "rewrite":
        load_image = extract.load_image

        def racing_load_image(path, *args, **kwargs):
            if count():  # another writer replaces the file between the scan and the decode
                other = next(p for p in sorted(Path(path).parent.parent.glob("*/img*.jpg")) if p != Path(path))
                Path(path).write_bytes(other.read_bytes())
                Path(os.environ[REWRITTEN]).write_text(str(path))
            return load_image(path, *args, **kwargs)

        extract.load_image = racing_load_image
    else:
        raise SystemExit(f"unknown phase {phase!r}: choose one of {', '.join(PHASES)}")


def child(argv: list[str]) -> None:
    phase, nth, seed = argv[0], int(argv[1]), int(argv[2])
    arm(phase, nth, seed)
    from featcache.cli import main

    main(args=argv[argv.index("--") + 1:], prog_name="featcache")


# ---------------------------------------------------------------- parent: inject, resume, verify

def make_images(root: Path, n: int, seed: int) -> None:
    """n small JPEGs in two class folders, plus two files that must be rejected and reported."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
        pixels[:, :, i % 2] = 255 * (i % 2)
        Image.fromarray(pixels).save(folder / f"img{i:04d}.jpg", quality=90)
    (root / "cats" / "truncated.jpg").write_bytes((root / "cats" / "img0001.jpg").read_bytes()[:200])
    (root / "dogs" / "not-an-image.png").write_bytes(b"this is text")


def extract_args(data: Path, workdir: Path) -> list[str]:
    return ["extract", "--data", str(data), "--workdir", str(workdir), "--weights", "none",
            "--image-size", "32", "--dtype", "float32", "--shard-size", "4", "--batch-size", "4"]


def run(args: list[str], fault: tuple[str, int, int] | None = None) -> subprocess.CompletedProcess:
    script = [sys.executable, __file__, "child", *map(str, fault), "--"] if fault else \
        [sys.executable, "-m", "featcache.cli"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "COLUMNS": "200"}
    return subprocess.run(script + args, capture_output=True, text=True, env=env, timeout=600)


def snapshot(workdir: Path) -> dict:
    """What a reader gets from the workdir now: the cache's rows, or the error that refused it."""
    from featcache import FeatcacheError
    from featcache.cache import open_cache

    try:
        opened = open_cache(workdir)
        return {"splits": {s: opened.read(s) for s in opened.splits}, "manifest": opened.manifest}
    except (FeatcacheError, FileNotFoundError) as exc:
        return {"refused": str(exc)}


def differences(reference: dict, got: dict) -> list[str]:
    """Every way ``got`` differs from the uninterrupted run (empty: identical within tolerance)."""
    if "refused" in got:
        return [f"refused: {got['refused']}"]
    problems = []
    if got["manifest"]["key"] != reference["manifest"]["key"]:
        problems.append("different key")
    for split, (features, labels, paths) in reference["splits"].items():
        got_features, got_labels, got_paths = got["splits"].get(split, (None, None, []))
        if len(set(got_paths)) != len(got_paths):
            problems.append(f"{split}: duplicate rows")
        if got_paths != paths or not np.array_equal(got_labels, labels):
            problems.append(f"{split}: rows or labels differ")
        elif not np.allclose(got_features, features, rtol=1e-5, atol=1e-5):
            problems.append(f"{split}: features differ")
    rejects = {r["relpath"] for r in got["manifest"].get("rejects", [])}
    if rejects != {r["relpath"] for r in reference["manifest"].get("rejects", [])}:
        problems.append("rejects differ")
    return problems


def lost_images(reference: dict, got: dict) -> int:
    if "refused" in got:
        return sum(len(paths) for _, _, paths in reference["splits"].values())
    return sum(len(set(paths) - set(got["splits"].get(split, (0, 0, []))[2]))
               for split, (_, _, paths) in reference["splits"].items())


def flip_a_byte(workdir: Path, rng: random.Random) -> Path | None:
    """Corrupt one finished shard on disk, inside its features (the next run must rebuild it)."""
    import h5py

    shards = sorted(workdir.glob("*/*.h5"))
    if not shards:
        return None
    shard = rng.choice(shards)
    with h5py.File(shard, "r") as f:
        offset = f["features"].id.get_offset()
    if offset is None:  # chunked: flip inside the first chunk instead
        with h5py.File(shard, "r") as f:
            offset = f["features"].id.get_chunk_info(0).byte_offset
    with open(shard, "r+b") as handle:
        handle.seek(offset + 3)
        byte = handle.read(1)
        handle.seek(offset + 3)
        handle.write(bytes([byte[0] ^ 0x40]))
    return shard


def swap_shards(workdir: Path, rng: random.Random) -> Path | None:
    """Swap two finished shards' files (readers must refuse them, the next run must rebuild both)."""
    shards = sorted(workdir.glob("*/*.h5"))
    if len(shards) < 2:
        return None
    a, b = rng.sample(shards, 2)
    a.rename(a.with_suffix(".swap"))
    b.rename(a)
    a.with_suffix(".swap").rename(b)
    return a


def chaos(faults: int, images: int, seed: int, root: Path, say=print) -> dict:
    rng = random.Random(seed)
    data = root / "data"
    make_images(data, images, seed)
    originals = {path: path.read_bytes() for path in data.glob("*/*")}  # to undo a rewrite
    os.environ[REWRITTEN] = str(root / "rewritten")
    started = time.monotonic()
    reference_run = run(extract_args(data, root / "reference"))
    if reference_run.returncode:
        raise SystemExit(f"the uninterrupted run failed:\n{reference_run.stderr}")
    reference = snapshot(root / "reference")
    shards = len(list((root / "reference").glob("*/*.h5")))
    limits = {"decode": images, "backbone": images // 4, "shard": shards, "rename": shards, "manifest": 2,
              "rewrite": images}

    totals = {"faults_injected": 0, "runs": 0, "runs_resumed": 0, "runs_finished_without_fault": 0,
              "shards_bitflipped": 0, "shards_swapped": 0, "files_rewritten": 0, "images_lost": 0,
              "corrupt_caches_accepted": 0, "episodes": 0, "faults_by_phase": {p: 0 for p in PHASES},
              "problems": []}

    def damage(episode: Path) -> str | None:
        """Every fifth kill: a bit flip or a shard swap, alternately; what was done, or None (no shard)."""
        swap = totals["shards_swapped"] < totals["shards_bitflipped"]
        if not (swap_shards if swap else flip_a_byte)(episode, rng):
            return None
        totals["shards_swapped" if swap else "shards_bitflipped"] += 1
        return "swapped two shards" if swap else "bit-flipped a shard"

    episode_dir, phases_left = None, []
    flip_due = False  # every fifth kill corrupts a shard: the next time one is on disk
    while totals["faults_injected"] < faults or episode_dir is not None:
        if episode_dir is None:
            totals["episodes"] += 1
            episode_dir = root / f"episode{totals['episodes']}"  # a fresh workdir: no rows to reuse
        if not phases_left:  # every phase once per five faults, in a random order
            phases_left = rng.sample(PHASES, len(PHASES))
        phase = phases_left[-1]
        fault = (phase, rng.randint(1, limits[phase]), rng.randrange(2**31))
        if totals["faults_injected"] >= faults:
            fault = None  # finish the episode cleanly
        had_shards = any(episode_dir.glob("*/*.h5"))
        result = run(extract_args(data, episode_dir), fault)
        totals["runs"] += 1
        totals["runs_resumed"] += had_shards
        got = snapshot(episode_dir)
        if fault and phase == "rewrite" and result.returncode == 0 and (root / "rewritten").exists():
            path = Path((root / "rewritten").read_text())
            (root / "rewritten").unlink()
            relpath = path.relative_to(data).as_posix()
            held = [p for _, _, paths in got.get("splits", {}).values() for p in paths]
            refused = [r for r in got.get("manifest", {}).get("rejects", []) if r["relpath"] == relpath]
            if "refused" in got or relpath in held or not refused or "changed during" not in refused[0]["reason"]:
                totals["corrupt_caches_accepted"] += 1
                totals["problems"].append(f"a file rewritten during extract ({relpath}) was not refused")
            path.write_bytes(originals[path])  # the writer is done: the scanned content is back
            phases_left.pop()
            totals["faults_injected"] += 1
            totals["faults_by_phase"][phase] += 1
            totals["files_rewritten"] += 1
            flip_due = flip_due or totals["faults_injected"] % 5 == 0
            say(f"fault {totals['faults_injected']:>2}: rewrote {relpath} during extract (refused, restored)")
            continue
        if result.returncode == -signal.SIGKILL:
            phases_left.pop()
            totals["faults_injected"] += 1
            totals["faults_by_phase"][phase] += 1
            say(f"fault {totals['faults_injected']:>2}: killed in {phase} (event {fault[1]})"
                f"{', resuming a partial cache' if had_shards else ''}")
            if "refused" not in got:  # a killed run's cache may only be readable if it really finished
                if differences(reference, got):
                    totals["corrupt_caches_accepted"] += 1
                    totals["problems"].append(f"after a kill in {phase}: {differences(reference, got)}")
            flip_due = flip_due or totals["faults_injected"] % 5 == 0
            if flip_due and damage(episode_dir):
                flip_due = False
            continue
        if result.returncode != 0:
            raise SystemExit(f"a run failed (exit {result.returncode}): {result.stderr.strip()[-300:]}")
        if fault:
            totals["runs_finished_without_fault"] += 1  # the chosen event never came: nothing left to do
        problems = differences(reference, got)
        totals["images_lost"] += lost_images(reference, got)
        if problems:
            totals["corrupt_caches_accepted"] += 1
            totals["problems"].append(f"episode {totals['episodes']}: {problems}")
        say(f"run completed episode {totals['episodes']}: "
            f"{'identical to the uninterrupted run' if not problems else problems}")
        if flip_due and (done := damage(episode_dir)):  # the kill left no shard: damage the finished cache
            flip_due = False
            if "refused" not in snapshot(episode_dir):
                totals["corrupt_caches_accepted"] += 1
                totals["problems"].append(f"episode {totals['episodes']}: {done}, and readers accepted the cache")
            say(f"{done} of the finished cache (refused by readers); running again")
            continue
        episode_dir = None
    totals["seconds"] = round(time.monotonic() - started, 1)
    totals["images"] = images
    totals["shards"] = shards
    return totals


def main() -> None:
    if sys.argv[1:2] == ["child"]:
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="featcache-chaos-") as tmp:
        totals = chaos(options.faults, options.images, options.seed, Path(tmp))
    width = max(map(len, totals))
    print()
    for name in ("faults_injected", "faults_by_phase", "runs", "runs_resumed", "shards_bitflipped",
                 "shards_swapped", "files_rewritten", "episodes", "images", "images_lost",
                 "corrupt_caches_accepted", "seconds"):
        print(f"{name.replace('_', ' '):<{width}}  {totals[name]}")
    for problem in totals["problems"]:
        print(f"PROBLEM: {problem}")
    if options.json:
        options.json.write_text(json.dumps(totals, indent=2))
    sys.exit(1 if totals["images_lost"] or totals["corrupt_caches_accepted"] else 0)


if __name__ == "__main__":
    main()
