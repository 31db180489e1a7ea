"""Curation: filters over generated rows, resolved by name, each with typed options.

A filter is a class registered in the `stillhouse.filters` entry-point group (the built-in
ones exactly as a third party's, see pyproject.toml). It declares `Options`, a pydantic model
that forbids unknown fields, and implements one call:

    apply(rows: list[dict], ctx: CurateContext) -> FilterResult

Rows are generate's: an OpenAI chat `messages` list (the user prompt(s), then the teacher's
answer) plus provenance columns. A filter keeps, drops (with a reason), rewrites (counted,
with a reason) or adds rows, and may report findings (which evaluation items were
contaminated). `ctx` carries what filters need from the run: the evaluation prompts, the
student's declared identity, the teacher's, the seed.

The novelty filter (`novelty.py`) and the dataset card (`card.py`) live beside the filters.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable

from pydantic import BaseModel, ConfigDict

from stillhouse.errors import StillhouseError
from stillhouse.identity import Identity
from stillhouse.registry import Registry, validate_options

FILTERS: Registry = Registry("stillhouse.filters", "filter")


@dataclass
class CurateContext:
    """What filters may need from the run.

    `eval_prompts` maps an evaluation set's name (the run's benchmark, a user's eval file) to
    its prompts, in order, so a contaminated item is named by set and index. `identity` is
    the student's declared identity; `teacher` the teacher's when the recipe declares one
    (known vendors are recognised without it).
    """

    eval_prompts: dict[str, list[str]] = field(default_factory=dict)
    identity: Identity | None = None
    teacher: Identity | None = None
    seed: int = 0


@dataclass
class FilterResult:
    """What one filter did: the rows kept (rewritten and added ones included), the rows dropped with why,
    how many kept rows it changed (`changes`: how many per reason), how many it added, and its findings."""

    kept: list[dict]
    dropped: list[tuple[dict, str]] = field(default_factory=list)
    changed: int = 0
    changes: dict[str, int] = field(default_factory=dict)
    added: int = 0
    report: dict[str, Any] = field(default_factory=dict)

    def drop_reasons(self) -> dict[str, int]:
        """How many rows were dropped for each reason, most frequent first."""
        return dict(Counter(reason for _, reason in self.dropped).most_common())

    def summary(self) -> dict[str, Any]:
        """Counts and findings as JSON-ready data (for the stage's results and the dataset card)."""
        return {"kept": len(self.kept), "dropped": len(self.dropped), "changed": self.changed, "added": self.added,
                "drop_reasons": self.drop_reasons(), "change_reasons": dict(self.changes), **self.report}


class FilterOptions(BaseModel):
    """Base of every filter's options: an unknown option is an error that names it."""

    model_config = ConfigDict(extra="forbid")


class Filter:
    """Base of the built-in filters; a plug-in needs only `Options`, a constructor taking them, and `apply`."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[FilterOptions]] = FilterOptions

    def __init__(self, options: FilterOptions | dict | None = None):
        self.options = options if isinstance(options, FilterOptions) else self.Options.model_validate(options or {})

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        """Keep, drop (with a reason), rewrite (counted, with a reason) or add rows; never modify `rows` in place."""
        raise NotImplementedError


def parse_options(name: str, options: dict | BaseModel | None) -> BaseModel:
    """Validate `options` for filter `name`; a StillhouseError naming the option (and a close match) if wrong."""
    return validate_options(getattr(FILTERS.get(name), "Options", FilterOptions), options, f"the {name} filter")


def make_filter(name: str, options: dict | BaseModel | None = None) -> Filter:
    """The filter `name` with validated `options`; "did you mean" for an unknown name or option."""
    f = FILTERS.get(name)(parse_options(name, options))
    if not getattr(f, "name", ""):
        f.name = name
    return f


def parse_filters(spec: Iterable[str | dict]) -> list[Filter]:
    """Filters from a recipe's list: each item a name (`exact_dedup`) or a one-key mapping
    (`{near_dedup: {threshold: 0.8}}`), applied in the order given."""
    out = []
    for i, item in enumerate(spec):
        if isinstance(item, str):
            out.append(make_filter(item))
        elif isinstance(item, dict) and len(item) == 1:
            (name, opts), = item.items()
            if opts is not None and not isinstance(opts, dict):
                raise StillhouseError(f"filters[{i}]: the options of {name!r} must be a mapping, not {opts!r}")
            out.append(make_filter(name, opts))
        else:
            raise StillhouseError(f"filters[{i}]: expected a filter name or {{name: {{options}}}}, got {item!r}")
    return out


def apply_filters(rows: list[dict], filters: Iterable[Filter],
                  ctx: CurateContext) -> tuple[list[dict], list[tuple[str, FilterResult]]]:
    """Run `filters` in order, each on what the last kept; the rows left and each filter's result."""
    results = []
    for f in filters:
        res = f.apply(rows, ctx)
        results.append((f.name, res))
        rows = res.kept
    return rows, results


# -- reading rows -------------------------------------------------------------------------------------------------

def prompt_text(row: dict) -> str:
    """The row's prompt: its user turns' text, joined by blank lines."""
    return "\n\n".join(_text(m) for m in row.get("messages") or [] if m.get("role") == "user")


def answer_text(row: dict) -> str | None:
    """The teacher's answer: the last assistant turn's text; None if the row has none."""
    for m in reversed(row.get("messages") or []):
        if m.get("role") == "assistant":
            return _text(m)
    return None


def _text(message: dict) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def map_assistant(row: dict, fn) -> dict:
    """A copy of `row` with `fn` applied to every assistant turn's text (and the `reasoning` column, if text)."""
    messages = [{**m, "content": fn(m["content"])} if m.get("role") == "assistant" and isinstance(m.get("content"), str)
                else m for m in row.get("messages") or []]
    out = {**row, "messages": messages}
    if isinstance(row.get("reasoning"), str):
        out["reasoning"] = fn(row["reasoning"])
    return out
