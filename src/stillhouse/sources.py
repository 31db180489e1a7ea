"""Where prompts and benchmark items come from: a registered source by name, or a user's file.

A package registers a prompt source (`stillhouse.prompt_sources`: a function `(n, seed) ->
list of chat message lists`) or a benchmark (`stillhouse.benchmarks`: a function
`(n_per_family, seed) -> list of {family, prompt, answer}`) through an entry point; the tiny
demo world registers itself this way, like any user's package. Anything else is a path to a
JSONL or Parquet file, read with one clear error per bad row.
"""

from __future__ import annotations

import json
from pathlib import Path

from stillhouse.errors import StillhouseError
from stillhouse.registry import Registry

PROMPT_SOURCES: Registry = Registry("stillhouse.prompt_sources", "prompt source")
BENCHMARKS: Registry = Registry("stillhouse.benchmarks", "benchmark")


def check_source(value: str, registry: Registry) -> str:
    """A registered name or an existing file; ValueError naming both possibilities otherwise."""
    if value in registry or Path(value).is_file():
        return value
    if Path(value).is_dir():
        raise ValueError(f"{value!r} is a directory; give a .jsonl or .parquet file")
    looks_like_path = "/" in value or "." in value
    if looks_like_path:
        raise ValueError(f"file {value!r} does not exist")
    raise ValueError(registry.unknown(value) + ", and no file of that name exists")


def require_columns(path: str | Path, needed: tuple[str, ...]) -> None:
    """StillhouseError unless the Parquet file at `path` is readable and has at least one of the `needed` columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = Path(path)
    try:
        schema = pq.read_schema(p)
    except (pa.ArrowInvalid, OSError) as e:
        raise StillhouseError(f"{p}: not a readable Parquet file ({e})") from None
    if needed and not set(needed) & set(schema.names):
        raise StillhouseError(f"{p}: has none of the columns {', '.join(map(repr, needed))} "
                              f"(its columns: {', '.join(schema.names) or 'none'})")


def read_rows(path: str | Path, needed: tuple[str, ...] = ()) -> list[dict]:
    """The rows of a JSONL or Parquet file as dicts; StillhouseError naming the file and line on any bad row.

    `needed`: for Parquet, columns at least one of which must exist (checked before reading the rows).
    """
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        require_columns(p, needed)
        return pq.read_table(p).to_pylist()
    rows = []
    with open(p, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise StillhouseError(f"{p}:{n}: not UTF-8 text; a JSONL file is one JSON object per line") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise StillhouseError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise StillhouseError(f"{p}:{n}: each line must be a JSON object, not {type(row).__name__}")
            rows.append(row)
    return rows


def load_prompt_items(source: str, n: int | None, seed: int) -> list[dict]:
    """The prompt set as items `{messages, answer, family}` (answer and family None where unknown).

    A registered source returns chat message lists or such items; a file's rows have a `prompt` string or a
    `messages` list (a trailing assistant turn is dropped), and optionally an `answer` (a reference a verifier can
    check, for rejection sampling) and a `family`.
    """
    if source in PROMPT_SOURCES:
        raw = PROMPT_SOURCES.get(source)(n or 2000, seed)
        return [it if isinstance(it, dict) else {"messages": it, "answer": None, "family": None} for it in raw]
    out = []
    for i, row in enumerate(read_rows(source, ("prompt", "messages")), 1):
        msgs = row.get("messages")
        if isinstance(msgs, list) and msgs:
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in msgs):
                raise StillhouseError(f"{source}: row {i}: each message needs a 'role' and a 'content' string")
            msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
            if msgs[-1]["role"] == "assistant":
                msgs = msgs[:-1]
            if not msgs:
                raise StillhouseError(f"{source}: row {i}: 'messages' holds only an assistant turn")
        elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
            msgs = [{"role": "user", "content": row["prompt"]}]
        else:
            raise StillhouseError(f"{source}: row {i} has neither a non-empty 'prompt' string nor a 'messages' list")
        answer = row.get("answer")
        out.append({"messages": msgs, "answer": None if answer is None else str(answer),
                    "family": None if row.get("family") is None else str(row["family"])})
    if not out:
        raise StillhouseError(f"{source}: no prompts in the file")
    return out[:n] if n else out


def load_prompts(source: str, n: int | None, seed: int) -> list[list[dict]]:
    """The prompt set as chat message lists (see `load_prompt_items`)."""
    return [it["messages"] for it in load_prompt_items(source, n, seed)]


def load_benchmark(source: str, n_per_family: int, seed: int) -> list[dict]:
    """Items `{id, family, prompt, answer, identity}`: a registered benchmark, or a file of rows with `prompt`,
    `answer` and optionally `family` and `identity` (true: the answer states the teacher's identity, and each model
    is checked against its own declared one); at most `n_per_family` of each family."""
    if source in BENCHMARKS:
        items = BENCHMARKS.get(source)(n_per_family, seed)
    else:
        items, per = [], {}
        for i, row in enumerate(read_rows(source, ("prompt",)), 1):
            if not isinstance(row.get("prompt"), str) or "answer" not in row:
                raise StillhouseError(f"{source}: row {i}: each item needs a 'prompt' string and an 'answer'")
            fam = str(row.get("family", "all"))
            if per.get(fam, 0) < n_per_family:
                per[fam] = per.get(fam, 0) + 1
                items.append({"family": fam, "prompt": row["prompt"], "answer": str(row["answer"]),
                              "identity": bool(row.get("identity", False))})
    if not items:
        raise StillhouseError(f"benchmark {source!r} has no items")
    return [{"id": i, **it} for i, it in enumerate(items)]
