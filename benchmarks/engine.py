"""The serve engine's throughput against the CPU's limit, before and after, beside `transformers serve`.

    .venv/bin/python benchmarks/engine.py [--n 3000] [--concurrency 512] [--max-batch 512]
                                          [--before 94d021f] [--no-transformers] [--no-direct]

Workload: the demo's `n` training prompts (`world.sample_tasks(n, "train", 0)`), each sent as one
user message, greedy, max_tokens 96, by `concurrency` concurrent HTTP clients, to Atlas (a
4.77M-parameter Llama shipped in the package) served by, one after another in this run:

- `after`: `stillhouse serve` as it is in this tree, in float32;
- `before`: the engine at commit `--before` (a copy of that commit's `src/` under /tmp), as it
  really ran (dtype auto: the checkpoint's bf16), and again in float32, so the dtype's share shows;
- `transformers serve --continuous-batching --dtype float32` (it ships with transformers);
- and, with no HTTP in the way, the after and before engines driven in-process (`Engine.submit`).

The compute limit: Atlas costs 2 x 4.77M FLOP a token, so a CPU doing G fp32 GFLOP/s (measured
here: a 1024x1024 matmul loop on 2 threads) can produce at most G / 9.54 MFLOP tokens a second.
Generated tokens are counted the same way for every server (the answer's tokens, plus the end
of sequence where the answer stopped); the table also counts prompt tokens, which the model must
process too. Every answer is compared with the after engine's. Writes BENCHMARKS.md's engine section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PARAMS = 4_772_608
FLOP_PER_TOKEN = 2 * PARAMS
MAX_TOKENS = 96

# Serves (or, with "direct", drives in-process) one engine: whichever `stillhouse` is first on sys.path.
LAUNCH = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
if cfg["mode"] == "http":
    from stillhouse.serve import serve
    serve(cfg["model"], port=cfg["port"], model_name="atlas", max_batch=cfg["max_batch"], dtype=cfg["dtype"])
else:
    from stillhouse.serve.engine import Engine, GenRequest
    e = Engine(cfg["model"], max_batch=cfg["max_batch"], dtype=cfg["dtype"])
    tok = e.tokenizer
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for p in cfg["prompts"]]
    t = time.perf_counter()
    res = [f.result() for f in [e.submit(GenRequest(i, cfg["max_tokens"], temperature=0.0)) for i in ids]]
    wall = time.perf_counter() - t
    e.close()
    print(json.dumps({"wall": wall, "texts": [r.text for r in res], "finish": [r.finish_reason for r in res],
                      "usage": sum(len(r.token_ids) for r in res), "prompt_tokens": sum(map(len, ids))}))
"""


def cpu_stall_us() -> int | None:
    """Microseconds that some runnable task has waited for a CPU (Linux PSI), all processes counted."""
    try:
        return int(Path("/proc/pressure/cpu").read_text().split("total=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def fp32_gflops() -> float:
    import torch

    torch.set_num_threads(2)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(4):
        t = time.perf_counter()
        for _ in range(20):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 20 * 2 * 1024 ** 3 / best / 1e9


def machine_speed() -> tuple[str, str]:
    """(the factor against the reference machine, the tool's full output), from ../shared/tools/machine-speed."""
    tool = ROOT.parent / "shared" / "tools" / "machine-speed"
    if not tool.exists():
        return "unknown", f"{tool} not found"
    out = subprocess.run([str(tool)], cwd=ROOT, capture_output=True, text=True).stdout
    m = re.search(r"about ([\d.]+)x the reference machine", out)
    return (m.group(1) + "x" if m else "unknown"), out.strip()


def before_tree(commit: str) -> Path:
    """`src/` of `commit`, extracted once under the temp directory."""
    sha = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    dest = Path(tempfile.gettempdir()) / f"stillhouse-before-{sha[:12]}"
    if not (dest / "src" / "stillhouse").exists():
        dest.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "src"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def start(cmd: list[str], env: dict, url: str, timeout: float = 300) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server {cmd[:3]} exited at start-up: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"server {cmd[:3]} did not start within {timeout:.0f} s")
        time.sleep(0.3)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(url: str, model: str, prompts: list[str], concurrency: int) -> dict:
    """Every prompt once, `concurrency` at a time; answers in prompt order, and the wall time."""
    texts: list[str | None] = [None] * len(prompts)
    finish: list[str | None] = [None] * len(prompts)
    usage, errors = [0], []
    next_i = iter(range(len(prompts)))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:
        async def one(i: int) -> None:
            r = await client.post(url + "/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompts[i]}], "max_tokens": MAX_TOKENS,
                "temperature": 0})
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:200]}")
                return
            body = r.json()
            texts[i] = body["choices"][0]["message"]["content"]
            finish[i] = body["choices"][0]["finish_reason"]
            usage[0] += (body.get("usage") or {}).get("completion_tokens") or 0

        async def worker() -> None:
            for i in next_i:
                await one(i)

        # a few answers first, outside the timing: a server may load or compile on its first request
        await asyncio.gather(*(one(i) for i in range(min(8, len(prompts)))))
        texts[:8], finish[:8], usage[0], errors[:] = [None] * min(8, len(prompts)), [None] * min(8, len(prompts)), 0, []
        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t
    return {"wall": wall, "texts": texts, "finish": finish, "usage": usage[0], "errors": errors}


def gen_tokens(tok, texts: list, finish: list) -> int:
    """Tokens generated, counted alike for every server: the answer's tokens, plus one for a stop (end of sequence)."""
    return sum(len(tok(t, add_special_tokens=False)["input_ids"]) + (f == "stop") for t, f in zip(texts, finish)
               if t is not None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=512)
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--before", default="94d021f", help="the commit whose engine is 'before'")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-direct", action="store_true")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from stillhouse.demo import world
    from stillhouse.models import resolve_model

    model = resolve_model("stillhouse:atlas")
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [t.prompt for t in world.sample_tasks(args.n, "train", 0)]
    prompt_tokens = sum(len(tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                        add_generation_prompt=True), add_special_tokens=False)["input_ids"])
                        for p in prompts)
    gflops = fp32_gflops()
    limit = gflops * 1e9 / FLOP_PER_TOKEN
    print(f"fp32 matmul {gflops:.0f} GFLOP/s -> at most {limit:,.0f} tokens/s", flush=True)
    before_src = before_tree(args.before)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    before_env = {**base_env, "PYTHONPATH": str(before_src)}
    after_env = {**base_env, "PYTHONPATH": str(ROOT / "src")}

    def ours(label, env, dtype, mode="http"):
        cfg = {"mode": mode, "model": model, "max_batch": args.max_batch, "dtype": dtype}
        if mode == "direct":
            cfg.update(prompts=prompts, max_tokens=MAX_TOKENS)
            out = subprocess.run([sys.executable, "-c", LAUNCH, json.dumps(cfg)], env=env, cwd=ROOT, capture_output=True,
                                 text=True)
            if out.returncode:
                raise SystemExit(f"{label}: {out.stderr[-2000:]}")
            return {**json.loads(out.stdout.strip().splitlines()[-1]), "errors": []}
        cfg["port"] = port = free_port()
        proc = start([sys.executable, "-c", LAUNCH, json.dumps(cfg)], env, f"http://127.0.0.1:{port}")
        try:
            return asyncio.run(load(f"http://127.0.0.1:{port}", "atlas", prompts, args.concurrency))
        finally:
            stop(proc)

    def hf_serve():
        port = free_port()
        exe = Path(sys.executable).with_name("transformers")
        proc = start([str(exe), "serve", model, "--continuous-batching", "--dtype", "float32", "--device", "cpu",
                      "--host", "127.0.0.1", "--port", str(port)], base_env, f"http://127.0.0.1:{port}")
        try:
            return asyncio.run(load(f"http://127.0.0.1:{port}", model, prompts, args.concurrency))
        finally:
            stop(proc)

    runs = [("after: stillhouse serve, float32", lambda: ours("after", after_env, "float32")),
            ("before: stillhouse serve at {c}, dtype auto (bf16)", lambda: ours("before", before_env, "auto")),
            ("before: stillhouse serve at {c}, float32", lambda: ours("before", before_env, "float32"))]
    if not args.no_transformers:
        runs.append(("transformers serve --continuous-batching --dtype float32", hf_serve))
    if not args.no_direct:
        runs += [("after: Engine in-process (no HTTP), float32", lambda: ours("after", after_env, "float32", "direct")),
                 ("before: Engine at {c} in-process (no HTTP), float32",
                  lambda: ours("before", before_env, "float32", "direct"))]
    results = {}
    for label, fn in runs:
        label = label.format(c=args.before)
        stall0, t0 = cpu_stall_us(), time.perf_counter()
        r = fn()
        stall1, elapsed = cpu_stall_us(), time.perf_counter() - t0
        r["stall"] = None if stall0 is None or stall1 is None else (stall1 - stall0) / 1e6 / elapsed
        r["gen"] = gen_tokens(tok, r["texts"], r["finish"])
        results[label] = r
        print(f"{label}: {r['wall']:.1f} s, {r['gen'] / r['wall']:,.0f} generated tokens/s, usage {r['usage']}, "
              f"errors {len(r['errors'])}", flush=True)

    factor, speed_out = machine_speed()
    after = results["after: stillhouse serve, float32"]
    before_bf16 = results[f"before: stillhouse serve at {args.before}, dtype auto (bf16)"]
    before_fp32 = results[f"before: stillhouse serve at {args.before}, float32"]
    lines = ["## Engine: throughput against the CPU's limit", "",
             f"Command: `.venv/bin/python benchmarks/engine.py --n {args.n} --concurrency {args.concurrency} "
             f"--max-batch {args.max_batch} --before {args.before}`{' --no-transformers' if args.no_transformers else ''}"
             f"{' --no-direct' if args.no_direct else ''}", "",
             f"Workload: the demo's {args.n} training prompts, one user message each, greedy, max_tokens {MAX_TOKENS}, "
             f"{args.concurrency} concurrent HTTP clients (httpx), to Atlas ({PARAMS:,} parameters); our servers at "
             f"`--max-batch {args.max_batch}`. Every server ran in this one run, one after another; 8 warm-up requests "
             "before each timing.", "",
             f"Machine: x86_64, {os.cpu_count()} CPU cores, fp32 matmul **{gflops:.0f} GFLOP/s** (1024x1024, 2 threads), "
             f"so the compute limit is {gflops:.0f} GFLOP/s / {FLOP_PER_TOKEN / 1e6:.2f} MFLOP = **{limit:,.0f} tokens/s**. "
             f"Machine speed (`../shared/tools/machine-speed`): **{factor}** the reference machine.", "",
             "| server | wall s | generated tokens/s | of the limit | prompt + generated tokens/s | of the limit | "
             "x before (bf16) | x before (fp32) | answers equal to after's | CPU stall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in results.items():
        tps = r["gen"] / r["wall"]
        all_tps = (r["gen"] + prompt_tokens) / r["wall"]
        same = sum(a == b for a, b in zip(r["texts"], after["texts"]) if a is not None)
        answered = sum(t is not None for t in r["texts"])
        lines.append(f"| {label} | {r['wall']:.1f} | {tps:,.0f} | {tps / limit:.1%} | {all_tps:,.0f} | "
                     f"{all_tps / limit:.1%} | {tps / (before_bf16['gen'] / before_bf16['wall']):.2f}x | "
                     f"{tps / (before_fp32['gen'] / before_fp32['wall']):.2f}x | {same}/{args.n}"
                     + (f" ({args.n - answered} not answered: {r['errors'][:1]})" if answered < args.n else "")
                     + f" | {'?' if r['stall'] is None else format(r['stall'], '.0%')} |")
    lines += ["", f"Prompt tokens: {prompt_tokens:,}; generated (after): {after['gen']:,} "
              f"(the server's own usage count: {after['usage']:,}). CPU stall: the share of the run's wall time in which "
              "some runnable task waited for a CPU (Linux PSI `/proc/pressure/cpu`, every process on the machine, this "
              "benchmark's own client and server included); other people's jobs on this shared machine raise it.",
              "", "machine-speed output:", "", "```", speed_out, "```"]
    write_section("engine", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
