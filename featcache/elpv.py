"""The elpv solar-cell dataset (Deitsch et al. 2019) from its PyPI wheel, as split folders on disk.

The wheel ships 2,624 electroluminescence images of solar cells (300x300 greyscale PNG) and a
labels file with one line per image: ``images/cellNNNN.png <defect probability> <mono|poly>``.
``materialize`` copies them into layout (a), DEST/{train,validation,test}/<class>/cellNNNN.png,
so every featcache command can use the benchmark without a download step of its own. The split
follows the paper: 25% test stratified by class and module type, then 15% of the rest for
validation, stratified the same way, with a fixed seed. DEST/elpv-split.csv records it; its paths
are relative to DEST, so the CSV is itself a layout (c) dataset.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from featcache import FeatcacheError
from featcache.dataset import SPLITS
from featcache.files import atomic_write

PACKAGE, VERSION, LABELS_MEMBER = "elpv-dataset", "1.0.0.post1", "elpv_dataset/data/labels.csv"
# The paper's four defect probabilities, in order; the digit keeps that order when sorted by name.
CLASSES = ("0_functional", "1_possibly_defective", "2_likely_defective", "3_defective")
PROBABILITIES = (0.0, 1 / 3, 2 / 3, 1.0)
MODULE_TYPES = ("mono", "poly")
TEST_SIZE, VALIDATION_SIZE = 0.25, 0.15
# With 8 (class, type) groups, validation gets ceil(0.15 * 0.75 * 8 * limit) images and sklearn
# needs at least one per group: limit >= 8.
MIN_LIMIT = 8
SPLIT_CSV = "elpv-split.csv"
SPLIT_CSV_COLUMNS = ("path", "label", "split", "type", "probability")


@dataclass(frozen=True)
class Cell:
    """One line of labels.csv: the image path relative to the labels file, its label and module type."""

    path: str
    probability: float
    type: str

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def label(self) -> str:
        return CLASSES[round(self.probability * 3)]

    @property
    def group(self) -> str:
        """The stratum of the paper's split: class and module type together."""
        return f"{self.label}/{self.type}"


def labels_file() -> Path:
    """labels.csv inside the installed wheel, installing the wheel (no deps) the first time."""
    from featcache.backbones.weights import package_file

    return package_file(PACKAGE, VERSION, LABELS_MEMBER)


def read_labels(path: Path | None = None) -> list[Cell]:
    """Parse labels.csv (whitespace-separated, no header), rejecting anything outside the paper's values."""
    path = path or labels_file()
    cells = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        fields = text.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise FeatcacheError(f"{path}:{line}: expected 'path probability type', found {text!r}")
        relpath, probability, module_type = fields
        p = _probability(probability)
        if p is None:
            raise FeatcacheError(f"{path}:{line}: probability {probability!r} is not 0, 1/3, 2/3 or 1")
        if module_type not in MODULE_TYPES:
            raise FeatcacheError(f"{path}:{line}: module type {module_type!r} is not mono or poly")
        cells.append(Cell(relpath, p, module_type))
    if not cells:
        raise FeatcacheError(f"{path}: no labelled images; reinstall {PACKAGE}=={VERSION}")
    return cells


def plan_split(cells: list[Cell], seed: int = 0, limit: int | None = None) -> dict[str, list[Cell]]:
    """Assign every cell to train, validation or test; the same cells and seed give the same plan.

    ``limit`` keeps at most that many cells per (class, type) group, chosen by a seeded shuffle,
    so tests get a small subset in which every group is still present in every split.
    """
    if limit is not None:
        if limit < MIN_LIMIT:
            raise FeatcacheError(
                f"limit={limit} is too small to stratify 8 (class, type) groups into 3 splits; "
                f"use at least {MIN_LIMIT}"
            )
        cells = _subset(cells, seed, limit)
    rest, test = _stratified(cells, TEST_SIZE, seed)
    train, validation = _stratified(rest, VALIDATION_SIZE, seed)
    return {
        split: sorted(part, key=lambda c: c.path)
        for split, part in zip(SPLITS, (train, validation, test), strict=True)
    }


def materialize(dest: Path, seed: int = 0, limit: int | None = None) -> dict:
    """Write the planned split under ``dest``; files already holding the right bytes are left alone.

    Images a previous run placed elsewhere (another seed or limit) are removed first, so an image
    is never in two splits. Returns counts per split and class, what was written, and the seconds.
    """
    start = time.perf_counter()
    dest = Path(dest)
    old_paths = _previous_paths(dest)
    labels = labels_file()
    plan = plan_split(read_labels(labels), seed, limit)
    rows = [
        {"path": f"{split}/{c.label}/{c.name}", "label": c.label, "split": split, "type": c.type,
         "probability": repr(c.probability)}
        for split, part in plan.items() for c in part
    ]
    missing = [labels.parent / c.path for part in plan.values() for c in part
               if not (labels.parent / c.path).is_file()]
    if missing:
        raise FeatcacheError(f"{missing[0]}: image listed in labels.csv is missing ({len(missing)} in all); "
                             f"reinstall {PACKAGE}=={VERSION}")
    wanted = {row["path"] for row in rows}
    written = 0
    try:
        for stale in sorted(old_paths - wanted):
            (dest / stale).unlink(missing_ok=True)
        _write_if_changed(dest / SPLIT_CSV, _csv_bytes(rows))
        for split, part in plan.items():
            for cell in part:
                target = dest / split / cell.label / cell.name
                written += _write_if_changed(target, (labels.parent / cell.path).read_bytes())
    except OSError as exc:
        raise FeatcacheError(f"cannot write the elpv dataset to {dest}: {exc}") from exc
    counts = {split: {name: Counter(c.label for c in part)[name] for name in CLASSES}
              for split, part in plan.items()}
    return {"dest": str(dest), "seed": seed, "counts": counts, "images": len(rows), "written": written,
            "removed": len(old_paths - wanted), "seconds": time.perf_counter() - start}


def _probability(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if any(math.isclose(value, p, abs_tol=1e-6) for p in PROBABILITIES) else None


def _subset(cells: list[Cell], seed: int, limit: int) -> list[Cell]:
    groups: dict[str, list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[cell.group].append(cell)
    rng = np.random.default_rng(seed)
    kept = [
        members[i] for _, members in sorted(groups.items()) for i in rng.permutation(len(members))[:limit]
    ]
    return sorted(kept, key=lambda c: c.path)


def _stratified(cells: list[Cell], size: float, seed: int) -> tuple[list[Cell], list[Cell]]:
    kept, held_out = train_test_split(cells, test_size=size, stratify=[c.group for c in cells],
                                      random_state=seed)
    return kept, held_out


def _previous_paths(dest: Path) -> set[str]:
    """Images listed by an earlier run's split CSV; a non-empty folder without one is not ours to fill."""
    if dest.exists() and not dest.is_dir():
        raise FeatcacheError(f"--dest {dest}: exists and is not a folder; pass a new or empty folder")
    if not dest.exists() or not any(not p.name.startswith(".") for p in dest.iterdir()):
        return set()
    split_csv = dest / SPLIT_CSV
    if not split_csv.is_file():
        raise FeatcacheError(
            f"--dest {dest}: folder is not empty and holds no {SPLIT_CSV}; pass a new or empty folder"
        )
    with open(split_csv, newline="", encoding="utf-8") as f:
        paths = {row.get("path") or "" for row in csv.DictReader(f)}
    return {p for p in paths if _is_image_path(p)}


def _is_image_path(relpath: str) -> bool:
    """Only split/class/file paths are ours to delete: a damaged CSV cannot point anywhere else."""
    parts = Path(relpath).parts
    return len(parts) == 3 and parts[0] in SPLITS and parts[1] in CLASSES and parts[2].endswith(".png")


def _csv_bytes(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=SPLIT_CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


def _write_if_changed(target: Path, data: bytes) -> bool:
    """Write ``data`` under a temporary name and rename, unless ``target`` already holds it."""
    if target.is_file() and target.stat().st_size == len(data) and target.read_bytes() == data:
        return False
    atomic_write(target, data)
    return True
