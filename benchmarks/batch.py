"""Batch mode through faults and kills: `stillhouse generate` with `generation.mode: batch` on N requests against the
local fake of OpenAI's Files and Batches endpoints (tests/fake_batches.py), beside the same requests online.

    .venv/bin/python benchmarks/batch.py [--n 2000] [--no-write]

The fake: a 2 s `validating` phase, 2% of requests answered with an error line, 1% of lines left out, the second
batch expiring half-done. The batch run is killed with -9 twice, once while it polls and once while it downloads
results, and run again until it finishes; everything a batch did not answer is retried online (the default). Then
the same N requests online, into another run directory, against the same fake's chat endpoint. Reported: what the
fake was sent (uploads, batches created, requests in batches, requests that arrived twice, online calls), the samples
written and distinct, wall time, and the cost of each at gpt-4o-mini's price ($0.15 / $0.60 per M tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _md import write_section  # noqa: E402
from tests.fake_batches import FakeBatches  # noqa: E402

KEY_ENV = "STILLHOUSE_BENCH_BATCH_KEY"
CLI = [sys.executable, "-m", "stillhouse.cli"]


def machine_speed() -> str:
    import re

    out = subprocess.run([str(ROOT.parent / "shared" / "tools" / "machine-speed"), sys.executable], cwd=ROOT,
                         capture_output=True, text=True).stdout
    m = re.search(r"about ([\d.]+)x the reference", out)
    return m.group(1) if m else "?"


def recipe(tmp: Path, url: str, name: str, mode: str, n: int) -> Path:
    prompts = tmp / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"prompt": f"Task {i}: write the number {i} in words, then reverse "
                                                         f"the digits of {i * 7919}."}) + "\n" for i in range(n)))
    batch = ", batch: {poll_seconds: 0.5, max_requests: 500}" if mode == "batch" else ""
    p = tmp / f"{name}.yaml"
    p.write_text(f"name: {name}\nrun_dir: {tmp / name}\nteacher: {{spec: 'openai:gpt-4o-mini', options: {{base_url: "
                 f"'{url}', api_key_env: {KEY_ENV}, concurrency: 16}}}}\nprompts: {{source: '{prompts}', n: null}}\n"
                 f"generation: {{mode: {mode}, max_tokens: 64, temperature: 0.7{batch}}}\n"
                 "student: {base: stillhouse:base}\n")
    return p


def ledger_numbers(run: Path) -> dict:
    import pyarrow.parquet as pq

    from stillhouse.calls import Ledger

    led = Ledger(run / "ledger.db")
    st = led.stats()
    led.close()
    rows = pq.read_table(run / "data" / "generated.parquet").to_pylist()
    return {"samples": len(rows), "distinct": len({r["ledger_key"] for r in rows}),
            "batch_made": sum(r["generation_mode"] == "batch" for r in rows),
            "cost": st["cost_usd"], "batches": st["batches"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    speed = machine_speed()
    key = "sk-bench-" + os.urandom(8).hex()
    env = {**os.environ, KEY_ENV: key}
    tmp = Path(tempfile.mkdtemp(prefix="stillhouse-batch-bench-"))
    with FakeBatches(api_key=key, validating_s=2.0, error_rate=0.02, drop_rate=0.01, expire_batches=(2,)) as srv:
        r = recipe(tmp, srv.base_url, "batch", "batch", args.n)
        t0 = time.time()
        kills = []
        for event, slow in (("poll", {}), ("content", {"content": 60})):
            for e in srv.events.values():
                e.clear()
            srv.slow = slow
            proc = subprocess.Popen([*CLI, "generate", str(r)], env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            srv.events[event].wait(timeout=600)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills.append(event)
        srv.slow = {}
        done = subprocess.run([*CLI, "generate", str(r)], env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        batch_wall = time.time() - t0
        sent = {"uploads": srv.uploads, "creates": srv.creates, "in_batches": sum(srv.in_batches.values()),
                "duplicates": srv.duplicates, "online": sum(srv.online.values())}
        b = ledger_numbers(tmp / "batch")
        o_recipe = recipe(tmp, srv.base_url, "online", "online", args.n)
        before = sum(srv.online.values())
        t0 = time.time()
        done = subprocess.run([*CLI, "generate", str(o_recipe)], env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(done.stderr)
        online_wall = time.time() - t0
        online_calls = sum(srv.online.values()) - before
        o = ledger_numbers(tmp / "online")
    leaked = [str(p) for p in tmp.rglob("*") if p.is_file() and key.encode() in p.read_bytes()]
    statuses = ", ".join(f"{x['remote_status']} {x['requests']}" for x in b["batches"])
    body = f"""## Batch mode: {args.n:,} requests through faults and two kills (benchmarks/batch.py)

`{' '.join(['.venv/bin/python', 'benchmarks/batch.py'] + sys.argv[1:])}` (machine-speed factor from
`../shared/tools/machine-speed`: {speed}x the reference machine). The local fake of OpenAI's Files and Batches
endpoints with a 2 s `validating` phase, 2% error lines, 1% of lines left out and the second of {b['batches'].__len__()}
batches ({statuses}) expiring half-done; `stillhouse generate` killed with -9 while polling and again while
downloading, then run again; unanswered requests retried online (the default). Then the same requests online.

| | batch mode (2 kills, resumed) | online |
| --- | ---: | ---: |
| samples written / distinct | {b['samples']:,} / {b['distinct']:,} | {o['samples']:,} / {o['distinct']:,} |
| files uploaded / batches created | {sent['uploads']} / {sent['creates']} | - |
| requests sent in batches / sent twice | {sent['in_batches']:,} / {sent['duplicates']} | - |
| online calls | {sent['online']:,} (the batches' failures, each once) | {online_calls:,} |
| answered by a batch | {b['batch_made']:,} | - |
| wall time | {batch_wall:.1f} s (3 runs; the fake's 2 s validating, 0.5 s polls) | {online_wall:.1f} s |
| cost at gpt-4o-mini's price | ${b['cost']:.4f} | ${o['cost']:.4f} |
| cost / online | {b['cost'] / o['cost']:.3f} | 1 |
| files under the run directories holding the API key | {len(leaked)} | |

The batch cost is half the online price on the {b['batch_made']:,} answers a batch gave and the full price on the
{sent['online']:,} retried online. The wall time of a real batch is the provider's (up to its 24 h window); here
it is the fake's clock and the resumes, not a speed.
"""
    print(body)
    if not args.no_write:
        write_section("batch", body)


if __name__ == "__main__":
    main()
