"""Progress for long work: images done, images/s and ETA, on stderr so stdout stays parseable."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} img/s" if task.speed else "- img/s")


class ImageProgress:
    """A context manager that shows one bar over ``total`` images, or nothing when disabled."""

    def __init__(self, total: int, description: str = "backbone", enabled: bool = True):
        self.enabled = enabled and total > 0
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not self.enabled,
        )
        self.task = self.progress.add_task(description, total=total)

    def __enter__(self) -> ImageProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)
