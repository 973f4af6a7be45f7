"""The elpv wheel materialized as split folders: real images, a small stratified subset, one full plan."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from featcache import FeatcacheError, elpv
from featcache.dataset import load_dataset

LIMIT = elpv.MIN_LIMIT  # per (class, type) group: 64 images


@pytest.fixture(scope="module")
def cells() -> dict[str, elpv.Cell]:
    return {cell.name: cell for cell in elpv.read_labels()}


@pytest.fixture(scope="module")
def materialized(tmp_path_factory) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("elpv") / "data"
    return dest, elpv.materialize(dest, seed=0, limit=LIMIT)


def images(dest: Path) -> list[Path]:
    return sorted(dest.glob("*/*/*.png"))


def split_rows(dest: Path) -> list[dict]:
    with open(dest / elpv.SPLIT_CSV, newline="") as f:
        return list(csv.DictReader(f))


def test_materialize_writes_split_folders_that_load_dataset_reads(materialized):
    dest, result = materialized
    dataset = load_dataset(dest)
    assert dataset.layout == "split-folders"
    assert dataset.classes == elpv.CLASSES
    assert dataset.splits == ("train", "validation", "test")
    assert len(dataset.samples) == result["images"] == result["written"] == 8 * LIMIT
    assert dataset.warnings == []
    assert sum(n for per_class in result["counts"].values() for n in per_class.values()) == 8 * LIMIT


def test_split_csv_is_itself_a_dataset_that_matches_the_folders(materialized):
    dest, _ = materialized
    from_csv = load_dataset(dest / elpv.SPLIT_CSV)
    from_folders = load_dataset(dest)
    assert from_csv.layout == "csv"
    assert [(s.relpath, s.label, s.split) for s in from_csv.samples] == [
        (s.relpath, s.label, s.split) for s in from_folders.samples
    ]


def test_every_image_keeps_its_label_and_bytes_from_labels_csv(materialized, cells):
    dest, _ = materialized
    source_root = elpv.labels_file().parent
    for path in images(dest):
        cell = cells[path.name]
        assert path.parent.name == cell.label
        assert path.read_bytes() == (source_root / cell.path).read_bytes()
    for row in split_rows(dest):
        cell = cells[Path(row["path"]).name]
        recorded = (row["label"], row["type"], float(row["probability"]))
        assert recorded == (cell.label, cell.type, cell.probability)


def test_no_image_is_in_two_splits(materialized):
    dest, _ = materialized
    names = [path.name for path in images(dest)]
    assert len(names) == len(set(names))


def test_second_call_with_the_same_seed_rewrites_nothing(materialized):
    dest, _ = materialized
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()}
    again = elpv.materialize(dest, seed=0, limit=LIMIT)
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()}
    assert (again["written"], again["removed"]) == (0, 0)
    assert after == before


def test_another_seed_moves_images_without_leaving_copies_behind(tmp_path):
    dest = tmp_path / "data"
    first = elpv.materialize(dest, seed=0, limit=LIMIT)
    second = elpv.materialize(dest, seed=1, limit=LIMIT)
    assert second["removed"] > 0
    assert len(images(dest)) == second["images"] == first["images"]
    assert {p.relative_to(dest).as_posix() for p in images(dest)} == {r["path"] for r in split_rows(dest)}
    assert load_dataset(dest).warnings == []


def test_plan_is_deterministic_per_seed_and_differs_between_seeds(cells):
    labelled = list(cells.values())
    assert elpv.plan_split(labelled, seed=0, limit=LIMIT) == elpv.plan_split(labelled, seed=0, limit=LIMIT)
    assert elpv.plan_split(labelled, seed=0, limit=LIMIT) != elpv.plan_split(labelled, seed=1, limit=LIMIT)
    assert elpv.plan_split(labelled, seed=0) != elpv.plan_split(labelled, seed=1)


def test_full_plan_covers_every_image_once_and_stratifies_the_test_split(cells):
    plan = elpv.plan_split(list(cells.values()), seed=0)
    sizes = {split: len(part) for split, part in plan.items()}
    assert sizes == {"train": 1672, "validation": 296, "test": 656}
    assert sorted(c.name for part in plan.values() for c in part) == sorted(cells)
    totals = Counter(c.group for c in cells.values())
    held_out = {"test": (Counter(c.group for c in plan["test"]), 0.25),
                "validation": (Counter(c.group for c in plan["validation"]), 0.75 * 0.15)}
    for counts, share in held_out.values():
        for group, total in totals.items():
            assert abs(counts[group] - share * total) <= 1, group


def test_full_label_distribution_matches_the_paper(cells):
    assert len(cells) == 2624
    assert Counter(c.label for c in cells.values()) == {
        "0_functional": 1508, "1_possibly_defective": 295, "2_likely_defective": 106, "3_defective": 715,
    }
    assert Counter(c.type for c in cells.values()) == {"mono": 1074, "poly": 1550}


def test_dest_that_is_a_file_is_refused(tmp_path):
    dest = tmp_path / "data"
    dest.write_text("not a folder")
    with pytest.raises(FeatcacheError, match="not a folder"):
        elpv.materialize(dest, limit=LIMIT)


def test_non_empty_dest_from_elsewhere_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("someone else's data")
    with pytest.raises(FeatcacheError, match=f"holds no {elpv.SPLIT_CSV}"):
        elpv.materialize(tmp_path, limit=LIMIT)


def test_limit_too_small_to_stratify_is_refused(cells):
    with pytest.raises(FeatcacheError, match=f"at least {elpv.MIN_LIMIT}"):
        elpv.plan_split(list(cells.values()), limit=elpv.MIN_LIMIT - 1)


@pytest.mark.parametrize("line, problem", [
    ("images/cell0001.png 0.5 mono", "probability '0.5'"),
    ("images/cell0001.png 1.0 thin", "module type 'thin'"),
    ("images/cell0001.png 1.0", "expected 'path probability type'"),
])
def test_malformed_labels_line_names_file_line_and_value(tmp_path, line, problem):
    labels = tmp_path / "labels.csv"
    labels.write_text(f"images/cell0002.png 0.0 poly\n{line}\n")
    with pytest.raises(FeatcacheError, match=f"labels.csv:2: {problem}"):
        elpv.read_labels(labels)


def test_missing_source_image_is_reported_before_anything_is_written(tmp_path, monkeypatch):
    real = elpv.labels_file().parent
    source = tmp_path / "wheel"
    (source / "images").mkdir(parents=True)
    shutil.copy(real / "labels.csv", source)
    for image in (real / "images").glob("cell*.png"):
        if image.name != "cell0001.png":
            (source / "images" / image.name).symlink_to(image)
    monkeypatch.setattr(elpv, "labels_file", lambda: source / "labels.csv")
    with pytest.raises(FeatcacheError, match="cell0001.png: image listed in labels.csv is missing"):
        elpv.materialize(tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_datasets_elpv_command_fills_a_folder_holding_only_gitkeep(tmp_path):
    from click.testing import CliRunner

    from featcache.cli import main

    dest = tmp_path / "data"
    dest.mkdir()
    (dest / ".gitkeep").touch()
    result = CliRunner().invoke(main, ["datasets", "elpv", "--dest", str(dest), "--limit", "8"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "64 images, 64 written" in result.output
    assert load_dataset(dest).classes == elpv.CLASSES
