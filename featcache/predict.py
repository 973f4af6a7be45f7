"""Class probabilities (or numbers, for a regression target; sets of classes for a multi-label one) for new
image files, computed exactly as
the cache and the head were.

Images go through the same decoder and feature model as extraction (``extract.decoded_batches``,
``model.feature_model``), are rounded to the cache's dtype, and reach the head's own
``predict_proba``: a prediction on a training image equals the head's prediction on its cached
row. Files that cannot be used are skipped and reported, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from featcache import FeatcacheError, precision
from featcache.cache import Cache
from featcache.dataset import images_under
from featcache.extract import decoded_batches
from featcache.heads import Head, head_dir, head_info, load_head, saved_heads
from featcache.heads.protocol import decide
from featcache.images import IMAGE_SUFFIXES
from featcache.model import cache_config, cache_weights, feature_model
from featcache.progress import ImageProgress
from featcache.report import best_index, default_select_by, rich_text

FORMATS = ("table", "json", "csv")


@dataclass
class Predictions:
    classes: list[str]  # empty for a regression target
    paths: list[Path]
    probabilities: np.ndarray  # (len(paths), len(classes)); (len(paths),) numbers for a regression target
    rejects: list[tuple[Path, str]] = field(default_factory=list)
    threshold: float | list[float] | None = None  # a two-class head's decision threshold, or one per class

    @property
    def sets(self) -> bool:
        """Whether each image gets a set of classes (a multi-label head: one threshold per class)."""
        return isinstance(self.threshold, list)

    def rows(self) -> list[dict]:
        """One dict per image: path, predicted class, its probability, and every class's probability;
        path and value for a regression target; path, the predicted classes (those whose probability
        reaches their threshold, maybe none) and every class's probability for a multi-label one."""
        if not self.classes:
            return [{"path": str(path), "value": float(v)} for path, v in zip(self.paths, self.probabilities,
                                                                               strict=True)]
        if self.sets:
            decided = decide(self.probabilities, self.threshold) if len(self.paths) else []
            return [{"path": str(path), "classes": [c for c, on in zip(self.classes, chosen, strict=True) if on],
                     "probabilities": {c: float(v) for c, v in zip(self.classes, p, strict=True)}}
                    for path, p, chosen in zip(self.paths, self.probabilities, decided, strict=True)]
        decided = decide(self.probabilities, self.threshold) if len(self.paths) else []
        return [
            {"path": str(path), "class": self.classes[int(k)], "probability": float(p[k]),
             "probabilities": {c: float(v) for c, v in zip(self.classes, p, strict=True)}}
            for path, p, k in zip(self.paths, self.probabilities, decided, strict=True)
        ]


def image_files(inputs: list[Path]) -> list[Path]:
    """Files named directly (whatever their suffix: the decoder decides) and images under folders."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += images_under(item)
        elif item.exists():
            files.append(item)
        else:
            raise FeatcacheError(f"{item}: no such file or folder")
    if not files:
        raise FeatcacheError(
            f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {', '.join(map(str, inputs))}"
        )
    return files


def screen(files: list[Path]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """(files whose header is an image's, (file, reason) for the rest): reads a few bytes per file and
    no TensorFlow, so that a text file is refused before the model is built. The decoder still has
    the last word on the files kept (a truncated image passes here)."""
    from PIL import Image, UnidentifiedImageError

    usable, refused = [], []
    for path in files:
        if not Path(path).is_file():  # a FIFO or a device would block the read, or never end
            refused.append((path, "not a regular file"))
            continue
        try:
            if path.stat().st_size == 0:
                refused.append((path, "empty file"))
                continue
            with Image.open(path):
                pass
        except UnidentifiedImageError:
            refused.append((path, "not an image (unrecognised format)"))
            continue
        except Exception:  # noqa: S110 - unreadable or odd files: load_image gives the precise reason later
            pass
        usable.append(path)
    return usable, refused


def best_head(cache: Cache) -> str:
    """The head with the highest validation accuracy (ties: lower log loss), for numbers the lowest
    validation RMSE (ties: lower MAE), for sets of classes the highest macro F1: as compare marks it by
    default."""
    rows = []
    for name in saved_heads(cache):
        metrics = head_info(head_dir(cache, name)).get("metrics", {}).get("validation")
        if metrics:
            scores = ("accuracy", "log_loss", "rmse", "mae", "macro_f1", "micro_f1", "hamming_loss")
            rows.append({"head": name, **{f"val_{k}": metrics.get(k) for k in scores}})
    if not rows:
        raise FeatcacheError(
            f"no heads fitted on cache {cache.key[:16]}; run `featcache fit-head --head dense256` first"
        )
    return rows[best_index(rows, default_select_by(cache.task))]["head"]


def open_head(cache: Cache, name: str | None) -> Head:
    """The named head of this cache (default: the best one), checked against the cache."""
    name = name or best_head(cache)
    folder = head_dir(cache, name)
    if not (folder / "head.json").is_file():
        raise FeatcacheError(not_fitted(cache, name))
    head = load_head(folder)
    head.check_cache(cache)
    return head


FINETUNED = "-finetuned"  # finetune saves HEAD-finetuned beside the heads fit-head trains


def check_head_name(name: str | None) -> None:
    """Refuse a head name that no command can produce, with the closest real names, before any work."""
    import difflib

    from featcache.heads import HEADS

    if name is None or name in HEADS or name.removesuffix(FINETUNED) in HEADS:
        return
    close = difflib.get_close_matches(name, HEADS, n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise FeatcacheError(f"--head {name}: no head of that name exists: {hint}`featcache heads` lists those "
                         f"fit-head can train (and finetune saves HEAD{FINETUNED})")


def not_fitted(cache: Cache, name: str) -> str:
    """Why ``name`` cannot be used on this cache, and a command that fixes it (only for a head that
    fit-head can train; otherwise the heads that exist)."""
    import difflib

    from featcache.heads import HEADS

    fitted = saved_heads(cache)
    problem = f"--head {name}: not fitted on cache {cache.key[:16]} (fitted: {', '.join(fitted) or 'none'})"
    if name in HEADS:
        return f"{problem}; run `featcache fit-head --head {name} --cache {cache.key[:16]}`"
    if name.removesuffix(FINETUNED) in HEADS:
        return f"{problem}; `featcache finetune --head {name.removesuffix(FINETUNED)}` makes it"
    close = difflib.get_close_matches(name, [*fitted, *HEADS], n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return f"{problem}; no head of that name exists: {hint}`featcache heads` lists those fit-head can train"


class Predictor:
    """A cache's feature model and one of its heads, built once, applied to any number of files."""

    def __init__(self, cache: Cache, head: Head, compute: str = "auto"):
        """``compute``: the precision of the feature model; ``auto`` is the cache's own where this
        machine runs it natively (``precision.follow``), so new images meet the cached rows' model."""
        head.check_cache(cache)
        self.cache, self.head = cache, head
        config = cache_config(cache)
        self.precision = precision.follow(config.precision, compute)
        self.config = replace(config, precision=self.precision.precision)
        self.weights = cache_weights(cache)  # missing weights are refused here, before any image
        self._features = None

    @property
    def features(self):
        """The feature model, built (TensorFlow started) when the first usable image needs it."""
        if self._features is None:
            self._features = feature_model(self.config, self.weights)
        return self._features

    def predict(self, files: list[Path], batch_size: int = 32, show_progress: bool = True) -> Predictions:
        """Probabilities for the files that can be used; the others, with reasons, in ``rejects``."""
        usable, refused = screen(files)
        predictions = self._predict(usable, batch_size, show_progress) if usable else Predictions(
            self.cache.classes, [], np.zeros((0, len(self.cache.classes)) if self.cache.classes else 0))
        order = {path: i for i, path in enumerate(files)}
        predictions.rejects = sorted(refused + predictions.rejects, key=lambda reject: order[reject[0]])
        return predictions

    def _predict(self, files: list[Path], batch_size: int, show_progress: bool) -> Predictions:
        rejected: dict[int, str] = {}
        kept: list[int] = []
        chunks: list[np.ndarray] = []
        with ImageProgress(len(files), description="predict", enabled=show_progress) as progress:
            batches = decoded_batches(files, self.config.image_size, self.config.resize, batch_size,
                                      rejected.__setitem__)
            for indices, batch in batches:
                features = np.asarray(self.features(np.asarray(batch, np.float32), training=False))
                chunks.append(self._outputs(features.astype(self.config.dtype)))
                kept += indices.tolist()
                progress.advance_to(int(indices[-1]) + 1)
            progress.advance_to(len(files))
        n_classes = len(self.cache.classes)
        probabilities = np.concatenate(chunks) if chunks else np.zeros((0, n_classes) if n_classes else 0)
        rejects = [(files[i], reason) for i, reason in sorted(rejected.items())]
        return Predictions(self.cache.classes, [files[i] for i in kept], probabilities, rejects, self.head.threshold)

    def _outputs(self, features: np.ndarray) -> np.ndarray:
        return self.head.predict_values(features) if self.head.predicts_values else self.head.predict_proba(features)


def format_predictions(predictions: Predictions, fmt: str) -> str:
    """table for people, json (a list of objects with path, class, probability; or path, value) or csv
    for programs."""
    rows = predictions.rows()
    if fmt == "json":
        return json.dumps(rows, indent=2)
    if not predictions.classes:
        return _format_values(rows, fmt)
    if predictions.sets:
        return _format_sets(rows, predictions.classes, fmt)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "class", "probability", *(f"p_{c}" for c in predictions.classes)])
        for row in rows:
            writer.writerow([row["path"], row["class"], f"{row['probability']:.6f}",
                             *(f"{v:.6f}" for v in row["probabilities"].values())])
        return out.getvalue().rstrip("\n")
    if fmt == "table":
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for column, justify in (("path", "left"), ("class", "left"), ("probability", "right")):
            table.add_column(column, justify=justify, overflow="fold")  # a long path folds, never cut
        for row in rows:
            table.add_row(row["path"], row["class"], f"{row['probability']:.1%}")
        return rich_text(table)
    raise FeatcacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _format_values(rows: list[dict], fmt: str) -> str:
    """The predicted numbers of a regression head as csv or a table."""
    if fmt == "csv":
        return "\n".join(["path,value", *(f"{_csv_field(row['path'])},{row['value']:.6g}" for row in rows)])
    if fmt == "table":
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("path", overflow="fold")
        table.add_column("value", justify="right")
        for row in rows:
            table.add_row(row["path"], f"{row['value']:.4g}")
        return rich_text(table)
    raise FeatcacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _format_sets(rows: list[dict], classes: list[str], fmt: str) -> str:
    """A multi-label head's predicted classes (joined by ';', as the CSV it learnt from) as csv or a table."""
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "classes", *(f"p_{c}" for c in classes)])
        for row in rows:
            probabilities = (f"{v:.6f}" for v in row["probabilities"].values())
            writer.writerow([row["path"], ";".join(row["classes"]), *probabilities])
        return out.getvalue().rstrip("\n")
    if fmt == "table":
        from rich import box
        from rich.table import Table

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        table.add_column("path", overflow="fold")
        table.add_column("classes (probability)", overflow="fold")
        for row in rows:
            chosen = ", ".join(f"{c} ({row['probabilities'][c]:.1%})" for c in row["classes"]) or "none"
            table.add_row(row["path"], chosen)
        return rich_text(table)
    raise FeatcacheError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")


def _csv_field(text: str) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([text])
    return out.getvalue()
