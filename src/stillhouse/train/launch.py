"""Data-parallel training on an existing launcher: `stillhouse train RECIPE --nproc N` starts `torchrun` (or
`accelerate launch`), whose processes each run `python -m stillhouse.train.launch RUN_DIR STUDENT`: the same SFT as
one process, with the trainer's DDP (gloo on CPU, NCCL on GPUs) or, through an accelerate config file, FSDP or
DeepSpeed ZeRO. No launcher is written here; this module only builds the launcher's command line and is the
processes' entry point.

The command that launched them stays the one writer of the run: it checks the recipe, prepares the checkpoint
folder, and after the processes end writes the model card, the provenance, `student/` and the stage's manifest.
The processes read the run directory (the resolved recipe, the curated data, the ledger's logprobs) and only the
main one (global rank 0) writes the trained weights and `result.json` (or `interrupted.json` / `error.json`, so
that a stop or a bad input reaches the command as one message rather than a launcher's traceback per rank).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from stillhouse.errors import StillhouseError

LAUNCHERS = ("torchrun", "accelerate")


@dataclass
class Launch:
    """How to start the training processes: `nproc` per machine on `nnodes` machines, through `launcher`."""

    nproc: int = 1
    launcher: str | None = None  # torchrun (the default for nproc > 1) | accelerate
    accelerate_config: Path | None = None  # an `accelerate config` file: FSDP, DeepSpeed ZeRO, mixed precision
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    def __post_init__(self):
        if self.launcher is None and (self.nproc > 1 or self.nnodes > 1 or self.accelerate_config):
            self.launcher = "accelerate" if self.accelerate_config else "torchrun"

    @property
    def used(self) -> bool:
        """Whether training runs in processes started by a launcher (else in this process, as before)."""
        return self.launcher is not None

    @property
    def world_size(self) -> int | None:
        """Processes in all (None where an accelerate config file decides)."""
        if self.launcher == "accelerate" and self.accelerate_config and self.nproc == 1 and self.nnodes == 1:
            return None
        return self.nproc * self.nnodes

    def check(self, batch_sizes: dict[str, int] | None = None) -> None:
        """Refuse settings no launcher can run, naming the flag (and a student whose global batch cannot be split)."""
        if self.launcher is not None and self.launcher not in LAUNCHERS:
            raise StillhouseError(f"--launcher must be one of {', '.join(LAUNCHERS)}, not {self.launcher!r}")
        if self.nproc < 1:
            raise StillhouseError(f"--nproc must be at least 1, not {self.nproc}")
        if self.nnodes < 1:
            raise StillhouseError(f"--nnodes must be at least 1, not {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise StillhouseError(f"--node-rank must be from 0 to {self.nnodes - 1} (--nnodes {self.nnodes}), "
                                  f"not {self.node_rank}")
        if self.accelerate_config is not None:
            if self.launcher != "accelerate":
                raise StillhouseError("--accelerate-config needs --launcher accelerate")
            if not Path(self.accelerate_config).is_file():
                raise StillhouseError(f"--accelerate-config {str(self.accelerate_config)!r} is not a file")
        n = self.world_size
        for name, b in (batch_sizes or {}).items():
            if n and b % n:
                raise StillhouseError(f"student {name!r}: train.batch_size {b} is the global batch (samples per "
                                      f"optimizer step) and must divide evenly among the {n} processes; make it a "
                                      f"multiple of {n}")

    def command(self, run_root: Path, student: str) -> list[str]:
        """The launcher's command line for one student's training."""
        worker = ["-m", "stillhouse.train.launch", str(run_root), student]
        if self.launcher == "torchrun":
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(self.nproc)]
            if self.nnodes == 1:  # a free port of its own: several runs on one machine do not collide
                cmd += ["--standalone"]
            else:
                cmd += ["--nnodes", str(self.nnodes), "--node_rank", str(self.node_rank),
                        "--master_addr", self.master_addr, "--master_port", str(self.master_port)]
            return cmd + worker
        cmd = [sys.executable, "-m", "accelerate.commands.launch"]
        if self.accelerate_config:
            cmd += ["--config_file", str(self.accelerate_config)]
        if self.world_size:
            cmd += ["--num_processes", str(self.world_size)]
        if self.nnodes > 1:
            cmd += ["--num_machines", str(self.nnodes), "--machine_rank", str(self.node_rank),
                    "--main_process_ip", self.master_addr, "--main_process_port", str(self.master_port)]
        return cmd + worker


def run_workers(launch: Launch, run_root: Path, student: str, folder: Path):
    """Start the training processes for `student` and wait for them; the main process's `SFTResult`.

    SIGTERM and SIGINT here are passed on to the launcher, which passes them to the processes: they end the step in
    progress with a checkpoint (`stillhouse.train.resume`), and `TrainingInterrupted` is raised here."""
    from types import SimpleNamespace

    from stillhouse.train.resume import TrainingInterrupted

    cmd = launch.command(run_root, student)
    # its own session: Ctrl-C reaches the launcher once, from here, not also from the terminal
    proc = subprocess.Popen(cmd, start_new_session=True)

    def forward(signum, frame):
        try:
            proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for name in ("error.json", "interrupted.json"):
        p = folder / name
        if p.is_file():
            info = json.loads(p.read_text())
            if name == "error.json":
                raise StillhouseError(info["message"])
            raise TrainingInterrupted(info["message"], info["signum"])
    result = folder / "result.json"
    if code != 0 or not result.is_file():
        raise StillhouseError(f"the training processes ({launch.launcher}) stopped with exit code {code} before "
                              f"student {student!r} was trained (their output is above); complete checkpoints in "
                              f"{folder} are kept, and running the same command again resumes from the newest")
    # the main process's `SFTResult`, as attributes (`sft`'s module imports torch, which this process never needs)
    return SimpleNamespace(**json.loads(result.read_text()))


def follow(launch: Launch, recipe, run) -> None:
    """On a machine with `--node-rank` above 0: start this machine's processes for each student in turn, as the
    machine with rank 0 does; they meet its processes through the launcher's rendezvous. The run directory must be
    shared with that machine (a network filesystem): its command writes the resolved recipe and the checkpoints there,
    and these processes read them."""
    from stillhouse.stages import get_stage
    from stillhouse.ui import console

    stage = get_stage("train")
    if run.is_done("train", stage.inputs(recipe, run), stage.config(recipe)):
        console.print("train: already finished, skipping (use --force on the machine with --node-rank 0 to redo)")
        return
    for s in recipe.students:
        code = subprocess.call(launch.command(run.root, s.name))
        if code != 0:
            raise StillhouseError(f"the training processes ({launch.launcher}) for student {s.name!r} stopped with "
                                  f"exit code {code} (their output is above)")


def main(argv: list[str] | None = None) -> None:
    """One training process: `python -m stillhouse.train.launch RUN_DIR STUDENT`, started by a launcher."""
    from stillhouse.rundir import RunDir, atomic_write_text
    from stillhouse.train.resume import TrainingInterrupted, is_main_process

    run_root, student_name = argv or sys.argv[1:]
    run = RunDir(run_root)
    folder = checkpoint_folder(run, student_name)
    main_process = is_main_process()
    try:
        from stillhouse.recipe import load_recipe
        from stillhouse.train import sft_arguments
        from stillhouse.train.sft import sft

        recipe = load_recipe(run.recipe)  # the resolved recipe the launching command wrote
        student = next(s for s in recipe.students if s.name == student_name)
        kwargs = sft_arguments(recipe, run, student)
        callbacks = []
        if main_process:
            from stillhouse.train.progress import TrainingProgress

            callbacks.append(TrainingProgress(f"train {student_name}" if len(recipe.students) > 1 else "train"))
        result = sft(**kwargs, callbacks=callbacks)
        if main_process:
            atomic_write_text(folder / "result.json", json.dumps(asdict(result)) + "\n")
    except TrainingInterrupted as e:
        if main_process:
            atomic_write_text(folder / "interrupted.json", json.dumps({"message": str(e), "signum": e.signum}))
    except StillhouseError as e:  # the same bad input on every rank: one message, through the launching command
        if main_process:
            atomic_write_text(folder / "error.json", json.dumps({"message": str(e)}))


def checkpoint_folder(run, student: str) -> Path:
    """Where a student's checkpoints, and its weights until the student is complete, are kept."""
    return run.root / "checkpoints" / student


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
