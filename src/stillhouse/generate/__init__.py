"""Generate: the teacher answers a prompt set → `data/generated.parquet`.

Each row is an OpenAI chat `messages` list (the prompt and the teacher's answer) plus the
provenance of that answer: backend, requested and reported model, fingerprint, sampling
parameters, prompt-template hash, timestamp and the request's cache key.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stillhouse.errors import StillhouseError
from stillhouse.recipe import PromptsSpec, Recipe
from stillhouse.rundir import RunDir, hash_path, tagged_hash
from stillhouse.teachers import Request, load_backend
from stillhouse.ui import console, progress_bar

# The "responses" method sends each prompt verbatim as one user turn.
RESPONSES_TEMPLATE = "{prompt}"


def load_prompts(spec: PromptsSpec) -> list[list[dict]]:
    """The prompt set as chat message lists: the world's train split, or a JSONL/Parquet file.

    A file's rows need a `prompt` string or a `messages` list (a trailing assistant turn is dropped).
    """
    if spec.source == "world":
        from stillhouse.demo import world

        return [[{"role": "user", "content": t.prompt}] for t in world.sample_tasks(spec.n or 2000, "train", spec.seed)]
    rows = _read_rows(Path(spec.source))
    out = []
    for i, row in enumerate(rows):
        if isinstance(row.get("messages"), list) and row["messages"]:
            msgs = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            msgs = [{"role": "user", "content": row["prompt"]}]
        else:
            raise StillhouseError(f"{spec.source}: row {i + 1} has neither a non-empty 'prompt' string nor a 'messages' list")
        out.append(msgs)
    return out[: spec.n] if spec.n else out


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    rows = []
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise StillhouseError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def request_key(backend: str, model: str, req: Request) -> str:
    """The cache key of one teacher call: a tagged hash of everything that determines its answer."""
    return tagged_hash({"backend": backend, "model": model, "messages": list(req.messages), "params": req.params(),
                        "sample_index": req.sample_index})


def cache_model_id(backend: str, model: str) -> str:
    """The model's identity in cache keys. A local directory is named by its weights too, so a
    model retrained in place never gets its predecessor's cached answers."""
    if backend == "hf":
        from stillhouse.models import resolve_model
        from stillhouse.teachers.hf import _dir_fingerprint

        src = Path(resolve_model(model))
        if src.exists():
            return f"{model}@{_dir_fingerprint(src)}"
    return model


def call_through_ledger(spec: str, options: dict, reqs: list[Request], ledger, stage: str, price, budget,
                        label: str) -> tuple[list[str], dict, int, list[str]]:
    """Answer `reqs` from the ledger where it can, else by calling the backend (each call committed
    as it completes). Returns (keys, calls by key, calls made, failures)."""
    from stillhouse.teachers import parse_spec

    name, model = parse_spec(spec)
    ident = cache_model_id(name, model)
    keys = [request_key(name, ident, r) for r in reqs]
    cached = ledger.get_many(keys)
    seen: set[str] = set()  # a prompt listed twice is one call
    missing = [i for i, k in enumerate(keys) if k not in cached and not (k in seen or seen.add(k))]
    made, failures = 0, []
    session = ledger.start_session(stage, model, len(reqs), len(cached))
    if missing:
        made, failures = _call_missing(spec, options, stage, label, ledger, reqs, keys, missing, price, budget,
                                       len(cached))
    ledger.end_session(session, made, len(failures), budget.refused)
    return keys, ledger.get_many(keys), made, failures


def check_terms(recipe: Recipe) -> None:
    """Stop with a clear message when the declared use conflicts with the teacher's terms."""
    from stillhouse.terms import check_use

    conflict = check_use(recipe.teacher.terms, recipe.use.intended, recipe.use.override_terms_conflict)
    if conflict:
        raise StillhouseError(f"use.intended: {conflict}; set use.override_terms_conflict: true to run anyway "
                              "(it is recorded in the cards)")


def generate(recipe: Recipe, run: RunDir, force: bool = False, dry_run: bool = False) -> dict | None:
    """Run the generate stage through the ledger: cached calls are reused, only missing ones are made.

    Skipped when finished with the same inputs unless `force`; `force` re-assembles the data
    from the ledger and makes no call already recorded there. With `dry_run`, prints the
    calls it would make and their worst-case cost, and makes none.
    """
    from stillhouse.costs import Budget, estimate_prompt_tokens, price_for
    from stillhouse.ledger import Ledger
    from stillhouse.teachers import parse_spec

    config = {"teacher": recipe.teacher.identity(), "prompts": recipe.prompts.model_dump(),
              "generation": recipe.generation.model_dump(), "use": recipe.use.model_dump(), "method": "responses"}
    inputs = {"prompts": recipe.prompts.source if recipe.prompts.source == "world" else hash_path(recipe.prompts.source)}
    if not force and not dry_run and run.is_done("generate", inputs, config):
        console.print("generate: already finished, skipping (use --force to redo)")
        return run.manifest("generate")
    check_terms(recipe)
    backend_name, model = parse_spec(recipe.teacher.spec)
    prompts = load_prompts(recipe.prompts)
    g = recipe.generation
    reqs = [Request(messages=tuple(m), max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                    sample_index=k) for m in prompts for k in range(g.samples_per_prompt)]
    price = price_for(model, recipe.teacher.price.model_dump() if recipe.teacher.price else None)
    ledger = Ledger(run.ledger)
    try:
        if dry_run:
            ident = cache_model_id(backend_name, model)
            keys = [request_key(backend_name, ident, r) for r in reqs]
            cached = ledger.get_many(keys)
            missing = [r for r, k in zip(reqs, keys) if k not in cached]
            worst = sum(price.cost(estimate_prompt_tokens(r.messages), r.max_tokens) for r in missing)
            console.print(f"generate --dry-run: {len(reqs)} samples, {len(cached)} already in the ledger, "
                          f"{len(missing)} calls to make to {recipe.teacher.spec}; worst-case cost "
                          f"${worst:.4f} (every answer at max_tokens={g.max_tokens}; "
                          f"price ${price.input_per_million}/${price.output_per_million} per M tokens in/out)")
            return None
        started = run.begin("generate")
        budget = Budget(recipe.teacher.max_cost_usd, spent_usd=ledger.spent())
        t_calls = time.time()
        keys, calls, made, failures = call_through_ledger(recipe.teacher.spec, recipe.teacher.options, reqs, ledger,
                                                          "generate", price, budget, "generate")
        t_calls = time.time() - t_calls
        n_cached = len(calls) - made
        if failures:
            raise StillhouseError(f"generate: {len(failures)} teacher calls failed after retries "
                                  f"(first: {failures[0]}); the {made} that succeeded are saved in {run.ledger}; "
                                  "re-run to retry only the failed ones")
        if budget.refused:
            raise StillhouseError(f"generate: stopped before exceeding teacher.max_cost_usd=${budget.cap:.4f} (spent "
                                  f"${budget.spent:.4f}; {len(calls)} of {len(reqs)} samples done, all saved "
                                  f"in {run.ledger}); raise the cap and re-run to continue")
        rows = _rows(recipe, reqs, keys, calls, backend_name)
    finally:
        ledger.close()
    run.generated.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.generated.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(run.generated)
    counts = {"samples": len(rows), "prompts": len(prompts), "cache_hits": n_cached, "calls_made": made,
              "call_seconds": round(t_calls, 3), "calls_per_second": round(made / t_calls, 2) if made else None,
              "truncated": sum(r["finish_reason"] == "length" for r in rows),
              "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
              "completion_tokens": sum(r["completion_tokens"] for r in rows),
              "cost_usd": round(sum(r["cost_usd"] for r in rows), 6)}
    return run.finish("generate", started, inputs, config, {"generated": run.generated}, counts)


def _call_missing(spec, options, stage, label, ledger, reqs, keys, missing, price, budget, n_cached) -> tuple[int, list[str]]:
    """Make the missing calls, committing each to the ledger the moment it completes."""
    from stillhouse.costs import estimate_prompt_tokens

    backend = load_backend(spec, options)
    sub = [reqs[i] for i in missing]
    worst = {i: price.cost(estimate_prompt_tokens(reqs[i].messages), reqs[i].max_tokens) for i in missing}
    made, failures, tokens, t0 = 0, [], 0, time.time()
    try:
        with progress_bar(label, len(reqs)) as advance:
            advance(n_cached, cached=n_cached)
            for j, result in backend.generate(sub, admit=lambda j: budget.admit(worst[missing[j]])):
                i = missing[j]
                if isinstance(result, Exception):
                    failures.append(str(result))
                    budget.settle(worst[i], 0.0)
                    advance(0, failed=len(failures))
                    continue
                cost = price.cost(result.prompt_tokens, result.completion_tokens)
                ledger.record(keys[i], stage=stage, backend=backend.name, endpoint=getattr(backend, "endpoint", None),
                              model=backend.model, request={"messages": list(reqs[i].messages), **reqs[i].params(),
                                                            "sample_index": reqs[i].sample_index},
                              completion=result, latency_s=result.extra.get("latency_s"), cost_usd=cost,
                              attempts=result.extra.get("attempts", 1))
                budget.settle(worst[i], cost)
                made += 1
                tokens += result.prompt_tokens + result.completion_tokens
                advance(1, tokens=f"{tokens:,}", cost=budget, rate=_Rate(made, t0), **({"failed": len(failures)} if failures else {}))
    finally:
        backend.close()
    return made, failures


class _Rate:
    """Formats itself only when the progress bar redraws."""

    def __init__(self, n: int, t0: float):
        self.n, self.t0 = n, t0

    def __str__(self) -> str:
        return f"{self.n / max(time.time() - self.t0, 1e-9):.1f}/s"


def _rows(recipe: Recipe, reqs: list[Request], keys: list[str], calls: dict, backend_name: str) -> list[dict]:
    template_hash = tagged_hash({"method": "responses", "template": RESPONSES_TEMPLATE})
    rows = []
    for r, k in zip(reqs, keys):
        c = calls[k].completion
        rows.append({
            "messages": [*r.messages, {"role": "assistant", "content": c.text}],
            "reasoning": c.reasoning, "finish_reason": c.finish_reason,
            "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens, "cost_usd": calls[k].cost_usd,
            "teacher_backend": backend_name, "teacher_model": recipe.teacher.spec.split(":", 1)[1],
            "reported_model": c.model, "system_fingerprint": c.system_fingerprint,
            "sampling_params": json.dumps(r.params(), sort_keys=True), "sample_index": r.sample_index,
            "prompt_template_hash": template_hash, "ledger_key": k, "teacher_terms": recipe.teacher.terms,
            "created_at": datetime.fromtimestamp(calls[k].created_at, timezone.utc).isoformat(timespec="seconds"),
        })
    return rows
