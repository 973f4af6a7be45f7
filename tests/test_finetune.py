"""Fine-tuning on the cached frozen prefix: the right cut, the same step as the full model, a usable head."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import FeatcacheError, backbones
from featcache.cli import main
from featcache.finetune import plan_cut, prefix_cache, trainable_model
from featcache.heads import FitOptions, fit_head, head_dir, load_head
from featcache.images import load_image
from featcache.model import backbone_model, cache_config, preprocessing_affine
from featcache.predict import Predictor
from tests.conftest import make_split_folders, run_extract, write_image

QUICK = FitOptions(epochs=2, batch_size=4, learning_rate=1e-3, optimizer="adam")


def extractor_for(name: str, size: int = 32):
    spec = backbones.get(name)
    return backbones.build_extractor(spec, None, size, None, spec.default_pooling)


def test_vgg16_block5_cut_caches_block4_pool():
    extractor = extractor_for("vgg16")
    cut = plan_cut(extractor, "vgg16", "block5_conv1")
    assert cut.prefix_layer == "block4_pool"
    assert cut.trainable == ("block5_conv1", "block5_conv2", "block5_conv3", "block5_pool")
    by_index = [layer.name for layer in extractor.layers].index("block5_conv1")
    assert plan_cut(extractor, "vgg16", str(by_index)) == cut


def test_a_cut_inside_a_residual_block_caches_the_block_input_and_freezes_the_rest():
    """MobileNetV2 from layer 100 (the TF tutorial): the skip connection must not cross the cut."""
    extractor = extractor_for("mobilenet_v2_keras")
    cut = plan_cut(extractor, "mobilenet_v2_keras", "100")
    names = [layer.name for layer in extractor.layers]
    assert cut.unfreeze_from == names[100] and cut.trainable[0] == names[100]
    assert cut.prefix_layer == "block_10_project_BN"
    assert names.index(cut.prefix_layer) < 100  # block_11_expand runs in the top, frozen


def test_unknown_layer_or_index_is_a_one_line_error():
    extractor = extractor_for("vgg16")
    with pytest.raises(FeatcacheError, match="not a layer of the cached vgg16") as layer:
        plan_cut(extractor, "vgg16", "block9_conv1")
    with pytest.raises(FeatcacheError, match="has layers 1..") as index:
        plan_cut(extractor, "vgg16", "500")
    assert [len(str(error.value).splitlines()) for error in (layer, index)] == [1, 1]


@pytest.mark.parametrize("backbone, head_name, unfreeze_from, training", [
    ("vgg16", "dense256", "block5_conv1", False),  # dropout off so both paths see one function
    ("mobilenet_v2", "linear", "100", True),  # training mode: BatchNorm must stay in inference mode
])
def test_a_step_on_the_prefix_cache_equals_the_step_through_the_full_model(
    backbone, head_name, unfreeze_from, training, tmp_path
):
    import keras
    import tensorflow as tf

    data = make_split_folders(tmp_path / "data", counts={"train": 4, "validation": 2, "test": 2})
    cache = run_extract(data, tmp_path / "out", backbone=backbone, pooling=None).cache
    # a head far from saturation: near zero loss, gradients would be float32 rounding
    head = fit_head(cache, head_name, QUICK.pinned(epochs=2, scaling="none"))
    head.save(head_dir(cache, head_name))
    config = cache_config(cache)
    extractor = backbone_model(config, None)
    cut = plan_cut(extractor, backbone, unfreeze_from)
    prefix = prefix_cache(cache, cut, tmp_path / "out", show_progress=False).cache
    assert prefix.config["layer"] == cut.prefix_layer and prefix.config["dtype"] == "float32"
    model = trainable_model(extractor, cut, head.model)

    # the tutorials' full model: layers below the cut frozen, pixels -> preprocess -> base -> head,
    # built on the same layer objects
    for layer in extractor.layers:
        layer.trainable = layer.trainable and layer.name in cut.trainable
    pixels = keras.Input((32, 32, 3))
    full = keras.Model(pixels, head.model(extractor(pixels, training=False)))
    x_prefix, labels, relpaths = prefix.read("train")
    matrix, offset = preprocessing_affine(backbones.get(backbone), "backbone")
    images = np.stack([load_image(data / p, 32) for p in relpaths]).astype(np.float64) @ matrix + offset
    if head.model.output_shape[-1] == 1:  # one sigmoid column
        loss_fn, labels = keras.losses.BinaryCrossentropy(), labels.reshape(-1, 1).astype(np.float32)
    else:
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
    variables = model.trainable_variables
    assert variables and all(any(v is w for w in full.trainable_variables) for v in variables)
    results = []
    for net, inputs in ((model, x_prefix), (full, images.astype(np.float32))):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, net(inputs, training=training))
        results.append((float(loss), [g.numpy() for g in tape.gradient(loss, variables)]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    if training:  # BatchNorm in inference mode: a training-mode pass gives the inference outputs
        np.testing.assert_allclose(model(x_prefix, training=True), model(x_prefix, training=False), rtol=1e-6)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for a, b in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6 * max(1.0, float(np.abs(b).max())))


def test_finetune_command_end_to_end_then_predict_and_compare(tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 6, "validation": 3, "test": 3})
    workdir = tmp_path / "out"
    fast = ["--workdir", str(workdir)]

    def invoke(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    invoke("extract", "--data", data, "--weights", "none", "--image-size", "32", *fast)
    invoke("fit-head", "--head", "dense256", "--epochs", "3", "--learning-rate", "1e-3", *fast)
    result = invoke("finetune", "--head", "dense256", "--unfreeze-from", "block5_conv1", "--epochs", "2",
                    "--patience", "0", "--precision", "mixed_bfloat16", *fast)
    assert "finetune epoch 2/2" in result.stderr and "dense256-finetuned: 2 epochs" in result.stdout
    assert result.stderr.startswith("precision mixed_bfloat16: as asked")  # the top block trains in bf16
    prefix_key = result.stdout.split("--cache ")[1][:16]
    prefix_dir = workdir / prefix_key
    info = json.loads((prefix_dir / "heads" / "dense256-finetuned" / "head.json").read_text())
    assert info["finetune"]["prefix_layer"] == "block4_pool" and info["finetune"]["started_at_epoch"] == 3
    assert info["precision"]["precision"] == "mixed_bfloat16" and info["options"]["precision"] == "mixed_bfloat16"
    assert len(info["history"]["loss"]) == 5 and info["metrics"]["test"]["rows"] == 6
    assert info["trainable_params"] == 7079424 + 512 * 256 + 256 + 257  # block5 + dense256 head

    compared = invoke("compare", "--cache", prefix_key, "--format", "json", *fast)
    assert json.loads(compared.stdout)[0]["head"] == "dense256-finetuned"
    # --cv over the budget: a fine-tuned head is not refitted per fold, so nothing is refused
    over_budget = invoke("compare", "--cache", prefix_key, "--format", "json", "--cv", "2",
                         "--memory-budget", "1K", *fast)
    assert json.loads(over_budget.stdout)[0]["cv_accuracy"] is None
    assert (prefix_dir / "plots" / "learning_curves.png").is_file()

    from featcache.cache import Cache

    prefix = Cache(prefix_dir)
    head = load_head(prefix_dir / "heads" / "dense256-finetuned")
    x, _, relpaths = prefix.read("test")
    predictions = Predictor(prefix, head).predict([data / p for p in relpaths], show_progress=False)
    np.testing.assert_allclose(predictions.probabilities, head.predict_proba(x), atol=1e-5)
    predicted = invoke("predict", data / "test", "--head", "dense256-finetuned", "--format", "json", *fast)
    assert len(json.loads(predicted.stdout)) == 6

    import keras

    invoke("export", "--cache", prefix_key, "--head", "dense256-finetuned", "--output", tmp_path / "ft.keras",
           *fast)
    exported = keras.saving.load_model(tmp_path / "ft.keras", safe_mode=True)
    pixels = np.stack([load_image(data / p, 32) for p in relpaths]).astype(np.float32)
    # the export computes in float32 (the top block trained in bfloat16): the head's own function in float32
    from featcache.precision import model_in

    in_float32 = model_in(head.model, "float32").predict(x.astype(np.float32), verbose=0)
    np.testing.assert_allclose(exported.predict(pixels, verbose=0), in_float32, atol=1e-5)
    np.testing.assert_allclose(in_float32, predictions.probabilities, atol=2e-2)  # bfloat16's 8-bit mantissa


def test_finetune_refuses_a_head_with_no_keras_form_and_changed_data(tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 4, "validation": 2, "test": 2})
    workdir = tmp_path / "out"
    cache = run_extract(data, workdir).cache
    fit_head(cache, "svm-rbf", QUICK).save(head_dir(cache, "svm-rbf"))
    fit_head(cache, "dense256", QUICK).save(head_dir(cache, "dense256"))
    args = ["finetune", "--unfreeze-from", "block5_conv1", "--workdir", str(workdir)]
    kernel = CliRunner().invoke(main, [*args, "--head", "svm-rbf"])
    assert kernel.exit_code == 1 and "svm-rbf: an RBF-kernel SVM has no exact Keras layer" in kernel.output
    write_image(data / "train" / "cat" / "cat_000.png", (10, 10, 10), seed=99)
    changed = CliRunner().invoke(main, [*args, "--head", "dense256"])
    assert changed.exit_code == 1 and "is not the data of cache" in changed.output


def test_finetune_on_an_augmented_cache_caches_and_trains_on_the_augmented_prefix_views(tmp_path):
    from featcache.finetune import finetune

    data = make_split_folders(tmp_path / "data", counts={"train": 3, "validation": 2, "test": 2})
    cache = run_extract(data, tmp_path / "out", augment=2, seed=5).cache
    fit_head(cache, "dense256", QUICK).save(head_dir(cache, "dense256"))
    head, prefix = finetune(cache, "dense256", "block5_conv1", tmp_path / "out", options=QUICK,
                            show_progress=False)
    assert prefix.config["augment"] == 2 and prefix.config["seed"] == 5
    assert prefix.manifest["splits"]["train"]["rows"] == 3 * 6 == len(prefix.views("train"))
    assert sorted(set(prefix.views("train"))) == [0, 1, 2] and set(prefix.views("test")) == {0}
    assert head.record["finetune"]["prefix_layer"] == "block4_pool"


def test_finetune_trains_a_dense256_regression_head_on_its_numbers_and_refuses_what_acts_on_classes(tmp_path):
    """The paper's regression output: a dense256 head on numbers, fine-tuned with the top block on their
    mean squared error; the result predicts numbers everywhere (evaluate, predict, compare)."""
    from featcache.cache import open_cache
    from tests.conftest import cli_in
    from tests.test_targets import regression_csv

    csv_path = regression_csv(tmp_path / "d", [float(i % 5) for i in range(20)])
    workdir = tmp_path / "out"
    run = cli_in(workdir)
    run("extract", "--data", csv_path, "--task", "regression", "--label-column", "score", "--weights", "none",
        "--image-size", "32")
    run("fit-head", "--head", "dense256", "--epochs", "2")
    run("fit-head", "--head", "ridge")
    numbers = open_cache(workdir)
    finetune = ["finetune", "--head", "dense256", "--unfreeze-from", "block5_conv1", "--epochs", "2",
                "--patience", "0", "--cache", numbers.key[:16], "--workdir", str(workdir)]
    for refused, said in ((["--class-weight", "balanced"], "--class-weight and --label-smoothing act on classes"),
                          (["--label-smoothing", "0.1"], "--class-weight and --label-smoothing act on classes")):
        result = CliRunner().invoke(main, [*finetune, *refused])
        assert result.exit_code == 1 and said in result.output and result.output.count("\n") == 1
    ridge = CliRunner().invoke(main, [*finetune[:2], "ridge", *finetune[3:]])
    assert ridge.exit_code == 1 and "ridge is a ridge head on numbers" in ridge.output

    result = CliRunner().invoke(main, finetune)
    assert result.exit_code == 0, result.output
    assert "finetune epoch 2/2: loss" in result.stderr and ", mae " in result.stderr and "val mae" in result.stderr
    assert "test RMSE" in result.stdout
    prefix = open_cache(workdir, result.stdout.split("--cache ")[1][:16])
    head = load_head(head_dir(prefix, "dense256-finetuned"))
    assert head.predicts_values and head.record["output"] == "value"
    x, values, _ = prefix.read("test")
    assert values.dtype == np.float32 and head.predict(x).shape == (len(x),)
    assert head.record["metrics"]["test"]["rmse"] == pytest.approx(
        float(np.sqrt(np.mean((head.predict_values(x) - values) ** 2))), rel=1e-4)
    rows = json.loads(run("predict", tmp_path / "d" / "img03.png", "--head", "dense256-finetuned", "--format",
                          "json"))
    assert set(rows[0]) == {"path", "value"}
    compared = json.loads(run("compare", "--cache", prefix.key[:16], "--format", "json"))
    assert compared[0]["head"] == "dense256-finetuned" and "test_rmse" in compared[0]
    # a whole-network fine-tune's base is cached by an extract of the same CSV, column and task
    from featcache.finetune import extract_command

    command = extract_command(numbers, tmp_path / "base.weights.h5")
    assert f"--data {csv_path.resolve()} --task regression --label-column score" in command
