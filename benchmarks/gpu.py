"""GPU checks on a CUDA machine: the continuous-batching engine's CUDA path and bf16 SFT throughput.

    PYTHONPATH=src python benchmarks/gpu.py [--prompts 3000] [--out gpu.json]

1. Correctness: the engine's greedy answers on CUDA equal `model.generate`'s, one prompt at a
   time, in fp32 (the first 200 world prompts).
2. Engine throughput: the demo's prompts (greedy, 96 tokens) through `Engine` on CUDA, fp32 and
   bf16 (the dtype `auto` picks on a GPU with native bf16), completion tokens/s.
3. SFT throughput: the demo student (1.0M parameters) trained one epoch on the world's
   reference answers to the demo prompts in bf16; tokens/s and model FLOP utilisation
   (6 x parameters x tokens/s against the GPU's dense bf16 peak).
Runs without the package installed (no entry points): models are addressed by directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
ATLAS = ROOT / "src/stillhouse/demo/assets/atlas"
BASE = ROOT / "src/stillhouse/demo/assets/base"
PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak, SXM


def engine_outputs(prompts: list[str], dtype: str, max_batch: int = 256) -> tuple[list[str], float, int]:
    from stillhouse.serve.engine import Engine, GenRequest

    eng = Engine(str(ATLAS), device="cuda", max_batch=max_batch, window_ms=2, dtype=dtype)
    tok = eng.tokenizer
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    t0 = time.perf_counter()
    futs = {i: eng.submit(GenRequest(ids[i], 96, 0.0)) for i in order}
    res = {i: f.result() for i, f in futs.items()}
    secs = time.perf_counter() - t0
    eng.close()
    return [res[i].text for i in range(len(prompts))], secs, sum(len(r.token_ids) for r in res.values())


def generate_alone(prompts: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ATLAS)
    m = AutoModelForCausalLM.from_pretrained(ATLAS, dtype=torch.float32).cuda().eval()
    out = []
    for p in prompts:
        enc = tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False, return_tensors="pt").to("cuda")
        g = m.generate(**enc, max_new_tokens=96, do_sample=False, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
        out.append(tok.decode(g[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=3000)
    ap.add_argument("--out", default="gpu.json")
    args = ap.parse_args()
    from stillhouse.demo import world

    tasks = world.sample_tasks(args.prompts, "train", 0)
    prompts = [t.prompt for t in tasks]
    name = torch.cuda.get_device_name()
    report: dict = {"device": name, "torch": torch.__version__}
    ref = generate_alone(prompts[:200])
    got, _, _ = engine_outputs(prompts[:200], "float32")
    report["engine_matches_generate_fp32"] = sum(a == b for a, b in zip(ref, got))
    report["engine_checked"] = 200
    for dtype in ("float32", "bfloat16"):
        engine_outputs(prompts[:256], dtype)  # warm-up
        outs, secs, toks = engine_outputs(prompts, dtype)
        report[f"engine_{dtype}"] = {"seconds": round(secs, 2), "completion_tokens": toks,
                                     "tokens_per_s": round(toks / secs), "correct": sum(
                                         o.strip().endswith(f"Answer: {t.answer}") for o, t in zip(outs, tasks))}
    from stillhouse.train.sft import sft

    rows = [{"messages": [{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.response}]}
            for t in tasks]
    res = sft(rows, str(BASE), "/tmp/gpu-student", epochs=1, learning_rate=1.5e-3, batch_size=64, max_length=256,
              seed=0, device="cuda")
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    flops = 6 * res.parameters * res.tokens_per_second
    report["sft_bf16"] = {"steps": res.steps, "seconds": res.seconds, "tokens_per_s": res.tokens_per_second,
                          "parameters": res.parameters, "final_loss": res.final_loss,
                          "mfu": round(flops / peak, 6) if peak else None}
    print(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
