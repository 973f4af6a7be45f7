"""report.py renders plain data: tables in four formats, PNG figures and a self-contained HTML page."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache import FeatcacheError, report
from featcache.report import (
    COLUMNS,
    format_table,
    gallery,
    plot_comparison,
    plot_confusion_matrices,
    plot_learning_curves,
    write_report,
)

CLASSES = ["functional", "possibly defective (low confidence)", "likely defective", "defective"]


def make_row(head, val, test=0.8, loss=0.4, cv=None):
    return {
        "head": head, "val_accuracy": val, "test_accuracy": test,
        "val_balanced_accuracy": val - 0.02, "test_balanced_accuracy": None if test is None else test - 0.02,
        "val_log_loss": loss, "test_log_loss": None if test is None else loss + 0.05,
        "cv_accuracy": cv, "cv_std": None if cv is None else 0.012,
        "fit_seconds": 3.14159, "predict_seconds": 0.01234,
    }


@pytest.fixture
def rows():
    return [
        make_row("dense256", 0.85),
        make_row("logreg", 0.91, loss=0.30, cv=0.9),
        make_row("svm", 0.91, test=None, loss=0.35),
        make_row("<script>alert(1)</script>", 0.5),
    ]


def history(epochs, start=1.0):
    losses = list(np.linspace(start, 0.3, epochs))
    return {"loss": losses, "val_loss": [x + 0.1 for x in losses],
            "accuracy": [1 - x / 2 for x in losses], "val_accuracy": [0.95 - x / 2 for x in losses]}


def assert_png(path: Path, min_size=(200, 150)):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.width >= min_size[0] and image.height >= min_size[1]
        assert np.asarray(image.convert("L")).std() > 5


def write_images(folder: Path, n: int) -> list[dict]:
    items = []
    for i in range(n):
        path = folder / CLASSES[i % 4] / f"img_{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((300, 200, 3), (40 * i % 255, 90, 160), dtype=np.uint8)).save(path)
        items.append({"path": path, "relpath": str(path.relative_to(folder)), "true": CLASSES[i % 4],
                      "predicted": CLASSES[(i + 1) % 4], "probability": 0.5 + i / (4 * n), "head": "logreg"})
    return items


@pytest.fixture
def figures(tmp_path, rows):
    folder = tmp_path / "plots"
    matrix = [[5, 1, 0, 0], [2, 3, 1, 0], [0, 1, 4, 2], [0, 0, 1, 6]]
    return {
        "accuracy by head": plot_comparison(rows, folder / "comparison.png"),
        "confusion matrices": plot_confusion_matrices({r["head"]: matrix for r in rows}, CLASSES,
                                                      folder / "confusion.png"),
        "learning curves": plot_learning_curves({"dense256": history(12), "linear": history(8, 1.4)},
                                                folder / "curves.png"),
    }


def test_json_has_every_column_and_exactly_one_best(rows):
    data = json.loads(format_table(rows, "json"))
    assert [tuple(row) for row in data] == [COLUMNS] * len(rows)
    assert [row["head"] for row in data if row["best"]] == ["logreg"]
    assert data[2]["test_accuracy"] is None and data[1]["fit_seconds"] == 3.14159


def test_best_ties_on_validation_accuracy_go_to_lower_log_loss(rows):
    swapped = [rows[2], rows[1]]
    assert [row["best"] for row in json.loads(format_table(swapped, "json"))] == [False, True]


def test_numpy_scalars_serialise_as_plain_numbers(rows):
    rows[0]["val_accuracy"] = np.float32(0.5)
    assert json.loads(format_table(rows, "json"))[0]["val_accuracy"] == 0.5


def test_csv_has_columns_as_header_and_empty_cells_for_none(rows):
    reader = csv.DictReader(io.StringIO(format_table(rows, "csv")))
    records = list(reader)
    assert tuple(reader.fieldnames) == COLUMNS
    assert len(records) == len(rows)
    assert records[2]["test_accuracy"] == "" and records[0]["cv_accuracy"] == ""
    assert float(records[0]["val_accuracy"]) == 0.85
    assert [r["best"] for r in records].count("True") == 1


def test_markdown_has_header_and_one_line_per_head_with_best_marked(rows):
    lines = format_table(rows, "markdown").splitlines()
    assert lines[0].startswith("| head | val acc |") and set(lines[1]) <= set("|:-")
    assert len(lines) == 2 + len(rows)
    assert "**logreg** ★" in lines[3] and "★" not in lines[2]
    assert "| 85.0% |" in lines[2] and "| 0.300 |" in lines[3] and "| - |" in lines[4]


def test_table_marks_best_head_and_formats_numbers(rows):
    text = format_table(rows, "table")
    best_line = next(line for line in text.splitlines() if line.startswith("logreg"))
    assert "★" in best_line and "91.0%" in best_line and "0.300" in best_line and "3.14" in best_line
    assert "★" not in next(line for line in text.splitlines() if line.startswith("dense256"))
    assert "\x1b[" not in text


def test_unknown_format_names_the_choices(rows):
    with pytest.raises(FeatcacheError, match="table, markdown, json, csv") as error:
        format_table(rows, "yaml")
    assert "\n" not in str(error.value)


def test_learning_curves_png_with_fine_tuning_marker(tmp_path):
    curves = {"dense256": history(15), "logreg": {"loss": [0.9, 0.5]}}
    path = plot_learning_curves(curves, tmp_path / "curves.png", marker_epoch={"dense256": 10})
    assert path == tmp_path / "curves.png"
    assert_png(path, (800, 300))


def test_confusion_matrices_png_for_several_heads_and_long_class_names(tmp_path):
    matrices = {f"head{i}": np.eye(4, dtype=int).tolist() for i in range(4)}
    matrices["empty"] = np.zeros((4, 4), dtype=int).tolist()
    assert_png(plot_confusion_matrices(matrices, CLASSES, tmp_path / "cm.png"), (600, 400))


def test_class_names_with_dollar_signs_are_drawn_as_written_not_parsed_as_tex(tmp_path):
    """matplotlib reads $...$ as mathtext: 'y $\\frac$ z' raised a ValueError from deep inside it."""
    classes = ["y $\\frac$ z", "costs $5", "$x^2$"]
    assert_png(plot_confusion_matrices({"logreg": np.eye(3, dtype=int).tolist()}, classes, tmp_path / "cm.png"),
               (200, 200))


def test_comparison_png_with_missing_test_accuracy(tmp_path, rows):
    assert_png(plot_comparison(rows, tmp_path / "nested" / "comparison.png"), (500, 200))


def test_report_is_self_contained_and_escaped(tmp_path, rows, figures):
    items = write_images(tmp_path / "data", 3)
    facts = {"cache": "abc123", "command": "featcache compare --report r.html <&>"}
    path = write_report(tmp_path / "report.html", "elpv <test>", rows, figures, items, facts)
    page = path.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    assert page.count('src="data:image/png;base64,') == len(figures) + len(items)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "elpv &lt;test&gt;" in page and "--report r.html &lt;&amp;&gt;" in page
    assert all(item["relpath"] in page for item in items)
    assert "91.0%" in page and 'class="best"' in page
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_report_survives_unreadable_images_and_caps_gallery(tmp_path, rows, figures):
    items = write_images(tmp_path / "data", 8)  # 4 confusions of 2 images, item i+4 more confident than i
    items[4]["path"].write_bytes(b"not an image at all")
    items[5]["path"] = tmp_path / "moved-away.png"
    page = write_report(tmp_path / "r.html", "t", rows, figures, items, {}, max_gallery=5).read_text()
    assert page.count("image unreadable") == 2
    assert page.count('class="item"') == 5
    assert "Showing 5 of 8; 3 left out. Grouped by confusion (true → predicted), the most frequent first" in page
    shown = [item["relpath"].replace("/", "/<wbr>") in page for item in items]  # as the caption breaks it
    assert shown == [False, False, False, True, True, True, True, True]  # 1 more of the first pair, by name


def errors(true: str, predicted: str, probabilities) -> list[dict]:
    return [{"path": Path(f"/nowhere/{true}/{p}.png"), "relpath": f"{true}/{true}-as-{predicted}-{p}.png",
             "true": true, "predicted": predicted, "probability": p, "head": "logreg"} for p in probabilities]


def test_gallery_shows_largest_confusions_first_most_confident_first_and_every_confusion():
    """The issue's case: path order showed only the first classes' errors; the 30 defective cells read
    as functional come first here, and the single rare confusion still gets its image."""
    rng = np.random.default_rng(0)
    items = (errors("functional", "possibly", rng.uniform(0.4, 1, 8)) + errors("defective", "likely", [0.6])
             + errors("possibly", "functional", rng.uniform(0.4, 1, 20)) + errors("likely", "defective", [0.5, 0.9])
             + errors("defective", "functional", rng.uniform(0.4, 1, 30)))
    confusions = gallery(sorted(items, key=lambda item: item["relpath"]), 20)
    assert [(c.true, c.predicted, c.count, len(c.shown)) for c in confusions] == [
        ("defective", "functional", 30, 10), ("possibly", "functional", 20, 6), ("functional", "possibly", 8, 2),
        ("likely", "defective", 2, 1), ("defective", "likely", 1, 1)]  # one each, then 15 by D'Hondt
    for c in confusions:
        everything = sorted((i["probability"] for i in items if (i["true"], i["predicted"]) == (c.true, c.predicted)),
                            reverse=True)
        assert [i["probability"] for i in c.shown] == everything[:len(c.shown)]


def test_gallery_never_shows_more_than_a_confusion_has_and_fills_the_room():
    items = errors("a", "b", [0.9, 0.8]) + errors("c", "d", [0.7] * 9) + errors("e", "f", [0.6])
    assert [len(c.shown) for c in gallery(items, 60)] == [9, 2, 1]
    assert [len(c.shown) for c in gallery(items, 6)] == [4, 1, 1]
    assert [len(c.shown) for c in gallery(items, 2)] == [1, 1, 0]
    assert gallery([], 60) == []


def test_report_names_confusions_in_headings_and_those_without_room_in_the_note(tmp_path, rows):
    items = errors("defective", "functional", [0.9, 0.95, 0.7]) + errors("likely", "<b>x</b>", [0.8])
    items += errors("functional", "likely", [0.6])
    page = write_report(tmp_path / "r.html", "t", rows, {}, items, {}, max_gallery=2).read_text()
    assert ('<h3>true <span class="true">defective</span> → predicted <span class="pred">functional</span>: '
            '3 images, 1 shown</h3>') in page
    assert page.index("defective-as-functional-0.95") < page.index("functional-as-likely-0.6")
    assert "defective-as-functional-0.9.png" not in page
    assert ("shared in proportion to their counts. 1 smaller confusion(s) with no room: "
            "likely → &lt;b&gt;x&lt;/b&gt; (1).") in page
    assert "<b>x</b>" not in page


def drawn_figures(monkeypatch) -> list:
    """The matplotlib figures the plot functions draw, instead of their PNG files."""
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def test_comparison_accuracy_axis_stops_at_100_percent_and_labels_stay_inside(tmp_path, rows, monkeypatch):
    figures = drawn_figures(monkeypatch)
    plot_comparison([*rows, make_row("perfect", 1.0, test=1.0)], tmp_path / "c.png")
    (fig,) = figures
    ax = fig.axes[0]
    fig.canvas.draw()
    assert ax.get_xlim() == (0, 1)
    box = ax.get_window_extent()
    labels = [t for t in ax.texts if t.get_text().endswith("%")]
    assert "100.0%" in [t.get_text() for t in labels] and len(labels) == 2 * len(rows) + 1
    for text in labels:
        extent = text.get_window_extent()
        assert box.x0 <= extent.x0 and extent.x1 <= box.x1, text.get_text()


def test_learning_curve_accuracy_axis_stops_at_100_percent(tmp_path, monkeypatch):
    figures = drawn_figures(monkeypatch)
    perfect = {"loss": [0.5, 0.1, 0.01], "val_loss": [0.6, 0.3, 0.2], "accuracy": [0.7, 0.99, 1.0],
               "val_accuracy": [0.6, 0.8, 0.9]}
    plot_learning_curves({"dense256": perfect}, tmp_path / "curves.png")
    loss, accuracy = figures[0].axes[:2]
    assert accuracy.get_ylim()[1] == 1 and accuracy.get_ylim()[0] < 0.7
    assert loss.get_ylim()[1] > 0.6  # only the accuracy axis is capped


def pixels_of(image: np.ndarray, colour, tolerance=0) -> int:
    """How many pixels of an (H, W, 3) image are ``colour``, each channel within ``tolerance``."""
    return int((np.abs(image.astype(int) - colour).max(axis=-1) <= tolerance).sum())


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (CI installs it)")
def test_report_renders_in_headless_chromium(tmp_path, rows, figures):
    """What a reader sees in the first 1600 px: the table with the best row shaded, and the
    comparison figure decoded from its data URI, its validation and test bars in their colours."""
    report = write_report(tmp_path / "report.html", "featcache compare: vgg16 on elpv", rows, figures,
                          write_images(tmp_path / "data", 10), {"cache": "0123abcd", "seed": "0"})
    shot = tmp_path / "shot.png"
    subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1600", f"--screenshot={shot}",
         report.as_uri()],
        check=True, timeout=120, capture_output=True,
    )
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == (1200, 1600)
        seen = np.asarray(image.convert("RGB"))
    assert seen.std() > 10 and len(np.unique(seen.reshape(-1, 3), axis=0)) > 100  # not blank, not flat
    with Image.open(figures["accuracy by head"]) as figure:
        shown = np.asarray(figure.convert("RGB"))
    for name, colour in (("validation bars", (31, 119, 180)), ("test bars", (255, 127, 14))):  # C0, C1
        assert pixels_of(shown, colour) > 10_000  # the figure itself has them...
        assert pixels_of(seen, colour, 2) > 0.8 * pixels_of(shown, colour), f"the page shows no {name}"
    assert pixels_of(seen, (0xFF, 0xF4, 0xC2)) > 10_000, "the best row is not shaded"  # tr.best's CSS


@pytest.mark.parametrize("n_classes", [2, 3])
def test_precision_recall_curves_are_one_vs_rest_with_scikit_learns_average_precision(n_classes, tmp_path):
    """Two classes: the positive class's curve only; more: one per class present in the split."""
    from sklearn.metrics import average_precision_score

    from featcache.report import plot_precision_recall, precision_recall

    rng = np.random.default_rng(0)
    labels = rng.integers(0, n_classes, 60)
    if n_classes == 3:
        labels[labels == 2] = 0  # a class with no row in the split gets no curve
    scores = rng.random((60, n_classes)) + np.eye(n_classes)[labels]
    probabilities = scores / scores.sum(axis=1, keepdims=True)
    names = ["cat", "dog", "$bird$"][:n_classes]
    curves = precision_recall(labels, probabilities, names)
    expected = ["dog"] if n_classes == 2 else ["cat", "dog"]  # 3 classes: "$bird$" has no test row
    assert list(curves) == expected
    for name in expected:
        k = names.index(name)
        expected_ap = average_precision_score(labels == k, probabilities[:, k])
        assert curves[name]["average_precision"] == pytest.approx(expected_ap)
        assert curves[name]["support"] == int((labels == k).sum())
    assert_png(plot_precision_recall(curves, "logreg", "test", tmp_path / "pr.png"), (500, 350))
