"""Console output: rich progress bars on stderr, one console for the whole run."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[..., None]]:
    """A progress bar; yields `advance(n=1, **fields)`, where fields update the bar's status text."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console, transient=False) as prog:
        task = prog.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields) -> None:
            prog.update(task, advance=n, status=" ".join(f"{k} {v}" for k, v in fields.items()))

        yield advance
