"""One engine change measured in-process on SmolLM2-135M-Instruct: this tree against commit `--before`, side by side.

    .venv/bin/python benchmarks/engine_ab.py --before COMMIT [--n 48] [--max-tokens 48] [--max-batch 64]
        [--dtype float32] [--rounds 2]

Each round runs the before engine and this tree's (order alternating) in fresh processes on the same prompts (the real
job's, through the chat template, greedy); prints tokens/s for each, the ratio, and how many answers differ. For the
per-optimisation numbers in BENCHMARKS.md's engine_real section; it writes nothing itself.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import before_tree, cpu_stall_us, machine_speed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUN = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
from stillhouse.serve.engine import Engine, GenRequest
e = Engine(cfg["model"], max_batch=cfg["max_batch"], window_ms=5, dtype=cfg["dtype"])
tok = e.tokenizer
ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
           add_special_tokens=False)["input_ids"] for p in cfg["prompts"]]
e.submit(GenRequest(ids[0], 4, temperature=0.0)).result()
t = time.perf_counter()
res = [f.result() for f in [e.submit(GenRequest(i, cfg["max_tokens"], temperature=0.0)) for i in ids]]
wall = time.perf_counter() - t
e.close()
print(json.dumps({"wall": wall, "tokens": [r.token_ids for r in res]}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", required=True)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--model", default="~/.cache/stillhouse/real/SmolLM2-135M-Instruct.Q4_1.gguf")
    a = ap.parse_args()
    prompts = [json.loads(x)["prompt"] for x in (ROOT / "src/stillhouse/real/prompts.jsonl").read_text().splitlines()]
    cfg = {"model": os.path.expanduser(a.model), "max_batch": a.max_batch, "dtype": a.dtype,
           "prompts": prompts[:a.n], "max_tokens": a.max_tokens}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    trees = {"before": before_tree(a.before), "after": ROOT / "src"}
    walls = {k: 0.0 for k in trees}
    toks: dict = {}
    stall0, t0 = cpu_stall_us(), time.time()
    for r in range(a.rounds):
        for label in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            out = subprocess.run([sys.executable, "-c", RUN, json.dumps(cfg)], env={**env, "PYTHONPATH": str(trees[label])},
                                 capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            res = json.loads(out.stdout.strip().splitlines()[-1])
            walls[label] += res["wall"]
            toks[label] = res["tokens"]
            print(f"round {r + 1} {label}: {res['wall']:.1f} s", flush=True)
    stall1 = cpu_stall_us()
    n_tok = sum(map(len, toks["after"]))
    same = sum(x == y for x, y in zip(toks["before"], toks["after"]))
    tps = {k: a.rounds * sum(map(len, toks[k])) / w for k, w in walls.items()}
    print(f"before ({a.before}): {tps['before']:.1f} tok/s; after: {tps['after']:.1f} tok/s; "
          f"after/before {tps['after'] / tps['before']:.2f}x; answers equal {same}/{len(toks['after'])}; "
          f"{n_tok} tokens a run")
    # the load it ran under (PSI: microseconds some task waited for a CPU, all processes) and the machine's speed
    stall = "?" if stall0 is None or stall1 is None else f"{(stall1 - stall0) / 1e4 / (time.time() - t0):.0f}%"
    print(f"CPU stall during the run {stall} (PSI); machine speed {machine_speed()[0]} the reference machine")


if __name__ == "__main__":
    main()
