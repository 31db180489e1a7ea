"""Model backends: one small protocol, typed options, registered by name.

A backend turns chat requests into completions, for a teacher, a judge, a student being
evaluated or a suspect being audited. A spec is `NAME:MODEL`, e.g. `hf:/models/Qwen2.5-7B`
or `openai:gpt-4o-mini`. Built-in backends register through the `stillhouse.teachers`
entry-point group like a third party's: the entry point's value is a class (or factory)
called as `(model: str, options: Options)` whose `Options` attribute is a pydantic model of
its options. Options marked `transport` say how to reach the model (endpoint, concurrency,
timeouts, batch size), never what it answers: they stay out of cache keys and stage configs.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from pydantic import BaseModel, ConfigDict, Field

from stillhouse.errors import StillhouseError
from stillhouse.registry import Registry, validate_options


@dataclass(frozen=True)
class Request:
    """One completion to make: a conversation, sampling parameters, and which sample of it.

    `seed` is the recipe's; the call layer hands backends a per-request seed derived from it
    and the request's cache key, so a sampled answer never depends on batching or order.
    """

    messages: tuple[dict, ...]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    sample_index: int = 0

    def params(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}


@dataclass
class Completion:
    """What a backend returned for one request."""

    text: str
    reasoning: str | None
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    model: str
    system_fingerprint: str | None = None
    extra: dict = field(default_factory=dict)


class CallFailed(Exception):
    """A request that failed on every attempt; `reason` says why (never includes a key). `billed` is the (prompt,
    completion) tokens the provider said it charged for the failed attempts (a 200 with no usable answer)."""

    def __init__(self, index: int, reason: str, attempts: int, billed: tuple[int, int] = (0, 0)):
        super().__init__(reason)
        self.index, self.reason, self.attempts, self.billed = index, reason, attempts, tuple(billed)


def Transport(default: Any = None, **kw: Any) -> Any:
    """A backend option that says how to reach the model, not what it answers."""
    return Field(default, json_schema_extra={"transport": True}, **kw)


class BackendOptions(BaseModel):
    """Base of every backend's options: unknown options are errors, never silent defaults."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def transport_fields(cls) -> set[str]:
        return {n for n, f in cls.model_fields.items() if (f.json_schema_extra or {}).get("transport")}

    def answer_options(self) -> dict[str, Any]:
        """The options that can change an answer (everything but transport), as cache keys record them."""
        return self.model_dump(mode="json", exclude=self.transport_fields())


class Backend(Protocol):
    """The protocol every backend implements."""

    name: str
    model: str

    def generate(self, requests: list[Request], progress: Callable[[int], None] | None = None,
                 admit: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Completion | Exception]]:
        """Yield `(index into requests, completion)` in any order, each admitted request exactly once.

        `admit(i)`, when given, is asked before request i is started; a False stops new work.
        A request that failed for good is yielded with a `CallFailed` in place of a completion.
        """
        ...

    def close(self) -> None: ...


BACKENDS: Registry = Registry("stillhouse.teachers", "teacher backend")


def known_backends() -> list[str]:
    return BACKENDS.names()


def parse_spec(spec: str) -> tuple[str, str]:
    """Split `NAME:MODEL`; raise ValueError naming what is wrong."""
    name, sep, model = spec.partition(":")
    if not sep or not name or not model:
        raise ValueError(f"teacher spec {spec!r} must look like BACKEND:MODEL, e.g. hf:/path/to/model or openai:gpt-4o-mini")
    if name not in BACKENDS:
        close = difflib.get_close_matches(name, known_backends(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known_backends())}"
        raise ValueError(f"unknown teacher backend {name!r} in {spec!r}{hint}")
    return name, model


def options_model(name: str) -> type[BackendOptions] | None:
    """The typed options of backend `name` (None for a plug-in that declares none)."""
    return getattr(BACKENDS.get(name), "Options", None)


def parse_options(name: str, options: dict | BaseModel | None) -> BaseModel | dict:
    """Validate `options` for backend `name`; ValueError naming the option on any problem."""
    model = options_model(name)
    if isinstance(options, BaseModel) or model is None:
        return options if options is not None else {}
    try:
        return validate_options(model, options, f"the {name} backend")
    except StillhouseError as e:
        raise ValueError(str(e)) from None


def answer_identity(spec: str, options: dict | None) -> dict[str, Any]:
    """What determines a backend's answers besides the request: the model's identity (for a local
    model, its weights too) and every non-transport option. Cache keys and stage configs use it."""
    name, model = parse_spec(spec)
    factory = BACKENDS.get(name)
    opts = parse_options(name, options)
    ident = getattr(factory, "answer_identity", None)
    if ident is not None:
        return ident(model, opts)
    extra = opts.answer_options() if isinstance(opts, BackendOptions) else dict(opts)
    return {"backend": name, "model": model, "options": extra}


def load_backend(spec: str, options: dict | None = None) -> Backend:
    """Build the backend named by a `NAME:MODEL` spec, its options validated."""
    try:
        name, model = parse_spec(spec)
        opts = parse_options(name, options)
    except ValueError as e:
        raise StillhouseError(str(e)) from None
    return BACKENDS.get(name)(model, opts)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split a leading `<think>...</think>` block from a completion: (reasoning, rest)."""
    if text.startswith("<think>") and "</think>" in text:
        head, _, rest = text.partition("</think>")
        return head[len("<think>"):], rest.lstrip("\n")
    return None, text
