"""Share of Atlas kept by SFT against logit distillation, over several training seeds, on the same teacher answers.

    .venv/bin/python benchmarks/kd_share.py [--n 3000] [--seeds 0,1,2] [--rows sft,kd0.9] [--top 5] [--section kd_share]

A row is `sft` or `kd<alpha>`, optionally with `@e<epochs>`, `@lr<rate>` (default: the demo's) and `@n<samples>` (train on
the first that many answers only; default all `--n`), e.g. `kd0.9@e3@lr0.0025` or `kd0.9@n1500@e6`.

Atlas answers the world's `--n` training prompts at T=1 through the serve engine (the demo's setting, no watermark),
with its top-`--top` logprobs. For each seed, `stillhouse:base` is trained with the demo's settings on the answers'
text (SFT) and, for each alpha, with `method: kd` (forward KL) on the text and the logprobs. Share kept: greedy
accuracy on the 240 held-out tasks over Atlas's (`training.py`'s measure).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402
from audit_kd import answers_with_logprobs  # noqa: E402
from audit_power import TRAIN  # noqa: E402
from training import heldout_accuracy, machine_speed  # noqa: E402


def parse_row(row: str) -> tuple[str, dict[str, float]]:
    """`kd0.9@e3@lr0.0025@n1500` -> ("kd0.9", {"epochs": 3.0, "learning_rate": 0.0025, "samples": 1500.0})."""
    method, *opts = row.split("@")
    names = {"e": "epochs", "lr": "learning_rate", "n": "samples"}
    overrides = {}
    for o in opts:
        key = "lr" if o.startswith("lr") else o[:1]
        if key not in names:
            raise SystemExit(f"--rows: unknown option {o!r} in {row!r} (known: @e<epochs>, @lr<rate>, @n<samples>)")
        overrides[names[key]] = float(o[len(key):])
    return method, overrides


def main() -> None:
    from stillhouse.demo import world
    from stillhouse.models import resolve_model
    from stillhouse.train.sft import sft

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default="sft,kd0.9")
    ap.add_argument("--top", type=int, default=5)
    ap.add_argument("--section", default="kd_share", help="the BENCHMARKS.md section to (re)write; a grid of settings goes in its own")
    ap.add_argument("--title", default=None, help="the section's heading")
    args = ap.parse_args()
    speed = machine_speed()
    work = Path(tempfile.mkdtemp(prefix="kd_share_"))
    t_start = time.time()
    prompts = [t.prompt for t in world.sample_tasks(args.n, "train", 0)]
    texts, lps = answers_with_logprobs(prompts, None, top=args.top)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(prompts, texts)]
    teacher = heldout_accuracy(resolve_model("stillhouse:atlas"))
    teacher_macro = sum(teacher.values()) / len(teacher)
    methods = args.rows.split(",")
    kept: dict[str, list[float]] = {m: [] for m in methods}
    secs: dict[str, list[float]] = {m: [] for m in methods}
    for seed in map(int, args.seeds.split(",")):
        for m in methods:
            d = work / f"{m}_{seed}"
            t0 = time.time()
            method, overrides = parse_row(m)
            k = int(overrides.pop("samples", len(rows)))
            kd = {} if method == "sft" else {"kd": {"loss": "forward_kl", "alpha": float(method[2:]), "beta": 0.5,
                                                    "min_aligned": 0.5}, "teacher_logprobs": lps[:k]}
            train = {**TRAIN, "seed": seed, **overrides}
            sft(rows[:k], resolve_model("stillhouse:base"), d, **train, **kd)
            secs[m].append(time.time() - t0)
            acc = heldout_accuracy(str(d))
            kept[m].append(sum(acc.values()) / len(acc) / teacher_macro)
            print(m, seed, f"{kept[m][-1]:.1%}", f"{secs[m][-1]:.0f} s", flush=True)
            shutil.rmtree(d, ignore_errors=True)
    total = time.time() - t_start
    seeds = args.seeds.split(",")
    title = args.title or ("SFT against logit distillation, share kept over seeds" if args.section == "kd_share"
                           else "logit distillation, a grid of settings")
    lines = [f"## Training: {title}", "",
             f"Command: `.venv/bin/python benchmarks/kd_share.py --n {args.n} --seeds {args.seeds} --rows "
             f"{args.rows} --top {args.top}" + (f" --section {args.section}" if args.section != "kd_share" else "")
             + (f" --title '{args.title}'" if args.title else "") + f"` ({platform.machine()}, {os.cpu_count()} CPU cores; {total / 60:.0f} min; "
             f"`../shared/tools/machine-speed`: {speed}x the reference machine). Atlas's answers to {args.n} world "
             f"training prompts at T=1 (no watermark) with its top-{args.top} logprobs; `stillhouse:base` trained "
             f"with the demo's settings ({TRAIN}) except where a row names its epochs, learning rate or number of samples; share kept on the 240 held-out tasks (greedy).", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | lowest | train s (mean) |",
             "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- |"]
    for m in methods:
        method, overrides = parse_row(m)
        label = ("SFT" if method == "sft" else f"KD, forward KL, alpha {method[2:]}") + "".join(
            f", {k.replace('_', ' ')} {v:g}" for k, v in overrides.items())
        lines.append(f"| {label} | " + " | ".join(f"{k:.1%}" for k in kept[m])
                     + f" | {statistics.mean(kept[m]):.1%} | {min(kept[m]):.1%} | {statistics.mean(secs[m]):.0f} |")
    write_section(args.section, "\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
