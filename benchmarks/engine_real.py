"""`stillhouse serve` on a real model beside `transformers serve` and llama.cpp's server, in one run.

    .venv/bin/python benchmarks/engine_real.py [--concurrency 1,8,64] [--requests 8,16,192] [--max-tokens 128]
        [--llamacpp-python ~/.cache/stillhouse/bench-venvs/llamacpp/bin/python] [--no-transformers]
        [--dtypes float32,auto,int8] [--repeats 1 | --repeats 1,1,3] [--client aiohttp|httpx]

Model: SmolLM2-135M-Instruct, the real job's Q4_1 GGUF (`stillhouse serve` and `transformers serve` get it dequantized,
as `stillhouse` converts it; llama.cpp runs the GGUF itself, 4-bit). Servers, all up at once:

- `stillhouse serve` (this tree) in each of `--dtypes` (auto: bf16 where the CPU has native bf16; int8: `--quantize
  int8`, int8 weights and bf16 activations), `--max-batch 64`;
- `transformers serve --continuous-batching --dtype float32` on the dequantized directory;
- llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`, from llama-cpp-python installed in a
  benchmark venv of its own: it is a C++ build, not a dependency of stillhouse), 2 threads, `--interrupt_requests
  False` (its default ends a running stream whenever another request arrives).

For each concurrency level (1, 8, 64 clients) and mode (plain and streaming), every server gets the same requests
(the real job's prompts as one user message, greedy, `--max-tokens`), servers taking turns in rotated order, in
`--repeats` rounds (a server's turn varies by a tenth from round to round on a 2-core machine; a row is the median
round). The client is this process, on the same cores as the servers: its CPU time is reported beside each row. Each
client sends its next request as soon as its last is answered, so with more requests than clients (192 for 64 by
default, three each) the batch stays full until the last requests are sent; the tail where it drains as the last
answers end is part of the measure, alike for every server (for stillhouse's fp32 server, 53 of 137 decoding steps
and about a quarter of the run; `engine_http` in BENCHMARKS.md). Measured:
generated tokens/s (the answer's tokens by SmolLM2's tokenizer, plus one where it stopped at the end of sequence,
alike for every server), time to first token (streaming: first content chunk), request latency p50/p99, and the share
of the compute limit: SmolLM2 costs 2 x 134.5M FLOP a generated token, and the CPU's fp32 matmul rate (1024x1024, 2
threads, best of the samples taken between levels) bounds what any fp32 server can do; a second share counts the
prompts' tokens as well (each 2 x the parameters less the output layer's), since every server must prefill them. Also
the machine-speed factor
and the CPU stall (PSI) while each server ran. Writes BENCHMARKS.md's engine_real section.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import command_line, write_section  # noqa: E402
from engine import cpu_stall_us, fp32_gflops, free_port, machine_speed, start, stop  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GGUF = Path("~/.cache/stillhouse/real/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
LLAMACPP_PY = Path("~/.cache/stillhouse/bench-venvs/llamacpp/bin/python").expanduser()
PARAMS = 134_515_008  # SmolLM2-135M, tied embeddings counted once; the output layer's matmul is in it
FLOP_PER_TOKEN = 2 * PARAMS
# A prompt token skips the 49,152 x 576 output layer (only the last position's logits are computed; llama.cpp's server
# computes them for the last position too), and attention is left out of both counts.
PROMPT_FLOP_PER_TOKEN = 2 * (PARAMS - 49_152 * 576)


@contextlib.asynccontextmanager
async def _session(kind: str, concurrency: int):
    """`post(url, body)`: an async context giving (status, the body's lines, read the whole body), over aiohttp or
    httpx. The client shares the servers' CPU cores, so what it costs a streamed chunk is taken from the server
    measured: aiohttp took 0.3 s of CPU for a 64-client streamed level where httpx took 0.9 s (stillhouse's fp32
    server, 6,574 chunks; 0.1 s against 0.3 s plain), so aiohttp is the default, alike for every server."""
    if kind == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
            @contextlib.asynccontextmanager
            async def post(url: str, body: dict):
                async with client.stream("POST", url, json=body) as r:
                    yield r.status_code, r.aiter_lines(), r.aread
            yield post
        return
    import aiohttp

    async def lines(content):
        async for line in content:
            yield line.decode().rstrip("\r\n")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as client:
        @contextlib.asynccontextmanager
        async def post(url: str, body: dict):
            async with client.post(url, json=body) as r:
                yield r.status, lines(r.content), r.read
        yield post


async def load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int, stream: bool,
               client: str = "aiohttp") -> dict:
    """Every prompt once, `concurrency` at a time: answers, finish reasons, latencies, times to first token, and
    the CPU seconds this client took."""
    n = len(prompts)
    out = {"texts": [None] * n, "finish": [None] * n, "latency": [], "ttft": [], "errors": []}
    todo = iter(range(n))
    cpu = time.process_time()
    async with _session(client, concurrency) as post:
        async def one(i: int) -> None:
            body = {"model": model, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": max_tokens,
                    "temperature": 0, "stream": stream}
            t = time.perf_counter()
            text, finish, first = [], None, None
            async with post(url + "/v1/chat/completions", body) as (status, lines, read):
                if status != 200:
                    out["errors"].append(f"{status}: {(await read())[:200]!r}")
                    return
                if not stream:
                    c = json.loads(await read())["choices"][0]
                    out["texts"][i], out["finish"][i] = c["message"]["content"], c["finish_reason"]
                    out["latency"].append(time.perf_counter() - t)
                    return
                async for line in lines:
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for c in chunk.get("choices") or []:
                        piece = (c.get("delta") or {}).get("content")
                        if piece:
                            first = first or time.perf_counter()
                            text.append(piece)
                        finish = c.get("finish_reason") or finish
            out["texts"][i], out["finish"][i] = "".join(text), finish
            out["latency"].append(time.perf_counter() - t)
            if first is not None:
                out["ttft"].append(first - t)

        async def worker() -> None:
            for i in todo:
                await one(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        out["wall"] = time.perf_counter() - t0
    out["client_cpu"] = time.process_time() - cpu
    return out


def server_env() -> dict:
    """The environment a benchmarked server starts in: offline, quiet, this tree's `src` importable."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT / "src")}


def generated_tokens(tok, texts: list, finish: list) -> int:
    """Tokens generated, counted alike for every server: each answer re-tokenized by SmolLM2's tokenizer, plus one
    where it stopped at the end of sequence; unanswered requests (None) count nothing."""
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + (f == "stop")
               for t, f in zip(texts, finish) if t is not None)


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--requests", default="8,16,192", help="requests sent at each concurrency level")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,auto,int8",
                    help="stillhouse serve's --dtype values to run; int8, int4: --quantize int8 / int4 (bf16 activations)")
    ap.add_argument("--llamacpp-python", default=str(LLAMACPP_PY))
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--modes", default="plain,stream")
    ap.add_argument("--repeats", default="1",
                    help="rounds at each concurrency level (one number for all, or one per level): every row reports "
                         "its median round (of two, the slower), the rounds' tokens/s beside it")
    ap.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp",
                    help="the benchmark's own HTTP client (it shares the CPU with the servers; aiohttp costs less)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    levels = [int(x) for x in a.concurrency.split(",")]
    counts = [int(x) for x in a.requests.split(",")]
    repeats = [int(x) for x in a.repeats.split(",")]
    repeats = repeats * len(levels) if len(repeats) == 1 else repeats
    if len(counts) != len(levels) or len(repeats) != len(levels):
        sys.exit(f"--requests and --repeats need one value per --concurrency level ({len(levels)}: {a.concurrency})")
    modes = a.modes.split(",")
    from transformers import AutoTokenizer

    from stillhouse.models import resolve_model

    hf_dir = resolve_model(str(GGUF))
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = [json.loads(x)["prompt"] for x in (ROOT / "src/stillhouse/real/prompts.jsonl").read_text().splitlines()]
    env = server_env()

    servers: dict[str, tuple] = {}
    for dt in a.dtypes.split(","):
        port = free_port()
        opt = ["--quantize", dt] if dt in ("int8", "int4") else ["--dtype", dt]
        servers[f"stillhouse serve {' '.join(opt)}"] = (
            [sys.executable, "-m", "stillhouse.cli", "serve", str(GGUF), "--port", str(port), "--model-name", "smollm2",
             "--max-batch", "64", *opt], port, "smollm2")
    if not a.no_transformers:
        port = free_port()
        servers["transformers serve --continuous-batching --dtype float32"] = (
            [str(Path(sys.executable).with_name("transformers")), "serve", hf_dir, "--continuous-batching", "--dtype",
             "float32", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)], port, hf_dir)
    llama_note = ""
    if Path(a.llamacpp_python).exists():
        port = free_port()
        servers["llama.cpp server (llama-cpp-python, Q4_1 GGUF, 2 threads)"] = (
            [a.llamacpp_python, "-m", "llama_cpp.server", "--model", str(GGUF), "--n_threads", "2",
             "--n_threads_batch", "2", "--n_ctx", "4096", "--host", "127.0.0.1", "--port", str(port),
             # by default it ends a stream (sending [DONE]) as soon as another request waits for the model: streams
             # under concurrency came back cut short, a few tokens each, until this was set
             "--interrupt_requests", "False"], port, "smollm2")
        ver = subprocess.run([a.llamacpp_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
        llama_note = f"llama-cpp-python {ver} (built from source here, in its own venv)"
    else:
        llama_note = f"llama.cpp's server not run: {a.llamacpp_python} does not exist"
    print(llama_note, flush=True)

    gflops_seen = [fp32_gflops()]
    stall_start, t_start = cpu_stall_us(), time.monotonic()
    procs, runs = {}, []
    try:
        for label, (cmd, port, name) in servers.items():
            url = f"http://127.0.0.1:{port}"
            procs[label] = start(cmd, env, url, timeout=900, ready="/v1/models")
            asyncio.run(load(url, name, prompts[:2], 2, 8, False))  # warm-up, untimed
            print(f"up: {label}", flush=True)
        labels = list(servers)
        offset = 0
        for c, n, reps in zip(levels, counts, repeats):
            part = prompts[offset:offset + n]
            offset += n
            for rep in range(reps):
                for mode in modes:
                    rot = ((levels.index(c) + rep) * len(modes) + modes.index(mode)) % len(labels)
                    for label in labels[rot:] + labels[:rot]:
                        cmd, port, name = servers[label]
                        s0 = cpu_stall_us()
                        r = asyncio.run(load(f"http://127.0.0.1:{port}", name, part, c, a.max_tokens,
                                             mode == "stream", a.client))
                        s1 = cpu_stall_us()
                        gen = generated_tokens(tok, r["texts"], r["finish"])
                        prompt_toks = sum(len(tok.apply_chat_template([{"role": "user", "content": q}],
                                                                      add_generation_prompt=True, return_dict=True)
                                              ["input_ids"]) for q, t in zip(part, r["texts"]) if t is not None)
                        runs.append({"server": label, "clients": c, "mode": mode, "wall": r["wall"], "gen": gen,
                                     "prompt": prompt_toks, "texts": r["texts"], "ttft": r["ttft"],
                                     "latency": r["latency"], "errors": r["errors"], "client_cpu": r["client_cpu"],
                                     "stall": None if s0 is None or s1 is None else (s1 - s0) / 1e6 / r["wall"]})
                        print(f"{c} clients {mode} {label}: {gen / r['wall']:.1f} tok/s, {r['wall']:.0f} s, "
                              f"client CPU {r['client_cpu']:.1f} s, errors {len(r['errors'])}", flush=True)
            gflops_seen.append(fp32_gflops())
    finally:
        for p in procs.values():
            stop(p)
    wall_all = time.monotonic() - t_start
    stall_end = cpu_stall_us()
    gflops = max(gflops_seen)
    limit = gflops * 1e9 / FLOP_PER_TOKEN
    factor, speed_out = machine_speed()
    ours = next(iter(servers))
    # one row per (level, mode, server), in the order first run: its median round (by tokens/s), all rounds beside it
    rows = []
    for r in runs:
        if any(x["server"] == r["server"] and x["clients"] == r["clients"] and x["mode"] == r["mode"] for x in rows):
            continue
        same = sorted((x for x in runs if x["server"] == r["server"] and x["clients"] == r["clients"]
                       and x["mode"] == r["mode"]), key=lambda x: x["gen"] / x["wall"])
        rows.append(same[(len(same) - 1) // 2] | {"rounds": [x["gen"] / x["wall"] for x in same]})

    def ref_tps(c, mode):
        return next(r["gen"] / r["wall"] for r in rows if r["server"] == ours and r["clients"] == c and r["mode"] == mode)

    cmd = command_line("benchmarks/engine_real.py")
    lines = ["## Engine on a real model: stillhouse serve, transformers serve and llama.cpp side by side", "",
             f"Command: `{cmd}`", "",
             f"Model: SmolLM2-135M-Instruct ({PARAMS:,} parameters), the real job's Q4_1 GGUF; {llama_note}. "
             f"Workload: the real job's prompts as one user message, greedy, max_tokens {a.max_tokens}; at each "
             f"level ({', '.join(f'{c} clients: {n} requests' for c, n in zip(levels, counts))}) every server got "
             f"the same requests, plain and streamed, servers taking turns in rotated order; all servers up at once; "
             f"rounds at each level: {', '.join(map(str, repeats))} (a row is its median round, of two the slower; "
             f"the rounds' tokens/s "
             f"beside it). Client: {a.client}, in this process, on the same cores as the servers (its CPU seconds "
             f"in the table).", "",
             f"Machine: x86_64, {os.cpu_count()} CPU cores, this run at niceness {os.nice(0)}. fp32 matmul "
             f"best **{gflops:.0f} GFLOP/s** (samples {', '.join(f'{g:.0f}' for g in gflops_seen)}), so an fp32 "
             f"compute limit of {gflops:.0f} GFLOP/s / {FLOP_PER_TOKEN / 1e6:.0f} MFLOP = **{limit:.0f} generated "
             f"tokens/s**. Machine speed (`../shared/tools/machine-speed`, after the run): **{factor}** the reference "
             f"machine. CPU stall over the whole run (PSI, all processes): "
             f"{'?' if stall_start is None else format((stall_end - stall_start) / 1e6 / wall_all, '.0%')}.", "",
             "| clients | mode | server | generated tokens/s | x stillhouse (first row) | of the fp32 limit | "
             "of the limit, prompts' FLOPs counted too | TTFT p50 s | "
             "latency p50 s | latency p99 s | answers equal to the first row's | CPU stall | client CPU s | "
             "rounds, tokens/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tps = r["gen"] / r["wall"]
        first = next(x for x in rows if x["server"] == ours and x["clients"] == r["clients"] and x["mode"] == r["mode"])
        same = sum(x == y for x, y in zip(r["texts"], first["texts"]) if x is not None)
        answered = sum(t is not None for t in r["texts"])
        lines.append(f"| {r['clients']} | {r['mode']} | {r['server']} | {tps:.1f} | "
                     f"{tps / ref_tps(r['clients'], r['mode']):.2f}x | {tps / limit:.1%} | "
                     f"{(r['gen'] * FLOP_PER_TOKEN + r['prompt'] * PROMPT_FLOP_PER_TOKEN) / r['wall'] / (gflops * 1e9):.1%} | "
                     f"{'–' if not r['ttft'] else format(pct(r['ttft'], 0.5), '.2f')} | {pct(r['latency'], 0.5):.2f} | "
                     f"{pct(r['latency'], 0.99):.2f} | {same}/{answered}"
                     + (f" ({len(r['errors'])} failed: {r['errors'][:1]})" if r["errors"] else "")
                     + f" | {'?' if r['stall'] is None else format(r['stall'], '.0%')} | {r['client_cpu']:.1f} | "
                     + " / ".join(f"{x:.1f}" for x in r["rounds"]) + " |")
    if {"plain", "stream"} <= set(modes):
        lines += ["", "Streamed against plain (median rounds' tokens/s):"]
        for c in levels:
            ratio = {label: next(x["gen"] / x["wall"] for x in rows if x["server"] == label and x["clients"] == c
                                 and x["mode"] == "stream")
                     / next(x["gen"] / x["wall"] for x in rows if x["server"] == label and x["clients"] == c
                            and x["mode"] == "plain") for label in labels}
            lines.append(f"- {c} clients: " + "; ".join(f"{label} {v:.2f}x" for label, v in ratio.items()))
    lines += ["", "machine-speed output:", "", "```", speed_out, "```"]
    print("\n".join(lines))
    if not a.no_write:
        write_section("engine_real", "\n".join(lines))
    Path("/tmp/engine_real_rows.json").write_text(json.dumps(runs))


if __name__ == "__main__":
    main()
