"""Progress for long work: images done, images/s and ETA, on stderr so stdout stays parseable."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:.1f} img/s" if task.speed else "")


class ImageProgress:
    """A context manager that shows one bar over ``total`` images, or nothing when disabled."""

    def __init__(self, total: int, description: str = "backbone", enabled: bool = True):
        self.enabled = enabled and total > 0
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, disable=not (self.enabled and self.console.is_terminal),
        )
        self.task = self.progress.add_task(description, total=total)
        self.next_log = 0.1  # without a terminal (CI, logs), print a plain line every 10%

    def __enter__(self) -> ImageProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance_to(self, completed: int) -> None:
        n = completed - self.progress.tasks[0].completed
        self.progress.advance(self.task, n)
        task = self.progress.tasks[0]
        plain = self.enabled and n > 0 and not self.console.is_terminal
        if plain and task.completed >= self.next_log * task.total:
            self.next_log += 0.1
            rate = task.speed or (task.completed / task.elapsed if task.elapsed else None)
            speed = f", {rate:.1f} img/s" if rate else ""  # rich's speed needs a few updates; else the mean
            eta = f"ETA {task.time_remaining:.0f} s" if task.time_remaining is not None else ""
            done = f"{task.completed:.0f}/{task.total:.0f} images"
            self.console.print(f"{task.description}: {done}{speed} {eta}".rstrip())
