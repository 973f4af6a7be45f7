"""Hostile inputs (issue 18): options, files and datasets that used to hang, pass silently or crash late.

Each test names the defect class it proves closed; every one failed on the code before its fix.
"""

from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path

import pytest

from featcache import FeatcacheError, cache
from featcache.dataset import check_fractions, file_sha256, load_dataset
from featcache.extract import check_options
from tests.conftest import make_class_folders, make_split_folders, synthetic_cache, write_image


@pytest.mark.parametrize("fractions", [(math.nan, 0.5, 0.5), (math.inf, 0.5, -math.inf), (0.7, 0.3, math.nan)])
def test_non_finite_split_fractions_are_refused(fractions, tmp_path):
    with pytest.raises(FeatcacheError, match="split fractions .* three non-negative numbers summing to 1"):
        check_fractions(fractions)
    with pytest.raises(FeatcacheError, match="split fractions"):
        load_dataset(make_class_folders(tmp_path / "d", per_class=3), fractions)


@pytest.mark.parametrize("size", [0, -32, 31])
def test_image_size_zero_negative_or_below_the_minimum_is_refused_not_the_default(size):
    with pytest.raises(FeatcacheError) as error:
        check_options("vgg16", None, size, "squash", "backbone", "float32", "float32")
    assert str(error.value) == f"--image-size {size} is below vgg16's minimum of 32 px"


def test_image_size_none_still_means_the_backbone_default():
    check_options("vgg16", None, None, "squash", "backbone", "float32", "float32")


@pytest.mark.parametrize("timeout", [math.nan, -1.0, math.inf])
def test_lock_timeout_that_is_not_a_finite_non_negative_number_is_refused(timeout, tmp_path):
    """nan made the deadline never pass: a second run waited forever instead of failing."""
    with pytest.raises(FeatcacheError, match=r"--lock-timeout .*: give a number of seconds, 0 or more"):
        with cache.locked(tmp_path, timeout):
            pass


def test_csv_saved_with_a_utf8_byte_order_mark_is_read(tmp_path):
    """Excel's 'CSV UTF-8' starts the file with a BOM, which became part of the first column's name."""
    make_class_folders(tmp_path, per_class=3)
    rows = [f"{c}/{c}_{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(3)]
    (tmp_path / "labels.csv").write_bytes(("\ufeffpath,label\r\n" + "\r\n".join(rows) + "\r\n").encode("utf-8"))
    ds = load_dataset(tmp_path / "labels.csv")
    assert ds.classes == ("cat", "dog") and len(ds.samples) == 6


def finishes(seconds: float, work):
    """work()'s result (or its exception), or a test failure if it has not returned within seconds (it
    hung: the thread is left behind as a daemon)."""
    result = {}

    def run():
        try:
            result["value"] = work()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"still running after {seconds} s: it hangs"
    if "error" in result:
        raise result["error"]
    return result["value"]


def plant_special_files(folder: Path) -> None:
    os.mkfifo(folder / "pipe.png")
    (folder / "zero.png").symlink_to("/dev/zero")


def test_fifo_and_link_to_dev_zero_in_class_folders_are_skipped_with_one_warning_not_read(tmp_path):
    root = make_class_folders(tmp_path / "d", per_class=4)
    plant_special_files(root / "cat")
    ds = finishes(10, lambda: load_dataset(root))
    assert len(ds.samples) == 8 and not ds.rejects
    assert ds.warnings[0].startswith("skipped 2 files: cat/pipe.png, cat/zero.png: not regular files")


def test_fifo_named_in_a_csv_is_skipped_with_one_warning_not_called_missing(tmp_path):
    """(A link to /dev/zero in a CSV is already refused: it resolves outside the CSV's folder.)"""
    make_class_folders(tmp_path, per_class=3)
    os.mkfifo(tmp_path / "dog" / "pipe.png")
    os.mkfifo(tmp_path / "dog" / ".unlisted")
    (tmp_path / "dog" / "pipe-link.png").symlink_to(tmp_path / "dog" / ".unlisted")
    rows = [f"{c}/{c}_{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(3)] + ["dog/pipe.png,dog",
                                                                                      "dog/pipe-link.png,dog"]
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    ds = finishes(10, lambda: load_dataset(tmp_path / "labels.csv"))
    assert len(ds.samples) == 6 and not ds.rejects
    assert ds.warnings[0].startswith("skipped 2 files: dog/pipe.png, dog/pipe-link.png: not regular files")


def test_a_fifo_is_never_opened_for_hashing(tmp_path):
    """A file swapped for a FIFO after the scan: hashing refuses it at once instead of waiting for a writer."""
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(OSError, match="not a regular file"):
        finishes(10, lambda: file_sha256(tmp_path / "pipe.png"))


@pytest.mark.parametrize("layout", ["class-folders", "split-folders"])
def test_link_to_a_file_outside_the_data_folder_is_skipped_with_one_warning_and_never_read(layout, tmp_path):
    """As the CSV layout refuses a path escaping its folder; /etc/hostname used to become a training row."""
    root = tmp_path / "d"
    if layout == "class-folders":
        make_class_folders(root, per_class=4)
        folder, rel = root / "cat", "cat"
    else:
        make_split_folders(root, {"train": 3, "validation": 1, "test": 1})
        folder, rel = root / "train" / "cat", "train/cat"
    outside = write_image(tmp_path / "outside.png", seed=77)
    (folder / "evil.png").symlink_to(outside)
    (folder / "inside.png").symlink_to(folder / next(p.name for p in sorted(folder.iterdir())))
    ds = load_dataset(root)
    relpaths = {s.relpath for s in ds.samples}
    assert f"{rel}/evil.png" not in relpaths and f"{rel}/inside.png" in relpaths  # links within the folder stay
    assert ds.layout == layout
    assert ds.warnings[0] == (f"skipped 1 file: {rel}/evil.png: links to files outside the data folder {root}, "
                              "where nothing is read; copy the files in instead")


def test_csv_naming_an_image_twice_is_refused_before_any_work_naming_the_lines(tmp_path):
    """Same path twice with the same or another label (spelt differently too): it crashed with KeyError
    after the backbone pass and left an incomplete cache."""
    make_class_folders(tmp_path, per_class=3)
    rows = [f"{c}/{c}_{i:03d}.png,{c}" for c in ("cat", "dog") for i in range(3)]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("path,label\n" + "\n".join([*rows, "./cat/cat_001.png,dog", "dog/dog_000.png,dog"]) + "\n")
    with pytest.raises(FeatcacheError) as error:
        load_dataset(csv_path)
    assert str(error.value) == (f"{csv_path}: lines 3, 8 name the same image cat/cat_001.png (labels cat and dog) "
                                "(1 more images are listed twice); list each image once, with one label")


@pytest.mark.parametrize("layout", ["class-folders", "split-folders"])
def test_one_class_is_said_at_extract_and_refused_by_fit_head_not_a_crash(layout, tmp_path):
    """Features of one class are still features (scikit-learn's FeatureExtractor extracts them so);
    a head cannot learn from them, and fit-head says so in one line."""
    from featcache.heads import fit_head

    root = tmp_path / "d"
    (make_class_folders if layout == "class-folders" else make_split_folders)(root)
    for dog in sorted(root.rglob("dog"), reverse=True):
        shutil.rmtree(dog)
    assert (f"--data {root}: only one class ('cat'); no head can learn from one class: add images of a second "
            "class (another class folder or CSV label)") in load_dataset(root).warnings
    one_class = synthetic_cache(tmp_path / "work", classes=("cat",))
    with pytest.raises(FeatcacheError, match=r"has one class \(cat\); no head can learn from one class") as error:
        fit_head(one_class, "logreg")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("folder", ["validation", "val", "test"])
def test_an_empty_split_folder_is_an_error_naming_it_and_the_fix(folder, tmp_path):
    """An empty validation/ passed extract, then fit-head failed with KeyError: 'validation'."""
    root = make_split_folders(tmp_path / "d", {"train": 3, folder: 2, **({} if folder == "test" else {"test": 1})})
    for image in (root / folder).rglob("*.png"):
        image.unlink()
    with pytest.raises(FeatcacheError) as error:
        load_dataset(root)
    assert str(error.value) == (
        f"--data {root}: {root / folder} holds no usable image; add images to it as {root / folder}/<class>/<image>, "
        "or put every image in the class-folder layout ROOT/<class>/<image> and let --split-fractions split them")


def test_no_validation_split_at_all_is_said_at_extract(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 3, "test": 1})
    assert "no validation images: fit-head chooses every head's options on them and will fail" in (
        load_dataset(root).warnings[0])


def test_one_label_csv_is_said_at_extract_as_one_class_folder_is(tmp_path):
    make_class_folders(tmp_path, per_class=4)
    rows = [f"cat/cat_{i:03d}.png,cat" for i in range(4)]
    (tmp_path / "labels.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    assert load_dataset(tmp_path / "labels.csv").warnings[0] == (
        f"--data {tmp_path}: only one class ('cat'); no head can learn from one class: "
        "add images of a second class (another class folder or CSV label)")


def test_data_that_is_a_device_or_a_fifo_is_one_line(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    for data in (Path("/dev/null"), tmp_path / "pipe"):
        with pytest.raises(FeatcacheError, match="not a folder or a regular file") as refusal:
            load_dataset(data)
        assert "\n" not in str(refusal.value)


def test_predict_refuses_a_fifo_named_directly_without_reading_it(tmp_path):
    from featcache.predict import screen

    os.mkfifo(tmp_path / "pipe.png")
    write_image(tmp_path / "cell.png")
    usable, refused = screen([tmp_path / "pipe.png", tmp_path / "cell.png"])  # would block on the FIFO
    assert usable == [tmp_path / "cell.png"] and refused == [(tmp_path / "pipe.png", "not a regular file")]


def test_identical_images_in_one_shard_do_not_break_the_next_incremental_extract(tmp_path):
    """Item 2: one image under two names shares a sha256; reusing its rows read it twice and the next
    extract after any change failed with a zip() length error."""
    from tests.conftest import run_extract

    data = make_split_folders(tmp_path / "data")
    train = data / "train" / "cat"
    shutil.copyfile(train / "cat_000.png", train / "cat_000_copy.png")
    first = run_extract(data, tmp_path / "out", shard_size=64)
    write_image(train / "cat_new.png", (200, 60, 40), seed=999)
    second = run_extract(data, tmp_path / "out", shard_size=64)
    assert (second.computed, second.reused) == (1, first.computed)
    features, _, paths = second.cache.read("train")
    row = {p: features[i] for i, p in enumerate(paths)}
    before = dict(zip(first.cache.read("train")[2], first.cache.read("train")[0], strict=True))
    assert (row["train/cat/cat_000.png"] == row["train/cat/cat_000_copy.png"]).all()
    for path, expected in before.items():
        assert (row[path] == expected).all()


def test_a_damaged_older_cache_is_skipped_as_a_source_of_rows_named_in_one_warning(tmp_path):
    """Item 3: a flipped features byte in an older cache made every new extract in the workdir fail with a raw
    OSError naming neither shard nor cache. Its rows are computed instead, and the shard is named once."""
    from featcache.api import ExtractOptions, run_extraction
    from tests.conftest import flip_bits, run_extract

    data = make_split_folders(tmp_path / "data")
    old = run_extract(data, tmp_path / "out", shard_size=64)
    reference = {split: old.cache.read(split) for split in old.cache.splits}
    damaged = old.cache.path / "train-00000.h5"
    flip_bits(damaged)
    write_image(data / "test" / "dog" / "dog_new.png", (40, 80, 200), seed=999)
    warnings = []
    options = ExtractOptions(image_size=32, dtype="float32", weights="none", shard_size=64, batch_size=4,
                             show_progress=False)
    new = run_extraction(data, backbone="vgg16", workdir=tmp_path / "out", options=options, warn=warnings.append)
    assert warnings == [f"row reuse skipped {damaged} (damaged: its checksums fail); its rows were computed again, "
                        "and that cache needs extracting again"]
    assert new.computed == len(reference["train"][0]) + 1  # the damaged shard's rows, and the new image
    assert new.reused == len(reference["validation"][0]) + len(reference["test"][0])
    for split, (features, _, paths) in reference.items():
        rows = dict(zip(new.cache.read(split)[2], new.cache.read(split)[0], strict=True))
        for path, expected in zip(paths, features, strict=True):
            assert (rows[path] == expected).all()  # computed again, bit for bit


def test_shards_swapped_between_splits_or_a_reordered_class_list_are_refused_and_extract_repairs_them(tmp_path):
    """Item 11: readers trusted where a shard sits and what the manifest says: a head trained on test rows
    swapped into train, and a reordered ``classes`` relabelled every prediction. Both are refused in one
    line, and the same extract repairs them."""
    import json

    from featcache.heads import fit_head
    from tests.conftest import run_extract

    data = make_split_folders(tmp_path / "data")
    first = run_extract(data, tmp_path / "out", shard_size=64)
    train, test = first.cache.path / "train-00000.h5", first.cache.path / "test-00000.h5"
    reference = first.cache.read("train")
    train.rename(tmp_path / "swap.h5")
    test.rename(train)
    (tmp_path / "swap.h5").rename(test)
    with pytest.raises(FeatcacheError, match=f"^shard {train} holds the rows of test-00000.h5 .*featcache extract"):
        cache.Cache(first.cache.path).read("train")
    with pytest.raises(FeatcacheError, match="holds the rows of"):
        fit_head(cache.Cache(first.cache.path), "logreg")
    repaired = run_extract(data, tmp_path / "out", shard_size=64)
    assert repaired.computed == 12 + 6  # the two swapped shards (train and test rows), rebuilt
    features, labels, paths = repaired.cache.read("train")
    assert (features == reference[0]).all() and (labels == reference[1]).all() and paths == reference[2]

    manifest_path = first.cache.path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["classes"] = manifest["classes"][::-1]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(FeatcacheError, match=r"labels its rows by the classes \['cat', 'dog'\], but manifest.json "
                                             r"lists \['dog', 'cat'\] \(the manifest was edited\)"):
        cache.Cache(first.cache.path).read("test")
    again = run_extract(data, tmp_path / "out", shard_size=64)
    assert again.computed == 0 and again.cache.classes == ["cat", "dog"]
    assert (again.cache.read("train")[1] == reference[1]).all()


def test_a_file_unreadable_for_a_moment_is_retried_by_the_next_run_not_rejected_for_good(tmp_path):
    """Item 6: a file deleted after the scan and restored unchanged stayed "1 rejected, nothing to compute"
    for good. Only content makes a permanent reject; a read failure is retried."""
    from featcache.extract import extract, make_config
    from tests.conftest import FAST

    data = make_split_folders(tmp_path / "data")
    config, resolved = make_config(**FAST)
    dataset = load_dataset(data)  # scanned and hashed while the file is there
    victim = data / "train" / "dog" / "dog_002.png"
    content = victim.read_bytes()
    victim.unlink()
    first = extract(dataset, config, resolved, tmp_path / "out", shard_size=64, show_progress=False)
    assert [(r["relpath"], r["reason"].split(" (")[0]) for r in first.rejects] == [
        ("train/dog/dog_002.png", "could not be read")]
    victim.write_bytes(content)  # back, unchanged
    second = extract(load_dataset(data), config, resolved, tmp_path / "out", shard_size=64, show_progress=False)
    assert second.cache.key == first.cache.key and second.rejects == [] and second.computed == 12
    assert "train/dog/dog_002.png" in second.cache.read("train")[2]
    third = extract(load_dataset(data), config, resolved, tmp_path / "out", shard_size=64, show_progress=False)
    assert third.computed == 0  # complete now: nothing left to retry


def test_export_replaces_all_its_files_or_none_and_sweeps_temporaries_of_killed_exports(tmp_path, monkeypatch):
    """Item 10: killed during the SavedModel step, m.keras described one head and m.json another; killed
    exports left hidden temporaries (a SavedModel is 100 MB) that no run removed; a full disk was a raw
    OSError 28."""
    import errno
    import json

    import keras

    from featcache.heads import FitOptions, fit_head
    from featcache.model import export
    from tests.conftest import run_extract

    fitted = run_extract(make_split_folders(tmp_path / "data"), tmp_path / "out", pooling="avg").cache
    first, second = fit_head(fitted, "logreg"), fit_head(fitted, "dense256", FitOptions(epochs=1))
    out = tmp_path / "exports" / "m.keras"
    export(fitted, first, out)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    assert sorted(before) == ["m.json", "m.keras"]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as a kill mid-step would leave it, minus the process

    monkeypatch.setattr(keras.Model, "export", killed)
    with pytest.raises(KeyboardInterrupt):
        export(fitted, second, out, saved_model=True)
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before  # all of the first head, nothing else
    assert json.loads((out.parent / "m.json").read_text())["head"] == "logreg"

    monkeypatch.undo()
    stale = [out.parent / ".m.keras.tmp-999999999.keras", out.parent / ".m_savedmodel.tmp-999999999"]
    stale[0].write_bytes(b"x" * 1000)
    (stale[1] / "variables").mkdir(parents=True)
    written = export(fitted, second, out)
    assert not any(path.exists() for path in stale) and sorted(p.name for p in out.parent.iterdir()) == [
        "m.json", "m.keras"]
    assert [p.name for p in written] == ["m.keras", "m.json"]
    assert json.loads((out.parent / "m.json").read_text())["head"] == "dense256"

    def full_disk(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", full_disk)
    with pytest.raises(FeatcacheError) as error:
        export(fitted, first, out)
    assert str(error.value).startswith(f"export to {out}: No space left on device; free space and run the same")
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.json", "m.keras"]


def test_a_flipped_bit_in_labels_or_paths_is_caught_by_readers_and_rebuilt_by_extract(tmp_path):
    """Item 5: a 1-bit flip in ``labels`` was trained on by fit-head and extract called the cache complete."""
    import h5py

    from featcache.heads import fit_head
    from tests.conftest import run_extract

    data = make_split_folders(tmp_path / "data")
    first = run_extract(data, tmp_path / "out", shard_size=64)
    reference = first.cache.read("train")
    shard = first.cache.path / "train-00000.h5"
    for dataset in ("labels", "paths"):
        original = shard.read_bytes()
        with h5py.File(shard, "r") as f:
            address = f[dataset].id.get_offset() if dataset == "labels" else None
        damaged = bytearray(original)
        if address is None:  # variable-length strings live in the global heap: flip a byte of a path there
            address = damaged.find(b"train/cat/cat_001.png") + len("train/cat/cat_")
        damaged[address] ^= 0x01
        shard.write_bytes(bytes(damaged))
        with pytest.raises(FeatcacheError, match=f"^shard {shard}: its labels, paths or image hashes fail their "
                                                 "checksum .*featcache extract"):
            cache.Cache(first.cache.path).read("train")
        with pytest.raises(FeatcacheError, match="fail their checksum"):
            fit_head(cache.Cache(first.cache.path), "logreg")
        repaired = run_extract(data, tmp_path / "out", shard_size=64)
        assert repaired.computed == 12  # that shard alone
        features, labels, paths = repaired.cache.read("train")
        assert (labels == reference[1]).all() and paths == reference[2] and (features == reference[0]).all()


def test_a_file_rewritten_after_the_scan_never_gets_the_scanned_files_row(tmp_path):
    """Item 4: the sha256 was taken at the scan and the pixels decoded later, so an image overwritten in
    between kept the old hash and label with the new image's features, for good. The decoded bytes
    are hashed now: a mismatch is a changed file, refused for this run and read again by the next."""
    from featcache.extract import extract, make_config
    from tests.conftest import FAST

    data = make_split_folders(tmp_path / "data")
    config, resolved = make_config(**FAST)
    scanned = load_dataset(data)
    victim = data / "train" / "cat" / "cat_001.png"
    shutil.copyfile(data / "train" / "dog" / "dog_001.png", victim)  # another class's image, after the scan
    first = extract(scanned, config, resolved, tmp_path / "out", shard_size=64, show_progress=False)
    assert [r["relpath"] for r in first.rejects] == ["train/cat/cat_001.png"]
    assert "content changed during extract" in first.rejects[0]["reason"]
    assert "train/cat/cat_001.png" not in first.cache.read("train")[2]
    second = extract(load_dataset(data), config, resolved, tmp_path / "out", shard_size=64, show_progress=False)
    assert second.cache.key != first.cache.key and second.rejects == []
    features, labels, paths = second.cache.read("train")
    row = dict(zip(paths, features, strict=True))
    assert (row["train/cat/cat_001.png"] == row["train/dog/dog_001.png"]).all()  # its own pixels now


def test_a_csv_that_is_not_utf8_is_one_line_naming_the_line_and_the_fix(tmp_path):
    """Item 15: a Latin-1 CSV was a raw UnicodeDecodeError traceback."""
    csv_path = tmp_path / "labels.csv"
    rows = "".join(f"cat/{i:04d}.png,cat\n" for i in range(3000))  # past the decoder's first chunk
    csv_path.write_bytes(("path,label\n" + rows + "cat/x.png,caf\xe9\n").encode("latin-1"))
    with pytest.raises(FeatcacheError) as error:
        load_dataset(csv_path)
    assert str(error.value) == (f"{csv_path}:3002: not UTF-8 (byte 0xe9); save the CSV as UTF-8 "
                                '(Excel: "CSV UTF-8"; or `iconv -f latin1 -t utf-8`)')


def test_a_damaged_shard_met_inside_keras_training_is_one_line_not_tensorflows_traceback(tmp_path):
    """Item 15: a checksum failure while a streamed Keras head trained surfaced as 62 lines of TensorFlow."""
    from featcache.heads import FitOptions, fit_head
    from tests.conftest import flip_bits

    blobs = synthetic_cache(tmp_path, per_class=(30, 10, 10), shard_size=8)
    shard = blobs.path / "validation-00000.h5"
    flip_bits(shard)
    options = FitOptions(epochs=2, scaling="none")  # no moments pass: the first read is tf.data's
    with pytest.raises(FeatcacheError) as error:
        fit_head(blobs, "dense256", options, memory_budget=20 * 1024)  # streamed: over the budget
    assert str(error.value).startswith(f"shard {shard} failed its") and "\n" not in str(error.value)


def test_a_read_only_workdir_still_serves_a_complete_cache_and_other_writes_are_one_line(tmp_path, monkeypatch):
    """Item 15: extract on a complete cache in a read-only workdir was a traceback from writing `current`
    (root writes through chmod, so the file system's refusal is simulated where featcache writes)."""
    import errno

    from click.testing import CliRunner

    from featcache import compare
    from featcache.cli import main

    data = make_split_folders(tmp_path / "data", counts={"train": 2, "validation": 1, "test": 1})
    args = ["--workdir", str(tmp_path / "out")]
    extract = ["extract", "--data", str(data), "--weights", "none", "--image-size", "32", *args]
    first = CliRunner().invoke(main, extract)
    assert first.exit_code == 0, first.output
    assert CliRunner().invoke(main, ["fit-head", "--head", "logreg", *args]).exit_code == 0

    def read_only(path, *_):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(cache, "atomic_write", read_only)
    again = CliRunner().invoke(main, extract)
    assert again.exit_code == 0, again.output
    key = (tmp_path / "out" / "current").read_text().strip()[:16]
    assert f"is not writable (Read-only file system): cache {key} is complete" in again.output
    assert f"pass them --cache {key}" in again.output

    def no_plots(comparison, cache, *_):
        raise PermissionError(errno.EACCES, "Permission denied", str(cache.path / "plots"))

    monkeypatch.setattr(compare, "write_outputs", no_plots)
    refused = CliRunner().invoke(main, ["compare", *args])
    error = refused.stderr.strip().splitlines()  # the table went to stdout before the plots failed
    assert refused.exit_code == 1 and len(error) == 1, refused.stderr
    assert error[0].startswith("Error: cannot use ") and "(Permission denied): give --data you may read" in error[0]


def test_an_image_size_whose_batch_cannot_fit_in_memory_is_refused_before_the_backbone_runs(tmp_path, monkeypatch):
    """Item 15: `--image-size 2000` under a memory limit killed TensorFlow without a message."""
    from click.testing import CliRunner

    from featcache import streaming
    from featcache.cli import main

    data = make_split_folders(tmp_path / "data", counts={"train": 2, "validation": 1, "test": 1})
    monkeypatch.setattr(streaming, "available_memory", lambda: 8 * 2**30)  # an 8 GiB container
    args = ["extract", "--data", str(data), "--weights", "none", "--workdir", str(tmp_path / "out")]
    refused = CliRunner().invoke(main, [*args, "--image-size", "2000"])
    assert refused.exit_code == 1 and refused.output.count("Error:") == 1, refused.output
    assert "Error:" in refused.output.strip().splitlines()[-1]  # one line, the last
    # VGG16's first block at 2000 px: 2 x 2000 x 2000 x 64 float32 = 1.9 GiB per image
    assert ("--image-size 2000 with --batch-size 32 needs about 61.0 GiB of activations (1.9 GiB per image), "
            "over the 8.0 GiB available: use --batch-size 4 or less") in refused.output
    assert not list((tmp_path / "out").glob("*/*.h5"))  # nothing written, nothing half-done
    monkeypatch.setattr(streaming, "available_memory", lambda: 10 * 2**20)  # 64 px: 2 MiB per image
    assert "use --batch-size 5 or less" in CliRunner().invoke(main, [*args, "--image-size", "64"]).output
    fits = CliRunner().invoke(main, [*args, "--image-size", "64", "--batch-size", "4"])
    assert fits.exit_code == 0, fits.output
