"""Checkpoints that a killed training run resumes from.

The trainer (transformers' `Trainer`, under TRL) writes `checkpoint-N/` every `train.save_steps` optimizer steps:
weights, optimizer, scheduler, every rank's RNG state and the trainer state, from which `resume_from_checkpoint`
continues with the same data order (the sampler is seeded; the batches already seen are skipped). What it does not
do, and this room adds:

- **a completeness mark**: `kill -9` half-way through writing a checkpoint leaves a folder that looks like one.
  `stillhouse-complete` is written into it only after every rank has written its part (a barrier), and only a
  marked checkpoint is resumed from;
- **a checkpoint at a signal**: SIGTERM (a scheduler's pre-emption, `kill`) or SIGINT (Ctrl-C) finishes the step in
  progress, writes a checkpoint at that step boundary and stops. transformers' own `enable_jit_checkpoint` catches
  SIGTERM only, waits 3 s, and saves in the middle of a step (before the optimizer applies gradients already
  computed), which a resume cannot continue bit for bit; a second Ctrl-C here stops at once;
- **one job per folder**: a fingerprint of the student's base, data and settings (`job.json`); checkpoints of another
  job (the recipe changed since) are discarded, never resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

from stillhouse.errors import StillhouseError

MARK = "stillhouse-complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class TrainingInterrupted(StillhouseError):
    """Training stopped at a signal after writing a checkpoint; the CLI exits with 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def checkpoints(folder: str | Path) -> list[tuple[int, Path, bool]]:
    """Every `checkpoint-N/` in `folder`: (step, path, complete), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p, (p / MARK).is_file()) for p in folder.iterdir()
             if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def last_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint in `folder` (None: start from the beginning)."""
    done = [p for _, p, complete in checkpoints(folder) if complete]
    return done[-1] if done else None


def prepare(folder: str | Path, fingerprint: str) -> Path | None:
    """Make `folder` the checkpoint folder of the job `fingerprint` and return the checkpoint to resume from.

    A folder left by another job is emptied; checkpoints that a kill cut short are removed (the trainer would write
    over them, and keeping only marked ones keeps `save_total_limit` from rotating a good one away); so are a
    previous attempt's outputs (`final/`, `result.json`, `interrupted.json`)."""
    folder = Path(folder)
    job = folder / "job.json"
    if folder.exists():
        try:
            same = json.loads(job.read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not job.is_file():
        job.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    for _, p, complete in checkpoints(folder):
        if not complete:
            shutil.rmtree(p)
    for stale in ("final", "result.json", "interrupted.json"):
        p = folder / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    return last_checkpoint(folder)


def step_of(checkpoint: str | Path) -> int:
    m = _CHECKPOINT.match(Path(checkpoint).name)
    return int(m.group(1)) if m else 0


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def __getattr__(name: str):
    # `Checkpoints` subclasses transformers' TrainerCallback, whose import pulls in torch (seconds): the class is made
    # on first use, so that the command that only starts a launcher's processes never imports it
    if name == "Checkpoints":
        globals()["Checkpoints"] = cls = _checkpoints_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _checkpoints_class():
    from transformers import TrainerCallback

    return type("Checkpoints", (_Checkpoints, TrainerCallback), {"__module__": __name__})


class _Checkpoints:
    """Marks each checkpoint complete once every rank wrote its part; at SIGTERM or SIGINT, ends the step in progress
    with a checkpoint and stops training (`signum` then says which signal). No final checkpoint is written when
    training ends normally: the student is saved right after it."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handler(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the step to end
        self.signum = signum

    def on_train_begin(self, args, state, control, **kw):
        import threading

        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handler)

    def _stop_requested(self, args) -> bool:
        """Whether any rank was signalled: every rank must stop at the same step, or the others would wait forever
        in the next step's gradient all-reduce (a one-number all-reduce per step)."""
        if not _distributed():
            return self.signum is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0 if self.signum is None else self.signum], device=args.device, dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kw):
        if self._stop_requested(args) and state.global_step < state.max_steps:
            control.should_save = True
            control.should_training_stop = True
        elif state.global_step >= state.max_steps:
            control.should_save = False  # the finished student is written next; a checkpoint of it is never read

    def on_save(self, args, state, control, **kw):
        if _distributed():
            import torch.distributed as dist

            dist.barrier()  # every rank's RNG state is on disk before the checkpoint is called complete
        if state.is_world_process_zero:
            p = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if p.is_dir():
                (p / MARK).write_text(f"step {state.global_step}\n")

    def on_train_end(self, args, state, control, **kw):
        self.restore()

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


def world_size() -> int:
    """Processes training together (torchrun / accelerate set WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_if_alone(folder: str | Path) -> Path | None:
    """The checkpoint to resume from in `folder`. In one process, checkpoints a kill cut short are removed first;
    under a launcher the ranks only read (the command that started them prepared the folder)."""
    if world_size() == 1:
        for _, p, complete in checkpoints(folder):
            if not complete:
                shutil.rmtree(p)
    return last_checkpoint(folder)
