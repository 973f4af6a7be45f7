"""Predict and export: the end-to-end model sees new images exactly as extraction saw the cache."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import FeatcacheError, backbones
from featcache.cache import Cache
from featcache.cli import main
from featcache.heads import FitOptions, fit_head, head_dir, load_head
from featcache.images import load_image
from featcache.model import end_to_end, export, preprocessing_affine, preprocessing_layer
from featcache.predict import Predictor, best_head, format_predictions, image_files
from tests.conftest import make_split_folders, run_extract, write_image

QUICK = FitOptions(epochs=3, batch_size=4, learning_rate=1e-3, optimizer="adam")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A float16 VGG16 cache of the cat/dog images with dense256 (sigmoid) and logreg fitted."""
    root = tmp_path_factory.mktemp("model")
    data = make_split_folders(root / "data", counts={"train": 8, "validation": 4, "test": 4})
    cache = run_extract(data, root / "out", dtype="float16").cache
    for name in ("dense256", "logreg"):
        head = fit_head(cache, name, QUICK)
        head.record["metrics"] = {"validation": {"accuracy": 0.5 if name == "dense256" else 0.75,
                                               "log_loss": 0.5}}
        head.save(head_dir(cache, name))
    return data, cache


def saved(cache: Cache, name: str):
    return load_head(head_dir(cache, name))


def cached_test_split(cache: Cache, head):
    """The head's probabilities on the cached test rows, and the image files those rows came from."""
    x, _, relpaths = cache.read("test")
    root = cache.manifest["dataset"]["root"]
    return head.predict_proba(x), [f"{root}/{p}" for p in relpaths]


@pytest.mark.parametrize("name", backbones.names())
def test_preprocessing_inside_the_model_equals_each_backbones_preprocess_input(name):
    """The measured map, and the Keras layer built from it inside a model, both give what the
    backbone's own ``preprocess_input`` gives on the same pixels (distinct per channel and place)."""
    import keras

    spec = backbones.get(name)
    pixels = np.random.default_rng(1).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)
    for mode in backbones.PREPROCESSINGS:
        matrix, offset = preprocessing_affine(spec, mode)
        expected = np.asarray(spec.preprocess_fn(mode)(pixels.astype(np.float64)))
        np.testing.assert_allclose(pixels @ matrix + offset, expected, rtol=1e-9, atol=1e-9)
        image = keras.Input((5, 5, 3), name="image")
        model = keras.Model(image, preprocessing_layer(spec, mode, 5)(image))
        inside = keras.ops.convert_to_numpy(model(pixels))
        assert inside.dtype == np.float32 and inside.shape == pixels.shape
        scale = np.abs(expected).max()
        np.testing.assert_allclose(inside, expected, rtol=0, atol=1e-6 * scale, err_msg=f"{name} {mode}")


@pytest.mark.parametrize("name", ["dense256", "logreg"])
def test_predict_on_the_test_images_equals_the_head_on_their_cached_rows(fitted, name):
    _, cache = fitted
    head = saved(cache, name)
    expected, files = cached_test_split(cache, head)
    predictions = Predictor(cache, head).predict(files, batch_size=3, show_progress=False)
    assert [str(p) for p in predictions.paths] == files and not predictions.rejects
    np.testing.assert_allclose(predictions.probabilities, expected, atol=1e-5)


def test_predict_skips_and_reports_bad_files(fitted, tmp_path):
    _, cache = fitted
    write_image(tmp_path / "in" / "good.png", (200, 60, 40), seed=5)
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    (tmp_path / "in" / "notes.png").write_text("not an image")
    files = image_files([tmp_path / "in"])
    predictions = Predictor(cache, saved(cache, "logreg")).predict(files, show_progress=False)
    assert [p.name for p in predictions.paths] == ["good.png"]
    assert sorted(p.name for p, _ in predictions.rejects) == ["empty.jpg", "notes.png"]
    with pytest.raises(FeatcacheError, match="no such file"):
        image_files([tmp_path / "missing.png"])


def test_default_head_is_the_best_by_validation_accuracy(fitted):
    assert best_head(fitted[1]) == "logreg"


def test_predict_command_formats(fitted):
    _, cache = fitted
    expected, files = cached_test_split(cache, saved(cache, "logreg"))
    args = ["predict", *files[:2], "--workdir", str(cache.path.parent)]
    as_json = CliRunner().invoke(main, [*args, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    assert [r["path"] for r in rows] == files[:2]
    assert [r["class"] for r in rows] == [cache.classes[i] for i in expected[:2].argmax(axis=1)]
    assert rows[0]["probability"] == pytest.approx(expected[0].max(), abs=1e-5)
    as_csv = CliRunner().invoke(main, [*args, "--format", "csv"])
    assert as_csv.stdout.splitlines()[0] == "path,class,probability,p_cat,p_dog"
    table = CliRunner().invoke(main, args)
    assert table.exit_code == 0 and "probability" in table.stdout and "head logreg" in table.stderr


def test_predict_command_with_no_usable_image_fails_in_one_line(fitted, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n")
    result = CliRunner().invoke(main, ["predict", str(bad), "--workdir", str(fitted[1].path.parent)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    *notes, error = result.stderr.strip().splitlines()  # the reasons first, then the error in one line
    assert error.startswith("Error: none of the 1 files could be used (reasons")
    assert any("skipped" in line and "bad.png" in line for line in notes)


def test_predictions_as_csv_and_table_name_every_image(fitted):
    _, cache = fitted
    _, files = cached_test_split(cache, saved(cache, "dense256"))
    predictions = Predictor(cache, saved(cache, "dense256")).predict(files, show_progress=False)
    assert len(format_predictions(predictions, "csv").splitlines()) == len(files) + 1
    assert all(f in format_predictions(predictions, "table") for f in files)


def test_export_loads_in_a_fresh_process_with_plain_keras_and_gives_the_same_outputs(fitted, tmp_path):
    """.keras, SavedModel and TFLite all reproduce each head's probabilities on the cached test rows, in one
    fresh process without featcache (both heads in it: a process start is most of the test's time)."""
    _, cache = fitted
    expected = {}
    for name in ("dense256", "logreg"):
        head = saved(cache, name)
        expected[name], files = cached_test_split(cache, head)
        written = export(cache, head, tmp_path / name / "model.keras", saved_model=True, tflite=True)
        assert {p.name for p in written} == {"model.keras", "model_savedmodel", "model.tflite", "model.json"}
        card = json.loads((tmp_path / name / "model.json").read_text())
        assert card["output"]["classes"] == cache.classes and card["cache_key"] == cache.key
    size = cache.config["image_size"]
    np.save(tmp_path / "pixels.npy", np.stack([load_image(f, size) for f in files]).astype(np.float32))
    script = textwrap.dedent(f"""
        import sys, warnings
        from pathlib import Path
        import numpy as np, keras, tensorflow as tf
        warnings.simplefilter("ignore")
        pixels = np.load({str(tmp_path / "pixels.npy")!r})
        for name in ("dense256", "logreg"):
            folder = Path({str(tmp_path)!r}) / name
            model = keras.saving.load_model(folder / "model.keras", safe_mode=True)
            saved_model = tf.saved_model.load(str(folder / "model_savedmodel"))  # keep a reference
            served = saved_model.serve(pixels)
            lite = tf.lite.Interpreter(model_path=str(folder / "model.tflite"))
            lite.resize_tensor_input(lite.get_input_details()[0]["index"], pixels.shape)
            lite.allocate_tensors()
            lite.set_tensor(lite.get_input_details()[0]["index"], pixels)
            lite.invoke()
            outputs = [model.predict(pixels, verbose=0), served.numpy(),
                       lite.get_tensor(lite.get_output_details()[0]["index"])]
            np.save(folder / "outputs.npy", np.stack(outputs))
        assert "featcache" not in sys.modules
    """)
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr[-2000:]
    for name in ("dense256", "logreg"):
        for output in np.load(tmp_path / name / "outputs.npy"):
            np.testing.assert_allclose(output, expected[name], atol=1e-4)


def test_end_to_end_model_gives_two_columns_for_a_sigmoid_head(fitted):
    _, cache = fitted
    head = saved(cache, "dense256")
    expected, files = cached_test_split(cache, head)
    model = end_to_end(cache, head)
    pixels = np.stack([load_image(f, cache.config["image_size"]) for f in files]).astype(np.float32)
    probabilities = np.asarray(model(pixels))
    assert probabilities.shape == (len(files), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_export_command_writes_the_best_head_by_default(fitted, tmp_path):
    _, cache = fitted
    result = CliRunner().invoke(main, ["export", "--workdir", str(cache.path.parent),
                                       "--output", str(tmp_path / "best.keras")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "best.json").read_text())["head"] == "logreg"
    wrong = CliRunner().invoke(main, ["export", "--workdir", str(cache.path.parent), "--head", "svm"])
    assert wrong.exit_code == 1 and "has head svm fitted; run `featcache fit-head --head svm`" in wrong.output


def test_cache_made_with_a_weights_file_needs_that_file_to_predict(tmp_path):
    import keras

    keras.utils.set_random_seed(3)
    weights_file = tmp_path / "vgg16-random.weights.h5"
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    base.save_weights(weights_file)
    data = make_split_folders(tmp_path / "data", counts={"train": 4, "validation": 2, "test": 2})
    cache = run_extract(data, tmp_path / "out", weights_spec=str(weights_file)).cache
    head = fit_head(cache, "logreg", QUICK)
    expected, files = cached_test_split(cache, head)
    predictions = Predictor(cache, head).predict(files, show_progress=False)
    np.testing.assert_allclose(predictions.probabilities, expected, atol=1e-5)
    weights_file.unlink()
    with pytest.raises(FeatcacheError, match="neither in the weights store nor at their recorded path"):
        Predictor(cache, head)


def test_fit_head_command_keeps_a_head_fitted_with_the_same_options(tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 4, "validation": 2, "test": 2})
    run_extract(data, tmp_path / "out")
    args = ["fit-head", "--head", "logreg", "--workdir", str(tmp_path / "out")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and "chosen scaling=" in first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already fitted with these options" in again.output
    changed = CliRunner().invoke(main, [*args, "--seed", "1"])
    assert "chosen scaling=" in changed.output
    head_json = next((tmp_path / "out").glob("*/heads/logreg/head.json"))
    info = json.loads(head_json.read_text())
    head_json.write_text(json.dumps({**info, "fit_recipe": 1}))  # fitted by an older featcache
    older = CliRunner().invoke(main, [*args, "--seed", "1"])
    assert "chosen scaling=" in older.output
    legacy = {k: v for k, v in info.items() if k not in ("format", "files", "kind")}
    head_json.write_text(json.dumps({**legacy, "model_file": "model.joblib"}))  # a pickled head of format 0
    assert "chosen scaling=" in CliRunner().invoke(main, [*args, "--seed", "1"]).output
    refit = CliRunner().invoke(main, [*args, "--seed", "1", "--refit"])
    assert "chosen scaling=" in refit.output
