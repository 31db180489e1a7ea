"""Pydantic validation errors of a YAML file, as one line a user reads: the file, the line, the field, what is wrong.

Recipes (`recipe.py`) and benchmark task files (`sources.py`) both report through here, so the two
say the same thing the same way. Pydantic reports every problem of a document; we report one, and
an unknown key first (a misspelt field is also reported missing, and the misspelling is the cause).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import yaml
from pydantic import BaseModel, ValidationError

from stillhouse.errors import StillhouseError


def line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    node, line = root, None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    return node.start_mark.line + 1 if node is not None else line


def key_line(root: yaml.Node | None, loc: tuple) -> int | None:
    """Like `line_of`, but for an unknown key returns the line of the key itself."""
    node = root
    for i, key in enumerate(loc):
        if not isinstance(node, yaml.MappingNode):
            return line_of(root, loc)
        pair = next(((k, v) for k, v in node.value if k.value == key), None)
        if pair is None:
            return line_of(root, loc[:i])
        if i == len(loc) - 1:
            return pair[0].start_mark.line + 1
        node = pair[1]
    return line_of(root, loc)


def model_args(ann) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation such as `X | None` or `list[X]`."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in getattr(ann, "__args__", ()) or () for m in model_args(a)]


def model_at(loc: tuple, model: type[BaseModel]) -> type[BaseModel]:
    """The pydantic model that holds the field at `loc + (field,)` (list indexes skipped)."""
    for key in loc:
        if isinstance(key, int) or key not in model.model_fields:
            continue
        for cand in model_args(model.model_fields[key].annotation):
            model = cand
            break
    return model


def known_fields(loc: tuple, model: type[BaseModel]) -> list[str]:
    """The field names a mapping at `loc` may hold."""
    return [f for f in model_at(loc, model).model_fields if f != "extensions"]


def pick(errors: list[dict]) -> dict:
    """The one error to report: an unknown key first, else the first."""
    return next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])


def describe(err: dict, root: yaml.Node | None, source: str, model: type[BaseModel], prefix: tuple = (),
             extra_known: Callable[[], list[str]] | None = None, whole: str = "recipe") -> str:
    """One line for one pydantic error: `SOURCE:LINE: FIELD: what is wrong`.

    `prefix`: where in the document `model` was validated (a plug-in's section); `extra_known`: more names allowed
    at the top level (listed for an unknown top-level key); `whole`: what a document-wide rule is called."""
    loc = prefix + tuple(err["loc"])
    field = ".".join(str(p) for p in loc) or whole
    line = key_line(root, loc) if err["type"] == "extra_forbidden" else line_of(root, loc)
    where = f"{source}:{line}" if line else source
    msg = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    if err["type"] == "extra_forbidden":
        known = known_fields(tuple(err["loc"])[:-1], model)
        if extra_known is not None and not prefix and len(loc) == 1:
            known = known + extra_known()
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        msg = f"unknown key{f'; did you mean {close[0]!r}?' if close else ''} (known: {', '.join(known)})"
    elif err["type"] == "missing":
        msg = "required field is missing"
    elif err["type"] == "model_type":  # a scalar or a list where a section of keys belongs
        section = model_at(tuple(err["loc"]), model)
        required = [n for n, f in section.model_fields.items() if f.is_required()]
        example = f", e.g. {{{required[0]}: {got!r}}}" if required and isinstance(got, str) else ""
        msg = (f"must be a mapping of keys ({', '.join(required or section.model_fields)}{'' if not required else ', ...'})"
               f"{example}, not a {_kind(got)}")
    elif "input" in err and not isinstance(got, dict) and repr(got) not in msg:
        msg = f"{msg} (got {got!r})"
    return f"{where}: {field}: {msg}"


def raise_validation(e: ValidationError, root: yaml.Node | None, source: str, model: type[BaseModel],
                     prefix: tuple = (), extra_known: Callable[[], list[str]] | None = None,
                     whole: str = "recipe") -> None:
    """Raise the StillhouseError that reports `e` (see `describe`)."""
    raise StillhouseError(describe(pick(e.errors()), root, source, model, prefix, extra_known, whole)) from None


def _kind(v: Any) -> str:
    return {str: "string", int: "number", float: "number", bool: "boolean", list: "list"}.get(type(v), type(v).__name__)
