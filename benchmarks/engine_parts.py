"""Two engine changes measured in one process on SmolLM2-135M-Instruct, each against what it replaced, alternating.

    .venv/bin/python benchmarks/engine_parts.py [--rows 2,8,48] [--n 192] [--no-write]

- The float32 output layer (`stillhouse.models.output.ChunkedOutputLinear` against `F.linear`): one running batch of
  `rows` requests (the real job's prompts through the chat template), decoding steps timed in turns of five with one
  layer and then the other, six turns each, order alternating; the step's time in milliseconds.
- The prefix cache: the engine, float32, `max_batch` 64, the first `--n` prompts all submitted at once, greedy, 64
  tokens, with and without `prefix_cache` (fresh engines, alternating, two rounds): generated tokens/s, the seconds
  spent in prefill, and whether the answers are the same.

Writes BENCHMARKS.md's engine_parts section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import command_line, write_section  # noqa: E402
from engine import cpu_stall_us, machine_speed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GGUF = os.path.expanduser("~/.cache/stillhouse/real/SmolLM2-135M-Instruct.Q4_1.gguf")


def chat_ids(tok, prompts):
    return [tok(tok.apply_chat_template([{"role": "user", "content": x}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for x in prompts]


@torch.inference_mode()
def output_layer(prompts, row_counts):
    from stillhouse.models import load_local_lm
    from stillhouse.models.output import ChunkedOutputLinear
    from stillhouse.serve.batches import _SlotBatch
    from stillhouse.serve.engine import GenRequest, _Seq

    tok, model, _ = load_local_lm(GGUF, "cpu", "float32", log=lambda m: None)
    plain = model.lm_head
    heads = {"F.linear": plain, "chunked": ChunkedOutputLinear(plain)}
    out = []
    for rows in row_counts:
        b = _SlotBatch(model, max(64, rows), tok.pad_token_id)
        seqs = [_Seq(GenRequest(i, 256, temperature=0.0), "cpu") for i in chat_ids(tok, prompts[:rows])]
        b.last = b.prefill(seqs).argmax(-1)
        for _ in range(5):
            b.last = b.step(2048).argmax(-1)
        spent = dict.fromkeys(heads, 0.0)
        for turn in range(6):
            for name in (list(heads) if turn % 2 else list(heads)[::-1]):
                model.lm_head = heads[name]
                t = time.perf_counter()
                for _ in range(5):
                    b.last = b.step(2048).argmax(-1)
                spent[name] += time.perf_counter() - t
        model.lm_head = plain
        out.append((rows, {k: v / 30 * 1e3 for k, v in spent.items()}))
        print(rows, out[-1][1], flush=True)
    return out


def prefix_cache(prompts):
    from stillhouse.serve import batches
    from stillhouse.serve.engine import Engine, GenRequest

    spent = {"prefill": 0.0}
    orig = batches._SlotBatch.prefill

    def timed(self, *a, **k):
        t = time.perf_counter()
        try:
            return orig(self, *a, **k)
        finally:
            spent["prefill"] += time.perf_counter() - t

    batches._SlotBatch.prefill = timed
    res = {True: [], False: []}
    for r in range(2):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            e = Engine(GGUF, max_batch=64, window_ms=5, dtype="float32", prefix_cache=on)
            ids = chat_ids(e.tokenizer, prompts)
            e.submit(GenRequest(ids[0], 4, temperature=0.0)).result()
            spent["prefill"] = 0.0
            t = time.perf_counter()
            got = [f.result().token_ids for f in [e.submit(GenRequest(i, 64, temperature=0.0)) for i in ids]]
            wall = time.perf_counter() - t
            res[on].append({"wall": wall, "prefill": spent["prefill"], "tokens": sum(map(len, got)), "answers": got,
                            "saved": e.prefixes.tokens_saved if e.prefixes else 0,
                            "prompt_tokens": sum(map(len, ids))})
            e.close()
            print("prefix cache", on, f"{res[on][-1]['tokens'] / wall:.1f} tok/s", flush=True)
    batches._SlotBatch.prefill = orig
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="2,8,48")
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    prompts = [json.loads(x)["prompt"] for x in (ROOT / "src/stillhouse/real/prompts.jsonl").read_text().splitlines()]
    s0, t0 = cpu_stall_us(), time.monotonic()
    heads = output_layer(prompts, [int(x) for x in a.rows.split(",")])
    pc = prefix_cache(prompts[:a.n])
    stall = None if s0 is None else (cpu_stall_us() - s0) / 1e6 / (time.monotonic() - t0)
    factor, speed_out = machine_speed()
    lines = ["## Engine parts: the float32 output layer and the prefix cache, each against what it replaced", "",
             f"Command: `{command_line('benchmarks/engine_parts.py')}`", "",
             f"SmolLM2-135M-Instruct in float32, the real job's prompts through its chat template. Machine: "
             f"{os.cpu_count()} CPU cores, **{factor}** the reference machine; CPU stall during the run (PSI): "
             f"{'?' if stall is None else format(stall, '.0%')}.", "",
             "| rows decoding | step with `F.linear` ms | step with the chunked output layer ms | speed-up |",
             "| --- | --- | --- | --- |"]
    for rows, t in heads:
        lines.append(f"| {rows} | {t['F.linear']:.1f} | {t['chunked']:.1f} | {t['F.linear'] / t['chunked']:.2f}x |")
    on, off = pc[True], pc[False]
    tps = {k: sum(x["tokens"] for x in v) / sum(x["wall"] for x in v) for k, v in pc.items()}
    same = sum(x == y for x, y in zip(on[0]["answers"], off[0]["answers"]))
    lines += ["", f"Prefix cache, {a.n} prompts submitted at once to one engine (`max_batch` 64, greedy, 64 tokens), "
              "two rounds each, alternating:", "",
              "| prefix cache | generated tokens/s | prefill s (mean of rounds) | prompt tokens not prefilled | "
              "answers equal to the other row's |", "| --- | --- | --- | --- | --- |"]
    for k, v in ((True, on), (False, off)):
        lines.append(f"| {'on' if k else 'off'} | {tps[k]:.1f} | {sum(x['prefill'] for x in v) / len(v):.2f} | "
                     f"{v[0]['saved']:,} of {v[0]['prompt_tokens']:,} | {same}/{len(on[0]['answers'])} |")
    lines += ["", f"On/off: **{tps[True] / tps[False]:.2f}x**.", "", "```", speed_out, "```"]
    print("\n".join(lines))
    if not a.no_write:
        write_section("engine_parts", "\n".join(lines))


if __name__ == "__main__":
    main()
