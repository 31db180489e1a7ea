"""Generate: the teacher answers a prompt set → `data/generated.parquet`.

Each row is an OpenAI chat `messages` list (the prompt and the teacher's answer) plus the
provenance of that answer: backend, requested and reported model, fingerprint, sampling
parameters, prompt-template hash, timestamp and the request's cache key, and the system prompt
the teacher's chat template added unseen (`teacher_template_system_prompt`; a local teacher's,
where `teacher_template_known`: an API teacher's template is the server's). Every call goes
through the ledger (`stillhouse.calls`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from stillhouse.calls import Ledger, ModelRef, teacher_ref
from stillhouse.errors import StillhouseError
from stillhouse.generate.methods import METHODS, GenContext, Sample, method_options, tag_of
from stillhouse.rundir import RunDir, hash_path
from stillhouse.sources import PROMPT_SOURCES, load_prompt_items
from stillhouse.stages import Stage, StageResult
from stillhouse.teachers import Request
from stillhouse.ui import console

def check_terms(recipe) -> None:
    """Stop with a clear message when the declared use conflicts with the teacher's terms."""
    from stillhouse.terms import check_use

    conflict = check_use(recipe.teacher.terms, recipe.use.intended, recipe.use.override_terms_conflict)
    if conflict:
        raise StillhouseError(f"use.intended: {conflict}; set use.override_terms_conflict: true to run anyway "
                              "(it is recorded in the cards)")


class GenerateStage(Stage):
    name = "generate"
    summary = "Have the teacher answer the prompt set → data/generated.parquet (every call through the ledger)."
    writes = ("generated",)
    section = "generation"
    always = True
    flags = {"dry_run": "print the calls and worst-case cost; make none"}

    def config(self, recipe) -> dict:
        # the mode (online or batch) says how the answers are fetched, not what they are: the same cache keys either
        # way, so switching it redoes nothing
        return {"teacher": recipe.teacher.cache_identity(), "prompts": recipe.prompts.model_dump(),
                "generation": recipe.generation.model_dump(exclude={"mode", "batch"}), "use": recipe.use.model_dump()}

    def inputs(self, recipe, run: RunDir) -> dict:
        src = recipe.prompts.source
        out = {"prompts": src if src in PROMPT_SOURCES else hash_path(src)}
        seeds = recipe.generation.options.get("seeds")
        if seeds:
            out["seeds"] = hash_path(seeds)
        return out

    def check(self, recipe, run: RunDir) -> None:
        check_terms(recipe)
        p = recipe.prompts
        self._items = load_prompt_items(p.source, p.n, p.seed)  # a bad prompts file stops here, before anything changes

    def execute(self, recipe, run: RunDir, dry_run: bool = False) -> StageResult | None:
        p, g = recipe.prompts, recipe.generation
        items = getattr(self, "_items", None) or load_prompt_items(p.source, p.n, p.seed)
        teacher = teacher_ref(recipe)
        method = METHODS.get(g.method)()
        opts = method_options(g.method, g.options)
        if dry_run:  # looks only: an absent ledger is read as empty, and nothing is created
            ledger = Ledger(run.ledger) if run.ledger.is_file() else None
            try:
                return self._dry_run(recipe, teacher, items, ledger)
            finally:
                if ledger is not None:
                    ledger.close()
        ledger = Ledger(run.ledger)
        try:
            ctx = GenContext(recipe, teacher, ledger, items, run.ledger)
            result = method.run(ctx, opts)
        finally:
            ledger.close()
        rows = _rows(recipe, result.samples)
        if not rows:
            raise StillhouseError(f"generate: the {g.method} method kept no sample ({json.dumps(result.counts)})")
        run.generated.parent.mkdir(parents=True, exist_ok=True)
        tmp = run.generated.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(run.generated)
        calls = {s.key: s.call for s in result.samples}
        st = ctx.stats
        counts = {"samples": len(rows), "prompts": len(items), "method": g.method, **result.counts,
                  "cache_hits": st["cache_hits"], "calls_made": st["calls_made"],
                  "call_seconds": round(st["call_seconds"], 3),
                  "calls_per_second": round(st["calls_made"] / st["call_seconds"], 2) if st["calls_made"] else None,
                  "truncated": sum(r["finish_reason"] == "length" for r in rows),
                  "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                  "completion_tokens": sum(r["completion_tokens"] for r in rows),
                  "cost_usd": round(sum(c.cost_usd for c in calls.values()), 6)}
        return StageResult({"generated": run.generated}, counts)

    @staticmethod
    def _dry_run(recipe, teacher: ModelRef, items: list[dict], ledger: Ledger | None) -> None:
        from stillhouse.calls.batch import worst_case
        from stillhouse.calls.call import plan
        from stillhouse.teachers import load_backend, parse_spec

        g = recipe.generation
        if g.method not in ("responses", "reasoning", "rejection"):
            raise StillhouseError(f"generate --dry-run: the {g.method} method's calls depend on the teacher's earlier "
                                  "answers, so they cannot be listed before it runs")
        k = method_options(g.method, g.options).k if g.method == "rejection" else g.samples_per_prompt
        reqs = [Request(messages=tuple(it["messages"]), max_tokens=g.max_tokens, temperature=g.temperature,
                        top_p=g.top_p, seed=g.seed, sample_index=j) for it in items for j in range(k)]
        method = METHODS.get(g.method)
        keys = plan(teacher, reqs, tag_of(g.method, method.TEMPLATE))
        cached = ledger.get_many(keys) if ledger is not None else {}
        missing = [r for r, key in zip(reqs, keys) if key not in cached]
        price = teacher.priced()
        # the teacher's tokenizer where its backend counts with one (an API teacher's: no model is loaded)
        counter = None
        if parse_spec(teacher.spec)[0] == "openai":
            counter = getattr(load_backend(teacher.spec, teacher.options), "count_prompt_tokens", None)
        online, batch = worst_case(missing, price, g.batch.price_factor, counter)
        n_batches = -(-len(missing) // (g.batch.max_requests or 50_000)) if missing else 0
        console.print(f"generate --dry-run: {len(reqs)} samples, {len(cached)} already in the ledger, "
                      f"{len(missing)} calls to make to {recipe.teacher.spec}; worst-case cost (every answer at "
                      f"max_tokens={g.max_tokens}; price ${price.input_per_million}/${price.output_per_million} per M "
                      f"tokens in/out):", highlight=False, soft_wrap=True)
        mark = {"online": " <- generation.mode", "batch": ""} if g.mode == "online" else \
            {"online": "", "batch": " <- generation.mode"}
        console.print(f"  online: ${online:.4f}{mark['online']}", highlight=False, soft_wrap=True)
        console.print(f"  batch:  ${batch:.4f} ({g.batch.price_factor:g} x online; {n_batches} batch"
                      f"{'es' if n_batches != 1 else ''} through the {g.batch.runner} runner){mark['batch']}",
                      highlight=False, soft_wrap=True)


def _rows(recipe, samples: list[Sample]) -> list[dict]:
    from stillhouse.templates import teacher_template_system_prompt

    backend, model = recipe.teacher.spec.split(":", 1)
    method = recipe.generation.method
    # A chat template may add a system prompt the samples do not keep ("You are Qwen, created by Alibaba Cloud. ..."):
    # the teacher answered under it. Known for a local teacher, hidden behind an API.
    template_known, template_system = teacher_template_system_prompt(recipe.teacher.spec)
    rows = []
    for s in samples:
        c = s.call.completion
        own_system = any(m.get("role") == "system" for m in s.request.messages)
        rows.append({
            "messages": s.messages,
            "reasoning": c.reasoning, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "cost_usd": s.call.cost_usd,
            "teacher_backend": backend, "teacher_model": model,
            "reported_model": c.model, "system_fingerprint": c.system_fingerprint,
            "sampling_params": json.dumps(s.request.params(), sort_keys=True), "sample_index": s.request.sample_index,
            "generation_method": method, "prompt_template_hash": None, "ledger_key": s.key,
            "generation_mode": s.call.mode, "batch": s.call.batch,
            "teacher_terms": recipe.teacher.terms,
            "teacher_template_known": template_known,
            "teacher_template_system_prompt": None if own_system else template_system,
            "created_at": datetime.fromtimestamp(s.call.created_at, timezone.utc).isoformat(timespec="seconds"),
            **s.columns,
        })
    # a method's own columns (pass_rate, evolved_from, ...) exist in every row, null where they do not apply
    names = list(dict.fromkeys(k for r in rows for k in r))
    return [{k: r.get(k) for k in names} for r in rows]


STAGE = GenerateStage
