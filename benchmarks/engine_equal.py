"""The serve engine's greedy answers against transformers' `generate` on a real model (SmolLM2-135M-Instruct).

    .venv/bin/python benchmarks/engine_equal.py [--model DIR_OR_GGUF] [--n 120] [--batch1 120] [--bf16] [--quantize int8,int4]

Prompts: `n` of the real job's prompts (src/stillhouse/real/prompts.jsonl) through SmolLM2's chat template, in three
lengths (one question; a system message and a question; a list of eight earlier questions before it), and budgets
of 32, 64 and 96 tokens in turn, so requests leave the batch at different steps.

- reference: `model.generate(do_sample=False)` on each prompt alone (no padding), float32;
- engine, float32, `max_batch=1`: the first `batch1` prompts, one at a time;
- engine, float32, `max_batch=64`: 64 prompts first, the rest joining eight at a time every few decode steps while
  others finish;
- with `--bf16`: the same batched run in bfloat16, `generate` alone in bfloat16, and for each answer that differs
  from the float32 reference, where it first differs and the float32 model's margin there (top logit minus the
  runner-up): a difference that starts where two tokens are within bf16's rounding of each other is the dtype's;
  a bf16 engine answer that differs from bf16 `generate`'s where the margin is wide would be a bug;
- with `--quantize int8,int4`: the engine with each (int8 or int4 weights, bf16 activations), batched and one at a time,
  against the fp32 reference, with the fp32 margin where each differing answer first leaves it.

References are cached under $STILLHOUSE_CACHE/bench/engine_equal (a re-run only runs the engine). Writes
BENCHMARKS.md's engine_equal section.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import command_line, write_section  # noqa: E402
from engine import cpu_stall_us, machine_speed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUDGETS = (32, 64, 96)
DEFAULT_MODEL = "~/.cache/stillhouse/real/SmolLM2-135M-Instruct.Q4_1.gguf"


def conversations(n: int) -> list[list[dict]]:
    """`n` chats in three lengths, from the real job's prompts."""
    qs = [json.loads(line)["prompt"] for line in (ROOT / "src/stillhouse/real/prompts.jsonl").read_text().splitlines()]
    out = []
    for i in range(n):
        q = qs[i % len(qs)]
        kind = i % 3
        if kind == 0:
            out.append([{"role": "user", "content": q}])
        elif kind == 1:
            out.append([{"role": "system", "content": "You are a careful assistant. Answer briefly and plainly."},
                        {"role": "user", "content": q}])
        else:
            earlier = "\n".join(f"- {qs[(i + 7 * k + 1) % len(qs)]}" for k in range(8))
            out.append([{"role": "user", "content": f"Here are some questions people asked before:\n{earlier}\n\n"
                                                    f"Answer only this one: {q}"}])
    return out


def cache_path(model: str, dtype: str, ids: list[list[int]], budgets: list[int]) -> Path:
    from stillhouse.models.gguf import cache_root

    h = hashlib.sha256(json.dumps([model, dtype, ids, budgets]).encode()).hexdigest()[:16]
    return cache_root().parent / "bench" / "engine_equal" / f"{dtype}-{h}.json"


@torch.inference_mode()
def reference(model, tok, ids: list[list[int]], budgets: list[int], dtype: str, src: str, log,
              alone: int | None = None, batch: int = 24) -> list[list[int]]:
    """`generate` on each prompt, cut after the end of sequence; cached. The first `alone` prompts (default: all) one
    at a time with no padding; the rest in left-padded batches of `batch` with the same budget (quicker, and still
    transformers' own greedy decoding)."""
    alone = len(ids) if alone is None else alone
    path = cache_path(src, dtype + ("" if alone >= len(ids) else f"-alone{alone}-batch{batch}"), ids, budgets)
    if path.exists():
        return json.loads(path.read_text())
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    out: list = [None] * len(ids)
    groups = [[k] for k in range(min(alone, len(ids)))]
    rest = sorted(range(alone, len(ids)), key=lambda k: budgets[k])
    groups += [rest[j:j + batch] for j in range(0, len(rest), batch)]
    t = time.perf_counter()
    for g in groups:
        width = max(len(ids[k]) for k in g)
        x = torch.full((len(g), width), tok.pad_token_id)
        mask = torch.zeros(len(g), width, dtype=torch.long)
        for row, k in enumerate(g):
            x[row, width - len(ids[k]):] = torch.tensor(ids[k])
            mask[row, width - len(ids[k]):] = 1
        gen = model.generate(x, attention_mask=mask, max_new_tokens=max(budgets[k] for k in g), do_sample=False,
                             pad_token_id=tok.pad_token_id)[:, width:].tolist()
        for row, k in enumerate(g):
            y = gen[row][:budgets[k]]
            cut = next((j for j, v in enumerate(y) if v in eos), None)
            out[k] = y if cut is None else y[:cut + 1]
        log(f"  generate {dtype}: {sum(v is not None for v in out)}/{len(ids)} ({time.perf_counter() - t:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def run_engine(engine, ids, budgets, staggered: bool) -> tuple[list[list[int]], float, int]:
    """Every prompt through `engine`: all at once, or (staggered) 64 first and the rest joining 8 at a time."""
    from stillhouse.serve.engine import GenRequest

    t = time.perf_counter()
    reqs = [GenRequest(p, n, temperature=0.0) for p, n in zip(ids, budgets)]
    if not staggered:
        futs = [engine.submit(r) for r in reqs]
    else:
        futs = [engine.submit(r) for r in reqs[:64]]
        for k in range(64, len(reqs), 8):
            start = engine.steps_run
            while engine.steps_run < start + 5:  # they join a batch mid-decode
                time.sleep(0.002)
            futs += [engine.submit(r) for r in reqs[k:k + 8]]
    res = [f.result() for f in futs]
    return [r.token_ids for r in res], time.perf_counter() - t, engine.largest_batch


def first_diff(a: list[int], b: list[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def margins(model, prompt: list[int], answer: list[int], upto: int) -> list[float]:
    """The model's top-1 minus top-2 logit at each of the answer's first `upto` + 1 positions."""
    x = torch.tensor([prompt + answer[:upto]])
    logits = model(input_ids=x).logits[0, len(prompt) - 1:].float()
    top = logits.topk(2, -1).values
    return (top[:, 0] - top[:, 1]).tolist()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--n", type=int, default=120)
    ap.add_argument("--batch1", type=int, default=None, help="prompts run at max_batch 1 (default: all n)")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--quantize", default="", help="also the engine with these --quantize methods (int8,int4)")
    ap.add_argument("--bf16-n", type=int, default=None,
                    help="prompts run in bf16 (and quantized) at max_batch 1 and by bf16 generate (default: all n)")
    ap.add_argument("--alone", type=int, default=None,
                    help="prompts whose fp32 reference runs alone (default: all); the rest in padded batches")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    from stillhouse.models import load_local_lm, resolve_model
    from stillhouse.serve.engine import Engine

    def log(msg):
        print(msg, flush=True)

    stall0, t0 = cpu_stall_us(), time.monotonic()
    model_src = os.path.expanduser(a.model)
    src = resolve_model(model_src)
    tok, m32, _ = load_local_lm(model_src, "cpu", "float32", log=log)
    convs = conversations(a.n)
    ids = [tok(tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
           ["input_ids"] for c in convs]
    budgets = [BUDGETS[(i // 3) % 3] for i in range(a.n)]  # every length meets every budget
    lens = sorted(map(len, ids))
    log(f"{a.n} prompts of {lens[0]}-{lens[-1]} tokens (median {lens[len(lens) // 2]})")
    ref = reference(m32, tok, ids, budgets, "float32", str(src), log, alone=a.alone)
    n_alone = a.n if a.alone is None else min(a.alone, a.n)
    rows = []

    def compare(label, got, wall, largest):
        same = sum(g == r for g, r in zip(got, ref))
        toks = sum(map(len, got))
        rows.append((label, f"{same}/{len(got)}", toks, f"{wall:.0f}", largest))
        log(f"{label}: {same}/{len(got)} equal to generate's fp32 answers, {toks} tokens in {wall:.0f} s")
        return same

    nb1 = a.n if a.batch1 is None else a.batch1
    e = Engine(model_src, max_batch=1, window_ms=0, dtype="float32")
    got, wall, largest = run_engine(e, ids[:nb1], budgets[:nb1], staggered=False)
    e.close()
    ref_all = ref
    ref = ref_all[:nb1]
    compare("engine, float32, max_batch 1 (one at a time)", got, wall, largest)
    ref = ref_all
    e = Engine(model_src, max_batch=64, window_ms=0, dtype="float32")
    got, wall, largest = run_engine(e, ids, budgets, staggered=True)
    e.close()
    compare("engine, float32, max_batch 64 (64 first, the rest joining 8 at a time mid-decode)", got, wall, largest)
    bf = []
    if a.bf16:
        nb = a.n if a.bf16_n is None else a.bf16_n
        _, m16, _ = load_local_lm(model_src, "cpu", "bfloat16", log=log)
        ref16 = reference(m16, tok, ids[:nb], budgets[:nb], "bfloat16", str(src), log)
        e = Engine(model_src, max_batch=64, window_ms=0, dtype="bfloat16")
        got16, wall, largest = run_engine(e, ids, budgets, staggered=True)
        e.close()
        compare("engine, bfloat16, max_batch 64 (the same schedule)", got16, wall, largest)
        e = Engine(model_src, max_batch=1, window_ms=0, dtype="bfloat16")
        got16_1, wall1, _ = run_engine(e, ids[:nb], budgets[:nb], staggered=False)
        e.close()
        ref = ref_all[:nb]
        compare(f"transformers generate alone, bfloat16 (first {nb} prompts)", ref16, float("nan"), 1)
        ref = ref_all
        same_b64 = sum(g == r for g, r in zip(got16, ref16))
        same_b1 = sum(g == r for g, r in zip(got16_1, ref16))
        same_64_1 = sum(g == r for g, r in zip(got16, got16_1))
        bf.append(f"- bf16 among themselves (first {nb} prompts): the engine at max_batch 1 equals bf16 `generate` alone "
                  f"on {same_b1}/{nb}; the engine at max_batch 64 equals it on {same_b64}/{nb} and equals the engine "
                  f"at max_batch 1 on {same_64_1}/{nb}.")
        at_div, eng_vs_gen = [], []
        for i in range(a.n):
            j = first_diff(got16[i], ref[i])
            if j is not None:
                at_div.append(margins(m32, ids[i], ref[i], j)[j])
        for i in range(nb):
            k = first_diff(got16[i], ref16[i])
            if k is not None:
                eng_vs_gen.append(margins(m16, ids[i], ref16[i], k)[k])
        everywhere = [x for i in range(0, a.n, 4) for x in margins(m32, ids[i], ref[i], len(ref[i]) - 1)]
        if at_div:
            bf.append(f"- where an engine bf16 answer first leaves the fp32 one ({len(at_div)} of {a.n} answers), the "
                      f"fp32 model's top-2 logit margin is median {statistics.median(at_div):.3f}, max "
                      f"{max(at_div):.3f}; over every token of every 4th fp32 answer it is median "
                      f"{statistics.median(everywhere):.3f}, and {sum(x <= max(at_div) for x in everywhere)}/"
                      f"{len(everywhere)} tokens have a margin at or below that max.")
        if eng_vs_gen:
            bf.append(f"- where the engine's bf16 answer first leaves bf16 `generate`'s ({len(eng_vs_gen)} answers), "
                      f"bf16 `generate`'s own top-2 margin is median {statistics.median(eng_vs_gen):.3f}, max "
                      f"{max(eng_vs_gen):.3f} (bf16 keeps 8 bits of mantissa: logits near 16 are rounded to "
                      f"0.0625).")
    for method in [m for m in a.quantize.split(",") if m]:
        nb = a.n if a.bf16_n is None else a.bf16_n
        e = Engine(model_src, max_batch=64, window_ms=0, quantize=method)
        gotq, wall, largest = run_engine(e, ids, budgets, staggered=True)
        e.close()
        compare(f"engine, --quantize {method} ({method} weights, bf16 activations), max_batch 64 (the same schedule)",
                gotq, wall, largest)
        e = Engine(model_src, max_batch=1, window_ms=0, quantize=method)
        gotq_1, wall1, _ = run_engine(e, ids[:nb], budgets[:nb], staggered=False)
        e.close()
        ref = ref_all[:nb]
        compare(f"engine, --quantize {method}, max_batch 1 (first {nb} prompts)", gotq_1, wall1, 1)
        ref = ref_all
        at_div = []
        for i in range(a.n):
            j = first_diff(gotq[i], ref[i])
            if j is not None:
                at_div.append((j, margins(m32, ids[i], ref[i], j)[j]))
        same_1_64 = sum(x == y for x, y in zip(gotq, gotq_1))
        bf.append(f"- {method} among themselves (first {nb} prompts): the {method} engine at max_batch 64 equals it at "
                  f"max_batch 1 on {same_1_64}/{nb}.")
        if at_div:
            js = sorted(j for j, _ in at_div)
            bf.append(f"- where a {method} answer first leaves the fp32 one ({len(at_div)} of {a.n} answers; at token "
                      f"median {statistics.median(js):.0f}, first quartile {js[len(js) // 4]}), the fp32 model's "
                      f"top-2 logit margin is median {statistics.median(m for _, m in at_div):.3f}, max "
                      f"{max(m for _, m in at_div):.3f}.")
    wall_all = time.monotonic() - t0
    stall1 = cpu_stall_us()
    stall = f"{(stall1 - stall0) / 1e6 / wall_all:.0%}" if stall0 is not None and stall1 is not None else "unknown"
    factor, speed_out = machine_speed()
    cmd = command_line("benchmarks/engine_equal.py")
    lines = ["## Engine: greedy answers equal to transformers' on a real model", "",
             f"Command: `{cmd}`", "",
             f"Model: SmolLM2-135M-Instruct (the real job's Q4_1 GGUF, dequantized; 49,152-token vocabulary, 9 query "
             f"heads sharing 3 KV heads, tied embeddings). {a.n} prompts from the real job's prompt list through its "
             f"chat template in three lengths ({lens[0]}-{lens[-1]} tokens, median {lens[len(lens) // 2]}), budgets "
             f"32/64/96 tokens, greedy. Reference: transformers `generate(do_sample=False)` in float32, "
             + ("on each prompt alone (no padding)." if n_alone >= a.n else
                f"on the first {n_alone} prompts alone (no padding), the other {a.n - n_alone} in left-padded "
                f"batches of 24 (alone would have taken hours on the machine as loaded that day)."), "",
             "| run | answers equal to generate's (fp32) | tokens | wall s | largest batch |",
             "| --- | --- | --- | --- | --- |",
             *[f"| {r[0]} | {r[1]} | {r[2]:,} | {r[3]} | {r[4]} |" for r in rows], "",
             *bf, "",
             f"Machine speed (`../shared/tools/machine-speed`, after the run): **{factor}** the reference machine. "
             f"CPU stall during the run (PSI `/proc/pressure/cpu`, all processes): {stall}; the run took "
             f"{wall_all:.0f} s at niceness {os.nice(0)}.", "",
             "```", speed_out, "```"]
    print("\n".join(lines))
    if not a.no_write:
        write_section("engine_equal", "\n".join(lines))


if __name__ == "__main__":
    main()
