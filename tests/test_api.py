"""The public Python API (issue 17): lazy imports, extract from paths and arrays, the Cache's
converters, heads, compare, predict, export, and one-line errors for what a user can get wrong."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import featcache
from featcache import FeatcacheError
from featcache.api import ExtractOptions, run_extraction
from featcache.arrays import ArrayData, pixel_sha256
from featcache.cli import main
from tests.conftest import CLASS_COLOURS, make_class_folders

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(weights="none", image_size=32, dtype="float32", shard_size=8, batch_size=8, show_progress=False)


def colour_arrays(per_class=12, size=36, grey=False, seed=0):
    """Noisy solid-colour images as one uint8 array, with a class name per image (cat, dog)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for name, colour in CLASS_COLOURS.items():
        for _ in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            images.append(pixels[..., 0] if grey else pixels)
            labels.append(name)
    return np.stack(images), np.array(labels)


def by_image(cache, images) -> dict[int, np.ndarray]:
    """Each cached row's features by the index of its image in ``images`` (array files are named by
    the sha256 of their pixels)."""
    index = {pixel_sha256(image): i for i, image in enumerate(images)}
    rows = {}
    for split in cache.splits:
        features, _, paths = cache.read(split)
        for row, path in zip(features, paths, strict=True):
            rows[index[Path(path).stem.split("-")[0]]] = row
    return rows


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A cache extracted through the API with str paths, with logreg fitted on it."""
    root = tmp_path_factory.mktemp("api")
    data = make_class_folders(root / "data", per_class=12)
    cache = featcache.extract(str(data), backbone="vgg16", workdir=str(root / "out"), **FAST)
    head = featcache.fit_head(cache, "logreg", show_progress=False)
    return root, cache, head


def test_import_featcache_starts_no_tensorflow_keras_sklearn_or_pandas():
    code = ("import sys, featcache\n"
            "names = [featcache.Cache, featcache.open_cache, featcache.extract, featcache.compare,\n"
            "         featcache.predict, featcache.fit_head, featcache.export]\n"
            "from featcache import *\n"
            "print(sorted(m for m in ('tensorflow', 'keras', 'sklearn', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_extract_compare_predict_are_their_modules_too_and_call_the_api():
    from featcache import api
    from featcache import extract as extract_module

    assert featcache.extract is extract_module and extract_module.make_config  # the module, as always
    assert all(callable(getattr(featcache, name)) for name in featcache.__all__ if name[0] != "_")
    assert featcache.predict.Predictor and featcache.compare.Comparison
    with pytest.raises(FeatcacheError, match="give data"):
        featcache.extract()  # calls api.extract
    assert featcache.open_cache is api.open_cache


def test_extract_with_str_paths_gives_2d_float32_rows_equal_to_cache_read(fitted):
    root, cache, _ = fitted
    assert isinstance(cache, featcache.Cache) and cache.feature_shape == (1, 1, 512)
    for split in cache.splits:
        x, y, paths = cache.to_numpy(split)
        stored, labels, stored_paths = cache.read(split)
        assert x.dtype == np.float32 and x.shape == (len(stored), 512)
        np.testing.assert_array_equal(x, stored.reshape(len(stored), -1))
        np.testing.assert_array_equal(y, labels)
        assert paths == stored_paths
        assert cache.to_numpy(split, flatten=False)[0].shape == (len(stored), 1, 1, 512)


def test_to_pandas_and_to_tf_dataset_agree_with_to_numpy(fitted):
    _, cache, _ = fitted
    x, y, paths = cache.to_numpy("train")
    frame = cache.to_pandas("train")
    assert list(frame.columns) == [f"f{i}" for i in range(512)] + ["label", "class", "path"]
    np.testing.assert_array_equal(frame[[f"f{i}" for i in range(512)]].to_numpy(), x)
    assert frame["label"].tolist() == y.tolist() and frame["path"].tolist() == paths
    assert frame["class"].tolist() == [cache.classes[i] for i in y]
    batches = list(cache.to_tf_dataset("train", batch_size=5).as_numpy_iterator())
    assert [len(b[0]) for b in batches[:-1]] == [5] * (len(batches) - 1)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    shuffled = list(cache.to_tf_dataset("train", batch_size=5, shuffle=True).as_numpy_iterator())
    rows = np.concatenate([b[0] for b in shuffled])
    np.testing.assert_array_equal(rows[np.lexsort(rows.T)], x[np.lexsort(x.T)])
    maps = next(cache.to_tf_dataset("train", batch_size=5, flatten=False).as_numpy_iterator())[0]
    assert maps.shape == (5, 1, 1, 512)


def test_open_cache_accepts_str_and_path_workdirs(fitted, monkeypatch):
    root, cache, _ = fitted
    monkeypatch.chdir(root)
    assert featcache.open_cache("out").key == cache.key
    assert featcache.open_cache(root / "out", key=cache.key[:8]).key == cache.key
    assert featcache.cache.open_cache("out").key == cache.key  # the library's own, given a str


def test_fit_head_then_compare_returns_the_json_rows_with_the_head(fitted):
    from featcache import report

    _, cache, head = fitted
    assert head.predict_proba(cache.to_numpy("test")[0]).shape == (len(cache.read("test")[1]), 2)
    again = featcache.fit_head(cache.key, "logreg", workdir=cache.path.parent, show_progress=False)
    assert again.record["fitted"] == head.record["fitted"]  # already fitted with these options: kept
    rows = featcache.compare(cache)
    assert [row["head"] for row in rows] == ["logreg"] and rows[0]["best"] is True
    assert list(rows[0]) == [*report.COLUMNS, "selected_by", "per_class_split", "per_class"]
    assert rows[0]["val_accuracy"] == head.record["metrics"]["validation"]["accuracy"]
    by_f1 = featcache.compare(cache, select_by="macro-f1")
    assert by_f1[0]["selected_by"] == "macro-f1" and by_f1[0]["best"] is True
    assert "--select-by 'f1': choose one of" in one_line_error(lambda: featcache.compare(cache, select_by="f1"))
    report_file = cache.path.parent / "report.html"
    featcache.compare(cache, plots=cache.path.parent / "plots", report=report_file)
    assert {p.name for p in (cache.path.parent / "plots").iterdir()} == {"comparison.png", "confusion.png",
                                                                         "precision_recall.png"}
    assert "logreg" in report_file.read_text() and "<img" in report_file.read_text()


def test_predict_returns_dicts_and_export_writes_a_model(fitted, tmp_path):
    root, cache, head = fitted
    image = next((root / "data" / "cat").glob("*.png"))
    for given in ("logreg", head, None):
        rows = featcache.predict(str(image), cache=cache, head=given, show_progress=False)
        assert [set(row) >= {"path", "class", "probability"} for row in rows] == [True]
        assert rows[0]["path"] == str(image) and rows[0]["class"] in cache.classes
    expected = head.predict_proba(cache.to_numpy("train")[0])  # a training image: its cached row
    x, _, paths = cache.to_numpy("train")
    relpath = paths[0]
    row = featcache.predict([root / "data" / relpath], workdir=root / "out", head="logreg",
                            show_progress=False)[0]
    assert row["probability"] == pytest.approx(expected[0].max(), abs=1e-5)
    written = featcache.export(str(tmp_path / "model.keras"), cache=cache, head="logreg")
    assert written[0] == tmp_path / "model.keras" and written[0].stat().st_size > 0
    assert (tmp_path / "model.json").is_file()  # what the model expects, beside it


@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_arrays_give_the_features_of_the_same_images_as_png_files(grey, tmp_path):
    images, labels = colour_arrays(per_class=8, grey=grey)
    splits = np.array(["train", "train", "train", "train", "validation", "validation", "test", "test"] * 2)
    for i, (image, label, split) in enumerate(zip(images, labels, splits, strict=True)):
        path = tmp_path / "folders" / split / label / f"image_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    from_files = featcache.extract(tmp_path / "folders", workdir=tmp_path / "out", **FAST)
    from_arrays = featcache.extract(images=images, labels=labels, splits=splits, workdir=tmp_path / "out",
                                    **FAST)
    assert from_arrays.key != from_files.key and from_arrays.classes == from_files.classes == ["cat", "dog"]
    files = {int(Path(p).stem.split("_")[1]): row for s in from_files.splits
             for row, p in zip(from_files.read(s)[0], from_files.read(s)[2], strict=True)}
    arrays = by_image(from_arrays, images)
    assert sorted(arrays) == sorted(files) == list(range(16))
    for i in range(16):
        # batches of other sizes: on AVX2-only CPUs oneDNN rounds differently (1e-7); other pixels move 1e-3+
        np.testing.assert_allclose(arrays[i], files[i], rtol=0, atol=1e-6)
    for split in from_arrays.splits:  # each image in the split given, under its class
        _, y, paths = from_arrays.read(split)
        assert all(p.startswith(f"{split}/") for p in paths)
        index = {pixel_sha256(image): i for i, image in enumerate(images)}
        assert [from_arrays.classes[k] for k in y] == [labels[index[Path(p).stem]] for p in paths]


def test_a_second_array_extract_computes_nothing_and_writes_no_file(tmp_path, monkeypatch):
    images, labels = colour_arrays()
    first = featcache.extract(images=images, labels=labels, workdir=tmp_path / "out", **FAST)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "arrays").rglob("*") if p.is_file()}

    def refuse(*args, **kwargs):
        raise AssertionError("work was done again for the same arrays")

    monkeypatch.setattr("featcache.extract.extraction_model", refuse)
    monkeypatch.setattr("featcache.arrays._write", refuse)
    again = featcache.extract(images=images.copy(), labels=list(labels), workdir=str(tmp_path / "out"),
                              **FAST)
    assert again.key == first.key and again.path == first.path
    assert {p: p.stat().st_mtime_ns for p in files} == files


def test_array_order_does_not_change_the_split_or_the_cache(tmp_path):
    images, labels = colour_arrays()
    order = np.random.default_rng(1).permutation(len(images))
    first = run_extraction(ArrayData.of(images, labels), backbone="vgg16", workdir=tmp_path,
                           options=ExtractOptions(**FAST))
    shuffled = run_extraction(ArrayData.of(images[order], labels[order]), backbone="vgg16", workdir=tmp_path,
                              options=ExtractOptions(**FAST))
    assert shuffled.cache.key == first.cache.key and shuffled.computed == 0
    assert set(first.cache.splits) == {"train", "validation", "test"}


def test_arrays_without_splits_are_split_by_class_as_the_fractions_say():
    """Stratified as class folders are: each class of 7 gives 5/1/1 (70/15/15), whatever the order;
    identical images of a class share a split."""
    from featcache.dataset import split_counts

    def split_of(images, labels):
        return {i: relpath.split("/")[0] for relpath, i in ArrayData.of(images, labels).entries((0.7, 0.15, 0.15))}

    images, labels = colour_arrays(per_class=7, size=8)
    splits = split_of(images, labels)
    for name in set(labels):
        counts = [sum(splits[i] == split for i in np.flatnonzero(labels == name))
                  for split in ("train", "validation", "test")]
        assert tuple(counts) == split_counts(7) == (5, 1, 1), (name, counts)
    for copied in range(1, 7):  # a copy of image 0 (same class) in place of each other image: same split
        with_copy = images.copy()
        with_copy[copied] = images[0]
        assert split_of(with_copy, labels)[copied] == split_of(with_copy, labels)[0]


def test_a_grown_array_dataset_computes_only_the_new_image(tmp_path):
    images, labels = colour_arrays()
    first = run_extraction(ArrayData.of(images[:-1], labels[:-1]), backbone="vgg16", workdir=tmp_path,
                           options=ExtractOptions(**FAST))
    grown = run_extraction(ArrayData.of(images, labels), backbone="vgg16", workdir=tmp_path,
                           options=ExtractOptions(**FAST))
    assert grown.cache.key != first.cache.key
    assert (grown.computed, grown.reused) == (1, len(images) - 1)


def test_int_labels_are_named_by_classes_and_numbered_by_name(tmp_path, capsys):
    images, names = colour_arrays()
    given = ("dog", "cat")  # not in name order: the cache numbers classes by name, as folders do
    labels = np.array([given.index(n) for n in names], np.int64).reshape(-1, 1)  # Keras gives (N, 1)
    cache = featcache.extract(images=images, labels=labels, classes=list(given), workdir=tmp_path,
                              **{**FAST, "show_progress": True})
    assert cache.classes == ["cat", "dog"]
    assert "warning: classes are numbered by name in the cache (0 cat, 1 dog)" in capsys.readouterr().err
    index = {pixel_sha256(image): i for i, image in enumerate(images)}
    for split in cache.splits:
        _, y, paths = cache.to_numpy(split)
        assert [cache.classes[k] for k in y] == [names[index[Path(p).stem]] for p in paths]
    numbered = featcache.extract(images=images, labels=labels[:, 0], workdir=tmp_path, **FAST)
    assert numbered.classes == ["0", "1"]


def test_cli_extract_reads_an_npz(tmp_path):
    images, labels = colour_arrays()
    splits = np.array(["train", "validation", "train", "test"] * 6)
    np.savez(tmp_path / "data.npz", images=images, labels=labels, splits=splits)
    args = ["extract", "--data", str(tmp_path / "data.npz"), "--workdir", str(tmp_path / "out"), "--weights",
            "none", "--image-size", "32", "--dtype", "float32", "--shard-size", "8"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "24 rows through the backbone" in result.output
    cache = featcache.open_cache(tmp_path / "out")
    assert cache.manifest["dataset"]["root"].startswith(str((tmp_path / "out" / "arrays").resolve()))
    assert {s: cache.manifest["splits"][s]["rows"] for s in cache.splits} == {"train": 12, "validation": 6,
                                                                             "test": 6}
    again = CliRunner().invoke(main, args, catch_exceptions=False)
    assert "nothing to compute" in again.output


def test_cli_extract_defaults_are_the_api_defaults():
    from featcache.cli import extract as command

    defaults = {p.name: p.default for p in command.params}
    for field in fields(ExtractOptions):
        if field.name == "show_progress":
            continue
        default = defaults[field.name]
        if field.name == "split_fractions":
            default = tuple(float(v) for v in default.split(","))
        assert default == field.default, field.name


def one_line_error(call) -> str:
    with pytest.raises(FeatcacheError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and message
    return message


IMAGES, LABELS = colour_arrays(per_class=2, size=8)


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=IMAGES.astype(np.float32), labels=LABELS), "images have dtype float32; give uint8"),
    (dict(images=IMAGES[..., :2], labels=LABELS), "images have shape (4, 8, 8, 2); give (N, H, W)"),
    (dict(images=IMAGES[0], labels=LABELS[:1]), "images have shape (8, 8, 3): one colour image?"),
    (dict(images=IMAGES, labels=LABELS[:3]), "3 labels for 4 images"),
    (dict(images=IMAGES, labels=np.eye(4)), "labels have shape (4, 4); give one label per image"),
    (dict(images=IMAGES, labels=[0.5] * 4), "labels have dtype float64"),
    (dict(images=IMAGES, labels=[0, 1, 2, 1], classes=["a", "b"]), "label 2 but only 2 classes (a, b)"),
    (dict(images=IMAGES, labels=[0, -1, 0, 1]), "label -1 is negative"),
    (dict(images=IMAGES, labels=["cat", "dog", "cow", "dog"], classes=["cat", "dog"]),
     "labels cow are not in classes (cat, dog)"),
    (dict(images=IMAGES, labels=["a/b"] * 4), "class name 'a/b' cannot be a folder name"),
    (dict(images=IMAGES, labels=[0, 1, 0, 1], classes=["a", "a"]), "classes name a more than once"),
    (dict(images=IMAGES, labels=LABELS, splits=["train"] * 3), "3 splits for 4 images"),
    (dict(images=IMAGES, labels=LABELS, splits=["train", "dev", "test", "test"]),
     "split 'dev' (image 1) is not one of train, validation (val), test"),
    (dict(images=IMAGES), "images= needs labels="),
    (dict(data="x", images=IMAGES, labels=LABELS), "not both"),
    (dict(data="x", labels=LABELS), "labels=, splits= and classes= go with images="),
    (dict(data=IMAGES), "data must be a path (str or Path), not ndarray; pass arrays as images="),
    (dict(data="x", colour="red"), "extract: unknown option colour; valid options: layer, pooling"),
    (dict(data="x", image_size="32"), "extract: image_size='32' is not int or None"),
    (dict(data="x", batch_size=0), "extract: batch_size=0: give 1 or more"),
    (dict(data="x", backbone=16), "backbone=16: give a non-empty str"),
    (dict(data="x", workdir=3), "workdir=3: give a non-empty str"),
    (dict(data="x", workdir=Path(__file__)), "is a file, not a folder"),
    (dict(data="x", lock_timeout=float("nan")), "lock_timeout=nan: give 0 or more seconds"),
    (dict(data="x", lock_timeout=float("inf")), "lock_timeout=inf: give 0 or more seconds"),
])
def test_bad_extract_arguments_are_one_line_errors(kwargs, message, tmp_path):
    assert message in one_line_error(lambda: featcache.extract(**{"workdir": tmp_path, **kwargs}))


def test_bad_head_and_cache_arguments_are_one_line_errors(fitted, tmp_path):
    root, cache, _ = fitted
    assert "unknown option epoch; valid options: epochs" in one_line_error(
        lambda: featcache.fit_head(cache, "logreg", epoch=3))
    assert "epochs='5' is not int" in one_line_error(lambda: featcache.fit_head(cache, "logreg", epochs="5"))
    assert "unknown head 'logit'" in one_line_error(lambda: featcache.fit_head(cache, "logit"))
    assert "memory_budget=-1" in one_line_error(lambda: featcache.fit_head(cache, "logreg", memory_budget=-1))
    assert "cv=1: give a number of folds" in one_line_error(lambda: featcache.compare(cache, cv=1))
    train_images = cache.rows("train")
    assert f"--cv {train_images + 1}: cache {cache.key[:16]} has {train_images} training images, so at most" in (
        one_line_error(lambda: featcache.compare(cache, cv=train_images + 1)))
    assert "cache=3: give a Cache" in one_line_error(lambda: featcache.compare(3))
    assert "paths=3: give an image file" in one_line_error(lambda: featcache.predict(3, cache=cache))
    image = str(next((root / "data" / "cat").glob("*.png")))
    assert "head=3: give a head name" in one_line_error(lambda: featcache.predict(image, cache=cache, head=3))
    assert "no complete cache in" in one_line_error(lambda: featcache.open_cache(tmp_path / "empty"))
    unknown = one_line_error(lambda: featcache.predict(image, workdir=root / "out", head="dense512"))
    assert "no head of that name exists: did you mean dense1024, dense256" in unknown
    assert "fit-head --head dense512" not in unknown
    assert "has no 'tarin' split" in one_line_error(lambda: cache.to_numpy("tarin"))


@pytest.mark.parametrize("arrays, message", [
    (dict(images=IMAGES), "no labels array; an .npz holds images and labels"),
    (dict(images=IMAGES, labels=LABELS, split=LABELS), "unknown array(s) split"),
    (dict(images=IMAGES, labels=np.array([{}, 1, 2, 3], dtype=object)), "cannot read it without pickle"),
])
def test_bad_npz_is_a_one_line_cli_error(arrays, message, tmp_path):
    np.savez(tmp_path / "data.npz", **arrays)
    result = CliRunner().invoke(main, ["extract", "--data", str(tmp_path / "data.npz"), "--workdir",
                                       str(tmp_path / "out"), "--weights", "none"])
    assert result.exit_code == 1 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_walkthrough_script_runs(tmp_path):
    script = ROOT / "scripts" / "walkthrough.py"
    out = subprocess.run([sys.executable, str(script), "--workdir", str(tmp_path)], capture_output=True,
                         text=True, cwd=ROOT, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "to_numpy('train'): X (" in out.stdout and '"head": "logreg"' in out.stdout
