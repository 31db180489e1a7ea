"""Issue 25: what makes one client's decode faster on CPU, and what it changes in the answers (SmolLM2-135M-Instruct).

    .venv/bin/python benchmarks/decode_one.py [--model DIR_OR_GGUF] [--tokens 64] [--prompts 20] [--compile]

One request at a time is bound by reading every weight once a token (540 MB in fp32, 270 MB in bf16), so the
candidates are smaller weights and less per-token overhead. Each variant is the same transformers model, decoding
greedily with its own KV cache (`model.generate`, batch 1, no padding), timed per generated token over `--prompts`
of the real job's prompts through the chat template; "answers changed" counts the answers that differ from the fp32
ones anywhere in their first `--tokens` tokens.

- fp32, bf16: the model as loaded;
- torchao int8 (weight-only, per-channel, `Int8WeightOnlyConfig`), fp32 and bf16 activations: torchao's eager path;
- PyTorch's fused `_weight_int8pack_mm` kernel (int8 weights, per-row scales, bf16 activations), on every linear
  layer or on the 49K-row output layer alone (a quarter of the weights): `stillhouse.models.quantize`'s `Int8Linear`,
  what `serve --quantize int8` runs;
- PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`, groups of 32 with a scale and an offset each: llama.cpp's
  Q4_1 precision) on every linear layer: `Int4Linear`, what `serve --quantize int4` runs;
- with `--compile`: bf16 under `torch.compile` (inductor, C++ on CPU); its compile time is reported apart.

Reports the machine-speed factor and the CPU stall (PSI) during the run; writes BENCHMARKS.md's decode_one section.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import command_line, write_section  # noqa: E402
from engine import cpu_stall_us, machine_speed  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def load(src: str, variant: str):
    from transformers import AutoModelForCausalLM

    from stillhouse.models.quantize import Int8Linear, quantize

    dtype = torch.float32 if variant in ("fp32", "torchao-int8-fp32") else torch.bfloat16  # the int kernels: bf16
    m = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
    if variant.startswith("torchao-int8"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(m, Int8WeightOnlyConfig())
    elif variant == "int8pack-all":
        quantize(m, "int8")  # what `serve --quantize int8` runs
    elif variant == "int8pack-head":
        m.lm_head = Int8Linear(m.lm_head, torch.bfloat16)
    elif variant == "int4pack-g32":
        quantize(m, "int4")
    return m


def run(model, prompts: list[list[int]], tokens: int) -> tuple[list[list[int]], float, int]:
    out, n, t = [], 0, 0.0
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0]]), max_new_tokens=4, do_sample=False)  # warm-up
        for p in prompts:
            t0 = time.perf_counter()
            ids = model.generate(torch.tensor([p]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            t += time.perf_counter() - t0
            gen = ids[0, len(p):].tolist()
            out.append(gen)
            n += len(gen)
    return out, t, n


def main() -> None:
    from transformers import AutoTokenizer

    from stillhouse.models import resolve_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="~/.cache/stillhouse/real/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    src = resolve_model(str(Path(args.model).expanduser()))
    tok = AutoTokenizer.from_pretrained(src)
    rows = [json.loads(line)["prompt"] for line in (ROOT / "src/stillhouse/real/prompts.jsonl").read_text().splitlines()]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in rows[:args.prompts]]
    prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
    variants = ["fp32", "bf16", "torchao-int8-fp32", "torchao-int8-bf16", "int8pack-all", "int8pack-head",
                "int4pack-g32"]
    try:
        import torchao  # noqa: F401  (not a dependency of stillhouse: `.venv/bin/pip install --no-deps torchao`)
    except ImportError:
        print("torchao is not installed: its rows are left out", flush=True)
        variants = [v for v in variants if not v.startswith("torchao")]
    if args.compile:
        variants.append("bf16-compiled")
    stall0, t_start = cpu_stall_us(), time.time()
    results, ref = {}, None
    for v in variants:
        m = load(src, "bf16" if v == "bf16-compiled" else v)
        extra = ""
        if v == "bf16-compiled":
            m.forward = torch.compile(m.forward, dynamic=True)
            t0 = time.time()
            run(m, prompts[:1], 8)
            extra = f"compiled in {time.time() - t0:.0f} s"
        answers, secs, n = run(m, prompts, args.tokens)
        ref = ref or answers
        changed = sum(a != b for a, b in zip(answers, ref))
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(answers, ref)]
        results[v] = {"tok_s": n / secs, "ms": 1000 * secs / n, "changed": changed,
                      "first": sorted(f for f in first if f is not None), "note": extra}
        print(v, f"{n / secs:.1f} tok/s, {changed}/{len(prompts)} answers changed {extra}", flush=True)
        del m
    stall = cpu_stall_us()
    wall = time.time() - t_start
    stall_pct = (stall - stall0) / (wall * 1e6) * 100 if stall is not None and stall0 is not None else None
    factor, _ = machine_speed()
    base = results["fp32"]["tok_s"]
    lines = ["## One client's decode on CPU: smaller weights and a compiled step (issue 25)", "",
             f"Command: `{command_line('benchmarks/decode_one.py')}`", "",
             f"SmolLM2-135M-Instruct, `generate` greedy at batch 1, {args.tokens} tokens forced, over {len(prompts)} "
             f"of the real job's prompts; torch {torch.__version__}, {torch.get_num_threads()} threads. Machine "
             f"speed {factor} the reference; CPU stall during the run "
             f"{'n/a' if stall_pct is None else f'{stall_pct:.0f}%'} (PSI, all processes).", "",
             "| variant | tokens/s | vs fp32 | answers changed (of " + str(len(prompts)) + ") | first difference at token |",
             "| --- | --- | --- | --- | --- |"]
    for v, r in results.items():
        lines.append(f"| {v}{' (' + r['note'] + ')' if r['note'] else ''} | {r['tok_s']:.1f} | "
                     f"{r['tok_s'] / base:.2f}x | {r['changed']} | {', '.join(map(str, r['first'])) or '-'} |")
    write_section("decode_one", "\n".join(lines))


if __name__ == "__main__":
    main()
