"""Heads through the protocol alone: every registered head learns a separable cache, in memory and
streamed; fit, predict, save, load and export agree; stored heads are data only; choices made on
validation match plain scikit-learn on the same arrays."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import FeatcacheError
from featcache.cli import main
from featcache.evaluate import cross_validate, evaluate, predict_split
from featcache.heads import HEADS, FitOptions, build_head, fit_head, head_dir, load_head
from featcache.heads.keras_heads import KerasHead
from tests.conftest import plant_pickle, synthetic_cache

QUICK = FitOptions(epochs=40, batch_size=16, learning_rate=1e-2, optimizer="adam", seed=0, patience=8)
STREAMING = [name for name in HEADS if build_head(name).streams]
CLASS_HEADS = [name for name in HEADS if set(HEADS[name].tasks) - {"regression"}]  # svr learns numbers only


def task_of(name: str) -> str:
    """A task of classes the head learns: classification, or ordered classes for ridge."""
    return next(task for task in HEADS[name].tasks if task != "regression")


def fitted(cache, name, options=QUICK, streamed=False):
    """A head fitted in memory, or from shards streamed under a budget just below what an in-memory
    fit of this cache takes (so it streams)."""
    from featcache.streaming import in_memory_bytes

    head = fit_head(cache, name, options, memory_budget=in_memory_bytes(cache) - 1 if streamed else None)
    assert head.record["memory"]["path"] == ("streamed" if streamed else "in-memory")
    return head


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("name", CLASS_HEADS)
def test_every_head_fits_predicts_saves_loads_and_exports_the_same(name, streamed, tmp_path):
    if streamed and name not in STREAMING:
        with pytest.raises(FeatcacheError, match="cannot stream"):
            fitted(synthetic_cache(tmp_path, task=task_of(name)), name, streamed=True)
        return
    cache = synthetic_cache(tmp_path, classes=("x", "y", "z"), task=task_of(name))
    head = fitted(cache, name, streamed=streamed)
    assert head.record["memory"]["path"] == ("streamed" if streamed else "in-memory")
    metrics = evaluate(head, cache)
    assert metrics["validation"]["accuracy"] >= 0.9 and metrics["test"]["accuracy"] >= 0.9
    x, _, _ = cache.read("test")
    p = head.predict_proba(x)
    assert p.shape == (30, 3)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    loaded = load_head(head.save(head_dir(cache, name)))
    np.testing.assert_allclose(loaded.predict_proba(x), p, rtol=1e-6, atol=1e-7)
    assert not any(f.suffix in (".joblib", ".pkl") for f in head_dir(cache, name).iterdir())
    try:
        exported = loaded.to_keras(tuple(cache.manifest["feature_shape"]))
    except FeatcacheError as refusal:
        assert name == "svm-rbf" and "no exact Keras layer equivalent" in str(refusal)
        assert "\n" not in str(refusal)
        return
    np.testing.assert_allclose(np.asarray(exported(x.astype(np.float32))), p, atol=2e-5)


@pytest.mark.parametrize("name", CLASS_HEADS)
def test_two_class_heads_give_two_columns_everywhere(name, tmp_path):
    cache = synthetic_cache(tmp_path, task=task_of(name))
    head = fitted(cache, name)
    x, y, _ = cache.read("test")
    p = head.predict_proba(x)
    assert p.shape == (20, 2) and (p.argmax(axis=1) == y).mean() >= 0.9
    if name != "svm-rbf":
        exported = head.to_keras(tuple(cache.manifest["feature_shape"]))
        np.testing.assert_allclose(np.asarray(exported(x.astype(np.float32))), p, atol=2e-5)


@pytest.mark.parametrize("name", ["dense256", "logreg"])
def test_shuffled_labels_stay_near_chance(name, tmp_path):
    cache = synthetic_cache(tmp_path, per_class=(40, 20, 30), shuffle_labels=True)
    metrics = evaluate(fitted(cache, name), cache)
    assert metrics["test"]["accuracy"] < 0.72


@pytest.mark.parametrize("name", ["dense256", "svm"])
def test_tampered_head_file_is_refused(name, tmp_path):
    cache = synthetic_cache(tmp_path)
    folder = fitted(cache, name).save(head_dir(cache, name))
    model_file = next(p for p in folder.iterdir() if p.name.startswith("model."))
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(FeatcacheError, match="does not match the sha256 recorded"):
        load_head(folder)


@pytest.mark.parametrize("name", ["logreg", "svm", "svm-rbf"])
def test_a_planted_pickle_never_runs_even_with_its_hash_recorded(name, tmp_path):
    """head.json sits beside the model, so its hash proves nothing: loading must run no stored code."""
    cache = synthetic_cache(tmp_path)
    folder = fitted(cache, name).save(head_dir(cache, name))
    marker = plant_pickle(folder, tmp_path / "ran")
    with pytest.raises(FeatcacheError, match="cannot be read as data"):
        load_head(folder)
    assert not marker.exists()


def test_a_planted_keras_lambda_layer_never_runs_and_is_refused_in_one_line(tmp_path):
    """A Keras head whose model.keras holds a Lambda layer (Python code), hash recorded: safe mode
    refuses it, and featcache says so in one line instead of Keras' paragraph."""
    import keras

    from featcache.dataset import file_sha256

    cache = synthetic_cache(tmp_path)
    folder = fitted(cache, "linear", replace(QUICK, epochs=1)).save(head_dir(cache, "linear"))
    inputs = keras.Input(cache.feature_shape)
    planted = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs))
    planted.save(folder / "model.keras")
    record = json.loads((folder / "head.json").read_text())
    record["files"] = {"model.keras": file_sha256(folder / "model.keras")}
    (folder / "head.json").write_text(json.dumps(record))
    with pytest.raises(FeatcacheError, match="cannot be read as data") as refusal:
        load_head(folder)
    assert "\n" not in str(refusal.value) and "--refit" in str(refusal.value)


@pytest.mark.parametrize("damage, message", [
    ({"format": 0}, "head record format 0, not 1"),
    ({"classes": 3}, "not a valid head record"),
    ({"options": {"scaling": "cubic"}}, "not a valid head record"),
    ({"files": {"model.npz": 5}}, "not names with their sha256"),
])
def test_a_malformed_or_foreign_head_record_is_refused_in_one_line(damage, message, tmp_path):
    cache = synthetic_cache(tmp_path)
    folder = fitted(cache, "logreg").save(head_dir(cache, "logreg"))
    record = json.loads((folder / "head.json").read_text())
    (folder / "head.json").write_text(json.dumps({**record, **damage}))
    with pytest.raises(FeatcacheError, match=message) as refusal:
        load_head(folder)
    assert "\n" not in str(refusal.value) and "--refit" in str(refusal.value)


def test_head_refuses_a_cache_it_was_not_fitted_on(tmp_path):
    a = synthetic_cache(tmp_path / "a", seed=1)
    b = synthetic_cache(tmp_path / "b", seed=2)
    head = fitted(a, "logreg")
    with pytest.raises(FeatcacheError, match="was fitted on cache .* fit it again"):
        predict_split(head, b, "test")


def test_logreg_equals_plain_sklearn_at_the_scaling_and_c_validation_chose(tmp_path):
    """The search picks the best validation accuracy (ties: lower log loss, then the earlier), and
    its span-reduced fit is the plain fit: checked against scikit-learn on the full arrays."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    from featcache.heads.linear import GRID
    from featcache.heads.scaling import CHOICES, Scaling

    cache = synthetic_cache(tmp_path, classes=("a", "b", "c"), per_class=(12, 20, 20), shape=(64,),
                            separation=1.5)
    head = fitted(cache, "logreg", FitOptions())
    x, y, _ = cache.read("train")
    xv, yv, _ = cache.read("validation")
    best, expected = None, None
    for kind in CHOICES:
        scaling = Scaling.fit(kind, x.reshape(len(x), -1))
        xs, xvs = scaling.apply(x), scaling.apply(xv)
        for t in GRID:
            centred = xs.astype(np.float64) - xs.mean(axis=0)  # the intercept absorbs the mean
            c = t / np.mean(np.sum(centred**2, axis=1))
            plain = LogisticRegression(C=c, max_iter=5000, tol=1e-8).fit(xs, y)
            score = ((plain.predict(xvs) == yv).mean(), -log_loss(yv, plain.predict_proba(xvs)))
            if best is None or score[0] > best[0] + 1e-9 or (score[0] == best[0] and score[1] > best[1] + 1e-3):
                best, expected = score, (kind, c, plain, scaling)
    kind, c, plain, scaling = expected
    assert head.record["chosen"]["scaling"] == kind
    assert head.record["chosen"]["C"] == pytest.approx(c, rel=1e-6)
    xt, _, _ = cache.read("test")
    np.testing.assert_allclose(head.predict_proba(xt), plain.predict_proba(scaling.apply(xt)), atol=2e-3)


def test_span_basis_factors_centred_rows_without_a_jitter_and_maps_scores_back():
    """Centred rows' Gram matrix is singular along the ones vector; the basis fills that direction (a
    constant feature) instead of perturbing the diagonal: Z Zᵀ is the Gram matrix plus the offset to float
    rounding, validation rows keep their inner products with the training rows, and any weights in the
    basis map back to the same scores on the features."""
    from featcache.heads.linear import SpanBasis

    rng = np.random.default_rng(0)
    x, xv = (np.maximum(rng.standard_normal((n, 200)), 0).astype(np.float32) * 100 for n in (40, 7))
    basis = SpanBasis(x)
    centred, centred_val = (np.asarray(rows - basis.mean, np.float64) for rows in (x, xv))
    gram = centred @ centred.T
    scale = np.trace(gram) / len(gram)
    assert basis.offset == pytest.approx(scale / len(gram), rel=1e-5)
    np.testing.assert_allclose(basis.z.astype(np.float64) @ basis.z.T, gram + basis.offset, atol=1e-5 * scale)
    z_val = basis.project(xv).astype(np.float64)
    np.testing.assert_allclose(z_val @ basis.z.T, centred_val @ centred.T + basis.offset, atol=1e-5 * scale)
    coef, intercept = rng.standard_normal((3, 40)) / np.sqrt(scale), rng.standard_normal(3)
    weights, bias = basis.weights_and_bias(coef, intercept)
    np.testing.assert_allclose(xv @ weights + bias, z_val @ coef.T + intercept, atol=1e-3)


@pytest.mark.parametrize("name", ["logreg", "svm", "svm-rbf"])
def test_the_chosen_candidate_has_the_best_recorded_validation_accuracy(name, tmp_path):
    cache = synthetic_cache(tmp_path, per_class=(20, 20, 10), shape=(16,), separation=1.0, seed=3)
    head = fitted(cache, name, FitOptions())
    scores = head.record["validation_accuracy"]
    chosen = head.record["chosen"]
    assert max(scores.values()) == max(v for k, v in scores.items() if k.startswith(chosen["scaling"]))
    key = next(k for k in scores if k.startswith(chosen["scaling"]) and f"C={chosen['C']:.3g}" in k)
    assert scores[key] == max(scores.values())


# A cache on which, for each of these heads, one candidate of the grid (scaling pinned to "standard":
# C, and gamma for svm-rbf) is more accurate on validation than both the first and the last.
INSIDE_THE_GRID = dict(shape=(8,), per_class=((40, 8), (40, 40), (10, 10)), separation=1.5)


def kept_candidate(record: dict) -> str:
    """The key of ``validation_accuracy`` that the head's ``chosen`` names."""
    chosen = record["chosen"]
    if "gamma" in chosen:
        return f"{chosen['scaling']} gamma={chosen['gamma']:.3g} C={chosen['C']:g}"
    return f"{chosen['scaling']} C={chosen['C']:.3g}"


@pytest.mark.parametrize("case", ["inside", "tied"])
@pytest.mark.parametrize("name", ["logreg", "svm", "svm-rbf"])
def test_the_candidate_kept_is_the_best_on_validation_wherever_it_is_in_the_grid(name, case, tmp_path):
    """Neither the first nor the last candidate when another is better; of equals, the first (svm,
    svm-rbf: logreg breaks ties by validation log loss, test above); a logreg head is the model that
    validation scored (the svms are refitted under their calibration, which may move a row)."""
    if case == "tied" and name == "logreg":
        return
    cache = synthetic_cache(tmp_path, **(INSIDE_THE_GRID if case == "inside" else {}))  # else separable
    head = fitted(cache, name, FitOptions(scaling="standard"))
    scores = head.record["validation_accuracy"]
    keys = list(scores)
    best = [key for key in keys if scores[key] == max(scores.values())]
    if case == "inside":  # tells "always the first candidate" and "always the last" from the best
        assert scores[keys[0]] < scores[best[0]] > scores[keys[-1]], scores
    else:  # candidates tie: tells "the last of equals" from the first
        assert len(best) > 1, scores
    kept = kept_candidate(head.record)
    assert kept in best, (kept, scores)
    if name != "logreg":
        assert kept == best[0], (kept, scores)
    if name == "logreg":
        assert evaluate(head, cache)["validation"]["accuracy"] == pytest.approx(scores[kept])


def test_an_epoch_of_a_few_dozen_rows_is_repeated_to_at_least_20_steps_each_in_a_new_order():
    import tensorflow as tf

    from featcache.heads.keras_heads import MIN_STEPS_PER_EPOCH, epoch_of

    rows = tf.data.Dataset.range(36).shuffle(36, seed=0)
    small = [batch.numpy() for batch in epoch_of(rows.batch(20), 36, 20)]
    assert MIN_STEPS_PER_EPOCH == 20 and [len(b) for b in small] == [20, 16] * 10
    passes = [np.concatenate(small[i:i + 2]) for i in range(0, 20, 2)]
    assert all(sorted(p.tolist()) == list(range(36)) for p in passes) and len({p.tobytes() for p in passes}) == 10
    assert len(list(epoch_of(rows.batch(1), 36, 1))) == 36  # enough steps in one pass: not repeated
    assert len(list(epoch_of(rows.batch(2), 36, 2))) == 36  # 18 steps: 2 passes
    assert len(list(epoch_of(rows.batch(4), 36, 4))) == 27  # 9 steps: 3 passes


@pytest.mark.parametrize("schedule", [False, True], ids=["constant", "cosine"])
def test_fused_adam_trains_as_keras_adam(schedule):
    """TensorFlow's fused update computes Keras' Adam: the same weights after 24 steps, to float rounding
    (plain SGD lands 0.05 or more away), at a constant rate and on a schedule; Keras heads compile it."""
    import keras

    from featcache.fused_adam import FusedAdam
    from featcache.heads.keras_heads import compile_head

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 30), np.float32), rng.integers(0, 3, 64)

    def weights_after(optimizer):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
        model.fit(x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
        return model.get_weights()

    def rate():
        return keras.optimizers.schedules.CosineDecay(1e-2, 20) if schedule else 1e-2

    def distance(a, b):
        return max(float(np.abs(p - q).max()) for p, q in zip(a, b, strict=True))

    reference = weights_after(keras.optimizers.Adam(rate()))
    assert distance(weights_after(FusedAdam(rate())), reference) < 1e-5
    assert distance(weights_after(keras.optimizers.SGD(1e-2)), reference) > 0.05
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    assert type(compile_head(model, 2, "adam", 1e-3, one_column=False).optimizer) is FusedAdam


@pytest.mark.parametrize("name", ["dense256", "linear"])
def test_keras_heads_default_divides_features_by_their_rms(name, tmp_path):
    """Default options: Adam 1e-3 on features divided by one number (the training rows' root mean square
    after the head's reduction), early stopping on validation. Both learn from 36 training rows (an epoch
    of 2 batches repeated to 20 steps: the linear head scored 22-56% on validation without)."""
    from featcache.heads.keras_heads import reduce_features

    cache = synthetic_cache(tmp_path, classes=("x", "y", "z"), per_class=(12, 6, 6))
    head = fitted(cache, name, FitOptions())
    assert head.record["chosen"]["scaling"] == "rms"
    x, _, _ = cache.read("train")
    rms = np.sqrt(np.mean(reduce_features(name, x).astype(np.float64) ** 2))
    assert head.model.get_layer("scaling").scale == pytest.approx(1 / rms, rel=1e-5)
    metrics = evaluate(head, cache)
    assert metrics["validation"]["accuracy"] >= 0.9 and metrics["test"]["accuracy"] >= 0.9


def test_keras_head_records_history_and_parameter_counts(tmp_path):
    head = fitted(synthetic_cache(tmp_path), "dense256")
    assert set(head.record["history"]) >= {"loss", "val_loss", "accuracy", "val_accuracy"}
    assert head.record["trainable_params"] == 2 * 2 * 8 * 256 + 256 + 256 + 1


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("name", CLASS_HEADS)
def test_balanced_class_weight_raises_the_minority_class_probability(name, streamed, tmp_path):
    """Weights reach every head's training: on a 10:1 training split, 'balanced' raises the probability
    that minority rows get for their class (calibrated heads included, whose argmax may stay put)."""
    if streamed and name not in STREAMING:
        return
    cache = synthetic_cache(tmp_path, per_class=((60, 6), (30, 3), (40, 40)), shape=(8,), separation=1.5,
                            task=task_of(name))
    minority = {}
    for weight in (None, "balanced"):
        options = FitOptions(epochs=12, batch_size=16, learning_rate=5e-3, class_weight=weight, scaling="standard")
        result = predict_split(fitted(cache, name, options, streamed), cache, "test")
        minority[weight] = float(result.outputs[result.labels == 1, 1].mean())
    assert minority["balanced"] >= minority[None] + 0.05, minority


# 10:1 in train and validation, classes overlapping (means 2.5 noise sd apart), 100 test rows a class.
IMBALANCED = dict(shape=(8,), per_class=((200, 20), (200, 20), (100, 100)), separation=2.5)
UNDER_IMBALANCED = 8 * 2**10  # a budget under the ~31 KiB that IMBALANCED takes in memory
WEIGHING = FitOptions(epochs=5, batch_size=32, learning_rate=1e-2, seed=0, patience=None)


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("name", CLASS_HEADS)
def test_balanced_class_weight_finds_more_of_the_minority_class(name, streamed, tmp_path):
    """On a 10:1 training split of overlapping classes, 'balanced' makes every head, on either memory
    path, recognise at least 10 more of the 100 minority rows of the test split."""
    if streamed and name not in STREAMING:
        return
    cache = synthetic_cache(tmp_path, **IMBALANCED, task=task_of(name))
    recall = {}
    for weight in (None, "balanced"):
        head = fit_head(cache, name, replace(WEIGHING, class_weight=weight),
                        memory_budget=UNDER_IMBALANCED if streamed else None)
        assert head.record["memory"]["path"] == ("streamed" if streamed else "in-memory")
        result = predict_split(head, cache, "test")
        recall[weight] = float((result.predicted[result.labels == 1] == 1).mean())
    assert recall["balanced"] >= recall[None] + 0.1, recall


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("name, classes", [("logreg", 2), ("logreg", 3), ("svm", 2), ("svm", 3)])
def test_exported_head_fitted_with_class_weights_gives_its_probabilities(name, classes, streamed, tmp_path):
    if classes == 2:
        cache = synthetic_cache(tmp_path, **IMBALANCED)
    else:
        cache = synthetic_cache(tmp_path, classes=("x", "y", "z"), shape=(8,), separation=2.5,
                                per_class=((120, 40, 12), (60, 20, 6), (20, 20, 20)))
    head = fit_head(cache, name, replace(WEIGHING, class_weight="balanced"),
                    memory_budget=UNDER_IMBALANCED if streamed else None)
    assert head.record["memory"]["path"] == ("streamed" if streamed else "in-memory")
    x, _, _ = cache.read("test")
    exported = head.to_keras(tuple(cache.manifest["feature_shape"]))
    np.testing.assert_allclose(np.asarray(exported(x.astype(np.float32))), head.predict_proba(x), atol=2e-5)


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
@pytest.mark.parametrize("name", [name for name in HEADS if isinstance(build_head(name), KerasHead)])
def test_keras_heads_learn_from_the_augmented_view_rows(name, streamed, tmp_path):
    """Each original training row lies in the other class's blob, its three augmented views in its
    own: a head that learns from every row follows the views (three to one), one that skipped the
    views would get nearly every test row wrong."""
    cache = synthetic_cache(tmp_path, per_class=(20, 20, 20), shape=(8,), views=3, misleading_originals=True)
    assert cache.rows("train") == 4 * 40 and cache.views("train").tolist() == [0, 1, 2, 3] * 40
    options = FitOptions(epochs=5, batch_size=16, learning_rate=1e-2, patience=None)
    head = fit_head(cache, name, options, memory_budget=8 * 2**10 if streamed else None)
    assert head.record["memory"]["path"] == ("streamed" if streamed else "in-memory")
    assert evaluate(head, cache)["test"]["accuracy"] >= 0.6  # chance: 0.5


def test_svm_rbf_never_scores_below_the_majority_rate_on_validation(tmp_path):
    cache = synthetic_cache(tmp_path, per_class=((60, 15), (30, 8), (30, 8)), shape=(32,), separation=0.8)
    head = fitted(cache, "svm-rbf", FitOptions())
    assert head.record["validation_accuracy"][max(head.record["validation_accuracy"],
                                                  key=head.record["validation_accuracy"].get)] >= \
        head.record["validation_majority_rate"]
    assert evaluate(head, cache)["validation"]["accuracy"] >= head.record["validation_majority_rate"]


@pytest.mark.parametrize("classes", [2, 4])
def test_rbf_decision_values_match_scikit_learn(classes):
    from sklearn.svm import SVC

    from featcache.heads.kernel import decision, rbf, squared_distances

    rng = np.random.default_rng(classes)
    x = rng.normal(size=(80, 5)) + np.repeat(np.arange(classes), 80 // classes)[:, None]
    y = np.repeat(np.arange(classes), 80 // classes)
    svc = SVC(kernel="rbf", gamma=0.3, C=2.0).fit(x, y)
    xt = rng.normal(size=(15, 5)) * 2
    kernel = rbf(squared_distances(xt, svc.support_vectors_), 0.3)
    ours = decision(kernel, svc.dual_coef_, svc.intercept_, svc.n_support_)
    theirs = svc.decision_function(xt)
    np.testing.assert_allclose(ours, theirs.reshape(len(xt), -1), atol=1e-8)


def test_cross_validation_refits_each_heads_recipe(tmp_path):
    cache = synthetic_cache(tmp_path)
    for name in ("logreg", "dense256"):
        scores = cross_validate(fitted(cache, name), cache, folds=3)
        assert len(scores) == 3 and min(scores) >= 0.9


def test_fit_head_command_saves_heads_with_metrics_and_keeps_fitted_ones(tmp_path):
    cache = synthetic_cache(tmp_path)
    args = ["fit-head", "--workdir", str(tmp_path), "--head", "logreg", "--head", "linear", "--learning-rate", "0.01"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "linear epoch 1/50: loss" in result.stderr and "logreg standard: val accuracy" in result.stderr
    for name in ("logreg", "linear"):
        info = json.loads((head_dir(cache, name) / "head.json").read_text())
        assert info["metrics"]["test"]["accuracy"] >= 0.9
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and again.output.count("already fitted with these options") == 2
    unknown = CliRunner().invoke(main, ["fit-head", "--workdir", str(tmp_path), "--head", "forest"])
    assert unknown.exit_code == 1 and "unknown head 'forest'" in unknown.output


def test_heads_command_lists_the_registry():
    listing = CliRunner().invoke(main, ["heads"], terminal_width=200)
    assert listing.exit_code == 0
    assert all(name in listing.output for name in HEADS)


def module_sorted_cache(workdir, seed=0):
    """Two classes whose rows come, in path order, module by module (as elpv's cells do): every split
    holds cells of every module, and what tells the classes apart differs from module to module."""
    import hashlib
    from pathlib import Path

    from featcache.dataset import Dataset, Sample
    from tests.conftest import write_cache

    rng = np.random.default_rng(seed)
    shape = (16,)
    modules, class_means = rng.normal(0, 6, (3, *shape)), rng.normal(0, 1.5, (3, 2, *shape))
    samples, features = [], {}
    for split, n in (("train", 60), ("validation", 30), ("test", 30)):
        for label, name in enumerate("ab"):
            for i in range(n):
                module = i * 3 // n  # blocks of consecutive files: module 0, then 1, then 2
                relpath = f"{split}/{name}/m{module}_{i:04d}.png"
                sha = hashlib.sha256(f"{seed}{relpath}".encode()).hexdigest()
                samples.append(Sample(Path(relpath), relpath, label, split, sha))
                features[relpath] = modules[module] + class_means[module, label] + rng.normal(0, 1, shape)
    dataset = Dataset(workdir, "modules", ("a", "b"), samples)
    return write_cache(workdir, dataset, shape, "float32", seed,
                       lambda plan: np.stack([features[s.relpath] for s in plan.samples]), 16)


@pytest.mark.parametrize("name", ["svm", "svm-rbf"])
def test_calibration_folds_are_shuffled_not_blocks_of_sorted_rows(name, tmp_path):
    """Unshuffled folds of path-sorted rows hold out whole modules, whose scores calibrate nothing:
    elpv's svm-rbf fell to the majority class (57%) that way."""
    cache = module_sorted_cache(tmp_path)
    metrics = evaluate(fitted(cache, name, FitOptions(scaling="standard")), cache)
    assert metrics["validation"]["accuracy"] >= 0.9 and metrics["test"]["accuracy"] >= 0.9


def test_commands_without_a_keras_head_never_start_tensorflow(tmp_path):
    import subprocess
    import sys

    synthetic_cache(tmp_path)
    script = (
        "import sys\nfrom featcache.cli import main\n"
        f"for args in (['fit-head', '--head', 'logreg', '--head', 'svm-rbf'], ['compare'], ['compare', '--cv', '2']):\n"
        f"    main([*args, '--workdir', {str(tmp_path)!r}], standalone_mode=False)\n"
        "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("name", ["svm", "svm-rbf"])
def test_calibrated_heads_refuse_a_class_with_one_training_row_in_one_line(name, tmp_path):
    cache = synthetic_cache(tmp_path, per_class=((20, 1), (5, 5), (5, 5)), shape=(8,))
    with pytest.raises(FeatcacheError, match="a class has 1 training row") as refusal:
        fitted(cache, name, FitOptions())
    assert "\n" not in str(refusal.value)


# --- scaling: the three choices, fitted in memory or from streamed sums, and as Keras layers ----------


def scaling_rows(seed=0):
    """(30, 2, 3) float32 rows far from zero (float32 sums would drift), one column constant, one of
    standard deviation below 1."""
    rng = np.random.default_rng(seed)
    x = (1e4 + rng.normal(0, 3, (30, 2, 3))).astype(np.float32)
    x[:, 0, 1] = 7.0
    x[:, 1, 0] = 5 + rng.normal(0, 0.1, 30)
    return x


def test_streamed_moments_are_float64_sums_and_standardise_as_numpy_does():
    from featcache.heads.scaling import Scaling, streamed_moments

    x = scaling_rows()
    flat = x.reshape(len(x), -1).astype(np.float64)
    batches = [(x[:7], None), (x[7:8], None), (x[8:], None)]  # uneven, one of a single row
    count, total, squares = streamed_moments(batches)
    assert count == 30
    np.testing.assert_allclose(total, flat.sum(axis=0), rtol=1e-13)
    np.testing.assert_allclose(squares, (flat * flat).sum(axis=0), rtol=1e-13)
    streamed = Scaling.from_moments("standard", count, total, squares)
    in_memory = Scaling.fit("standard", x.reshape(30, -1))  # fit takes flattened rows
    for scaling in (streamed, in_memory):
        assert scaling.mean.dtype == np.float32 and scaling.scale.dtype == np.float32
        np.testing.assert_allclose(scaling.mean, flat.mean(axis=0), rtol=1e-6)
        std = flat.std(axis=0)
        np.testing.assert_allclose(scaling.scale, np.where(std > 0, std, 1), rtol=1e-4)
        assert scaling.scale[1] == 1.0  # the constant column is left unscaled, never divided by zero
        z = scaling.apply(x)
        assert z.shape == (30, 6) and np.isfinite(z).all()
        assert scaling.apply(x.astype(np.float64)).dtype == np.float32
        np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-3)


def test_standardising_features_far_from_zero_sums_in_float64():
    """In float32, the mean of 4,000 rows near 1e6 is off by 30 and their standard deviation reads 30, not 1."""
    from featcache.heads.scaling import Scaling

    x = (1e6 + np.random.default_rng(0).normal(0, 1, (4000, 2))).astype(np.float32)
    scaling = Scaling.fit("standard", x)
    np.testing.assert_allclose(scaling.mean, x.mean(axis=0, dtype=np.float64), rtol=1e-7)
    np.testing.assert_allclose(scaling.scale, x.std(axis=0, dtype=np.float64), rtol=1e-5)


def test_moments_of_one_row_give_its_values_as_mean_and_unit_scale():
    from featcache.heads.scaling import Scaling, streamed_moments

    row = scaling_rows()[:1]
    scaling = Scaling.from_moments("standard", *streamed_moments([(row, None)]))
    np.testing.assert_array_equal(scaling.mean, row.reshape(-1))
    np.testing.assert_array_equal(scaling.scale, np.ones(6, np.float32))


@pytest.mark.parametrize("kind", ["l2", "none"])
def test_scalings_without_arrays_keep_their_kind_and_store_nothing(kind):
    from featcache.heads.scaling import Scaling, streamed_moments

    x = scaling_rows()
    for scaling in (Scaling.fit(kind, x), Scaling.from_moments(kind, *streamed_moments([(x, None)])),
                    Scaling.from_arrays(kind, {})):
        assert (scaling.kind, scaling.mean, scaling.scale, scaling.arrays()) == (kind, None, None, {})
    x[1] *= 1e-5  # a row of norm below 1 is still scaled to norm 1 ...
    x[2] = 0  # ... and a zero row stays zero, never NaN
    flat = x.reshape(30, -1)
    norms = np.linalg.norm(flat, axis=1, keepdims=True)
    expected = np.divide(flat, norms, out=np.zeros_like(flat), where=norms > 0) if kind == "l2" else flat
    scaled = Scaling(kind).apply(x.astype(np.float64))
    assert scaled.dtype == np.float32  # rows are float32 whatever they came as
    np.testing.assert_allclose(scaled, expected, rtol=1e-6)


def test_rms_scaling_divides_every_feature_by_their_root_mean_square_in_memory_and_streamed():
    """One number for all features, so their relative sizes stay (a rare large activation is not
    blown up to tens of deviations, as standardising does), at unit mean square."""
    from featcache.heads.scaling import Scaling, streamed_moments

    x = scaling_rows() / 1e3
    x[:, 0, 0] = 0
    x[3, 0, 0] = 50.0  # one rare large value
    flat = x.reshape(30, -1).astype(np.float64)
    rms = np.sqrt(np.mean(flat**2))
    batches = [(x[:7], None), (x[7:], None)]
    for scaling in (Scaling.fit("rms", x.reshape(30, -1)), Scaling.from_moments("rms", *streamed_moments(batches))):
        assert scaling.kind == "rms" and scaling.mean is None and scaling.scale.dtype == np.float32
        np.testing.assert_allclose(scaling.scale, [rms], rtol=1e-6)
        z = scaling.apply(x)
        np.testing.assert_allclose(z, flat / rms, rtol=1e-5)
        assert np.mean(z.astype(np.float64) ** 2) == pytest.approx(1, rel=1e-5)
        back = Scaling.from_arrays("rms", scaling.arrays())
        assert sorted(scaling.arrays()) == ["scaling_scale"]
        np.testing.assert_array_equal(back.scale, scaling.scale)
    assert Scaling.fit("rms", np.zeros((4, 3))).scale[0] == 1.0  # all-zero features are left as they are


def test_rms_scaling_layer_computes_in_float32_under_a_bfloat16_policy():
    """bfloat16 keeps 8 bits of mantissa: the divisor itself would round by up to 0.4%."""
    from featcache import precision
    from featcache.heads.scaling import Scaling

    with precision.using("mixed_bfloat16"):
        layer = Scaling("rms", None, np.array([3.0], np.float32)).keras_layer()
    assert layer.compute_dtype == "float32"
    np.testing.assert_allclose(np.asarray(layer(np.array([[1.0, 2.0]], np.float32))), [[1 / 3, 2 / 3]], rtol=1e-7)


def test_standard_scaling_round_trips_through_its_arrays():
    from featcache.heads.scaling import Scaling

    scaling = Scaling.fit("standard", scaling_rows().reshape(30, -1))
    arrays = scaling.arrays()
    assert sorted(arrays) == ["scaling_mean", "scaling_scale"]
    back = Scaling.from_arrays("standard", arrays)
    assert back.kind == "standard"
    np.testing.assert_array_equal(back.mean, scaling.mean)
    np.testing.assert_array_equal(back.scale, scaling.scale)


@pytest.mark.parametrize("kind", ["standard", "l2", "none", "rms"])
def test_scaling_as_a_keras_layer_computes_what_apply_computes(kind):
    from featcache.heads.scaling import Scaling

    x = scaling_rows(seed=1) / 1e3  # moderate values: float32 Keras arithmetic matches numpy's closely
    flat = x.reshape(len(x), -1)
    scaling = Scaling.fit(kind, flat)
    layer = scaling.keras_layer(name="scale_in")
    if kind == "none":
        assert layer is None
        return
    assert layer.name == "scale_in" and scaling.keras_layer().name == "scaling"
    np.testing.assert_allclose(np.asarray(layer(flat)), scaling.apply(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("features", [64, 8], ids=["fewer-rows-than-features", "more-rows-than-features"])
def test_svm_is_scikit_learns_linear_svc_one_vs_rest_on_the_gram_matrix(features, tmp_path):
    """The svm is fitted on the Gram matrix (libsvm) while it is small, whether rows or features are
    more: its scores before calibration are those of one SVC(kernel="linear") per class on the scaled
    rows, at the scaling and C validation chose; Platt's sigmoids, normalised, give the probabilities."""
    from scipy.special import expit
    from sklearn.svm import SVC

    from featcache.heads.scaling import Scaling

    cache = synthetic_cache(tmp_path, classes=("a", "b", "c"), per_class=(12, 10, 10), shape=(features,),
                            separation=2.0)
    head = fitted(cache, "svm", FitOptions())
    assert head.record["solver"] == "kernel"
    x, y, _ = cache.read("train")
    xt, _, _ = cache.read("test")
    scaling = Scaling.fit(head.record["chosen"]["scaling"], x.reshape(len(x), -1))
    c = head.record["chosen"]["C"]
    expected = np.column_stack([SVC(kernel="linear", C=c).fit(scaling.apply(x), (y == k).astype(int))
                                .decision_function(scaling.apply(xt)) for k in range(3)])
    np.testing.assert_allclose(head.model.scores(xt), expected, atol=1e-3 * np.abs(expected).max())
    a, b = head.model.platt
    np.testing.assert_allclose(head.predict_proba(xt), (p := expit(-(a * expected + b))) / p.sum(1, keepdims=True),
                               atol=1e-3)


def test_binary_svm_scores_follow_the_positive_class(tmp_path):
    """Two classes: one score column whose sign says class 1, as scikit-learn's decision function."""
    from sklearn.svm import SVC

    from featcache.heads.scaling import Scaling

    cache = synthetic_cache(tmp_path, per_class=(12, 10, 10), shape=(64,), separation=6.0)
    head = fitted(cache, "svm", FitOptions(scaling="none"))
    x, y, _ = cache.read("train")
    xt, yt, _ = cache.read("test")
    flat = Scaling.fit("none", x).apply
    expected = SVC(kernel="linear", C=head.record["chosen"]["C"]).fit(flat(x), y).decision_function(flat(xt))
    np.testing.assert_allclose(head.model.scores(xt)[:, 0], expected, atol=1e-3 * np.abs(expected).max())
    assert (head.predict_proba(xt).argmax(1) == yt).mean() > 0.9


@pytest.mark.parametrize("damage", [b"\xff\xfe not text", b"[1, 2]", b'{"format": 1, "name": "logreg"}', b"{"],
                         ids=["binary", "a-list", "fields-missing", "cut-short"])
def test_a_damaged_head_record_never_blocks_its_own_fix(damage, tmp_path):
    """Loading it is one line naming the file; fit-head (without --refit) fits the head again."""
    from featcache.heads import fit_and_save

    cache = synthetic_cache(tmp_path)
    folder = fitted(cache, "logreg").save(head_dir(cache, "logreg"))
    (folder / "head.json").write_bytes(damage)
    with pytest.raises(FeatcacheError) as refusal:
        load_head(folder)
    assert "\n" not in str(refusal.value) and str(folder) in str(refusal.value)
    head, kept = fit_and_save(cache, "logreg", FitOptions())
    assert not kept and load_head(folder).record["name"] == "logreg"
