"""Bounded-memory reading of a cache: the memory budget, and shuffled batches streamed from shards.

A head's data never needs more memory than ``--memory-budget``: half of it holds the shuffle
buffer (rows in their storage dtype), the other half the float32 batches in flight. Shards are
visited in a random order and read in blocks of contiguous rows (fast for HDF5 chunks) in a
random order, into a buffer that is emitted in a random order once full, so rows mix across blocks
and shards while memory holds one buffer, whatever the size of the cache. The budget covers
feature data only; the libraries themselves (TensorFlow alone is a few hundred MB) and model
weights come on top.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import FeatcacheError
from featcache.cache import CHUNK_ROWS, Cache
from featcache.targets import REGRESSION

KERAS_SHUFFLE_ROWS = 4096  # the shuffle buffer of Keras heads when the budget allows it
BATCHES_IN_FLIGHT = 6  # float32 batches alive at once: the generator's, TensorFlow's copy, prefetch, the step
SGD_BATCH_COPIES = 3  # a mini-batch lives as float32, standardised and once more inside scikit-learn
# Peak of an in-memory fit in float32 copies of train + validation, the loaded arrays included: logreg on
# elpv (1,672 x 8,192) measured 6.9 copies above them (tracemalloc; 5.8 before its three scalings ran two
# at a time), svm 3.5. Where rows near the features in number, the n x n Gram matrices weigh more.
IN_MEMORY_COPIES = 8
UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int | None:
    """Bytes in ``512M``, ``2G``, ``1.5GiB``, ``800000`` (K, M, G, T: powers of 1024); ``none``: no limit."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    match = SIZE.match(text)
    if not match:
        raise FeatcacheError(
            f"--memory-budget {text!r}: expected a size like 512M, 2G or 1.5GiB (powers of 1024), or none"
        )
    size = int(float(match.group(1)) * UNITS[match.group(2).upper()])
    if size <= 0:
        raise FeatcacheError(f"--memory-budget {text!r}: must be more than 0 bytes (or none for no limit)")
    return size


def format_size(size: int | None) -> str:
    if size is None:
        return "no limit"
    unit = next(u for u in ("T", "G", "M", "K", "") if size >= UNITS[u] or u == "")
    return f"{size / UNITS[unit]:.1f} {unit}iB" if unit else f"{size} B"


def available_memory() -> int | None:
    """Bytes this process can still take: MemAvailable, lowered by a cgroup (container) limit if any."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available or math.inf, int(limit) - used)
    except (OSError, ValueError):
        pass
    return int(available) if available is not None else None


def default_budget() -> int | None:
    """Half the memory available now: room for the libraries, the model and other programs."""
    available = available_memory()
    return available // 2 if available and available > 0 else None  # over a container's limit: unknown


@dataclass(frozen=True)
class RowSize:
    """Bytes of one cached row, as stored and as the float32 that heads compute on."""

    stored: int
    float32: int
    features: int  # numbers per row

    @classmethod
    def of(cls, cache: Cache) -> RowSize:
        features = int(np.prod(cache.feature_shape))
        return cls(features * np.dtype(cache.config["dtype"]).itemsize, features * 4, features)


@dataclass(frozen=True)
class StreamPlan:
    """Rows that each buffer of a streamed fit may hold; recorded in the head's info."""

    budget: int | None
    buffer_rows: int  # the shuffle buffer, in the storage dtype
    batch_rows: int  # rows converted to float32 at once outside training steps (validation, evaluation)

    def record(self) -> dict:
        return {"budget": format_size(self.budget), "budget_bytes": self.budget,
                "buffer_rows": self.buffer_rows, "batch_rows": self.batch_rows}


def too_small(budget: int, what: str, needed: int) -> FeatcacheError:
    return FeatcacheError(
        f"--memory-budget {format_size(budget)} is too small: {what} needs about {format_size(needed)}; "
        "raise --memory-budget or lower --batch-size"
    )


def keras_plan(cache: Cache, budget: int | None, batch_size: int) -> StreamPlan:
    """Half the budget shuffles (at most the classic 4096 rows), half holds the float32 batches in flight."""
    if budget is None:
        return StreamPlan(None, KERAS_SHUFFLE_ROWS, 256)
    row = RowSize.of(cache)
    batches = BATCHES_IN_FLIGHT * batch_size * row.float32
    if batches + batch_size * row.stored > budget:
        raise too_small(budget, f"training batches of {batch_size} rows of {format_size(row.float32)}",
                        batches + batch_size * row.stored)
    buffer_rows = min(KERAS_SHUFFLE_ROWS, max(batch_size, budget // 2 // row.stored))
    batch_rows = min(256, max(1, budget // 2 // (BATCHES_IN_FLIGHT * row.float32)))
    return StreamPlan(budget, buffer_rows, batch_rows)


def sgd_plan(cache: Cache, budget: int) -> StreamPlan:
    """Half the budget shuffles; the other half holds one mini-batch and its scikit-learn copies."""
    row = RowSize.of(cache)
    batch_rows = budget // 2 // (row.stored + SGD_BATCH_COPIES * row.float32)
    if batch_rows < 1:
        raise too_small(budget, f"one row of {format_size(row.float32)} and its copies",
                        2 * (row.stored + SGD_BATCH_COPIES * row.float32))
    buffer_rows = max(batch_rows, budget // 2 // row.stored)
    return StreamPlan(budget, buffer_rows, batch_rows)


def in_memory_plan(cache: Cache, budget: int | None) -> StreamPlan:
    """Plan of an in-memory scikit-learn fit: no buffer; evaluation batches as a Keras head's."""
    if budget is None:
        return StreamPlan(None, 0, 2048)
    rows = budget // 2 // (BATCHES_IN_FLIGHT * RowSize.of(cache).float32)
    return StreamPlan(budget, 0, max(1, min(2048, rows)))


def in_memory_bytes(cache: Cache) -> int:
    """What an in-memory fit takes: train and validation as float32, a few copies at once, and the
    linear heads' n x n Gram matrices."""
    rows = sum(cache.rows(s) for s in ("train", "validation"))
    return IN_MEMORY_COPIES * rows * RowSize.of(cache).float32 + gram_bytes(cache.rows("train"), RowSize.of(cache))


def gram_bytes(train_rows: int, size: RowSize) -> int:
    """The float64 n x n matrices of the linear heads' span basis or kernel svm, two scalings at a time
    (a Gram matrix and its Cholesky factor each): nothing where they solve on the features."""
    from featcache.heads.linear import KERNEL_SVM_ROWS

    if train_rows < size.features or train_rows <= KERNEL_SVM_ROWS:
        return 2 * 2 * 8 * train_rows**2
    return 0


def batches(cache: Cache, split: str, batch_rows: int, buffer_rows: int = 0,
            rng: np.random.Generator | None = None,
            rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(float32 features, labels as stored) of ``batch_rows`` rows each: every batch but the split's last is
    whole, across shard boundaries (so a split of N rows gives ceil(N / batch_rows) batches, as
    ``split_batches`` tells TensorFlow).

    Without ``rng`` the split comes in order, one batch in memory at a time. With it, shards come in
    a random order, read in blocks of contiguous rows in a random order into a buffer of
    ``buffer_rows`` rows, which is emitted in a random order when full; rows not filling a last
    batch stay for the next fill. ``rows``, a boolean mask over the split in order, keeps only
    those rows (a cross-validation fold): N is then its count.
    """
    if rng is not None and buffer_rows < batch_rows:
        raise ValueError(f"buffer_rows {buffer_rows} < batch_rows {batch_rows}")
    size = buffer_rows if rng is not None else batch_rows
    buffer = np.empty((size, *cache.feature_shape), cache.config["dtype"])
    labels = cache.no_labels(size)
    filled = 0

    def emit(final: bool):
        nonlocal filled
        order = rng.permutation(filled) if rng is not None else np.arange(filled)
        whole = filled if final else filled - filled % batch_rows
        for start in range(0, whole, batch_rows):
            rows = order[start : start + batch_rows]
            yield buffer[rows].astype(np.float32), labels[rows]
        rest = order[whole:]
        buffer[: len(rest)], labels[: len(rest)] = buffer[rest], labels[rest]
        filled = len(rest)

    # With rng: at least 8 blocks, from anywhere in the split, mix in a buffer; whole HDF5 chunks
    # when a block holds one, so that no chunk is read (and checksummed) twice.
    block_rows = size if rng is None else max(1, size // 8)
    if block_rows > CHUNK_ROWS:
        block_rows -= block_rows % CHUNK_ROWS
    shards = list(enumerate(cache.shard_paths(split)))
    if rng is not None:
        shards = [shards[i] for i in rng.permutation(len(shards))]
    offsets = _shard_offsets(cache, split) if rows is not None else None
    for index, shard in shards:
        with cache.open_shard(shard) as f:
            shard_labels = f["labels"][:]
            kept = rows[offsets[index] : offsets[index + 1]] if rows is not None else None
            starts = np.arange(0, len(shard_labels), block_rows)
            for start in rng.permutation(starts) if rng is not None else starts:
                stop = min(start + block_rows, len(shard_labels))
                wanted = np.arange(start, stop) if kept is None else start + np.flatnonzero(kept[start:stop])
                while len(wanted):
                    part, wanted = wanted[: size - filled], wanted[size - filled :]
                    _read_into(f, shard, buffer, part, slice(filled, filled + len(part)), kept is None)
                    labels[filled : filled + len(part)] = shard_labels[part]
                    filled += len(part)
                    if filled == size:
                        yield from emit(final=False)
    yield from emit(final=True)


def _shard_offsets(cache: Cache, split: str) -> np.ndarray:
    """Where each shard's rows start in the split, and its end."""
    sizes = []
    for shard in cache.shard_paths(split):
        with cache.open_shard(shard) as f:
            sizes.append(len(f["labels"]))
    return np.cumsum([0, *sizes])


def _read_into(f, shard: Path, buffer: np.ndarray, rows: np.ndarray, dest: slice, contiguous: bool) -> None:
    """Read rows into the buffer, straight (no temporary) when they are contiguous, naming the shard
    if its checksum fails."""
    try:
        if contiguous:
            f["features"].read_direct(buffer, np.s_[rows[0] : rows[-1] + 1], dest)
        else:
            buffer[dest] = f["features"][rows]
    except OSError as exc:
        raise FeatcacheError(
            f"shard {shard} failed its checksum ({exc}); "
            "delete it and run the same `featcache extract` again to rebuild it"
        ) from None


@contextlib.contextmanager
def errors_from_tf():
    """A FeatcacheError raised while tf.data reads shards (a damaged shard) reaches Keras' ``fit`` as a
    TensorFlow UnknownError with some 60 lines of traceback around its message: raise it as itself."""
    import tensorflow as tf

    try:
        yield
    except tf.errors.OpError as exc:
        if found := re.search(r"FeatcacheError: (.*)", exc.message):
            raise FeatcacheError(found.group(1)) from None
        raise


def split_batches(cache: Cache, split: str, batch_size: int, shuffle_seed: int | None,
                  buffer_rows: int = KERAS_SHUFFLE_ROWS, rows: np.ndarray | None = None, transform=None):
    """A tf.data pipeline of float32 batches streamed from shards (never the whole cache in memory).

    With a seed, every epoch visits shards, blocks and rows in a new order drawn from (seed, epoch),
    mixed in a buffer of ``buffer_rows`` rows (``batches``); memory holds that buffer and
    two prefetched batches, whatever the size of the cache. ``rows`` (a mask over the split) keeps
    only those rows. ``transform(batch, rng)``, with a seed only, replaces each batch (online
    augmentation) from a generator of its own drawn from (seed, epoch), so the order stays as without it.
    """
    import itertools

    import tensorflow as tf

    epochs = itertools.count()

    def generate():
        epoch = next(epochs)
        rng = np.random.default_rng([shuffle_seed, epoch]) if shuffle_seed is not None else None
        parts = batches(cache, split, batch_size, max(buffer_rows, batch_size), rng, rows)
        if transform is None or rng is None:
            yield from parts
            return
        views = np.random.default_rng([shuffle_seed, epoch, 1])
        for x, y in parts:
            yield transform(x, views), y

    signature = (tf.TensorSpec((None, *cache.feature_shape), tf.float32),
                 tf.TensorSpec((None, *cache.no_labels().shape[1:]),
                               tf.float32 if cache.task == REGRESSION else tf.int32))
    dataset = tf.data.Dataset.from_generator(generate, output_signature=signature)
    count = cache.rows(split) if rows is None else int(rows.sum())
    steps = math.ceil(count / batch_size)
    return dataset.apply(tf.data.experimental.assert_cardinality(steps)).prefetch(2)


def split_labels(cache: Cache, split: str) -> np.ndarray:
    """Every label of a split, in order, without reading features."""
    parts = [cache.no_labels()]
    for shard in cache.shard_paths(split):
        with cache.open_shard(shard) as f:
            parts.append(f["labels"][:])
    return np.concatenate(parts)
