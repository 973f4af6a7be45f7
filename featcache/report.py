"""Render a comparison of heads: text tables, PNG figures and one self-contained HTML page.

Everything arrives as plain data (rows, histories, matrices, file paths), so rendering can be
tested and reused without Keras, caches or fitted heads. Figures are drawn on matplotlib's Agg
canvas directly, never through pyplot: no GUI backend, no global figure state to leak.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import mimetypes
import textwrap
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from featcache import FeatcacheError, __version__
from featcache.files import atomic_write

COLUMNS = (
    "head", "val_accuracy", "test_accuracy", "val_balanced_accuracy", "test_balanced_accuracy", "val_macro_f1",
    "test_macro_f1", "val_log_loss", "test_log_loss", "cv_accuracy", "cv_std", "fit_seconds", "predict_seconds",
    "best",
)
# ordered classes add the mean distance between the predicted and the true class (in classes)
ORDINAL_COLUMNS = (*COLUMNS[:7], "val_mean_class_error", "test_mean_class_error", *COLUMNS[7:])
# a multi-label target: accuracy is exact match (every class of the image right)
MULTILABEL_COLUMNS = ("head", "val_accuracy", "test_accuracy", "val_micro_f1", "test_micro_f1", "val_macro_f1",
                      "test_macro_f1", "val_hamming_loss", "test_hamming_loss", "val_log_loss", "test_log_loss",
                      "cv_accuracy", "cv_std", "fit_seconds", "predict_seconds", "best")
# a regression target (numbers)
VALUE_COLUMNS = ("head", "val_mae", "test_mae", "val_rmse", "test_rmse", "val_r2", "test_r2", "cv_rmse",
                 "cv_rmse_std", "fit_seconds", "predict_seconds", "best")
# --select-by: the validation column that names the best head, whether higher is better, and its words
SELECT_BY = {
    "accuracy": ("val_accuracy", True, "highest val acc"),
    "balanced-accuracy": ("val_balanced_accuracy", True, "highest val bal acc"),
    "macro-f1": ("val_macro_f1", True, "highest val macro F1"),
    "micro-f1": ("val_micro_f1", True, "highest val micro F1"),
    "hamming-loss": ("val_hamming_loss", False, "lowest val Hamming loss"),
    "log-loss": ("val_log_loss", False, "lowest val loss"),
    "class-error": ("val_mean_class_error", False, "lowest val mean class error"),
    "rmse": ("val_rmse", False, "lowest val RMSE"),
    "mae": ("val_mae", False, "lowest val MAE"),
    "r2": ("val_r2", True, "highest val R²"),
}
FOR_NUMBERS = ("rmse", "mae", "r2")  # the criteria of a regression target; the others rank classes
FOR_SETS = ("accuracy", "macro-f1", "micro-f1", "hamming-loss", "log-loss")  # of a multi-label target
FORMATS = ("table", "markdown", "json", "csv")
LABELS = {
    "head": "head", "val_accuracy": "val acc", "test_accuracy": "test acc",
    "val_balanced_accuracy": "val bal acc", "test_balanced_accuracy": "test bal acc",
    "val_macro_f1": "val F1", "test_macro_f1": "test F1",
    "val_micro_f1": "val micro F1", "test_micro_f1": "test micro F1",
    "val_hamming_loss": "val Hamming", "test_hamming_loss": "test Hamming",
    "val_log_loss": "val loss", "test_log_loss": "test loss", "cv_accuracy": "cv acc", "cv_std": "cv std",
    "fit_seconds": "fit s", "predict_seconds": "predict s",
    "val_mean_class_error": "val class err", "test_mean_class_error": "test class err",
    "val_mae": "val MAE", "test_mae": "test MAE", "val_rmse": "val RMSE", "test_rmse": "test RMSE",
    "val_r2": "val R²", "test_r2": "test R²", "cv_rmse": "cv RMSE", "cv_rmse_std": "cv std",
}
STAR = "★"
THUMBNAIL_PX = 128


# ---------------------------------------------------------------- tables


def format_table(rows: list[dict], fmt: str) -> str:
    """The comparison as text for a terminal, a README, or another program, best head marked."""
    renderers = {"table": _rich_table, "markdown": _markdown, "json": _json, "csv": _csv}
    if fmt not in renderers:
        raise FeatcacheError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](_with_best(rows))


def check_select_by(select_by: str, task: str | None = None) -> None:
    """Refuse an unknown criterion, or (given the cache's ``task``) one that does not rank its heads."""
    if task == "regression":
        valid = FOR_NUMBERS
    elif task == "multilabel":
        valid = FOR_SETS
    elif task is not None:
        valid = tuple(name for name in SELECT_BY if name not in (*FOR_NUMBERS, "micro-f1", "hamming-loss")
                      and (name != "class-error" or task == "ordinal"))
    else:
        valid = tuple(SELECT_BY)
    if select_by not in valid:
        what = f" for a {task} target" if task and select_by in SELECT_BY else ""
        raise FeatcacheError(f"--select-by {select_by!r}{what}: choose one of {', '.join(valid)}")


def default_select_by(task: str) -> str:
    """What names the best head unless asked: accuracy for classes, RMSE for numbers, macro F1 for sets
    of classes (exact-match accuracy is harsh, and macro F1 counts a rare class as much as a common one)."""
    return {"regression": "rmse", "multilabel": "macro-f1"}.get(task, "accuracy")


def columns(rows: list[dict]) -> tuple[str, ...]:
    """The columns of these rows: classes, ordered classes, sets of classes or numbers."""
    if any("val_rmse" in row for row in rows):
        return VALUE_COLUMNS
    if any("val_hamming_loss" in row for row in rows):
        return MULTILABEL_COLUMNS
    return ORDINAL_COLUMNS if any("val_mean_class_error" in row for row in rows) else COLUMNS


def best_index(rows: list[dict], select_by: str = "accuracy") -> int | None:
    """The best head by ``select_by`` on validation (default: highest accuracy); ties to the lower
    validation log loss (selecting by log loss: to the higher accuracy)."""
    check_select_by(select_by)
    column, higher, _ = SELECT_BY[select_by]
    tie = _tie(select_by)

    def value(row: dict, name: str, higher: bool) -> float:
        v = row.get(name)
        return -math.inf if v is None else (v if higher else -v)

    def rank(i: int) -> tuple[float, float]:
        return value(rows[i], column, higher), value(rows[i], *SELECT_BY[tie][:2])

    return max(range(len(rows)), key=rank, default=None)


def _tie(select_by: str) -> str:
    """The criterion that breaks ties: log loss (accuracy when selecting by log loss); for numbers MAE
    (RMSE when selecting by MAE)."""
    if select_by in FOR_NUMBERS:
        return "rmse" if select_by == "mae" else "mae"
    return "accuracy" if select_by == "log-loss" else "log-loss"


def selected_by(rows: list[dict]) -> str:
    """The criterion a comparison's rows were ranked by (compare records it on every row)."""
    return rows[0].get("selected_by", "accuracy") if rows else "accuracy"


def _with_best(rows: list[dict]) -> list[dict]:
    """Rows with every column of ``columns(rows)`` in order, "best" set on exactly one row (none if empty), and the
    criterion and per-class metrics where compare gave them. Numpy scalars become Python numbers for json.
    """
    best = best_index(rows, selected_by(rows))
    extra = ("selected_by", "per_class_split", "per_class")
    return [
        {**{c: _plain(row.get(c)) for c in columns(rows)[:-1]}, "best": i == best,
         **{k: row[k] for k in extra if k in row}} for i, row in enumerate(rows)
    ]


def best_caption(rows: list[dict]) -> str:
    select_by = selected_by(rows)
    return f"{STAR} best: {SELECT_BY[select_by][2]}, then {SELECT_BY[_tie(select_by)][2]}"


def best_row(rows: list[dict]) -> dict | None:
    """The best head's row when compare gave it per-class metrics, else None."""
    return next((row for row in _with_best(rows) if row["best"] and row.get("per_class")), None)


def per_class_table(rows: list[dict]) -> str:
    """Precision, recall, F1 and support per class of the best head, on the split compare scored last."""
    from rich import box
    from rich.table import Table

    best = best_row(rows)
    if best is None:
        return ""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  title=f"{best['head']} on {best['per_class_split']}, per class", title_justify="left")
    for name in ("class", "precision", "recall", "F1", "support"):
        table.add_column(name, justify="left" if name == "class" else "right", overflow="fold")
    for name, scores in best["per_class"].items():
        table.add_row(name, *(f"{100 * scores[k]:.1f}%" for k in ("precision", "recall", "f1")), str(scores["support"]))
    return rich_text(table)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _cells(row: dict, shown: tuple[str, ...]) -> list[str]:
    """Display strings for every column but "best": percentages, 3-decimal losses and errors, short seconds."""
    return [_format(column, row[column]) for column in shown[:-1]]


def _format(column: str, value) -> str:
    if value is None:
        return "-"
    if column == "head":
        return str(value)
    if column.endswith(("log_loss", "class_error", "_r2")):
        return f"{value:.3f}"
    if column.endswith(("mae", "rmse", "rmse_std")):
        return f"{value:.4g}"
    if column.endswith("seconds"):
        return f"{value:.0f}" if value >= 100 else f"{value:.3g}"
    return f"{100 * value:.1f}%"


def _rich_table(rows: list[dict]) -> str:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  caption_justify="left", caption=best_caption(rows))
    shown = columns(rows)
    for column in shown[:-1]:
        table.add_column(LABELS[column], justify="left" if column == "head" else "right")
    for row in rows:
        cells = _cells(row, shown)
        cells[0] = f"{cells[0]} {STAR}" if row["best"] else cells[0]
        table.add_row(*cells)
    return rich_text(table)


def rich_text(table) -> str:
    """A rich table as plain text (no colour codes, no trailing spaces): printable and testable."""
    from rich.console import Console

    console = Console(file=io.StringIO(), width=240, color_system=None)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()).strip("\n")


def _markdown(rows: list[dict]) -> str:
    def line(cells):
        return "| " + " | ".join(cell.replace("|", r"\|") for cell in cells) + " |"

    shown = columns(rows)
    lines = [line(LABELS[c] for c in shown[:-1]), "|:---|" + "---:|" * (len(shown) - 2)]
    for row in rows:
        cells = _cells(row, shown)
        cells[0] = f"**{cells[0]}** {STAR}" if row["best"] else cells[0]
        lines.append(line(cells))
    return "\n".join(lines)


def _json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)


def _csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns(rows), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().rstrip("\n")


# ---------------------------------------------------------------- figures


def plot_learning_curves(
    histories: dict[str, dict[str, list[float]]], path: Path, marker_epoch: dict[str, int] | None = None
) -> Path:
    """Loss and accuracy (for numbers: mean absolute error, in standard deviations of the target) per epoch
    for every head: colour is the head, solid train, dashed validation.

    A dotted vertical line marks the epoch where fine-tuning began, so its jump is not misread.
    """
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    marker_epoch = marker_epoch or {}
    numbers = any("mae" in history for history in histories.values())
    fig = _figure(figsize=(12, 4.5))
    axes = fig.subplots(1, 2)
    for ax, metric in zip(axes, ("loss", "mae" if numbers else "accuracy"), strict=True):
        for i, (head, history) in enumerate(histories.items()):
            for key, style in ((metric, "-"), (f"val_{metric}", "--")):
                values = history.get(key) or []
                ax.plot(range(1, len(values) + 1), values, style, color=f"C{i}")
            if head in marker_epoch:
                ax.axvline(marker_epoch[head], color=f"C{i}", linestyle=":")
                ax.annotate("fine-tuning", (marker_epoch[head], 0.98), xycoords=("data", "axes fraction"),
                            rotation=90, ha="right", va="top", fontsize=8, color=f"C{i}")
        label = "MAE (standard deviations)" if metric == "mae" else metric
        ax.set(title=label, xlabel="epoch", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if not numbers:
        axes[1].set_ylim(top=min(axes[1].get_ylim()[1], 1))  # autoscale's margin would run past 100%
        axes[1].yaxis.set_major_formatter(PercentFormatter(xmax=1))
    handles = [Line2D([], [], color=f"C{i}", label=head) for i, head in enumerate(histories)]
    for style, split in (("-", "train"), ("--", "validation")):
        handles.append(Line2D([], [], color="grey", linestyle=style, label=split))
    fig.legend(handles=handles, loc="outside right upper")
    return _save(fig, path)


def plot_confusion_matrices(matrices: dict[str, list[list[int]]], classes: list[str], path: Path) -> Path:
    """One matrix per head, rows true and columns predicted, counts written in every cell.

    Class names are wrapped and rotated so long ones stay readable; only the first column of the
    grid repeats them on the y axis. Colour is the fraction of each true class, so errors on a small
    class stay visible beside a large one.
    """
    import numpy as np

    n = max(len(matrices), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    side = max(3.5, 0.5 * len(classes) + 2)
    fig = _figure(figsize=(side * ncols + 0.5, side * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for i, (head, matrix) in enumerate(matrices.items()):
        _draw_confusion(axes[i], head, np.asarray(matrix, dtype=int), classes, first_column=i % ncols == 0)
    for ax in axes[len(matrices):]:
        ax.set_axis_off()
    return _save(fig, path)


def literal(text: str) -> str:
    """Text that matplotlib draws as written: a class named ``y $\\frac$ z`` is not TeX to parse."""
    return text.replace("$", r"\$")


def _draw_confusion(ax, head: str, counts, classes: list[str], first_column: bool) -> None:
    import numpy as np

    totals = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    size = 9 if len(classes) <= 10 else 6
    for (i, j), count in np.ndenumerate(counts):
        colour = "white" if fraction[i, j] > 0.5 else "black"
        ax.text(j, i, str(count), ha="center", va="center", fontsize=size, color=colour)
    names = [textwrap.fill(literal(name), 20) for name in classes]
    ticks = range(len(classes))
    ax.set_xticks(ticks, names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, names if first_column else [])
    ax.tick_params(axis="y", length=4 if first_column else 0)
    ax.set(xlabel="predicted", ylabel="true" if first_column else "")
    total = counts.sum()
    accuracy = f"{np.trace(counts) / total:.1%}" if total else "-"
    ax.set_title(f"{head}\naccuracy {accuracy} (n={total})", fontsize=10)


def plot_comparison(rows: list[dict], path: Path) -> Path:
    """Validation and test accuracy (RMSE for numbers) side by side for each head; the best head is
    starred and shaded."""
    from matplotlib.ticker import PercentFormatter

    numbers = columns(rows) == VALUE_COLUMNS
    metric = "rmse" if numbers else "accuracy"
    rows = _with_best(rows)
    fig = _figure(figsize=(8, 0.7 * len(rows) + 1.6))
    ax = fig.subplots()
    height = 0.38
    for offset, split, colour in ((-height / 2, "val", "C0"), (height / 2, "test", "C1")):
        values = [row[f"{split}_{metric}"] for row in rows]
        y = [i + offset for i, v in enumerate(values) if v is not None]
        x = [v for v in values if v is not None]
        ax.barh(y, x, height, color=colour, label="validation" if split == "val" else "test")
        for yi, v in zip(y, x, strict=True):
            if numbers:
                ax.annotate(f"{v:.4g}", (v, yi), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
            else:
                _bar_value(ax, v, yi)
    for i, row in enumerate(rows):
        if row["best"]:
            ax.axhspan(i - 0.5, i + 0.5, color="gold", alpha=0.25, zorder=0)
    ax.set_yticks(range(len(rows)), [f"{r['head']} {STAR}" if r["best"] else r["head"] for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    if numbers:
        ax.set_xlim(0, 1.2 * max((r[f"{s}_rmse"] or 0 for r in rows for s in ("val", "test")), default=1) or 1)
        ax.set(xlabel="RMSE (lower is better)", title=f"error by head ({STAR} best on validation)")
    else:
        ax.set_xlim(0, 1)  # accuracy cannot pass 100%; long bars carry their value inside
        ax.xaxis.set_major_formatter(PercentFormatter(xmax=1))
        exact = " (exact match: every class of an image right)" if columns(rows) == MULTILABEL_COLUMNS else ""
        ax.set(xlabel=f"accuracy{exact}", title=f"accuracy by head ({STAR} best on validation)")
    ax.grid(axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=2)
    return _save(fig, path)


def _bar_value(ax, value: float, y: float) -> None:
    """The bar's percentage at its end: outside a short bar, inside a long one so the axis can stop at 100%."""
    inside = value > 0.85
    ax.annotate(f"{100 * value:.1f}%", (value, y), xytext=(-3 if inside else 3, 0), textcoords="offset points",
                ha="right" if inside else "left", va="center", fontsize=8, color="white" if inside else "black")


def plot_predictions(labels, values, head: str, split: str, path: Path) -> Path:
    """Predicted against true numbers of one head on one split, with the line where they are equal."""
    fig = _figure(figsize=(5.5, 5.2))
    ax = fig.subplots()
    ax.scatter(labels, values, s=12, alpha=0.6, color="C0")
    low, high = float(min(min(labels), min(values))), float(max(max(labels), max(values)))
    ax.plot([low, high], [low, high], color="grey", lw=1, ls="--", label="predicted = true")
    ax.set(xlabel="true", ylabel="predicted", title=f"{head} on {split}: predicted against true")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    return _save(fig, path)


def precision_recall(labels, probabilities, classes: list[str]) -> dict[str, dict]:
    """Per class, one vs the rest (two classes: the second only): the precision-recall curve of its
    probability column, its average precision and its support. A rare class's curve shows what
    accuracy hides: how much precision each extra found case costs."""
    import numpy as np
    from sklearn.metrics import average_precision_score, precision_recall_curve

    labels, probabilities = np.asarray(labels), np.asarray(probabilities)
    sets = labels.ndim == 2  # multi-label: each class's own column of 0 and 1
    curves = {}
    for k in ([1] if len(classes) == 2 and not sets else range(len(classes))):
        positive = labels[:, k] == 1 if sets else labels == k
        if not positive.any():
            continue  # no such case in the split: no curve to draw
        precision, recall, _ = precision_recall_curve(positive, probabilities[:, k])
        curves[classes[k]] = {"precision": precision, "recall": recall, "support": int(positive.sum()),
                              "rows": len(labels),
                              "average_precision": float(average_precision_score(positive, probabilities[:, k]))}
    return curves


def plot_precision_recall(curves: dict[str, dict], head: str, split: str, path: Path) -> Path:
    """The precision-recall curve of each class (one vs the rest), its average precision and support
    in the legend, the class's share of the split as its chance level (dotted)."""
    fig = _figure(figsize=(7, 5))
    ax = fig.subplots()
    for i, (name, curve) in enumerate(curves.items()):
        ax.step(curve["recall"], curve["precision"], where="post", color=f"C{i}",
                label=f"{literal(name)} (AP {curve['average_precision']:.2f}, n={curve['support']})")
        ax.axhline(curve["support"] / curve["rows"], color=f"C{i}", linestyle=":", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision",
           title=f"{head} on {split}: precision-recall per class (one vs rest)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return atomic_write(Path(path), buffer.getvalue())


# ---------------------------------------------------------------- HTML report

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232a;
       max-width: 1240px; margin: 0 auto; padding: 24px; background: #fff; }
h1 { font-size: 22px; margin: 0 0 12px; }
h2 { font-size: 17px; margin: 28px 0 10px; border-bottom: 1px solid #dde1e6; padding-bottom: 4px; }
h3 { font-size: 14px; font-weight: 600; margin: 18px 0 8px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0;
           background: #f5f7f9; padding: 10px 14px; border-radius: 6px; }
dl.facts dt { color: #5b6672; } dl.facts dd { margin: 0; font-family: ui-monospace, monospace;
           overflow-wrap: anywhere; }
table.results { border-collapse: collapse; font-variant-numeric: tabular-nums; }
table.results th, table.results td { padding: 4px 10px; border-bottom: 1px solid #e6e9ed; text-align: right; }
table.results th { background: #f5f7f9; }
table.results th:first-child, table.results td:first-child { text-align: left; }
table.results tr.best td { background: #fff4c2; font-weight: 600; }
figure { margin: 0; } figure img { max-width: 100%; height: auto; border: 1px solid #e6e9ed; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: 12px; }
.item { border: 1px solid #e6e9ed; border-radius: 6px; padding: 8px; font-size: 12px; }
.item img, .item .missing { display: block; margin: 0 auto 6px; max-width: 128px; max-height: 128px; }
.item .missing { width: 128px; height: 128px; background: #f0f0f0; color: #8a939c; display: flex;
                 align-items: center; justify-content: center; text-align: center; }
.item .path { font: 11px ui-monospace, monospace; overflow-wrap: anywhere; color: #5b6672; }
.true { color: #1a7f37; } .pred { color: #cf222e; }
.note, footer { color: #5b6672; } footer { margin-top: 32px; font-size: 12px; }
"""


def write_report(
    path: Path,
    title: str,
    rows: list[dict],
    figures: dict[str, Path],
    misclassified: list[dict],
    facts: dict[str, str],
    *,
    max_gallery: int = 60,
) -> Path:
    """One HTML file that can be mailed or archived: no external files, no network, every text escaped."""
    esc = html.escape
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<header><h1>{esc(title)}</h1>{_facts_html(facts)}</header>",
        f"<section><h2>Results</h2>{_results_html(rows)}</section>",
        *(_figure_html(name, figure) for name, figure in figures.items()),
        _gallery_html(misclassified, max_gallery),
        f"<footer>Written by featcache {esc(__version__)}.</footer></body></html>\n",
    ]
    return atomic_write(Path(path), "\n".join(parts).encode("utf-8"))


def _facts_html(facts: dict[str, str]) -> str:
    items = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts.items())
    return f'<dl class="facts">{items}</dl>'


def _results_html(rows: list[dict]) -> str:
    shown = columns(rows)
    header = "".join(f"<th>{html.escape(LABELS[c])}</th>" for c in shown[:-1])
    body = []
    for row in _with_best(rows):
        cells = [html.escape(cell) for cell in _cells(row, shown)]
        if row["best"]:
            cells[0] += f' <span title="best">{STAR}</span>'
        css = ' class="best"' if row["best"] else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    note = html.escape(best_caption(rows)) + " (on validation)."
    per_class = _per_class_html(best_row(rows))
    return (f'<table class="results"><thead><tr>{header}</tr></thead><tbody>{"".join(body)}</tbody></table>'
            f'<p class="note">{note}</p>{per_class}')


def _per_class_html(best: dict | None) -> str:
    if best is None:
        return ""
    esc = html.escape
    body = "".join(
        f"<tr><td>{esc(name)}</td>" + "".join(f"<td>{100 * s[k]:.1f}%</td>" for k in ("precision", "recall", "f1"))
        + f"<td>{s['support']}</td></tr>" for name, s in best["per_class"].items())
    return (f"<h3>{esc(best['head'])} on {esc(best['per_class_split'])}, per class</h3>"
            '<table class="results"><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th>'
            f"<th>support</th></tr></thead><tbody>{body}</tbody></table>")


def _figure_html(name: str, path: Path) -> str:
    mime = mimetypes.guess_type(str(path))[0] or "image/png"
    uri = _data_uri(Path(path).read_bytes(), mime)
    name = html.escape(name)
    return f'<section><h2>{name}</h2><figure><img src="{uri}" alt="{name}"></figure></section>'


@dataclass(frozen=True)
class Confusion:
    """The misclassified images of one (true, predicted) pair: how many, and those the gallery shows."""

    true: str
    predicted: str
    count: int
    shown: list[dict]


GALLERY_ORDER = ("Grouped by confusion (true → predicted), the most frequent first; within each, the most "
                 "confident mistakes first.")
GALLERY_ROOM = "Every confusion shows one image while there is room; the rest is shared in proportion to their counts."


def gallery(misclassified: list[dict], limit: int) -> list[Confusion]:
    """Every confusion with the images to show, largest confusion first, at most ``limit`` images in all.

    Path order showed only the first classes' errors. Here every confusion gets one image while
    there is room (a rare confusion can be the telling one), then the rest of the room is shared
    in proportion to their counts (D'Hondt), so the largest confusion also shows the most. Within
    a confusion, the most confident mistakes come first: they are the label errors and the
    systematic failures, where a low-probability mistake is a near miss.
    """
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for item in misclassified:
        groups[item["true"], item["predicted"]].append(item)
    pairs = sorted(groups, key=lambda pair: (-len(groups[pair]), pair))
    room = _share([len(groups[pair]) for pair in pairs], limit)
    return [
        Confusion(*pair, len(groups[pair]),
                  sorted(groups[pair], key=lambda item: (-item["probability"], item["relpath"]))[:n])
        for pair, n in zip(pairs, room, strict=True)
    ]


def _share(counts: list[int], limit: int) -> list[int]:
    """How many of each count to show: one each while the limit allows (in the given order), the rest by
    highest count per slot already given, never more than a count."""
    shown = [1 if i < limit else 0 for i in range(len(counts))]
    for _ in range(limit - sum(shown)):
        unfilled = [i for i, count in enumerate(counts) if shown[i] < count]
        if not unfilled:
            break
        shown[max(unfilled, key=lambda i: (counts[i] / (shown[i] + 1), -i))] += 1
    return shown


def _gallery_html(misclassified: list[dict], max_gallery: int) -> str:
    esc = html.escape
    if misclassified and "error" in misclassified[0]:  # numbers: the largest errors, largest first
        shown = misclassified[:max_gallery]
        note = f"The {len(shown)} test images with the largest absolute error, largest first."
        items = "".join(_gallery_item(item) for item in shown)
        return (f'<section><h2>Largest errors on test images</h2><p class="note">{esc(note)}</p>'
                f'<div class="gallery">{items}</div></section>')
    confusions = gallery(misclassified, max_gallery)
    shown = sum(len(c.shown) for c in confusions)
    if not misclassified:
        note = "No misclassified test images."
    elif shown < len(misclassified):
        note = (f"Showing {shown} of {len(misclassified)}; {len(misclassified) - shown} left out. {GALLERY_ORDER} "
                f"{GALLERY_ROOM}")
    else:
        note = f"All {shown} shown. {GALLERY_ORDER}"
    hidden = [c for c in confusions if not c.shown]
    if hidden:
        note += f" {len(hidden)} smaller confusion(s) with no room: " + ", ".join(
            f"{c.true} → {c.predicted} ({c.count})" for c in hidden) + "."
    groups = "".join(
        f'<h3>true <span class="true">{esc(c.true)}</span> → predicted <span class="pred">{esc(c.predicted)}'
        f'</span>: {c.count} image{"s" if c.count > 1 else ""}'
        f'{f", {len(c.shown)} shown" if len(c.shown) < c.count else ""}</h3>'
        f'<div class="gallery">{"".join(_gallery_item(item) for item in c.shown)}</div>'
        for c in confusions if c.shown
    )
    return (f'<section><h2>Misclassified test images</h2><p class="note">{esc(note)}</p>{groups}</section>')


def _gallery_item(item: dict) -> str:
    esc = html.escape
    thumbnail = _thumbnail(Path(item["path"]))
    picture = (f'<img src="{_data_uri(thumbnail, "image/png")}" alt="{esc(item["relpath"])}">' if thumbnail
               else '<div class="missing">image unreadable</div>')
    breakable = esc(item["relpath"]).replace("/", "/<wbr>")
    return (f'<div class="item">{picture}<div class="path">{breakable}</div>'
            f'<div>true <b class="true">{esc(item["true"])}</b>, predicted <b class="pred">'
            f'{esc(item["predicted"])}</b> {_confidence(item)}</div>'
            f'<div class="note">head {esc(item["head"])}</div></div>')


def _confidence(item: dict) -> str:
    """How sure the head was (a class's probability), or how far off (a number's error)."""
    return f"(error {item['error']:.4g})" if "error" in item else f"at {item['probability']:.1%}"


def _thumbnail(path: Path) -> bytes | None:
    """A small PNG of the image, or None when it cannot be read.

    Any failure means None: a report about errors must not fail on a file that moved or broke
    since extraction, and Pillow raises many exception types for damaged files. draft() lets a
    large JPEG decode at reduced scale.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMBNAIL_PX, THUMBNAIL_PX))
            small = ImageOps.exif_transpose(image).convert("RGB")
            small.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buffer = io.BytesIO()
            small.save(buffer, format="PNG")
            return buffer.getvalue()
    except Exception:
        return None


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
