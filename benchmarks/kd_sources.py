"""What the teacher's distribution is worth, by how much of it the student sees, and on-policy distillation against
off-policy at equal teacher calls, in the tiny world.

    .venv/bin/python benchmarks/kd_sources.py [--n 1000] [--seeds 0,1,2] [--rows top5,top20,full] [--section kd_sources]
    .venv/bin/python benchmarks/kd_sources.py --n 500 --seeds 0 --rows sft,top20,on_policy --section on_policy

Atlas answers the world's first `--n` training prompts at T=1 through the serve engine (the demo's setting) with its
top-20 logprobs: one teacher call per prompt. From the same answers, for each seed, `stillhouse:base` is trained with
the demo's settings (`--epochs`, default the demo's 4):

- `sft`: the answers' text;
- `top5`, `top20`: `method: kd` from the ledger's top-k (forward KL, alpha 0.9), top-5 being the top-20's first five;
- `full`: `method: kd` with `kd.source: teacher`: Atlas run beside the student, its whole distribution (forward KL,
  alpha 0.9), one teacher forward per answer and epoch on top of the generation call;
- `on_policy`: `method: on_policy` with Atlas local: the student answers each prompt itself once (one epoch, up to
  `--max-new-tokens`, T=1), Atlas scores the answer (reverse KL): one teacher call per prompt, as for the others.

Share kept: greedy accuracy on the 240 held-out tasks over Atlas's (`training.py`'s measure); KL: the mean forward
KL(Atlas || student) per answer token over the full vocabulary, teacher-forced on Atlas's answers to 200 held-out
prompts (a finer measure of how close the student came than the share, which is 0 for a student that rarely
finishes an answer right).
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

LABELS = {"sft": "SFT (the answers' text)", "top5": "KD from the ledger, top-5", "top20": "KD from the ledger, top-20",
          "full": "KD from Atlas beside the student, full distribution (kd.source: teacher)",
          "on_policy": "on-policy: the student's own answers scored by Atlas (reverse KL)"}


def heldout_kl(student: str, teacher: str, rows: list[dict]) -> float:
    """Mean KL(teacher || student) per answer token, full vocabulary, teacher-forced on `rows`' answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillhouse.train.sft import _encode

    tok = AutoTokenizer.from_pretrained(student)
    s = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    t = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids, start = _encode(tok, r["messages"])
            x = torch.tensor([ids])
            ls = s(x).logits[0, start - 1:-1].log_softmax(-1)
            lt = t(x).logits[0, start - 1:-1].log_softmax(-1)
            total += float((lt.exp() * (lt - ls)).sum())
            n += len(ids) - start
    return total / n


def main() -> None:
    from stillhouse.demo import world
    from stillhouse.models import resolve_model
    from stillhouse.train.onpolicy import on_policy
    from stillhouse.train.sft import sft

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", default="top5,top20,full")
    ap.add_argument("--epochs", type=float, default=TRAIN["epochs"])
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--section", default="kd_sources")
    args = ap.parse_args()
    speed = machine_speed()
    work = Path(tempfile.mkdtemp(prefix="kd_sources_"))
    t_start = time.time()
    atlas, base = resolve_model("stillhouse:atlas"), resolve_model("stillhouse:base")
    prompts = [t.prompt for t in world.sample_tasks(args.n, "train", 0)]
    texts, lps = answers_with_logprobs(prompts, None, top=20)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(prompts, texts)]
    top5 = [[{**e, "top_logprobs": sorted(e["top_logprobs"], key=lambda x: -x["logprob"])[:5]} for e in entries]
            for entries in lps]
    held_prompts = [t.prompt for t in world.sample_tasks(200, "heldout", 1)]
    held_texts, _ = answers_with_logprobs(held_prompts, None, top=1)
    held = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
            for p, a in zip(held_prompts, held_texts)]
    teacher = heldout_accuracy(atlas)
    teacher_macro = sum(teacher.values()) / len(teacher)
    methods = args.rows.split(",")
    res: dict[str, dict[str, list[float]]] = {m: {"kept": [], "kl": [], "secs": [], "steps": []} for m in methods}
    train = {**TRAIN, "epochs": args.epochs}
    for seed in map(int, args.seeds.split(",")):
        for m in methods:
            d = work / f"{m}_{seed}"
            t0 = time.time()
            kd = {"loss": "forward_kl", "alpha": 0.9, "beta": 0.5, "min_aligned": 0.5}
            if m == "sft":
                r = sft(rows, base, d, **train, seed=seed)
            elif m in ("top5", "top20"):
                r = sft(rows, base, d, **train, seed=seed, kd=kd, teacher_logprobs=top5 if m == "top5" else lps)
            elif m == "full":
                r = sft(rows, base, d, **train, seed=seed, kd={**kd, "source": "teacher"}, teacher=atlas)
            elif m == "on_policy":
                r = on_policy(rows, base, d, epochs=1, learning_rate=train["learning_rate"],
                              batch_size=train["batch_size"], seed=seed, kd={"loss": "reverse_kl", "beta": 0.5},
                              on_policy={"max_new_tokens": args.max_new_tokens, "temperature": 1.0}, teacher=atlas)
            else:
                raise SystemExit(f"--rows: unknown row {m!r} (known: {', '.join(LABELS)})")
            res[m]["secs"].append(time.time() - t0)
            res[m]["steps"].append(r.steps)
            acc = heldout_accuracy(str(d))
            res[m]["kept"].append(sum(acc.values()) / len(acc) / teacher_macro)
            res[m]["kl"].append(heldout_kl(str(d), atlas, held))
            print(m, seed, f"{res[m]['kept'][-1]:.1%}", f"KL {res[m]['kl'][-1]:.3f}", f"{res[m]['secs'][-1]:.0f} s",
                  flush=True)
            shutil.rmtree(d, ignore_errors=True)
    total = time.time() - t_start
    seeds = args.seeds.split(",")
    title = ("top-5, top-20 and the full distribution at equal data and steps" if args.section == "kd_sources" else
             "on-policy against off-policy distillation and SFT at equal teacher calls")
    lines = [f"## Training: {title}", "",
             f"Command: `.venv/bin/python benchmarks/kd_sources.py --n {args.n} --seeds {args.seeds} --rows {args.rows} "
             f"--epochs {args.epochs:g} --max-new-tokens {args.max_new_tokens} --section {args.section}` "
             f"({platform.machine()}, {os.cpu_count()} CPU cores, shared with other jobs; {total / 60:.0f} min; "
             f"`../shared/tools/machine-speed`: {speed}x the reference machine). Atlas's answers to {args.n} world "
             f"training prompts at T=1 with its top-20 logprobs ({args.n} teacher calls); `stillhouse:base` trained "
             f"with the demo's settings ({train}); on-policy: one epoch over the {args.n} prompts, the student "
             f"sampling up to {args.max_new_tokens} tokens at T=1 ({args.n} teacher scorings). Share kept on the 240 "
             "held-out tasks (greedy); KL: mean KL(Atlas || student) per answer token on Atlas's answers to 200 held-out "
             "prompts (lower is closer).", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean share | lowest | KL (mean) | steps | "
             "train s (mean) |", "| --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- | --- | --- |"]
    for m in methods:
        v = res[m]
        lines.append(f"| {LABELS[m]} | " + " | ".join(f"{k:.1%}" for k in v["kept"])
                     + f" | {statistics.mean(v['kept']):.1%} | {min(v['kept']):.1%} | {statistics.mean(v['kl']):.3f} | "
                     f"{v['steps'][0]} | {statistics.mean(v['secs']):.0f} |")
    write_section(args.section, "\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
