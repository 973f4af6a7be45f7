"""Targets beyond one class per image: ordered classes and numbers, from the data to export."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold

from featcache import FeatcacheError, cache
from featcache.compare import compare
from featcache.dataset import load_dataset
from featcache.evaluate import cross_validate, predict_split
from featcache.heads import FitOptions, fit_and_save, fit_head, head_dir, load_head
from featcache.heads.ridge import GRID, RidgeHead, soft_round
from featcache.heads.scaling import Scaling
from featcache.targets import Target
from tests.conftest import cli_in, synthetic_cache, value_cache, write_cache, write_image


def grade_folders(root, names=("grade 10", "grade 2", "grade 1"), per_class=4):
    for k, name in enumerate(names):
        for i in range(per_class):
            write_image(root / name / f"{i}.png", (40 * k, 90, 90), seed=10 * k + i)
    return root


def test_ordered_classes_follow_the_given_order_or_their_natural_order(tmp_path):
    data = grade_folders(tmp_path / "grades")
    assert load_dataset(data).classes == ("grade 1", "grade 10", "grade 2")  # classification: by name, as ever
    natural = load_dataset(data, target=Target("ordinal"))
    assert natural.classes == ("grade 1", "grade 2", "grade 10") and natural.task == "ordinal"
    given = load_dataset(data, target=Target("ordinal", ("grade 10", "grade 2", "grade 1")))
    assert given.classes == ("grade 10", "grade 2", "grade 1")
    assert {s.relpath.split("/")[0]: s.label for s in given.samples} == {"grade 10": 0, "grade 2": 1, "grade 1": 2}


@pytest.mark.parametrize("order, said", [
    (("grade 1", "grade 2"), "grade 10 not in --class-order"),
    (("grade 1", "grade 2", "grade 10", "grade 3"), "grade 3 in --class-order but not"),
])
def test_a_class_order_that_misses_or_adds_a_class_is_one_line(order, said, tmp_path):
    with pytest.raises(FeatcacheError, match=said) as error:
        load_dataset(grade_folders(tmp_path / "grades"), target=Target("ordinal", order))
    assert "\n" not in str(error.value) and "grade 1,grade 2,grade 10" in str(error.value)


def test_a_class_order_that_misses_and_adds_classes_names_both_in_one_line():
    with pytest.raises(FeatcacheError) as error:
        Target("ordinal", ("a", "x", "y")).classes({"a", "b", "c"}, "data")
    assert str(error.value) == ("--class-order for data: b, c not in --class-order; x, y in --class-order but not "
                                "in the data; list exactly the classes found: a,b,c")
    with pytest.raises(FeatcacheError) as error:
        Target("ordinal", ("a", "b", "c")).classes({"a", "b"}, "data")
    assert str(error.value).startswith("--class-order for data: c in --class-order but not in the data; list")
    with pytest.raises(FeatcacheError) as error:
        Target("ordinal", ("a",)).classes({"a", "b"}, "data")
    assert str(error.value) == "--class-order for data: b not in --class-order; list exactly the classes found: a,b"


def test_an_unknown_task_or_a_class_listed_twice_is_one_line():
    with pytest.raises(FeatcacheError, match="^--task 'grades': choose one of classification, ordinal, multilabel, "
                                             "regression$"):
        Target("grades")
    with pytest.raises(FeatcacheError, match="^--class-order a,b,a: a class is listed twice; list each class once$"):
        Target("ordinal", ("a", "b", "a"))
    with pytest.raises(FeatcacheError, match="^--class-order orders classes; a regression target has numbers, not "
                                             "classes: leave --class-order out$"):
        Target("regression", ("a", "b"))


def test_bad_labels_past_the_third_are_counted_not_listed():
    from featcache.targets import natural_key

    rows = [(f"img{i}.png", text) for i, text in enumerate(["x", "1", "y", "z", "w", "v"])]
    with pytest.raises(FeatcacheError, match=r"not a finite number: img0.png \('x'\), img2.png \('y'\), img3.png "
                                             r"\('z'\) and 2 more; fix those rows"):
        Target("regression").values(rows, "d")
    with pytest.raises(FeatcacheError, match=r"an empty class in: img0.png \('a;'\), img1.png \(';b'\), img2.png "
                                             r"\('a;;b'\) and 1 more; write"):
        Target("multilabel").label_sets([(f"img{i}.png", t) for i, t in enumerate(["a;", ";b", "a;;b", "b;", "a"])],
                                        "d")
    assert Target("regression").values(rows[1:2], "d") == {"1": 1.0}
    with pytest.raises(FeatcacheError) as three:
        Target("regression").values([rows[0], *rows[2:4]], "d")
    assert str(three.value) == ("d: --task regression needs a number in every label; not a finite number: "
                                "img0.png ('x'), img2.png ('y'), img3.png ('z'); fix those rows or choose another "
                                "--label-column")
    with pytest.raises(FeatcacheError, match=r"\('z'\) and 1 more; fix"):
        Target("regression").values(rows[:5], "d")
    with pytest.raises(FeatcacheError, match=r"\('a;;b'\); write"):
        Target("multilabel").label_sets([(f"img{i}.png", t) for i, t in enumerate(["a;", ";b", "a;;b"])], "d")
    assert sorted(["b", "a1", "10", "2", "a"], key=natural_key) == ["2", "10", "a", "a1", "b"]


def test_the_task_is_in_the_cache_key_and_a_classification_key_is_unchanged(tmp_path):
    data = grade_folders(tmp_path / "grades")
    config = cache.ExtractionConfig("vgg16", "none", "block5_pool", "none", 32, "squash", "backbone", "float32")
    plain = load_dataset(data)
    samples = sorted((s.relpath, s.label, s.split, s.sha256) for s in plain.samples)
    before = cache._digest({"config": config.identity(), "classes": list(plain.classes), "samples": samples})
    assert cache.cache_key(config, plain) == before  # caches made before tasks keep their keys
    ordered = load_dataset(data, target=Target("ordinal", plain.classes))  # same classes, same labels
    assert [s.label for s in ordered.samples] == [s.label for s in plain.samples]
    assert cache.cache_key(config, ordered) != before


def regression_csv(root, values, column="score"):
    """Images with a CSV of path,label,score (label: a class, score: the number)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", column])
        for i, value in enumerate(values):
            write_image(root / f"img{i:02d}.png", (int(200 * (i % 5) / 4), 80, 80), seed=i)
            writer.writerow([f"img{i:02d}.png", "any", value])
    return root / "labels.csv"


def test_regression_labels_are_the_numbers_of_a_csv_column(tmp_path):
    values = [0.5 * i for i in range(20)]
    dataset = load_dataset(regression_csv(tmp_path / "d", values), target=Target("regression"), label_column="score")
    assert dataset.classes == () and dataset.task == "regression" and dataset.label_column == "score"
    assert sorted(s.label for s in dataset.samples) == values
    assert {s.split for s in dataset.samples} == {"train", "validation", "test"}  # one group, split by rank
    summary = cache.split_summary(dataset.split("train"), [])
    assert summary["values"]["min"] == min(s.label for s in dataset.split("train"))


def test_labels_that_are_not_numbers_are_named_in_one_line(tmp_path):
    values = [str(i) for i in range(10)] + ["abc", "nan", "inf"]
    with pytest.raises(FeatcacheError, match=r"not a finite number: img10.png \('abc'\), img11.png \('nan'\), "
                                             r"img12.png \('inf'\)") as error:
        load_dataset(regression_csv(tmp_path / "d", values), target=Target("regression"), label_column="score")
    assert "\n" not in str(error.value) and "--label-column" in str(error.value)


def test_numbers_from_folders_or_of_one_value_are_refused_in_one_line(tmp_path):
    with pytest.raises(FeatcacheError, match="reads a number per image from a CSV column .*; folders name one class "
                                             "per image: write a CSV"):
        load_dataset(grade_folders(tmp_path / "grades"), target=Target("regression"))
    with pytest.raises(FeatcacheError, match="1 distinct value"):
        load_dataset(regression_csv(tmp_path / "d", [3] * 12), target=Target("regression"), label_column="score")
    with pytest.raises(FeatcacheError, match="--class-order orders classes"):
        Target("regression", ("a", "b"))


@pytest.mark.parametrize("rows", [30, 90])  # fewer rows than features (the dual solve), then more
def test_ridge_chooses_alpha_on_validation_and_equals_scikit_learns_ridge(rows):
    rng = np.random.default_rng(rows)
    w = rng.normal(size=40)
    x, xv = rng.normal(size=(rows, 40)).astype(np.float32), rng.normal(size=(25, 40)).astype(np.float32)
    y, yv = x @ w + rng.normal(0, 2, rows), xv @ w
    head = RidgeHead("ridge", FitOptions(scaling="standard")).fit(x, y, n_classes=0, validation=(xv, yv))
    scaling = Scaling.fit("standard", x)
    centred = scaling.apply(x) - scaling.apply(x).mean(axis=0)
    mean_square = float(np.mean(np.sum(centred.astype(np.float64) ** 2, axis=1)))
    references = {t * mean_square: Ridge(alpha=t * mean_square).fit(scaling.apply(x), y) for t in GRID}
    errors = {alpha: np.sqrt(np.mean((r.predict(scaling.apply(xv)) - yv) ** 2)) for alpha, r in references.items()}
    chosen = head.record["chosen"]["alpha"]
    assert chosen == pytest.approx(min(errors, key=errors.get))
    reference = references[min(errors, key=errors.get)].predict(scaling.apply(xv))
    np.testing.assert_allclose(head.predict_values(xv), reference, atol=1e-3 * np.abs(reference).max())


def test_soft_rounding_gives_probabilities_whose_most_probable_class_is_the_rounded_score():
    scores = np.array([-2.0, 0.0, 0.3, 1.0, 1.7, 2.49, 2.51, 3.0, 9.0])
    p = soft_round(scores, 4)
    np.testing.assert_allclose(p.sum(axis=1), 1)
    assert (p >= 0).all() and p.argmax(axis=1).tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3]
    np.testing.assert_allclose(p[2], [0.7, 0.3, 0, 0])


def ordered_cache(workdir, per_class=(20, 8, 8), seed=0):
    """Four ordered classes whose rows lie along one direction, class k around k steps along it."""
    import hashlib
    from pathlib import Path

    from featcache.dataset import Dataset, Sample

    rng = np.random.default_rng(seed)
    direction = rng.normal(0, 1, 16)
    samples, features = [], {}
    for split, n in zip(("train", "validation", "test"), per_class, strict=True):
        for k in range(4):
            for i in range(n):
                relpath = f"{split}/g{k}/{i:03d}.png"
                sha = hashlib.sha256(relpath.encode()).hexdigest()
                features[sha] = (k * direction + rng.normal(0, 0.6, 16)).astype(np.float32)
                samples.append(Sample(Path(relpath), relpath, k, split, sha))
    dataset = Dataset(workdir, "synthetic", ("g0", "g1", "g2", "g3"), samples, task="ordinal")
    return write_cache(workdir, dataset, (16,), "float32", seed,
                       lambda plan: np.stack([features[s.sha256] for s in plan.samples]), 16)


def test_ridge_on_ordered_classes_reads_the_rank_back_as_classes(tmp_path):
    ordered = ordered_cache(tmp_path / "o")
    head, _ = fit_and_save(ordered, "ridge")
    test = predict_split(head, ordered, "test")
    np.testing.assert_allclose(test.outputs.sum(axis=1), 1)
    metrics = head.record["metrics"]["test"]
    assert metrics["accuracy"] > 0.8
    assert metrics["mean_class_error"] == pytest.approx(np.mean(np.abs(test.predicted - test.labels)))
    (row,) = compare(ordered, select_by="class-error").rows
    assert row["test_mean_class_error"] == metrics["mean_class_error"] and row["val_accuracy"] is not None


def test_fit_head_refuses_heads_and_options_that_do_not_fit_the_target(tmp_path):
    numbers, _ = value_cache(tmp_path / "v")
    with pytest.raises(FeatcacheError, match="logreg does not learn a regression target; heads for regression: "
                                             "dense256, dense1024, linear, ridge"):
        fit_head(numbers, "logreg")
    with pytest.raises(FeatcacheError, match="--class-weight and --threshold act on classes"):
        fit_head(numbers, "ridge", FitOptions(class_weight="balanced"))
    with pytest.raises(FeatcacheError, match="ridge does not learn a classification target"):
        fit_head(synthetic_cache(tmp_path / "c"), "ridge")
    for name in ("ridge", "svr"):  # over the budget: the heads that stream numbers are named, not logreg
        with pytest.raises(FeatcacheError, match=rf"^{name} cannot stream .*; raise --memory-budget, or fit "
                                                 "dense256, dense1024 or linear, which stream$"):
            fit_head(numbers, name, memory_budget=1024)


def test_numbers_are_compared_by_rmse_and_cross_validated_by_fold(tmp_path):
    numbers, _ = value_cache(tmp_path / "v", noise=1.0)
    head, _ = fit_and_save(numbers, "ridge")
    (row,) = compare(numbers, cv_folds=3).rows
    assert row["selected_by"] == "rmse" and row["val_rmse"] == head.record["metrics"]["validation"]["rmse"]
    x, y, paths = numbers.read("train")
    expected = []
    for train, held_out in GroupKFold(3, shuffle=True, random_state=0).split(x, y, groups=paths):
        fold = RidgeHead("ridge", FitOptions(), choices=head.record["chosen"]).fit(x[train], y[train], n_classes=0)
        expected.append(np.sqrt(np.mean((fold.predict_values(x[held_out]) - y[held_out]) ** 2)))
    assert cross_validate(head, numbers, 3) == pytest.approx(expected)
    assert row["cv_rmse"] == pytest.approx(np.mean(expected))
    with pytest.raises(FeatcacheError, match="--select-by 'accuracy' for a regression target: choose one of "
                                             "rmse, mae, r2"):
        compare(numbers, select_by="accuracy")


def test_ridge_and_dense256_predict_and_export_numbers_in_the_targets_units(tmp_path):
    numbers, _ = value_cache(tmp_path / "v", offset=100.0, noise=0.5)
    x, y, _ = numbers.read("validation")
    for name, options in (("ridge", FitOptions()), ("dense256", FitOptions(epochs=20))):
        fitted, _ = fit_and_save(numbers, name, options)
        head = load_head(head_dir(numbers, name))
        values = head.predict_values(x)
        np.testing.assert_allclose(values, fitted.predict_values(x), rtol=1e-5)
        exported = np.asarray(head.to_keras(numbers.feature_shape)(x.astype(np.float32)))[:, 0]
        np.testing.assert_allclose(exported, values, rtol=1e-4)
        assert abs(values.mean() - 100) < 3 * y.std()  # the standardised target folded back for dense256
        assert head.predict(x).tolist() == values.tolist() and head.record["output"] == "value"
    assert load_head(head_dir(numbers, "dense256")).record["target_scaling"]["mean"] == pytest.approx(
        numbers.read("train")[1].mean(), rel=1e-5)


def test_svr_chooses_on_validation_and_equals_scikit_learns_svr_at_its_choice(tmp_path):
    from sklearn.svm import SVR

    from featcache.heads.svr import EPSILON

    numbers, _ = value_cache(tmp_path / "v", rows=(40, 16, 16), offset=50.0, noise=0.3)
    head, _ = fit_and_save(numbers, "svr")
    chosen = head.record["chosen"]
    assert min(head.record["validation_rmse"].values()) == pytest.approx(head.record["metrics"]["validation"]["rmse"])
    x, y, _ = numbers.read("train")
    x_test = numbers.read("test")[0]
    scaling = Scaling.fit(chosen["scaling"], x.reshape(len(x), -1))
    mean, std = y.astype(np.float64).mean(), y.astype(np.float64).std()
    reference = SVR(kernel="rbf", gamma=chosen["gamma"], C=chosen["C"], epsilon=EPSILON).fit(
        scaling.apply(x.reshape(len(x), -1)), (y - mean) / std)
    expected = reference.predict(scaling.apply(x_test.reshape(len(x_test), -1))) * std + mean
    np.testing.assert_allclose(head.predict_values(x_test), expected, rtol=1e-5)
    loaded = load_head(head_dir(numbers, "svr"))
    np.testing.assert_array_equal(loaded.predict_values(x_test), head.predict_values(x_test))
    assert loaded.predict(x_test).tolist() == loaded.predict_values(x_test).tolist()
    with pytest.raises(FeatcacheError, match="^svr: an RBF kernel has no exact Keras layer equivalent"):
        loaded.to_keras(numbers.feature_shape)
    (row,) = compare(numbers, cv_folds=3).rows
    assert row["cv_rmse"] > 0 and row["val_rmse"] == head.record["metrics"]["validation"]["rmse"]


def test_an_ordinal_ridge_exports_its_soft_rounded_probabilities(tmp_path):
    ordered = ordered_cache(tmp_path / "o")
    head, _ = fit_and_save(ordered, "ridge")
    x = ordered.read("test")[0]
    exported = np.asarray(load_head(head_dir(ordered, "ridge")).to_keras(ordered.feature_shape)(x))
    np.testing.assert_allclose(exported, head.predict_proba(x), atol=1e-5)


def test_extract_fit_predict_and_export_a_regression_target_from_the_command_line(tmp_path):
    from featcache.model import model_card

    csv_path = regression_csv(tmp_path / "d", [float(i % 5) for i in range(20)])
    workdir = tmp_path / "out"
    run = cli_in(workdir)
    run("extract", "--data", csv_path, "--task", "regression", "--label-column", "score", "--weights", "none",
        "--image-size", "32", "--dtype", "float32")
    numbers = cache.open_cache(workdir)
    assert numbers.task == "regression" and numbers.read("train")[1].dtype == np.float32
    run("fit-head", "--head", "ridge")
    rows = json.loads(run("predict", tmp_path / "d" / "img03.png", "--format", "json"))
    head = load_head(head_dir(numbers, "ridge"))
    cached = next(x[[paths.index("img03.png")]] for x, _, paths in map(numbers.read, numbers.splits)
                  if "img03.png" in paths)
    assert rows == [{"path": str(tmp_path / "d" / "img03.png"),
                     "value": pytest.approx(float(head.predict_values(cached)[0]), rel=1e-4)}]
    card = model_card(numbers, head, [], "test")
    assert card["task"] == "regression" and card["output"]["name"] == "value" and "'score'" in card["output"]["meaning"]
    assert "rmse" in run("compare", "--format", "json")
