"""Issue 10: what a watermark leaves in a student distilled from the provider's logprobs, and what logit distillation
buys the student.

    .venv/bin/python benchmarks/audit_kd.py [--n 3000] [--probes 1900] [--bias 2.0] [--rows sft,kd0.5,kd0.9,plain]

A provider serves Atlas with a watermark (lefthash, ratio 0.25, `--bias`) and, as `stillhouse serve` does, reports the
raw model's logprobs: the distribution before the watermark's bias, beside tokens sampled from the biased one. Atlas
answers the world's `--n` training prompts at T=1 (the demo's setting) through the serve engine, with its top-20
logprobs, once watermarked and once not (same seeds). Students from `stillhouse:base`, the demo's training settings:

- `sft`: the watermarked answers' text (the demo's student);
- `kdA`: the same answers plus the reported logprobs, `method: kd`, forward KL, alpha A;
- `kdwmA`: as `kdA`, but the provider runs `serve --watermark-logprobs`: the logprobs describe the watermarked
  distribution the tokens were drawn from;
- `plain`: the unwatermarked answers' text (the same teacher without a key: the no-watermark baseline).

Each student answers the world's `--probes` open-answer prompts at T=1; black-box scoring under the key leaves out
tokens Atlas predicts with under 0.1 nats of entropy; white-box reads the student's own next-token distributions along
its first 500 answers. Share kept: greedy accuracy on the 240 held-out tasks over Atlas's (`training.py`'s measure).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402
from audit_power import TRAIN, answers, black_box_grid, open_prompts  # noqa: E402
from training import heldout_accuracy, machine_speed  # noqa: E402


# Written from this run and the one before it (same command, another fresh key), so the table above can be read
# against it; not re-measured by the script.
NOTES = """**Reading** (this run, then the two runs before it in parentheses, on 2.96x and ~3x machines).

- **The default logprobs do not carry the watermark; the sampled tokens do.** At the free positions of Atlas's
  answers the sampled tokens were 37.8% green (46.6%, 54.0%) while the reported distribution put 18.5% (25.9%, 27.8%)
  of its mass there, near or below the 25% of chance. With `serve --watermark-logprobs` the reported distribution is
  the one the tokens are drawn from (the `watermark_logprobs` section: 43.2% of the reported mass on green where
  41.7% of the sampled tokens are, against 21.2% by default).
- **Neither channel put the watermark into a student in this world.** White-box green mass (chance 0.245): SFT on the
  watermarked text 0.247 (0.304, 0.288), KD at alpha 0.9 from the raw logprobs 0.222 (0.238, 0.262), KD at alpha 0.9
  from the watermarked logprobs 0.243 (p 0.52), the student of the unwatermarked teacher 0.184 (0.270, 0.265). The
  runs before showed SFT a little above the others and KD from the raw logprobs pulling the student back to the raw
  distribution; this run shows no excess anywhere, and reporting the watermarked distribution did not change that.
  The training data holds ~4,000 free positions in all (418 in the first 300 answers), against ~10,000 (context,
  token) cells in the key's green-list table: too few to learn the table from, whether as text or as distributions.
- **Black-box, no student here carries a measurable watermark in its text**, at any entropy floor or probe count:
  green shares of 23-25% where chance is 24.5%, and the probes' distinct (context, token) draws saturate near 750
  by 1,900 probes. This world's free text is a made-up name or short description per open answer (~1.4 free
  tokens per training answer), too little for the 1M student to learn a context-dependent 2x preference from; the
  p <= 1e-6 target needs a world with longer free answers and an Atlas rebuilt on it.
- **Share kept**: KD at alpha 0.9 kept 83.6% (88.2%, 82.8%) against 84.4% (83.2%, 81.3%) for SFT on the same text,
  and 84.8% from the watermarked logprobs. Single runs of this student differ by several points (training.py's
  notes); `kd_share` measures the difference over seeds."""

FLOORS = (0.1, 0.5, 1.0, 1.5)  # entropy floors (nats) for the black-box grid
PROBE_COUNTS = (250, 500, 1000)  # and probe counts (plus all of them)


def green_at_free_positions(answers_lp: list[list[dict]], greens, min_entropy: float) -> tuple[int, float, float]:
    """Over answer positions whose reported top-k distribution has at least `min_entropy` nats (elsewhere a watermark
    cannot move a token): (positions, share of sampled tokens green, mean reported probability mass on green)."""
    sampled = reported = n = 0
    for lps in answers_lp:
        for prev, e in zip(lps, lps[1:]):
            ctx, top = (prev["id"],), [(a["id"], math.exp(a["logprob"])) for a in e["top_logprobs"]]
            if -sum(p * math.log(p) for _, p in top if p > 0) < min_entropy:
                continue
            sampled += greens.is_green(ctx, e["id"])
            reported += sum(p for i, p in top if greens.is_green(ctx, i))
            n += 1
    return n, sampled / max(n, 1), reported / max(n, 1)


def answers_with_logprobs(prompts: list[str], watermark: str | None, top: int = 20, watermark_logprobs: bool = False
                          ) -> tuple[list[str], list[list[dict]]]:
    """Atlas's sampled answers and, per answer token, the engine's logprobs in the ledger's shape (ids and texts):
    the model's own distribution, or with `watermark_logprobs` the watermarked one the tokens were drawn from."""
    from stillhouse.models import resolve_model
    from stillhouse.serve.engine import Engine, GenRequest

    eng = Engine(resolve_model("stillhouse:atlas"), max_batch=256, dtype="float32", watermark=watermark,
                 watermark_logprobs=watermark_logprobs)
    tok = eng.tokenizer
    reqs = [GenRequest(tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False), add_special_tokens=False)["input_ids"], 96,
                       temperature=1.0, seed=i, top_logprobs=top) for i, p in enumerate(prompts)]
    try:
        res = [f.result() for f in eng.submit_all(reqs)]
    finally:
        eng.close()

    def entry(i, lp):
        return {"id": i, "token": tok.decode([i]), "logprob": lp}

    return ([r.text for r in res],
            [[{**entry(e["id"], e["logprob"]), "top_logprobs": [entry(j, v) for j, v in e["top"]]} for e in r.logprobs]
             for r in res])


def main() -> None:
    from stillhouse.audit.radioactivity import whitebox
    from stillhouse.demo import world
    from stillhouse.models import resolve_model
    from stillhouse.train.sft import sft
    from stillhouse.watermark import keygen, read_key

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--probes", type=int, default=1900)
    ap.add_argument("--bias", type=float, default=2.0)
    ap.add_argument("--rows", default="sft,kd0.5,kd0.9,plain")
    ap.add_argument("--min-entropy", type=float, default=0.1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="audit_kd_"))
    keyfile = work / "key.json"
    keygen(keyfile, bias=args.bias)
    key = read_key(keyfile)
    t_start = time.time()
    speed = machine_speed()

    prompts = [t.prompt for t in world.sample_tasks(args.n, "train", 0)]
    marked, marked_lp = answers_with_logprobs(prompts, str(keyfile))
    plain = answers("stillhouse:atlas", prompts, temperature=1.0)
    # how far the reported distribution is from what the tokens were drawn from: the share of sampled answer tokens
    # that are green under the key, against the reported probability mass on green tokens at the same positions
    from transformers import AutoConfig

    from stillhouse.audit.radioactivity import GreenLists

    gl = GreenLists(key, AutoConfig.from_pretrained(resolve_model("stillhouse:atlas")).vocab_size)
    counted, sampled_share, reported_share = green_at_free_positions(marked_lp[:300], gl, args.min_entropy)
    teacher = heldout_accuracy(resolve_model("stillhouse:atlas"))
    teacher_macro = sum(teacher.values()) / len(teacher)
    probes = open_prompts()[:args.probes]

    def msgs(p, a):
        return {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}

    out = []
    marked_wlp = None
    for row in args.rows.split(","):
        d = work / row
        t0 = time.time()
        if row == "plain":
            res = sft([msgs(p, a) for p, a in zip(prompts, plain)], resolve_model("stillhouse:base"), d, seed=0, **TRAIN)
            label = "SFT on the unwatermarked answers (baseline)"
        elif row == "sft":
            res = sft([msgs(p, a) for p, a in zip(prompts, marked)], resolve_model("stillhouse:base"), d, seed=0, **TRAIN)
            label = "SFT on the watermarked answers (the demo's student)"
        elif row.startswith("kd"):
            wm = row.startswith("kdwm")  # the server run with --watermark-logprobs: same sampled answers
            alpha = float(row[4 if wm else 2:])
            if wm and marked_wlp is None:
                texts_w, marked_wlp = answers_with_logprobs(prompts, str(keyfile), watermark_logprobs=True)
                assert texts_w == marked, "the same seeds must draw the same answers"
            res = sft([msgs(p, a) for p, a in zip(prompts, marked)], resolve_model("stillhouse:base"), d, seed=0,
                      kd={"loss": "forward_kl", "alpha": alpha, "beta": 0.5, "min_aligned": 0.5},
                      teacher_logprobs=marked_wlp if wm else marked_lp, **TRAIN)
            label = (f"KD on the watermarked answers + watermarked logprobs (`serve --watermark-logprobs`; forward KL, "
                     f"alpha {alpha})" if wm else
                     f"KD on the watermarked answers + reported logprobs (forward KL, alpha {alpha})")
        else:
            raise SystemExit(f"unknown row {row!r}")
        secs = time.time() - t0
        acc = heldout_accuracy(str(d))
        macro = sum(acc.values()) / len(acc)
        texts = answers(str(d), probes, temperature=1.0)
        # every answer at the chosen floor, and under stricter floors and fewer probes: where in the text is the signal?
        grid = black_box_grid(texts, probes, key, tuple(dict.fromkeys((args.min_entropy,) + FLOORS)),
                              [q for q in PROBE_COUNTS if q < len(probes)] + [len(probes)])
        bb = grid[args.min_entropy, len(probes)]
        wb = whitebox(str(d), key, "stillhouse:atlas", probes[:500], texts[:500], null_keys=0)
        r = {"label": label, "secs": secs, "kept": macro / teacher_macro, "acc": acc, "bb": bb, "wb": wb,
             "kd": res.kd, "grid": grid}
        out.append(r)
        print(row, f"{secs:.0f} s", f"kept {r['kept']:.1%}", f"bb {bb.green}/{bb.scored} p {bb.p_value:.2g}",
              f"wb {wb.green_mass:.3f} p {wb.p_value:.2g}", res.kd, flush=True)

    total = time.time() - t_start
    families = list(teacher)
    lines = ["## Audit: a student distilled from a watermarked provider's logprobs (issue 10)", "",
             f"Command: `.venv/bin/python benchmarks/audit_kd.py --n {args.n} --probes {args.probes} --bias {args.bias} "
             f"--rows {args.rows}` ({platform.machine()}, {os.cpu_count()} CPU cores; {total / 60:.0f} min; "
             f"`../shared/tools/machine-speed`: {speed}x the reference machine). Key: ratio 0.25, bias {args.bias}, lefthash, context 1. "
             f"Atlas answers {args.n} world training prompts at T=1 through the serve engine, reporting its top-20 "
             f"logprobs; students from `stillhouse:base` with the demo's settings ({TRAIN}), training seed 0. Probes: "
             f"{len(probes)} open-answer prompts at T=1; black-box scoring leaves out tokens Atlas predicts with under "
             f"{args.min_entropy} nats.", "",
             f"**What the API reports.** Over Atlas's first 300 watermarked answers, at the {counted:,} tokens where "
             f"the reported distribution has at least {args.min_entropy} nats of entropy (elsewhere a watermark "
             f"cannot move a token): {sampled_share:.1%} of the sampled tokens are green, while the reported "
             f"logprobs put {reported_share:.1%} of their mass on green tokens (chance: "
             f"{gl.gamma:.0%}). The reported distribution is the raw model's: it does not carry the watermark.", "",
             "| student | train s | share kept | black-box green / scored | black-box p | white-box green mass (chance) "
             "| white-box p | " + " | ".join(families) + " |",
             "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in families) + " |"]
    for r in out:
        lines.append(f"| {r['label']} | {r['secs']:.0f} | {r['kept']:.1%} | {r['bb'].green} / {r['bb'].scored} | "
                     f"{r['bb'].p_value:.2g} | {r['wb'].green_mass:.3f} ({r['wb'].expected:.3f}) | {r['wb'].p_value:.2g} | "
                     + " | ".join(f"{r['acc'].get(f, 0):.0%}" for f in families) + " |")
    counts = [q for q in PROBE_COUNTS if q < len(probes)] + [len(probes)]
    lines += ["", "Black-box, the same answers under stricter entropy floors and fewer probes (green / scored, exact p):", "",
              "| student | entropy floor | " + " | ".join(f"{q} probes" for q in counts) + " |",
              "| --- | --- | " + " | ".join("---" for _ in counts) + " |"]
    for r in out:
        for floor in FLOORS:
            lines.append(f"| {r['label']} | {floor} nats | " + " | ".join(
                f"{r['grid'][floor, q].green} / {r['grid'][floor, q].scored} ({r['grid'][floor, q].p_value:.2g})"
                for q in counts) + " |")
    kd_rows = [r for r in out if r["kd"]]
    if kd_rows:
        k = kd_rows[0]["kd"]
        lines += ["", f"KD rows: {k['samples_aligned']} of {k['samples']} answers lined up with the student's "
                      f"tokenizer ({k['tokens_with_teacher_distribution']:,} tokens with the teacher's distribution)."]
    lines += ["", NOTES]
    write_section("audit_kd", "\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
