"""Dataset discovery: three layouts, stable splits, and clear errors or warnings for bad layouts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from featcache import FeatcacheError
from featcache.dataset import hash_split, load_dataset
from featcache.images import IMAGE_SUFFIXES
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


def csv_dataset(root: Path, rows: list[str], header="path,label,split") -> Path:
    """labels.csv under ``root`` (with 4 cat and 4 dog images) holding ``rows`` after ``header``."""
    make_class_folders(root, per_class=4)
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root / "labels.csv"


GOOD_ROWS = [f"{c}/{c}_{i:03d}.png,{c},train" for c in ("cat", "dog") for i in range(4)]


@pytest.mark.parametrize("bad_row", [",cat,train", "cat/cat_000.png,,train", "cat/cat_000.png, ,train"])
def test_csv_row_with_empty_path_or_label_is_an_error_naming_its_line(bad_row, tmp_path):
    csv_path = csv_dataset(tmp_path, [GOOD_ROWS[0], bad_row, GOOD_ROWS[1]])
    with pytest.raises(FeatcacheError) as error:
        load_dataset(csv_path)
    assert str(error.value) == f"{csv_path}:3: empty path or label"  # the header is line 1


def test_csv_unknown_split_is_an_error_naming_file_line_and_choices(tmp_path):
    csv_path = csv_dataset(tmp_path, [*GOOD_ROWS, "cat/cat_000.png,cat,dev"])
    with pytest.raises(FeatcacheError) as error:
        load_dataset(csv_path)
    assert str(error.value) == f"{csv_path}:10: split 'dev' is not one of train, validation (val), test"


def test_csv_escaping_path_error_says_how_to_fix_it(tmp_path):
    csv_path = csv_dataset(tmp_path, [*GOOD_ROWS, "../outside.png,cat,train"])
    with pytest.raises(FeatcacheError, match=r":10: path '../outside.png' escapes .*; use paths relative to the CSV"):
        load_dataset(csv_path)


def test_csv_missing_files_anywhere_are_rejected_and_every_other_row_is_kept(tmp_path):
    csv_path = csv_dataset(tmp_path, ["cat/gone.png,cat,train", *GOOD_ROWS[:4], "dog/gone.png,dog,train",
                                      *GOOD_ROWS[4:]])
    ds = load_dataset(csv_path)
    assert [r.relpath for r in ds.rejects] == ["cat/gone.png", "dog/gone.png"]
    assert sorted(s.relpath for s in ds.samples) == sorted(r.split(",")[0] for r in GOOD_ROWS)


def test_csv_class_whose_files_are_all_missing_is_still_a_class_without_training_images(tmp_path):
    csv_path = csv_dataset(tmp_path, [*GOOD_ROWS, "bird/gone.png,bird,train"])
    with pytest.raises(FeatcacheError, match="class 'bird' has no training images"):
        load_dataset(csv_path)


def test_folder_without_class_folders_is_an_error_naming_both_folder_layouts(tmp_path):
    write_image(tmp_path / "loose.png")
    with pytest.raises(FeatcacheError) as error:
        load_dataset(tmp_path)
    assert str(error.value) == (f"--data {tmp_path}: no class folders found; expected ROOT/<class>/<image> "
                                "or ROOT/{train,validation,test}/<class>/<image>")


def test_samples_record_path_label_split_and_content_hash_in_relative_path_order(tmp_path):
    """Rows are ordered by relative path (not by label, not by absolute path: "cat-x" sorts before "cat/")."""
    root = tmp_path / "d"
    make_class_folders(root, per_class=10)
    write_image(root / "cat-extra.png", seed=77)
    rows = ["dog/dog_009.png,dog", "cat-extra.png,cat"]
    rows += [f"{c}/{c}_{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(9)]
    (root / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    fractions = (0.5, 0.25, 0.25)
    ds = load_dataset(root / "labels.csv", fractions)
    assert ds.root == root.resolve() and ds.layout == "csv"
    assert [s.relpath for s in ds.samples] == sorted(r.split(",")[0] for r in rows)
    assert ds.samples[0].relpath == "cat-extra.png"
    for s in ds.samples:
        assert s.path == root.resolve() / s.relpath
        assert ds.classes[s.label] == ("cat" if s.relpath.startswith("cat") else "dog")
        assert s.split == hash_split(s.relpath, fractions)
        assert s.sha256 == hashlib.sha256(s.path.read_bytes()).hexdigest()
    assert [s.split for s in ds.samples] != [hash_split(s.relpath) for s in ds.samples]  # the fractions count


def test_hash_split_gives_validation_and_test_their_shares_too():
    splits = [hash_split(f"c/{i}.png", (0.5, 0.25, 0.25)) for i in range(4000)]
    assert 0.22 < splits.count("validation") / 4000 < 0.28
    assert 0.22 < splits.count("test") / 4000 < 0.28


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (1.2, -0.1, -0.1), (0.5, 0.5, 0.5), (0.7, 0.15, 0.1)])
def test_bad_split_fractions_are_one_error_with_an_example(fractions, tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4)
    with pytest.raises(FeatcacheError) as error:
        load_dataset(root, fractions)
    assert str(error.value) == (f"split fractions {fractions} must be three non-negative numbers summing to 1, "
                                "e.g. 0.7,0.15,0.15")


def test_fractions_may_leave_a_split_empty(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4)
    assert load_dataset(root, (1.0, 0.0, 0.0)).splits == ("train",)


def test_images_in_subfolders_count_and_hidden_folders_and_files_do_not(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4)
    write_image(root / "cat" / "more" / "deeper.png", seed=90)
    write_image(root / "cat" / ".cache" / "thumb.png", seed=91)
    write_image(root / "cat" / ".hidden.png", seed=92)
    relpaths = {s.relpath for s in load_dataset(root).samples}
    assert "cat/more/deeper.png" in relpaths and len(relpaths) == 9


def test_unreadable_file_is_rejected_with_the_reason_and_the_rest_is_kept(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4)
    (root / "cat" / "aaa_dangling.png").symlink_to(root / "nowhere.png")
    ds = load_dataset(root)
    assert [(r.relpath, r.reason) for r in ds.rejects] == [("cat/aaa_dangling.png",
                                                            "cannot read (No such file or directory)")]
    assert len(ds.samples) == 8


def test_non_utf8_file_name_is_rejected_under_a_printable_name(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4)
    write_image(Path(os.fsdecode(bytes(root / "cat") + b"/caf\xe9.png")))
    assert [r.relpath for r in load_dataset(root).rejects] == ["cat/caf\ufffd.png"]


def test_no_images_at_all_is_an_error_listing_the_suffixes_looked_for(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("no images")
    with pytest.raises(FeatcacheError) as error:
        load_dataset(tmp_path)
    assert str(error.value) == f"--data {tmp_path}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"


def test_csv_without_a_train_row_and_two_classes_missing_name_both(tmp_path):
    csv_path = csv_dataset(tmp_path, [r.replace(",train", ",test") for r in GOOD_ROWS])
    with pytest.raises(FeatcacheError) as error:
        load_dataset(csv_path)
    assert str(error.value).startswith("class 'cat', 'dog' has no training images in ")


def test_warnings_name_every_absent_class_and_two_leaked_files(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 2, "test": 1})
    write_image(root / "train" / "bird" / "bird_000.png", seed=300)
    for f in (root / "test" / "dog").iterdir():
        f.unlink()
    original = root / "train" / "cat" / "cat_000.png"
    for copy in ("test/cat/copy1.png", "test/cat/copy2.png"):
        (root / copy).write_bytes(original.read_bytes())
    warnings = load_dataset(root).warnings
    assert "split 'test' has no images of class bird, dog" in warnings
    assert warnings[-1] == ("leakage: 1 file(s) appear in more than one split with identical content, "
                            "e.g. test/cat/copy1.png and test/cat/copy2.png")


def test_missing_data_path_error_says_how_to_get_data(tmp_path):
    with pytest.raises(FeatcacheError) as error:
        load_dataset(tmp_path / "nope")
    assert str(error.value) == (f"--data {tmp_path / 'nope'}: no such file or folder; pass a dataset folder or CSV "
                                "(or run `featcache datasets elpv` to create data/)")


def test_a_data_file_that_is_not_a_csv_is_one_error_naming_both_formats(tmp_path):
    (tmp_path / "images.zip").write_bytes(b"PK")
    with pytest.raises(FeatcacheError) as error:
        load_dataset(tmp_path / "images.zip")
    assert str(error.value) == (f"--data {tmp_path / 'images.zip'}: a file must be a CSV with columns "
                                "path,label[,split] or an .npz with arrays images and labels")


def test_split_folders_dataset_records_its_root(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 2, "val": 1, "test": 1})
    assert load_dataset(root).root == root
