"""Dataset discovery: three layouts, stable splits, and clear errors or warnings for bad layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from featcache import FeatcacheError
from featcache.dataset import hash_split, load_dataset
from tests.conftest import make_class_folders, make_split_folders, write_image


def test_split_folders_layout_accepts_val_and_sorts_classes(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    ds = load_dataset(root)
    assert ds.layout == "split-folders"
    assert ds.classes == ("cat", "dog")
    assert ds.splits == ("train", "validation", "test")
    assert len(ds.split("train")) == 4 and len(ds.split("validation")) == 2
    assert all(ds.classes[s.label] in s.relpath for s in ds.samples)


def test_class_folders_layout_splits_by_path_hash(class_data):
    ds = load_dataset(class_data)
    assert ds.layout == "class-folders"
    assert {s.split for s in ds.samples} <= {"train", "validation", "test"}
    assert all(s.split == hash_split(s.relpath) for s in ds.samples)


def test_hash_split_is_stable_when_images_are_added(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=10)
    before = {s.relpath: s.split for s in load_dataset(root).samples}
    for i in range(10):
        write_image(root / "cat" / f"new_{i}.png", seed=500 + i)
    after = {s.relpath: s.split for s in load_dataset(root).samples}
    assert all(after[p] == split for p, split in before.items())
    assert len(after) == len(before) + 10


def test_hash_split_follows_requested_fractions():
    paths = [f"c/{i}.png" for i in range(4000)]
    share = sum(hash_split(p, (0.5, 0.25, 0.25)) == "train" for p in paths) / len(paths)
    assert 0.47 < share < 0.53


def test_csv_layout_with_and_without_split_column(tmp_path):
    make_class_folders(tmp_path, per_class=4)
    rows = [f"cat/cat_{i:03d}.png,cat,{'train' if i < 3 else 'test'}" for i in range(4)]
    rows += [f"dog/dog_{i:03d}.png,dog,{'train' if i < 3 else 'val'}" for i in range(4)]
    (tmp_path / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    ds = load_dataset(tmp_path / "labels.csv")
    assert ds.layout == "csv" and ds.classes == ("cat", "dog")
    assert [len(ds.split(s)) for s in ds.splits] == [6, 1, 1]
    (tmp_path / "nosplit.csv").write_text("path,label\n" + "\n".join(r.rsplit(",", 1)[0] for r in rows))
    assert len(load_dataset(tmp_path / "nosplit.csv").samples) == 8


def test_csv_path_escaping_its_folder_is_refused(tmp_path):
    write_image(tmp_path / "outside.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "labels.csv").write_text("path,label\n../outside.png,cat\n")
    with pytest.raises(FeatcacheError, match="escapes the CSV's folder"):
        load_dataset(tmp_path / "sub" / "labels.csv")


def test_csv_missing_file_is_rejected_not_fatal(tmp_path):
    make_class_folders(tmp_path, per_class=6)
    rows = [f"{c}/{c}_{i:03d}.png,{c},train" for c in ("cat", "dog") for i in range(6)]
    (tmp_path / "l.csv").write_text("path,label,split\n" + "\n".join(rows) + "\ncat/gone.png,cat,train\n")
    ds = load_dataset(tmp_path / "l.csv")
    assert [(r.relpath, r.reason) for r in ds.rejects] == [("cat/gone.png", "file not found")]


def test_csv_without_required_columns_is_an_error(tmp_path):
    (tmp_path / "l.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(FeatcacheError, match="path,label"):
        load_dataset(tmp_path / "l.csv")


def test_missing_data_path_is_one_clear_error(tmp_path):
    with pytest.raises(FeatcacheError, match="no such file or folder"):
        load_dataset(tmp_path / "nope")


def test_empty_class_folder_is_an_error_naming_the_class(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=6)
    (root / "bird").mkdir()
    with pytest.raises(FeatcacheError, match="'bird' has no training images"):
        load_dataset(root)


def test_split_missing_a_class_is_a_warning(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 2, "test": 1})
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    ds = load_dataset(root)
    assert any("'test' has no images of class dog" in w for w in ds.warnings)


def test_same_content_in_two_splits_is_a_leakage_warning(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 2, "test": 1})
    (root / "test" / "cat" / "copy.png").write_bytes((root / "train" / "cat" / "cat_000.png").read_bytes())
    assert any(w.startswith("leakage: 1 file") for w in load_dataset(root).warnings)


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=6)
    (root / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (root / "cat" / "README.txt").write_text("notes")
    (root / ".ipynb_checkpoints").mkdir()
    assert len(load_dataset(root).samples) == 12


def test_non_utf8_file_name_is_rejected_not_fatal(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=6)
    write_image(Path(os.fsdecode(bytes(root / "cat") + b"/caf\xe9.png")))
    ds = load_dataset(root)
    assert [r.reason for r in ds.rejects] == ["file name is not valid UTF-8; rename the file"]
    assert len(ds.samples) == 12
