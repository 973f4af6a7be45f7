"""What a label means: the task declared at extraction (``--task``), and what it changes.

- ``classification``: one class per image (folder names or a CSV column); classes sorted by name.
- ``ordinal``: ordered classes, elpv's four grades of defect. Stored as classification is (a class
  index per row), in the order given by ``--class-order`` or else the names' natural order
  ("2" before "10"), so every classification head applies and the ``ridge`` head can fit the
  class rank as a number and read it back as the nearest class.
- ``multilabel``: any number of classes per image (none too), from a CSV column listing them
  separated by ``;`` (``cat;outdoor``; a row of no class writes ``;`` alone). Stored as a multi-hot
  row of the classes (sorted by name), fitted with one sigmoid per class, each decided by its own
  threshold chosen on validation.
- ``regression``: a number per image, from a CSV column (``--label-column``) or an .npz; stored as
  float32, no classes; heads with a continuous output, metrics MAE, RMSE and R².

The task is part of the cache key (a change of target is a change of data) and of the manifest; a
cache made before tasks existed is a classification cache with an unchanged key.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from featcache import FeatcacheError

TASKS = ("classification", "ordinal", "multilabel", "regression")
CLASSIFICATION = "classification"
MULTILABEL = "multilabel"
REGRESSION = "regression"
SEPARATOR = ";"  # between the classes of a multi-label cell


@dataclass(frozen=True)
class Target:
    """The task and, for ordered classes, their order; checks itself when built."""

    task: str = CLASSIFICATION
    class_order: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.task not in TASKS:
            raise FeatcacheError(f"--task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.class_order is not None and self.task == REGRESSION:
            raise FeatcacheError("--class-order orders classes; a regression target has numbers, not classes: "
                                 "leave --class-order out")
        if self.class_order is not None and len(set(self.class_order)) != len(self.class_order):
            raise FeatcacheError(f"--class-order {','.join(self.class_order)}: a class is listed twice; "
                                 "list each class once")

    @property
    def has_classes(self) -> bool:
        return self.task != REGRESSION

    @property
    def one_class_each(self) -> bool:
        """Whether a label is one class (an index per row), as folders give them."""
        return self.task in (CLASSIFICATION, "ordinal")

    def classes(self, names: set[str], where: str) -> tuple[str, ...]:
        """The classes in index order: as ``--class-order`` lists them, else natural order for ordinal
        classes and sorted order otherwise; () for regression."""
        if not self.has_classes:
            return ()
        if self.class_order is None:
            return tuple(sorted(names, key=natural_key if self.task == "ordinal" else None))
        missing, extra = sorted(names - set(self.class_order)), sorted(set(self.class_order) - names)
        if missing or extra:
            said = [f"{', '.join(missing)} not in --class-order"] if missing else []
            said += [f"{', '.join(extra)} in --class-order but not in the data"] if extra else []
            raise FeatcacheError(f"--class-order for {where}: {'; '.join(said)}; list exactly the classes "
                                 f"found: {','.join(sorted(names, key=natural_key))}")
        return self.class_order

    def values(self, labels: list[tuple[str, str]], where: str) -> dict[str, float]:
        """Regression: label text -> number, or one line naming the rows (given as (row name, text)) that
        are not finite numbers."""
        numbers, bad = {}, []
        for row, text in labels:
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if math.isfinite(value):
                numbers[text] = value
            else:
                bad.append(f"{row} ({text!r})")
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise FeatcacheError(f"{where}: --task regression needs a number in every label; not a finite "
                                 f"number: {', '.join(bad[:3])}{more}; fix those rows or choose another "
                                 "--label-column")
        return numbers

    def label_sets(self, labels: list[tuple[str, str]], where: str) -> dict[str, tuple[str, ...]]:
        """Multi-label: label text -> its class names, or one line naming the rows (given as (row name,
        text)) with an empty class between separators (``cat;;dog``)."""
        sets, bad = {}, []
        for row, text in labels:
            names = [name.strip() for name in text.split(SEPARATOR)]
            if text.strip() == SEPARATOR:  # no class at all, said explicitly
                names = []
            if any(not name for name in names):
                bad.append(f"{row} ({text!r})")
            sets[text] = tuple(sorted(set(names)))
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise FeatcacheError(f"{where}: --task multilabel reads classes separated by {SEPARATOR!r}; an empty "
                                 f"class in: {', '.join(bad[:3])}{more}; write each class once (a row of no "
                                 f"class: {SEPARATOR!r} alone)")
        return sets


def natural_key(name: str) -> list:
    """Sort key reading digit runs as numbers: "grade 2" before "grade 10", "0.5" before "1"."""
    return [(0, float(part), "") if part else (1, 0.0, text)
            for text, part in ((t, t if re.fullmatch(r"\d+(\.\d+)?", t) else "")
                               for t in re.split(r"(\d+(?:\.\d+)?)", name)) if text]


DEFAULT = Target()  # one class per image
