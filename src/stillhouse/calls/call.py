"""The ledgered call: answer requests from the ledger where it can, else call the model and record each call."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from stillhouse.calls.costs import Budget, Price, estimate_prompt_tokens, price_for
from stillhouse.calls.keys import derive_seed, request_key
from stillhouse.calls.ledger import CachedCall, Ledger
from stillhouse.errors import StillhouseError
from stillhouse.teachers import Completion, Request, answer_identity, load_backend, parse_spec
from stillhouse.ui import progress_bar


@dataclass
class ModelRef:
    """A model to call: its backend spec and options, and what its tokens cost (None: free, no cap)."""

    spec: str
    options: dict = field(default_factory=dict)
    price: dict | None = None
    max_cost_usd: float | None = None

    @property
    def model(self) -> str:
        return parse_spec(self.spec)[1]

    def priced(self) -> Price:
        return price_for(self.model, self.price)

    def identity(self) -> dict[str, Any]:
        return answer_identity(self.spec, self.options)


@dataclass
class CallBatch:
    """The outcome of `call_models`: one key per request, the recorded calls among them, and what happened."""

    keys: list[str]
    calls: dict[str, CachedCall]
    cache_hits: int
    made: int
    failures: list[str]
    refused_by_budget: bool
    seconds: float

    @property
    def complete(self) -> bool:
        return all(k in self.calls for k in self.keys)

    def completion(self, i: int) -> Completion:
        return self.calls[self.keys[i]].completion

    def raise_if_incomplete(self, stage: str, ledger_path, cap: float | None) -> None:
        """A StillhouseError saying what is missing and that a re-run continues, when not every request has an answer."""
        if self.failures:
            raise StillhouseError(f"{stage}: {len(self.failures)} calls failed after retries (first: {self.failures[0]}); "
                                  f"the {self.made} that succeeded are saved in {ledger_path}, the failures recorded "
                                  "there too; re-run to retry only the failed ones")
        if self.refused_by_budget or not self.complete:
            done = sum(k in self.calls for k in self.keys)
            raise StillhouseError(f"{stage}: stopped before exceeding teacher.max_cost_usd=${cap} ({done} of "
                                  f"{len(self.keys)} answers done, all saved in {ledger_path}); raise the cap and re-run "
                                  "to continue")


def plan(model: ModelRef, reqs: list[Request], tag: dict | None = None) -> list[str]:
    """The cache key of each request (no call made, nothing loaded but the model's identity)."""
    ident = model.identity()
    return [request_key(ident, r, tag) for r in reqs]


def call_models(model: ModelRef, reqs: list[Request], ledger: Ledger, *, stage: str, label: str | None = None,
                tag: dict | None = None, batch=None) -> CallBatch:
    """Answer `reqs` from the ledger where it can, else by calling the model; each call is committed the moment it
    completes (a failure too, as a `failed` row), so an interrupted run loses nothing and a re-run makes only the
    missing calls. A request listed twice is one call. Sampled requests are sent with `derive_seed(key)`.

    `batch` (the recipe's `generation.batch` settings): make the missing calls through a batch runner instead
    (`calls.batch`), at the batch price; same keys, same rows, `mode` 'batch' in the ledger."""
    t0 = time.time()
    keys = plan(model, reqs, tag)
    cached = ledger.get_many(keys)
    seen: set[str] = set()
    missing = [i for i, k in enumerate(keys) if k not in cached and not (k in seen or seen.add(k))]
    price = model.priced()
    budget = Budget(model.max_cost_usd, spent_usd=ledger.spent())
    session = ledger.start_session(stage, model.model, len(reqs), len(reqs) - len(missing))
    made, failures = 0, []
    if missing and batch is not None:
        from stillhouse.calls.batch import call_batched

        made, failures = call_batched(model, reqs, keys, missing, ledger, stage, label or stage, price, budget,
                                      len(reqs) - len(missing), batch)
    elif missing:
        made, failures = _call_missing(model, reqs, keys, missing, ledger, stage, label or stage, price, budget,
                                       len(reqs) - len(missing))
    ledger.end_session(session, made, len(failures), budget.refused)
    return CallBatch(keys, ledger.get_many(keys), len(reqs) - len(missing), made, failures, budget.refused,
                     time.time() - t0)


def ledger_request(req: Request, key: str) -> dict:
    """A request as the ledger's `request` column records it."""
    return {"messages": list(req.messages), **req.params(), "sample_index": req.sample_index,
            "sent_seed": derive_seed(key)}


def _call_missing(model: ModelRef, reqs, keys, missing, ledger: Ledger, stage: str, label: str, price: Price,
                  budget: Budget, n_cached: int, backend=None, total: int | None = None) -> tuple[int, list[str]]:
    own = backend is None
    backend = backend or load_backend(model.spec, model.options)
    sub = [dataclasses.replace(reqs[i], seed=derive_seed(keys[i])) for i in missing]
    counter = getattr(backend, "count_prompt_tokens", None)  # the teacher's tokenizer, where its backend knows it
    worst = {i: price.cost(estimate_prompt_tokens(reqs[i].messages, counter), reqs[i].max_tokens) for i in missing}
    made, failures, tokens, t0 = 0, [], 0, time.time()
    endpoint = getattr(backend, "endpoint", None)

    def request_row(i: int) -> dict:
        return ledger_request(reqs[i], keys[i])

    try:
        with progress_bar(label, total or len(reqs)) as advance:
            advance(n_cached, cached=n_cached)
            for j, result in backend.generate(sub, admit=lambda j: budget.admit(worst[missing[j]])):
                i = missing[j]
                if isinstance(result, Exception):
                    reason = getattr(result, "reason", None) or f"{type(result).__name__}: {result}"
                    failures.append(reason)
                    billed = getattr(result, "billed", (0, 0))  # what the provider charged for answers it broke
                    cost = price.cost(*billed)
                    ledger.record_failure(keys[i], stage=stage, backend=backend.name, endpoint=endpoint,
                                          model=backend.model, request=request_row(i), error=reason,
                                          attempts=getattr(result, "attempts", 1), cost_usd=cost, billed=billed)
                    budget.settle(worst[i], cost)
                    advance(0, failed=len(failures))
                    continue
                cost = price.cost(result.prompt_tokens, result.completion_tokens)
                cost += price.cost(*result.extra.get("billed_failures", (0, 0)))
                ledger.record(keys[i], stage=stage, backend=backend.name, endpoint=endpoint, model=backend.model,
                              request=request_row(i), completion=result, latency_s=result.extra.get("latency_s"),
                              cost_usd=cost, attempts=result.extra.get("attempts", 1))
                budget.settle(worst[i], cost)
                made += 1
                tokens += result.prompt_tokens + result.completion_tokens
                advance(1, tokens=f"{tokens:,}", cost=budget, rate=_Rate(made, t0),
                        **({"failed": len(failures)} if failures else {}))
    finally:
        if own:
            backend.close()
    return made, failures


class _Rate:
    """Formats itself only when the progress bar redraws."""

    def __init__(self, n: int, t0: float):
        self.n, self.t0 = n, t0

    def __str__(self) -> str:
        return f"{self.n / max(time.time() - self.t0, 1e-9):.1f}/s"


def teacher_ref(recipe) -> ModelRef:
    """The run's teacher as every stage calls it: spec, options, price and budget cap from the recipe."""
    t = recipe.teacher
    return ModelRef(t.spec, t.options, t.price.model_dump() if t.price else None, t.max_cost_usd)

