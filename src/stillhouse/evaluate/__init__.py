"""Evaluate: verifiable held-out accuracy of every model in the run, per task family.

The models are the teacher, each student's base, each student and each control, every one
with its role; all answer through the ledger (`stillhouse.calls`), so answers are cached,
costed and budgeted like every model call. Writes `eval/results.json` (a list of named
models with roles and per-family scores) and `eval/samples.jsonl` (one row per item, each
model's output and verdict, hashes of prompt and target), so a report or a later diff needs
only files.
"""

from __future__ import annotations

import hashlib
import json

from stillhouse.calls import Ledger, ModelRef, call_models
from stillhouse.rundir import RunDir, atomic_write_text
from stillhouse.stages import Stage, StageResult
from stillhouse.teachers import Request, parse_spec
from stillhouse.verify import exact_match


def _sha(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()[:16]


def run_models(recipe, run: RunDir) -> list[dict]:
    """Every model the run evaluates: name, role, how to call it, and where its weights are (when local)."""
    from stillhouse.generate import teacher_ref

    def ident(spec):
        return spec.to_identity() if spec is not None else None

    t = recipe.teacher
    models = [{"name": "teacher", "role": "teacher", "ref": teacher_ref(recipe), "spec": t.spec,
               "identity": ident(t.identity)}]
    bases = list(dict.fromkeys(s.base for s in recipe.students))
    for b in bases:
        name = "base" if len(bases) == 1 else f"base:{b}"
        models.append({"name": name, "role": "base", "ref": ModelRef(f"hf:{b}"), "spec": f"hf:{b}", "identity": None})
    for s in recipe.students:
        d = run.student_dir(s.name)
        models.append({"name": s.name, "role": "student", "ref": ModelRef(f"hf:{d}"), "spec": f"hf:{d}",
                       "identity": ident(s.identity)})
    for c in recipe.controls:
        models.append({"name": c.name, "role": "control", "ref": ModelRef(c.spec(), c.options), "spec": c.spec(),
                       "identity": ident(c.identity)})
    return models


def expected_answer(item: dict, own, teacher) -> str:
    """The answer `item` expects from a model: for an identity item, the reference answer restated with the model's
    own declared identity (a student with its own name should say it, not the teacher's)."""
    from stillhouse.identity import restate

    return restate(item["answer"], own, teacher) if item.get("identity") else item["answer"]


def identity_claims(outputs: list[str], own, teacher) -> dict:
    """The share of answers that claim the teacher's identity, the model's own, another vendor's, or none."""
    from stillhouse.identity import classify_all

    counts = {"reference": 0, "own": 0, "other": 0, "none": 0}
    for c in classify_all(outputs, own, teacher):
        counts[c] += 1
    n = len(outputs)
    rates = {k: v / n for k, v in counts.items()} if n else {k: None for k in counts}
    if own is None:  # no identity of its own declared: claiming the teacher's is all there is to measure
        rates["own"] = None
    return {"items": n, **rates}


def accuracy_by_family(items: list[dict], correct: list[bool]) -> dict[str, float]:
    fams: dict[str, list[bool]] = {}
    for it, ok in zip(items, correct):
        fams.setdefault(it["family"], []).append(ok)
    return {f: sum(v) / len(v) for f, v in fams.items()}


def _parameters(recipe, spec: str) -> int | None:
    from pathlib import Path

    from stillhouse.errors import StillhouseError
    from stillhouse.models import count_parameters, resolve_model

    backend, model = parse_spec(spec)
    if backend != "hf":
        return recipe.teacher.parameters if spec == recipe.teacher.spec else None
    try:
        src = resolve_model(model)
    except StillhouseError:
        return None
    return count_parameters(src) if Path(src).exists() else None


class EvaluateStage(Stage):
    name = "evaluate"
    summary = "Score every model in the run (teacher, bases, students, controls) on the held-out benchmark → eval/."
    reads = ("students",)
    writes = ("results",)
    section = "evaluate"
    always = True

    def config(self, recipe) -> dict:
        return {"evaluate": recipe.evaluate.model_dump(), "teacher": recipe.teacher.cache_identity(),
                "bases": [s.base for s in recipe.students], "controls": [c.model_dump() for c in recipe.controls],
                "identities": {"teacher": recipe.teacher.identity and recipe.teacher.identity.model_dump(),
                               **{s.name: s.identity and s.identity.model_dump() for s in recipe.students}}}

    def execute(self, recipe, run: RunDir) -> StageResult:
        from stillhouse.sources import load_benchmark

        e = recipe.evaluate
        items = load_benchmark(e.benchmark, e.n_per_family, e.seed)
        probes = load_benchmark(e.identity_probes, 10**9, e.seed) if e.identity_probes else []
        reqs = [Request(messages=({"role": "user", "content": it["prompt"]},), max_tokens=e.max_tokens)
                for it in items + probes]
        models = run_models(recipe, run)
        teacher_id = models[0]["identity"]
        outputs: dict[str, list[str]] = {}
        ledger = Ledger(run.ledger)
        try:
            for m in models:
                batch = call_models(m["ref"], reqs, ledger, stage="evaluate", label=f"evaluate {m['name']}")
                batch.raise_if_incomplete("evaluate", run.ledger, m["ref"].max_cost_usd)
                outputs[m["name"]] = [batch.completion(i).text for i in range(len(items))]
                m["probe_outputs"] = [batch.completion(len(items) + i).text for i in range(len(probes))]
                m["seconds"] = round(batch.seconds, 2)
        finally:
            ledger.close()
        results = []
        for m in models:
            correct = [exact_match(o, expected_answer(it, m["identity"], teacher_id))
                       for o, it in zip(outputs[m["name"]], items)]
            fam = accuracy_by_family(items, correct)
            m["correct"] = correct
            entry = {"name": m["name"], "role": m["role"], "spec": m["spec"],
                     "parameters": _parameters(recipe, m["spec"]),
                     "accuracy": sum(fam.values()) / len(fam),  # macro mean over families
                     "accuracy_by_family": fam, "seconds": m["seconds"],
                     "identity": None if m["identity"] is None else {"name": m["identity"].name,
                                                                     "maker": m["identity"].maker}}
            if teacher_id is not None:
                asked = [o for o, it in zip(outputs[m["name"]], items) if it.get("identity")]
                entry["identity_claims"] = {"benchmark": identity_claims(asked, m["identity"], teacher_id)}
                if probes:
                    entry["identity_claims"]["new_phrasings"] = identity_claims(m["probe_outputs"], m["identity"],
                                                                                teacher_id)
            results.append(entry)
        teacher_acc = results[0]["accuracy"]
        for r in results:
            r["share_kept"] = r["accuracy"] / teacher_acc if teacher_acc else None
        doc = {"benchmark": e.benchmark, "items": len(items), "families": sorted({it["family"] for it in items}),
               "verifier": "exact_match", "identity_probes": e.identity_probes, "probe_items": len(probes),
               "models": results}
        lines = []
        for i, it in enumerate(items):
            row = {"id": it["id"], "family": it["family"], "prompt": it["prompt"], "answer": it["answer"],
                   "prompt_hash": _sha(it["prompt"]), "answer_hash": _sha(it["answer"])}
            for m in models:
                row[f"{m['name']}_output"] = outputs[m["name"]][i]
                row[f"{m['name']}_correct"] = m["correct"][i]
            lines.append(json.dumps(row, ensure_ascii=False))
        atomic_write_text(run.samples, "\n".join(lines) + "\n")
        atomic_write_text(run.results, json.dumps(doc, indent=2) + "\n")
        summary = {r["name"]: {"role": r["role"], "accuracy": r["accuracy"], "share_kept": r["share_kept"]}
                   for r in results}
        return StageResult({"results": [run.results, run.samples]}, {"items": len(items), "models": len(results)},
                           {"summary": summary})


STAGE = EvaluateStage
