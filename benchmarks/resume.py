"""Resume after `kill -9`, and what checkpointing costs: `stillhouse train` on the demo's data and base.

    .venv/bin/python benchmarks/resume.py [--n 1600] [--kill-after 60] [--repeats 2]

`n` demo rows (the world's reference answers), `stillhouse:base`, 1 epoch at the demo's settings (batch 8).

1. **Overhead**: `sft()` in this process with no checkpoint, with the default `train.save_steps` (100) and with a
   checkpoint every 10 steps, run in turns (A B C A B C ...) so that the machine's load falls on each alike; the
   best of the repeats of each.
2. **Kill and resume**: `stillhouse train RECIPE` in a subprocess (save_steps 20), killed with SIGKILL as soon as
   the checkpoint of step `kill-after` is complete, then `stillhouse train RECIPE` again, which resumes; its
   student's weights are compared with the run without checkpoints of part 1.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402
from training import Others, demo_rows, machine_speed  # noqa: E402

TRAIN = dict(epochs=1, learning_rate=1.5e-3, batch_size=8, max_length=256, seed=0)


class SaveClock:
    """Seconds from the end of a step that writes a checkpoint to the checkpoint being complete: the cost of each
    checkpoint itself, which the machine's load disturbs far less than a whole run's time."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                clock.t = time.perf_counter()

            def on_save(self, args, state, control, **kw):
                clock.saves.append(time.perf_counter() - clock.t)

        self.saves: list[float] = []
        self.callback = _CB()


def _weights(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1600)
    ap.add_argument("--kill-after", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from stillhouse.models import resolve_model
    from stillhouse.rundir import RunDir
    from stillhouse.train.sft import sft

    speed = machine_speed()
    base = resolve_model("stillhouse:base")
    rows = demo_rows(args.n)
    work = Path(tempfile.mkdtemp(prefix="resume-bench-"))

    # 1. overhead, in turns
    settings = {"none": 0, "every 100 (the default)": 100, "every 10": 10}
    times: dict[str, list[float]] = {k: [] for k in settings}
    others: dict[str, list[float]] = {k: [] for k in settings}
    steps = None
    clocks: dict[str, SaveClock] = {k: SaveClock() for k in settings}
    for rep in range(args.repeats):
        for name, every in settings.items():
            out = work / f"o-{every}-{rep}"
            with Others() as o:
                res = sft(rows, base, out, checkpoint_dir=out.with_name(out.name + "-ck"), save_steps=every,
                          device="cpu", callbacks=[clocks[name].callback], **TRAIN)
            times[name].append(res.seconds)
            others[name].append(o.share)
            steps = res.steps
    reference = work / "o-0-0"
    baseline = min(times["none"])

    # 2. kill -9 half-way, then resume through the CLI
    run = RunDir(work / "runs" / "k")
    (run.root / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), run.curated)
    run.finish("curate", time.time(), {}, {}, {"curated": run.curated}, {})
    recipe = work / "k.yaml"
    recipe.write_text(f"name: k\nrun_dir: {run.root}\nteacher: {{spec: 'hf:stillhouse:atlas'}}\n"
                      f"student: {{base: 'stillhouse:base'}}\ntrain: {{epochs: 1, learning_rate: 0.0015, batch_size: 8, "
                      f"max_length: 256, seed: 0, device: cpu, save_steps: 20}}\n")
    stillhouse = [sys.executable, "-m", "stillhouse.cli"]
    mark = run.root / "checkpoints" / "student" / f"checkpoint-{args.kill_after}" / "stillhouse-complete"
    t0 = time.time()
    proc = subprocess.Popen([*stillhouse, "train", str(recipe)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    while not mark.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    killed_after = time.time() - t0
    if proc.returncode != -signal.SIGKILL:
        sys.exit(f"the run ended before it was killed (exit {proc.returncode}): {err[-2000:]}")
    left = sorted(p.name for p in (run.root / "checkpoints" / "student").glob("checkpoint-*"))
    t0 = time.time()
    again = subprocess.run([*stillhouse, "train", str(recipe)], capture_output=True, text=True)
    resumed_wall = time.time() - t0
    if again.returncode != 0:
        sys.exit(again.stderr[-3000:])
    counts = json.loads(run.manifest_path("train").read_text())["counts"]
    a, b = _weights(reference), _weights(run.student)
    equal = all(torch.equal(a[k], b[k]) for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)

    cmd = "benchmarks/resume.py " + " ".join(sys.argv[1:])
    lines = ["## Training: resume after kill -9, and what checkpoints cost (issue 26)", "",
             f"Command: `.venv/bin/python {cmd.strip()}` (`../shared/tools/machine-speed`: {speed}x the reference "
             f"machine; torch threads {torch.get_num_threads()}). {args.n} demo rows (the world's reference answers), `stillhouse:base`, 1 epoch, lr 0.0015, "
             f"batch 8, fp32 on CPU: {steps} optimizer steps. \"others\": the share of the machine's CPU that other "
             "processes used during the row (the machine is shared).", "",
             f"**Overhead of checkpointing** (`sft()` in one process, the three settings run in turns, {args.repeats} "
             "times each; the best time of each). A checkpoint is the weights, the AdamW state, the scheduler, the "
             "RNG states and the trainer state; no checkpoint is written at the end (the student is).", "",
             "| train.save_steps | checkpoints | train s (best) | all runs | x none | others |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, every in settings.items():
        n_ck = (steps - 1) // every if every else 0
        lines.append(f"| {name if every else '0 (none)'} | {n_ck} | {min(times[name]):.1f} | "
                     f"{', '.join(f'{t:.1f}' for t in times[name])} | {min(times[name]) / baseline:.2f}x | "
                     f"{max(others[name]):.0%} |")
    size = sum(p.stat().st_size for p in (work / "o-10-0-ck").glob("checkpoint-*/**/*") if p.is_file())
    n_kept = len(list((work / "o-10-0-ck").glob("checkpoint-*")))
    saves = sorted(t for c in clocks.values() for t in c.saves)
    step_s = baseline / steps
    lines += ["", f"Each checkpoint here is {size / max(n_kept, 1) / 1e6:.1f} MB on disk (two are kept) and took "
              f"{saves[len(saves) // 2] * 1000:.0f} ms to write (median of {len(saves)}; fastest "
              f"{saves[0] * 1000:.0f} ms), against {step_s * 1000:.0f} ms a training step (the best run without "
              f"checkpoints): every 100 steps costs {saves[len(saves) // 2] / (100 * step_s):.1%} of the training "
              "time, every 10 steps ten times that. The whole-run times above move more than that with the "
              "machine's load.", "",
              f"**Kill and resume.** `stillhouse train` (save_steps 20) was killed with SIGKILL {killed_after:.1f} s "
              f"after it started, as soon as checkpoint-{args.kill_after} was complete (complete checkpoints left: "
              f"{', '.join(left)}); the same command again resumed from step {counts.get('resumed_from_step')} and "
              f"finished the {counts['steps']} steps in {resumed_wall:.1f} s (start-up included). Its student against "
              "the uninterrupted run without checkpoints of the table above: "
              + ("**equal bit for bit** (every tensor `torch.equal`)." if equal else
                 f"**not equal**: the largest difference is {worst:.3g}."),
              "", "Bit-for-bit equality is expected, not lucky: the checkpoint carries the optimizer, scheduler and "
              "every RNG state, the sampler is seeded by `train.seed` and the batches already seen are skipped, and "
              "the same fp32 kernels on the same threads sum in the same order. On GPUs, non-deterministic kernels "
              "(atomics in some backward passes) can make two uninterrupted runs differ as much."]
    write_section("resume", "\n".join(lines))
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
