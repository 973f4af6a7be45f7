"""The ridge head's alpha path against scikit-learn's Ridge: every candidate's validation error, class
weights, offset and tiny features, the choice by rounded accuracy for ordered classes, pinned folds,
what the record, the progress lines and the stored arrays say."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.linear_model import Ridge

from featcache import FeatcacheError
from featcache.heads import FitOptions, fit_and_save, head_dir, load_head
from featcache.heads.protocol import class_weight_of
from featcache.heads.ridge import GRID, RidgeHead, soft_round
from featcache.heads.scaling import CHOICES, Scaling
from tests.conftest import plant_pickle, value_cache


def reference_path(kind, x, y, xv, yv, sample_weight=None):
    """scikit-learn's Ridge at each alpha of the grid (t x the weighted centred rows' mean squared norm,
    weights normalised to mean 1): {key as the head records it: (validation predictions, RMSE)}."""
    scaling = Scaling.fit(kind, x)
    rows, validation = scaling.apply(x).astype(np.float64), scaling.apply(xv).astype(np.float64)
    weight = np.ones(len(y)) if sample_weight is None else sample_weight / sample_weight.mean()
    centred = (rows - np.average(rows, axis=0, weights=weight)) * np.sqrt(weight)[:, None]
    mean_square = np.mean(np.sum(centred ** 2, axis=1))
    path = {}
    for t in GRID:
        predicted = Ridge(alpha=t * mean_square).fit(rows, y, sample_weight=weight).predict(validation)
        path[f"{kind} alpha={t * mean_square:.3g}"] = predicted, float(np.sqrt(np.mean((predicted - yv) ** 2)))
    return path


@pytest.mark.parametrize("rows", [30, 90])  # the dual solve (fewer rows than features), then the primal
def test_every_alpha_matches_scikit_learn_on_offset_features_of_a_tiny_scale(rows):
    """Unscaled features around 5e-4 (the rows' mean far from 0, their eigenvalues ~1e-7): the path
    centres validation rows by the training mean and floors nothing at the rows' own scale."""
    rng = np.random.default_rng(rows)
    w = rng.normal(size=40)
    x, xv = ((1e-4 * rng.normal(5, 1, size=(n, 40))).astype(np.float32) for n in (rows, 25))
    y, yv = 1e4 * x @ w + rng.normal(0, 2, rows), 1e4 * xv @ w
    lines = []
    head = RidgeHead("ridge", FitOptions(scaling="none")).fit(x, y, n_classes=0, validation=(xv, yv),
                                                              say=lines.append)
    reference = reference_path("none", x, y, xv, yv)
    assert head.record["validation_rmse"].keys() == reference.keys()
    for key, (_, rmse) in reference.items():
        assert head.record["validation_rmse"][key] == pytest.approx(rmse, rel=1e-4), key
    best = min(reference, key=lambda key: reference[key][1])
    assert f"none alpha={head.record['chosen']['alpha']:.3g}" == best and head.record["chosen"]["scaling"] == "none"
    np.testing.assert_allclose(head.predict_values(xv), reference[best][0], rtol=1e-4,
                               atol=1e-4 * np.abs(yv).max())
    (line,) = lines
    said = f"ridge none: best val RMSE {reference[best][1]:.4g}, alpha {head.record['chosen']['alpha']:.3g}"
    assert re.fullmatch(rf"{said} \((\d+\.\d) s\)", line) and float(line.split("(")[1].split()[0]) < 60


def ordinal_rows(seed=134):
    """Four ordered classes along one direction, classes 0-3 imbalanced 50/25/15/10% in training, one feature
    100 times the others' scale. With balanced class weights, seed 134's most accurate candidate (l2) is
    neither the first scaling tried nor the lowest-RMSE one, ties on accuracy with a candidate of higher
    RMSE, and the unweighted fit chooses another."""
    rng = np.random.default_rng(seed)
    direction = rng.normal(size=12)
    y, yv = rng.choice(4, 30, p=[0.5, 0.25, 0.15, 0.1]), rng.integers(0, 4, 20)
    x, xv = ((labels[:, None] * direction + rng.normal(0, 1.5, (len(labels), 12))).astype(np.float32)
             for labels in (y, yv))
    x[:, 0] *= 100
    xv[:, 0] *= 100
    return x, y, xv, yv


def test_ordered_classes_choose_the_most_accurate_rounded_class_with_class_weights_over_every_scaling():
    x, y, xv, yv = ordinal_rows()
    weights = class_weight_of(y, 4, "balanced")
    reference = {}
    for kind in CHOICES:
        reference |= reference_path(kind, x, y, xv, yv, np.array([weights[label] for label in y]))
    lines = []
    head = RidgeHead("ridge", FitOptions(class_weight="balanced")).fit(x, y, n_classes=4, validation=(xv, yv),
                                                                      say=lines.append)
    assert head.record["validation_rmse"] == pytest.approx({key: rmse for key, (_, rmse) in reference.items()},
                                                           rel=1e-5)

    def accuracy(key):
        return float(np.mean(soft_round(reference[key][0], 4).argmax(axis=1) == yv))

    best = max(reference, key=lambda key: (accuracy(key), -reference[key][1]))
    chosen = head.record["chosen"]
    assert f"{chosen['scaling']} alpha={chosen['alpha']:.3g}" == best
    assert best.startswith("l2") and best != min(reference, key=lambda key: reference[key][1])  # the data's point
    assert best != max(reference, key=lambda key: (accuracy(key), reference[key][1]))  # a tie that RMSE breaks
    np.testing.assert_allclose(head.predict_proba(xv), soft_round(reference[best][0], 4), atol=1e-4)
    unweighted = RidgeHead("ridge", FitOptions()).fit(x, y, n_classes=4, validation=(xv, yv))
    assert unweighted.record["chosen"] != chosen
    assert [line.split(":")[0] for line in lines] == [f"ridge {kind}" for kind in CHOICES]
    assert head.record["output"] == "ordinal" and head.record["trainable_params"] == 12 + 1
    model = head.model
    assert model.weights.shape == (12, 1) and model.weights.dtype == model.bias.dtype == np.float32
    assert head.predict_values(xv).dtype == np.float64


@pytest.mark.parametrize("n_classes, class_weight", [(0, None), (4, "balanced")])
def test_a_fold_refits_at_the_pinned_scaling_and_alpha_without_validation(n_classes, class_weight):
    x, y, xv, yv = ordinal_rows()
    head = RidgeHead("ridge", FitOptions(class_weight=class_weight)).fit(x, y, n_classes=n_classes,
                                                                        validation=(xv, yv))
    fold = head.for_fold()
    assert (fold.name, fold.options, fold.choices) == ("ridge", head.options, head.record["chosen"])
    lines = []
    fold.fit(x[:20], y[:20], n_classes=n_classes, say=lines.append)
    chosen = head.record["chosen"]
    scaling = Scaling.fit(chosen["scaling"], x[:20])
    weights = class_weight_of(y[:20], n_classes, class_weight)
    weight = None if weights is None else np.array([weights[label] for label in y[:20]])
    weight = None if weight is None else weight / weight.mean()
    expected = Ridge(alpha=chosen["alpha"]).fit(scaling.apply(x[:20]), y[:20], sample_weight=weight)
    np.testing.assert_allclose(fold.predict_values(xv), expected.predict(scaling.apply(xv)), rtol=1e-4, atol=1e-4)
    assert fold.record["chosen"] == chosen and fold.record["validation_rmse"] == {}
    assert lines == [f"ridge {chosen['scaling']}: alpha {chosen['alpha']:.3g} (0.0 s)"]


def test_choosing_without_validation_and_probabilities_of_numbers_are_refused_in_one_line():
    x, y, _, _ = ordinal_rows()
    for scaling in ("auto", "standard"):
        with pytest.raises(FeatcacheError) as refusal:
            RidgeHead("ridge", FitOptions(scaling=scaling)).fit(x, y, n_classes=0)
        assert str(refusal.value) == "ridge: choosing scaling and alpha needs validation rows"
    numbers = RidgeHead("ridge", FitOptions()).fit(x, y, n_classes=0, validation=(x, y))
    with pytest.raises(FeatcacheError) as refusal:
        numbers.predict_proba(x)
    assert str(refusal.value) == "ridge predicts numbers on this regression cache, not class probabilities"


def test_a_saved_ridge_exports_under_its_name_and_refuses_a_planted_pickle(tmp_path):
    numbers, _ = value_cache(tmp_path / "v")
    head, _ = fit_and_save(numbers, "ridge")
    assert head.to_keras(numbers.feature_shape).name == "head_ridge"
    marker = plant_pickle(head_dir(numbers, "ridge"), tmp_path / "ran")
    with pytest.raises(FeatcacheError, match="cannot be read as data"):
        load_head(head_dir(numbers, "ridge"))
    assert not marker.exists()
