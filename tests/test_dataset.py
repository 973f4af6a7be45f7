"""Dataset discovery: three layouts, stable splits, and clear errors or warnings for bad layouts."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from featcache import FeatcacheError
from featcache.dataset import hash_split, load_dataset, split_counts, stratified_split
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


def ranked_by_path_hash(relpaths, counts) -> dict[str, str]:
    """The reference split: paths ordered by the first 8 bytes of sha256, cut at (train, validation) counts."""
    ranked = sorted(relpaths, key=lambda p: (hashlib.sha256(p.encode()).digest()[:8], p))
    train, validation, _ = counts
    return {p: "train" if i < train else "validation" if i < train + validation else "test"
            for i, p in enumerate(ranked)}


def split_by_class(ds) -> dict[str, tuple[int, int, int]]:
    return {name: tuple(sum(s.label == i and s.split == split for s in ds.samples)
                        for split in ("train", "validation", "test")) for i, name in enumerate(ds.classes)}


def test_class_folders_layout_splits_each_class_by_path_hash_rank(class_data):
    ds = load_dataset(class_data)
    assert ds.layout == "class-folders"
    assert split_by_class(ds) == {"cat": (10, 2, 2), "dog": (10, 2, 2)}  # 14 images: 9.8 -> 10, 11.9 -> 12
    for name in ds.classes:
        relpaths = [s.relpath for s in ds.samples if ds.classes[s.label] == name]
        expected = ranked_by_path_hash(relpaths, (10, 2, 2))
        assert {s.relpath: s.split for s in ds.samples if s.relpath in expected} == expected


def test_skewed_classes_give_every_split_its_share_of_every_class(tmp_path):
    """The issue's case: 7 classes, one of 24 images, which a fixed hash threshold left without a test image."""
    sizes = {"A": 24, "B": 60, "C": 40, "D": 3, "E": 2, "F": 1, "G": 33}
    for name, n in sizes.items():
        for i in range(n):
            write_image(tmp_path / name / f"{i:03d}.png", size=(8, 8), seed=hash((name, i)) % 10_000)
    ds = load_dataset(tmp_path)
    assert split_by_class(ds) == {"A": (17, 3, 4), "B": (42, 9, 9), "C": (28, 6, 6), "D": (1, 1, 1),
                                  "E": (1, 1, 0), "F": (1, 0, 0), "G": (23, 5, 5)}
    assert [w for w in ds.warnings if "has no images" in w] == ["split 'validation' has no images of class F",
                                                                "split 'test' has no images of class E, F"]


@pytest.mark.parametrize(("fractions", "expected"), [
    ((0.7, 0.15, 0.15), {0: (0, 0, 0), 1: (1, 0, 0), 2: (1, 1, 0), 3: (1, 1, 1), 4: (2, 1, 1), 6: (4, 1, 1),
                         10: (7, 2, 1), 20: (14, 3, 3), 24: (17, 3, 4), 100: (70, 15, 15)}),
    ((0.5, 0.25, 0.25), {3: (1, 1, 1), 5: (3, 1, 1), 7: (4, 1, 2), 8: (4, 2, 2)}),  # 5.25 -> 5
    ((0.2, 0.4, 0.4), {1: (1, 0, 0), 3: (1, 1, 1), 4: (1, 1, 2), 10: (2, 4, 4), 11: (2, 5, 4)}),
    ((0.9, 0.1, 0.0), {1: (1, 0, 0), 3: (2, 1, 0), 5: (4, 1, 0), 20: (18, 2, 0)}),
    ((0.5, 0.0, 0.5), {2: (1, 0, 1), 3: (2, 0, 1), 4: (2, 0, 2)}),
    ((1.0, 0.0, 0.0), {1: (1, 0, 0), 7: (7, 0, 0)}),
])
def test_split_counts_round_the_cumulative_fractions_and_give_each_split_one_image_when_n_allows(
        fractions, expected):
    assert {n: split_counts(n, fractions) for n in expected} == expected


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.34, 0.33, 0.33), (0.1, 0.1, 0.8)])
def test_split_cuts_grow_by_at_most_one_as_a_class_grows(fractions):
    """What bounds the movement stratified_split documents: each cut moves by 0 or 1 per added image."""
    cuts = [(c[0], c[0] + c[1]) for c in (split_counts(n, fractions) for n in range(300))]
    for n, (before, after) in enumerate(zip(cuts, cuts[1:], strict=False)):
        assert {after[0] - before[0], after[1] - before[1]} <= {0, 1}, n
        assert sum(split_counts(n, fractions)) == n


def test_adding_an_image_moves_at_most_two_existing_ones_each_to_a_neighbouring_split():
    neighbours = {("train", "validation"), ("validation", "train"), ("validation", "test"), ("test", "validation")}
    paths = [f"cat/{i:04d}.png" for i in range(40)]
    moved_total = 0
    for i in range(40, 400):
        before = stratified_split(paths)
        paths.append(f"cat/{i:04d}.png")
        after = stratified_split(paths)
        moved = {(before[p], after[p]) for p in before if before[p] != after[p]}
        assert sum(before[p] != after[p] for p in before) <= 2 and moved <= neighbours
        moved_total += sum(before[p] != after[p] for p in before)
    assert 0 < moved_total < 360  # fewer than one per added image on average, as documented


def test_adding_images_to_a_class_moves_few_of_its_images_and_none_of_other_classes(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=20)
    before = {s.relpath: s.split for s in load_dataset(root).samples}
    for i in range(5):
        write_image(root / "cat" / f"new_{i}.png", seed=500 + i)
    after = {s.relpath: s.split for s in load_dataset(root).samples}
    moved = [p for p, split in before.items() if after[p] != split]
    assert len(after) == len(before) + 5
    assert len(moved) <= 10 and all(p.startswith("cat/") for p in moved)


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
    ds = load_dataset(tmp_path / "nosplit.csv")
    assert split_by_class(ds) == {"cat": (2, 1, 1), "dog": (2, 1, 1)}


def test_csv_rows_without_a_split_are_stratified_apart_from_rows_that_name_one(tmp_path):
    make_class_folders(tmp_path, per_class=8)
    rows = [f"cat/cat_{i:03d}.png,cat,{'test' if i < 4 else ''}" for i in range(8)]
    rows += [f"dog/dog_{i:03d}.png,dog,{split}" for i, split in enumerate(("train", "validation", "test"))]
    (tmp_path / "l.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    ds = load_dataset(tmp_path / "l.csv", (0.5, 0.25, 0.25))
    cats = [s for s in ds.samples if s.relpath.startswith("cat/")]
    assert all(s.split == "test" for s in cats[:4])
    expected = ranked_by_path_hash([f"cat/cat_{i:03d}.png" for i in range(4, 8)], (2, 1, 1))
    assert {s.relpath: s.split for s in cats[4:]} == expected


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
    assert any(w.startswith("leakage: 2 files with 1 distinct content appear") for w in load_dataset(root).warnings)


@pytest.mark.parametrize(("images", "files"), [(2, 5), (3, 9)])
def test_leakage_warning_counts_files_and_distinct_contents(images, files, tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 3, "test": 1})
    for i in range(images):
        original = (root / "train" / "cat" / f"cat_{i:03d}.png").read_bytes()
        for copy in range(i + 1):  # 1 + 2 (+ 3) copies in test of images in train
            (root / "test" / "cat" / f"copy_{i}_{copy}.png").write_bytes(original)
    assert load_dataset(root).warnings[-1] == (
        f"leakage: {files} files with {images} distinct contents appear in more than one split, "
        "e.g. test/cat/copy_0_0.png (test) and train/cat/cat_000.png (train)")


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
    ds = load_dataset(root / "labels.csv", (0.5, 0.25, 0.25))
    assert ds.root == root.resolve() and ds.layout == "csv"
    assert [s.relpath for s in ds.samples] == sorted(r.split(",")[0] for r in rows)
    assert ds.samples[0].relpath == "cat-extra.png"
    expected = {**ranked_by_path_hash([r.split(",")[0] for r in rows if r.endswith(",cat")], (5, 3, 2)),
                **ranked_by_path_hash([r.split(",")[0] for r in rows if r.endswith(",dog")], (5, 3, 2))}
    for s in ds.samples:
        assert s.path == root.resolve() / s.relpath
        assert ds.classes[s.label] == ("cat" if s.relpath.startswith("cat") else "dog")
        assert s.split == expected[s.relpath]
        assert s.sha256 == hashlib.sha256(s.path.read_bytes()).hexdigest()
    assert split_by_class(load_dataset(root / "labels.csv")) == {"cat": (7, 2, 1), "dog": (7, 2, 1)}  # fractions count


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
    assert warnings[-1] == ("leakage: 3 files with 1 distinct content appear in more than one split, "
                            "e.g. test/cat/copy1.png (test) and train/cat/cat_000.png (train)")


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
