"""Peak memory of distilling a full next-token distribution over a 150K vocabulary: the logits built in full against
`kd.source: teacher`'s chunked loss (TRL's chunked kernels), forward and backward, on the CPU.

    .venv/bin/python benchmarks/kd_memory.py [--tokens 1024] [--vocab 151936] [--hidden 576] [--chunks 1024x16384,256x8192]

Each measurement runs in its own process: the two models' last hidden states [tokens, hidden] and output layers
[vocab, hidden] (Qwen2.5's vocabulary, SmolLM2-135M's width) are built first, then the loss (forward KL, alpha 0.5:
cross-entropy plus divergence) and its gradient; the peak resident memory the loss added is the process's peak
(`ru_maxrss`) less the peak before it. The logits' full size is tokens x vocab x 4 bytes, per model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402
from training import machine_speed  # noqa: E402


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(mode: str, tokens: int, vocab: int, hidden: int) -> dict:
    import torch

    from stillhouse.train.kd import full_kd_loss_sum, set_chunks

    torch.manual_seed(0)
    head_s = torch.nn.Linear(hidden, vocab, bias=False)
    head_t = torch.nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
    h_s = torch.randn(tokens, hidden, requires_grad=True)
    h_t = torch.randn(tokens, hidden)
    y = torch.randint(0, vocab, (tokens,))
    before = _peak_mib()
    t0 = time.time()
    if mode == "full":  # as TRL's GKDTrainer computes it: both log-softmaxes in full, then the KL and the CE
        with torch.no_grad():
            lt = head_t(h_t).log_softmax(-1)
        ls = head_s(h_s).log_softmax(-1)
        kl = torch.nn.functional.kl_div(ls, lt, reduction="sum", log_target=True)
        loss = 0.5 * torch.nn.functional.nll_loss(ls, y, reduction="sum") + 0.5 * kl
    else:
        t, v = map(int, mode.split("x"))
        set_chunks(t, v)
        loss = full_kd_loss_sum(h_s, head_s, h_t, head_t, y, loss="forward_kl", alpha=0.5, chunk_vocab=v)
    loss.backward()
    return {"mode": mode, "added_mib": round(_peak_mib() - before, 1), "seconds": round(time.time() - t0, 2),
            "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--chunks", default="1024x16384,256x8192")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # (a child process's own measurement)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.tokens, args.vocab, args.hidden)))
        return
    speed = machine_speed()
    rows = []
    for mode in ["full", *args.chunks.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--one", mode, "--tokens", str(args.tokens), "--vocab",
                              str(args.vocab), "--hidden", str(args.hidden)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    full_mib = args.tokens * args.vocab * 4 / 2**20
    lines = ["## Training: memory of full-distribution KD over a 150K vocabulary (kd.source: teacher)", "",
             f"Command: `.venv/bin/python benchmarks/kd_memory.py --tokens {args.tokens} --vocab {args.vocab} --hidden "
             f"{args.hidden} --chunks {args.chunks}` ({platform.machine()}, {os.cpu_count()} CPU cores; "
             f"`../shared/tools/machine-speed`: {speed}x the reference machine). One model's logits in full: "
             f"{args.tokens} tokens x {args.vocab:,} x 4 bytes = {full_mib:,.0f} MiB. Peak resident memory the loss "
             "(forward KL, alpha 0.5, forward and backward) added to the process, each way in its own process; the "
             "loss values agree.", "",
             "| loss | tile (tokens x vocabulary) | peak memory added (MiB) | of one model's full logits | seconds | loss |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tile = "none: both models' logits built in full" if r["mode"] == "full" else r["mode"].replace("x", " x ")
        lines.append(f"| {'full logits' if r['mode'] == 'full' else 'chunked (TRL kernels)'} | {tile} | "
                     f"{r['added_mib']:,.0f} | {r['added_mib'] / full_mib:.2f}x | {r['seconds']} | {r['loss']:.2f} |")
    write_section("kd_memory", "\n".join(lines))


if __name__ == "__main__":
    main()
