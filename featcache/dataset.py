"""Find images, classes and splits on disk (three layouts) and check them before any work.

Layouts, detected in this order:
  (a) ROOT/{train,validation,test}/<class>/<image>  (``val`` is accepted for validation)
  (b) ROOT/<class>/<image>, split per class by the rank of a hash of the relative path (see stratified_split)
  (c) a CSV file with columns path,label[,split]; paths relative to the CSV's folder
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import stat
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from featcache import FeatcacheError
from featcache.files import open_regular
from featcache.images import IMAGE_SUFFIXES
from featcache.targets import DEFAULT, MULTILABEL, SEPARATOR, Target

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
    label: int | float | tuple[int, ...]  # a class index, a regression target's number, or multi-label indices
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
    task: str = "classification"  # targets.TASKS
    label_column: str = "label"  # the CSV column the labels came from
    csv: Path | None = None  # the CSV file read, where there was one: reading the data again reads it

    @property
    def splits(self) -> tuple[str, ...]:
        present = {s.split for s in self.samples}
        return tuple(name for name in SPLITS if name in present)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]


def load_dataset(data: str | Path, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, *,
                 target: Target = DEFAULT, label_column: str = "label") -> Dataset:
    """Discover the layout of ``data``, hash every file, and validate labels (as ``target`` reads them)
    and splits. ``label_column`` names a CSV's label column."""
    data = Path(data)
    if not data.exists():
        raise FeatcacheError(
            f"--data {data}: no such file or folder; pass a dataset folder or CSV "
            "(or run `featcache datasets elpv` to create data/)"
        )
    check_fractions(fractions)
    if not (data.is_file() or data.is_dir()):  # /dev/null, a FIFO, a socket: nothing to scan or read
        raise FeatcacheError(f"--data {data}: not a folder or a regular file; pass a dataset folder, a CSV or an .npz")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise FeatcacheError(f"--data {data}: a file must be a CSV with columns path,label[,split] "
                                 "or an .npz with arrays images and labels")
        dataset = _build(data.parent.resolve(), "csv", _read_csv(data, label_column), fractions, target)
        dataset.label_column, dataset.csv = label_column, data.resolve()
        return dataset
    if not target.one_class_each:
        what = "a number" if not target.has_classes else f"classes separated by {SEPARATOR!r}"
        raise FeatcacheError(f"--data {data}: --task {target.task} reads {what} per image from a CSV column "
                             "(--label-column); folders name one class per image: write a CSV with columns "
                             "path,label[,split]")
    if _split_folders(data):
        return _build(data, "split-folders", _scan_split_folders(data), fractions, target)
    return _build(data, "class-folders", _scan_class_folders(data), fractions, target)


# A raw entry before labels are numbered: (absolute path, relative path, class name, split or None)
Entry = tuple[Path, str, str, "str | None"]
# entries, rejects, class names, and the relative paths of image-named files that are not regular files
Scanned = tuple[list[Entry], list[Reject], set[str], list[str]]


def _split_folders(root: Path) -> dict[str, Path]:
    return {
        SPLIT_NAMES[d.name]: d
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name in SPLIT_NAMES
    }


def _scan_split_folders(root: Path) -> Scanned:
    entries: list[Entry] = []
    classes: set[str] = set()
    special: list[Path] = []
    for split, folder in _split_folders(root).items():
        for class_dir in _subfolders(folder):
            classes.add(class_dir.name)
            entries += [(p, _rel(p, root), class_dir.name, split) for p in images_under(class_dir, special)]
    return entries, [], classes, [_rel(p, root) for p in special]


def _scan_class_folders(root: Path) -> Scanned:
    class_dirs = _subfolders(root)
    if not class_dirs:
        raise FeatcacheError(
            f"--data {root}: no class folders found; expected ROOT/<class>/<image> "
            "or ROOT/{train,validation,test}/<class>/<image>"
        )
    special: list[Path] = []
    entries = [(p, _rel(p, root), d.name, None) for d in class_dirs for p in images_under(d, special)]
    return entries, [], {d.name for d in class_dirs}, [_rel(p, root) for p in special]


def _read_csv(csv_path: Path, label_column: str = "label") -> Scanned:
    root = csv_path.parent.resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if not {"path", label_column} <= columns:
                raise FeatcacheError(
                    f"{csv_path}: the header must name columns path,{label_column}[,split]; found {sorted(columns)}"
                    + ("" if label_column == "label" else "; choose a column with --label-column")
                )
            rows = list(reader)
    except UnicodeDecodeError:
        raw = csv_path.read_bytes()  # the decoder saw a chunk; find the first bad byte in the whole file
        try:
            raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line, byte = raw[: exc.start].count(b"\n") + 1, raw[exc.start]
        raise FeatcacheError(
            f"{csv_path}:{line}: not UTF-8 (byte 0x{byte:02x}); save the CSV as UTF-8 "
            "(Excel: \"CSV UTF-8\"; or `iconv -f latin1 -t utf-8`)"
        ) from None
    entries: list[Entry] = []
    rejects: list[Reject] = []
    special: list[str] = []
    lines: dict[str, list[tuple[int, str]]] = defaultdict(list)  # relative path -> (line, label) naming it
    for line, row in enumerate(rows, start=2):
        relpath, label = (row["path"] or "").strip(), (row[label_column] or "").strip()
        split = _csv_split(csv_path, line, (row.get("split") or "").strip())
        if not relpath or not label:
            raise FeatcacheError(f"{csv_path}:{line}: empty path or label")
        path = (root / relpath).resolve()
        if not path.is_relative_to(root):
            raise FeatcacheError(
                f"{csv_path}:{line}: path {relpath!r} escapes the CSV's folder {root}; "
                "use paths relative to the CSV's folder"
            )
        lines[_rel(path, root)].append((line, label))
        if not path.exists():
            rejects.append(Reject(relpath, "file not found"))
            continue
        if _is_regular(path) is False:
            special.append(relpath)
            continue
        entries.append((path, _rel(path, root), label, split))
    _check_repeated_rows(csv_path, lines)
    return entries, rejects, {e[2] for e in entries} | {
        (r[label_column] or "").strip() for r in rows
    }, special


def _check_repeated_rows(csv_path: Path, lines: dict[str, list[tuple[int, str]]]) -> None:
    """Refuse an image listed twice (the same label or two): it would be one row of the cache and two of
    the dataset, which failed only after the backbone pass."""
    repeated = {rel: found for rel, found in lines.items() if len(found) > 1}
    if repeated:
        rel, found = min(repeated.items(), key=lambda item: item[1][0][0])
        labels = sorted({label for _, label in found})
        others = f" ({len(repeated) - 1} more images are listed twice)" if len(repeated) > 1 else ""
        raise FeatcacheError(
            f"{csv_path}: lines {', '.join(str(n) for n, _ in found)} name the same image {rel} "
            f"(label{'s' if len(labels) > 1 else ''} {' and '.join(labels)}){others}; "
            "list each image once, with one label"
        )


def _csv_split(csv_path: Path, line: int, value: str) -> str | None:
    if not value:
        return None
    if value.lower() not in SPLIT_NAMES:
        raise FeatcacheError(
            f"{csv_path}:{line}: split {value!r} is not one of train, validation (val), test"
        )
    return SPLIT_NAMES[value.lower()]


def _build(root: Path, layout: str, scanned: Scanned, fractions, target: Target = DEFAULT) -> Dataset:
    entries, rejects, class_names, special = scanned
    warnings = [_skipped(special, "not regular files (a FIFO, device or socket, or a link to one): "
                                  "reading them would block or never end; only regular files are images")]
    inside = root.resolve()
    escaping = {e[1] for e in entries if _escapes(e[0], inside)}
    warnings.append(_skipped(sorted(escaping), f"links to files outside the data folder {root}, where "
                                               "nothing is read; copy the files in instead"))
    entries = [e for e in entries if e[1] not in escaping]
    bad_names = [e[1] for e in entries if not _is_utf8(e[1])]
    rejects += [Reject(_printable(n), "file name is not valid UTF-8; rename the file") for n in bad_names]
    entries = [e for e in entries if _is_utf8(e[1])]
    if target.task == MULTILABEL:
        sets = target.label_sets([(rel, label) for _, rel, label, _ in entries], str(root))
        class_names = {name for text in class_names for name in target.label_sets([(text, text)], str(root))[text]}
    classes = target.classes(class_names, str(root))
    if target.task == MULTILABEL:
        position = {name: i for i, name in enumerate(classes)}
        index = {text: tuple(sorted(position[name] for name in names)) for text, names in sets.items()}
    elif target.has_classes:
        index = {name: i for i, name in enumerate(classes)}
    else:
        index = target.values([(rel, label) for _, rel, label, _ in entries], str(root))
    readable = []
    for path, rel, label, split in sorted(entries, key=lambda e: e[1]):
        try:
            readable.append((path, rel, label, split, file_sha256(path)))
        except OSError as exc:  # a symlink loop, a dangling link, no permission: skip and say why
            rejects.append(Reject(rel, f"cannot read ({exc.strerror or exc})"))
    # classes split class by class; numbers and sets of classes split as one group
    stratum = (lambda label: label) if target.one_class_each else (lambda label: "")
    assigned = _assign_splits([(rel, stratum(label)) for _, rel, label, split, _ in readable if split is None],
                              fractions)
    samples = [Sample(path, rel, index[label], split or assigned[rel, stratum(label)], digest)
               for path, rel, label, split, digest in readable]
    if not samples:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise FeatcacheError(f"--data {root}: no images found (looked for {suffixes})")
    dataset = Dataset(root, layout, classes, samples, rejects, [w for w in warnings if w], target.task)
    if layout == "split-folders":
        _check_split_folders(dataset)
    if target.has_classes:
        _check_classes(dataset)
    else:
        _check_values(dataset)
    _check_leakage(dataset)
    return dataset


def _skipped(relpaths: list[str], why: str) -> str:
    """One warning line naming skipped files (the first five, then how many more), or '' for none."""
    if not relpaths:
        return ""
    more = f" and {len(relpaths) - 5} more" if len(relpaths) > 5 else ""
    return f"skipped {len(relpaths)} file{'s' if len(relpaths) > 1 else ''}: {', '.join(relpaths[:5])}{more}: {why}"


def _escapes(path: Path, root: Path) -> bool:
    """Whether path (a link, or in a linked folder) leads outside root, which the CSV layout refuses too;
    False when it cannot be resolved (a dangling link, a loop), so that reading it reports why."""
    try:
        return not path.resolve(strict=True).is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _check_split_folders(dataset: Dataset) -> None:
    """A split folder without a usable image is an error: fit-head needs validation rows (it failed with
    KeyError: 'validation' after a complete extract) and an empty test/ is a mistake, not a choice."""
    empty = [folder for split, folder in _split_folders(dataset.root).items() if not dataset.split(split)]
    if empty:
        raise FeatcacheError(
            f"--data {dataset.root}: {empty[0]} holds no usable image; add images to it as "
            f"{empty[0]}/<class>/<image>, or put every image in the class-folder layout ROOT/<class>/<image> "
            "and let --split-fractions split them"
        )


def _check_classes(dataset: Dataset) -> None:
    """A class without training images is an error; one class only (features are still worth
    extracting, e.g. for scikit-learn's FeatureExtractor, but no head can learn: fit-head refuses it),
    a class absent from a split, or no validation split, a warning."""
    if not dataset.classes:  # a multi-label column of ';' only
        raise FeatcacheError(f"--data {dataset.root}: no row names a class (every label is {SEPARATOR!r}, no class); "
                             "name each image's classes, separated by ';'")
    if len(dataset.classes) < 2:
        dataset.warnings.append(
            f"--data {dataset.root}: only one class ({', '.join(map(repr, dataset.classes))}); no head can "
            "learn from one class: add images of a second class (another class folder or CSV label)")
    _warn_no_validation(dataset)
    counts = {split: Counter(i for s in dataset.split(split) for i in class_indices(s.label))
              for split in dataset.splits}
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


def class_indices(label: int | tuple[int, ...]) -> tuple[int, ...]:
    """The classes of a row's label: its one class, or a multi-label row's classes."""
    return label if isinstance(label, tuple) else (label,)


def _check_values(dataset: Dataset) -> None:
    """A regression target needs training rows of at least two values; no validation split, a warning."""
    values = {s.label for s in dataset.split("train")}
    if len(values) < 2:
        raise FeatcacheError(
            f"--data {dataset.root}: the training rows hold {len(values)} distinct value(s) "
            f"({', '.join(f'{v:g}' for v in sorted(values)[:1]) or 'none'}); a regression head cannot learn "
            "from one value: add images with other values")
    _warn_no_validation(dataset)


def _warn_no_validation(dataset: Dataset) -> None:
    if "validation" not in dataset.splits:
        dataset.warnings.append(
            "no validation images: fit-head chooses every head's options on them and will fail; add a "
            "validation/ folder, validation rows to the CSV, or a validation share in --split-fractions"
        )


def _check_leakage(dataset: Dataset) -> None:
    """Warn when one content sits in two splits, counting both the files and the distinct contents
    (64 copies of 9 images is a bigger leak than 9 files), with an example from two splits."""
    by_content: dict[str, list[Sample]] = defaultdict(list)
    for s in dataset.samples:
        by_content[s.sha256].append(s)
    leaked = [group for group in by_content.values() if len({s.split for s in group}) > 1]
    if leaked:
        files = sum(len(group) for group in leaked)
        first = leaked[0][0]
        other = next(s for s in leaked[0] if s.split != first.split)
        contents = f"{len(leaked)} distinct content{'s' if len(leaked) > 1 else ''}"
        dataset.warnings.append(
            f"leakage: {files} files with {contents} appear in more than one split, "
            f"e.g. {first.relpath} ({first.split}) and {other.relpath} ({other.split})"
        )


def _assign_splits(unsplit: list[tuple[str, str]], fractions) -> dict[tuple[str, str], str]:
    """(relative path, class) -> split for the images without one, stratified class by class."""
    by_class: dict[str, list[str]] = defaultdict(list)
    for rel, label in unsplit:
        by_class[label].append(rel)
    return {(rel, label): split
            for label, rels in by_class.items() for rel, split in stratified_split(rels, fractions).items()}


def stratified_split(relpaths: list[str], fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, str]:
    """Split one class's images by the fractions as exactly as counts allow: relpath -> split.

    Images are ranked by a hash of their relative path and cut at the counts of split_counts: the
    first ones train, the next validation, the rest test. Fixed hash thresholds (hash_split) need no
    ranking and never move an image, but leave small classes to chance: a class of 24 gets no test
    image at 15% once in 50, and a split with one image of a class is common. Ranks make every split
    get its share of every class.

    The trade-off is bounded movement instead of none. The split is still a function of the paths
    alone (no seed, no history), and adding an image to a class moves at most two of that class's
    existing images (the ones ranked next to a cut, each to the neighbouring split; fewer than one on
    average at 70/15/15); adding k moves at most 2k; removing likewise; other classes never move.
    A moved image keeps its cached features (rows are reused by content), but an earlier dataset
    version's test image may now train, so compare heads on one version of the dataset.
    """
    ranked = sorted(relpaths, key=_hash_rank)
    train, validation, _ = split_counts(len(ranked), fractions)
    return {rel: SPLITS[0] if i < train else SPLITS[1] if i < train + validation else SPLITS[2]
            for i, rel in enumerate(ranked)}


def split_counts(n: int, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> tuple[int, int, int]:
    """How many of n images go to train, validation and test: the cumulative fractions rounded.

    Each split with a non-zero fraction gets at least one image when n allows (train first, then
    validation, then test). Both cuts grow by 0 or 1 when n grows by 1, which is what bounds how
    many images an addition moves (see stratified_split).
    """
    wanted = [f > 0 for f in fractions]
    minimum = [int(w and sum(wanted[:i + 1]) <= n) for i, w in enumerate(wanted)]
    cuts = [0, _round_half_up(n * fractions[0]), _round_half_up(n * (fractions[0] + fractions[1])), n]
    for i in (1, 2):
        cuts[i] = max(cuts[i], cuts[i - 1] + minimum[i - 1])
    for i in (2, 1):
        cuts[i] = min(cuts[i], cuts[i + 1] - minimum[i])
    return cuts[1], cuts[2] - cuts[1], n - cuts[2]


def _round_half_up(x: float) -> int:
    """Rounding that never decreases as x grows (Python's round() goes to even)."""
    return math.floor(x + 0.5)


def _hash_rank(relpath: str) -> tuple[int, str]:
    return int.from_bytes(hashlib.sha256(os.fsencode(relpath)).digest()[:8], "big"), relpath


def hash_split(relpath: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """Assign a split from the path alone, so adding images never moves existing ones.

    Not stratified: class folders use stratified_split. Kept for data whose split must depend on one
    image only."""
    u = int.from_bytes(hashlib.sha256(os.fsencode(relpath)).digest()[:8], "big") / 2**64
    train, validation, _ = fractions
    return "train" if u < train else "validation" if u < train + validation else "test"


def file_sha256(path: Path) -> str:
    """The sha256 of a regular file's bytes; OSError for anything else (a FIFO swapped in after the scan
    must not block: it is opened without waiting for a writer, and refused)."""
    with open_regular(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def check_fractions(fractions: tuple[float, float, float]) -> None:
    """Refuse fractions that are not three finite non-negative numbers summing to 1 (nan compares false
    with everything, so it passed the sign and sum checks alone)."""
    if (len(fractions) != 3 or not all(math.isfinite(f) and f >= 0 for f in fractions)
            or abs(sum(fractions) - 1) > 1e-6):
        raise FeatcacheError(
            f"split fractions {fractions} must be three non-negative numbers summing to 1, e.g. 0.7,0.15,0.15"
        )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def images_under(folder: Path, special: list[Path] | None = None) -> list[Path]:
    """Image files below folder, recursively, hidden entries skipped; symlinked folders are not followed.

    Only regular files (or links to them) are images: a FIFO, device or socket with an image suffix
    (``pipe.png``, a link to /dev/zero) would block or never end when read, so it is left out and
    appended to ``special`` for the caller to name. Entries that cannot be examined (a dangling link)
    are kept, so that reading them reports why."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath) / name
            if _is_regular(path) is False:
                if special is not None:
                    special.append(path)
            else:
                found.append(path)
    return found


def _is_regular(path: Path) -> bool | None:
    """Whether path is (or links to) a regular file; None when it cannot be examined."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return None


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
