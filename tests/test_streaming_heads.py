"""Heads within a memory budget: sizes parse, shards stream every row once in a bounded shuffle
buffer, logreg/svm over the budget learn by SGD and export to Keras, svm-rbf is refused, and the
peak RSS of a fit on a cache several times the budget stays near the budget."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from featcache import FeatcacheError
from featcache.cli import main
from featcache.dataset import Dataset, Sample
from featcache.evaluate import cross_validation_bytes, evaluate
from featcache.heads import FitOptions, fit_head, head_dir, load_head, memory_plan
from featcache.streaming import batches, format_size, in_memory_bytes, parse_size, split_batches
from tests.conftest import blob_cache, synthetic_cache, write_cache

MiB = 2**20
SGD = FitOptions(epochs=15, batch_size=16, seed=0, patience=5)
TINY_BUDGET = 16 * 2**10  # below in_memory_bytes of the default synthetic_cache (about 30 KiB)


def numbered_cache(workdir: Path, rows: int = 95, shard_size: int = 10, features: int = 6,
                   validation_classes: int = 2):
    """A two-class cache whose feature 0 is each row's number in its split, to follow rows."""
    samples = []
    for split, n, k in (("train", rows, 2), ("validation", 7, validation_classes)):
        for i in range(n):
            relpath = f"{split}/{'ab'[i % k]}/{i:05d}.png"
            sha = hashlib.sha256(relpath.encode()).hexdigest()
            samples.append(Sample(Path(relpath), relpath, i % k, split, sha))

    def features_of(plan):
        rows = np.zeros((len(plan.samples), features), np.float16)
        rows[:, 0] = [int(Path(s.relpath).stem) for s in plan.samples]
        return rows

    dataset = Dataset(workdir, "numbered", ("a", "b"), samples)
    return write_cache(workdir, dataset, (features,), "float16", 0, features_of, shard_size)


# --- sizes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [("512M", 512 * MiB), ("2G", 2 * 2**30), ("1.5GiB", int(1.5 * 2**30)),
                                        ("800000", 800000), ("64mb", 64 * MiB), (" 4 K ", 4096),
                                        ("none", None)])
def test_parse_size_reads_powers_of_1024(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, message", [("lots", "expected a size like 512M"), ("1.5X", "expected a size"),
                                           ("-1M", "expected a size"), ("0", "must be more than 0 bytes")])
def test_parse_size_errors_name_the_option_and_value(text, message):
    with pytest.raises(FeatcacheError, match=message) as error:
        parse_size(text)
    assert str(error.value).startswith(f"--memory-budget {text!r}: ") and "\n" not in str(error.value)


def test_format_size():
    assert [format_size(s) for s in (None, 100, 1536, 64 * MiB, 2**30)] == [
        "no limit", "100 B", "1.5 KiB", "64.0 MiB", "1.0 GiB"]


# --- streaming.batches ------------------------------------------------------------------------------

def epoch_rows(cache, batch_rows, buffer_rows, seed, epoch=0):
    got = list(batches(cache, "train", batch_rows, buffer_rows, np.random.default_rng([seed, epoch])))
    return [x[:, 0].astype(int) for x, _ in got], [y for _, y in got]


def test_shuffled_batches_yield_every_row_once_per_epoch_mixed_across_shards(tmp_path):
    cache = numbered_cache(tmp_path)
    first, labels = epoch_rows(cache, batch_rows=8, buffer_rows=24, seed=0)
    rows = np.concatenate(first)
    assert sorted(rows) == list(range(95))
    assert [len(b) for b in first] == [8] * 11 + [7]  # whole batches across shard boundaries, then the rest
    assert all(np.array_equal(y, b % 2) for y, b in zip(labels, first, strict=True))  # labels follow rows
    assert any(len(set(b // 10)) > 1 for b in first)  # a batch mixes rows of several shards
    assert not np.array_equal(rows, np.arange(95))
    second = np.concatenate(epoch_rows(cache, 8, 24, seed=0, epoch=1)[0])
    other_seed = np.concatenate(epoch_rows(cache, 8, 24, seed=1)[0])
    again = np.concatenate(epoch_rows(cache, 8, 24, seed=0)[0])
    assert sorted(second) == list(range(95)) and not np.array_equal(rows, second)
    assert not np.array_equal(rows, other_seed) and np.array_equal(rows, again)


def test_batches_in_order_are_whole_across_shards(tmp_path):
    cache = numbered_cache(tmp_path)
    got = [x for x, _ in batches(cache, "train", 8)]
    assert [len(x) for x in got] == [8] * 11 + [7] and got[0].dtype == np.float32
    assert np.array_equal(np.concatenate(got)[:, 0], np.arange(95))


def test_a_row_mask_keeps_exactly_its_rows_in_order_or_shuffled(tmp_path):
    cache = numbered_cache(tmp_path)
    kept = np.zeros(95, bool)
    kept[[0, 3, 9, 10, 11, 47, 48, 90, 94]] = True  # across shard boundaries, first and last rows
    ordered = np.concatenate([x[:, 0] for x, _ in batches(cache, "train", 4, rows=kept)]).astype(int)
    assert ordered.tolist() == np.flatnonzero(kept).tolist()
    shuffled = list(batches(cache, "train", 4, 8, np.random.default_rng(0), kept))
    assert [len(y) for _, y in shuffled] == [4, 4, 1]
    assert sorted(np.concatenate([x[:, 0] for x, _ in shuffled]).astype(int)) == np.flatnonzero(kept).tolist()
    assert all(np.array_equal(y, x[:, 0].astype(int) % 2) for x, y in shuffled)  # labels follow rows
    seen = [x.numpy()[:, 0] for x, _ in split_batches(cache, "train", 4, 0, buffer_rows=8, rows=kept)]
    assert len(seen) == 3 and sorted(np.concatenate(seen).astype(int)) == np.flatnonzero(kept).tolist()


def test_keras_pipeline_has_the_batches_it_announces(tmp_path):
    """TensorFlow is told ceil(rows / batch) batches; a validation pass must see every row, even when
    shards are not multiples of the batch."""
    cache = numbered_cache(tmp_path)
    for split, seed in (("train", 0), ("validation", None), ("train", None)):
        seen = [x.numpy()[:, 0] for x, _ in split_batches(cache, split, 4, seed, buffer_rows=12)]
        rows = cache.manifest["splits"][split]["rows"]
        assert len(seen) == math.ceil(rows / 4) and sorted(np.concatenate(seen)) == list(range(rows))


def test_shuffle_buffer_bounds_memory_whatever_the_shard_size(tmp_path):
    """numpy reports its allocations to tracemalloc: an epoch over 16 MiB in shards of 4 MiB holds the
    buffer (256 rows of 2 KiB) and a few float32 batches (64 rows of 4 KiB), never a shard."""
    cache = blob_cache(tmp_path, per_class=(4096, 8, 0), shape=(1024,), dtype="float16", shard_size=2048)
    tracemalloc.start()
    try:
        rows = sum(len(y) for _, y in batches(cache, "train", 64, 256, np.random.default_rng(0)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == 8192
    assert peak < 256 * 2048 + 3 * 64 * 4096 + 256 * 2**10, format_size(peak)


# --- logreg and svm by SGD over the budget ----------------------------------------------------------

@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_linear_heads_over_the_budget_stream_and_learn(name, tmp_path):
    cache = synthetic_cache(tmp_path)
    assert in_memory_bytes(cache) > TINY_BUDGET
    head = fit_head(cache, name, SGD, memory_budget=TINY_BUDGET)
    memory = head.record["memory"]
    assert memory["path"] == "streamed" and memory["estimator"].startswith("SGDClassifier")
    assert memory["budget_bytes"] == TINY_BUDGET and 0 < memory["batch_rows"] <= memory["buffer_rows"]
    assert evaluate(head, cache)["test"]["accuracy"] >= 0.9


def test_linear_heads_within_the_budget_stay_in_memory(tmp_path):
    cache = synthetic_cache(tmp_path)
    assert memory_plan(cache, "logreg", SGD, None)[0] == "in-memory"
    assert memory_plan(cache, "svm-rbf", SGD, 64 * MiB)[0] == "in-memory"
    assert memory_plan(cache, "svm", SGD, TINY_BUDGET)[0] == "streamed"


def test_streamed_logreg_stays_near_chance_on_shuffled_labels(tmp_path):
    cache = synthetic_cache(tmp_path, per_class=(40, 20, 30), shuffle_labels=True)
    head = fit_head(cache, "logreg", SGD, memory_budget=TINY_BUDGET)
    assert head.record["memory"]["path"] == "streamed"
    assert evaluate(head, cache)["test"]["accuracy"] < 0.72


def test_streamed_logreg_keeps_the_c_and_epoch_best_on_validation(tmp_path):
    cache = synthetic_cache(tmp_path, classes=("x", "y", "z"), per_class=(20, 10, 10), seed=3)
    head = fit_head(cache, "logreg", SGD, memory_budget=TINY_BUDGET)
    by_c = head.record["validation_accuracy"]
    chosen = head.record["chosen"]
    assert len(by_c) == 5 and all(key.startswith("standard C=") for key in by_c)
    first_best = next(key for key in by_c if by_c[key] == max(by_c.values()))  # ties: the smaller C
    assert first_best == f"standard C={chosen['C']:.3g}"
    assert chosen["alpha"] == pytest.approx(1 / (chosen["C"] * 60)) and 1 <= chosen["epoch"] <= SGD.epochs
    assert evaluate(head, cache)["validation"]["accuracy"] == pytest.approx(by_c[first_best])


def test_streamed_svm_calibrates_on_a_few_validation_rows(tmp_path):
    cache = synthetic_cache(tmp_path, per_class=(30, 3, 10))  # fewer rows per class than 5 folds
    head = fit_head(cache, "svm", SGD, memory_budget=TINY_BUDGET)
    assert head.record["memory"]["path"] == "streamed" and head.record["memory"]["calibration_rows"] == 6
    assert evaluate(head, cache)["test"]["accuracy"] >= 0.9


@pytest.mark.parametrize("kind", ["standard", "l2", "rms", "none"])
def test_streamed_c_grid_is_relative_to_each_scalings_mean_squared_row_norm(kind, tmp_path):
    """C = t / mean ‖centred scaled x‖², as in memory: standardised rows have one unit per varying feature
    (the numbered cache's five constant ones add nothing), rms and raw rows the sum of their features'
    variances, L2 rows are taken at their norm, 1; alpha = 1 / (C n_train), with n_train and the
    scaling's moments those of the rows a fold trains on."""
    from featcache.heads import memory_plan
    from featcache.heads.linear import GRID, SpanBasis
    from featcache.heads.scaling import Scaling
    from featcache.heads.sgd import fit_sgd

    cache = numbered_cache(tmp_path)
    x, y, _ = cache.read("train")
    mask = np.arange(len(y)) % 3 != 0
    rows = x.astype(np.float64)[mask]
    _, plan = memory_plan(cache, "logreg", SGD, 1024)
    options = FitOptions(epochs=1, batch_size=16, seed=0, patience=5)
    scaling, _, details = fit_sgd(cache, "logreg", "log_loss", kind, None, options, plan, lambda line: None, mask)
    centred = float(np.sum(rows.var(axis=0)))
    mean_square = {"standard": 1.0, "l2": 1.0, "rms": centred / np.mean(rows**2), "none": centred}[kind]
    assert list(details["validation_accuracy"]) == [f"{kind} C={t / mean_square:.3g}" for t in GRID]
    chosen = details["chosen"]
    assert chosen["alpha"] == pytest.approx(1 / (chosen["C"] * mask.sum()))
    reference = Scaling.fit(kind, rows.astype(np.float32))
    if kind != "l2":  # the in-memory heads' divisor (SpanBasis: centred scaled rows)
        assert SpanBasis(reference.apply(rows)).mean_square == pytest.approx(mean_square, rel=1e-4)
    for mine, theirs in ((scaling.mean, reference.mean), (scaling.scale, reference.scale)):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            np.testing.assert_allclose(mine, theirs, rtol=1e-5)


def test_streamed_svm_calibrates_on_a_seeded_sample_that_half_the_budget_holds_with_every_class(tmp_path):
    """80 validation rows, one of class b, and room for 32 (half of 16 KiB over two float32 copies of
    32-feature rows): the seed's first 32 rows, plus b's row where the sample missed it. The same seed
    calibrates on the same rows, another seed on others."""
    from featcache.streaming import split_labels

    cache = synthetic_cache(tmp_path, per_class=((30, 30), (79, 1), (10, 10)))
    y_val = split_labels(cache, "validation")
    room = TINY_BUDGET // 2 // (2 * 32 * 4)
    assert room == 32
    counts = {}
    for seed in range(6):
        order = np.random.default_rng(seed).permutation(len(y_val))
        counts[seed] = room + int(np.flatnonzero(y_val == 1)[0] not in order[:room])
    assert set(counts.values()) == {32, 33}  # seeds whose sample holds b's row, and seeds whose does not
    x, _, _ = cache.read("test")
    for seed, count in counts.items():
        head = fit_head(cache, "svm", FitOptions(epochs=2, batch_size=16, seed=seed), memory_budget=TINY_BUDGET)
        assert head.record["memory"]["calibration_rows"] == count
    first, again = (fit_head(cache, "svm", FitOptions(epochs=2, batch_size=16, seed=1), memory_budget=TINY_BUDGET)
                    for _ in range(2))
    np.testing.assert_array_equal(first.predict_proba(x), again.predict_proba(x))


def test_streamed_svm_needs_every_class_in_validation_before_training(tmp_path):
    cache = numbered_cache(tmp_path, validation_classes=1)
    with pytest.raises(FeatcacheError, match="validation split has no rows of class b, and a streamed svm"):
        fit_head(cache, "svm", SGD, memory_budget=1024, say=pytest.fail)
    three = synthetic_cache(tmp_path / "three", classes=("a", "b", "c"), per_class=((10, 10, 10), (5, 0, 0), 3))
    with pytest.raises(FeatcacheError, match="^the validation split has no rows of class b, c, and a streamed svm is "
                                             "calibrated on validation rows; fit logreg, or raise --memory-budget "
                                             "to fit svm in memory$"):
        fit_head(three, "svm", SGD, memory_budget=1024, say=pytest.fail)


def test_streamed_svm_calibrates_the_sgd_model_it_chose_not_a_new_one(tmp_path):
    """Platt's sigmoid wraps the frozen SGD svm: its scores are the chosen candidate's (an SVM fitted
    afresh on the validation rows would leak them into the model)."""
    from sklearn.linear_model import SGDClassifier

    from featcache.heads.sgd import fit_sgd

    cache = synthetic_cache(tmp_path, per_class=(30, 12, 10))
    head = fit_head(cache, "svm", SGD, memory_budget=TINY_BUDGET)
    assert head.record["solver"] == "SGDClassifier(hinge)"
    _, plan = memory_plan(cache, "svm", SGD, TINY_BUDGET)
    _, calibrated, _ = fit_sgd(cache, "svm", "hinge", "standard", None, SGD, plan, lambda line: None)
    (fold,) = calibrated.calibrated_classifiers_
    assert type(fold.estimator.estimator) is SGDClassifier
    np.testing.assert_allclose(head.model.weights[:, 0], fold.estimator.estimator.coef_[0], rtol=1e-6)


def test_rbf_svm_over_the_budget_is_refused_in_one_line(tmp_path):
    cache = synthetic_cache(tmp_path)
    refusal = ("svm-rbf cannot stream .* raise --memory-budget, or fit dense256, dense1024, linear, logreg or svm, "
               "which stream$")
    with pytest.raises(FeatcacheError, match=refusal) as err:
        fit_head(cache, "svm-rbf", SGD, memory_budget=TINY_BUDGET)
    assert "\n" not in str(err.value)


def test_keras_head_refuses_a_budget_below_its_batches(tmp_path):
    with pytest.raises(FeatcacheError, match="--memory-budget 1.0 KiB is too small: training batches of 16"):
        fit_head(synthetic_cache(tmp_path), "dense256", SGD, memory_budget=1024)


@pytest.mark.parametrize("name, classes", [("logreg", ("a", "b")), ("logreg", ("x", "y", "z")),
                                           ("svm", ("x", "y", "z"))])
def test_streamed_head_saves_loads_and_exports_to_keras(name, classes, tmp_path):
    cache = synthetic_cache(tmp_path, classes=classes, per_class=(20, 10, 10))
    head = fit_head(cache, name, SGD, memory_budget=TINY_BUDGET)
    loaded = load_head(head.save(head_dir(cache, name)))
    x, _, _ = cache.read("test")
    expected = head.predict_proba(x)
    np.testing.assert_array_equal(loaded.predict_proba(x), expected)
    assert loaded.record["memory"]["path"] == "streamed"
    exported = np.asarray(loaded.to_keras(x.shape[1:])(x), np.float64)
    np.testing.assert_allclose(exported, expected, atol=1e-5, rtol=0)


# --- fit-head --memory-budget -----------------------------------------------------------------------

def test_fit_head_memory_budget_option(tmp_path):
    cache = synthetic_cache(tmp_path)
    fit = ["fit-head", "--workdir", str(tmp_path), "--epochs", "5"]
    bad = CliRunner().invoke(main, [*fit, "--memory-budget", "lots"])
    assert bad.exit_code == 2
    assert "Invalid value for '--memory-budget': expected a size like 512M" in bad.output

    streamed = CliRunner().invoke(main, [*fit, "--head", "logreg", "--memory-budget", "16K"])
    assert streamed.exit_code == 0, streamed.output
    assert "memory budget: 16.0 KiB (--memory-budget)" in streamed.stderr
    assert "logreg epoch 1/5 (streamed SGD)" in streamed.stderr and "; streamed; fit" in streamed.stdout

    default = CliRunner().invoke(main, [*fit, "--head", "svm", "--refit"])
    assert default.exit_code == 0, default.output
    assert "(half of the memory available now)" in default.stderr and "; in-memory; fit" in default.stdout

    refused = CliRunner().invoke(main, [*fit, "--head", "svm", "--head", "svm-rbf", "--refit",
                                        "--memory-budget", "16K"])
    assert refused.exit_code == 1 and "Error: svm-rbf cannot stream" in refused.output
    assert json.loads((head_dir(cache, "svm") / "head.json").read_text())["memory"]["path"] == "in-memory"


# --- peak RSS ---------------------------------------------------------------------------------------

PEAK_RSS = """
import json, sys
from pathlib import Path
from featcache.cache import Cache
from featcache.evaluate import cross_validate, cross_validation_bytes
from featcache.heads import FitOptions, fit_head

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024

big, small, name, budget = Cache(Path(sys.argv[1])), Cache(Path(sys.argv[2])), sys.argv[3], int(sys.argv[4])
cross_validation = sys.argv[5] == "cv"  # measure compare --cv 2's folds on the big cache instead of fit-head
options = FitOptions(epochs=1, batch_size=32, learning_rate=1e-3, optimizer="adam", patience=None)
head = fit_head(small, name, options, memory_budget=budget)  # the libraries' one-off set-up, the same model
if cross_validation:  # what compare --cv runs per saved head; the folds refit the head's recipe
    cross_validate(head, small, 2, budget)
try:
    Path("/proc/self/clear_refs").write_text("5")  # peak := now (Linux >= 4.0)
except OSError:
    pass
baseline = status("VmRSS")
if cross_validation:
    assert len(cross_validate(head, big, 2, budget)) == 2
    memory = {"path": "streamed" if cross_validation_bytes(big) > budget else "in-memory"}
else:
    memory = fit_head(big, name, options, memory_budget=budget).record["memory"]
print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "memory": memory,
                  "params": head.record.get("trainable_params", 0)}))
"""
RSS_BUDGET = 12 * MiB
RSS_MARGIN = 24 * MiB  # allocator slack, HDF5 chunk caches, TensorFlow's tensors of one step


@pytest.fixture(scope="module")
def caches_over_budget(tmp_path_factory):
    """108 MiB of float16 rows the size of VGG16's block5_pool (9x a 12 MiB budget), the training split
    in one 96 MiB shard, so that reading one shard whole breaks the bound; and a small cache of the same rows."""
    root = tmp_path_factory.mktemp("rss")
    big = blob_cache(root / "big", per_class=(3072, 384, 0), shard_size=8192)
    small = blob_cache(root / "small", per_class=(64, 32, 0), shard_size=64)
    return big, small


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
@pytest.mark.parametrize("name, what", [("logreg", "fit"), ("dense256", "fit"), ("logreg", "cv"),
                                        ("dense256", "cv")])
def test_peak_rss_stays_bounded_on_a_cache_many_times_the_budget(name, what, caches_over_budget):
    """fit-head, and compare --cv 2's folds (``cross_validate``), which stream their rows when the training
    split is over budget."""
    big, small = caches_over_budget
    cache_bytes = sum(p.stat().st_size for p in big.path.glob("*.h5"))
    shard_bytes = max(p.stat().st_size for p in big.path.glob("train-*.h5"))
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, str(big.path), str(small.path), name,
                           str(RSS_BUDGET), what], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    growth = result["peak"] - result["baseline"]
    model = 4 * 4 * result["params"]  # float32 weights, gradients and two optimizer slots
    assert result["memory"]["path"] == "streamed" and cache_bytes > 8 * RSS_BUDGET
    if what == "fit":
        assert growth < RSS_BUDGET + model + RSS_MARGIN, (format_size(growth), result)
        assert growth < shard_bytes  # no shard is ever held whole (its bytes alone would reach this)
    else:  # a fold's model, and the pages of the fold's before it that the allocator may keep
        assert cross_validation_bytes(big) > 40 * RSS_BUDGET  # what refitting in memory would take
        assert growth < RSS_BUDGET + 2 * model + RSS_MARGIN, (format_size(growth), result)


def test_streamed_sgd_trains_every_c_at_its_own_alpha_with_class_weights_for_every_epoch(tmp_path):
    """Each candidate is an SGDClassifier at alpha = 1 / (C n_train) with the balanced class weights of the
    training labels, fed the stream's own shuffle; without patience every epoch runs and is said."""
    import warnings

    from featcache.heads.protocol import class_weight_of
    from featcache.heads.sgd import fit_sgd
    from featcache.streaming import split_labels

    cache = synthetic_cache(tmp_path, per_class=((36, 12), 10, 10))
    options = FitOptions(epochs=3, batch_size=16, seed=0, patience=None, class_weight="balanced")
    _, plan = memory_plan(cache, "svm", options, TINY_BUDGET)
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the frozen SVM's sample_weight warning is silenced, nothing else raised
        _, calibrated, details = fit_sgd(cache, "svm", "hinge", "standard", None, options, plan, lines.append)
    (fold,) = calibrated.calibrated_classifiers_
    svm = fold.estimator.estimator
    chosen = details["chosen"]
    assert svm.alpha == pytest.approx(1 / (chosen["C"] * 48)) == chosen["alpha"]
    assert svm.class_weight == class_weight_of(split_labels(cache, "train"), 2, "balanced") == {0: 48 / 72,
                                                                                                  1: 48 / 24}
    assert svm.shuffle is False and details["memory"]["epochs"] == 3
    assert [line.split(":")[0] for line in lines] == [f"svm epoch {k}/3 (streamed SGD)" for k in (1, 2, 3)]
