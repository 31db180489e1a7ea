"""Atlas as a judge, on held-out judging items of the tiny world: accuracy by the kind of question judged, and where
its wrong verdicts go wrong (solving the question, or comparing a candidate with the answer).

    .venv/bin/python benchmarks/atlas_judging.py [--model stillhouse:atlas] [--n 400] [--dtype float32]

Greedy replies through the `hf` backend (the local engine), up to 192 tokens, checked by the world's verifier (the
verdict A, B or tie); the figures go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402

# the kind of question an item judges, told by the reference trace's wording for it
_KIND = (("reverse", "Backwards:"), ("upper", "In capitals:"), ("count", "Counting "), ("capital", "The capital of "))


def question_kind(trace: str) -> str:
    return next((kind for kind, mark in _KIND if mark in trace), "arith")


def main() -> None:
    from stillhouse.demo import world
    from stillhouse.models import resolve_model
    from stillhouse.teachers import Request, load_backend

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="stillhouse:atlas")
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args()
    tasks = world.sample_tasks(args.n, "heldout", 0, (world.JUDGE,))
    t0 = time.time()
    backend = load_backend(f"hf:{resolve_model(args.model)}", {"batch_size": 256, "dtype": args.dtype})
    try:
        out = dict(backend.generate([Request(messages=({"role": "user", "content": t.prompt},), max_tokens=192)
                                     for t in tasks]))
    finally:
        backend.close()
    seconds = time.time() - t0
    right, total, wrong_at = collections.Counter(), collections.Counter(), collections.Counter()
    for i, t in enumerate(tasks):
        kind = question_kind(t.trace)
        total[kind] += 1
        if world.check(t, out[i].text):
            right[kind] += 1
            continue
        solved = t.trace.split(" So ")[1].split(". A ")[0]
        got = out[i].text.split(" So ")[1].split(". A ")[0] if " So " in out[i].text else None
        wrong_at[(kind, "solving" if got != solved else "comparing")] += 1
    kinds = sorted(total, key=lambda k: -total[k])
    rows = [f"| {k} | {total[k]} | {right[k] / total[k]:.1%} | {wrong_at[(k, 'solving')]} | {wrong_at[(k, 'comparing')]} |"
            for k in kinds]
    acc = sum(right.values()) / len(tasks)
    body = "\n".join([
        "## Atlas as a judge: held-out judging items (issue 11)",
        "",
        f"Command: `.venv/bin/python benchmarks/atlas_judging.py --model {args.model} --n {args.n} --dtype {args.dtype}` "
        f"({len(tasks)} held-out judging items, greedy, {seconds:.0f} s). Wrong verdicts are put down to solving when "
        "the answer Atlas restates (`So ...`) is not the question's, else to comparing a candidate with it.",
        "",
        "| question judged | items | verdict right | wrong: solving | wrong: comparing |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        f"| **all** | {len(tasks)} | **{acc:.1%}** | {sum(v for (k, w), v in wrong_at.items() if w == 'solving')} | "
        f"{sum(v for (k, w), v in wrong_at.items() if w == 'comparing')} |",
    ])
    print(body)
    write_section("atlas_judging", body)


if __name__ == "__main__":
    main()
