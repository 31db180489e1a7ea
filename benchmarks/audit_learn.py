"""Issue 10: how much of a provider's watermark a distilled student carries in its text, against the teacher's own.

    .venv/bin/python benchmarks/audit_learn.py [--rows atlas2,atlas4,invent2,invent0,invent4,mix4] [--n 3000]
        [--probes 250,500,1000,1900]

The black-box test scores each (context, token) draw of a key once: over the world's 102 one-character tokens there
are ~10K such draws, and the open answers of the world touch under a thousand of them away from near-certain
tokens, so the test's power is set by the share of *distinct* draws that are green. This measures that share where
the watermark is strongest (the teacher's own answers) and in students distilled from it, with more free text than
the demo has and with the demo's own mix. Rows (B: the key's bias; every key ratio 0.25, lefthash, context 1, fresh):

- `atlasB`: Atlas's own answers to the probes, watermarked at bias B (the ceiling for any student);
- `inventB`: a student (`stillhouse:base`, the demo's training settings) on Atlas's answers to `--n` training prompts
  of the `invent` family alone, watermarked at bias B (`invent0`: no watermark, the same key scored);
- `mixB`: a student on Atlas's answers to the demo's own `--n` prompts (every family), watermarked at bias B.

Probes: the world's distinct open-answer prompts, sampled at T=1, scored after the first q for each q in `--probes`;
tokens Atlas predicts with under 0.1 nats of entropy are left out. White-box: each student's own next-token
distributions along its first 500 answers.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402
from audit_power import TRAIN, answers, black_box_grid, open_prompts  # noqa: E402
from training import machine_speed  # noqa: E402


def train_prompts(family: str | None, n: int) -> list[str]:
    """The demo's `n` training prompts (every family in equal shares), or `n` training-split prompts of one family
    (repeats allowed: a sampled teacher answers each anew)."""
    from stillhouse.demo import world

    if family is None:
        return [t.prompt for t in world.sample_tasks(n, "train", 0)]
    rng, out = random.Random(5), []
    while len(out) < n:
        t = world.make_task(family, rng)
        if t.split == "train":
            out.append(t.prompt)
    return out


def main() -> None:
    from stillhouse.audit.radioactivity import whitebox
    from stillhouse.models import resolve_model
    from stillhouse.train.sft import sft
    from stillhouse.watermark import keygen, read_key

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="atlas2,atlas4,invent2,invent0,invent4,mix4")
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--probes", default="250,500,1000,1900")
    ap.add_argument("--min-entropy", type=float, default=0.1)
    args = ap.parse_args()
    counts = [int(q) for q in args.probes.split(",")]
    speed = machine_speed()
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="audit_learn_"))
    probes = open_prompts()[:max(counts)]
    out = []
    for row in args.rows.split(","):
        kind, bias = row.rstrip("0123456789."), float(row.lstrip("abcdefghijklmnopqrstuvwxyz") or 2)
        keyfile = work / f"{row}.json"
        keygen(keyfile, bias=bias or 2.0)
        key = read_key(keyfile)
        wm = str(keyfile) if bias else None
        t0 = time.time()
        if kind == "atlas":
            model, label = "stillhouse:atlas", f"Atlas's own answers, bias {bias:g}"
        elif kind in ("invent", "mix"):
            prompts = train_prompts("invent" if kind == "invent" else None, args.n)
            data = answers("stillhouse:atlas", prompts, wm, temperature=1.0)
            model = str(work / row)
            sft([{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                 for p, a in zip(prompts, data)], resolve_model("stillhouse:base"), model, seed=0, **TRAIN)
            what = "invent answers only" if kind == "invent" else "answers to the demo's prompts (every family)"
            label = (f"student on {args.n} {what}, " + (f"bias {bias:g}" if bias else "no watermark (bias 2 key scored)"))
        else:
            raise SystemExit(f"unknown row {row!r}: atlasB, inventB or mixB")
        texts = answers(model, probes, wm if kind == "atlas" else None, temperature=1.0)
        bb = {q: g for (_, q), g in black_box_grid(texts, probes, key, (args.min_entropy,), counts).items()}
        wb = None
        if kind != "atlas":
            wb = whitebox(model, key, "stillhouse:atlas", probes[:500], texts[:500], null_keys=0)
        r = {"label": label, "bb": bb, "wb": wb, "secs": time.time() - t0}
        out.append(r)
        print(row, " ".join(f"{q}: {k.green}/{k.scored} p {k.p_value:.2g}" for q, k in bb.items()),
              f"wb {wb.green_mass:.3f} p {wb.p_value:.2g}" if wb else "", f"{r['secs']:.0f} s", flush=True)

    total = time.time() - t_start
    lines = ["## Audit: how much of the watermark a student carries, against the teacher's own (issue 10)", "",
             f"Command: `.venv/bin/python benchmarks/audit_learn.py --rows {args.rows} --n {args.n} --probes "
             f"{args.probes}` ({platform.machine()}, {os.cpu_count()} CPU cores; {total / 60:.0f} min; "
             f"`../shared/tools/machine-speed`: {speed}x the reference machine). Keys: ratio 0.25, lefthash, context 1, "
             f"a fresh one a row. Probes: the world's open-answer prompts at T=1; black-box scoring counts each "
             f"(context, token) draw once and leaves out tokens Atlas predicts with under {args.min_entropy} nats. "
             f"Students: `stillhouse:base` with the demo's settings ({TRAIN}). Each cell: green / distinct draws "
             "scored (share green), exact binomial p; chance 24.5%.", "",
             "| text | " + " | ".join(f"black-box, {q} probes" for q in counts) + " | white-box green mass (chance), p |",
             "| --- | " + " | ".join("---" for _ in counts) + " | --- |"]
    for r in out:
        cells = [f"{k.green} / {k.scored} ({k.green / max(k.scored, 1):.1%}), p {k.p_value:.2g}" for k in r["bb"].values()]
        w = f"{r['wb'].green_mass:.3f} ({r['wb'].expected:.3f}), p {r['wb'].p_value:.2g}" if r["wb"] else "-"
        lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {w} |")
    write_section("audit_learn", "\n".join(lines))


if __name__ == "__main__":
    main()
