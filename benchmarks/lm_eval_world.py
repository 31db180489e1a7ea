"""lm-evaluation-harness against `stillhouse serve`: the world's held-out tasks, scored by an outside harness.

    .venv/bin/python benchmarks/lm_eval_world.py [--n-per-family 40] [--student runs/demo/student]

Serves each model with `stillhouse serve` (own process, free local port) and runs lm-eval's
`local-chat-completions` on a generate_until task built from the world's held-out prompts
(the same ones `stillhouse evaluate` uses), with a regex filter taking the final `Answer:`.
Writes lm-eval's exact match per family next to stillhouse's own `evaluate` scores of the same
outputs into BENCHMARKS.md: an external harness, through the OpenAI-compatible API, agreeing
with the in-house evaluation is the check.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-family", type=int, default=40)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--student", default="runs/demo/student", help="also score this model if the directory exists")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from stillhouse.demo.world import FAMILIES, sample_tasks
    from stillhouse.evaluate.lm_eval import write_task
    from stillhouse.serve import subprocess_server
    from stillhouse.verify import exact_match

    tasks = sample_tasks(args.n_per_family * len(FAMILIES), "heldout", seed=0)
    models = [("Atlas (teacher)", "stillhouse:atlas")]
    if Path(args.student).is_dir():
        models.append(("demo student", args.student))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_task(tmp, "world_heldout", ({"prompt": t.prompt, "answer": t.answer, "family": t.family}
                                          for t in tasks), max_tokens=args.max_tokens)
        tm = TaskManager(include_path=tmp, include_defaults=False)
        for label, model in models:
            with subprocess_server(model, "--model-name", "m", "--max-batch", "64") as url:
                t0 = time.time()
                out = simple_evaluate(model="local-chat-completions",
                                      model_args={"model": "m", "base_url": url + "/chat/completions",
                                                  "num_concurrent": 32, "max_retries": 1},
                                      tasks=["world_heldout"], task_manager=tm, apply_chat_template=True,
                                      log_samples=True, bootstrap_iters=0)
                seconds = time.time() - t0
            by_family: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
            for s in out["samples"]["world_heldout"]:
                doc, raw = s["doc"], s["resps"][0][0]
                # lm-eval's verdict (regex filter + exact match) and stillhouse's on the very same output
                by_family[doc["family"]].append((bool(s["exact_match"]), exact_match(raw, doc["answer"])))
            rows.append((label, model, seconds, out["results"]["world_heldout"]["exact_match,final_answer"], by_family))
            print(label, f"{rows[-1][3]:.3f}", f"{seconds:.1f}s", flush=True)

    import lm_eval

    lines = ["## lm-evaluation-harness against `stillhouse serve`", "",
             f"Command: `.venv/bin/python benchmarks/lm_eval_world.py --n-per-family {args.n_per_family}` "
             f"(the student: a `stillhouse demo` run's; here {args.student}) "
             f"(lm-eval {lm_eval.__version__}, `local-chat-completions`, 32 concurrent requests, greedy, "
             f"{len(tasks)} held-out world prompts). Each cell: lm-eval's exact match (regex on the final "
             "`Answer:`) / stillhouse's verifier on the same outputs.", "",
             "| model | all | " + " | ".join(FAMILIES) + " | seconds |",
             "| --- | --- | " + " | ".join("---" for _ in FAMILIES) + " | --- |"]
    for label, model, seconds, em, fam in rows:
        cells = []
        for f in FAMILIES:
            v = fam.get(f, [])
            cells.append(f"{sum(a for a, _ in v) / len(v):.1%} / {sum(b for _, b in v) / len(v):.1%}" if v else "n/a")
        ours = sum(b for v in fam.values() for _, b in v) / sum(len(v) for v in fam.values())
        lines.append(f"| {label} | {em:.1%} / {ours:.1%} | " + " | ".join(cells) + f" | {seconds:.0f} |")
    write_section("lm_eval", "\n".join(lines))


if __name__ == "__main__":
    main()
