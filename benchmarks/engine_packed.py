"""Linear layers packed for oneDNN (`stillhouse.models.packed`) against `F.linear`, in one process, alternating.

    .venv/bin/python benchmarks/engine_packed.py [--rows 1,8,48,64] [--no-write]

- Layers: for each weight shape of SmolLM2-135M (and of the demo world's Atlas, which is left unpacked), 30 distinct
  weights of that shape (so that, as in a served model, each call finds its weight out of cache) multiplied by
  `rows` rows, best of three passes: microseconds a call with `F.linear` and with the packed weight.
- Steps: SmolLM2-135M-Instruct (the real job's GGUF) loaded twice, once as the engine had it before (float32: the
  chunked output layer, `stillhouse.models.output`) and once packed; one running batch of `rows` requests in each
  (the real job's prompts through the chat template, greedy); decoding steps in turns of five, one model then the
  other, order alternating, six turns (the first not counted); the step's milliseconds and whether the two chose the
  same tokens at every step. float32, and bfloat16 where this CPU's oneDNN has it.
- Memory: in a fresh process each, SmolLM2 loaded and (or not) packed, the process's resident memory after; packed
  also with the freed dense weights' memory kept by the allocator (not given back), to show what that step saves.

Writes BENCHMARKS.md's engine_packed section.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import command_line, write_section  # noqa: E402
from engine import cpu_stall_us, machine_speed  # noqa: E402
from engine_parts import GGUF, ROOT, chat_ids  # noqa: E402

SHAPES = [("SmolLM2 q / o", 576, 576), ("SmolLM2 k / v", 192, 576), ("SmolLM2 gate / up", 1536, 576),
          ("SmolLM2 down", 576, 1536), ("SmolLM2 output", 49152, 576), ("Atlas gate / up", 688, 256),
          ("Atlas q / k / v / o", 256, 256)]


@torch.inference_mode()
def layers(rows: list[int]) -> list[tuple]:
    from stillhouse.models.packed import PackedLinear

    g = torch.Generator().manual_seed(0)
    out = []
    for name, n, k in SHAPES:
        count = 2 if n > 10_000 else 30
        lins = []
        for _ in range(count):
            lin = torch.nn.Linear(k, n, bias=False)
            lin.weight.data = torch.randn(n, k, generator=g)
            lins.append(lin)
        packed = [PackedLinear(lin) for lin in lins]
        for m in rows:
            x = torch.randn(m, k, generator=g)
            best = {}
            for label, fs in (("F.linear", [lambda x, w=lin.weight: F.linear(x, w) for lin in lins]),
                              ("packed", packed)):
                for f in fs:
                    f(x)
                t_best = float("inf")
                for _ in range(3):
                    t = time.perf_counter()
                    for f in fs:
                        f(x)
                    t_best = min(t_best, time.perf_counter() - t)
                best[label] = t_best / count * 1e6
            out.append((name, n, k, m, best["F.linear"], best["packed"]))
            print(out[-1], flush=True)
    return out


@torch.inference_mode()
def steps(prompts: list[str], rows: list[int], dtype: str) -> list[tuple]:
    from stillhouse.models import load_local_lm
    from stillhouse.models.output import speed_up_output
    from stillhouse.models.packed import pack_linears
    from stillhouse.serve.batches import _SlotBatch
    from stillhouse.serve.engine import GenRequest, _Seq

    tok, before, _ = load_local_lm(GGUF, "cpu", dtype, log=lambda m: None)
    speed_up_output(before)  # what the engine did before packing (float32; a no-op in bfloat16)
    packed = load_local_lm(GGUF, "cpu", dtype, log=lambda m: None)[1]
    n_packed = pack_linears(packed)
    assert n_packed, "nothing was packed"
    models = {"before": before, "packed": packed}
    out = []
    for r in rows:
        batches, chosen, spent = {}, {}, dict.fromkeys(models, 0.0)
        for name, model in models.items():
            b = batches[name] = _SlotBatch(model, max(64, r), tok.pad_token_id)
            seqs = [_Seq(GenRequest(i, 256, temperature=0.0), "cpu") for i in chat_ids(tok, prompts[:r])]
            b.last = b.prefill(seqs).argmax(-1)
            chosen[name] = [b.last]
        for turn in range(6):
            for name in (list(models) if turn % 2 else list(models)[::-1]):
                b = batches[name]
                t = time.perf_counter()
                for _ in range(5):
                    b.last = b.step(2048).argmax(-1)
                    chosen[name].append(b.last)
                if turn:
                    spent[name] += time.perf_counter() - t
        same = torch.equal(torch.stack(chosen["before"]), torch.stack(chosen["packed"]))
        out.append((dtype, r, spent["before"] / 25 * 1e3, spent["packed"] / 25 * 1e3, same))
        print(out[-1], flush=True)
    return out


MEMORY = """
import os, sys
from stillhouse.models import load_local_lm, packed
mode, dtype = sys.argv[1], sys.argv[2]
if mode == "kept":
    packed._give_back_freed_memory = lambda: None
model = load_local_lm(os.path.expanduser(sys.argv[3]), "cpu", dtype, log=lambda m: None)[1]
n = packed.pack_linears(model) if mode != "as loaded" else 0
print(n, int(next(x for x in open("/proc/self/status") if x.startswith("VmRSS")).split()[1]) // 1024)
"""


def memory(dtypes: list[str]) -> list[tuple]:
    import subprocess

    out = []
    for dtype in dtypes:
        for mode in ("as loaded", "packed", "kept"):
            res = subprocess.run([sys.executable, "-c", MEMORY, mode, dtype, GGUF], capture_output=True, text=True,
                                 check=True)
            n, mb = map(int, res.stdout.split()[-2:])
            out.append((dtype, mode, n, mb))
            print(out[-1], flush=True)
    return out


def main() -> None:
    from stillhouse.models.packed import MIN_PARAMS, _ops_available

    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,48,64")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if not _ops_available(torch.float32):
        sys.exit("this PyTorch build has no oneDNN linear operators: nothing to measure")
    rows = [int(x) for x in a.rows.split(",")]
    prompts = [json.loads(x)["prompt"] for x in (ROOT / "src/stillhouse/real/prompts.jsonl").read_text().splitlines()]
    s0, t0 = cpu_stall_us(), time.monotonic()
    lay = layers(rows)
    dtypes = ["float32"] + (["bfloat16"] if _ops_available(torch.bfloat16) else [])
    st = [x for d in dtypes for x in steps(prompts, rows, d)]
    mem = memory(dtypes) if sys.platform.startswith("linux") else []
    stall = None if s0 is None else (cpu_stall_us() - s0) / 1e6 / (time.monotonic() - t0)
    factor, speed_out = machine_speed()
    lines = ["## Engine: linear layers packed for oneDNN against `F.linear`", "",
             f"Command: `{command_line('benchmarks/engine_packed.py')}`", "",
             f"torch {torch.__version__}, {torch.get_num_threads()} threads. Machine: {os.cpu_count()} CPU cores, "
             f"**{factor}** the reference machine; CPU stall during the run (PSI): "
             f"{'?' if stall is None else format(stall, '.0%')}. The engine packs a model whose linear weights hold "
             f"at least {MIN_PARAMS:,} parameters (SmolLM2-135M: 134M; Atlas: 4.8M, not packed).", "",
             "Layers, float32, each call's weight out of cache (30 distinct weights of the shape; the output layer 2):",
             "", "| layer | weight | rows | `F.linear` us | packed us | speed-up |", "| --- | --- | --- | --- | --- | --- |"]
    for name, n, k, m, f, p in lay:
        lines.append(f"| {name} | {n} x {k} | {m} | {f:.0f} | {p:.0f} | {f / p:.2f}x |")
    lines += ["", "Decoding steps of SmolLM2-135M-Instruct, one running batch, alternating (before: float32 with the "
              "chunked output layer, bfloat16 with `F.linear`):", "",
              "| dtype | rows decoding | step before ms | step packed ms | speed-up | same tokens every step |",
              "| --- | --- | --- | --- | --- | --- |"]
    for d, r, b, p, same in st:
        lines.append(f"| {d} | {r} | {b:.1f} | {p:.1f} | {b / p:.2f}x | {'yes' if same else 'no'} |")
    if mem:
        lines += ["", "Resident memory of a process that loaded SmolLM2 (and packed it), MB:", "",
                  "| dtype | as loaded | packed | packed, freed memory not given back |", "| --- | --- | --- | --- |"]
        for d in dtypes:
            by = {mode: mb for dt, mode, _, mb in mem if dt == d}
            lines.append(f"| {d} | {by['as loaded']:,} | {by['packed']:,} | {by['kept']:,} |")
    lines += ["", "```", speed_out, "```"]
    print("\n".join(lines))
    if not a.no_write:
        write_section("engine_packed", "\n".join(lines))


if __name__ == "__main__":
    main()
