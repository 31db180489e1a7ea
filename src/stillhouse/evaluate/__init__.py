"""Evaluate: verifiable held-out accuracy of teacher, base and student, per task family.

Writes `eval/results.json` (aggregates) and `eval/samples.jsonl` (one row per item and
model, with hashes of prompt and target) so a report or a later diff needs only files.
"""

from __future__ import annotations

import hashlib
import json
import time

from stillhouse.errors import StillhouseError
from stillhouse.recipe import EvaluateSpec, Recipe
from stillhouse.rundir import RunDir, atomic_write_text
from stillhouse.teachers import Request, load_backend
from stillhouse.ui import console, progress_bar
from stillhouse.verify import exact_match


def load_benchmark(spec: EvaluateSpec) -> list[dict]:
    """Items `{id, family, prompt, answer}`: the world's held-out split, or a JSONL file with those keys."""
    if spec.benchmark == "world":
        from stillhouse.demo import world

        tasks = world.sample_tasks(spec.n_per_family * len(world.FAMILIES), "heldout", spec.seed)
        return [{"id": i, "family": t.family, "prompt": t.prompt, "answer": t.answer} for i, t in enumerate(tasks)]
    items: list[dict] = []
    per: dict[str, int] = {}
    with open(spec.benchmark) as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise StillhouseError(f"{spec.benchmark}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row.get("prompt"), str) or "answer" not in row:
                raise StillhouseError(f"{spec.benchmark}:{n}: each item needs a 'prompt' string and an 'answer'")
            fam = str(row.get("family", "all"))
            if per.get(fam, 0) < spec.n_per_family:
                per[fam] = per.get(fam, 0) + 1
                items.append({"id": len(items), "family": fam, "prompt": row["prompt"], "answer": str(row["answer"])})
    return items


def _sha(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()[:16]


def score(spec: str, options: dict, items: list[dict], max_tokens: int, label: str) -> tuple[list[dict], float]:
    """Greedy answers of one local model to every item, each checked by exact match; returns (rows, seconds)."""
    backend = load_backend(spec, options)
    reqs = [Request(messages=({"role": "user", "content": it["prompt"]},), max_tokens=max_tokens) for it in items]
    out: list[dict | None] = [None] * len(items)
    t0 = time.time()
    with progress_bar(f"evaluate {label}", len(reqs)) as advance:
        for i, c in backend.generate(reqs, progress=advance):
            out[i] = {"output": c.text, "correct": exact_match(c.text, items[i]["answer"])}
    backend.close()
    return out, time.time() - t0


def score_teacher(recipe: Recipe, run: RunDir, items: list[dict], max_tokens: int) -> tuple[list[dict], float]:
    """The teacher's answers, through the ledger like every teacher call: cached, costed, budgeted."""
    from stillhouse.costs import Budget, price_for
    from stillhouse.generate import call_through_ledger
    from stillhouse.ledger import Ledger

    t = recipe.teacher
    price = price_for(t.spec.split(":", 1)[1], t.price.model_dump() if t.price else None)
    reqs = [Request(messages=({"role": "user", "content": it["prompt"]},), max_tokens=max_tokens) for it in items]
    ledger = Ledger(run.ledger)
    t0 = time.time()
    try:
        budget = Budget(t.max_cost_usd, spent_usd=ledger.spent())
        keys, calls, _, failures = call_through_ledger(t.spec, t.options, reqs, ledger, "evaluate", price, budget,
                                                       "evaluate teacher")
    finally:
        ledger.close()
    if failures or budget.refused:
        why = f"{len(failures)} teacher calls failed (first: {failures[0]})" if failures else \
            f"teacher.max_cost_usd=${t.max_cost_usd} would be exceeded"
        raise StillhouseError(f"evaluate: {why}; answers so far are saved in {run.ledger}; re-run to continue")
    out = [{"output": calls[k].completion.text, "correct": exact_match(calls[k].completion.text, it["answer"])}
           for k, it in zip(keys, items)]
    return out, time.time() - t0


def accuracy_by_family(items: list[dict], rows: list[dict]) -> dict[str, float]:
    fams: dict[str, list[bool]] = {}
    for it, r in zip(items, rows):
        fams.setdefault(it["family"], []).append(r["correct"])
    return {f: sum(v) / len(v) for f, v in fams.items()}


def evaluate(recipe: Recipe, run: RunDir, force: bool = False) -> dict:
    """Run the evaluate stage over teacher, the student's base, and the student."""
    from stillhouse.models import count_parameters, resolve_model

    trained = run.require("train", "evaluate")
    config = {"evaluate": recipe.evaluate.model_dump(), "teacher": recipe.teacher.identity(), "base": recipe.student.base}
    inputs = {"student": trained["outputs"]["student"]}
    if not force and run.is_done("evaluate", inputs, config):
        console.print("evaluate: already finished, skipping (use --force to redo)")
        return run.manifest("evaluate")
    started = run.begin("evaluate")
    items = load_benchmark(recipe.evaluate)
    if not items:
        raise StillhouseError(f"evaluate.benchmark {recipe.evaluate.benchmark!r} has no items")
    mt = recipe.evaluate.max_tokens
    models = {"teacher": (recipe.teacher.spec, recipe.teacher.options),
              "base": (f"hf:{recipe.student.base}", {}), "student": (f"hf:{run.student}", {})}
    scored, seconds = {}, {}
    scored["teacher"], seconds["teacher"] = score_teacher(recipe, run, items, mt)
    for name, (spec, opts) in models.items():
        if name != "teacher":
            scored[name], seconds[name] = score(spec, opts, items, mt, name)
    per_family = {name: accuracy_by_family(items, rows) for name, rows in scored.items()}
    overall = {name: sum(acc.values()) / len(acc) for name, acc in per_family.items()}  # macro mean over families
    teacher_params = recipe.teacher.parameters
    if recipe.teacher.spec.startswith("hf:"):
        teacher_params = count_parameters(resolve_model(recipe.teacher.spec.split(":", 1)[1]))
    results = {
        "benchmark": recipe.evaluate.benchmark, "items": len(items), "families": sorted(per_family["teacher"]),
        "accuracy": overall, "accuracy_by_family": per_family,
        "share_kept": overall["student"] / overall["teacher"] if overall["teacher"] else None,
        "parameters": {"teacher": teacher_params, "student": count_parameters(str(run.student)),
                       "base": count_parameters(resolve_model(recipe.student.base))},
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    lines = []
    for i, it in enumerate(items):
        row = {"id": it["id"], "family": it["family"], "prompt": it["prompt"], "answer": it["answer"],
               "prompt_hash": _sha(it["prompt"]), "answer_hash": _sha(it["answer"])}
        for name in models:
            row[f"{name}_output"] = scored[name][i]["output"]
            row[f"{name}_correct"] = scored[name][i]["correct"]
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(run.samples, "\n".join(lines) + "\n")
    atomic_write_text(run.results, json.dumps(results, indent=2) + "\n")
    return run.finish("evaluate", started, inputs, config, {"results": run.results, "samples": run.samples},
                      {"items": len(items)}, {"summary": {"accuracy": overall, "share_kept": results["share_kept"]}})
