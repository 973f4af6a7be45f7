"""Multi-label targets: a set of classes per image, read from a CSV, stored as rows of 0 and 1, learnt by
the Keras heads with one sigmoid per class, each decided by its own threshold chosen on validation."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, hamming_loss

import featcache
from featcache import FeatcacheError, cache
from featcache.compare import compare, write_outputs
from featcache.dataset import Dataset, Sample, load_dataset
from featcache.evaluate import cross_validate, predict_split
from featcache.heads import FitOptions, fit_and_save, fit_head, head_dir, heads_for, load_head
from featcache.heads.protocol import choose_label_thresholds
from featcache.predict import Predictions, format_predictions
from featcache.targets import Target
from tests.conftest import cli_in, write_cache, write_image

CLASSES = ("cat", "dog", "sky")


def multilabel_csv(root: Path, cells: list[str]) -> Path:
    """Images with a CSV of path,tags: ``cells`` are the tags cells as written."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "tags"])
        for i, cell in enumerate(cells):
            write_image(root / f"img{i:02d}.png", (40 * (i % 6), 90, 90), size=(32, 32), seed=i)
            writer.writerow([f"img{i:02d}.png", cell])
    return root / "labels.csv"


def sets_cache(workdir: Path, rows=(60, 30, 30), noise=0.5, seed=0):
    """Three classes, each present in a row with probability 0.4 (any set, the empty one too); a row's
    features are the sum of its classes' vectors plus noise, so the sets are learnable and known."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(0, 1.5, (len(CLASSES), 12))
    samples, features = [], {}
    for split, n in zip(("train", "validation", "test"), rows, strict=True):
        for i in range(n):
            present = tuple(int(k) for k in np.flatnonzero(rng.random(len(CLASSES)) < 0.4))
            relpath = f"{split}/{i:03d}.png"
            sha = hashlib.sha256(f"{seed}{relpath}".encode()).hexdigest()
            features[sha] = (vectors[list(present)].sum(axis=0) + rng.normal(0, noise, 12)).astype(np.float32)
            samples.append(Sample(Path(relpath), relpath, present, split, sha))
    dataset = Dataset(workdir, "synthetic", CLASSES, samples, task="multilabel")
    return write_cache(workdir, dataset, (12,), "float32", seed,
                       lambda plan: np.stack([features[s.sha256] for s in plan.samples]), 16)


def test_a_csv_column_of_classes_separated_by_semicolons_gives_sets_of_classes(tmp_path):
    cells = ["cat;dog", "sky", ";", "dog ; cat", "cat"] * 4
    dataset = load_dataset(multilabel_csv(tmp_path / "d", cells), target=Target("multilabel"), label_column="tags")
    assert dataset.classes == CLASSES[:2] + ("sky",) and dataset.task == "multilabel"
    labels = {s.relpath: s.label for s in dataset.samples}
    assert [labels[f"img{i:02d}.png"] for i in range(5)] == [(0, 1), (2,), (), (0, 1), (0,)]


def test_an_empty_class_between_separators_or_class_folders_are_one_line(tmp_path):
    csv_path = multilabel_csv(tmp_path / "d", ["cat;;dog", "sky", "dog;"] + ["cat"] * 5)
    with pytest.raises(FeatcacheError, match=r"an empty class in: img00.png \('cat;;dog'\), img02.png \('dog;'\); "
                                             "write each class once"):
        load_dataset(csv_path, target=Target("multilabel"), label_column="tags")
    (tmp_path / "folders" / "cat").mkdir(parents=True)
    with pytest.raises(FeatcacheError, match="--task multilabel reads classes separated by ';' per image from a "
                                             "CSV column"):
        load_dataset(tmp_path / "folders", target=Target("multilabel"))
    with pytest.raises(FeatcacheError, match="no row names a class"):
        load_dataset(multilabel_csv(tmp_path / "none", [";"] * 6), target=Target("multilabel"), label_column="tags")


def test_sets_are_stored_as_rows_of_0_and_1_and_counted_per_class(tmp_path):
    sets = sets_cache(tmp_path)
    x, y, paths = sets.read("train")
    assert y.shape == (60, 3) and set(np.unique(y)) <= {0, 1} and sets.task == "multilabel"
    counts = sets.manifest["splits"]["train"]["class_counts"]
    assert [counts[c] for c in CLASSES] == y.sum(axis=0).tolist()
    assert sets.row_index("validation")[0].shape == (30, 3)
    frame = sets.to_pandas("train")
    assert frame["has_dog"].tolist() == y[:, 1].tolist() and frame["path"].tolist() == paths
    assert frame["classes"].tolist() == [";".join(c for c, on in zip(CLASSES, row, strict=True) if on) for row in y]
    assert (y.sum(axis=1) >= 2).any() and (y.sum(axis=1) == 0).any()  # sets of two or more, and empty ones


def test_a_threshold_per_class_is_chosen_for_f1_on_validation():
    labels = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]])
    scores = np.array([[0.3, 0.9, 0.2], [0.2, 0.2, 0.1], [0.1, 0.8, 0.6], [0.05, 0.1, 0.4]])
    # cat: 0.5 finds none, every cut at or under 0.2 finds both and no other: between 0.1 and 0.2
    # dog: 0.5 is already perfect; sky: no positive row, nothing to choose from
    assert choose_label_thresholds(labels, scores) == pytest.approx([0.15, 0.5, 0.5])


def test_a_wrong_set_is_as_sure_as_its_surest_wrong_decision_and_a_keras_head_scores_each_decision():
    import keras

    from featcache.evaluate import SplitResult
    from featcache.heads.keras_heads import compile_head
    from featcache.report import precision_recall

    result = SplitResult(np.array([[0.12, 0.9], [0.05, 0.2]]), np.array([[0, 1], [0, 1]]), ["a", "b"], 0.0,
                         threshold=[0.1, 0.5])
    # a: "yes" to the first class by a hair over its 0.1; b: the second class missed at 0.2
    assert [(m["predicted"], m["probability"]) for m in result.misclassified(["x", "y"])] == [
        ("x;y", pytest.approx(0.12)), ("(none)", pytest.approx(0.8))]
    assert precision_recall(result.labels, result.outputs, ["x", "y"])["y"]["rows"] == 2  # chance: support / rows
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(3, activation="sigmoid")])
    model.layers[0].set_weights([np.zeros((1, 3)), np.log(np.array([0.9, 0.8, 0.3]) / np.array([0.1, 0.2, 0.7]))])
    compile_head(model, 3, "adam", 1e-3, multilabel=True)
    accuracy = model.evaluate(np.zeros((1, 1)), np.array([[0, 1, 1]]), verbose=0, return_dict=True)["accuracy"]
    assert accuracy == pytest.approx(1 / 3)  # two of three decisions wrong; not the most probable column's class


def test_keras_heads_learn_sets_and_match_a_scikit_learn_reference(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.preprocessing import StandardScaler

    sets = sets_cache(tmp_path)
    assert heads_for("multilabel") == ["dense256", "dense1024", "linear"]
    head, _ = fit_and_save(sets, "linear", FitOptions(epochs=60, learning_rate=1e-2))
    assert head.record["output"] == "multilabel" and len(head.threshold) == 3
    assert head.record["threshold"]["chosen_by"] == "F1 of each class on validation"
    x, y, _ = sets.read("train")
    x_test, y_test, _ = sets.read("test")
    scaler = StandardScaler().fit(x)
    reference = OneVsRestClassifier(LogisticRegression()).fit(scaler.transform(x), y)
    expected = reference.predict(scaler.transform(x_test))
    test = predict_split(head, sets, "test")
    metrics = head.record["metrics"]["test"]
    assert metrics["micro_f1"] >= f1_score(y_test, expected, average="micro") - 0.1
    assert metrics["micro_f1"] > 0.8 and metrics["accuracy"] > 0.5
    assert metrics["micro_f1"] == pytest.approx(f1_score(y_test, test.predicted, average="micro"))
    assert metrics["hamming_loss"] == pytest.approx(hamming_loss(y_test, test.predicted))
    assert metrics["accuracy"] == pytest.approx(np.all(test.predicted == y_test, axis=1).mean())
    assert np.array_equal(test.predicted, (test.outputs >= np.array(head.threshold)).astype(int))
    loaded = load_head(head_dir(sets, "linear"))
    assert np.array_equal(loaded.predict(x_test), test.predicted) and loaded.predicts_sets
    exported = np.asarray(loaded.to_keras(sets.feature_shape)(x_test))
    np.testing.assert_allclose(exported, test.outputs, atol=1e-5)


def test_compare_ranks_a_linear_heads_sets_by_macro_f1_and_cross_validates_by_exact_match(tmp_path):
    from sklearn.model_selection import GroupKFold

    sets = sets_cache(tmp_path, rows=(45, 24, 24))
    head, _ = fit_and_save(sets, "linear", FitOptions(epochs=12, learning_rate=1e-2))
    comparison = compare(sets, cv_folds=3)
    (row,) = comparison.rows
    assert featcache.compare(sets)[0]["selected_by"] == "macro-f1"  # the API ranks as the command does
    assert row["selected_by"] == "macro-f1" and row["test_hamming_loss"] == head.record["metrics"]["test"][
        "hamming_loss"]
    assert list(row["per_class"]) == list(CLASSES) and not comparison.confusions
    test = predict_split(head, sets, "test")
    wrong = np.flatnonzero(np.any(test.predicted != test.labels, axis=1))
    assert [m["relpath"] for m in comparison.misclassified] == [test.paths[i] for i in wrong]
    x, y, paths = sets.read("train")
    expected = []
    for train, held_out in GroupKFold(3, shuffle=True, random_state=0).split(x, y, groups=paths):
        fold = head.for_fold().fit(x[train], y[train], n_classes=3)
        decided = fold.predict_proba(x[held_out]) >= np.array(head.threshold)
        expected.append(np.all(decided == y[held_out], axis=1).mean())
    assert row["cv_accuracy"] == pytest.approx(np.mean(expected), abs=1e-6)
    written = write_outputs(comparison, sets, tmp_path / "plots")
    assert set(written) == {"accuracy by head", "precision-recall", "learning curves"}
    with pytest.raises(FeatcacheError, match="--select-by 'class-error' for a multilabel target: choose one of "
                                             "accuracy, macro-f1, micro-f1, hamming-loss, log-loss"):
        compare(sets, select_by="class-error")
    assert cross_validate(head, sets, 3) == pytest.approx(expected, abs=1e-6)


def test_heads_and_options_that_do_not_fit_sets_are_refused_and_a_linear_head_pins_every_threshold(tmp_path):
    sets = sets_cache(tmp_path, rows=(12, 6, 6))
    with pytest.raises(FeatcacheError, match="logreg does not learn a multilabel target; heads for multilabel: "
                                             "dense256, dense1024, linear"):
        fit_head(sets, "logreg")
    with pytest.raises(FeatcacheError, match="multi-label target: each class is decided by its own threshold"):
        fit_head(sets, "linear", FitOptions(class_weight="balanced"))
    pinned = fit_head(sets, "linear", FitOptions(epochs=1, threshold=0.3))
    assert pinned.threshold == [0.3, 0.3, 0.3]


def test_predictions_of_sets_name_the_classes_that_reach_their_thresholds():
    predictions = Predictions(list(CLASSES), [Path("a.png"), Path("b.png")],
                              np.array([[0.9, 0.2, 0.35], [0.1, 0.1, 0.1]]), threshold=[0.5, 0.5, 0.3])
    assert predictions.rows()[0] == {"path": "a.png", "classes": ["cat", "sky"],
                                     "probabilities": {"cat": 0.9, "dog": 0.2, "sky": 0.35}}
    assert predictions.rows()[1]["classes"] == []
    assert format_predictions(predictions, "csv").splitlines()[:2] == [
        "path,classes,p_cat,p_dog,p_sky", "a.png,cat;sky,0.900000,0.200000,0.350000"]
    assert "cat (90.0%), sky (35.0%)" in format_predictions(predictions, "table")


def test_extract_fit_predict_and_the_export_card_of_a_multilabel_target_from_the_command_line(tmp_path):
    from featcache.model import model_card

    cells = ["cat;dog", "sky", "cat", "dog;sky", ";", "cat;sky"] * 4
    csv_path = multilabel_csv(tmp_path / "d", cells)
    workdir = tmp_path / "out"
    run = cli_in(workdir)
    run("extract", "--data", csv_path, "--task", "multilabel", "--label-column", "tags", "--weights", "none",
        "--image-size", "32", "--dtype", "float32")
    sets = cache.open_cache(workdir)
    assert sets.task == "multilabel" and sets.read("train")[1].shape[1] == 3
    assert "exact-match accuracy" in run("fit-head", "--head", "linear", "--epochs", "3")
    rows = json.loads(run("predict", tmp_path / "d" / "img03.png", "--format", "json"))
    head = load_head(head_dir(sets, "linear"))
    cached = next(x[[paths.index("img03.png")]] for x, _, paths in map(sets.read, sets.splits)
                  if "img03.png" in paths)
    p = head.predict_proba(cached)[0]
    assert rows[0]["probabilities"] == pytest.approx(dict(zip(CLASSES, p, strict=True)), rel=1e-4)
    assert rows[0]["classes"] == [c for c, v, t in zip(CLASSES, p, head.threshold, strict=True) if v >= t]
    card = model_card(sets, head, [], "test")
    assert card["task"] == "multilabel" and card["decision"]["thresholds"] == dict(zip(CLASSES, head.threshold,
                                                                                          strict=True))
    assert "hamming" in run("compare", "--format", "json")


def test_a_linear_head_learns_sets_streamed_from_the_shards_over_the_memory_budget(tmp_path):
    sets = sets_cache(tmp_path, rows=(200, 40, 40))
    head = fit_head(sets, "linear", FitOptions(epochs=10, learning_rate=1e-2), memory_budget=8 * 2**10)
    assert head.record["memory"]["path"] == "streamed" and head.predicts_sets
    test = predict_split(head, sets, "test")
    assert test.predicted.shape == (40, 3) and f1_score(test.labels, test.predicted, average="micro") > 0.8
