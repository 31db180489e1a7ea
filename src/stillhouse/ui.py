"""Console output: rich progress bars on stderr, one console for the whole run."""

from __future__ import annotations

import time
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
        pending, last = [0, {}], [0.0]

        def flush() -> None:
            prog.update(task, advance=pending[0], status=" ".join(f"{k} {v}" for k, v in pending[1].items()))
            pending[0], last[0] = 0, time.monotonic()

        def advance(n: int = 1, **fields) -> None:
            # Called once per teacher call, from the thread that also writes the ledger: keep it
            # cheap and hand rich at most ten updates a second.
            pending[0] += n
            if fields:
                pending[1] = fields
            if time.monotonic() - last[0] >= 0.1:
                flush()

        yield advance
        flush()
