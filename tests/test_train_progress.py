"""Training progress: the total and an ETA from the first step, a plain line every 5% where the console is not a
terminal, a rich bar where it is; and the train stage's trainer really calls it."""

from __future__ import annotations

import io
import re
from types import SimpleNamespace

from rich.console import Console

from stillhouse.train.progress import TrainingProgress, clock


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=120, color_system=None), buf


def _drive(p: TrainingProgress, total: int, seconds_per_step: float, now: Clock, loss_every: int = 5) -> None:
    state = SimpleNamespace(max_steps=total, global_step=0)
    p.on_train_begin(None, state, None)
    for step in range(1, total + 1):
        now.t += seconds_per_step
        state.global_step = step
        if step % loss_every == 0:
            p.on_log(None, state, None, logs={"loss": 3.0 - step / total})
        p.on_step_end(None, state, None)
    p.on_train_end(None, state, None)


def test_plain_lines_every_five_percent_with_loss_elapsed_and_eta():
    console, buf = _console(terminal=False)
    now = Clock()
    p = TrainingProgress("train", console=console, now=now)
    assert p.live is False  # a StringIO is not a terminal
    _drive(p, 300, 0.5, now)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "train: 300 steps"
    steps = [int(re.search(r"step (\d+)/300", ln).group(1)) for ln in lines[1:]]
    assert steps == list(range(15, 301, 15))  # one line per 5%
    assert lines[1] == "train: step 15/300 (5%)  loss 2.9500  elapsed 0:08  eta 2:22"
    assert lines[-1].startswith("train: step 300/300 (100%)") and lines[-1].endswith("elapsed 2:30  eta 0:00")


def test_few_steps_print_a_line_per_step_and_the_eta_comes_with_the_first():
    console, buf = _console(terminal=False)
    now = Clock()
    _drive(TrainingProgress("train nova", console=console, now=now), 4, 2.0, now)
    lines = buf.getvalue().splitlines()
    assert lines == ["train nova: 4 steps",
                     "train nova: step 1/4 (25%)  elapsed 0:02  eta 0:06",
                     "train nova: step 2/4 (50%)  elapsed 0:04  eta 0:04",
                     "train nova: step 3/4 (75%)  elapsed 0:06  eta 0:02",
                     "train nova: step 4/4 (100%)  elapsed 0:08  eta 0:00"]


def test_a_terminal_gets_a_bar_with_the_total_from_the_start():
    console, buf = _console(terminal=True)
    now = Clock()
    p = TrainingProgress("train", console=console, now=now)
    assert p.live is True
    state = SimpleNamespace(max_steps=40, global_step=0)
    p.on_train_begin(None, state, None)
    p._bar.refresh()
    assert "0/40" in buf.getvalue()
    now.t += 3.0
    state.global_step = 1
    p.on_log(None, state, None, logs={"loss": 2.5})
    p.on_step_end(None, state, None)
    p._bar.refresh()
    out = buf.getvalue()
    assert "1/40" in out and "loss 2.5000" in out and "eta 1:57" in out
    with p:  # closing twice (the trainer's end, then the stage's `with`) is fine
        p.on_train_end(None, state, None)
    assert p._bar is None and "?" not in out.replace("\x1b[?25l", "").replace("\x1b[?25h", "")


def test_clock():
    assert [clock(5), clock(65), clock(3725), clock(None)] == ["0:05", "1:05", "1:02:05", "-:--"]


def test_sft_calls_the_callback_with_the_total(tiny_models, tmp_path):
    from stillhouse.train.sft import sft
    from tests.test_train import _rows

    console, buf = _console(terminal=False)
    sft(_rows(16), str(tiny_models["base"]), tmp_path / "s", epochs=2, learning_rate=1e-2, batch_size=8,
        max_length=128, seed=0, device="cpu", callbacks=[TrainingProgress("train", console=console)])
    lines = buf.getvalue().splitlines()
    assert lines[0] == "train: 4 steps"
    assert [ln.split("  ")[0] for ln in lines[1:]] == [f"train: step {i}/4 ({25 * i}%)" for i in range(1, 5)]
    assert all("eta" in ln for ln in lines[1:])
