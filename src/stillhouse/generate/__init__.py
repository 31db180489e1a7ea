"""Generate: the teacher answers a prompt set → `data/generated.parquet`.

Each row is an OpenAI chat `messages` list (the prompt and the teacher's answer) plus the
provenance of that answer: backend, requested and reported model, fingerprint, sampling
parameters, prompt-template hash, timestamp and the request's cache key. Every call goes
through the ledger (`stillhouse.calls`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from stillhouse.calls import CallBatch, Ledger, ModelRef, call_models
from stillhouse.errors import StillhouseError
from stillhouse.rundir import RunDir, hash_path, tagged_hash
from stillhouse.sources import PROMPT_SOURCES, load_prompts
from stillhouse.stages import Stage, StageResult
from stillhouse.teachers import Request
from stillhouse.ui import console

# The "responses" method sends each prompt verbatim as one user turn.
METHOD = "responses"
RESPONSES_TEMPLATE = "{prompt}"


def teacher_ref(recipe) -> ModelRef:
    t = recipe.teacher
    return ModelRef(t.spec, t.options, t.price.model_dump() if t.price else None, t.max_cost_usd)


def check_terms(recipe) -> None:
    """Stop with a clear message when the declared use conflicts with the teacher's terms."""
    from stillhouse.terms import check_use

    conflict = check_use(recipe.teacher.terms, recipe.use.intended, recipe.use.override_terms_conflict)
    if conflict:
        raise StillhouseError(f"use.intended: {conflict}; set use.override_terms_conflict: true to run anyway "
                              "(it is recorded in the cards)")


def method_tag() -> dict:
    """What the cache key records of how a request was made: the method and its prompt template."""
    return {"method": METHOD, "template": tagged_hash(RESPONSES_TEMPLATE)}


class GenerateStage(Stage):
    name = "generate"
    summary = "Have the teacher answer the prompt set → data/generated.parquet (every call through the ledger)."
    writes = ("generated",)
    section = "generation"
    always = True
    flags = {"dry_run": "print the calls and worst-case cost; make none"}

    def config(self, recipe) -> dict:
        return {"teacher": recipe.teacher.identity(), "prompts": recipe.prompts.model_dump(),
                "generation": recipe.generation.model_dump(), "use": recipe.use.model_dump(), "method": method_tag()}

    def inputs(self, recipe, run: RunDir) -> dict:
        src = recipe.prompts.source
        return {"prompts": src if src in PROMPT_SOURCES else hash_path(src)}

    def check(self, recipe, run: RunDir) -> None:
        check_terms(recipe)
        p = recipe.prompts
        self._prompts = load_prompts(p.source, p.n, p.seed)  # a bad prompts file stops here, before anything changes

    def requests(self, recipe) -> tuple[list[list[dict]], list[Request]]:
        p, g = recipe.prompts, recipe.generation
        prompts = getattr(self, "_prompts", None) or load_prompts(p.source, p.n, p.seed)
        reqs = [Request(messages=tuple(m), max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p,
                        seed=g.seed, sample_index=k) for m in prompts for k in range(g.samples_per_prompt)]
        return prompts, reqs

    def execute(self, recipe, run: RunDir, dry_run: bool = False) -> StageResult | None:
        prompts, reqs = self.requests(recipe)
        teacher = teacher_ref(recipe)
        ledger = Ledger(run.ledger)
        try:
            if dry_run:
                return self._dry_run(recipe, teacher, reqs, ledger)
            batch = call_models(teacher, reqs, ledger, stage="generate", label="generate", tag=method_tag())
        finally:
            ledger.close()
        batch.raise_if_incomplete("generate", run.ledger, teacher.max_cost_usd)
        rows = _rows(recipe, reqs, batch)
        run.generated.parent.mkdir(parents=True, exist_ok=True)
        tmp = run.generated.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(rows), tmp)
        tmp.replace(run.generated)
        counts = {"samples": len(rows), "prompts": len(prompts), "cache_hits": batch.cache_hits,
                  "calls_made": batch.made, "call_seconds": round(batch.seconds, 3),
                  "calls_per_second": round(batch.made / batch.seconds, 2) if batch.made else None,
                  "truncated": sum(r["finish_reason"] == "length" for r in rows),
                  "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
                  "completion_tokens": sum(r["completion_tokens"] for r in rows),
                  "cost_usd": round(sum(r["cost_usd"] for r in rows), 6)}
        return StageResult({"generated": run.generated}, counts)

    @staticmethod
    def _dry_run(recipe, teacher: ModelRef, reqs: list[Request], ledger: Ledger) -> None:
        from stillhouse.calls.call import plan
        from stillhouse.calls.costs import estimate_prompt_tokens

        keys = plan(teacher, reqs, method_tag())
        cached = ledger.get_many(keys)
        missing = [r for r, k in zip(reqs, keys) if k not in cached]
        price = teacher.priced()
        worst = sum(price.cost(estimate_prompt_tokens(r.messages), r.max_tokens) for r in missing)
        g = recipe.generation
        console.print(f"generate --dry-run: {len(reqs)} samples, {len(cached)} already in the ledger, "
                      f"{len(missing)} calls to make to {recipe.teacher.spec}; worst-case cost "
                      f"${worst:.4f} (every answer at max_tokens={g.max_tokens}; "
                      f"price ${price.input_per_million}/${price.output_per_million} per M tokens in/out)")


def _rows(recipe, reqs: list[Request], batch: CallBatch) -> list[dict]:
    backend, model = recipe.teacher.spec.split(":", 1)
    template_hash = method_tag()["template"]
    rows = []
    for i, r in enumerate(reqs):
        k = batch.keys[i]
        call = batch.calls[k]
        c = call.completion
        rows.append({
            "messages": [*r.messages, {"role": "assistant", "content": c.text}],
            "reasoning": c.reasoning, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "cost_usd": call.cost_usd,
            "teacher_backend": backend, "teacher_model": model,
            "reported_model": c.model, "system_fingerprint": c.system_fingerprint,
            "sampling_params": json.dumps(r.params(), sort_keys=True), "sample_index": r.sample_index,
            "generation_method": METHOD, "prompt_template_hash": template_hash, "ledger_key": k,
            "teacher_terms": recipe.teacher.terms,
            "created_at": datetime.fromtimestamp(call.created_at, timezone.utc).isoformat(timespec="seconds"),
        })
    return rows


STAGE = GenerateStage
