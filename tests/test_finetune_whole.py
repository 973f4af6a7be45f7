"""Whole-network fine-tuning on a pixel cache: exact pixels, the same step as the files, a reusable base."""

from __future__ import annotations

import json
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import FeatcacheError, backbones
from featcache.cache import PIXELS, Cache
from featcache.cli import main
from featcache.finetune import Recipe, learning_rate, plan_cut, trainable_model
from featcache.heads import FitOptions, fit_head, head_dir, load_head
from featcache.heads.keras_heads import build_keras_head
from featcache.images import load_image
from featcache.model import backbone_model, cache_config, end_to_end, preprocessing_affine
from featcache.predict import Predictor
from featcache.views import VIEW_SETS, apply_view
from tests.conftest import make_split_folders, run_extract

QUICK = FitOptions(epochs=2, batch_size=4, learning_rate=1e-3, optimizer="adam")


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """dense256 on a vgg16 cache, then `finetune --unfreeze-from all` with every whole-network option."""
    root = tmp_path_factory.mktemp("whole")
    data = make_split_folders(root / "data", counts={"train": 4, "validation": 2, "test": 2})
    workdir = root / "out"
    cache = run_extract(data, workdir).cache
    fit_head(cache, "dense256", QUICK).save(head_dir(cache, "dense256"))
    result = CliRunner().invoke(main, [
        "finetune", "--head", "dense256", "--unfreeze-from", "all", "--cache", cache.key[:16], "--epochs", "2",
        "--head-epochs", "1", "--augment-online", "paper", "--average-views", "d4", "--schedule", "cosine",
        "--warmup-epochs", "1", "--label-smoothing", "0.1", "--optimizer", "adam", "--learning-rate", "1e-4",
        "--batch-size", "4", "--workdir", str(workdir)])
    assert result.exit_code == 0, result.output
    pixels = Cache(workdir / result.stdout.split("--cache ")[1][:16])
    tuned = load_head(head_dir(pixels, "dense256-finetuned"))
    return SimpleNamespace(data=data, workdir=workdir, cache=cache, pixels=pixels, tuned=tuned, output=result)


def test_the_pixel_cache_holds_the_decoded_files_exactly(whole):
    pixels = whole.pixels
    assert pixels.config["layer"] == PIXELS and pixels.config["dtype"] == "uint8"
    assert pixels.feature_shape == (32, 32, 3) and pixels.config["augment"] == 0
    for split in ("train", "validation", "test"):
        x, _, relpaths = pixels.read(split)
        assert x.dtype == np.uint8
        np.testing.assert_array_equal(x, np.stack([load_image(whole.data / p, 32) for p in relpaths]))


def test_the_record_says_how_it_trained(whole):
    record = whole.tuned.record["finetune"]
    assert record["prefix_layer"] == PIXELS and record["requested"] == "all"
    assert record["recipe"]["augment_online"]["name"] == "paper" and record["recipe"]["label_smoothing"] == 0.1
    assert record["batch_norm"].startswith("frozen")
    # dense256's 2 epochs, the head stage's 1, the whole network's 2 (the first a warm-up)
    assert len(whole.tuned.record["history"]["loss"]) == 5 and whole.tuned.record["epochs_run"] == 3
    assert "head epoch 1/1" in whole.output.stderr and "finetune epoch 2/2" in whole.output.stderr
    # the file holds the weights, not Adam's two slots per weight too (which tripled it)
    weights = 4 * (whole.tuned.record["trainable_params"] + whole.tuned.record["non_trainable_params"])
    assert (head_dir(whole.pixels, "dense256-finetuned") / "model.keras").stat().st_size < 1.1 * weights


def test_the_saved_base_reloads_and_reproduces_the_finetuned_features(whole):
    base = whole.tuned.record["finetune"]["base_weights"]
    assert base["extract"] in whole.output.stdout  # the command to run next is printed
    printed = shlex.split(base["extract"])[1:]  # without "featcache"
    result = CliRunner().invoke(main, [*printed, "--workdir", str(whole.workdir)])
    assert result.exit_code == 0, result.output
    again = run_extract(whole.data, whole.workdir, weights_spec=base["file"]).cache
    assert again.config["weights"] == base["sha256"]
    assert (whole.workdir / "current").read_text().strip() == again.key  # the printed command made this cache
    x, _, relpaths = again.read("test")
    top = whole.tuned.model.get_layer("finetune").get_layer("top")
    matrix, offset = preprocessing_affine(backbones.get("vgg16"), "backbone")
    images = np.stack([load_image(whole.data / p, 32) for p in relpaths]).astype(np.float64) @ matrix + offset
    expected = np.asarray(top(images.astype(np.float32), training=False))
    np.testing.assert_allclose(x, expected, rtol=1e-4, atol=1e-4 * float(np.abs(expected).max()))
    original = whole.cache.read("test")[0]
    assert not np.allclose(x, original, atol=1e-3)  # the base did change


def test_export_matches_predict_and_both_average_the_eight_views(whole):
    x, _, relpaths = whole.pixels.read("test")
    files = [whole.data / p for p in relpaths]
    predicted = Predictor(whole.pixels, whole.tuned).predict(files, show_progress=False).probabilities
    exported = end_to_end(whole.pixels, whole.tuned)
    images = np.stack([load_image(f, 32) for f in files]).astype(np.float32)
    np.testing.assert_allclose(np.asarray(exported(images)), predicted, atol=1e-5)
    single = whole.tuned.model.get_layer("finetune")  # the trained model, one view at a time
    views = [np.asarray(single(np.ascontiguousarray(apply_view(images, v)))).reshape(len(images), -1)
             for v in VIEW_SETS["d4"]]
    mean = np.mean(views, axis=0)[:, -1]  # the second class's probability (to_keras gives both columns)
    np.testing.assert_allclose(predicted[:, 1], mean, atol=1e-5)


def test_a_whole_network_step_on_the_pixel_cache_equals_the_step_through_the_files(whole):
    import keras
    import tensorflow as tf

    config = cache_config(whole.cache)
    extractor = backbone_model(config, None)
    cut = plan_cut(extractor, "vgg16", "all")
    assert cut.prefix_layer == PIXELS and cut.unfreeze_from == "block1_conv1"
    head = build_keras_head("dense256", whole.cache.feature_shape, 2)  # unfitted: a loss far from zero
    model = trainable_model(extractor, cut, head, config)
    conv_kernels = [w for w in model.trainable_weights if "kernel" in w.path and "conv" in w.path]
    assert len(conv_kernels) == 13  # every convolution of VGG16 trains

    reference = keras.Model(extractor.input, head(extractor.output))  # the tutorials' full model
    x, labels, relpaths = whole.pixels.read("train")
    matrix, offset = preprocessing_affine(backbones.get("vgg16"), "backbone")
    files = np.stack([load_image(whole.data / p, 32) for p in relpaths]).astype(np.float64) @ matrix + offset
    loss_fn, labels = keras.losses.BinaryCrossentropy(), labels.reshape(-1, 1).astype(np.float32)
    variables = model.trainable_variables
    results = []
    for net, inputs in ((model, x.astype(np.float32)), (reference, files.astype(np.float32))):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, net(inputs, training=False))
        results.append((float(loss), [g.numpy() for g in tape.gradient(loss, variables)]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        # float32 rounding of the preprocessing reroutes a few max-pool near-ties in 13 random layers (0.3% of
        # a gradient's norm at most, measured); a wrong preprocessing or a frozen layer changes far more
        assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)


def test_the_printed_extract_command_keeps_the_head_caches_splits_and_preprocessing(whole, tmp_path):
    from featcache.finetune import extract_command

    base = tmp_path / "a folder" / "vgg16-base.weights.h5"
    command = extract_command(whole.cache, base, tmp_path / "my data", (0.5, 0.25, 0.25))
    options = dict(zip(shlex.split(command)[2::2], shlex.split(command)[3::2], strict=True))
    assert options["--weights"] == str(base) and options["--data"] == str(tmp_path / "my data")
    assert options["--split-fractions"] == "0.5,0.25,0.25" and options["--preprocess"] == "backbone"
    assert options["--dtype"] == "float32" and options["--image-size"] == "32" and options["--layer"] == "block5_pool"


def test_warm_up_then_cosine_decay_and_pixel_options_need_the_whole_network():
    options = FitOptions(epochs=4, learning_rate=1e-3)
    cosine = learning_rate(options, Recipe(schedule="cosine", warmup_epochs=1), steps_per_epoch=10)
    rates = [float(cosine(step)) for step in (0, 5, 10, 25, 40)]
    assert rates[0] == 0 and rates[1] == pytest.approx(5e-4) and rates[2] == pytest.approx(1e-3)
    assert rates[3] == pytest.approx(5e-4, rel=1e-3) and rates[4] == pytest.approx(0, abs=1e-9)
    constant = learning_rate(options, Recipe(warmup_epochs=1), steps_per_epoch=10)
    assert [float(constant(s)) for s in (5, 20, 40)] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert learning_rate(options, Recipe(), steps_per_epoch=10) == 1e-3

    for option in ("--augment-online d4", "--average-views flips"):
        name, value = option.split()
        recipe = Recipe(**{name[2:].replace("-", "_"): value})
        with pytest.raises(FeatcacheError, match=f"{option} transforms images.*--unfreeze-from all") as error:
            recipe.check_cut("block5_conv1")
        assert len(str(error.value).splitlines()) == 1
    with pytest.raises(FeatcacheError, match="--schedule 'step'"):
        Recipe(schedule="step")
    refused = CliRunner().invoke(main, ["finetune", "--unfreeze-from", "block5_conv1", "--augment-online", "d4"])
    assert refused.exit_code == 1 and "only a whole-network fine-tune" in refused.output
    assert json.loads(json.dumps(Recipe(augment_online="d4").to_json()))["augment_online"]["d4"] is True
