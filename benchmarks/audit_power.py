"""Issue 10: the audit's power and calibration on students distilled here, and attribution's accuracy.

    .venv/bin/python benchmarks/audit_power.py [--n 3000] [--shares 1,0.25,0.05,0.01] [--nulls 5]
        [--queries 100,250,500,1000,1900] [--keys 200]

1. Atlas answers the world's `--n` training prompts twice, sampled at temperature 1 as in the demo, in-process (the serve
   engine): once with a fresh watermark key, once without. Mira (the world's second teacher)
   answers the same prompts.
2. For each share s of `--shares`, a student is trained from `stillhouse:base` with the demo's
   training settings on Atlas's answers, each one the watermarked answer with probability s
   and the plain one otherwise. Null students (`--nulls`, training seeds 0..k-1, a random 90%
   of the prompts each) are trained on Mira's answers: they never saw Atlas's text.
3. Each student answers the world's open-answer (`invent`) prompts, greedy, each distinct
   prompt once (train and held-out splits: ~1,900), sampled at temperature 1. Black-box: the answers are scored under
   the key (`stillhouse.audit.radioactivity.score_texts`), Atlas's near-certain tokens left
   out (entropy below 0.1 nats), after the first q queries for each q in `--queries`; the
   number of queries needed to reach p <= 1e-5 is the first q that does. White-box: the
   student's own next-token distributions along its first 500 answers (`whitebox`).
4. Calibration: every student's texts under `--keys` random keys (false-positive rates), the
   null students' p-values under the true key, and a KS test of the random keys' p-values.
5. Attribution: Atlas's and Mira's answers to the open prompts, half to fit the classifier
   (TF-IDF + logistic regression) and half held out; then each student's answers attributed.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402

TRAIN = {"epochs": 4, "learning_rate": 1.5e-3, "batch_size": 8, "max_length": 256}  # the demo recipe's


def answers(model: str, prompts: list[str], watermark: str | None = None, temperature: float = 0.0) -> list[str]:
    from stillhouse.models import resolve_model
    from stillhouse.serve.engine import Engine, GenRequest

    eng = Engine(resolve_model(model), max_batch=256, dtype="float32", watermark=watermark)
    tok = eng.tokenizer
    reqs = [GenRequest(tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False), add_special_tokens=False)["input_ids"], 96,
                       temperature=temperature, seed=i) for i, p in enumerate(prompts)]
    try:
        return [f.result().text for f in eng.submit_all(reqs)]
    finally:
        eng.close()


def train(rows: list[dict], out: Path, seed: int) -> float:
    from stillhouse.models import resolve_model
    from stillhouse.train.sft import sft

    t0 = time.time()
    sft(rows, resolve_model("stillhouse:base"), out, seed=seed, **TRAIN)
    return time.time() - t0


def black_box_grid(texts: list[str], probes: list[str], key: dict, floors: tuple[float, ...],
                   counts: list[int]) -> dict:
    """Black-box green counts of the answers `texts` to `probes` under `key` (no null keys), for each entropy floor
    (nats of Atlas's prediction under which a token is left out) and each count q of first answers: {(floor, q):
    GreenCount}. Atlas's entropies are computed once for every cell."""
    from transformers import AutoConfig, AutoTokenizer

    from stillhouse.audit.radioactivity import radioactivity, reference_entropies
    from stillhouse.models import resolve_model

    atlas = resolve_model("stillhouse:atlas")
    tok = AutoTokenizer.from_pretrained(atlas)
    vocab = AutoConfig.from_pretrained(atlas).vocab_size
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    probe_ids = [tok(q, add_special_tokens=False)["input_ids"] for q in probes]
    ent = reference_entropies(atlas, tok, probes, ids)
    return {(floor, q): radioactivity(ids[:q], key, vocab, prompts=probe_ids[:q], null_keys=0,
                                      keep=[[h >= floor for h in row] for row in ent[:q]]).key
            for floor in floors for q in counts}


def open_prompts() -> list[str]:
    """Every distinct open-answer prompt of the world (both splits), in a fixed shuffled order."""
    from stillhouse.demo import world

    seen = {}
    rng = random.Random(0)
    for _ in range(60000):
        t = world.make_task("invent", rng)
        seen.setdefault(t.prompt, None)
    out = sorted(seen)
    random.Random(1).shuffle(out)
    return out


def main() -> None:
    from scipy.stats import kstest

    from stillhouse.audit.attribution import fit_attribution
    from stillhouse.audit.radioactivity import score_texts, whitebox
    from stillhouse.demo import world
    from stillhouse.watermark import keygen, read_key

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--shares", default="1,0.25,0.05,0.01")
    ap.add_argument("--nulls", type=int, default=5)
    ap.add_argument("--queries", default="100,250,500,1000,1900")
    ap.add_argument("--keys", type=int, default=200)
    ap.add_argument("--min-entropy", type=float, default=0.1)
    ap.add_argument("--bias", type=float, default=2.0, help="the key's green-list bias (delta)")
    ap.add_argument("--context-width", type=int, default=1, help="the key's context width")
    args = ap.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    queries = [int(q) for q in args.queries.split(",")]
    work = Path(tempfile.mkdtemp(prefix="audit_power_"))
    keyfile = work / "key.json"
    keygen(keyfile, bias=args.bias, context_width=args.context_width)
    key = read_key(keyfile)
    t_start = time.time()

    prompts = [t.prompt for t in world.sample_tasks(args.n, "train", 0)]
    marked = answers("stillhouse:atlas", prompts, watermark=str(keyfile), temperature=1.0)
    plain = answers("stillhouse:atlas", prompts, temperature=1.0)
    mira = answers("stillhouse:mira", prompts, temperature=1.0)
    changed = sum(a != b for a, b in zip(marked, plain))
    print(f"teachers answered: {changed} of {len(prompts)} Atlas answers changed by the watermark", flush=True)

    probes = open_prompts()
    q_max = min(max(queries), len(probes))
    queries = [q for q in queries if q <= q_max] or [q_max]
    students: list[tuple[str, str, float, Path]] = []  # (label, kind, share, dir)
    for s in shares:
        rng = random.Random(f"share:{s}")
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": m if rng.random() < s
                                                                                    else q}]}
                for p, m, q in zip(prompts, marked, plain)]
        d = work / f"share_{s:g}"
        secs = train(rows, d, 0)
        print(f"student at share {s:g} trained in {secs:.0f} s", flush=True)
        students.append((f"{s:.0%} watermarked", "atlas", s, d))
    for k in range(args.nulls):
        rng = random.Random(f"null:{k}")
        rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": a}]}
                for p, a in zip(prompts, mira) if rng.random() < 0.9]
        d = work / f"null_{k}"
        secs = train(rows, d, k)
        print(f"null student {k} trained in {secs:.0f} s", flush=True)
        students.append((f"null {k} (Mira's data, seed {k})", "null", 0.0, d))

    atlas_open = answers("stillhouse:atlas", probes[:q_max], watermark=str(keyfile), temperature=1.0)
    mira_open = answers("stillhouse:mira", probes[:q_max], temperature=1.0)
    half = q_max // 2
    attr = fit_attribution({"atlas": atlas_open[:half], "mira": mira_open[:half]})
    held = attr.model.predict(atlas_open[half:] + mira_open[half:])
    truth = ["atlas"] * (q_max - half) + ["mira"] * (q_max - half)
    held_acc = sum(a == b for a, b in zip(held, truth)) / len(truth)

    rows_out, key_nulls = [], []
    for label, kind, s, d in students:
        texts = answers(str(d), probes[:q_max], temperature=1.0)
        by_q = {}
        for q in queries:
            res, _ = score_texts(texts[:q], probes[:q], key, "stillhouse:atlas", null_keys=0,
                                 min_entropy=args.min_entropy)
            by_q[q] = res.key
        full, _ = score_texts(texts, probes[:q_max], key, "stillhouse:atlas", null_keys=args.keys, seed=1,
                              min_entropy=args.min_entropy)
        raw, _ = score_texts(texts, probes[:q_max], key, "stillhouse:atlas", null_keys=0)
        key_nulls += full.null_p_values
        wb = whitebox(str(d), key, "stillhouse:atlas", probes[:500], texts[:500], null_keys=args.keys, seed=1)
        needed = next((q for q in queries if by_q[q].p_value <= 1e-5), None)
        a = attr.attribute(texts)
        rows_out.append({"label": label, "kind": kind, "share": s, "by_q": by_q, "full": full, "raw": raw.key,
                         "wb": wb, "needed": needed, "attribution": a})
        print(label, {q: f"{r.p_value:.2g}" for q, r in by_q.items()}, f"raw {raw.key.p_value:.2g}",
              f"wb {wb.p_value:.2g}", a["likeliest"], flush=True)

    ks = kstest(key_nulls, "uniform")
    total = time.time() - t_start
    lines = ["## Audit: power, calibration and attribution on students distilled here (issue 10)", "",
             f"Command: `.venv/bin/python benchmarks/audit_power.py --n {args.n} --shares {args.shares} --nulls "
             f"{args.nulls} --queries {args.queries} --keys {args.keys} --bias {args.bias} --context-width "
             f"{args.context_width}` ({platform.machine()}, {os.cpu_count()} CPU cores; {total / 60:.0f} min). Key: "
             f"ratio 0.25, bias {args.bias}, lefthash, context {args.context_width}. Teachers answer the "
             f"world's {args.n} training prompts sampled at T=1 (the demo's setting), with the same seeds with and without "
             f"the key: the watermark changed {changed} of Atlas's {len(prompts)} answers. Students: `stillhouse:base` "
             f"trained as the demo ({TRAIN}). Probes: the world's {q_max} distinct open-answer prompts, sampled at T=1; "
             f"black-box scoring leaves out tokens Atlas predicts with under {args.min_entropy} nats of entropy.", "",
             "| student | " + " | ".join(f"black-box p, {q} queries" for q in queries)
             + " | without the entropy filter | queries to p <= 1e-5 | white-box p | white-box green mass (chance) "
               "| FPR of random keys at p <= 1e-3 | attribution (P atlas) |",
             "| --- | " + " | ".join("---" for _ in queries) + " | --- | --- | --- | --- | --- | --- |"]
    for r in rows_out:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['by_q'][q].p_value:.2g}" for q in queries)
                     + f" | {r['raw'].p_value:.2g} | {r['needed'] or 'not reached'} | {r['wb'].p_value:.2g} | "
                       f"{r['wb'].green_mass:.3f} ({r['wb'].expected:.3f}) | "
                       f"{r['full'].false_positive_rate(1e-3):.1%} | "
                       f"{r['attribution']['probability']['atlas']:.2f} ({r['attribution']['likeliest']}) |")
    nulls = [r for r in rows_out if r["kind"] == "null"]
    null_bb = [r["full"].key.p_value for r in nulls]
    null_wb = [r["wb"].p_value for r in nulls]
    fpr = sum(p <= 1e-3 for p in key_nulls) / len(key_nulls) if key_nulls else float("nan")
    lines += ["", "**Calibration.** Null students under the true key: black-box p-values "
              + ", ".join(f"{p:.2g}" for p in null_bb) + "; white-box "
              + ", ".join(f"{p:.2g}" for p in null_wb)
              + f". Random keys over every student's texts ({len(key_nulls)} p-values): false-positive rate "
              f"{fpr:.2%} at p <= 1e-3; KS test against the uniform p = {ks.pvalue:.3g} (binomial p-values are "
              "discrete and lean conservative, so a rejection here means p-values that run high, not low).", "",
              f"**Attribution.** Atlas against Mira on their answers to the open prompts: cross-validated accuracy "
              f"{attr.cv_accuracy:.1%} on {half} answers each, {held_acc:.1%} on the {q_max - half} held-out "
              "answers of each (chance 50%)."]
    write_section("audit_power", "\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
