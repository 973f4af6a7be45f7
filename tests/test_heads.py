"""Heads on the cache: every head learns a separable cache, none learns shuffled labels,
save/load is exact and safe, and a head refuses a cache it was not fitted on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import FeatcacheError
from featcache.cli import main
from featcache.evaluate import cross_validate, evaluate, predict_split
from featcache.heads import C_GRIDS, HEADS, FitOptions, fit_head, head_dir, load_head
from tests.conftest import synthetic_cache

QUICK = FitOptions(epochs=40, batch_size=16, learning_rate=1e-2, optimizer="adam", seed=0, patience=8)


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_learns_a_separable_cache(name, tmp_path):
    cache = synthetic_cache(tmp_path)
    metrics = evaluate(fit_head(cache, name, QUICK), cache)
    assert metrics["validation"]["accuracy"] >= 0.9 and metrics["test"]["accuracy"] >= 0.9


@pytest.mark.parametrize("name", ["dense256", "logreg"])
def test_shuffled_labels_stay_near_chance(name, tmp_path):
    cache = synthetic_cache(tmp_path, per_class=(40, 20, 30), shuffle_labels=True)
    metrics = evaluate(fit_head(cache, name, QUICK), cache)
    assert metrics["test"]["accuracy"] < 0.72


def test_multiclass_softmax_probabilities(tmp_path):
    cache = synthetic_cache(tmp_path, classes=("x", "y", "z"))
    head = fit_head(cache, "dense256", QUICK)
    result = predict_split(head, cache, "test")
    assert result.probabilities.shape == (30, 3)
    np.testing.assert_allclose(result.probabilities.sum(axis=1), 1, rtol=1e-5)
    assert result.metrics(3)["accuracy"] >= 0.9 and len(result.metrics(3)["confusion"]) == 3


@pytest.mark.parametrize("name", ["dense256", "svm"])
def test_saved_head_loads_and_predicts_identically(name, tmp_path):
    cache = synthetic_cache(tmp_path)
    head = fit_head(cache, name, QUICK)
    folder = head.save(head_dir(cache, name))
    loaded = load_head(folder)
    x, _, _ = cache.read("test")
    np.testing.assert_allclose(loaded.predict_proba(x), head.predict_proba(x), rtol=1e-6, atol=1e-7)
    info = json.loads((folder / "head.json").read_text())
    assert info["cache_key"] == cache.key and info["seed"] == 0 and info["fit_seconds"] > 0


@pytest.mark.parametrize("name", ["dense256", "logreg"])
def test_tampered_head_file_is_refused(name, tmp_path):
    cache = synthetic_cache(tmp_path)
    folder = fit_head(cache, name, QUICK).save(head_dir(cache, name))
    model_file = next(p for p in folder.iterdir() if p.name.startswith("model."))
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    with pytest.raises(FeatcacheError, match="does not match the sha256 recorded"):
        load_head(folder)


def test_head_refuses_a_cache_it_was_not_fitted_on(tmp_path):
    a = synthetic_cache(tmp_path / "a", seed=1)
    b = synthetic_cache(tmp_path / "b", seed=2)
    head = fit_head(a, "logreg", QUICK)
    with pytest.raises(FeatcacheError, match="was fitted on cache .* fit it again"):
        predict_split(head, b, "test")


def test_sklearn_heads_choose_c_on_validation(tmp_path):
    head = fit_head(synthetic_cache(tmp_path), "logreg", QUICK)
    assert head.info["chosen"]["C"] in C_GRIDS["logreg"]
    assert len(head.info["validation_accuracy_by_C"]) == 5


def test_keras_head_records_history_and_parameter_counts(tmp_path):
    head = fit_head(synthetic_cache(tmp_path), "dense256", QUICK)
    assert set(head.info["history"]) >= {"loss", "val_loss", "accuracy", "val_accuracy"}
    assert head.info["trainable_params"] == 2 * 2 * 8 * 256 + 256 + 256 + 1


def test_class_weight_balanced_on_an_imbalanced_cache(tmp_path):
    cache = synthetic_cache(tmp_path, per_class=(30, 10, 10))
    options = FitOptions(**{**QUICK.__dict__, "class_weight": "balanced"})
    assert evaluate(fit_head(cache, "logreg", options), cache)["test"]["balanced_accuracy"] >= 0.9


def test_cross_validation_on_train(tmp_path):
    cache = synthetic_cache(tmp_path)
    for name in ("logreg", "dense256"):
        scores = cross_validate(fit_head(cache, name, QUICK), cache, folds=3)
        assert len(scores) == 3 and min(scores) >= 0.9


def test_fit_head_command_saves_heads_with_metrics(tmp_path):
    cache = synthetic_cache(tmp_path)
    result = CliRunner().invoke(main, ["fit-head", "--workdir", str(tmp_path), "--head", "logreg",
                                       "--head", "linear", "--learning-rate", "0.01", "--optimizer", "adam"])
    assert result.exit_code == 0, result.output
    assert "linear epoch 1/30: loss" in result.stderr and "logreg C=0.001: val accuracy" in result.stderr
    for name in ("logreg", "linear"):
        info = json.loads((head_dir(cache, name) / "head.json").read_text())
        assert info["metrics"]["test"]["accuracy"] >= 0.9
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
    metrics = evaluate(fit_head(cache, name, QUICK), cache)
    assert metrics["validation"]["accuracy"] >= 0.9 and metrics["test"]["accuracy"] >= 0.9
