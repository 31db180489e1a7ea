"""Training progress a person can follow: steps done of the total, loss, elapsed time and an ETA from the first step.

`TrainingProgress` is a transformers `TrainerCallback` (the trainer calls it; no training code knows it is there).
Where the console is a terminal it draws a rich bar that moves with every optimizer step; elsewhere (a log file, CI,
`nohup`) a live bar draws nothing until it ends, so it writes one plain line every 5% of the steps instead:

    train: step 15/300 (5%)  loss 2.3451  elapsed 0:12  eta 3:48

The total is the trainer's `max_steps`, known when training begins, so the bar shows `0/300` before the first step;
the ETA is the mean time per step so far times the steps left.
"""

from __future__ import annotations

import math
import time
from typing import Callable

from transformers import TrainerCallback

EVERY = 0.05  # a plain line every 5% of the steps


def clock(seconds: float | None) -> str:
    """`H:MM:SS` (or `M:SS` under an hour); `-:--` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--"
    s = int(round(max(0.0, seconds)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class TrainingProgress(TrainerCallback):
    """A progress bar (a terminal) or a plain line every `every` of the steps (anything else) for one training run.

    Use it as a context manager around `trainer.train()` so that the bar is closed if training fails; `console`
    defaults to stillhouse's (stderr), `live` to whether it is a terminal."""

    def __init__(self, label: str = "train", console=None, live: bool | None = None, every: float = EVERY,
                 now: Callable[[], float] = time.monotonic):
        if console is None:
            from stillhouse.ui import console
        self.label, self.console, self.every, self.now = label, console, every, now
        self.live = console.is_terminal if live is None else live
        self.total: int | None = None
        self.step, self.loss, self.t0 = 0, None, None
        self._next_line = 0
        self._bar = self._task = None

    # -- what the numbers say ------------------------------------------------------------------------------------
    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else self.now() - self.t0

    def eta(self) -> float | None:
        """Seconds left: the mean step time so far times the steps left (None before the first step)."""
        if not self.step or not self.total:
            return None
        return self.elapsed() / self.step * max(0, self.total - self.step)

    def status(self) -> str:
        return "" if self.loss is None else f"loss {self.loss:.4f}"

    def line(self) -> str:
        """The plain progress line: step/total (percent), loss, elapsed, ETA."""
        share = f" ({100 * self.step / self.total:.0f}%)" if self.total else ""
        loss = f"  loss {self.loss:.4f}" if self.loss is not None else ""
        return (f"{self.label}: step {self.step}/{self.total or '?'}{share}{loss}  elapsed {clock(self.elapsed())}  "
                f"eta {clock(self.eta())}")

    # -- the trainer's events ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kw):
        self.total = int(state.max_steps) if state.max_steps and state.max_steps > 0 else None
        self.step, self.t0 = int(state.global_step or 0), self.now()
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("steps  {task.fields[status]}"), TimeElapsedColumn(),
                                 TextColumn("eta {task.fields[eta]}"), console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.step, status="",
                                            eta=clock(None))
        else:
            self.console.print(f"{self.label}: {self.total or 'an unknown number of'} steps", soft_wrap=True,
                               highlight=False, markup=False)
            self._next_line = self._mark(self.step)

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.loss = float(logs["loss"])

    def on_step_end(self, args, state, control, **kw):
        self.step = int(state.global_step)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.step, status=self.status(), eta=clock(self.eta()))
        elif not self.live and (self.step >= self._next_line or self.step == self.total):
            self.console.print(self.line(), soft_wrap=True, highlight=False, markup=False)
            self._next_line = self._mark(self.step)

    def on_train_end(self, args, state, control, **kw):
        self.close()

    def _mark(self, step: int) -> int:
        """The first step past `step` at which the next plain line is due (every `every` of the total)."""
        if not self.total:
            return step + 50
        size = self.total * self.every
        return min(self.total, max(step + 1, math.ceil((math.floor(step / size + 1e-9) + 1) * size - 1e-9)))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> "TrainingProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
