"""Gather every head fitted on a cache into one comparison: rows, curves, confusion matrices and
the misclassified test images of the best head. Rendering lives in report.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache import FeatcacheError, streaming
from featcache.cache import Cache
from featcache.evaluate import check_cross_validation_fits, cross_validate, predict_split
from featcache.heads import head_dir, load_head, saved_heads
from featcache.report import best_index, check_select_by, default_select_by, selected_by


@dataclass
class Comparison:
    rows: list[dict]
    histories: dict[str, dict] = field(default_factory=dict)
    confusions: dict[str, list[list[int]]] = field(default_factory=dict)
    finetune_epochs: dict[str, int] = field(default_factory=dict)  # head -> epoch where fine-tuning began
    misclassified: list[dict] = field(default_factory=list)
    best_scores: tuple | None = None  # (split, labels, outputs) of the best head on its final split

    @property
    def best(self) -> str:
        return self.rows[best_index(self.rows, selected_by(self.rows))]["head"]


def compare(cache: Cache, cv_folds: int | None = None, memory_budget: int | None = None,
            select_by: str | None = None) -> Comparison:
    """Every saved head of the cache on validation and test (and ``cv_folds``-fold cross-validation,
    streamed within ``memory_budget`` bytes when the training split would not fit, refused up front
    for heads that cannot stream); the best head by ``select_by`` on validation (report.SELECT_BY;
    None: accuracy for classes, macro F1 for sets of classes, RMSE for numbers)."""
    select_by = select_by or default_select_by(cache.task)
    check_select_by(select_by, cache.task)
    names = saved_heads(cache)
    if not names:
        raise FeatcacheError(
            f"no heads fitted on cache {cache.key[:16]}; run `featcache fit-head --head dense256` first"
        )
    if cv_folds:
        check_cross_validation_fits(cache, names, cv_folds, memory_budget)
    final_split = "test" if "test" in cache.splits else "validation"
    batch_rows = streaming.in_memory_plan(cache, memory_budget).batch_rows  # as fit-head evaluates
    comparison = Comparison(rows=[])
    results = {}
    for name in names:
        head = load_head(head_dir(cache, name))
        validation = predict_split(head, cache, "validation", batch_rows)
        final = predict_split(head, cache, final_split, batch_rows)
        results[name] = final
        row = _row(head, cache, validation, final if final_split == "test" else None, cv_folds, memory_budget)
        comparison.rows.append({**row, "selected_by": select_by})
        if "history" in head.record:
            comparison.histories[name] = head.record["history"]
        if "finetune" in head.record:
            comparison.finetune_epochs[name] = head.record["finetune"]["started_at_epoch"]
        if cache.target.one_class_each:
            comparison.confusions[name] = final.metrics(len(cache.classes))["confusion"]
    final = results[comparison.best]
    comparison.best_scores = (final_split, final.labels, final.outputs)
    root = Path(cache.manifest["dataset"]["root"])
    comparison.misclassified = [
        {**item, "path": root / item["relpath"], "head": comparison.best}
        for item in results[comparison.best].misclassified(cache.classes)
    ]
    return comparison


def _row(head, cache: Cache, validation, test, cv_folds: int | None, memory_budget: int | None) -> dict:
    n = len(cache.classes)
    val, tst = validation.metrics(n, cache.task), test.metrics(n, cache.task) if test else None
    refit = cv_folds and head.refittable
    scores = cross_validate(head, cache, cv_folds, memory_budget) if refit else None
    timing = {"fit_seconds": head.record["fit_seconds"], "predict_seconds": (test or validation).predict_seconds}
    if validation.numbers:
        splits = (("val", val), ("test", tst))
        return {"head": head.name, **{f"{split}_{metric}": both and both[metric]
                                      for metric in ("mae", "rmse", "r2") for split, both in splits},
                "cv_rmse": float(np.mean(scores)) if scores else None,
                "cv_rmse_std": float(np.std(scores)) if scores else None, **timing}
    if validation.sets:
        return {"head": head.name, **{f"{split}_{metric}": both and both[metric]
                                      for metric in ("accuracy", "micro_f1", "macro_f1", "hamming_loss", "log_loss")
                                      for split, both in (("val", val), ("test", tst))},
                "cv_accuracy": float(np.mean(scores)) if scores else None,
                "cv_std": float(np.std(scores)) if scores else None, **timing,
                "per_class_split": "test" if tst else "validation",
                "per_class": dict(zip(cache.classes, (tst or val)["per_class"], strict=True))}
    ordered = {f"{split}_mean_class_error": both and both["mean_class_error"]
               for split, both in (("val", val), ("test", tst))} if cache.task == "ordinal" else {}
    return {
        "head": head.name, **ordered,
        "val_accuracy": val["accuracy"], "test_accuracy": tst and tst["accuracy"],
        "val_balanced_accuracy": val["balanced_accuracy"],
        "test_balanced_accuracy": tst and tst["balanced_accuracy"],
        "val_macro_f1": val["macro_f1"], "test_macro_f1": tst and tst["macro_f1"],
        "val_log_loss": val["log_loss"], "test_log_loss": tst and tst["log_loss"],
        "cv_accuracy": float(np.mean(scores)) if scores else None,
        "cv_std": float(np.std(scores)) if scores else None,
        **timing,
        "per_class_split": "test" if tst else "validation",
        "per_class": dict(zip(cache.classes, (tst or val)["per_class"], strict=True)),
    }


def write_outputs(comparison: Comparison, cache: Cache, plots_dir: Path | None = None,
                  report_path: Path | None = None, cv_folds: int | None = None) -> dict[str, Path]:
    """The comparison's PNG plots (in ``plots_dir``, default CACHE/plots) and, with ``report_path``,
    the self-contained HTML report; returns {what: path} of every file written."""
    from featcache import report

    plots_dir = Path(plots_dir or cache.path / "plots")
    plots_dir.mkdir(parents=True, exist_ok=True)
    if not cache.target.has_classes:
        split, labels, values = comparison.best_scores
        written = {"error by head": report.plot_comparison(comparison.rows, plots_dir / "comparison.png"),
                   "predicted against true": report.plot_predictions(labels, values, comparison.best, split,
                                                                     plots_dir / "predictions.png")}
    elif cache.task == "multilabel":  # a K x K confusion matrix does not apply; precision-recall per class does
        written = {"accuracy by head": report.plot_comparison(comparison.rows, plots_dir / "comparison.png")}
    else:
        written = {
            "accuracy by head": report.plot_comparison(comparison.rows, plots_dir / "comparison.png"),
            "confusion matrices": report.plot_confusion_matrices(comparison.confusions, cache.classes,
                                                                 plots_dir / "confusion.png"),
        }
    if comparison.best_scores is not None and cache.target.has_classes:
        split, labels, probabilities = comparison.best_scores
        curves = report.precision_recall(labels, probabilities, cache.classes)
        if curves:
            written["precision-recall"] = report.plot_precision_recall(curves, comparison.best, split,
                                                                       plots_dir / "precision_recall.png")
    if comparison.histories:
        written["learning curves"] = report.plot_learning_curves(
            comparison.histories, plots_dir / "learning_curves.png", comparison.finetune_epochs)
    if report_path:
        config = cache.config
        dataset = cache.manifest["dataset"]["root"]
        facts = {"cache": cache.key, "backbone": config["backbone"],
                 "weights": cache.manifest.get("weights_source", "-"),
                 "layer": str(cache.manifest.get("output_layer")), "pooling": config["pooling"],
                 "image size": f"{config['image_size']} px", "dataset": dataset,
                 "best head": comparison.best, "cross-validation": f"{cv_folds} folds" if cv_folds else "off"}
        report.write_report(report_path, f"featcache compare: {config['backbone']} on {Path(dataset).name}",
                            comparison.rows, dict(written), comparison.misclassified, facts)
        written["report"] = Path(report_path)
    return written
