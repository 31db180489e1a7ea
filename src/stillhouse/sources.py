"""Where prompts and benchmark items come from: a registered source by name, or a user's file.

A package registers a prompt source (`stillhouse.prompt_sources`: a function `(n, seed) ->
list of chat message lists`) or a benchmark (`stillhouse.benchmarks`: a function
`(n_per_family, seed) -> list of {family, prompt, answer}`) through an entry point; the tiny
demo world registers itself this way, like any user's package. Anything else is a path to a
JSONL or Parquet file, read with one clear error per bad row, or, for a benchmark, a YAML task
file: each task its data, prompt template, extractor, verifier and few-shot examples.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from stillhouse.errors import StillhouseError
from stillhouse.registry import Registry
from stillhouse.yamlerrors import raise_validation

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


# -- benchmarks ---------------------------------------------------------------------------------------------------
TASK_FILE_SUFFIXES = (".yaml", ".yml")


def check_benchmark(value: str) -> str:
    """`check_source` for a benchmark; a task file (.yaml) is read and checked too (not its data rows)."""
    check_source(value, BENCHMARKS)
    if value not in BENCHMARKS and Path(value).suffix in TASK_FILE_SUFFIXES:
        load_task_file(value)
    return value


def _verifier_ref(v: Any) -> Any:
    return {"name": v} if isinstance(v, str) else v  # `verifier: numeric` is `verifier: {name: numeric}`


class FewShot(BaseModel):
    """One worked example, shown before the question as an earlier user turn and the assistant's reply."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(description="the user turn, exactly as shown")
    answer: str = Field(description="the assistant turn, exactly as shown: write it as the extractor reads answers, "
                                    "e.g. 'Answer: 4'")


class VerifierRef(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "exact"
    options: dict[str, Any] = Field(default_factory=dict)


class BenchmarkTask(BaseModel):
    """One task of a benchmark file: where its items come from, how they are asked, and how answers are checked."""

    model_config = ConfigDict(extra="forbid")
    data: str = Field(description="a .jsonl or .parquet file (relative to the task file) or a registered benchmark")
    family: str | None = Field(None, description="the task's name in results (default: each row's `family`, else the "
                                                 "data file's stem)")
    prompt: str = Field("{prompt}", description="the question, a str.format template over the row's fields")
    answer: str = Field("answer", description="the row field holding the reference the verifier checks against")
    extractor: str | None = Field(None, description="which answer extractor reads a reply (default: the verifier's "
                                                    "`extract` option, else answer_line)")
    verifier: VerifierRef = Field(default_factory=VerifierRef, description="a registered verifier: a name, or "
                                                                           "{name, options}")
    few_shot: list[FewShot] = Field(default_factory=list, description="worked examples shown before every question")
    judge: bool = Field(True, description="whether the pairwise judge compares answers to this task (false for open "
                                          "answers, or answers that name the model)")

    _verifier_shorthand = field_validator("verifier", mode="before")(classmethod(lambda cls, v: _verifier_ref(v)))

    @field_validator("data")
    @classmethod
    def _data(cls, v: str, info: ValidationInfo) -> str:
        if v in BENCHMARKS:
            return v
        p = Path(v) if Path(v).is_absolute() else Path((info.context or {}).get("base", ".")) / v
        if p.suffix in TASK_FILE_SUFFIXES:
            raise ValueError("a task's data is a .jsonl or .parquet file or a registered benchmark, not another "
                             "task file")
        if not p.is_file():
            raise ValueError(f"file {str(p)!r} does not exist, and no benchmark is registered as {v!r} "
                             f"(registered: {', '.join(BENCHMARKS.names()) or 'none'})")
        return str(p)

    @field_validator("prompt")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(v) if f is not None]
        except ValueError as e:
            raise ValueError(f"not a valid format template ({e}); write a literal brace as {{{{ or }}}}") from None
        if any(f == "" or f.isdigit() for f in fields):
            raise ValueError("name every field of the template after a row field, e.g. {question}")
        return v

    @field_validator("extractor")
    @classmethod
    def _extractor(cls, v: str | None) -> str | None:
        from stillhouse.verify import EXTRACTORS

        if v is not None and v not in EXTRACTORS:
            raise ValueError(EXTRACTORS.unknown(v))
        return v

    @field_validator("verifier")
    @classmethod
    def _verifier_builds(cls, v: VerifierRef, info: ValidationInfo) -> VerifierRef:
        from stillhouse.verify import get_verifier

        try:
            get_verifier(*resolve_verifier(v.name, v.options, info.data.get("extractor")))
        except StillhouseError as e:
            raise ValueError(str(e)) from None
        return v


class BenchmarkFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[BenchmarkTask] = Field(min_length=1)


def resolve_verifier(name: str, options: dict | None, extractor: str | None) -> tuple[str, dict]:
    """A verifier's name and options with the task's extractor as its `extract` option (when it has one)."""
    from stillhouse.verify import VERIFIERS

    options = dict(options or {})
    model = getattr(VERIFIERS.get(name), "Options", None)
    if model is not None and "extract" in model.model_fields:
        options["extract"] = extractor or options.get("extract") or "answer_line"
    return name, options


def load_task_file(path: str | Path) -> BenchmarkFile:
    """A benchmark task file, validated; StillhouseError naming the file, line and field on any problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        root, data = yaml.compose(text), yaml.safe_load(text)
    except UnicodeDecodeError:
        raise StillhouseError(f"{p}: not UTF-8 text; a task file is YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise StillhouseError(f"{p}{f':{mark.line + 1}' if mark else ''}: invalid YAML: "
                              f"{getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise StillhouseError(f"{p}: a task file is a YAML mapping with a `tasks` list")
    try:
        return BenchmarkFile.model_validate(data, context={"base": str(p.parent)})
    except ValidationError as e:
        raise_validation(e, root, str(p), BenchmarkFile, whole="tasks")


def benchmark_files(source: str) -> list[str]:
    """The files a benchmark's items are read from (none for a registered one): what a change to it changes."""
    if source in BENCHMARKS:
        return []
    if Path(source).suffix in TASK_FILE_SUFFIXES:
        return [source, *dict.fromkeys(t.data for t in load_task_file(source).tasks if t.data not in BENCHMARKS)]
    return [source]


def _item(raw: dict, where: str) -> dict:
    """A benchmark item in the one form evaluate reads: a registered benchmark's item may leave out everything but
    family, prompt and answer."""
    if not isinstance(raw.get("prompt"), str) or "answer" not in raw:
        raise StillhouseError(f"{where}: each item needs a 'prompt' string and an 'answer'")
    verifier = _verifier_ref(raw.get("verifier") or "exact")
    if not isinstance(verifier, dict) or not isinstance(verifier.get("name"), str):
        raise StillhouseError(f"{where}: 'verifier' must be a verifier name or {{name, options}}")
    name, options = resolve_verifier(verifier["name"], verifier.get("options"), raw.get("extractor"))
    extractor = raw.get("extractor") or options.get("extract") or "answer_line"
    identity = bool(raw.get("identity", False))
    messages = raw.get("messages") or [{"role": "user", "content": raw["prompt"]}]
    return {"family": str(raw.get("family") or "all"), "prompt": raw["prompt"], "messages": messages,
            "answer": str(raw["answer"]), "reference": raw.get("reference", raw["answer"]), "identity": identity,
            "verifier": {"name": name, "options": options}, "extractor": extractor,
            "judge": bool(raw.get("judge", not identity))}


def _task_items(task: BenchmarkTask, n_per_family: int, seed: int, source: str, i: int) -> list[dict]:
    rows = BENCHMARKS.get(task.data)(n_per_family, seed) if task.data in BENCHMARKS else read_rows(task.data)
    shots = [m for s in task.few_shot for m in ({"role": "user", "content": s.prompt},
                                                 {"role": "assistant", "content": s.answer})]
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{task.data}: row {n} (tasks.{i} of {source})"
        if task.answer not in row:
            raise StillhouseError(f"{where}: no {task.answer!r} field (the task's `answer`; the row has: "
                                  f"{', '.join(row) or 'nothing'})")
        try:
            prompt = task.prompt.format_map(row)
        except KeyError as e:
            raise StillhouseError(f"{where}: the prompt template needs the field {e.args[0]!r} (the row has: "
                                  f"{', '.join(row)})") from None
        family = task.family or row.get("family") or Path(task.data).stem
        out.append(_item({"family": family, "prompt": prompt, "answer": row[task.answer],
                          "reference": row[task.answer], "identity": row.get("identity", False),
                          "messages": [*shots, {"role": "user", "content": prompt}],
                          "verifier": task.verifier.model_dump(), "extractor": task.extractor,
                          "judge": task.judge and not row.get("identity", False)}, where))
    return out


def load_benchmark(source: str, n_per_family: int, seed: int) -> list[dict]:
    """The benchmark's items, at most `n_per_family` of each family, each as

    `{id, family, prompt, messages, answer, reference, identity, verifier: {name, options}, extractor, judge}`:
    `prompt` is the question (the last user turn of `messages`, which holds any few-shot turns before it), `answer`
    the reference as text and `reference` what the verifier is given; `identity` true means the answer states the
    teacher's identity and each model is checked against its own declared one; `judge` whether the pairwise judge
    compares answers to it.

    `source` is a registered benchmark (its items may carry `verifier`, `extractor`, `reference` and `judge`; by
    default exact match of the `Answer:` line), a task file (.yaml: see `BenchmarkTask`), or a JSONL / Parquet file
    of rows with `prompt`, `answer` and optionally `family` and `identity`, checked by exact match.
    """
    if source in BENCHMARKS:
        raw = BENCHMARKS.get(source)(n_per_family, seed)
        items = [_item(it, f"benchmark {source!r}: item {n}") for n, it in enumerate(raw, 1)]
    elif Path(source).suffix in TASK_FILE_SUFFIXES:
        items = [it for i, t in enumerate(load_task_file(source).tasks)
                 for it in _task_items(t, n_per_family, seed, source, i)]
    else:
        items = []
        for i, row in enumerate(read_rows(source, ("prompt",)), 1):
            if not isinstance(row.get("prompt"), str) or "answer" not in row:
                raise StillhouseError(f"{source}: row {i}: each item needs a 'prompt' string and an 'answer'")
            items.append(_item({"family": str(row.get("family", "all")), "prompt": row["prompt"],
                                "answer": str(row["answer"]), "identity": row.get("identity", False)}, source))
    per: dict[str, int] = {}
    kept = []
    for it in items:
        if per.get(it["family"], 0) < n_per_family:
            per[it["family"]] = per.get(it["family"], 0) + 1
            kept.append(it)
    if not kept:
        raise StillhouseError(f"benchmark {source!r} has no items")
    return [{"id": i, **it} for i, it in enumerate(kept)]
