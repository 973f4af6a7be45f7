"""The HDF5 shard store: content-addressed caches of features with their full provenance.

A cache is a folder ``WORKDIR/KEY[:16]`` with ``manifest.json`` and shards ``SPLIT-NNNNN.h5``.
The key hashes the extraction config and every (path, label, split, file sha256), so changed
pixels or weights never reuse stale features. Rows, however, are reusable across caches by
(image sha256, row key): a new dataset version copies what it shares and computes the rest.

A shard holds ``features``, ``labels``, ``paths`` (relative path of the source image), ``sha256``
(the row's identity) and ``views`` (0 for an original image, 1..K for its augmented views; shards
written before views existed lack it and hold originals only). With ``--augment K`` every
training image is followed in its shard by its K views; a view's ``paths`` entry names its source
image and its ``sha256`` entry is ``augment.view_identity(file sha256, seed, view)``, which also
covers the augmentation recipe, so view rows are reused only for the same bytes, seed, view and
recipe. The row key leaves augment and seed out: an original row does not depend on them, so a
cache with views reuses the rows of one without, and more views reuse fewer.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import h5py
import numpy as np

from featcache import FeatcacheError, __version__, augment
from featcache.dataset import Dataset, Sample
from featcache.files import atomic_write

FORMAT = 1
MANIFEST = "manifest.json"
CURRENT = "current"  # file in the workdir naming the default cache
CHUNK_ROWS = 64
SHARD_DATASETS = ("features", "labels", "paths", "sha256")  # required; "views" is optional
ROW_DATASETS = (*SHARD_DATASETS, "views")
DEFAULT_WORKDIR = "featcache-out"


def default_workdir() -> Path:
    return Path(os.environ.get("FEATCACHE_HOME", DEFAULT_WORKDIR))


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that determines one image's feature row."""

    backbone: str
    weights: str  # identity: sha256 of the weights file, or a stable name (see weights.py)
    layer: str | None  # None: the backbone's last layer
    pooling: str
    image_size: int
    resize: str
    preprocess: str
    dtype: str
    precision: str = "float32"  # compute precision; "mixed_float16" on a GPU
    augment: int = 0
    seed: int = 0
    average_views: str = "none"  # views.VIEW_SETS: features averaged over turned/mirrored copies

    def row_key(self) -> str:
        """What a row's features depend on besides its pixels; augment and seed live in view identities."""
        return _digest(replace(self, augment=0, seed=0).identity())

    def identity(self) -> dict:
        """The fields keys are made of; an option left at a default added later is left out, so the
        caches made before it existed keep their keys."""
        fields = asdict(self)
        if fields["average_views"] == "none":
            del fields["average_views"]
        return fields


def cache_key(config: ExtractionConfig, dataset: Dataset) -> str:
    samples = sorted((s.relpath, s.label, s.split, s.sha256) for s in dataset.samples)
    payload = {"config": config.identity(), "classes": list(dataset.classes), "samples": samples}
    if config.augment:
        payload["augmentation"] = augment.RECIPE
    return _digest(payload)


def _digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class ShardPlan:
    """The samples one shard is responsible for; rejected ones end up in its attrs, not its rows."""

    split: str
    index: int
    samples: tuple[Sample, ...]

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:05d}.h5"

    @property
    def digest(self) -> str:
        return _digest([(s.relpath, s.sha256) for s in self.samples])


def plan_shards(dataset: Dataset, shard_size: int, views: int = 0, seed: int = 0) -> list[ShardPlan]:
    """Rows per shard, in dataset order; with ``views`` every training image is followed by its views.

    An image and its views always share a shard (so a rejected image is reported once), and a
    training shard holds as many whole images as fit in ``shard_size`` rows (at least one).
    """
    plans = []
    for split in dataset.splits:
        k = views if split == "train" else 0
        samples = dataset.split(split)
        per_shard = max(1, shard_size // (k + 1))
        for index, start in enumerate(range(0, len(samples), per_shard)):
            rows = [row for s in samples[start : start + per_shard] for row in augment.with_views(s, k, seed)]
            plans.append(ShardPlan(split, index, tuple(rows)))
    return plans


def write_shard(
    path: Path, plan: ShardPlan, provenance: dict, features: np.ndarray,
    rows: list[Sample], rejects: dict[str, str],
) -> None:
    """Build the shard in memory, then write it under a temporary name, fsync, and rename it into place.

    HDF5 never touches the disk itself: a full disk fails one plain write (a clear error, the
    temporary removed) instead of leaving the HDF5 library holding a half-written file.
    """
    buffer = io.BytesIO()
    _write_rows(buffer, plan, provenance, features, rows, rejects)
    atomic_write(path, buffer.getbuffer())


def _write_rows(target, plan: ShardPlan, provenance: dict, features: np.ndarray,
                rows: list[Sample], rejects: dict[str, str]) -> None:
    n = len(rows)
    with h5py.File(target, "w") as f:
        chunks = (min(n, CHUNK_ROWS), *features.shape[1:]) if n else None
        f.create_dataset("features", data=features, chunks=chunks, fletcher32=bool(n))
        f.create_dataset("labels", data=np.array([s.label for s in rows], dtype=np.int32))
        f.create_dataset("paths", data=[s.relpath for s in rows], dtype=h5py.string_dtype())
        f.create_dataset("sha256", data=np.array([s.sha256 for s in rows], dtype="S64"))
        f.create_dataset("views", data=np.array([s.view for s in rows], dtype=np.int32))
        f.attrs.update(
            {
                "cache_key": provenance["key"],
                "row_key": provenance["row_key"],
                "config": json.dumps(provenance["config"]),
                "classes": json.dumps(provenance["classes"]),
                "split": plan.split,
                "shard_index": plan.index,
                "plan_digest": plan.digest,
                "rejects": json.dumps(rejects),
                "featcache_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        )


def shard_is_intact(path: Path, key: str, plan: ShardPlan | None = None) -> bool:
    """A shard on disk is reusable only if it opens, belongs to this key (and plan), is whole, and its
    features pass their Fletcher-32 checksums (read chunk by chunk: a flipped bit is caught here,
    not by a head halfway through training)."""
    try:
        with h5py.File(path, "r") as f:
            if not (
                f.attrs.get("cache_key") == key
                and (plan is None or f.attrs.get("plan_digest") == plan.digest)
                and all(name in f for name in SHARD_DATASETS)
                and len({len(f[name]) for name in ROW_DATASETS if name in f}) == 1
            ):
                return False
            features = f["features"]
            for start in range(0, len(features), CHUNK_ROWS * 16):
                features[start : start + CHUNK_ROWS * 16]  # reading verifies the checksum
            return True
    except (OSError, KeyError):
        return False


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write(cache_dir / MANIFEST, json.dumps(manifest, indent=2))


def read_manifest(cache_dir: Path) -> dict | None:
    try:
        return json.loads((cache_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def remove_temporaries(cache_dir: Path) -> None:
    """Leftovers of a killed run are never visible as shards; delete them before resuming."""
    for tmp in cache_dir.glob("*.tmp-*"):  # also .manifest.json.tmp-PID
        tmp.unlink(missing_ok=True)


@contextmanager
def locked(cache_dir: Path, timeout: float = 0.0) -> Iterator[None]:
    """Exclusive lock on a cache folder: a second run on the same key waits, then fails clearly."""
    lock_path = cache_dir / ".lock"
    with open(lock_path, "a+") as handle:
        deadline, waiting = time.monotonic() + timeout, False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                if time.monotonic() >= deadline:
                    raise FeatcacheError(
                        f"cache {cache_dir} is being written by another featcache run (pid {holder}); "
                        "wait for it to finish, or pass --lock-timeout SECONDS to wait for it"
                    ) from None
                if not waiting:
                    print(f"waiting up to {timeout:g} s for featcache run (pid {holder}) writing {cache_dir}",
                          file=sys.stderr, flush=True)
                    waiting = True
                time.sleep(0.2)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RowSource:
    """Feature rows already computed with the same row key in other caches, found by image sha256."""

    def __init__(self, workdir: Path, row_key: str, exclude: Path):
        self.where: dict[str, tuple[Path, int]] = {}
        for manifest_path in sorted(workdir.glob(f"*/{MANIFEST}")):
            cache_dir = manifest_path.parent
            manifest = read_manifest(cache_dir)
            if cache_dir == exclude or not manifest or manifest.get("row_key") != row_key:
                continue
            for shard in sorted(cache_dir.glob("*.h5")):
                try:
                    with h5py.File(shard, "r") as f:
                        if f.attrs.get("row_key") != row_key:
                            continue
                        for row, sha in enumerate(f["sha256"][:]):
                            self.where.setdefault(sha.decode(), (shard, row))
                except (OSError, KeyError):
                    continue

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self.where

    def read(self, shas: list[str]) -> dict[str, np.ndarray]:
        """Copy rows out of their shards, one sorted read per shard."""
        by_shard: dict[Path, list[tuple[int, str]]] = defaultdict(list)
        for sha in shas:
            shard, row = self.where[sha]
            by_shard[shard].append((row, sha))
        found = {}
        for shard, wanted in by_shard.items():
            rows = sorted(set(row for row, _ in wanted))
            with h5py.File(shard, "r") as f:
                block = dict(zip(rows, f["features"][rows], strict=True))
            found.update({sha: block[row] for row, sha in wanted})
        return found


Batch = tuple[np.ndarray, np.ndarray, list[str]]  # features, labels, relative paths


class Cache:
    """A complete cache on disk, read lazily shard by shard; every shard is checked against the key."""

    def __init__(self, path: Path):
        manifest = read_manifest(path)
        if manifest is None:
            raise FeatcacheError(f"{path} is not a featcache cache (no {MANIFEST}); run `featcache extract`")
        if manifest.get("status") != "complete":
            raise FeatcacheError(
                f"cache {path} is incomplete (an extract run was interrupted); "
                "run the same `featcache extract` again to finish it"
            )
        self.path = path
        self.manifest = manifest

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def shard_paths(self, split: str) -> list[Path]:
        if split not in self.manifest["splits"]:
            raise FeatcacheError(
                f"cache {self.key[:16]} has no {split!r} split; it has {', '.join(self.splits)}"
            )
        return [self.path / name for name in self.manifest["splits"][split]["shards"]]

    @contextmanager
    def open_shard(self, shard: Path) -> Iterator[h5py.File]:
        fix = "run the same `featcache extract` again to rebuild it"
        try:
            f = h5py.File(shard, "r")
        except (OSError, FileNotFoundError) as exc:
            raise FeatcacheError(f"shard {shard} is missing or corrupt ({exc}); {fix}") from None
        with f:
            if f.attrs.get("cache_key") != self.key:
                raise FeatcacheError(f"shard {shard} belongs to another cache (key mismatch); {fix}")
            missing = [n for n in SHARD_DATASETS if n not in f]
            if missing:
                raise FeatcacheError(f"shard {shard} lacks dataset(s) {', '.join(missing)}; {fix}")
            if len({len(f[name]) for name in ROW_DATASETS if name in f}) != 1:
                raise FeatcacheError(f"shard {shard} has datasets of different lengths; {fix}")
            yield f

    def iter_batches(self, split: str, batch_size: int = 1024) -> Iterator[Batch]:
        """Stream (features, labels, paths) without ever holding more than one batch in memory."""
        for shard in self.shard_paths(split):
            with self.open_shard(shard) as f:
                for start in range(0, len(f["labels"]), batch_size):
                    stop = start + batch_size
                    try:
                        features = f["features"][start:stop]
                    except OSError as exc:
                        raise FeatcacheError(
                            f"shard {shard} failed its checksum ({exc}); "
                            "delete it and run the same `featcache extract` again to rebuild it"
                        ) from None
                    paths = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][start:stop]]
                    yield features, f["labels"][start:stop], paths

    def read(self, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The whole split in memory: convenient for the small caches most users have."""
        parts = list(self.iter_batches(split))
        if not parts:
            shape = tuple(self.manifest["feature_shape"])
            return np.zeros((0, *shape), self.config["dtype"]), np.zeros(0, np.int32), []
        features, labels, paths = zip(*parts, strict=True)
        return np.concatenate(features), np.concatenate(labels), [p for ps in paths for p in ps]

    def views(self, split: str) -> np.ndarray:
        """The view index of every row of a split, in the order of ``read``: 0 for original images."""
        parts = [np.zeros(0, np.int32)]
        for shard in self.shard_paths(split):
            with self.open_shard(shard) as f:
                parts.append(f["views"][:] if "views" in f else np.zeros(len(f["labels"]), np.int32))
        return np.concatenate(parts)


def list_caches(workdir: Path) -> list[dict]:
    """Manifests of every cache under workdir, oldest first (complete or not)."""
    manifests = [read_manifest(p.parent) for p in workdir.glob(f"*/{MANIFEST}")]
    return sorted((m for m in manifests if m), key=lambda m: m.get("completed") or m.get("created", ""))


def set_current(workdir: Path, key: str) -> None:
    """Make ``key`` the default cache of the workdir: the one the user's last ``extract`` produced."""
    atomic_write(Path(workdir) / CURRENT, key + "\n")


def open_cache(workdir: Path, key: str | None = None) -> Cache:
    """The cache named by a key (a prefix is enough), else the last extracted, else the newest complete."""
    complete = [m for m in list_caches(workdir) if m.get("status") == "complete"]
    current = Path(workdir) / CURRENT
    if key is None and current.is_file():
        path = Path(workdir) / current.read_text().strip()[:16]
        if (read_manifest(path) or {}).get("status") == "complete":
            return Cache(path)
    if key is None:
        if not complete:
            interrupted = " (only interrupted ones: run the same `featcache extract` again to finish)"
            raise FeatcacheError(
                f"no complete cache in {workdir}{interrupted if list_caches(workdir) else ''}; "
                "run `featcache extract` first"
            )
        return Cache(workdir / complete[-1]["key"][:16])
    matches = [m for m in list_caches(workdir) if m["key"].startswith(key)]
    if len(matches) != 1:
        what = "no cache" if not matches else f"{len(matches)} caches"
        raise FeatcacheError(f"--cache {key}: {what} in {workdir} match; `featcache info --all` lists them")
    return Cache(workdir / matches[0]["key"][:16])


def split_summary(rows: list[Sample], classes: list[str]) -> dict:
    """Rows (augmented views included) per class, and how many source images they come from."""
    counts = Counter(s.label for s in rows)
    return {"rows": len(rows), "images": sum(s.view == 0 for s in rows),
            "class_counts": {c: counts.get(i, 0) for i, c in enumerate(classes)}}
