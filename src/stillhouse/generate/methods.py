"""Generation methods: how the teacher's data is made, each registered by name with typed options.

- `responses`: the teacher answers the prompt set, n samples per prompt;
- `reasoning`: the same, keeping the teacher's reasoning (a `<think>` block or the API's
  reasoning field) in its own column and in the student's answer as a `<think>` block;
- `rejection`: k samples per prompt, kept when a verifier accepts them (first or all), with
  each prompt's pass rate recorded;
- `self_instruct`: seed tasks → the teacher proposes new ones → a ROUGE-L novelty filter
  (MinHash LSH candidates, as in Alpaca but not quadratic) → the teacher answers them;
- `evol_instruct`: each prompt rewritten deeper, broader or with an added constraint; failed
  evolutions dropped; the teacher answers the evolved prompts.

Every call goes through the ledger (`stillhouse.calls`), tagged with the method and the hash
of its template, so a method's requests never share a cache entry with another's. A third
party registers a method through the `stillhouse.generation_methods` entry-point group.
All prompt templates here are stillhouse's own.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from stillhouse.calls import CallBatch, Ledger, ModelRef, call_models
from stillhouse.calls.ledger import CachedCall
from stillhouse.errors import StillhouseError
from stillhouse.registry import Registry
from stillhouse.rundir import tagged_hash
from stillhouse.teachers import Request

METHODS: Registry = Registry("stillhouse.generation_methods", "generation method")


class MethodOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class Sample:
    """One training sample: the conversation, the teacher call that answered it, and method-specific columns."""

    messages: list[dict]
    request: Request
    key: str
    call: CachedCall
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodResult:
    samples: list[Sample]
    counts: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenContext:
    """What a method works with: the recipe's generation settings, the teacher, the ledger, the prompt items."""

    recipe: Any
    teacher: ModelRef
    ledger: Ledger
    items: list[dict]
    ledger_path: Path
    stats: dict[str, float] = field(default_factory=lambda: {"cache_hits": 0, "calls_made": 0, "call_seconds": 0.0})

    def request(self, messages, *, sample_index: int = 0, **override) -> Request:
        g = self.recipe.generation
        params = {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p, "seed": g.seed, **override}
        return Request(messages=tuple(messages), sample_index=sample_index, **params)

    def call(self, reqs: list[Request], tag: dict, label: str) -> CallBatch:
        """The teacher's answers to `reqs`, every one through the ledger; stops the stage if any is missing."""
        g = self.recipe.generation
        batch = call_models(self.teacher, reqs, self.ledger, stage="generate", label=label, tag=tag,
                            batch=g.batch if g.mode == "batch" else None)
        self.stats["cache_hits"] += batch.cache_hits
        self.stats["calls_made"] += batch.made
        self.stats["call_seconds"] += batch.seconds
        batch.raise_if_incomplete("generate", self.ledger_path, self.teacher.max_cost_usd)
        return batch


def tag_of(method: str, template: str, step: str = "answer") -> dict:
    """What the cache key records of how a request was made: the method, its step, its template's hash."""
    return {"method": method, "step": step, "template": tagged_hash(template)}


def _answered(ctx: GenContext, reqs: list[Request], tag: dict, label: str, columns=None) -> list[Sample]:
    batch = ctx.call(reqs, tag, label)
    out = []
    for i, r in enumerate(reqs):
        call = batch.calls[batch.keys[i]]
        out.append(Sample([*r.messages, {"role": "assistant", "content": call.completion.text}], r, batch.keys[i], call,
                          {"prompt_template_hash": tag["template"], **(columns[i] if columns else {})}))
    return out


def _references(items: list[dict], k: int) -> list[dict]:
    """Per request (k per item): the prompt's reference answer and family, kept so curation's verifier gate can check."""
    return [{"reference_answer": it.get("answer"), "family": it.get("family")} for it in items for _ in range(k)]


# -- responses --------------------------------------------------------------------------------------------------
class ResponsesOptions(MethodOptions):
    pass


class Responses:
    """The teacher answers each prompt verbatim, `generation.samples_per_prompt` times."""

    name = "responses"
    Options = ResponsesOptions
    TEMPLATE = "{prompt}"

    def run(self, ctx: GenContext, opts: MethodOptions) -> MethodResult:
        k = ctx.recipe.generation.samples_per_prompt
        reqs = [ctx.request(it["messages"], sample_index=j) for it in ctx.items for j in range(k)]
        samples = _answered(ctx, reqs, tag_of(self.name, self.TEMPLATE), "generate", _references(ctx.items, k))
        return MethodResult(samples, {"prompts": len(ctx.items)})


# -- reasoning --------------------------------------------------------------------------------------------------
class ReasoningOptions(MethodOptions):
    format: Literal["think_tags", "separate"] = Field(
        "think_tags", description="think_tags: the student learns `<think>reasoning</think>` before the answer; "
                                  "separate: the answer alone, the reasoning only in its column")
    require_reasoning: bool = Field(True, description="drop samples where the teacher gave no reasoning")


class Reasoning:
    """Answers with the teacher's reasoning kept: from a leading `<think>` block or the API's reasoning field."""

    name = "reasoning"
    Options = ReasoningOptions
    TEMPLATE = "{prompt}"

    def run(self, ctx: GenContext, opts: ReasoningOptions) -> MethodResult:
        from stillhouse.teachers import split_reasoning

        k = ctx.recipe.generation.samples_per_prompt
        reqs = [ctx.request(it["messages"], sample_index=j) for it in ctx.items for j in range(k)]
        kept, missing = [], 0
        for s in _answered(ctx, reqs, tag_of(self.name, self.TEMPLATE), "generate", _references(ctx.items, k)):
            c = s.call.completion
            in_text, answer = split_reasoning(c.text)
            reasoning = in_text if in_text is not None else c.reasoning
            if not reasoning:
                missing += 1
                if opts.require_reasoning:
                    continue
            content = answer if opts.format == "separate" or not reasoning else f"<think>{reasoning}</think>\n{answer}"
            s.messages[-1] = {"role": "assistant", "content": content}
            s.columns["reasoning"] = reasoning
            kept.append(s)
        return MethodResult(kept, {"prompts": len(ctx.items), "without_reasoning": missing,
                                   "dropped_without_reasoning": missing if opts.require_reasoning else 0})


# -- rejection sampling -----------------------------------------------------------------------------------------
class RejectionOptions(MethodOptions):
    k: int = Field(4, ge=1, le=256, description="samples drawn per prompt")
    keep: Literal["first", "all"] = Field("first", description="keep the first verified sample of a prompt, or all")
    verifier: str = Field("exact", description="a registered verifier (stillhouse.verify)")
    verifier_options: dict[str, Any] = Field(default_factory=dict)


class Rejection:
    """k samples per prompt, each checked by a verifier against the prompt's reference answer; only passes kept."""

    name = "rejection"
    Options = RejectionOptions
    TEMPLATE = "{prompt}"

    def run(self, ctx: GenContext, opts: RejectionOptions) -> MethodResult:
        from stillhouse.verify import get_verifier, verify_many

        if ctx.recipe.generation.temperature <= 0 and opts.k > 1:
            raise StillhouseError("generation.temperature: rejection sampling draws k samples of a prompt, which are "
                                  "identical at temperature 0; set a temperature above 0")
        lacking = sum(it.get("answer") is None for it in ctx.items)
        if lacking:
            raise StillhouseError(f"prompts.source: {lacking} of {len(ctx.items)} prompts have no reference 'answer' "
                                  "for the verifier to check; rejection sampling needs one per prompt")
        verifier = get_verifier(opts.verifier, opts.verifier_options)
        reqs = [ctx.request(it["messages"], sample_index=j) for it in ctx.items for j in range(opts.k)]
        samples = _answered(ctx, reqs, tag_of(self.name, self.TEMPLATE), "generate (rejection sampling)",
                            _references(ctx.items, opts.k))
        verdicts = verify_many(verifier, [s.call.completion.text for s in samples],
                               [it["answer"] for it in ctx.items for _ in range(opts.k)])
        kept, passed_per_prompt = [], []
        for p, it in enumerate(ctx.items):
            group = list(zip(samples[p * opts.k:(p + 1) * opts.k], verdicts[p * opts.k:(p + 1) * opts.k]))
            passed = [s for s, v in group if v.ok]
            rate = len(passed) / opts.k
            passed_per_prompt.append(rate)
            for s in passed[:1] if opts.keep == "first" else passed:
                s.columns.update(verified=True, pass_rate=rate)
                kept.append(s)
        n = len(ctx.items)
        by_family: dict[str, list[float]] = {}
        for it, rate in zip(ctx.items, passed_per_prompt):
            by_family.setdefault(it.get("family") or "all", []).append(rate)
        return MethodResult(kept, {
            "prompts": n, "drawn": len(samples), "passed": sum(v.ok for v in verdicts),
            "prompts_with_a_pass": sum(r > 0 for r in passed_per_prompt),
            "mean_pass_rate": round(sum(passed_per_prompt) / n, 4) if n else None,
            "pass_rate_by_family": {f: round(sum(v) / len(v), 4) for f, v in sorted(by_family.items())}})


# -- self-instruct ----------------------------------------------------------------------------------------------
SEED_TASKS = Path(__file__).parent / "seed_tasks.jsonl"

PROPOSE_TEMPLATE = """Come up with {m} new tasks that a helpful assistant could be asked to do. Make them diverse: \
different verbs, topics and kinds of answer (explanations, lists, rewriting, classification, calculation, short \
writing). Each task is an instruction, optionally with an input it applies to. Follow the format of the examples.

{examples}

Now write {m} new tasks, numbered {start} to {end}, in exactly this format."""


class SelfInstructOptions(MethodOptions):
    seeds: str | None = Field(None, description="a JSONL of seed tasks ({instruction, input}); default: ours")
    n_instructions: int = Field(100, ge=1, description="how many new instructions to keep")
    per_request: int = Field(8, ge=1, le=50, description="new tasks asked for in each request")
    examples: int = Field(4, ge=1, le=20, description="tasks shown as examples in each request (seeds and new ones)")
    max_requests: int | None = Field(None, ge=1, description="give up after this many requests (default 4x needed)")
    novelty_threshold: float = Field(0.7, gt=0, le=1, description="drop a task whose ROUGE-L to a kept one exceeds this")
    temperature: float = Field(1.0, ge=0, le=2, description="the teacher's temperature when proposing tasks")
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    answer_prompts: bool = Field(False, description="also answer the recipe's prompt set (`prompts`), as the "
                                                    "`responses` method would, beside the new tasks")


def _read_seeds(path: str | None) -> list[dict]:
    from stillhouse.sources import read_rows

    rows = read_rows(path or SEED_TASKS, ("instruction",))
    seeds = []
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("instruction"), str) or not r["instruction"].strip():
            raise StillhouseError(f"{path or SEED_TASKS}: row {i}: each seed task needs a non-empty 'instruction'")
        seeds.append({"instruction": r["instruction"].strip(), "input": str(r.get("input") or "").strip()})
    return seeds


def format_task(n: int, task: dict) -> str:
    text = f"{n}. Instruction: {task['instruction']}"
    return text + (f"\n   Input: {task['input']}" if task.get("input") else "")


_TASK = re.compile(r"^\s*(\d+)[.)]\s*Instruction:\s*(.+?)\s*$")
_INPUT = re.compile(r"^\s*Input:\s*(.*?)\s*$")


def parse_tasks(text: str) -> list[dict]:
    """The numbered `Instruction:` / `Input:` tasks in a teacher's reply (an `Input:` of none or `<noinput>` is empty)."""
    tasks: list[dict] = []
    for line in text.splitlines():
        if m := _TASK.match(line):
            tasks.append({"instruction": m.group(2), "input": ""})
        elif tasks and (m := _INPUT.match(line)) and not tasks[-1]["input"]:
            value = m.group(1)
            tasks[-1]["input"] = "" if value.lower() in ("", "none", "<noinput>", "n/a") else value
    return tasks


def task_prompt(task: dict) -> str:
    return task["instruction"] + (f"\n\n{task['input']}" if task.get("input") else "")


class SelfInstruct:
    """Seed tasks → the teacher proposes new ones → novelty filter → the teacher answers the kept ones."""

    name = "self_instruct"
    Options = SelfInstructOptions

    def run(self, ctx: GenContext, opts: SelfInstructOptions) -> MethodResult:
        from stillhouse.novelty import NoveltyFilter

        seeds = _read_seeds(opts.seeds)
        novelty = NoveltyFilter(threshold=opts.novelty_threshold)
        for s in seeds:  # as in Alpaca, novelty is judged on the instruction alone, not its input
            novelty.keep(s["instruction"])
        kept: list[dict] = []
        budget = opts.max_requests or 4 * -(-opts.n_instructions // opts.per_request)
        counts = {"requests": 0, "proposed": 0, "unparsed_replies": 0, "too_short_or_long": 0, "not_novel": 0}
        tag = tag_of(self.name, PROPOSE_TEMPLATE, "propose")
        r = 0
        while len(kept) < opts.n_instructions and r < budget:
            # one round: as many requests as should fill what is missing, each with its own examples
            want = -(-(opts.n_instructions - len(kept)) // opts.per_request)
            reqs = [self._propose(ctx, opts, seeds, kept, r + j) for j in range(min(want, budget - r))]
            r += len(reqs)
            counts["requests"] += len(reqs)
            batch = ctx.call(reqs, tag, "self-instruct: propose")
            for j in range(len(reqs)):
                tasks = parse_tasks(batch.completion(j).text)
                counts["unparsed_replies"] += not tasks
                for t in tasks:
                    counts["proposed"] += 1
                    words = len(task_prompt(t).split())
                    if not opts.min_words <= words <= opts.max_words:
                        counts["too_short_or_long"] += 1
                    elif not novelty.add(t["instruction"]):
                        counts["not_novel"] += 1
                    elif len(kept) < opts.n_instructions:
                        kept.append(t)
        if not kept and not opts.answer_prompts:  # with the prompt set answered too, the run goes on without them
            raise StillhouseError(f"self_instruct: the teacher proposed no usable new task in {counts['requests']} "
                                  "requests; check that it follows the numbered 'Instruction:' format")
        reqs = [ctx.request([{"role": "user", "content": task_prompt(t)}]) for t in kept]
        none = {"reference_answer": None, "family": None} if opts.answer_prompts else {}
        samples = _answered(ctx, reqs, tag_of(self.name, "{instruction}\n\n{input}"), "self-instruct: answer",
                            [{"instruction": t["instruction"], "input": t["input"], **none} for t in kept]) if kept else []
        if opts.answer_prompts:  # the prompt set too, keyed exactly as the responses method keys it
            k = ctx.recipe.generation.samples_per_prompt
            preqs = [ctx.request(it["messages"], sample_index=j) for it in ctx.items for j in range(k)]
            samples += _answered(ctx, preqs, tag_of(Responses.name, Responses.TEMPLATE), "generate",
                                 [{"instruction": None, "input": None, **r} for r in _references(ctx.items, k)])
            counts["prompts"] = len(ctx.items)
        return MethodResult(samples, {**counts, "kept_instructions": len(kept), "seeds": len(seeds)})

    @staticmethod
    def _propose(ctx: GenContext, opts: SelfInstructOptions, seeds: list[dict], kept: list[dict], r: int) -> Request:
        rng = random.Random(f"{ctx.recipe.generation.seed}:self_instruct:{r}")
        # mostly seeds, some of the machine's own tasks once there are any (Alpaca mixes them the same way)
        n_new = min(len(kept), opts.examples // 3)
        shown = rng.sample(seeds, min(len(seeds), opts.examples - n_new)) + rng.sample(kept, n_new)
        examples = "\n".join(format_task(i + 1, t) for i, t in enumerate(shown))
        text = PROPOSE_TEMPLATE.format(m=opts.per_request, examples=examples, start=len(shown) + 1,
                                       end=len(shown) + opts.per_request)
        return ctx.request([{"role": "user", "content": text}], sample_index=r, temperature=opts.temperature,
                           max_tokens=max(ctx.recipe.generation.max_tokens, 64 * opts.per_request))


# -- evol-instruct ----------------------------------------------------------------------------------------------
EVOLUTIONS = {
    "deepen": "Rewrite the task below so that answering it takes more steps of reasoning, while it stays "
              "self-contained and answerable. Reply with the rewritten task and nothing else.\n\nTask:\n{prompt}",
    "broaden": "Write a new task in the same domain as the task below, about a different and less common topic, "
               "of similar length and difficulty. Reply with the new task and nothing else.\n\nTask:\n{prompt}",
    "constrain": "Rewrite the task below by adding exactly one more constraint or requirement that the answer must "
                 "meet. Reply with the rewritten task and nothing else.\n\nTask:\n{prompt}",
}
_REFUSAL = re.compile(r"\b(I'm sorry|I am sorry|I cannot|I can't|as an AI)\b", re.IGNORECASE)


class EvolInstructOptions(MethodOptions):
    evolutions: list[Literal["deepen", "broaden", "constrain"]] = Field(
        default_factory=lambda: ["deepen", "broaden", "constrain"], min_length=1)
    rounds: int = Field(1, ge=1, le=5, description="evolutions applied one after another")
    keep_original: bool = Field(False, description="also answer the original prompts")
    max_growth: float = Field(4.0, gt=1, description="an evolved prompt longer than this times its parent has failed")
    temperature: float = Field(0.7, ge=0, le=2)


def failed_evolution(parent: str, child: str, max_growth: float) -> str | None:
    """Why an evolved prompt is unusable, or None: empty, unchanged, a refusal, runaway length, or the template
    leaking into it."""
    c = child.strip()
    if not c:
        return "empty"
    if " ".join(c.lower().split()) == " ".join(parent.lower().split()):
        return "unchanged"
    if _REFUSAL.search(c):
        return "refusal"
    if len(c) > max_growth * max(len(parent), 20):
        return "too long"
    if re.search(r"(?im)^\s*(task|rewritten task|new task)\s*:", c) or "Reply with the" in c:
        return "template leaked"
    return None


class EvolInstruct:
    """Each prompt evolved (deeper, broader, or constrained), failed evolutions dropped, the rest answered."""

    name = "evol_instruct"
    Options = EvolInstructOptions

    def run(self, ctx: GenContext, opts: EvolInstructOptions) -> MethodResult:
        current = [{"prompt": it["messages"][-1]["content"], "chain": [], "root": i} for i, it in enumerate(ctx.items)]
        failures: dict[str, int] = {}
        for rnd in range(opts.rounds):
            reqs, kinds = [], []
            for c in current:
                rng = random.Random(f"{ctx.recipe.generation.seed}:evol:{rnd}:{c['root']}")
                kind = rng.choice(opts.evolutions)
                kinds.append(kind)
                reqs.append(ctx.request([{"role": "user", "content": EVOLUTIONS[kind].format(prompt=c["prompt"])}],
                                        temperature=opts.temperature))
            batch = ctx.call(reqs, tag_of(self.name, json.dumps(EVOLUTIONS, sort_keys=True), "evolve"),
                             f"evol-instruct: round {rnd + 1}")
            survivors = []
            for j, c in enumerate(current):
                child = batch.completion(j).text.strip()
                why = failed_evolution(c["prompt"], child, opts.max_growth)
                if why:
                    failures[why] = failures.get(why, 0) + 1
                    continue
                survivors.append({"prompt": child, "chain": [*c["chain"], kinds[j]], "root": c["root"]})
            current = survivors
        prompts = [(c["prompt"], {"evolved_from": ctx.items[c["root"]]["messages"][-1]["content"],
                                  "evolutions": ",".join(c["chain"])}) for c in current]
        if opts.keep_original:
            prompts += [(it["messages"][-1]["content"], {"evolved_from": None, "evolutions": ""}) for it in ctx.items]
        reqs = [ctx.request([{"role": "user", "content": p}]) for p, _ in prompts]
        samples = _answered(ctx, reqs, tag_of(self.name, "{prompt}"), "evol-instruct: answer", [c for _, c in prompts])
        return MethodResult(samples, {"prompts": len(ctx.items), "evolved": len(current),
                                      "failed_evolutions": sum(failures.values()), "failed_by_reason": failures})


def method_options(name: str, options: dict | None) -> MethodOptions:
    """Validate a method's options; ValueError naming the option on any problem."""
    from stillhouse.registry import validate_options

    if name not in METHODS:
        raise ValueError(METHODS.unknown(name))
    try:
        return validate_options(METHODS.get(name).Options, options, f"the {name} method")
    except StillhouseError as e:
        raise ValueError(str(e)) from None
