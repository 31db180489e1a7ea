"""`stillhouse serve` under load: 200 concurrent clients, malformed requests mixed in.

    .venv/bin/python benchmarks/serve.py [--clients 200] [--requests 400] [--bad-every 5]

Serves Atlas twice, side by side in one run: with continuous batching (requests join and
leave the running batch between decoding steps) and with `--max-batch 1` (one request at a
time). Each time, `clients` concurrent clients send
`requests` chat completions, every `bad-every`-th one malformed (bad JSON, unknown model,
missing messages, max_tokens past the context, wrong types). Checks that every valid request
is answered 200, every malformed one gets a 4xx, and the server is still up; records
throughput and p50 / p99 latency in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402

from stillhouse.demo import world  # noqa: E402
from stillhouse.serve import subprocess_server  # noqa: E402

BAD = [b"{not json", json.dumps({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}).encode(),
       json.dumps({"model": "atlas"}).encode(),
       json.dumps({"model": "atlas", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}).encode(),
       json.dumps({"model": "atlas", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode()]


async def load(url: str, clients: int, n: int, bad_every: int) -> dict:
    prompts = [t.prompt for t in world.sample_tasks(n, "heldout", 1)] if n <= 240 else \
        [t.prompt for t in world.sample_tasks(n, "train", 1)]
    jobs = asyncio.Queue()
    for i in range(n):
        jobs.put_nowait(i)
    lat, codes_ok, codes_bad = [], [], []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        async def worker():
            while True:
                try:
                    i = jobs.get_nowait()
                except asyncio.QueueEmpty:
                    return
                bad = bad_every and i % bad_every == 0
                body = BAD[i // bad_every % len(BAD)] if bad else json.dumps(
                    {"model": "atlas", "temperature": 0, "max_tokens": 96,
                     "messages": [{"role": "user", "content": prompts[i]}]}).encode()
                t = time.perf_counter()
                r = await client.post(url + "/chat/completions", content=body, headers={"content-type": "application/json"})
                (codes_bad if bad else codes_ok).append(r.status_code)
                if not bad:
                    lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        up = (await client.get(url.removesuffix("/v1") + "/health")).status_code == 200
    lat.sort()
    return {"valid": len(codes_ok), "valid_200": sum(c == 200 for c in codes_ok), "bad": len(codes_bad),
            "bad_4xx": sum(400 <= c < 500 for c in codes_bad), "up": up, "wall": wall, "rps": len(codes_ok) / wall,
            "p50": statistics.median(lat), "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--bad-every", type=int, default=5)
    args = ap.parse_args()
    res = {}
    for label, extra in (("continuous batching (--max-batch 256)", ["--max-batch", "256"]),
                         ("one request at a time (--max-batch 1)", ["--max-batch", "1"])):
        with subprocess_server("stillhouse:atlas", "--model-name", "atlas", *extra) as url:
            res[label] = asyncio.run(load(url, args.clients, args.requests, args.bad_every))
        print(label, json.dumps(res[label]), flush=True)
    (b_label, b), (s_label, s) = res.items()
    lines = ["## Serve: load and batching", "",
             f"Command: `.venv/bin/python benchmarks/serve.py --clients {args.clients} --requests {args.requests} "
             f"--bad-every {args.bad_every}`: Atlas served by `stillhouse serve` in its own process, {args.clients} "
             f"concurrent clients, every {args.bad_every}th request malformed (bad JSON, unknown model, no messages, "
             "max_tokens past the context, wrong types); greedy answers of up to 96 tokens.", "",
             "| server | valid answered 200 | malformed answered 4xx | up after | requests/s | p50 s | p99 s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for label, r in res.items():
        lines.append(f"| {label} | {r['valid_200']}/{r['valid']} | {r['bad_4xx']}/{r['bad']} | {'yes' if r['up'] else 'NO'} | "
                     f"{r['rps']:.1f} | {r['p50']:.2f} | {r['p99']:.2f} |")
    lines += ["", f"Continuous batching / one at a time: **{b['rps'] / s['rps']:.1f}x** the throughput."]
    write_section("serve", "\n".join(lines))


if __name__ == "__main__":
    main()
