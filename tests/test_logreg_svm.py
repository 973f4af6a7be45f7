"""logreg and svm in parts: the span basis on its primal path, the kernel SVM's estimator form, Platt's
calibration folds, the primal SVM's solver, pinned choices without validation, the record, and what a
saved head keeps. (Named without "linear": the mutation-testing selection deselects the Keras `linear`
head's tests by that word.)"""

from __future__ import annotations

import re

import numpy as np
import pytest

from featcache import FeatcacheError
from featcache.heads import FitOptions, fit_head, head_dir, load_head
from featcache.heads import linear as linear_heads
from featcache.heads.linear import SVM_ITERATIONS, KernelOvrSvm, LinearHead, SpanBasis, calibration_folds
from tests.conftest import synthetic_cache


def test_span_basis_with_rows_not_fewer_than_features_is_the_centred_rows():
    rng = np.random.default_rng(1)
    x, xv = (rng.random((n, 6)).astype(np.float32) * 10 for n in (30, 4))
    basis = SpanBasis(x)
    assert basis.factor is None and basis.offset == 0.0
    np.testing.assert_allclose(basis.z, x - x.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(basis.project(xv), xv - x.mean(axis=0), atol=1e-5)
    coef, intercept = rng.standard_normal((3, 6)), rng.standard_normal(3)
    weights, bias = basis.weights_and_bias(coef, intercept)
    np.testing.assert_allclose(xv @ weights + bias, basis.project(xv) @ coef.T + intercept, atol=1e-4)


def test_kernel_svm_is_svc_per_class_on_the_gram_matrix_with_weights_and_pairwise_tags():
    """One SVC per class on the precomputed Gram matrix, sample weights passed to each (they change
    the fit), and the tags that make CalibratedClassifierCV split the matrix by rows and columns."""
    from sklearn.base import clone
    from sklearn.svm import SVC

    rng = np.random.default_rng(2)
    x, y, weights = rng.standard_normal((40, 5)), rng.integers(0, 3, 40), rng.uniform(0.2, 3, 40)
    gram = x @ x.T
    svm = KernelOvrSvm(C=0.5).fit(gram, y, sample_weight=weights)
    for k, column in enumerate(svm.decision_function(gram).T):
        expected = SVC(kernel="precomputed", C=0.5).fit(gram, y == k, sample_weight=weights)
        np.testing.assert_allclose(column, expected.decision_function(gram), atol=1e-6)
    assert np.abs(KernelOvrSvm(C=0.5).fit(gram, y).decision_function(gram) - svm.decision_function(gram)).max() > 0.01
    tags = svm.__sklearn_tags__()
    assert tags.input_tags.pairwise and tags.estimator_type == "classifier" and tags.target_tags.required is True
    assert tags.classifier_tags is not None
    assert KernelOvrSvm().get_params() == {"C": 1.0} and clone(svm).C == 0.5 and clone(svm).set_params(C=2).C == 2
    assert clone(svm).set_params().C == 0.5  # set_params without C keeps it


def test_calibration_folds_are_three_or_the_smallest_class_and_refuse_a_class_of_one():
    assert calibration_folds(np.array([0] * 5 + [1] * 9), 2, "svm") == 3
    assert calibration_folds(np.array([0] * 2 + [1] * 9), 2, "svm") == 2
    with pytest.raises(FeatcacheError, match=r"^svm calibrates .*a class has 1 training row"):
        calibration_folds(np.array([0] * 5 + [1]), 2, "svm")
    with pytest.raises(FeatcacheError, match="a class has 0 training row"):  # the third class has none
        calibration_folds(np.array([0] * 5 + [1] * 5), 3, "svm")


def blobs(rows: int, features: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(rows) % 2
    return (rng.standard_normal((rows, features)) + 2 * y[:, None]).astype(np.float32), y


def test_an_svm_with_a_class_of_one_training_row_says_so_by_name():
    x, y = blobs(11, 4)
    y[:] = 0
    y[-1] = 1
    with pytest.raises(FeatcacheError, match="^svm calibrates its probabilities"):
        LinearHead("svm", FitOptions(), loss="hinge").fit(x, y, n_classes=2, validation=blobs(6, 4, seed=1))


def test_over_the_gram_limit_the_svm_solves_the_primal_at_c_with_its_iteration_cap_and_seed(monkeypatch):
    """Over KERNEL_SVM_ROWS training rows (with fewer features than rows) the svm is LinearSVC."""
    svm = LinearHead("svm", FitOptions(seed=7), loss="hinge")._svm(0.25, kernel=False)
    assert type(svm).__name__ == "LinearSVC"
    assert {k: svm.get_params()[k] for k in ("C", "dual", "max_iter", "random_state")} == {
        "C": 0.25, "dual": "auto", "max_iter": SVM_ITERATIONS, "random_state": 7}
    assert type(LinearHead("svm", FitOptions(), loss="hinge")._svm(0.25, kernel=True)) is KernelOvrSvm
    monkeypatch.setattr(linear_heads, "KERNEL_SVM_ROWS", 10)
    head = LinearHead("svm", FitOptions(), loss="hinge").fit(*blobs(40, 4), n_classes=2, validation=blobs(20, 4, 1))
    assert head.record["solver"] == "primal"
    x, y = blobs(20, 4, seed=2)
    assert (head.predict_proba(x).argmax(axis=1) == y).mean() >= 0.8

    def solver(rows, features):
        return LinearHead("svm", FitOptions(), loss="hinge").fit(
            *blobs(rows, features), n_classes=2, validation=blobs(10, features, 1)).record["solver"]

    assert solver(12, 12) == "primal"  # as many rows as features, over KERNEL_SVM_ROWS
    assert solver(12, 13) == "kernel"  # fewer rows than features
    monkeypatch.setattr(linear_heads, "KERNEL_SVM_ROWS", 40)
    assert solver(40, 4) == "kernel" and solver(41, 4) == "primal"


def test_svm_fits_are_reproducible_calibration_folds_included(tmp_path):
    """Platt's folds are shuffled with the head's seed: the same seed, the same probabilities."""
    cache = synthetic_cache(tmp_path, shape=(8,), separation=1.0)
    x, _, _ = cache.read("test")
    first, second = (fit_head(cache, "svm", FitOptions(seed=3)).predict_proba(x) for _ in range(2))
    np.testing.assert_array_equal(first, second)


def test_a_fold_head_fits_its_pinned_scaling_and_c_without_validation(tmp_path):
    """``for_fold`` pins what validation chose; fitted without validation rows it keeps that choice.
    A head that still has to choose refuses to fit without them, in one line."""
    cache = synthetic_cache(tmp_path, shape=(8,), separation=1.5)
    head = fit_head(cache, "logreg")
    x, y, _ = cache.read("train")
    xt, _, _ = cache.read("test")
    fold = head.for_fold().fit(x, y, n_classes=2)
    assert fold.record["chosen"] == head.record["chosen"]
    np.testing.assert_allclose(fold.predict_proba(xt), head.predict_proba(xt), atol=2e-3)
    for options in (FitOptions(), FitOptions(scaling="standard")):
        with pytest.raises(FeatcacheError, match="^logreg: choosing scaling and C needs validation rows$"):
            LinearHead("logreg", options, loss="log_loss").fit(x, y, n_classes=2)


def test_the_record_names_the_solver_and_each_scaling_reports_its_path(tmp_path):
    lines = []
    wide = synthetic_cache(tmp_path / "wide", shape=(64,), per_class=(12, 6, 6))  # 24 rows, 64 features
    record = fit_head(wide, "logreg", say=lines.append).record
    assert record["solver"] == "span" and record["output"] == "proba"
    assert fit_head(wide, "svm").record["solver"] == "kernel"
    assert fit_head(synthetic_cache(tmp_path / "narrow", shape=(4,)), "logreg").record["solver"] == "primal"
    for kind in ("standard", "l2", "rms"):
        (line,) = [line for line in lines if line.startswith(f"logreg {kind}: ")]
        match = re.fullmatch(rf"logreg {kind}: val accuracy (\d+\.\d%, ){{4}}\d+\.\d% \((\d+\.\d) s\)", line)
        assert match and float(match[2]) < 600, line


def test_a_streamed_head_keeps_its_scaling_and_its_fold_the_pinned_c_on_the_rows_given(tmp_path):
    """Over the memory budget: a pinned scaling is kept (only "auto" becomes standard, for SGD), the
    record says what was chosen; its fold trains on the given rows only, at the pinned C."""
    from featcache.heads import memory_plan
    from featcache.streaming import in_memory_bytes

    cache = synthetic_cache(tmp_path, shape=(8,), separation=1.5)
    budget = in_memory_bytes(cache) - 1
    head = fit_head(cache, "logreg", FitOptions(scaling="l2"), memory_budget=budget)
    assert head.record["memory"]["path"] == "streamed" and head.record["output"] == "proba"
    assert head.record["chosen"]["scaling"] == "l2" and head.record["chosen"]["C"] > 0
    assert fit_head(cache, "logreg", FitOptions(), memory_budget=budget).record["chosen"]["scaling"] == "standard"
    fold = head.for_fold()
    assert fold.name == "logreg"
    _, plan = memory_plan(cache, "logreg", fold.options, budget)
    _, y, _ = cache.read("train")
    xt, _, _ = cache.read("test")
    half = np.arange(len(y)) % 2 == 0
    on_half = fold.fit_streamed(cache, plan, rows=half)
    assert on_half.record["chosen"]["scaling"] == "l2" and on_half.record["chosen"]["C"] == head.record["chosen"]["C"]
    on_all = head.for_fold().fit_streamed(cache, plan, rows=np.ones(len(y), bool))
    assert np.abs(on_half.predict_proba(xt) - on_all.predict_proba(xt)).max() > 1e-3


@pytest.mark.parametrize(("name", "loss"), [("logreg", "log_loss"), ("svm", "hinge")])
def test_a_saved_head_loads_with_its_name_options_and_loss(name, loss, tmp_path):
    cache = synthetic_cache(tmp_path, shape=(8,))
    options = FitOptions(seed=4)
    folder = fit_head(cache, name, options).save(head_dir(cache, name))
    loaded = load_head(folder)
    assert (loaded.name, loaded.loss, loaded.options) == (name, loss, options)
    assert loaded.to_keras(cache.feature_shape).name == f"head_{name}"


def test_a_heads_arrays_are_read_without_pickle(tmp_path):
    head = LinearHead("logreg", FitOptions(), loss="log_loss")
    head.record.update(scaling="none", link="softmax")
    np.savez(tmp_path / "model.npz", weights=np.array([object()], dtype=object), bias=np.zeros(1))
    with pytest.raises(ValueError, match="allow_pickle"):
        head._read(tmp_path)


@pytest.mark.parametrize("failures", [1, 2, 3])
def test_span_basis_tries_each_jitter_alone_and_else_keeps_the_centred_rows(failures, monkeypatch):
    """When a factorisation fails, the next jitter replaces the last one on the diagonal (never their
    sum); when every one fails, the basis is the centred rows themselves. Small features: the offset
    is the mean diagonal over n, however small."""
    import scipy.linalg

    real, tried = scipy.linalg.cholesky, []

    def failing(matrix, **options):
        tried.append(matrix.copy())
        if len(tried) <= failures:
            raise scipy.linalg.LinAlgError("not positive definite")
        return real(matrix, **options)

    monkeypatch.setattr(scipy.linalg, "cholesky", failing)
    x = np.random.default_rng(3).standard_normal((20, 50)).astype(np.float32) * 0.01
    basis = SpanBasis(x)
    centred = x - basis.mean
    gram = (centred @ centred.T).astype(np.float64)  # as the basis computes it, to the last bit
    scale = np.trace(gram) / 20
    jitters = (1e-6, 1e-5, 1e-3)
    if failures == len(jitters):
        assert basis.factor is None and basis.offset == 0.0
        np.testing.assert_allclose(basis.z, centred, atol=1e-7)
        return
    assert basis.offset == pytest.approx(scale / 20, rel=1e-5)
    for matrix, jitter in zip(tried, jitters, strict=False):
        np.testing.assert_allclose(matrix, gram + basis.offset + jitter * scale * np.eye(20), atol=1e-9 * scale)
    expected = gram + basis.offset + jitters[failures] * scale * np.eye(20)
    np.testing.assert_allclose(basis.z.astype(np.float64) @ basis.z.T, expected, atol=1e-5 * scale)


def test_platt_probabilities_of_several_columns_are_normalised_and_uniform_where_all_are_zero():
    from featcache.heads.linear import LinearModel
    from featcache.heads.scaling import Scaling

    model = LinearModel(Scaling("none"), np.eye(3, dtype=np.float32), np.zeros(3, np.float32), "platt",
                        np.array([[-1.0, -2.0, -1.0], [0.0, 0.5, 0.0]]))
    rows = np.array([[1, 0, 0], [0.5, 2, -1], [-1000, -1000, -1000]], np.float32)
    p = model.predict_proba(rows)
    from scipy.special import expit

    sigmoids = expit(-(np.array([-1.0, -2.0, -1.0]) * rows[:2] + np.array([0.0, 0.5, 0.0])))
    np.testing.assert_allclose(p[:2], sigmoids / sigmoids.sum(axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(p[2], [1 / 3] * 3)  # every sigmoid underflows to 0


@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_class_weights_reach_every_candidate_of_the_search(name, tmp_path):
    """On a 10:1 training split 'balanced' changes the validation scores of the search itself, not
    only the final fit."""
    cache = synthetic_cache(tmp_path, per_class=((60, 6), (20, 20), (10, 10)), shape=(8,), separation=1.0)
    scores = {weight: fit_head(cache, name, FitOptions(class_weight=weight, scaling="standard"))
              .record["validation_accuracy"] for weight in (None, "balanced")}
    assert scores[None] != scores["balanced"], scores


def test_logreg_scores_validation_rows_that_lack_a_class():
    x, y = blobs(60, 6)
    y[::3] = 2
    xv, yv = blobs(12, 6, seed=1)  # classes 0 and 1 only
    head = LinearHead("logreg", FitOptions(), loss="log_loss").fit(x, y, n_classes=3, validation=(xv, yv))
    assert head.predict_proba(xv).shape == (12, 3)


def test_logistic_regression_stops_at_the_iteration_cap_and_records_its_iterations(tmp_path, monkeypatch):
    """Each candidate runs at most LOGREG_ITERATIONS lbfgs iterations (scikit-learn's default), and
    head.json records the chosen candidate's count: 1 when the cap is 1, fewer than the cap when a
    small problem converges."""
    from featcache.heads import linear

    cache = synthetic_cache(tmp_path, shape=(8,), separation=1.5)
    record = fit_head(cache, "logreg").record
    assert 1 <= record["iterations"] < linear.LOGREG_ITERATIONS == 100
    monkeypatch.setattr(linear, "LOGREG_ITERATIONS", 1)
    assert fit_head(cache, "logreg", FitOptions(seed=1)).record["iterations"] == 1
    assert "iterations" not in fit_head(cache, "svm").record
