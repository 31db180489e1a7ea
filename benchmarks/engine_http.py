"""What HTTP costs the engine at 64 clients: the same closed-loop load in-process and through `stillhouse serve`.

    .venv/bin/python benchmarks/engine_http.py [--n 192] [--clients 64] [--max-tokens 64] [--rounds 2] [--no-write]

SmolLM2-135M-Instruct in float32, `max_batch` 64, the 64-client level of `engine_real.py` (the real job's prompts
24 to 24 + n as one user message, greedy, 64 tokens). Each of `--clients` clients sends its next request as soon as
its last is answered:

- in-process: client threads call `Engine.submit(...).result()` on an engine in this process;
- over HTTP: `stillhouse serve` in its own process, with `engine_real.py`'s client over httpx (plain responses).

Turns alternate (in-process, HTTP, HTTP, in-process, ...), fresh engine and server each turn. Measured: generated
tokens/s (the engine's token count in-process; over HTTP the answer re-tokenized plus one where it stopped, as
`engine_real.py` counts), the answers' agreement between the two, and the share of the fp32 compute limit (the CPU's
best 1024x1024 matmul rate sampled between turns, over 2 x 134.5M FLOP a generated token). Writes BENCHMARKS.md's
engine_http section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import command_line, write_section  # noqa: E402
from engine import cpu_stall_us, fp32_gflops, free_port, machine_speed, start, stop  # noqa: E402
from engine_parts import chat_ids  # noqa: E402
from engine_real import FLOP_PER_TOKEN, GGUF, ROOT, generated_tokens, load, server_env  # noqa: E402


def in_process(prompts: list[str], clients: int, max_tokens: int) -> dict:
    from stillhouse.serve.engine import Engine, GenRequest

    e = Engine(str(GGUF), max_batch=64, dtype="float32")
    ids = chat_ids(e.tokenizer, prompts)
    e.submit(GenRequest(ids[0], 4, temperature=0.0)).result()  # warm-up, untimed
    todo, lock = iter(range(len(ids))), threading.Lock()
    texts, tokens = [None] * len(ids), [0]

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            r = e.submit(GenRequest(ids[i], max_tokens, temperature=0.0)).result()
            texts[i] = r.text
            with lock:
                tokens[0] += len(r.token_ids)

    t = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    e.close()
    return {"wall": wall, "gen": tokens[0], "texts": texts}


def over_http(prompts: list[str], clients: int, max_tokens: int, tok) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "-m", "stillhouse.cli", "serve", str(GGUF), "--port", str(port), "--model-name",
                  "smollm2", "--max-batch", "64", "--dtype", "float32"], server_env(), url, timeout=900)
    try:
        asyncio.run(load(url, "smollm2", prompts[:2], 2, 8, False))  # warm-up, untimed
        r = asyncio.run(load(url, "smollm2", prompts, clients, max_tokens, False, "httpx"))  # as its section was run
    finally:
        stop(proc)
    if r["errors"]:
        raise SystemExit(f"over HTTP: {len(r['errors'])} requests failed: {r['errors'][:1]}")
    return {"wall": r["wall"], "gen": generated_tokens(tok, r["texts"], r["finish"]), "texts": r["texts"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from stillhouse.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model(str(GGUF)))
    prompts = [json.loads(x)["prompt"] for x in (ROOT / "src/stillhouse/real/prompts.jsonl").read_text().splitlines()]
    prompts = prompts[24:24 + a.n]
    runs: dict[str, list[dict]] = {"in-process": [], "over HTTP": []}
    gflops = [fp32_gflops()]
    s0, t0 = cpu_stall_us(), time.monotonic()
    for r in range(a.rounds):
        for kind in (("in-process", "over HTTP") if r % 2 == 0 else ("over HTTP", "in-process")):
            res = (in_process(prompts, a.clients, a.max_tokens) if kind == "in-process"
                   else over_http(prompts, a.clients, a.max_tokens, tok))
            runs[kind].append(res)
            print(f"{kind}: {res['gen'] / res['wall']:.1f} tokens/s, {res['wall']:.1f} s", flush=True)
            gflops.append(fp32_gflops())
    stall = None if s0 is None else (cpu_stall_us() - s0) / 1e6 / (time.monotonic() - t0)
    limit = max(gflops) * 1e9 / FLOP_PER_TOKEN
    factor, speed_out = machine_speed()
    same = sum(x == y for x, y in zip(runs["in-process"][0]["texts"], runs["over HTTP"][0]["texts"]))
    tps = {k: [x["gen"] / x["wall"] for x in v] for k, v in runs.items()}
    lines = ["## What HTTP costs the engine: one closed-loop load in-process and over HTTP", "",
             f"Command: `{command_line('benchmarks/engine_http.py')}`", "",
             f"SmolLM2-135M-Instruct, float32, `max_batch` 64; {a.clients} clients, each sending its next request when "
             f"its last is answered, {a.n} requests (the real job's prompts 24 to {24 + a.n}, `engine_real`'s "
             f"64-client level), greedy, {a.max_tokens} tokens; fresh engine or server each turn, turns alternating. "
             f"Machine: {os.cpu_count()} CPU cores, **{factor}** the reference machine; fp32 matmul best "
             f"{max(gflops):.0f} GFLOP/s (samples {', '.join(f'{g:.0f}' for g in gflops)}), a limit of **{limit:.0f} "
             f"generated tokens/s**; CPU stall during the run (PSI): {'?' if stall is None else format(stall, '.0%')}.",
             "", "| load | generated tokens/s, each turn | mean | of the fp32 limit |", "| --- | --- | --- | --- |"]
    for k, v in tps.items():
        mean = sum(v) / len(v)
        lines.append(f"| {k} | {', '.join(f'{x:.1f}' for x in v)} | {mean:.1f} | {mean / limit:.1%} |")
    ratio = (sum(tps["over HTTP"]) / len(tps["over HTTP"])) / (sum(tps["in-process"]) / len(tps["in-process"]))
    lines += ["", f"Over HTTP / in-process: **{ratio:.2f}x**; answers equal between the two (first turns): "
              f"{same}/{a.n}.", "", "```", speed_out, "```"]
    print("\n".join(lines))
    if not a.no_write:
        write_section("engine_http", "\n".join(lines))


if __name__ == "__main__":
    main()
