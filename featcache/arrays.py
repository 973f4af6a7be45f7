"""Arrays as a dataset: images held in memory (a uint8 array, or an .npz file) become image files.

Every cache rule (content keys, reuse of rows, stale detection, resume) is defined on image files,
so an array dataset is written once as lossless PNG (the decoded pixels are the array's) in the
split-folder layout, ``WORKDIR/arrays/DIGEST/SPLIT/CLASS/SHA.png``, and the ordinary file pipeline
runs on that folder. ``SHA`` is the sha256 of an image's shape and pixels, ``DIGEST`` that of every
(split, class, file) entry: identical arrays give identical files in the same folder, so a second
extract finds its cache complete and computes nothing, and a grown dataset reuses the rows it
shares. Without ``splits`` an image's split is the hash split of ``CLASS/SHA.png``, as for class
folders: it depends on the image alone, never on its index in the array.

The folder is built under a temporary name and renamed into place whole. ``arrays.json`` in it
records each file's sha256; every use checks the files against it, and a damaged folder is rebuilt.
Because the folder is an ordinary dataset, ``finetune`` and ``compare --report`` read it as they
read any other.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featcache import FeatcacheError
from featcache.dataset import SPLIT_NAMES, Dataset, check_fractions, load_dataset, stratified_split
from featcache.files import raise_if_out_of_space
from featcache.targets import DEFAULT, Target

FORMAT = 1  # of the folder: PNG files named by the sha256 of "HxWxC:" + pixels
INDEX = "arrays.json"
NPZ_KEYS = ("images", "labels", "splits", "classes")


@dataclass(frozen=True)
class ArrayData:
    """Images with a class name per image and, optionally, a split per image; checked when built
    (``of``), so code that receives one trusts it."""

    images: np.ndarray  # (N, H, W) or (N, H, W, 3) uint8
    names: tuple[str, ...]  # the class name of each image
    splits: tuple[str, ...] | None  # train, validation or test per image; None: the hash split
    classes: tuple[str, ...]  # as given (or derived), before the dataset orders them by name

    @classmethod
    def of(cls, images, labels, splits=None, classes=None, where: str = "") -> ArrayData:
        """Check arrays given by a user (``where`` prefixes every message) and name each image's class.

        ``labels`` are class indices (ints, named by ``classes`` or by their number) or class names.
        """
        images = _images(images, where)
        classes = _classes(classes, where)
        names, classes = _label_names(labels, len(images), classes, where)
        return cls(images, names, _splits(splits, len(images), where), classes)

    @classmethod
    def from_npz(cls, path: str | Path) -> ArrayData:
        """An .npz holding ``images`` and ``labels`` (optionally ``splits`` and ``classes``), read without
        unpickling anything."""
        where = f"--data {path}: "
        try:
            with np.load(path, allow_pickle=False) as npz:
                if not isinstance(npz, np.lib.npyio.NpzFile):
                    raise ValueError("not an .npz archive")
                arrays = {name: npz[name] for name in npz.files}
        except ValueError as exc:  # object arrays (they need pickle), or not an archive
            raise FeatcacheError(f"{where}cannot read it without pickle ({exc}); save plain arrays with "
                                 "np.savez(path, images=..., labels=...) (numbers or strings)") from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise FeatcacheError(f"{where}not a readable .npz file ({exc})") from None
        missing = [name for name in NPZ_KEYS[:2] if name not in arrays]
        unknown = sorted(set(arrays) - set(NPZ_KEYS))
        if missing or unknown:
            problem = (f"no {' or '.join(missing)} array" if missing
                       else f"unknown array(s) {', '.join(unknown)}")
            raise FeatcacheError(f"{where}{problem}; an .npz holds images and labels, optionally splits "
                                 f"and classes (it has {', '.join(sorted(arrays)) or 'nothing'})")
        return cls.of(arrays["images"], arrays["labels"], arrays.get("splits"), arrays.get("classes"), where)

    def entries(self, fractions: tuple[float, float, float]) -> list[tuple[str, int]]:
        """(relative path, image index) of every image; identical images in one split and class get
        distinct files (``SHA.png``, ``SHA-2.png``, ...), so every image is a row, as a copied file is."""
        shas = [pixel_sha256(image) for image in self.images]
        splits = self.splits or self._stratified(shas, fractions)
        seen: Counter = Counter()
        entries = []
        for i, (name, sha, split) in enumerate(zip(self.names, shas, splits, strict=True)):
            seen[split, name, sha] += 1
            suffix = "" if seen[split, name, sha] == 1 else f"-{seen[split, name, sha]}"
            entries.append((f"{split}/{name}/{sha}{suffix}.png", i))
        return entries

    def _stratified(self, shas: list[str], fractions) -> tuple[str, ...]:
        """Each image's split when none is given: class by class, by the rank of its content's hash
        (dataset.stratified_split), so the order of the arrays never matters and identical images of
        a class share a split."""
        keys_of_class: dict[str, set[str]] = {}
        for name, sha in zip(self.names, shas, strict=True):
            keys_of_class.setdefault(name, set()).add(f"{name}/{sha}.png")
        split_of = {}
        for keys in keys_of_class.values():
            split_of.update(stratified_split(sorted(keys), fractions))
        return tuple(split_of[f"{name}/{sha}.png"] for name, sha in zip(self.names, shas, strict=True))


def pixel_sha256(image: np.ndarray) -> str:
    """The identity of an image: its shape and pixels."""
    shape = "x".join(map(str, image.shape)).encode()
    return hashlib.sha256(shape + b":" + np.ascontiguousarray(image).tobytes()).hexdigest()


def materialise(data: ArrayData, workdir: str | Path, fractions: tuple[float, float, float],
                target: Target = DEFAULT) -> Dataset:
    """The dataset of ``data``: its folder under ``WORKDIR/arrays``, written unless already intact;
    its classes read as ``target`` orders them."""
    check_fractions(fractions)
    if not target.one_class_each:
        raise FeatcacheError(f"--task {target.task} from arrays is not supported yet: arrays are written as class "
                             "folders; write the images as files with a CSV of path,label instead")
    entries = data.entries(fractions)
    relpaths = {relpath for relpath, _ in entries}
    digest = hashlib.sha256(json.dumps([FORMAT, sorted(relpaths)]).encode()).hexdigest()
    root = Path(workdir) / "arrays" / digest[:16]
    dataset = _intact(root, relpaths, target)
    if dataset is None:
        _write(root, data, entries)
        dataset = _intact(root, relpaths, target)
        if dataset is None:
            raise FeatcacheError(f"{root}: the image files written do not read back as written; "
                                 "check the disk, delete the folder and run the same extract again")
    dataset.warnings += _class_warnings(data, dataset)
    return dataset


def _intact(root: Path, relpaths: set[str], target: Target) -> Dataset | None:
    """The folder as a dataset when every file is there and is the file written, else None."""
    try:
        index = json.loads((root / INDEX).read_text())
        dataset = load_dataset(root, target=target)
    except (OSError, ValueError, FeatcacheError):
        return None
    found = {s.relpath: s.sha256 for s in dataset.samples}
    if index.get("format") != FORMAT or set(index.get("files", {})) != relpaths or found != index["files"]:
        return None
    return dataset


def _write(root: Path, data: ArrayData, entries: list[tuple[str, int]]) -> None:
    """Encode every image into a temporary folder, then rename it into place whole."""
    from PIL import Image

    building = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    try:
        files = {}
        for relpath, i in entries:
            buffer = io.BytesIO()
            Image.fromarray(data.images[i]).save(buffer, format="PNG", compress_level=1)
            path = building / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(buffer.getvalue())
            files[relpath] = hashlib.sha256(buffer.getvalue()).hexdigest()
        (building / INDEX).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1))
        if root.exists():  # damaged: the check above failed
            stale = root.with_name(f".{root.name}.stale-{os.getpid()}")
            os.replace(root, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.replace(building, root)
        except OSError:
            if not root.is_dir():  # else another run has just put the same folder in place
                raise
    except OSError as exc:
        raise_if_out_of_space(exc, f"writing {root}")
        raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


def _class_warnings(data: ArrayData, dataset: Dataset) -> list[str]:
    warnings = []
    unused = [c for c in data.classes if c not in dataset.classes]
    if unused:
        warnings.append(f"class {', '.join(unused)} has no images and is left out")
    used = [c for c in data.classes if c in dataset.classes]
    if used != list(dataset.classes):
        numbered = ", ".join(f"{i} {c}" for i, c in enumerate(dataset.classes))
        warnings.append(f"classes are numbered by name in the cache ({numbered}), not in the order given; "
                        "cache.classes names every label")
    return warnings


# ---------------------------------------------------------------- checks


def _images(images, where: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise FeatcacheError(f"{where}images have dtype {images.dtype}; give uint8 pixels 0-255 "
                             "(e.g. images.astype(np.uint8), or (images * 255).round().astype(np.uint8) "
                             "for floats in 0-1)")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] != 3) or 0 in images.shape:
        raise FeatcacheError(f"{where}images have shape {images.shape}; give (N, H, W) grayscale or "
                             "(N, H, W, 3) RGB images, at least one")
    if images.ndim == 3 and images.shape[-1] in (3, 4):  # grayscale images 3 px wide: one colour image
        raise FeatcacheError(f"{where}images have shape {images.shape}: one colour image? give a batch, "
                             "(N, H, W, 3) RGB (images[None] for one image) or (N, H, W) grayscale")
    return images


def _classes(classes, where: str) -> tuple[str, ...] | None:
    if classes is None:
        return None
    values = np.asarray(classes)
    if values.ndim != 1 or values.dtype.kind not in "US" or len(values) == 0:
        raise FeatcacheError(f"{where}classes {_short(classes)}: give a list of class names (strings)")
    names = tuple(_text(v) for v in values.tolist())
    for name in names:
        _check_name(name, "classes", where)
    if len(set(names)) != len(names):
        twice = sorted(n for n, k in Counter(names).items() if k > 1)
        raise FeatcacheError(f"{where}classes name {', '.join(twice)} more than once")
    return names


def _label_names(labels, n: int, classes: tuple[str, ...] | None, where: str):
    """(class name per image, classes): indices named by ``classes`` (else by their number, zero-padded
    so that names sort as numbers), or names checked against ``classes``."""
    values = np.asarray(labels)
    if values.ndim == 2 and values.shape[1] == 1:
        values = values[:, 0]  # Keras datasets give (N, 1)
    if values.ndim != 1:
        raise FeatcacheError(f"{where}labels have shape {values.shape}; give one label per image (a class "
                             "index or name); for one-hot labels pass labels.argmax(axis=1)")
    if len(values) != n:
        raise FeatcacheError(f"{where}{len(values)} labels for {n} images; give one label per image")
    if values.dtype.kind in "iu":
        return _index_names(values, classes, where)
    if values.dtype.kind in "US":
        names = tuple(_text(v) for v in values.tolist())
        for name in sorted(set(names)):
            _check_name(name, "labels", where)
        unknown = sorted(set(names) - set(classes or names))
        if unknown:
            raise FeatcacheError(f"{where}labels {', '.join(unknown)} are not in classes "
                                 f"({', '.join(classes)})")
        return names, classes or tuple(sorted(set(names)))
    raise FeatcacheError(f"{where}labels have dtype {values.dtype}; give class indices (ints) or class "
                         "names (strings)")


def _index_names(values: np.ndarray, classes: tuple[str, ...] | None, where: str):
    low, high = int(values.min()), int(values.max())
    if low < 0:
        raise FeatcacheError(f"{where}label {low} is negative; class indices start at 0")
    if classes is None:
        width = len(str(high))
        classes = tuple(f"{i:0{width}d}" for i in range(high + 1))
    elif high >= len(classes):
        raise FeatcacheError(f"{where}label {high} but only {len(classes)} classes ({', '.join(classes)}); "
                             "labels index classes from 0")
    return tuple(classes[i] for i in values.tolist()), classes


def _splits(splits, n: int, where: str) -> tuple[str, ...] | None:
    if splits is None:
        return None
    values = np.asarray(splits)
    if values.ndim != 1 or values.dtype.kind not in "US":
        raise FeatcacheError(f"{where}splits {_short(splits)}: give one split name per image "
                             "(train, validation or test)")
    if len(values) != n:
        raise FeatcacheError(f"{where}{len(values)} splits for {n} images; give one split name per image")
    names = [_text(v).strip().lower() for v in values.tolist()]
    bad = next((i for i, name in enumerate(names) if name not in SPLIT_NAMES), None)
    if bad is not None:
        raise FeatcacheError(f"{where}split {_text(values[bad])!r} (image {bad}) is not one of train, "
                             "validation (val), test")
    return tuple(SPLIT_NAMES[name] for name in names)


def _check_name(name: str, what: str, where: str) -> None:
    """A class becomes a folder name: refuse what a folder cannot be called, or what the scan skips."""
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise FeatcacheError(f"{where}{what}: class name {name!r} cannot be a folder name (empty, starting "
                             "with a dot, or holding / or \\); rename the class")


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
