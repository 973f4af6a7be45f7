"""Find images, classes and splits on disk (three layouts) and check them before any work.

Layouts, detected in this order:
  (a) ROOT/{train,validation,test}/<class>/<image>  (``val`` is accepted for validation)
  (b) ROOT/<class>/<image>, split by a hash of the relative path (stable when images are added)
  (c) a CSV file with columns path,label[,split]; paths relative to the CSV's folder
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from featcache import FeatcacheError
from featcache.images import IMAGE_SUFFIXES

SPLITS = ("train", "validation", "test")
SPLIT_NAMES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)


@dataclass(frozen=True)
class Sample:
    """One image: where it is, what it is, which split it belongs to, and its content hash.

    An augmented view of a training image (see augment.py) is a Sample too: ``view`` is 1 or more,
    ``source_sha256`` holds the file's sha256 and ``sha256`` the view's own row identity.
    """

    path: Path
    relpath: str
    label: int
    split: str
    sha256: str
    view: int = 0
    source_sha256: str | None = None


@dataclass(frozen=True)
class Reject:
    """A file that was skipped, with the reason shown in the summary and stored in the manifest."""

    relpath: str
    reason: str


@dataclass
class Dataset:
    root: Path
    layout: str
    classes: tuple[str, ...]
    samples: list[Sample]
    rejects: list[Reject] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def splits(self) -> tuple[str, ...]:
        present = {s.split for s in self.samples}
        return tuple(name for name in SPLITS if name in present)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]


def load_dataset(data: str | Path, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> Dataset:
    """Discover the layout of ``data``, hash every file, and validate classes and splits."""
    data = Path(data)
    if not data.exists():
        raise FeatcacheError(
            f"--data {data}: no such file or folder; pass a dataset folder or CSV "
            "(or run `featcache datasets elpv` to create data/)"
        )
    check_fractions(fractions)
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise FeatcacheError(f"--data {data}: a file must be a CSV with columns path,label[,split] "
                                 "or an .npz with arrays images and labels")
        return _build(data.parent.resolve(), "csv", _read_csv(data), fractions)
    if _split_folders(data):
        return _build(data, "split-folders", _scan_split_folders(data), fractions)
    return _build(data, "class-folders", _scan_class_folders(data), fractions)


# A raw entry before labels are numbered: (absolute path, relative path, class name, split or None)
Entry = tuple[Path, str, str, "str | None"]
Scanned = tuple[list[Entry], list[Reject], set[str]]


def _split_folders(root: Path) -> dict[str, Path]:
    return {
        SPLIT_NAMES[d.name]: d
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name in SPLIT_NAMES
    }


def _scan_split_folders(root: Path) -> Scanned:
    entries: list[Entry] = []
    classes: set[str] = set()
    for split, folder in _split_folders(root).items():
        for class_dir in _subfolders(folder):
            classes.add(class_dir.name)
            entries += [(p, _rel(p, root), class_dir.name, split) for p in images_under(class_dir)]
    return entries, [], classes


def _scan_class_folders(root: Path) -> Scanned:
    class_dirs = _subfolders(root)
    if not class_dirs:
        raise FeatcacheError(
            f"--data {root}: no class folders found; expected ROOT/<class>/<image> "
            "or ROOT/{train,validation,test}/<class>/<image>"
        )
    entries = [(p, _rel(p, root), d.name, None) for d in class_dirs for p in images_under(d)]
    return entries, [], {d.name for d in class_dirs}


def _read_csv(csv_path: Path) -> Scanned:
    root = csv_path.parent.resolve()
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = set(reader.fieldnames or ())
        if not {"path", "label"} <= columns:
            raise FeatcacheError(
                f"{csv_path}: the header must name columns path,label[,split]; found {sorted(columns)}"
            )
        rows = list(reader)
    entries: list[Entry] = []
    rejects: list[Reject] = []
    for line, row in enumerate(rows, start=2):
        relpath, label = (row["path"] or "").strip(), (row["label"] or "").strip()
        split = _csv_split(csv_path, line, (row.get("split") or "").strip())
        if not relpath or not label:
            raise FeatcacheError(f"{csv_path}:{line}: empty path or label")
        path = (root / relpath).resolve()
        if not path.is_relative_to(root):
            raise FeatcacheError(
                f"{csv_path}:{line}: path {relpath!r} escapes the CSV's folder {root}; "
                "use paths relative to the CSV's folder"
            )
        if not path.is_file():
            rejects.append(Reject(relpath, "file not found"))
            continue
        entries.append((path, _rel(path, root), label, split))
    return entries, rejects, {e[2] for e in entries} | {
        (r["label"] or "").strip() for r in rows
    }


def _csv_split(csv_path: Path, line: int, value: str) -> str | None:
    if not value:
        return None
    if value.lower() not in SPLIT_NAMES:
        raise FeatcacheError(
            f"{csv_path}:{line}: split {value!r} is not one of train, validation (val), test"
        )
    return SPLIT_NAMES[value.lower()]


def _build(root: Path, layout: str, scanned: Scanned, fractions) -> Dataset:
    entries, rejects, class_names = scanned
    bad_names = [e[1] for e in entries if not _is_utf8(e[1])]
    rejects += [Reject(_printable(n), "file name is not valid UTF-8; rename the file") for n in bad_names]
    entries = [e for e in entries if _is_utf8(e[1])]
    classes = tuple(sorted(class_names))
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for path, rel, label, split in sorted(entries, key=lambda e: e[1]):
        try:
            digest = file_sha256(path)
        except OSError as exc:  # a symlink loop, a dangling link, no permission: skip and say why
            rejects.append(Reject(rel, f"cannot read ({exc.strerror or exc})"))
            continue
        samples.append(Sample(path, rel, index[label], split or hash_split(rel, fractions), digest))
    if not samples:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise FeatcacheError(f"--data {root}: no images found (looked for {suffixes})")
    dataset = Dataset(root, layout, classes, samples, rejects)
    _check_classes(dataset)
    _check_leakage(dataset)
    return dataset


def _check_classes(dataset: Dataset) -> None:
    counts = {split: Counter(s.label for s in dataset.split(split)) for split in dataset.splits}
    missing_train = [c for i, c in enumerate(dataset.classes) if counts.get("train", {}).get(i, 0) == 0]
    if missing_train:
        raise FeatcacheError(
            f"class {', '.join(repr(c) for c in missing_train)} has no training images in "
            f"{dataset.root}; add images or remove the class folder/rows"
        )
    for split in dataset.splits:
        absent = [c for i, c in enumerate(dataset.classes) if counts[split].get(i, 0) == 0]
        if absent:
            dataset.warnings.append(f"split {split!r} has no images of class {', '.join(absent)}")


def _check_leakage(dataset: Dataset) -> None:
    splits_of: dict[str, set[str]] = defaultdict(set)
    example: dict[str, list[str]] = defaultdict(list)
    for s in dataset.samples:
        splits_of[s.sha256].add(s.split)
        example[s.sha256].append(s.relpath)
    leaked = [sha for sha, splits in splits_of.items() if len(splits) > 1]
    if leaked:
        dataset.warnings.append(
            f"leakage: {len(leaked)} file(s) appear in more than one split with identical content, "
            f"e.g. {' and '.join(example[leaked[0]][:2])}"
        )


def hash_split(relpath: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """Assign a split from the path alone, so adding images never moves existing ones."""
    u = int.from_bytes(hashlib.sha256(os.fsencode(relpath)).digest()[:8], "big") / 2**64
    train, validation, _ = fractions
    return "train" if u < train else "validation" if u < train + validation else "test"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise FeatcacheError(
            f"split fractions {fractions} must be three non-negative numbers summing to 1, e.g. 0.7,0.15,0.15"
        )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def images_under(folder: Path) -> list[Path]:
    """Image files below folder, recursively, hidden entries skipped; symlinked folders are not followed."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / name
            for name in sorted(filenames)
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
        ]
    return found


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _printable(name: str) -> str:
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()
