"""The curate stage: generated samples → filters (and the verifier gate) → `data/curated.parquet` + its dataset card.

Each filter's drops and rewrites are counted with their reasons; decontamination runs against
the run's own benchmark always (and its identity probes, and any user eval file), and a
benchmark item found in the training data is named in the counts so the report can warn.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from stillhouse.errors import StillhouseError
from stillhouse.rundir import RunDir
from stillhouse.stages import Stage, StageResult


def student_identity(recipe):
    """The identity the curated data should speak with: the students' declared one (they must agree), or None."""
    declared = {(s.identity.name, s.identity.maker): s.identity for s in recipe.students if s.identity is not None}
    if len(declared) > 1:
        raise StillhouseError("students: the students declare different identities, but one curated dataset is "
                              "shared by all of them; give them one identity or split them into separate runs")
    spec = next(iter(declared.values()), None)
    return spec.to_identity() if spec is not None else None


def eval_prompts(recipe) -> dict[str, list[str]]:
    """Every evaluation set the training data must not contain, by name: the run's benchmark, its identity probes,
    and the user's extra eval files."""
    from stillhouse.sources import load_benchmark, read_rows

    e = recipe.evaluate
    sets = {e.benchmark: [it["prompt"] for it in load_benchmark(e.benchmark, e.n_per_family, e.seed)]}
    if e.identity_probes:
        sets[e.identity_probes] = [it["prompt"] for it in load_benchmark(e.identity_probes, 10**9, e.seed)]
    for f in recipe.curate.eval_files:
        prompts = []
        for i, row in enumerate(read_rows(f, ("prompt",)), 1):
            if not isinstance(row.get("prompt"), str):
                raise StillhouseError(f"{f}: row {i}: an evaluation item needs a 'prompt' string")
            prompts.append(row["prompt"])
        sets[f] = prompts
    return sets


class CurateStage(Stage):
    name = "curate"
    summary = ("Filter the generated data (dedup, decontamination, identity scrubbing, quality filters, verifier "
               "gate) → data/curated.parquet and its dataset card.")
    reads = ("generated",)
    writes = ("curated",)
    section = "curate"
    always = True

    def config(self, recipe) -> dict:
        from stillhouse.rundir import hash_path

        ident = student_identity(recipe)
        return {"curate": recipe.curate.model_dump(mode="json"),
                "eval_files": {f: hash_path(f) for f in recipe.curate.eval_files},
                "evaluate": {k: v for k, v in recipe.evaluate.model_dump().items() if k != "max_tokens"},
                "identity": None if ident is None else [ident.name, ident.maker],
                "teacher_identity": recipe.teacher.identity and recipe.teacher.identity.model_dump(),
                "terms": recipe.teacher.terms, "use": recipe.use.model_dump()}

    def execute(self, recipe, run: RunDir) -> StageResult:
        from stillhouse.curate import CurateContext, make_filter

        rows = pq.read_table(run.generated).to_pylist()
        n_in = len(rows)
        teacher = recipe.teacher.identity.to_identity() if recipe.teacher.identity else None
        ctx = CurateContext(eval_prompts=eval_prompts(recipe), identity=student_identity(recipe), teacher=teacher,
                            seed=recipe.generation.seed)
        steps, results = [], []
        for spec in recipe.curate.filters:
            res = make_filter(spec.name, spec.options()).apply(rows, ctx)
            results.append((spec.name, res))
            steps.append({"filter": spec.name, "in": len(rows), **res.summary()})
            rows = res.kept
        if recipe.curate.verify is not None:
            rows, step = self._verify_gate(recipe, rows)
            steps.append(step)
            results.append((step["filter"], step))
        if not rows:
            why = "; ".join(f"{s['filter']}: {s['dropped']}" for s in steps)
            raise StillhouseError(f"curate: every one of the {n_in} generated samples was dropped ({why})")
        run.curated.parent.mkdir(parents=True, exist_ok=True)
        tmp = run.curated.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(run.curated)
        card = self._card(recipe, run, n_in, rows, results)
        contaminated = {name: c["items_hit"] for s in steps for name, c in (s.get("contamination") or {}).items()
                        if c["items_hit"]}
        # Dropped and added are counted apart (a filter that adds pairs, such as identity's, would otherwise show as
        # negative drops): generated - dropped + added = kept.
        counts = {"generated": n_in, "kept": len(rows), "dropped": sum(s.get("dropped", 0) for s in steps),
                  "added": sum(s.get("added", 0) for s in steps), "filters": steps,
                  "contaminated_eval_items": sum(contaminated.values()), "contaminated_sets": contaminated}
        return StageResult({"curated": [run.curated, card]}, counts)

    @staticmethod
    def _verify_gate(recipe, rows: list[dict]) -> tuple[list[dict], dict]:
        from stillhouse.verify import get_verifier, verify_many

        spec = recipe.curate.verify
        verifier = get_verifier(spec.verifier, spec.options)
        checkable = [r for r in rows if r.get("reference_answer") is not None]
        # An answer the identity filter rewrote names the student now: its reference must say the same, or the gate
        # would drop every scrubbed identity answer as wrong.
        from stillhouse.identity import restate

        own = student_identity(recipe)
        teacher = recipe.teacher.identity.to_identity() if recipe.teacher.identity else None
        verdicts = verify_many(verifier, [r["messages"][-1]["content"] for r in checkable],
                               [restate(r["reference_answer"], own, teacher) for r in checkable])
        failed = {id(r) for r, v in zip(checkable, verdicts) if not v.ok}
        reasons: dict[str, int] = {}
        for v in verdicts:
            if not v.ok:
                reasons[v.reason] = reasons.get(v.reason, 0) + 1
        kept = [r for r in rows if id(r) not in failed]
        return kept, {"filter": f"verify:{spec.verifier}", "in": len(rows), "kept": len(kept),
                      "dropped": len(rows) - len(kept), "changed": 0, "added": 0, "drop_reasons": reasons,
                      "change_reasons": {}, "unverifiable": len(rows) - len(checkable)}

    @staticmethod
    def _card(recipe, run: RunDir, n_in: int, rows: list[dict], results: list):
        from stillhouse.curate.card import write_card
        from stillhouse.terms import REGISTRY, check_use

        t = REGISTRY[recipe.teacher.terms]
        backend, model = recipe.teacher.spec.split(":", 1)
        methods: dict[str, int] = {}
        for r in rows:
            methods[r.get("generation_method") or recipe.generation.method] = \
                methods.get(r.get("generation_method") or recipe.generation.method, 0) + 1
        return write_card(
            run.curated.parent, run.curated.name, num_rows=len(rows), rows_in=n_in, title=f"{recipe.name}: curated data",
            teachers=[{"spec": recipe.teacher.spec, "backend": backend, "model": model}], methods=methods,
            filters=results, terms={"name": t.name, "url": t.url, "note": t.note, "intended_use": recipe.use.intended,
                                    "override": bool(check_use(t.id, recipe.use.intended, override=False))})


STAGE = CurateStage
