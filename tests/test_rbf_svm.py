"""svm-rbf in parts: its search is scikit-learn's SVC over every scaling, gamma and C (class weights
included), the stored model is the SVC at the chosen point, pinned choices refit without validation,
the calibration folds follow the seed, what the record and the progress lines say, and probabilities
when every Platt sigmoid underflows."""

from __future__ import annotations

import re

import numpy as np
import pytest

from featcache import FeatcacheError
from featcache.heads import FitOptions
from featcache.heads.kernel import CS, GAMMAS, RbfModel, RbfSvmHead, squared_distances
from featcache.heads.scaling import CHOICES, Scaling


def blobs(counts, seed=0, features=6, spread=1.3):
    """Rows of three overlapping Gaussian blobs, ``counts[k]`` of class k, and their labels."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1.0, (len(counts), features)) * spread
    y = np.repeat(np.arange(len(counts)), counts)
    x = centres[y] + rng.normal(size=(len(y), features))
    return (x * 3 + 5).astype(np.float32), y  # away from zero and unit scale: the scalings differ


def fit(options=None, counts=(30, 12, 12), lines=None):
    options = options or FitOptions()
    x, y = blobs(counts)
    validation = blobs((10, 10, 10), seed=1)
    head = RbfSvmHead("svm-rbf", options).fit(x, y, n_classes=3, validation=validation,
                                              say=None if lines is None else lines.append)
    return head, x, y, validation


def test_the_search_is_svc_at_every_scaling_gamma_and_c_with_class_weights():
    """Every candidate's validation accuracy is scikit-learn's SVC(kernel="rbf") at that point, with
    gamma relative to the scaled rows' mean squared distance and the balanced class weights of an
    imbalanced training split; the best one is chosen (the first of equals)."""
    from sklearn.svm import SVC
    from sklearn.utils.class_weight import compute_class_weight

    counts = (40, 8, 8)
    head, x, y, (xv, yv) = fit(FitOptions(class_weight="balanced"), counts)
    weights = dict(enumerate(compute_class_weight("balanced", classes=np.arange(3), y=y)))
    expected = {}
    for kind in CHOICES:
        scaling = Scaling.fit(kind, x)
        xs = scaling.apply(x)
        mean_d2 = squared_distances(xs, xs).mean()
        for t in GAMMAS:
            for c in CS:
                svc = SVC(kernel="rbf", gamma=t / mean_d2, C=c, class_weight=weights).fit(xs, y)
                accuracy = float((svc.predict(scaling.apply(xv)) == yv).mean())
                expected[f"{kind} gamma={t / mean_d2:.3g} C={c:g}"] = accuracy
    scores = head.record["validation_accuracy"]
    assert scores == pytest.approx(expected, abs=1e-9)
    unweighted = fit(FitOptions(), counts)[0].record["validation_accuracy"]
    assert unweighted != scores  # the weights change what validation sees
    best = max(scores, key=scores.get)
    chosen = head.record["chosen"]
    assert best == f"{chosen['scaling']} gamma={chosen['gamma']:.3g} C={chosen['C']:g}"


def test_the_stored_model_is_the_svc_at_the_chosen_point_and_the_record_says_so():
    from sklearn.svm import SVC

    head, x, y, (xv, yv) = fit()
    chosen = head.record["chosen"]
    scaling = Scaling.fit(chosen["scaling"], x)
    svc = SVC(kernel="rbf", gamma=chosen["gamma"], C=chosen["C"]).fit(scaling.apply(x), y)
    # distances in float32 against scikit-learn's float64: 2e-4 apart at most here
    np.testing.assert_allclose(head.model.decision(xv), svc.decision_function(scaling.apply(xv)), atol=2e-3)
    for pinned in ({"scaling": "standard", "gamma": 0.02, "C": 30.0}, {"scaling": "l2", "gamma": 3.0, "C": 0.3}):
        fixed = RbfSvmHead("svm-rbf", FitOptions(), choices=pinned).fit(x, y, n_classes=3)
        scaling = Scaling.fit(pinned["scaling"], x)
        reference = SVC(kernel="rbf", gamma=pinned["gamma"], C=pinned["C"]).fit(scaling.apply(x), y)
        np.testing.assert_allclose(fixed.model.decision(xv), reference.decision_function(scaling.apply(xv)),
                                   atol=2e-3)
    scaling = Scaling.fit(chosen["scaling"], x)
    xs = scaling.apply(x)
    relative = chosen["gamma"] * squared_distances(xs, xs).mean()  # one of GAMMAS, in units of 1 / mean d²
    assert min(abs(relative / t - 1) for t in GAMMAS) < 1e-6
    assert head.record["support_vectors"] == len(svc.support_) == len(head.model.support)
    assert head.record["output"] == "proba"
    assert head.record["validation_majority_rate"] == pytest.approx(10 / 30)
    assert head.predict_proba(xv).shape == (30, 3)


def test_a_fold_head_refits_the_pinned_scaling_gamma_and_c_without_validation():
    head, x, y, (xv, _) = fit(FitOptions(scaling="l2"))
    fold = head.for_fold()
    assert fold.choices == head.record["chosen"] and fold.record == {}
    fold.fit(x, y, n_classes=3)
    assert fold.record["chosen"] == head.record["chosen"] and fold.record["validation_accuracy"] == {}
    assert fold.record["validation_majority_rate"] is None
    np.testing.assert_allclose(fold.predict_proba(xv), head.predict_proba(xv), atol=1e-9)
    with pytest.raises(FeatcacheError, match="^svm-rbf: choosing scaling, gamma and C needs validation rows$"):
        RbfSvmHead("svm-rbf", FitOptions()).fit(x, y, n_classes=3)


def test_auto_tries_every_scaling_and_a_named_scaling_only_itself_each_with_one_line():
    lines = []
    head = fit(lines=lines)[0]
    assert {key.split()[0] for key in head.record["validation_accuracy"]} == set(CHOICES)
    assert len(head.record["validation_accuracy"]) == len(CHOICES) * len(GAMMAS) * len(CS)
    for kind, line in zip(CHOICES, lines, strict=True):
        best = max(v for k, v in head.record["validation_accuracy"].items() if k.startswith(kind + " "))
        match = re.fullmatch(rf"svm-rbf {kind}: best val accuracy (\d+\.\d)% \((\d+\.\d) s\)", line)
        assert match and float(match[1]) == pytest.approx(100 * best, abs=0.05) and float(match[2]) < 60, line
    lines.clear()
    head = fit(FitOptions(scaling="rms"), lines=lines)[0]
    assert {key.split()[0] for key in head.record["validation_accuracy"]} == {"rms"}
    assert head.record["chosen"]["scaling"] == "rms" and [line.split()[1] for line in lines] == ["rms:"]


def test_calibration_folds_follow_the_seed():
    _, _, _, (xv, _) = fit()
    first, again, other = (fit(FitOptions(seed=seed))[0].predict_proba(xv) for seed in (3, 3, 4))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_probabilities_are_uniform_when_every_sigmoid_underflows():
    """expit of a huge negative number is 0 for every class: the row gets 1/k each, not 0/0."""
    scaling = Scaling.fit("none", np.zeros((2, 2), np.float32))
    support = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]], np.float32)
    model = RbfModel(scaling, support, np.ones((2, 3)), np.zeros(3), np.array([1, 1, 1]), 0.5,
                     np.array([[0.0, 0.0, 0.0], [1e4, 1e4, 1e4]]))
    np.testing.assert_array_equal(model.predict_proba(np.zeros((2, 2), np.float32)), np.full((2, 3), 1 / 3))
    finite = RbfModel(scaling, support, np.ones((2, 3)), np.zeros(3), np.array([1, 1, 1]), 0.5,
                      np.array([[-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]))
    p = finite.predict_proba(np.array([[0.0, 0.0], [2.0, 0.0]], np.float32))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert not np.allclose(p, 1 / 3)
