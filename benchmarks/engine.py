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


# Measured while building the new engine (profiles, not re-run by this script; the commands are /tmp scripts
# that drive `Engine` in-process on the demo prompts, with py-spy 0.4 or torch.profiler).
WHERE_THE_TIME_GOES = """\
Where the time went (profiles taken while building it; in-process, fp32, demo prompts):

- **before** (py-spy on the engine thread, 600 prompts, max_batch 256): decode forward 49%, prefill 26%, and about
  25% rebuilding the left-padded batch cache whenever requests joined or left (`_SlackLayer.reset_to` 17%,
  `_compact` + `_merge` 8%). Inside the forward: Linear 35%, SDPA 22%, RMSNorm 5%, rotary 5%. Per-row Python
  (`_advance`, `_sample`, `_resolve_finished`) under 1%.
- **one cache row per request** (`_SlotBatch`, no copies to admit or drop) at max_batch 512: prefill rose to 55%,
  because hundreds of 30-75-token prompts were prefilled as one left-padded group (60% padding). Prefilling in
  length-sorted groups of ~1024 tokens fixed that.
- **after** (torch.profiler over 60 decode steps and 32 prefills in steady state, 1500 prompts, 512 in flight):
  matmuls 45%, decode attention (SDPA's CPU flash kernel) 45%, key/value writes 2.5%, elementwise ops ~5%.
  Matmuls run near the machine's peak (180-210 GFLOP/s at these shapes when the machine is quiet). Decode attention
  is memory-bound (it reads every row's keys and values at every step) and reads 1.66x the bytes it needs: each
  row reads up to the longest row's column. Splitting it into 64-row chunks that each stop at their own longest row
  would cut that to 1.45x, but the smaller SDPA calls cost more than they saved (21.4 s vs 19.7 s, 41.0 vs 38.4
  CPU-s for 1500 prompts), so it was dropped. Per-step bookkeeping: `future.cancelled()` on every row took 1.4 ms a
  step at 512 rows (now a flag set by a done-callback); sampling and `_advance` 0.5 ms a step.
- **over HTTP** (py-spy on the server, all threads, 1500 prompts, 512 clients): the engine thread 85% of samples,
  the event loop (uvicorn's h11, FastAPI, pydantic, JSON) 15%, and the client shares the same 2 cores.
- bf16: this CPU has native bf16 (`avx512_bf16`, ~900 GFLOP/s bf16 matmul against ~200 fp32), so the before engine
  in its own dtype (the checkpoint's bf16) is faster here than in fp32; the reference machine runs a bf16 matmul at
  0.7 GFLOP/s, where the same before row would be far slower.
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


def start(cmd: list[str], env: dict, url: str, timeout: float = 300, ready: str = "/health") -> subprocess.Popen:
    """Start a server and wait until `ready` answers 200 (llama.cpp's server has no /health: `/v1/models`). Its
    output goes to a file: a server that logs enough at start-up fills a pipe nobody reads, and then blocks."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=log, text=True)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server {cmd[:3]} exited at start-up: {log.read()[-2000:]}")
        try:
            if httpx.get(url + ready, timeout=5).status_code == 200:
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def load(url: str, model: str, prompts: list[str], concurrency: int, warmup: bool = False) -> dict:
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

        if warmup:  # a few answers only, outside any timing: a server may load or compile on its first requests
            await asyncio.gather(*(one(i) for i in range(min(8, len(prompts)))))
            return {}
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
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (each server gets n / rounds prompts each)")
    ap.add_argument("--transformers-n", type=int, default=None,
                    help="send transformers serve only the first this many prompts (it is much slower on CPU)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from stillhouse.demo import world
    from stillhouse.models import resolve_model

    model = resolve_model("stillhouse:atlas")
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [t.prompt for t in world.sample_tasks(args.n, "train", 0)]
    prompt_lens = [len(tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True), add_special_tokens=False)["input_ids"])
                   for p in prompts]
    prompt_tokens = sum(prompt_lens)
    gflops_seen = [fp32_gflops()]  # sampled between rounds too: the best is the machine's, the rest is others' load
    print(f"fp32 matmul {gflops_seen[0]:.0f} GFLOP/s", flush=True)
    before_src = before_tree(args.before)
    base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    before_env = {**base_env, "PYTHONPATH": str(before_src)}
    after_env = {**base_env, "PYTHONPATH": str(ROOT / "src")}

    def direct(label, env):
        cfg = {"mode": "direct", "model": model, "max_batch": args.max_batch, "dtype": "float32", "prompts": prompts,
               "max_tokens": MAX_TOKENS}
        out = subprocess.run([sys.executable, "-c", LAUNCH, json.dumps(cfg)], env=env, cwd=ROOT, capture_output=True,
                             text=True)
        if out.returncode:
            raise SystemExit(f"{label}: {out.stderr[-2000:]}")
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "errors": []}

    def ours(env, dtype):
        port = free_port()
        cfg = {"mode": "http", "model": model, "max_batch": args.max_batch, "dtype": dtype, "port": port}
        return [sys.executable, "-c", LAUNCH, json.dumps(cfg)], env, port, "atlas"

    def hf_serve():
        port = free_port()
        exe = Path(sys.executable).with_name("transformers")
        return ([str(exe), "serve", model, "--continuous-batching", "--dtype", "float32", "--device", "cpu",
                 "--host", "127.0.0.1", "--port", str(port)], base_env, port, model)

    servers = {"after: stillhouse serve, float32": ours(after_env, "float32"),
               f"before: stillhouse serve at {args.before}, dtype auto (bf16)": ours(before_env, "auto"),
               f"before: stillhouse serve at {args.before}, float32": ours(before_env, "float32")}
    if not args.no_transformers:
        servers["transformers serve --continuous-batching --dtype float32"] = hf_serve()
    # All servers stay up and take the prompts in interleaved rounds (each round's order rotated), so that other
    # work on this shared machine falls on all of them alike rather than on whichever ran at the wrong moment.
    procs, results = {}, {}
    try:
        for label, (cmd, env, port, name) in servers.items():
            procs[label] = start(cmd, env, f"http://127.0.0.1:{port}")
            asyncio.run(load(f"http://127.0.0.1:{port}", name, prompts, args.concurrency, warmup=True))
            results[label] = {"wall": 0.0, "texts": [None] * args.n, "finish": [None] * args.n, "usage": 0,
                              "errors": [], "stall": 0.0, "cpu_own": 0.0, "cpu_idle": 0.0}
        bounds = [round(args.n * k / args.rounds) for k in range(args.rounds + 1)]
        labels = list(servers)
        for r in range(args.rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                cmd, env, port, name = servers[label]
                part = slice(bounds[r], bounds[r + 1])
                if "transformers" in label and args.transformers_n is not None:
                    part = slice(min(part.start, args.transformers_n), min(part.stop, args.transformers_n))
                if part.start >= part.stop:
                    continue
                cpu0 = {k: cpu_seconds(p.pid) for k, p in procs.items()}
                stall0 = cpu_stall_us()
                out = asyncio.run(load(f"http://127.0.0.1:{port}", name, prompts[part], args.concurrency))
                stall1 = cpu_stall_us()
                acc = results[label]
                acc["wall"] += out["wall"]
                acc["texts"][part], acc["finish"][part] = out["texts"], out["finish"]
                acc["usage"] += out["usage"]
                acc["errors"] += out["errors"]
                acc["stall"] += 0 if stall0 is None or stall1 is None else (stall1 - stall0) / 1e6
                for k, p in procs.items():
                    used = cpu_seconds(p.pid) - cpu0[k]
                    results[k]["cpu_own" if k == label else "cpu_idle"] += used
                print(f"round {r + 1}/{args.rounds} {label}: {out['wall']:.1f} s", flush=True)
            gflops_seen.append(fp32_gflops())
    finally:
        for p in procs.values():
            stop(p)
    for label, r in results.items():
        r["stall"] /= r["wall"]
    if not args.no_direct:
        for label, env in (("after: Engine in-process (no HTTP), float32", after_env),
                           (f"before: Engine at {args.before} in-process (no HTTP), float32", before_env)):
            stall0, t0 = cpu_stall_us(), time.perf_counter()
            results[label] = direct(label, env)
            stall1, elapsed = cpu_stall_us(), time.perf_counter() - t0
            results[label]["stall"] = None if stall0 is None or stall1 is None else (stall1 - stall0) / 1e6 / elapsed
    for label, r in results.items():
        r["gen"] = gen_tokens(tok, r["texts"], r["finish"])
        print(f"{label}: {r['wall']:.1f} s, {r['gen'] / r['wall']:,.0f} generated tokens/s, usage {r['usage']}, "
              f"errors {len(r['errors'])}", flush=True)
    gflops = max(gflops_seen)
    limit = gflops * 1e9 / FLOP_PER_TOKEN

    factor, speed_out = machine_speed()
    after = results["after: stillhouse serve, float32"]
    before_bf16 = results[f"before: stillhouse serve at {args.before}, dtype auto (bf16)"]
    before_fp32 = results[f"before: stillhouse serve at {args.before}, float32"]
    lines = ["## Engine: throughput against the CPU's limit", "",
             f"Command: `.venv/bin/python benchmarks/engine.py --n {args.n} --concurrency {args.concurrency} "
             f"--max-batch {args.max_batch} --before {args.before} --rounds {args.rounds}"
             f"{'' if args.transformers_n is None else f' --transformers-n {args.transformers_n}'}"
             f"{' --no-transformers' if args.no_transformers else ''}{' --no-direct' if args.no_direct else ''}`", "",
             f"Workload: the demo's {args.n} training prompts, one user message each, greedy, max_tokens {MAX_TOKENS}, "
             f"{args.concurrency} concurrent HTTP clients (httpx), to Atlas ({PARAMS:,} parameters); our servers at "
             f"`--max-batch {args.max_batch}`. All HTTP servers were up at once and took the prompts in {args.rounds} "
             "interleaved rounds (order rotated each round), after 8 warm-up requests each; the in-process rows ran "
             "after them, one after the other.", "",
             f"Machine: x86_64, {os.cpu_count()} CPU cores, fp32 matmul **{gflops:.0f} GFLOP/s** (1024x1024, 2 threads; "
             f"best of {len(gflops_seen)} samples between rounds, which ranged {min(gflops_seen):.0f} to {gflops:.0f}), "
             f"so the compute limit is {gflops:.0f} GFLOP/s / {FLOP_PER_TOKEN / 1e6:.2f} MFLOP = **{limit:,.0f} tokens/s**. "
             f"Machine speed (`../shared/tools/machine-speed`): **{factor}** the reference machine.", "",
             "| server | wall s | generated tokens/s | of the limit | prompt + generated tokens/s | of the limit | "
             "x before (bf16) | x before (fp32) | answers equal to after's | CPU stall |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in results.items():
        tps = r["gen"] / r["wall"]
        all_tps = (r["gen"] + sum(p for p, t in zip(prompt_lens, r["texts"]) if t is not None)) / r["wall"]
        same = sum(a == b for a, b in zip(r["texts"], after["texts"]) if a is not None)
        answered = sum(t is not None for t in r["texts"])
        sent = args.n if "transformers" not in label or args.transformers_n is None else min(args.n, args.transformers_n)
        lines.append(f"| {label} | {r['wall']:.1f} | {tps:,.0f} | {tps / limit:.1%} | {all_tps:,.0f} | "
                     f"{all_tps / limit:.1%} | {tps / (before_bf16['gen'] / before_bf16['wall']):.2f}x | "
                     f"{tps / (before_fp32['gen'] / before_fp32['wall']):.2f}x | {same}/{answered}"
                     + (f" (of {sent} sent; {sent - answered} failed: {r['errors'][:1]})" if answered < sent else "")
                     + f" | {'?' if r['stall'] is None else format(r['stall'], '.0%')} |")
    lines += ["", f"Prompt tokens: {prompt_tokens:,}; generated (after): {after['gen']:,} "
              f"(the server's own usage count: {after['usage']:,}). CPU stall: the share of the run's wall time in which "
              "some runnable task waited for a CPU (Linux PSI `/proc/pressure/cpu`, every process on the machine, this "
              "benchmark's own client and server included); other people's jobs on this shared machine raise it.",
              "CPU used by the HTTP servers while idle (others being measured), s: "
              + "; ".join(f"{k}: {v['cpu_idle']:.1f}" for k, v in results.items() if "cpu_idle" in v) + ".",
              "", WHERE_THE_TIME_GOES, "", "machine-speed output:", "", "```", speed_out, "```"]
    write_section("engine", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
