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


def generate(recipe: Recipe, run: RunDir, force: bool = False) -> dict:
    """Run the generate stage (skipped if finished with the same inputs unless `force`)."""
    config = {"teacher": recipe.teacher.model_dump(), "prompts": recipe.prompts.model_dump(),
              "generation": recipe.generation.model_dump(), "method": "responses"}
    inputs = {"prompts": recipe.prompts.source if recipe.prompts.source == "world" else hash_path(recipe.prompts.source)}
    if not force and run.is_done("generate", inputs, config):
        console.print("generate: already finished, skipping (use --force to redo)")
        return run.manifest("generate")
    started = run.begin("generate")
    prompts = load_prompts(recipe.prompts)
    g = recipe.generation
    reqs = [Request(messages=tuple(m), max_tokens=g.max_tokens, temperature=g.temperature, top_p=g.top_p, seed=g.seed,
                    sample_index=k) for m in prompts for k in range(g.samples_per_prompt)]
    backend = load_backend(recipe.teacher.spec, recipe.teacher.options)
    template_hash = tagged_hash({"method": "responses", "template": RESPONSES_TEMPLATE})
    rows: list[dict | None] = [None] * len(reqs)
    t0, tokens = time.time(), 0
    with progress_bar("generate", len(reqs)) as advance:
        done = 0

        def tick(n: int) -> None:
            nonlocal done
            done += n
            advance(n, tokens=f"{tokens:,}", rate=f"{done / max(time.time() - t0, 1e-9):.1f}/s")

        for i, c in backend.generate(reqs, progress=tick):
            r = reqs[i]
            tokens += c.prompt_tokens + c.completion_tokens
            rows[i] = {
                "messages": [*r.messages, {"role": "assistant", "content": c.text}],
                "reasoning": c.reasoning, "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                "teacher_backend": backend.name, "teacher_model": recipe.teacher.spec.split(":", 1)[1],
                "reported_model": c.model, "system_fingerprint": c.system_fingerprint,
                "sampling_params": json.dumps(r.params(), sort_keys=True), "sample_index": r.sample_index,
                "prompt_template_hash": template_hash, "ledger_key": request_key(backend.name, backend.model, r),
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
    backend.close()
    run.generated.parent.mkdir(parents=True, exist_ok=True)
    tmp = run.generated.with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(run.generated)
    counts = {"samples": len(rows), "prompts": len(prompts), "truncated": sum(r["finish_reason"] == "length" for r in rows),
              "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
              "completion_tokens": sum(r["completion_tokens"] for r in rows)}
    return run.finish("generate", started, inputs, config, {"generated": run.generated}, counts)
