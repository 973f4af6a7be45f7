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

``extract --also-layer L`` adds ``layers/L``: the same rows' unpooled output of an earlier layer,
computed in the same backbone pass. Its rows carry the row key of a cache cut at L (attribute
``also_row_key``), so extracting that cache, as ``finetune`` does for its frozen prefix, copies
them instead of running the backbone again.
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
from featcache.dataset import Dataset, Sample, class_indices
from featcache.files import atomic_write
from featcache.images import UNREADABLE
from featcache.targets import CLASSIFICATION, MULTILABEL, REGRESSION, Target

FORMAT = 1
MANIFEST = "manifest.json"
CURRENT = "current"  # file in the workdir naming the default cache
CHUNK_ROWS = 64
SHARD_DATASETS = ("features", "labels", "paths", "sha256")  # required; "views" is optional
ROW_DATASETS = (*SHARD_DATASETS, "views")
DEFAULT_WORKDIR = "featcache-out"


def default_workdir() -> Path:
    return Path(os.environ.get("FEATCACHE_HOME", DEFAULT_WORKDIR))


PIXELS = "pixels"  # the layer of a pixel cache: the network's input, before its preprocessing


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
    precision: str = "float32"  # compute precision, never "auto": float32, mixed_bfloat16 or mixed_float16
    augment: int = 0
    seed: int = 0
    average_views: str = "none"  # views.VIEW_SETS: features averaged over turned/mirrored copies
    also_layer: str | None = None  # a second, unpooled layer stored in the same pass (finetune's prefix)

    def row_key(self) -> str:
        """What a row's features depend on besides its pixels; augment and seed live in view identities,
        and an also-layer does not change the features."""
        return _digest(replace(self, augment=0, seed=0, also_layer=None).identity())

    def at_layer(self, layer: str) -> ExtractionConfig:
        """The config of a cache of ``layer``'s unpooled output for the same images: a fine-tune prefix,
        or what an also-layer stores (whose rows thus carry this config's row key).

        At ``PIXELS`` it is a pixel cache: the decoded, resized images themselves, exact as uint8 and
        computed in float32, with no stored augmented views (a whole-network fine-tune augments them
        online) and no averaged views."""
        if layer == PIXELS:
            return replace(self, layer=PIXELS, pooling="none", dtype="uint8", precision="float32", augment=0,
                           seed=0, average_views="none", also_layer=None)
        return replace(self, layer=layer, pooling="none", also_layer=None)

    def also_row_key(self) -> str | None:
        return self.at_layer(self.also_layer).row_key() if self.also_layer else None

    def identity(self) -> dict:
        """The fields keys are made of; an option left at a default added later is left out, so the
        caches made before it existed keep their keys."""
        fields = asdict(self)
        for name, default in (("average_views", "none"), ("also_layer", None)):
            if fields[name] == default:
                del fields[name]
        return fields


def also_dataset(layer: str) -> str:
    """The shard dataset holding an also-layer's rows."""
    return f"layers/{layer}"


def cache_key(config: ExtractionConfig, dataset: Dataset) -> str:
    samples = sorted((s.relpath, s.label, s.split, s.sha256) for s in dataset.samples)
    payload = {"config": config.identity(), "classes": list(dataset.classes), "samples": samples}
    if dataset.task != CLASSIFICATION:  # a change of target is a change of data; classification keys as before
        payload["task"] = dataset.task
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
    rows: list[Sample], rejects: dict[str, str], also: np.ndarray | None = None,
) -> None:
    """Build the shard in memory, then write it under a temporary name, fsync, and rename it into place.

    HDF5 never touches the disk itself: a full disk fails one plain write (a clear error, the
    temporary removed) instead of leaving the HDF5 library holding a half-written file. ``also``
    holds the rows' also-layer features when the config has one.
    """
    buffer = io.BytesIO()
    _write_rows(buffer, plan, provenance, features, rows, rejects, also)
    atomic_write(path, buffer.getbuffer())


def _write_rows(target, plan: ShardPlan, provenance: dict, features: np.ndarray,
                rows: list[Sample], rejects: dict[str, str], also: np.ndarray | None) -> None:
    n = len(rows)
    with h5py.File(target, "w") as f:
        for name, data in (("features", features), (_also_name(provenance["config"]), also)):
            if data is not None:
                chunks = (min(n, CHUNK_ROWS), *data.shape[1:]) if n else None
                f.create_dataset(name, data=data, chunks=chunks, fletcher32=bool(n))
        if also is not None:
            f.attrs["also_row_key"] = provenance["also_row_key"]
        f.create_dataset("labels", data=label_array([s.label for s in rows], provenance.get("task"),
                                                    len(provenance.get("classes", ()))))
        f.create_dataset("paths", data=[s.relpath for s in rows], dtype=h5py.string_dtype())
        f.create_dataset("sha256", data=np.array([s.sha256 for s in rows], dtype="S64"))
        f.create_dataset("views", data=np.array([s.view for s in rows], dtype=np.int32))
        f.attrs["rows_sha256"] = rows_digest(f)
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


def _also_name(config: dict) -> str | None:
    return also_dataset(config["also_layer"]) if config.get("also_layer") else None


def shard_is_intact(path: Path, key: str, plan: ShardPlan | None = None, classes: list[str] | None = None) -> bool:
    """A shard on disk is reusable only if it opens, belongs to this key (and plan), sits under its own
    name (and labels by ``classes``), rejected no file for a mere read failure (retried: a file
    deleted and restored is not bad content), is whole, and its features (an also-layer's too) pass their
    Fletcher-32 checksums (read chunk by chunk: a flipped bit is caught here, not by a head halfway
    through training)."""
    try:
        with h5py.File(path, "r") as f:
            also = _also_name(json.loads(f.attrs.get("config", "{}")))
            required = (*SHARD_DATASETS, also) if also else SHARD_DATASETS
            if not (
                f.attrs.get("cache_key") == key
                and (plan is None or f.attrs.get("plan_digest") == plan.digest)
                and _placement_error(f, path, classes) is None
                and _rows_error(f, path) is None
                and not any(reason.startswith(UNREADABLE) for reason in json.loads(f.attrs["rejects"]).values())
                and all(name in f for name in required)
                and len({len(f[name]) for name in (*ROW_DATASETS, also) if name and name in f}) == 1
            ):
                return False
            _verify_features(f, also)
            return True
    except (OSError, KeyError, json.JSONDecodeError):
        return False


def rows_digest(f: h5py.File) -> str:
    """sha256 of what a shard says of its rows (labels, paths, image hashes, views): the features carry
    HDF5 checksums, these small arrays carry this one, so a flipped bit in a label is caught too."""
    digest = hashlib.sha256()
    for name in ("labels", "sha256", "views"):
        if name in f:
            digest.update(np.ascontiguousarray(f[name][:]).tobytes())
    digest.update("\0".join(p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]).encode())
    return digest.hexdigest()


def _rows_error(f: h5py.File, shard: Path) -> str | None:
    stored = f.attrs.get("rows_sha256")  # shards written before it carry none
    if stored is not None and stored != rows_digest(f):
        return f"shard {shard}: its labels, paths or image hashes fail their checksum (damaged on disk)"
    return None


def _placement_error(f: h5py.File, shard: Path, classes: list[str] | None) -> str | None:
    """Why a shard does not belong where it sits, or None. It must hold the rows its own attributes
    name (split and index), with labels indexing the manifest's class list: shards swapped between
    splits, or a reordered ``classes`` in the manifest, would otherwise be read as named (test rows
    trained on, every label silently renamed)."""
    holds = f"{f.attrs.get('split')}-{int(f.attrs.get('shard_index', -1)):05d}.h5"
    if holds != shard.name:
        return f"shard {shard} holds the rows of {holds} (the cache's files were moved or swapped)"
    stored = json.loads(f.attrs.get("classes", "null"))
    if classes is not None and stored != classes:
        return (f"shard {shard} labels its rows by the classes {stored}, but manifest.json lists {classes} "
                "(the manifest was edited)")
    return None


def _verify_features(f: h5py.File, also: str | None) -> None:
    """Read the features (an also-layer's too) chunk by chunk: a failed Fletcher-32 checksum raises OSError."""
    for name in ("features", also) if also else ("features",):
        data = f[name]
        for start in range(0, len(data), CHUNK_ROWS * 16):
            data[start : start + CHUNK_ROWS * 16]


def write_manifest(cache_dir: Path, manifest: dict) -> None:
    atomic_write(cache_dir / MANIFEST, json.dumps(manifest, indent=2))


def read_manifest(cache_dir: Path) -> dict | None:
    try:
        return json.loads((cache_dir / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def check_manifest(manifest: dict, where: Path) -> None:
    """Refuse, in one line naming the file, a manifest of another format or missing what readers use."""
    fix = "run the same `featcache extract` again to rebuild the cache"
    if manifest.get("format") != FORMAT:
        raise FeatcacheError(f"{where}: cache format {manifest.get('format')!r}, not {FORMAT} (written by another "
                             f"featcache version); {fix}")
    shapes = {"key": str, "classes": list, "config": dict, "splits": dict, "feature_shape": list, "dataset": dict}
    wrong = [name for name, kind in shapes.items() if not isinstance(manifest.get(name), kind)]
    splits = manifest.get("splits") if isinstance(manifest.get("splits"), dict) else {}
    if wrong or not all(isinstance(s, dict) and isinstance(s.get("shards"), list) for s in splits.values()):
        raise FeatcacheError(f"{where}: not a valid manifest ({', '.join(wrong) or 'splits'} missing or of the "
                             f"wrong type); {fix}")
    try:
        ExtractionConfig(**manifest["config"])
    except TypeError as exc:
        raise FeatcacheError(f"{where}: the manifest's config is not an extraction config ({exc}); {fix}") from None


def remove_temporaries(cache_dir: Path) -> None:
    """Leftovers of a killed run are never visible as shards; delete them before resuming."""
    for tmp in cache_dir.glob("*.tmp-*"):  # also .manifest.json.tmp-PID
        tmp.unlink(missing_ok=True)


@contextmanager
def locked(cache_dir: Path, timeout: float = 0.0) -> Iterator[None]:
    """Exclusive lock on a cache folder: a second run on the same key waits, then fails clearly."""
    if not 0 <= timeout < float("inf"):  # false for nan too, whose deadline never passed: it waited forever
        raise FeatcacheError(f"--lock-timeout {timeout}: give a number of seconds, 0 or more")
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
    """Rows already computed in other caches, found by image sha256.

    ``row_keys`` names what each row needs: its features' row key, and an also-layer's after it.
    Each is found in a shard's ``features`` (attribute ``row_key``) or in its also-layer dataset
    (attribute ``also_row_key``), so a fine-tune prefix is copied from the cache that stored it as
    an also-layer. A row is reusable only when all its parts are found.
    """

    def __init__(self, workdir: Path, row_keys: tuple[str, ...], exclude: Path | None = None):
        self.row_keys = row_keys
        self.where: dict[str, dict[str, tuple[Path, int, str]]] = {key: {} for key in row_keys}
        for manifest_path in sorted(workdir.glob(f"*/{MANIFEST}")):
            cache_dir = manifest_path.parent
            manifest = read_manifest(cache_dir)
            if cache_dir == exclude or not manifest:
                continue
            held = {manifest.get("row_key"), (manifest.get("also_layer") or {}).get("row_key")}
            if not held & set(row_keys):
                continue
            for shard in sorted(cache_dir.glob("*.h5")):
                try:
                    with h5py.File(shard, "r") as f:
                        datasets = {f.attrs.get("row_key"): "features",
                                    f.attrs.get("also_row_key"): _also_name(json.loads(f.attrs["config"]))}
                        found = [(key, datasets[key]) for key in row_keys if key in datasets]
                        shas = [sha.decode() for sha in f["sha256"][:]] if found else []
                    for key, dataset in found:
                        for row, sha in enumerate(shas):
                            self.where[key].setdefault(sha, (shard, row, dataset))
                except (OSError, KeyError, json.JSONDecodeError):
                    continue

    def __contains__(self, sha256: str) -> bool:
        return all(sha256 in where for where in self.where.values())

    def drop_damaged(self, shas: list[str]) -> list[Path]:
        """Verify every shard that rows of ``shas`` would be copied from, and forget the damaged ones, so
        their rows are computed instead of failing the run (or copying a flipped bit); returns those."""
        shards = sorted({where[sha][0] for where in self.where.values() for sha in shas if sha in where})
        damaged = []
        for shard in shards:
            try:
                with h5py.File(shard, "r") as f:
                    _verify_features(f, _also_name(json.loads(f.attrs["config"])))
                    if _rows_error(f, shard):
                        raise OSError("rows checksum")
            except (OSError, KeyError, json.JSONDecodeError):
                damaged.append(shard)
        for where in self.where.values():
            for sha in [sha for sha, (shard, _, _) in where.items() if shard in damaged]:
                del where[sha]
        return damaged

    def only(self, shas: list[str]) -> RowSource:
        """The part of this index that ``shas`` need, with absolute shard paths (for another process)."""
        part = RowSource.__new__(RowSource)
        part.row_keys = self.row_keys
        part.where = {key: {sha: (shard.absolute(), row, dataset) for sha in shas if sha in self
                            for shard, row, dataset in [where[sha]]}
                      for key, where in self.where.items()}
        return part

    def read(self, shas: list[str]) -> dict[str, tuple[np.ndarray, ...]]:
        """Copy rows out of their shards, one sorted read per shard and dataset: every part of each row,
        in the order of ``row_keys``. Identical images (one sha256 under two names) share one entry."""
        parts: dict[str, list[np.ndarray]] = {sha: [] for sha in shas}
        for where in self.where.values():
            by_dataset: dict[tuple[Path, str], list[tuple[int, str]]] = defaultdict(list)
            for sha in shas:
                shard, row, dataset = where[sha]
                by_dataset[shard, dataset].append((row, sha))
            found = {}
            for (shard, dataset), wanted in by_dataset.items():
                rows = sorted(set(row for row, _ in wanted))
                with h5py.File(shard, "r") as f:
                    block = dict(zip(rows, f[dataset][rows], strict=True))
                found.update({sha: block[row] for row, sha in wanted})
            for sha in parts:
                parts[sha].append(found[sha])
        return {sha: tuple(values) for sha, values in parts.items()}


Batch = tuple[np.ndarray, np.ndarray, list[str]]  # features, labels, relative paths


class Cache:
    """A complete cache on disk, read lazily shard by shard; every shard is checked against the key."""

    def __init__(self, path: str | Path):
        path = Path(path)
        manifest = read_manifest(path)
        if manifest is None:
            raise FeatcacheError(f"{path} is not a featcache cache (no {MANIFEST}); run `featcache extract`")
        if manifest.get("status") != "complete":
            raise FeatcacheError(
                f"cache {path} is incomplete (an extract run was interrupted); "
                "run the same `featcache extract` again to finish it"
            )
        check_manifest(manifest, path / MANIFEST)
        self.path = path
        self.manifest = manifest

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def classes(self) -> list[str]:
        return self.manifest["classes"]

    @property
    def task(self) -> str:
        """What a label is (targets.TASKS); caches made before tasks existed are classification caches."""
        return self.manifest.get("task", CLASSIFICATION)

    @property
    def target(self) -> Target:
        """The task, with the classes' order for ordered classes: what reading the data again needs."""
        return Target(self.task, tuple(self.classes) if self.task == "ordinal" else None)

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    def no_labels(self, rows: int = 0) -> np.ndarray:
        """``rows`` labels of this cache's kind, all zero: a start to concatenate onto, or a buffer."""
        return label_array([()] * rows if self.task == MULTILABEL else np.zeros(rows), self.task, len(self.classes))

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The shape of one row's features as stored: a feature map (H, W, C) or a pooled vector (C,)."""
        return tuple(self.manifest["feature_shape"])

    def rows(self, split: str) -> int:
        """Rows of a split (augmented views included), from the manifest, reading no shard."""
        self.shard_paths(split)  # names the splits there are when this one is not
        return int(self.manifest["splits"][split]["rows"])

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
            if error := _placement_error(f, shard, self.classes) or _rows_error(f, shard):
                raise FeatcacheError(f"{error}; {fix}")
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
            return np.zeros((0, *shape), self.config["dtype"]), self.no_labels(), []
        features, labels, paths = zip(*parts, strict=True)
        return np.concatenate(features), np.concatenate(labels), [p for ps in paths for p in ps]

    def row_index(self, split: str) -> tuple[np.ndarray, list[str], np.ndarray]:
        """Labels, relative paths and view indices of a split's rows, in the order of ``read``, without
        reading a feature."""
        labels, paths = [self.no_labels()], []
        for shard in self.shard_paths(split):
            with self.open_shard(shard) as f:
                labels.append(f["labels"][:])
                paths += [p.decode() if isinstance(p, bytes) else p for p in f["paths"][:]]
        return np.concatenate(labels), paths, self.views(split)

    def views(self, split: str) -> np.ndarray:
        """The view index of every row of a split, in the order of ``read``: 0 for original images."""
        parts = [np.zeros(0, np.int32)]
        for shard in self.shard_paths(split):
            with self.open_shard(shard) as f:
                parts.append(f["views"][:] if "views" in f else np.zeros(len(f["labels"]), np.int32))
        return np.concatenate(parts)

    def to_numpy(self, split: str, flatten: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(features, labels, relative paths) of a split: float32 features, one row per image (and per
        augmented view), flattened to 2-D unless ``flatten`` is False; labels index ``classes``.

        The rows are those of ``read``, converted batch by batch, so memory holds the float32 array
        and one stored batch, never a second whole copy.
        """
        self.shard_paths(split)  # an unknown split fails here, in one line
        labels, paths, _ = self.row_index(split)
        features = np.empty((len(labels), *self.feature_shape), np.float32)
        filled = 0
        for batch, _, _ in self.iter_batches(split):
            features[filled : filled + len(batch)] = batch
            filled += len(batch)
        flat = features.reshape(len(labels), int(np.prod(self.feature_shape)))  # -1 fails on no rows
        return (flat if flatten else features), labels, paths

    def to_pandas(self, split: str):
        """A pandas DataFrame of a split: one column per feature (f0, f1, ...), then label, class, path;
        for numbers value and path; for sets of classes one 0/1 column per class (has_CLASS), then
        the classes joined by ';' and path."""
        import pandas as pd

        features, labels, paths = self.to_numpy(split)
        columns = [f"f{i}" for i in range(features.shape[1])]
        if self.task == REGRESSION:
            target = {"value": labels}
        elif self.task == MULTILABEL:
            target = {**{f"has_{c}": labels[:, k] for k, c in enumerate(self.classes)},
                      "classes": [";".join(c for c, on in zip(self.classes, row, strict=True) if on) for row in labels]}
        else:
            target = {"label": labels, "class": [self.classes[i] for i in labels]}
        rows = pd.DataFrame({**target, "path": paths})
        return pd.concat([pd.DataFrame(features, columns=columns), rows], axis=1)

    def to_tf_dataset(self, split: str, batch_size: int = 32, shuffle: bool = False, *, seed: int = 0,
                      flatten: bool = True):
        """A tf.data.Dataset of (float32 features, int32 labels) batches streamed from the shards, never
        the whole split in memory; flattened to (batch, features) as ``to_numpy`` unless ``flatten`` is
        False. ``shuffle`` draws a new order every epoch from ``seed`` (a buffer of rows, as the
        streamed heads train)."""
        from featcache import streaming

        self.shard_paths(split)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise FeatcacheError(f"batch_size {batch_size!r}: give a whole number of rows, 1 or more")
        dataset = streaming.split_batches(self, split, batch_size, seed if shuffle else None)
        if not flatten:
            return dataset
        import tensorflow as tf

        return dataset.map(lambda x, y: (tf.reshape(x, (tf.shape(x)[0], -1)), y))


def list_caches(workdir: Path) -> list[dict]:
    """Manifests of every cache under workdir, oldest first (complete or not)."""
    manifests = [read_manifest(p.parent) for p in Path(workdir).glob(f"*/{MANIFEST}")]
    return sorted((m for m in manifests if m), key=lambda m: m.get("completed") or m.get("created", ""))


def set_current(workdir: Path, key: str) -> None:
    """Make ``key`` the default cache of the workdir: the one the user's last ``extract`` produced."""
    atomic_write(Path(workdir) / CURRENT, key + "\n")


def open_cache(workdir: str | Path, key: str | None = None) -> Cache:
    """The cache named by a key (a prefix is enough), else the last extracted, else the newest complete."""
    workdir = Path(workdir)
    complete = [m for m in list_caches(workdir) if m.get("status") == "complete"]
    current = workdir / CURRENT
    if key is None and current.is_file():
        path = workdir / current.read_text().strip()[:16]
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
    """Rows (augmented views included) per class, and how many source images they come from; for a
    regression target (no classes) the range and mean of its values instead."""
    summary = {"rows": len(rows), "images": sum(s.view == 0 for s in rows)}
    if not classes:
        values = np.array([s.label for s in rows], np.float64)
        return {**summary, "values": {"min": float(values.min()), "mean": float(values.mean()),
                                      "max": float(values.max())}}
    counts = Counter(i for s in rows for i in class_indices(s.label))
    return {**summary, "class_counts": {c: counts.get(i, 0) for i, c in enumerate(classes)}}


def label_array(labels, task: str | None, n_classes: int = 0) -> np.ndarray:
    """Labels as stored: int32 class indices, float32 numbers for a regression target, or for a
    multi-label target (rows given as tuples of class indices) an (N, n_classes) int32 row of 0 and 1."""
    if task == MULTILABEL:
        rows = np.zeros((len(labels), n_classes), np.int32)
        for row, indices in enumerate(labels):
            rows[row, list(indices)] = 1
        return rows
    return np.array(labels, dtype=np.float32 if task == REGRESSION else np.int32)
