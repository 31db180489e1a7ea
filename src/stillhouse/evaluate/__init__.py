"""Evaluate: every model in the run on held-out tasks, against the teacher, with intervals.

The models are the teacher, each student's base, each student and each control, every one
with its role; all answer through the ledger (`stillhouse.calls`), so answers are cached,
costed and budgeted like every model call. Each benchmark item names its answer extractor
and verifier (`stillhouse.verify`); see `stillhouse.sources.load_benchmark` for where items
come from (a registered benchmark, a JSONL file, a YAML task file).

Per model: greedy accuracy per family and over families (the headline), pass@k over sampled
answers when `evaluate.samples` > 1, agreement with the teacher's final answers, and the
share of the teacher's score kept; optionally a pairwise judge (`judge.py`) of each model's
answers against the teacher's. Every interval is a seeded stratified bootstrap over items
(`metrics.py`). Writes `eval/results.json` (aggregates) and `eval/samples.jsonl` (one row per
item: hashes of prompt and target, each model's output, final answer and verdict, the judge's
verdicts), so a report or a later diff needs only files.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from stillhouse.calls import Ledger, ModelRef, call_models
from stillhouse.calls.costs import DEFAULT_PRICES
from stillhouse.errors import StillhouseError
from stillhouse.evaluate.metrics import Bootstrap, divide, pass_at_k, pass_ks, share
from stillhouse.rundir import RunDir, atomic_write_text, canonical_json
from stillhouse.stages import Stage, StageResult
from stillhouse.teachers import Request, parse_spec


def _sha(s: str) -> str:
    return "sha256:" + hashlib.sha256(s.encode()).hexdigest()[:16]


def run_models(recipe, run: RunDir) -> list[dict]:
    """Every model the run evaluates: name, role, how to call it, where its weights are (when local), and for a
    student its training time (the train stage's manifest)."""
    from stillhouse.calls import teacher_ref

    def ident(spec):
        return spec.to_identity() if spec is not None else None

    trained = ((run.manifest("train") or {}).get("counts") or {}).get("students") or {}
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
                       "identity": ident(s.identity),
                       "train_seconds": (trained.get(s.name) or {}).get("train_seconds")})
    for c in recipe.controls:
        models.append({"name": c.name, "role": "control", "ref": ModelRef(c.spec(), c.options), "spec": c.spec(),
                       "identity": ident(c.identity)})
    return models


def judge_ref(recipe) -> ModelRef | None:
    """The recipe's judge as a model to call: the teacher exactly as generation calls it (`judge: {spec: teacher}`),
    or its own backend, options, price and cap; None without a judge."""
    j = recipe.evaluate.judge
    if j is None:
        return None
    if j.spec == "teacher":
        from stillhouse.calls import teacher_ref

        return teacher_ref(recipe)
    return ModelRef(j.spec, j.options, j.price.model_dump() if j.price else None, j.max_cost_usd)


def expected_answer(item: dict, own, teacher) -> Any:
    """What `item`'s verifier checks a model's answer against: for an identity item, the reference restated with the
    model's own declared identity (a student with its own name should say it, not the teacher's)."""
    from stillhouse.identity import restate

    ref = item.get("reference", item["answer"])
    return restate(ref, own, teacher) if item.get("identity") else ref


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


# -- answering and checking ----------------------------------------------------------------------------------------
def ask(model: dict, items: list[dict], probes: list[dict], e, ledger: Ledger, ledger_path) -> dict:
    """One model's answers through the ledger: greedy to every item and probe, and `e.samples` sampled answers per
    item when that is above 1 (each sample its own request, its index in the cache key)."""
    n, k = len(items), e.samples if e.samples > 1 else 0
    reqs = [Request(messages=tuple(it["messages"]), max_tokens=e.max_tokens) for it in items + probes]
    reqs += [Request(messages=tuple(it["messages"]), max_tokens=e.max_tokens, temperature=e.temperature, seed=e.seed,
                     sample_index=j) for it in items for j in range(k)]
    batch = call_models(model["ref"], reqs, ledger, stage="evaluate", label=f"evaluate {model['name']}")
    batch.raise_if_incomplete("evaluate", ledger_path, model["ref"].max_cost_usd)
    text = [batch.completion(i).text for i in range(len(reqs))]
    start = n + len(probes)
    return {"outputs": text[:n], "probe_outputs": text[n:start],
            "sampled": [text[start + i * k:start + (i + 1) * k] for i in range(n)] if k else None,
            "seconds": round(batch.seconds, 2)}


def _extract(name: str, text: str) -> str | None:
    from stillhouse.verify import get_extractor

    try:
        return get_extractor(name)(text)
    except Exception:  # noqa: BLE001 - a plug-in extractor's failure means no answer, as the verifier sees it
        return None


def check(items: list[dict], outputs: list[str], refs: list[Any]) -> list[bool]:
    """Each output verified against its reference by its item's verifier (items grouped per verifier, so one
    that runs programs checks its group concurrently)."""
    from stillhouse.verify import get_verifier, verify_many

    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(canonical_json(it["verifier"]), []).append(i)
    ok = [False] * len(items)
    for key, pos in groups.items():
        v = json.loads(key)
        verdicts = verify_many(get_verifier(v["name"], v["options"]), [outputs[i] for i in pos], [refs[i] for i in pos])
        for i, verdict in zip(pos, verdicts):
            ok[i] = verdict.ok
    return ok


def _agree(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip() == b.strip()


def _priced(ref: ModelRef) -> bool:
    """Whether a model's tokens have a known price (else its cost is unknown, not zero)."""
    return ref.price is not None or ref.model in DEFAULT_PRICES


def _tasks(items: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for it in items:
        t = out.setdefault(it["family"], {"extractor": [], "verifier": [], "items": 0, "judged": False})
        t["items"] += 1
        t["judged"] = t["judged"] or bool(it["judge"])
        for k, v in (("extractor", it["extractor"]), ("verifier", it["verifier"]["name"])):
            if v not in t[k]:
                t[k].append(v)
    return {f: {**t, "extractor": ", ".join(t["extractor"]), "verifier": ", ".join(t["verifier"])}
            for f, t in out.items()}


def evaluate_models(models: list[dict], items: list[dict], probes: list[dict], e, ledger: Ledger, ledger_path,
                    judge: ModelRef | None = None, judge_spec: str | None = None) -> tuple[dict, list[dict], dict]:
    """Every model's answers, verdicts and scores: `(results document, samples rows, judge call stats)`.

    `models[0]` is the teacher every other model is compared with; each model dict has name, role, ref (a
    `ModelRef`), spec and identity, optionally parameters and train_seconds. `e` is the recipe's evaluate
    section; `judge` (with the spec it was named by) the pairwise judge, when there is one.
    """
    teacher_id = models[0]["identity"]
    n = len(items)
    for m in models:
        m.update(ask(m, items, probes, e, ledger, ledger_path))
        refs = [expected_answer(it, m["identity"], teacher_id) for it in items]
        m["correct"] = check(items, m["outputs"], refs)
        m["answers"] = [_extract(it["extractor"], o) for it, o in zip(items, m["outputs"])]
        if m["sampled"] is not None:
            flat = [it for it in items for _ in range(e.samples)]
            ok = check(flat, [s for ss in m["sampled"] for s in ss], [r for r in refs for _ in range(e.samples)])
            m["sampled_correct"] = [ok[i * e.samples:(i + 1) * e.samples] for i in range(n)]
    boot = Bootstrap([it["family"] for it in items], e.bootstrap_resamples, e.confidence, e.seed)
    teacher = models[0]
    t_fam = accuracy_by_family(items, teacher["correct"])
    t_acc = sum(t_fam.values()) / len(t_fam)
    t_macro, t_fam_reps = boot.macro_mean(teacher["correct"]), boot.family_means(teacher["correct"])
    asked = np.array([not it.get("identity") for it in items], dtype=float)  # agreement leaves out who-are-you items
    results = []
    for m in models:
        fam = accuracy_by_family(items, m["correct"])
        acc = sum(fam.values()) / len(fam)  # macro mean over families
        macro, fam_reps = boot.macro_mean(m["correct"]), boot.family_means(m["correct"])
        entry = {"name": m["name"], "role": m["role"], "spec": m["spec"], "parameters": m.get("parameters"),
                 "accuracy": acc, "accuracy_ci": boot.interval(macro),
                 "accuracy_by_family": fam, "accuracy_by_family_ci": {f: boot.interval(r) for f, r in fam_reps.items()},
                 "seconds": m["seconds"],
                 "identity": None if m["identity"] is None else {"name": m["identity"].name,
                                                                 "maker": m["identity"].maker}}
        if teacher_id is not None:
            said = [o for o, it in zip(m["outputs"], items) if it.get("identity")]
            entry["identity_claims"] = {"benchmark": identity_claims(said, m["identity"], teacher_id)}
            if probes:
                entry["identity_claims"]["new_phrasings"] = identity_claims(m["probe_outputs"], m["identity"],
                                                                            teacher_id)
        entry["share_kept"] = acc / t_acc if t_acc else None
        entry["share_kept_ci"] = boot.interval(divide(macro, t_macro)) if t_acc else None
        entry["share_kept_by_family"] = {f: fam[f] / t_fam[f] if t_fam[f] else None for f in fam}
        entry["share_kept_by_family_ci"] = {f: boot.interval(divide(fam_reps[f], t_fam_reps[f])) if t_fam[f] else None
                                            for f in fam}
        if m is teacher:
            entry["teacher_agreement"] = entry["teacher_agreement_ci"] = None
        else:
            agree = np.array([_agree(a, b) for a, b in zip(m["answers"], teacher["answers"])], dtype=float) * asked
            entry["teacher_agreement"] = share(agree, asked)
            entry["teacher_agreement_ci"] = boot.interval(boot.ratio(agree, asked)) if asked.any() else None
        entry["mean_answer_chars"] = float(np.mean([len(o) for o in m["outputs"]]))
        if m["sampled"] is not None:
            by_k = {}
            for k in pass_ks(e.samples):
                per_item = [pass_at_k(e.samples, sum(ok), k) for ok in m["sampled_correct"]]
                by_k[k] = accuracy_by_family(items, per_item)
            entry["pass_at_k"] = {str(k): sum(f.values()) / len(f) for k, f in by_k.items()}
            entry["pass_at_k_by_family"] = {str(k): f for k, f in by_k.items()}
        entry["train_seconds"] = m.get("train_seconds")
        results.append(entry)

    judged_pos = [i for i, it in enumerate(items) if it["judge"]]
    judgements: dict[str, dict] = {}
    judge_doc, judge_stats = None, {"calls": 0, "cost_usd": 0.0, "seconds": 0.0}
    if judge is not None:
        from stillhouse.evaluate.judge import judge_pairs, judge_summary, pair_summary, shown_answer

        js = e.judge
        others = [m for m in models if m is not teacher and (js.models is None or m["name"] in js.models)]
        unknown = sorted(set(js.models or ()) - {m["name"] for m in models})
        if unknown:
            raise StillhouseError(f"evaluate.judge.models: no model named {', '.join(map(repr, unknown))} in this run "
                                  f"(models: {', '.join(m['name'] for m in models)})")
        pairs = [(items[i]["prompt"], m["answers"][i], teacher["answers"][i]) for m in others for i in judged_pos]
        got = judge_pairs(judge, pairs, ledger, max_tokens=js.max_tokens, answer_chars=js.answer_chars,
                          ledger_path=ledger_path, label=f"judge ({len(pairs)} pairs, both orders)")
        judge_stats = {"calls": got.calls, "cost_usd": got.cost_usd, "seconds": round(got.seconds, 2)}
        summaries, verifiable = [], []
        for j, m in enumerate(others):
            mine = dict(zip(judged_pos, got.judgements[j * len(judged_pos):(j + 1) * len(judged_pos)]))
            judgements[m["name"]] = mine
            chars = ([len(shown_answer(m["answers"][i], js.answer_chars)) for i in judged_pos],
                     [len(shown_answer(teacher["answers"][i], js.answer_chars)) for i in judged_pos])
            summaries.append(pair_summary(m["name"], mine, boot, n, chars))
            verifiable += [(mine[i], m["correct"][i]) for i in judged_pos if m["correct"][i] != teacher["correct"][i]]
        judge_doc = judge_summary(judge.spec, judge_spec == "teacher", js.min_swap_consistency,
                                  summaries, got.judgements, verifiable)

    verifiers = list(dict.fromkeys(it["verifier"]["name"] for it in items))
    doc = {"benchmark": e.benchmark, "items": n, "families": sorted({it["family"] for it in items}),
           "verifier": ", ".join(verifiers), "identity_probes": e.identity_probes, "probe_items": len(probes),
           "tasks": _tasks(items),
           "decoding": {"max_tokens": e.max_tokens, "samples": e.samples,
                        "temperature": e.temperature if e.samples > 1 else None},
           "confidence": e.confidence, "bootstrap_resamples": e.bootstrap_resamples, "bootstrap": "percentile, "
           "items resampled within each family, the same resamples for every model (paired)",
           "models": results, "judge": judge_doc}
    rows = []
    for i, it in enumerate(items):
        prompt_text = it["prompt"] if len(it["messages"]) == 1 else canonical_json(it["messages"])
        row = {"id": it["id"], "family": it["family"], "prompt": it["prompt"], "answer": it["answer"],
               "prompt_hash": _sha(prompt_text), "answer_hash": _sha(it["answer"]), "judged": bool(it["judge"])}
        if len(it["messages"]) > 1:
            row["messages"] = it["messages"]
        for m in models:
            row[f"{m['name']}_output"] = m["outputs"][i]
            row[f"{m['name']}_answer"] = m["answers"][i]
            row[f"{m['name']}_correct"] = m["correct"][i]
            if m["sampled"] is not None:
                row[f"{m['name']}_sampled_correct"] = m["sampled_correct"][i]
        for name, mine in judgements.items():
            if i in mine:
                row[f"judge_{name}"] = mine[i].row()
        rows.append(row)
    return doc, rows, judge_stats


def run_cost(recipe, ledger: Ledger, judge: ModelRef | None, judge_stats: dict) -> dict:
    """What the run's teacher cost to distil from (the generate stage's calls in the ledger: USD, calls, tokens) and
    what judging cost. USD is None where the model has no known price (a local model's compute is not priced)."""
    from stillhouse.calls import teacher_ref

    gen = [p for p in ledger.stats()["by_stage_model"] if p["stage"] == "generate"]
    usd = sum(p["cost_usd"] or 0.0 for p in gen)
    return {"teacher_usd": round(usd, 6) if _priced(teacher_ref(recipe)) else None,
            "teacher_calls": sum(p["calls"] or 0 for p in gen),
            "teacher_tokens": sum((p["prompt_tokens"] or 0) + (p["completion_tokens"] or 0) for p in gen),
            "judge_usd": round(judge_stats["cost_usd"], 6) if judge is not None and _priced(judge) else None,
            "judge_calls": judge_stats["calls"]}


class EvaluateStage(Stage):
    name = "evaluate"
    summary = ("Score every model in the run (teacher, bases, students, controls) on held-out tasks, against the "
               "teacher and optionally by a pairwise judge → eval/.")
    reads = ("students",)
    writes = ("results",)
    section = "evaluate"
    always = True

    def config(self, recipe) -> dict:
        from stillhouse.rundir import hash_path
        from stillhouse.sources import benchmark_files
        from stillhouse.teachers import answer_identity

        e = recipe.evaluate
        j = e.judge
        return {"evaluate": e.model_dump(exclude={"judge"}), "teacher": recipe.teacher.cache_identity(),
                "judge": None if j is None else {
                    **j.model_dump(exclude={"options"}),
                    "answers": "teacher" if j.spec == "teacher" else answer_identity(j.spec, j.options)},
                "benchmark_files": {p: hash_path(p) for src in (e.benchmark, e.identity_probes) if src
                                    for p in benchmark_files(src)},
                "bases": [s.base for s in recipe.students], "controls": [c.model_dump() for c in recipe.controls],
                "identities": {"teacher": recipe.teacher.identity and recipe.teacher.identity.model_dump(),
                               **{s.name: s.identity and s.identity.model_dump() for s in recipe.students}}}

    def check(self, recipe, run: RunDir) -> None:
        from stillhouse.sources import load_benchmark

        e = recipe.evaluate  # a bad benchmark stops here, before anything changes
        self._items = load_benchmark(e.benchmark, e.n_per_family, e.seed)
        self._probes = load_benchmark(e.identity_probes, 10**9, e.seed) if e.identity_probes else []

    def execute(self, recipe, run: RunDir) -> StageResult:
        if not hasattr(self, "_items"):
            self.check(recipe, run)
        e = recipe.evaluate
        models = run_models(recipe, run)
        for m in models:
            m["parameters"] = _parameters(recipe, m["spec"])
        judge = judge_ref(recipe)
        ledger = Ledger(run.ledger)
        try:
            doc, rows, judge_stats = evaluate_models(models, self._items, self._probes, e, ledger, run.ledger, judge,
                                                     e.judge.spec if e.judge else None)
            doc["cost"] = run_cost(recipe, ledger, judge, judge_stats)
        finally:
            ledger.close()
        atomic_write_text(run.samples, "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
        atomic_write_text(run.results, json.dumps(doc, indent=2) + "\n")
        summary = {r["name"]: {"role": r["role"], "accuracy": r["accuracy"], "share_kept": r["share_kept"]}
                   for r in doc["models"]}
        counts = {"items": len(rows), "models": len(doc["models"]), "judge_calls": judge_stats["calls"]}
        return StageResult({"results": [run.results, run.samples]}, counts, {"summary": summary})


STAGE = EvaluateStage
