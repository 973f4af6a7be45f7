"""A two-class head's decision threshold: chosen on validation or pinned, and carried into evaluation,
predict and export alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import balanced_accuracy_score

from featcache import FeatcacheError
from featcache.cli import main
from featcache.evaluate import cross_validate, evaluate, predict_split
from featcache.heads import FitOptions, fit_head
from featcache.heads.protocol import choose_threshold, decide
from featcache.predict import Predictions
from tests.conftest import make_split_folders, synthetic_cache


def brute_force_best(labels, positive) -> float:
    """The best balanced accuracy over every threshold that makes a different decision: one at each score,
    and one above them all (scikit-learn's score on each)."""
    grid = np.r_[np.unique(positive), np.nextafter(1.0, 2)]
    return max(balanced_accuracy_score(labels, positive >= t) for t in grid)


def test_the_threshold_with_the_best_balanced_accuracy_is_chosen_and_0_5_when_it_is_as_good():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(90, int), np.ones(10, int)]
    positive = np.clip(np.r_[rng.uniform(0, 0.3, 90), rng.uniform(0.2, 0.45, 10)], 0, 1)  # 0.5 finds none
    value, balanced, at_half = choose_threshold(labels, positive)
    assert at_half == 0.5 and value < 0.45
    assert balanced == pytest.approx(balanced_accuracy_score(labels, positive >= value))
    assert balanced == pytest.approx(brute_force_best(labels, positive)) and balanced > 0.8
    separated = np.r_[rng.uniform(0, 0.4, 90), rng.uniform(0.6, 1, 10)]
    assert choose_threshold(labels, separated) == (0.5, 1.0, 1.0)


def test_the_recorded_balanced_accuracy_is_what_the_chosen_threshold_gives_even_at_saturated_scores():
    """Scores of exactly 1.0 (a saturated float32 sigmoid) and worse-than-chance heads included."""
    rng = np.random.default_rng(1)
    cases = [(np.array([0, 0, 1, 1]), np.array([1.0, 1.0, 0.2, 0.3]))]
    for _ in range(100):
        labels = rng.integers(0, 2, 12)
        labels[:2] = (0, 1)
        cases.append((labels, np.round(rng.choice([rng.uniform(0, 1, 12), rng.integers(0, 2, 12) * 1.0]), 2)))
    for labels, positive in cases:
        value, balanced, _ = choose_threshold(labels, positive)
        assert balanced == pytest.approx(balanced_accuracy_score(labels, positive >= value)), (labels, positive)
        assert balanced == pytest.approx(brute_force_best(labels, positive), abs=1e-9)


def test_decide_reads_the_second_class_from_the_threshold_and_more_classes_by_the_most_probable():
    two = np.array([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]])
    assert decide(two).tolist() == [0, 1, 0] and decide(two, 0.25).tolist() == [1, 1, 1]
    three = np.array([[0.2, 0.5, 0.3]])
    assert decide(three, 0.9).tolist() == [1]
    rows = Predictions(["cat", "dog"], ["a.png", "b.png"], two[:2], threshold=0.25).rows()
    assert [(r["class"], r["probability"]) for r in rows] == [("dog", 0.3), ("dog", 0.6)]


def test_a_head_fitted_with_balanced_accuracy_decides_by_its_threshold_in_every_metric(tmp_path):
    cache = synthetic_cache(tmp_path, per_class=((60, 8), (60, 8), (60, 8)), shape=(8,), separation=1.5)
    plain = fit_head(cache, "logreg", FitOptions())
    tuned = fit_head(cache, "logreg", FitOptions(threshold="balanced-accuracy"))
    assert "threshold" not in plain.record and plain.threshold is None
    chosen = tuned.record["threshold"]
    assert chosen["chosen_by"] == "balanced accuracy on validation" and chosen["value"] != 0.5
    assert chosen["validation_balanced_accuracy"] > chosen["validation_balanced_accuracy_at_0.5"]
    validation = predict_split(tuned, cache, "validation")
    expected = (validation.outputs[:, 1] >= chosen["value"]).astype(int)
    np.testing.assert_array_equal(validation.predicted, expected)
    metrics = evaluate(tuned, cache)["validation"]
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(validation.labels, expected))
    x, _, _ = cache.read("test")
    np.testing.assert_array_equal(tuned.predict(x), decide(tuned.predict_proba(x), chosen["value"]))
    assert fit_head(cache, "logreg", FitOptions(threshold=0.3)).record["threshold"] == {
        "value": 0.3, "chosen_by": "--threshold"}
    assert "threshold" not in FitOptions().to_json()  # heads fitted before the option keep their options


def test_cross_validation_folds_decide_by_the_heads_threshold(tmp_path):
    """Each fold refits the recipe with every choice pinned, the decision threshold too."""
    from sklearn.model_selection import StratifiedGroupKFold

    cache = synthetic_cache(tmp_path, per_class=((60, 8), (60, 8), (60, 8)), shape=(8,), separation=1.5)
    pinned, plain = fit_head(cache, "logreg", FitOptions(threshold=0.05)), fit_head(cache, "logreg", FitOptions())
    x, labels, paths = cache.read("train")
    expected = []
    for train, held_out in StratifiedGroupKFold(3, shuffle=True, random_state=0).split(x, labels, groups=paths):
        fold = pinned.for_fold().fit(x[train], labels[train], n_classes=2)
        expected.append(float(((fold.predict_proba(x[held_out])[:, 1] >= 0.05) == labels[held_out]).mean()))
    assert cross_validate(pinned, cache, 3) == pytest.approx(expected)
    assert cross_validate(plain, cache, 3) != pytest.approx(expected)


@pytest.mark.parametrize("value", [1.5, 0, "youden"])
def test_a_threshold_outside_0_1_or_an_unknown_criterion_is_one_line(value):
    with pytest.raises(FeatcacheError, match="--threshold .*: a probability between 0 and 1, or balanced-accuracy"):
        FitOptions(threshold=value)


def test_a_pinned_threshold_is_carried_into_predict_and_the_exported_models_card(tmp_path):
    data = make_split_folders(tmp_path / "data", counts={"train": 4, "validation": 2, "test": 2})
    out = ["--workdir", str(tmp_path / "out")]

    def invoke(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    invoke("extract", "--data", data, "--weights", "none", "--image-size", "32", *out)
    invoke("fit-head", "--head", "logreg", "--threshold", "0.99", *out)
    rows = json.loads(invoke("predict", data / "test", "--head", "logreg", "--format", "json", *out).stdout)
    assert rows and all(r["class"] == ("dog" if r["probabilities"]["dog"] >= 0.99 else "cat") for r in rows)
    from featcache.cache import open_cache
    from featcache.heads import head_dir, load_head
    from featcache.predict import Predictor

    cache = open_cache(tmp_path / "out")
    predictor = Predictor(cache, load_head(head_dir(cache, "logreg")))
    assert predictor.predict([data / "test" / "cat" / "cat_000.png"], show_progress=False).threshold == 0.99
    from featcache.model import model_card  # what export writes beside the model (export itself: test_model)

    card = json.loads(json.dumps(model_card(cache, predictor.head, ["m.keras"], "3")))
    assert card["decision"] == {"rule": "dog where probabilities[:, 1] >= threshold, else cat", "threshold": 0.99}
    refused = CliRunner().invoke(main, ["fit-head", "--threshold", "2", *out])
    assert refused.exit_code == 2 and "give a probability between 0 and 1" in refused.output
