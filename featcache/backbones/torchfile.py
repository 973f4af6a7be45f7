"""Read PyTorch ``.pth`` state dicts into NumPy arrays without torch, and without running code.

A ``.pth`` file is a pickle whose tensors point at raw storages: in the legacy format the storages
follow the pickles in the same file; in the zip format each is an archive member. Pickles can run
arbitrary code, so the unpickler below builds only dicts and tensor references: every other
global is refused. Tensors are materialised once all storages are read.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import FeatcacheError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


@dataclass(frozen=True)
class StorageRef:
    key: str
    dtype: np.dtype


@dataclass(frozen=True)
class TensorRef:
    storage: StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]

    def materialise(self, name: str, storages: dict[str, np.ndarray]) -> np.ndarray:
        """A copy of the view, once it is proven to lie inside its storage: size, offset and stride come
        from the file, and ``as_strided`` would read any memory they point at."""
        data = storages[self.storage.key]
        layout = f"tensor {name}: size {self.size}, stride {self.stride}, offset {self.offset}"
        if len(self.size) != len(self.stride) or min((self.offset, *self.size, *self.stride), default=0) < 0:
            raise ValueError(f"{layout} is not a valid view")
        if all(self.size):  # an empty tensor reads nothing
            last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
            if last >= len(data):
                raise ValueError(f"{layout} reaches element {last} of a storage of {len(data)}")
        itemsize = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=tuple(s * itemsize for s in self.stride)
        )
        return np.array(view)


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return TensorRef(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data


ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): name for name in STORAGE_DTYPES},
}


class SafeUnpickler(pickle.Unpickler):
    """Builds dicts, tuples and tensor references; refuses every other global."""

    def __init__(self, file):
        super().__init__(file)
        self.storages: dict[str, StorageRef] = {}  # every storage the pickle refers to

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refused to load global {module}.{name} (not a tensor or dict)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid[0] == "storage" and pid[1] in STORAGE_DTYPES):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        ref = StorageRef(str(pid[2]), np.dtype(STORAGE_DTYPES[pid[1]]))
        self.storages[ref.key] = ref
        return ref


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a ``.pth`` state dict by name, in file order."""
    path = Path(path)
    try:
        state, storages = (_read_zip if zipfile.is_zipfile(path) else _read_legacy)(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise FeatcacheError(f"{path}: holds a {type(state).__name__}, not a state dict")
        return {name: value.materialise(name, storages) for name, value in state.items()
                if isinstance(value, TensorRef)}
    except (pickle.UnpicklingError, struct.error, EOFError, KeyError, ValueError, TypeError) as exc:
        raise FeatcacheError(f"{path}: not a readable PyTorch state dict ({exc})") from None


def _read_legacy(path: Path) -> tuple[object, dict[str, np.ndarray]]:
    with open(path, "rb") as f:
        if SafeUnpickler(f).load() != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a PyTorch file (bad magic number)")
        SafeUnpickler(f).load()  # protocol version
        SafeUnpickler(f).load()  # sys info
        unpickler = SafeUnpickler(f)
        state = unpickler.load()
        storages = {}
        for key in SafeUnpickler(f).load():
            (numel,) = struct.unpack("<q", f.read(8))
            dtype = unpickler.storages[key].dtype
            raw = f.read(numel * dtype.itemsize) if numel >= 0 else b""
            if numel < 0 or len(raw) != numel * dtype.itemsize:
                raise ValueError(f"storage {key} claims {numel} elements; the file holds {len(raw) // dtype.itemsize}")
            storages[key] = np.frombuffer(raw, dtype=dtype)
    return state, storages


def _read_zip(path: Path) -> tuple[object, dict[str, np.ndarray]]:
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        prefix = pkl[: -len("data.pkl")]
        unpickler = SafeUnpickler(io.BytesIO(archive.read(pkl)))
        state = unpickler.load()
        storages = {
            key: np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=ref.dtype)
            for key, ref in unpickler.storages.items()
        }
    return state, storages
