"""The head protocol: what every head does, whatever library computes it.

A head is built from its registry entry and ``FitOptions`` (set before fitting, never changed by
it). ``fit`` learns from arrays in memory, ``fit_streamed`` from a cache's shards within a memory
plan; both choose what the options leave open ("auto" scaling, C, gamma, epochs) on validation
rows and return the head. What fitting learns lives in ``record`` (JSON) and in the head's arrays
or Keras model, never in its options. ``predict_proba`` gives (N, n_classes) probabilities, and
``predict_values`` (N,) numbers for a regression target (a head fitted with ``n_classes=0``);
``save``/``load`` write and read data only (JSON, ``.npz`` read without pickle, ``.keras`` in
safe mode); ``to_keras`` is the head as built-in Keras layers, for export and fine-tuning, or a
one-line refusal. ``for_fold`` is the same recipe with every choice pinned, for cross-validation.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from featcache import FeatcacheError
from featcache.dataset import file_sha256
from featcache.files import raise_if_out_of_space

OPTIMIZERS = ("adam", "rmsprop", "sgd")  # sgd: with momentum 0.9
SCALINGS = ("auto", "standard", "l2", "none", "rms")
CLASS_WEIGHTS = (None, "balanced")
THRESHOLDS = ("balanced-accuracy",)  # what a two-class head's decision threshold can be chosen by
# Raised when fitting changes what a head learns from the same options (2: svm/svm-rbf calibrate on
# shuffled folds; 3: heads stored as data only, scaling chosen on validation, linear heads fitted in
# the span of the training rows, gamma chosen for svm-rbf, Keras heads standardise their input;
# 4: svm fitted by libsvm on the Gram matrix, its intercept unpenalised; 5: Keras heads divide their
# input by its root mean square, and the other heads' "auto" searches rms in place of none; 6: a Keras
# head's epoch is at least 20 steps, a smaller training set repeated). fit-head
# keeps an already fitted head only when it was made by this recipe.
FIT_RECIPE = 6
RECORD = "head.json"
# head.json's layout (1: kind, files with their sha256, options with scaling; heads before it stored
# model_file and a pickle, and are refitted). Raise it when the meaning of a stored field changes.
RECORD_FORMAT = 1


@dataclass(frozen=True)
class FitOptions:
    """Training options. The defaults learn from 30 images as from thousands: Adam 1e-3 on
    features divided by their root mean square, with early stopping. Chollet's recipe is
    ``FitOptions(optimizer="rmsprop", learning_rate=2e-5, scaling="none", patience=None)``."""

    epochs: int = 50
    batch_size: int = 20
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    seed: int = 0
    class_weight: str | None = None  # None or "balanced"
    patience: int | None = 10  # early stopping on validation loss (best weights restored)
    scaling: str = "auto"  # auto: chosen on validation (linear heads) or rms (Keras heads)
    precision: str = "auto"  # Keras training: auto (timed once per machine), float32, mixed_bfloat16, ...
    # two classes: None decides by the most probable class (0.5), a number pins the second class's probability
    # from which it is predicted, "balanced-accuracy" chooses that on validation (for imbalanced classes)
    threshold: float | str | None = None

    def __post_init__(self):
        from featcache.precision import PRECISIONS

        for option, value, allowed in (("optimizer", self.optimizer, OPTIMIZERS),
                                       ("precision", self.precision, PRECISIONS),
                                       ("scaling", self.scaling, SCALINGS),
                                       ("class-weight", self.class_weight, CLASS_WEIGHTS)):
            if value not in allowed:
                names = ", ".join(str(a) for a in allowed if a is not None)
                raise FeatcacheError(f"--{option} {value!r}: choose one of {names}")
        if isinstance(self.threshold, str) and self.threshold not in THRESHOLDS or (
                isinstance(self.threshold, int | float) and not 0 < self.threshold < 1):
            raise FeatcacheError(f"--threshold {self.threshold!r}: a probability between 0 and 1, or "
                                 f"{' or '.join(THRESHOLDS)} (chosen on validation)")
        if self.epochs < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise FeatcacheError(
                f"epochs {self.epochs}, batch size {self.batch_size} and learning rate "
                f"{self.learning_rate} must all be positive"
            )

    def to_json(self) -> dict:
        """The options; one added later is left out at its default, so heads fitted before it keep theirs."""
        options = asdict(self)
        if options["threshold"] is None:
            del options["threshold"]
        return options

    @classmethod
    def from_json(cls, data: dict) -> FitOptions:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def pinned(self, **changes) -> FitOptions:
        return replace(self, **changes)


@dataclass(frozen=True)
class HeadRecord:
    """The fields of ``head.json`` that every reader relies on, typed and checked; ``details`` holds
    what only some heads record (metrics, what validation chose, history, memory, fine-tuning)."""

    name: str
    kind: str
    cache_key: str
    classes: tuple[str, ...]
    feature_shape: tuple[int, ...]
    options: FitOptions
    files: dict
    format: int = RECORD_FORMAT
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**self.details, "format": self.format, "name": self.name, "kind": self.kind,
                "cache_key": self.cache_key, "classes": list(self.classes),
                "feature_shape": list(self.feature_shape), "options": self.options.to_json(), "files": self.files}

    @classmethod
    def from_json(cls, data: dict, where: Path) -> HeadRecord:
        """The record, or a one-line error naming the file and what to do."""
        folder = Path(where).parent if Path(where).name == RECORD else Path(where)  # the head's folder is its name
        fix = f"fit it again with `featcache fit-head --head {data.get('name', folder.name)} --refit`"
        if data.get("format") != RECORD_FORMAT:
            raise FeatcacheError(f"{where}: head record format {data.get('format')!r}, not {RECORD_FORMAT} (saved by "
                                 f"another featcache version); {fix}")
        fixed = ("name", "kind", "cache_key", "classes", "feature_shape", "options", "files")
        try:
            record = cls(str(data["name"]), str(data["kind"]), str(data["cache_key"]),
                         tuple(str(c) for c in data["classes"]), tuple(int(n) for n in data["feature_shape"]),
                         FitOptions.from_json(data["options"]), dict(data["files"]),
                         details={k: v for k, v in data.items() if k not in (*fixed, "format")})
        except (KeyError, TypeError, ValueError, FeatcacheError) as exc:
            raise FeatcacheError(f"{where}: not a valid head record ({exc}); {fix}") from None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in record.files.items()):
            raise FeatcacheError(f"{where}: the record's files are not names with their sha256; {fix}")
        return record


class Head:
    """Base of every head: provenance, saving, loading; subclasses learn and predict.

    ``record`` is the head's JSON record: options, what validation chose, history, fit time, the
    cache it was fitted on, metrics. Subclasses set ``kind`` (the key that ``load`` dispatches on)
    and implement ``fit``, ``fit_streamed``, ``predict_proba``, ``to_keras``, ``_write``, ``_read``.
    """

    kind = ""
    # can fit from streamed shards when the cache is over the memory budget; a head that cannot is
    # refused before any work (heads.memory_plan, evaluate.check_cross_validation_fits), never streamed
    streams = True
    refittable = True  # cross-validation can refit its recipe on a fold

    def __init__(self, name: str, options: FitOptions = FitOptions()):
        self.name = name
        self.options = options
        self.record: dict = {}

    @classmethod
    def restore(cls, name: str, options: FitOptions, record: dict) -> Head:
        """An unfitted head rebuilt from its record, for ``load`` (kinds add their own state)."""
        return cls(name, options)

    # --- what subclasses implement ----------------------------------------------------------------

    def fit(self, x: np.ndarray, y: np.ndarray, *, n_classes: int, validation=None, say=None) -> Head:
        raise NotImplementedError

    def fit_streamed(self, cache, plan, *, rows=None, say=None) -> Head:
        raise NotImplementedError

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_values(self, features: np.ndarray) -> np.ndarray:
        """(N,) numbers: what a head fitted on a regression target predicts."""
        raise FeatcacheError(f"{self.name} predicts classes, not numbers")

    def stream_plan(self, cache, budget: int):
        """The memory plan of a streamed fit within ``budget`` bytes (refuses one too small)."""
        from featcache import streaming

        return streaming.sgd_plan(cache, budget)

    def to_keras(self, feature_shape: tuple[int, ...]):
        raise NotImplementedError

    def for_fold(self) -> Head:
        """An unfitted head of the same recipe, with every choice validation made pinned."""
        raise NotImplementedError

    def _write(self, folder: Path) -> list[str]:
        raise NotImplementedError

    def _read(self, folder: Path) -> None:
        raise NotImplementedError

    # --- shared behaviour -------------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        """The classes it tells apart; 0 for a head fitted on a regression target (it predicts numbers)."""
        return len(self.record["classes"])

    @property
    def predicts_values(self) -> bool:
        """Whether it was fitted on a regression target (its record's output is a value)."""
        return self.record.get("output") == "value"

    @property
    def predicts_sets(self) -> bool:
        """Whether it was fitted on a multi-label target (one independent probability per class)."""
        return self.record.get("output") == "multilabel"

    @property
    def threshold(self) -> float | list[float] | None:
        """The decision threshold of a two-class head (on the second class's probability), if it has one;
        a multi-label head's thresholds, one per class."""
        return (self.record.get("threshold") or {}).get("value")

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class indices: the most probable class of each row, or by the head's threshold (two classes);
        numbers for a regression target; rows of 0 and 1 (one per class) for a multi-label target."""
        if self.predicts_values:
            return self.predict_values(features)
        return decide(self.predict_proba(features), self.threshold)

    def check_cache(self, cache) -> None:
        if self.record.get("cache_key") != cache.key:
            fitted = str(self.record.get("cache_key"))[:16]
            raise FeatcacheError(
                f"head {self.name} was fitted on cache {fitted}, not {cache.key[:16]}; "
                f"fit it again with `featcache fit-head --head {self.name} --cache {cache.key[:16]}`"
            )

    def save(self, folder: Path) -> Path:
        """Write the head to a temporary folder, then swap it in: never a half-written head."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            files = self._write(tmp)
            self.record.update(format=RECORD_FORMAT, kind=self.kind, name=self.name, options=self.options.to_json(),
                               files={f: file_sha256(tmp / f) for f in files})
            typed = HeadRecord.from_json(self.record, tmp / RECORD)  # what load will read back
            (tmp / RECORD).write_text(json.dumps(typed.to_json(), indent=2))
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise_if_out_of_space(exc, f"saving head {self.name} to {folder}")
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder


def read_record(folder: Path) -> dict:
    """A saved head's ``head.json`` (checked as a ``HeadRecord``): provenance and metrics, without
    loading the model."""
    try:
        record = json.loads((Path(folder) / RECORD).read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, or not UTF-8 text at all
        raise FeatcacheError(f"{folder}: not a saved head ({exc}); fit it with `featcache fit-head`") from None
    if not isinstance(record, dict):
        raise FeatcacheError(f"{folder / RECORD}: not a head record; fit the head again with `featcache fit-head`")
    HeadRecord.from_json(record, Path(folder) / RECORD)
    return record


def check_files(folder: Path, record: dict) -> None:
    """Refuse a head whose files are missing or changed since it was saved (damage, not an attack:
    loading runs no code whatever the files hold)."""
    name = record.get("name", folder.name)
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise FeatcacheError(
            f"{folder}: a head saved by an older featcache (recipe {record.get('fit_recipe')}); "
            f"fit it again with `featcache fit-head --head {name} --refit`"
        )
    for file, digest in files.items():
        path = folder / file
        if Path(file).name != file or not path.is_file() or file_sha256(path) != digest:
            raise FeatcacheError(
                f"{path} is missing or does not match the sha256 recorded when it was saved; "
                f"refusing to load it (fit the head again with `featcache fit-head --head {name} --refit`)"
            )


def class_weight_of(labels: np.ndarray, n_classes: int, class_weight: str | None) -> dict[int, float] | None:
    """'balanced' weights as scikit-learn defines them: n / (k * n_class), from these labels."""
    if class_weight is None:
        return None
    counts = np.bincount(np.asarray(labels, int), minlength=n_classes)
    return {i: float(len(labels) / (n_classes * max(n, 1))) for i, n in enumerate(counts)}


def decide(probabilities: np.ndarray, threshold: float | list[float] | None = None) -> np.ndarray:
    """Class indices: the most probable class; with two classes and a threshold, the second class where its
    probability reaches the threshold. With one threshold per class (multi-label), every class whose
    probability reaches its threshold: rows of 0 and 1."""
    p = np.asarray(probabilities)
    if isinstance(threshold, list | tuple | np.ndarray):
        return (p >= np.asarray(threshold)).astype(np.int32)
    if threshold is not None and p.shape[1] == 2:
        return (p[:, 1] >= threshold).astype(int)
    return p.argmax(axis=1)


def choose_threshold(labels: np.ndarray, positive: np.ndarray) -> tuple[float, float, float]:
    """(threshold, its balanced accuracy, 0.5's) on these rows: the threshold on the second class's
    probability with the best balanced accuracy (0.5 when it is as good; else the middle of the best
    interval between two rows' scores, nearest 0.5). Imbalanced classes move it off 0.5; balanced ones
    rarely do."""
    from sklearn.metrics import roc_curve

    labels, positive = np.asarray(labels), np.asarray(positive, np.float64)
    at_half = _balanced_accuracy(labels, positive >= 0.5)
    fpr, tpr, cuts = roc_curve(labels, positive, drop_intermediate=False)  # class 1 where positive >= cut
    balanced = (tpr + 1 - fpr) / 2
    best = float(balanced.max())
    if at_half >= best - 1e-12:
        return 0.5, at_half, at_half
    lower = np.append(cuts[1:], 0.0)  # each cut's interval of identical decisions: (lower, cut]
    upper = np.where(np.isinf(cuts), np.maximum(lower, 1.0), cuts)  # the first: above every score
    # an empty interval: above the top score of 1.0 (nothing predicted second), or at a lowest score of 0.0
    middles = np.where(upper > lower, (upper + lower) / 2, np.where(np.isinf(cuts), np.nextafter(lower, 2), cuts))
    candidates = np.flatnonzero(balanced >= best - 1e-12)
    chosen = candidates[np.argmin(np.abs(middles[candidates] - 0.5))]
    return float(middles[chosen]), best, at_half


def choose_label_thresholds(labels: np.ndarray, probabilities: np.ndarray) -> list[float]:
    """A multi-label head's threshold per class: the one with the best F1 of that class on these rows (0.5
    when it is as good, or when the class has no positive row; else the middle of the best interval
    between two rows' scores, nearest 0.5). Rare classes get low thresholds, where 0.5 would never
    name them."""
    labels, probabilities = np.asarray(labels, bool), np.asarray(probabilities, np.float64)
    chosen = []
    for truth, scores in zip(labels.T, probabilities.T, strict=True):
        if not truth.any():
            chosen.append(0.5)
            continue
        cuts = np.unique(scores)  # each cut: an interval of identical decisions, (cut below, cut]
        middles = (np.append(0.0, cuts[:-1]) + cuts) / 2
        f1 = _f1_where_reached(middles, scores, truth)
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        nearest = float(middles[best[np.argmin(np.abs(middles[best] - 0.5))]])
        chosen.append(0.5 if _f1_where_reached(np.array([0.5]), scores, truth)[0] >= f1.max() - 1e-12 else nearest)
    return chosen


def _f1_where_reached(cuts: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """F1 of predicting the class where score >= cut, for each cut: 2 TP / (predicted + actual)."""
    ranked, positives = np.sort(scores), np.sort(scores[truth])
    predicted = len(ranked) - np.searchsorted(ranked, cuts)
    true_positive = len(positives) - np.searchsorted(positives, cuts)
    return 2 * true_positive / (predicted + len(positives))


def _balanced_accuracy(labels: np.ndarray, predicted_second: np.ndarray) -> float:
    recalls = [np.mean(predicted_second[labels == c] == bool(c)) for c in (0, 1) if np.any(labels == c)]
    return float(np.mean(recalls))


def two_columns(p: np.ndarray) -> np.ndarray:
    """(N, 2) probabilities from one sigmoid column."""
    p = np.asarray(p, np.float64).reshape(-1)
    return np.column_stack([1 - p, p])
