"""Compute precision: ``auto`` runs a network in bfloat16 or float16 only where this machine does it faster.

Whether mixed precision pays depends on the hardware *and* the network. On AMX CPUs VGG16 runs
about 6x faster in ``mixed_bfloat16``, ResNet50 1.2x, and MobileNetV2 (depthwise convolutions,
BatchNorm) 0.74x: slower. So ``auto`` is two steps. ``candidate`` is a pure function of the CPU
flags and GPUs: which mixed policy could pay here at all (none: float32, no measurement). Then
``resolve`` times the network at hand in float32 and in the candidate, side by side, and takes the
candidate only if it is at least ``MIN_SPEEDUP`` times faster, so a wrong guess costs nothing. The
measurement is remembered per machine, network, input size and TensorFlow version
(``memory_path``), so it runs once. ``FEATCACHE_PRECISION`` pins what ``auto`` means on a machine.

The chosen precision, never ``auto``, goes into cache keys and head records, so features computed
in bfloat16 and float32 never mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from featcache import FeatcacheError
from featcache.files import atomic_write

CONCRETE = ("float32", "mixed_bfloat16", "mixed_float16")
PRECISIONS = ("auto", *CONCRETE)
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo names of native bfloat16 arithmetic
TENSOR_CORES = (7, 0)  # CUDA compute capability from which float16 matmuls run on tensor cores
MIN_SPEEDUP = 1.1  # a candidate must beat float32 by this much in the same run to be chosen
ENV = "FEATCACHE_PRECISION"


@dataclass(frozen=True)
class Choice:
    """A resolved precision, why it was chosen, and the measurement behind it (if any)."""

    precision: str
    reason: str
    requested: str = "auto"
    rates: dict[str, float] = field(default_factory=dict)  # images/s per precision, same run

    def line(self) -> str:
        return f"precision {self.precision}: {self.reason}"

    def to_json(self) -> dict:
        return asdict(self)


def check(option: str, value: str, allowed: tuple[str, ...] = PRECISIONS) -> None:
    if value not in allowed:
        raise FeatcacheError(f"{option} {value!r}: choose one of {', '.join(allowed)}")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def gpu_capabilities() -> list[tuple[int, int]]:
    """CUDA compute capability of each GPU TensorFlow sees; [] on CPU-only machines, found without
    starting TensorFlow (seconds), so that a run whose precision is remembered, such as extract on
    an unchanged dataset, never starts it."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1") or not (
            Path("/proc/driver/nvidia").exists() or Path("/dev/nvidia0").exists()):
        return []
    import tensorflow as tf

    found = []
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        found.append(tuple(capability) if capability else (0, 0))
    return found


def candidate(flags: frozenset[str] | set[str], gpus: list[tuple[int, int]]) -> str | None:
    """The mixed policy worth measuring on this hardware, or None when float32 is the only sensible one.

    A GPU runs the model when there is one, so only its tensor cores count then; otherwise the CPU's
    native bfloat16 (AMX or AVX512-BF16). Without them TensorFlow emulates bfloat16, slowly.
    """
    if gpus:
        return "mixed_float16" if any(c >= TENSOR_CORES for c in gpus) else None
    return "mixed_bfloat16" if any(flag in flags for flag in BF16_FLAGS) else None


def hardware_line(flags: frozenset[str], gpus: list[tuple[int, int]]) -> str:
    if gpus:
        return "GPU compute capability " + ", ".join(f"{a}.{b}" for a, b in gpus)
    present = [flag for flag in BF16_FLAGS if flag in flags]
    return "CPU flags " + (" ".join(present) if present else f"without {' or '.join(BF16_FLAGS)}")


def memory_path() -> Path:
    """Where measurements are remembered: beside the weights store (``FEATCACHE_WEIGHTS``'s parent)."""
    from featcache.backbones.weights import store_dir

    return store_dir().parent / "precision.json"


def machine_id(flags: frozenset[str], gpus: list[tuple[int, int]]) -> str:
    """What a measurement depends on besides the network: CPU model and cores (or GPUs), TensorFlow."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        tensorflow = version("tensorflow")
    except PackageNotFoundError:  # a tensorflow-cpu or other distribution
        import tensorflow as tf

        tensorflow = tf.__version__
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    hardware = f"gpus {gpus}" if gpus else f"{model}, {os.cpu_count()} cores, {hardware_line(flags, gpus)}"
    return f"{hardware}; tensorflow {tensorflow}"


def resolve(
    requested: str, network: str, timer: Callable[[tuple[str, ...]], dict[str, float]],
    flags: frozenset[str] | None = None, gpus: list[tuple[int, int]] | None = None,
    memory: Path | None = None,
) -> Choice:
    """The precision to run ``network`` in: ``requested`` itself unless it is ``auto``.

    ``network`` names what is timed (backbone, layer, pooling, input size); ``timer(precisions)``
    returns the images/s of each, measured side by side. Flags and GPUs default to this machine's.
    """
    check("--precision", requested)
    if requested != "auto":
        return Choice(requested, "as asked", requested)
    if pinned := os.environ.get(ENV):
        check(ENV, pinned, CONCRETE)
        return Choice(pinned, f"{ENV}={pinned}")
    flags = cpu_flags() if flags is None else flags
    gpus = gpu_capabilities() if gpus is None else gpus
    mixed = candidate(flags, gpus)
    hardware = hardware_line(flags, gpus)
    if mixed is None:
        return Choice("float32", f"auto, {hardware}: no native bfloat16 or float16 to gain from")
    memory = memory or memory_path()
    key = f"{network} on {machine_id(flags, gpus)}"
    remembered = _read_memory(memory).get(key)
    if not (isinstance(remembered, dict) and isinstance(remembered.get("rates"), dict)
            and all(isinstance(remembered["rates"].get(p), (int, float)) and remembered["rates"][p] > 0
                    for p in ("float32", mixed)) and isinstance(remembered.get("measured"), str)):
        remembered = None  # missing, or an entry no run of this version wrote: measure again
    rates = remembered["rates"] if remembered else timer(("float32", mixed))
    if not remembered:
        _remember(memory, key, {"rates": rates, "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    speedup = rates[mixed] / rates["float32"]
    chosen = mixed if speedup >= MIN_SPEEDUP else "float32"
    when = f"measured {remembered['measured'][:10]}, remembered in {memory}" if remembered else "measured now"
    return Choice(chosen, f"auto, {hardware}: {mixed} ran {network} {speedup:.2f}x as fast as float32 "
                          f"({rates[mixed]:.1f} vs {rates['float32']:.1f} images/s, {when})", rates=rates)


def _read_memory(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again
    return data if isinstance(data, dict) else {}


def _remember(path: Path, key: str, entry: dict) -> None:
    data = _read_memory(path)
    data[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(data, indent=1, sort_keys=True))
    except (OSError, FeatcacheError):  # FeatcacheError: atomic_write's one line for a full disk
        pass  # a read-only home or a full disk only costs a measurement next time


@contextlib.contextmanager
def using(precision: str):
    """Keras' global dtype policy set to ``precision`` inside, restored after (it is global state)."""
    import keras

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(before)


def timed_rates(build: Callable[[], object], input_shape: tuple[int, ...], precisions: tuple[str, ...],
                batch: int = 8, seconds: float = 1.0, train: bool = False) -> dict[str, float]:
    """Images/s of the model ``build()`` makes under each precision, timed in alternation (so load on
    the machine weighs on both alike): a forward pass, or with ``train`` a forward and backward pass.

    Each precision gets a warm-up call (tracing), then rounds run until ``seconds`` have passed per
    precision and at least three rounds; the median call counts.
    """
    import numpy as np
    import tensorflow as tf

    x = tf.constant(np.random.default_rng(0).uniform(0, 1, (batch, *input_shape)).astype(np.float32))
    steps = {}
    for precision in precisions:
        with using(precision):
            model = build()

        def step(inputs, model=model):
            if not train:
                return model(inputs, training=False)
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(tf.cast(model(inputs, training=True), tf.float32))
            return tape.gradient(loss, model.trainable_variables)

        steps[precision] = tf.function(step)
        steps[precision](x)  # trace and warm up
    times = {p: [] for p in precisions}
    while min(len(t) for t in times.values()) < 3 or min(sum(t) for t in times.values()) < seconds:
        for precision, step in steps.items():
            started = time.perf_counter()
            tf.nest.map_structure(lambda t: t.numpy(), step(x))
            times[precision].append(time.perf_counter() - started)
    return {p: round(batch / statistics.median(t), 2) for p, t in times.items()}


def follow(cached: str, requested: str = "auto", flags: frozenset[str] | None = None,
           gpus: list[tuple[int, int]] | None = None) -> Choice:
    """The precision to compute a cache's features again in (predict): ``auto`` takes the cache's own,
    so new images go through the very model that made the cached rows, unless this machine would
    only emulate it (a bfloat16 cache moved to a CPU without bfloat16), where float32 is faster and
    differs from the cached rows by rounding only."""
    check("--precision", requested)
    if requested != "auto":
        note = "" if requested == cached else f"; the cache was computed in {cached}, so features differ by rounding"
        return Choice(requested, "as asked" + note, requested)
    if cached == "float32":
        return Choice(cached, "the cache's precision")
    flags = cpu_flags() if flags is None else flags
    gpus = gpu_capabilities() if gpus is None else gpus
    if candidate(flags, gpus) == cached:
        return Choice(cached, "the cache's precision, native here")
    return Choice("float32", f"the cache was computed in {cached}, which this machine ({hardware_line(flags, gpus)}) "
                             "would only emulate; float32 features differ from the cached ones by rounding")


def model_in(model, precision: str):
    """A copy of a Keras model whose mixed-precision layers compute in ``precision`` instead (weights are
    float32 under every mixed policy, so they carry over exactly); other layers' dtypes are kept."""
    def swap(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy" and str(node.get("config", {}).get("name")).startswith("mixed_"):
                return {**node, "config": {**node["config"], "name": precision}}
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    copy = model.__class__.from_config(swap(model.get_config()))
    copy.set_weights(model.get_weights())
    return copy
