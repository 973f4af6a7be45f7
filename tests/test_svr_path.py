"""The svr head's search against scikit-learn's SVR(kernel="rbf"): every scaling, gamma and C with its
validation RMSE, the choice, pinned folds, a constant target, what the record and the progress lines say,
and refusals."""

from __future__ import annotations

import re

import numpy as np
import pytest
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.svm import SVR

from featcache import FeatcacheError
from featcache.heads import FitOptions, fit_and_save, head_dir, load_head
from featcache.heads.kernel import CS, GAMMAS
from featcache.heads.scaling import CHOICES, Scaling
from featcache.heads.svr import EPSILON, SvrHead
from tests.conftest import plant_pickle, value_cache


def rows(seed=0, n=(40, 16)):
    """Numbers from a smooth function of 6 features of unequal scales (a noise feature 50 times the others),
    offset 50: standardised features win."""
    rng = np.random.default_rng(seed)
    x, xv = (rng.normal(0, 1, (count, 6)).astype(np.float32) for count in n)
    x[:, 0] *= 50
    xv[:, 0] *= 50
    return x, 50 + np.sin(x[:, 1]) * 3 + x[:, 2], xv, 50 + np.sin(xv[:, 1]) * 3 + xv[:, 2]


def reference_search(x, y, xv, yv):
    """{key as the head records it: (fitted SVR, validation RMSE, scaling)} over every scaling, gamma
    (relative to the mean squared distance between training rows) and C, on the standardised target."""
    mean, std = y.mean(), y.std()
    found = {}
    for kind in CHOICES:
        scaling = Scaling.fit(kind, x)
        xs, xvs = scaling.apply(x).astype(np.float64), scaling.apply(xv).astype(np.float64)
        mean_d2 = np.mean(euclidean_distances(xs, squared=True))
        for t in GAMMAS:
            for c in CS:
                svr = SVR(kernel="rbf", gamma=t / mean_d2, C=c, epsilon=EPSILON).fit(xs, (y - mean) / std)
                rmse = float(np.sqrt(np.mean((svr.predict(xvs) * std + mean - yv) ** 2)))
                found[f"{kind} gamma={t / mean_d2:.3g} C={c:g}"] = svr, rmse, scaling
    return found


def test_svr_searches_every_scaling_gamma_and_c_as_scikit_learn_and_keeps_the_lowest_rmse():
    x, y, xv, yv = rows()
    lines = []
    head = SvrHead("svr", FitOptions()).fit(x, y, n_classes=0, validation=(xv, yv), say=lines.append)
    reference = reference_search(x, y, xv, yv)
    assert head.record["validation_rmse"] == pytest.approx({key: rmse for key, (_, rmse, _) in reference.items()},
                                                           rel=2e-3)  # libsvm's tolerance
    best = min(reference, key=lambda key: reference[key][1])
    svr, rmse, scaling = reference[best]
    chosen = head.record["chosen"]
    assert f"{chosen['scaling']} gamma={chosen['gamma']:.3g} C={chosen['C']:g}" == best
    assert best not in (next(iter(reference)), list(reference)[-1])  # the data's point: neither end of the search
    np.testing.assert_allclose(head.predict_values(xv), svr.predict(scaling.apply(xv)) * y.std() + y.mean(),
                               atol=2e-3 * y.std())
    assert head.record["output"] == "value" and head.record["support_vectors"] == len(svr.support_)
    for line, kind in zip(lines, CHOICES, strict=True):
        errors = [value for key, value in head.record["validation_rmse"].items() if key.startswith(f"{kind} ")]
        assert re.fullmatch(rf"svr {kind}: best val RMSE {min(errors):.4g} \((\d+\.\d) s\)", line), line
        assert float(line.split("(")[1].split()[0]) < 60


def test_a_fold_refits_at_the_pinned_choice_without_validation():
    x, y, xv, yv = rows()
    head = SvrHead("svr", FitOptions()).fit(x, y, n_classes=0, validation=(xv, yv))
    fold = head.for_fold()
    assert (fold.name, fold.options, fold.choices) == ("svr", head.options, head.record["chosen"])
    lines = []
    fold.fit(x[:30], y[:30], n_classes=0, say=lines.append)
    chosen = head.record["chosen"]
    scaling = Scaling.fit(chosen["scaling"], x[:30])
    target = y[:30]
    svr = SVR(kernel="rbf", gamma=chosen["gamma"], C=chosen["C"], epsilon=EPSILON).fit(
        scaling.apply(x[:30]), (target - target.mean()) / target.std())
    np.testing.assert_allclose(fold.predict_values(xv), svr.predict(scaling.apply(xv)) * target.std() + target.mean(),
                               atol=2e-3 * target.std())
    assert fold.record["chosen"] == chosen and fold.record["validation_rmse"] == {}
    assert lines == [f"svr {chosen['scaling']}: gamma {chosen['gamma']:.3g}, C {chosen['C']:g} (0.0 s)"]


def test_a_constant_target_is_predicted_as_that_constant():
    x, _, xv, _ = rows()
    head = SvrHead("svr", FitOptions(scaling="standard")).fit(x, np.full(len(x), 7.0), n_classes=0,
                                                              validation=(xv, np.full(len(xv), 7.0)))
    np.testing.assert_allclose(head.predict_values(xv), 7.0)


def test_svr_refuses_choosing_without_validation_probabilities_export_and_a_planted_pickle(tmp_path):
    x, y, _, _ = rows()
    with pytest.raises(FeatcacheError) as refusal:
        SvrHead("svr", FitOptions(scaling="standard")).fit(x, y, n_classes=0)
    assert str(refusal.value) == "svr: choosing scaling, gamma and C needs validation rows"
    numbers, _ = value_cache(tmp_path / "v", rows=(24, 8, 8))
    head, _ = fit_and_save(numbers, "svr")
    with pytest.raises(FeatcacheError) as refusal:
        head.predict_proba(numbers.read("test")[0])
    assert str(refusal.value) == "svr predicts numbers, not class probabilities"
    with pytest.raises(FeatcacheError) as refusal:
        head.to_keras(numbers.feature_shape)
    assert str(refusal.value) == ("svr: an RBF kernel has no exact Keras layer equivalent; export ridge or a Keras "
                                  "head instead, or use `featcache predict`, which runs any head")
    marker = plant_pickle(head_dir(numbers, "svr"), tmp_path / "ran")
    with pytest.raises(FeatcacheError, match="cannot be read as data"):
        load_head(head_dir(numbers, "svr"))
    assert not marker.exists()
