"""featcache compare: one table of every head, in four formats, with plots and an HTML report."""

from __future__ import annotations

import csv
import io
import json

import pytest
from click.testing import CliRunner

from featcache import FeatcacheError
from featcache.cache import Cache
from featcache.cli import main
from featcache.compare import Comparison, compare
from featcache.evaluate import cross_validation_bytes
from featcache.heads import FitOptions, fit_head, head_dir
from featcache.report import COLUMNS
from tests.conftest import synthetic_cache, write_image

QUICK = FitOptions(epochs=8, batch_size=16, learning_rate=1e-2, optimizer="adam", seed=0, patience=5)


def fitted_cache(tmp_path, names=("logreg", "dense256", "svm"), **cache_options):
    cache = synthetic_cache(tmp_path, **({"per_class": (30, 10, 10)} | cache_options))
    for name in names:
        fit_head(cache, name, QUICK).save(head_dir(cache, name))
    return cache


def test_compare_rows_cover_every_head_and_mark_one_best(tmp_path):
    comparison = compare(fitted_cache(tmp_path), cv_folds=3)
    assert sorted(r["head"] for r in comparison.rows) == ["dense256", "logreg", "svm"]
    assert all(r["cv_accuracy"] is not None and r["test_accuracy"] >= 0.9 for r in comparison.rows)
    top = max(r["val_accuracy"] for r in comparison.rows)  # the rule, applied by hand to the rows:
    tied = sorted((r["val_log_loss"], r["head"]) for r in comparison.rows if r["val_accuracy"] == top)
    assert len(tied) == 1 or tied[0][0] < tied[1][0]  # one best: ties to the lower validation log loss
    assert comparison.best == tied[0][1], comparison.rows
    assert set(comparison.histories) == {"dense256"}


def test_best_is_the_highest_validation_accuracy_then_the_lowest_validation_log_loss():
    """Whichever heads a real cache makes win, the choice among rows: not the first, not the first
    of the most accurate, but the most accurate with the lowest loss."""
    rows = [{"head": "a", "val_accuracy": 0.90, "val_log_loss": 0.10},
            {"head": "b", "val_accuracy": 0.95, "val_log_loss": 0.50},
            {"head": "c", "val_accuracy": 0.95, "val_log_loss": 0.30},
            {"head": "d", "val_accuracy": 0.50, "val_log_loss": 0.01}]
    assert Comparison(rows=rows).best == "c"


def test_cross_validation_over_the_memory_budget_streams_each_fold(tmp_path, monkeypatch):
    cache = fitted_cache(tmp_path, names=("logreg", "dense256", "svm"))
    needed = cross_validation_bytes(cache)
    # eight float32 copies of 60 training rows of 2x2x8, and two 60 x 60 float64 Gram matrices and factors
    assert needed == 8 * 60 * (2 * 2 * 8) * 4 + 2 * 2 * 8 * 60**2
    in_memory = {r["head"]: r["cv_accuracy"] for r in compare(cache, cv_folds=3, memory_budget=needed).rows}
    real_read = Cache.read

    def read(self, split):
        assert split != "train", "the training split was read whole"
        return real_read(self, split)

    monkeypatch.setattr(Cache, "read", read)
    rows = compare(cache, cv_folds=3, memory_budget=needed - 1).rows
    streamed = {r["head"]: r["cv_accuracy"] for r in rows}
    assert set(streamed) == set(in_memory) == {"logreg", "dense256", "svm"}
    for name, accuracy in streamed.items():  # separable blobs: every refit learns them, however it trains
        assert accuracy >= 0.9 and in_memory[name] >= 0.9, (name, accuracy, in_memory[name])


def test_cross_validating_a_kernel_svm_over_the_memory_budget_is_refused_before_any_work(tmp_path):
    cache = fitted_cache(tmp_path, names=("logreg", "svm-rbf"))
    needed = cross_validation_bytes(cache)
    with pytest.raises(FeatcacheError, match="--cv 3 refits svm-rbf, which needs the training split"):
        compare(cache, cv_folds=3, memory_budget=needed - 1)
    assert all(r["cv_accuracy"] is not None for r in compare(cache, cv_folds=3, memory_budget=needed).rows)
    args = ["compare", "--memory-budget", str(needed - 1), "--workdir", str(tmp_path)]
    refused = CliRunner().invoke(main, [*args, "--cv", "3"])
    assert refused.exit_code == 1 and "raise --memory-budget" in refused.output
    assert "Traceback" not in refused.output and len(refused.output.strip().splitlines()) == 1
    assert CliRunner().invoke(main, args).exit_code == 0  # without --cv nothing is held in memory


def test_json_and_csv_outputs_parse_with_the_right_columns(tmp_path):
    fitted_cache(tmp_path, names=("logreg", "linear"))
    runner = CliRunner()
    as_json = runner.invoke(main, ["compare", "--workdir", str(tmp_path), "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    rows = json.loads(as_json.stdout)
    extra = {"selected_by", "per_class_split", "per_class"}
    assert [set(r) for r in rows] == [set(COLUMNS) | extra] * 2 and sum(r["best"] for r in rows) == 1
    assert rows[0]["selected_by"] == "accuracy" and rows[0]["per_class_split"] == "test"
    assert set(rows[0]["per_class"]) == {"a", "b"}
    assert set(rows[0]["per_class"]["a"]) == {"precision", "recall", "f1", "support"}
    as_csv = runner.invoke(main, ["compare", "--workdir", str(tmp_path), "--format", "csv"])
    reader = csv.DictReader(io.StringIO(as_csv.stdout))
    assert tuple(reader.fieldnames) == COLUMNS and len(list(reader)) == 2


def test_compare_writes_plots_and_a_report_with_misclassified_images(tmp_path):
    cache = synthetic_cache(tmp_path, per_class=(30, 10, 10), shuffle_labels=True)
    for relpath in [f"test/{c}/{i:04d}.png" for c in ("a", "b") for i in range(20)]:
        write_image(tmp_path / relpath, seed=len(relpath))
    fit_head(cache, "logreg", QUICK).save(head_dir(cache, "logreg"))
    report = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["compare", "--workdir", str(tmp_path), "--report", str(report)])
    assert result.exit_code == 0, result.output
    for name in ("comparison.png", "confusion.png", "precision_recall.png"):
        assert (cache.path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = report.read_text()
    assert "logreg" in page and "data:image/png;base64," in page and "test/a/" in page
    assert "<h2>precision-recall</h2>" in page and "logreg on test, per class" in page


def test_compare_without_heads_says_what_to_do(tmp_path):
    synthetic_cache(tmp_path)
    result = CliRunner().invoke(main, ["compare", "--workdir", str(tmp_path)])
    assert result.exit_code == 1 and "run `featcache fit-head --head dense256` first" in result.output


def test_per_class_metrics_and_macro_f1_are_scikit_learns_on_an_imbalanced_test_split(tmp_path):
    """A 10:1 imbalance: accuracy hides the minority class, macro F1 and per-class recall show it."""
    from sklearn.metrics import classification_report, f1_score

    from featcache.evaluate import predict_split
    from featcache.heads import load_head

    cache = fitted_cache(tmp_path, names=("logreg",), per_class=((60, 6), (20, 2), (40, 4)), separation=1.0)
    (row,) = compare(cache).rows
    result = predict_split(load_head(head_dir(cache, "logreg")), cache, "test")
    expected = classification_report(result.labels, result.predicted, labels=[0, 1], target_names=["a", "b"],
                                     output_dict=True, zero_division=0)
    for name in ("a", "b"):
        got = row["per_class"][name]
        assert got["support"] == expected[name]["support"] == {"a": 40, "b": 4}[name]
        for metric, theirs in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert got[metric] == pytest.approx(expected[name][theirs])
    assert row["test_macro_f1"] == pytest.approx(f1_score(result.labels, result.predicted, average="macro"))


@pytest.mark.parametrize("select_by, best", [("accuracy", "c"), ("balanced-accuracy", "b"), ("macro-f1", "a"),
                                             ("log-loss", "d")])
def test_select_by_names_the_best_head_by_that_validation_score(select_by, best):
    from featcache.report import best_index

    names = ("head", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "val_log_loss")
    table = (("a", 0.80, 0.60, 0.70, 0.5), ("b", 0.85, 0.75, 0.65, 0.6), ("c", 0.90, 0.55, 0.60, 0.4),
             ("d", 0.70, 0.50, 0.50, 0.3))
    rows = [dict(zip(names, values, strict=True)) for values in table]
    assert rows[best_index(rows, select_by)]["head"] == best
    tied = [{**rows[0], "val_log_loss": 0.3, "head": "e"}, {**rows[0], "val_accuracy": 0.81, "val_log_loss": 0.3}]
    assert tied[best_index(tied, "log-loss")]["val_accuracy"] == 0.81  # log loss ties: the more accurate


def test_compare_command_stars_the_head_select_by_names_and_prints_the_per_class_table(tmp_path):
    fitted_cache(tmp_path, names=("logreg", "linear"))
    runner = CliRunner()
    by_loss = json.loads(runner.invoke(main, ["compare", "--workdir", str(tmp_path), "--format", "json",
                                              "--select-by", "log-loss"]).stdout)
    lowest = min(by_loss, key=lambda r: r["val_log_loss"])["head"]
    assert [r["head"] for r in by_loss if r["best"]] == [lowest] and by_loss[0]["selected_by"] == "log-loss"
    table = runner.invoke(main, ["compare", "--workdir", str(tmp_path), "--select-by", "log-loss"])
    assert table.exit_code == 0, table.output
    assert f"{lowest} ★" in table.stdout and "best: lowest val loss, then highest val acc" in table.stdout
    assert f"{lowest} on test, per class" in table.stdout and "precision" in table.stdout
    refused = runner.invoke(main, ["compare", "--workdir", str(tmp_path), "--select-by", "f1"])
    assert refused.exit_code == 2 and "macro-f1" in refused.output
