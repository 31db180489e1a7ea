"""Teacher backends: one small protocol, registered by name.

A backend turns chat requests into completions. Built-in backends register below; a third
party adds one with a `stillhouse.teachers` entry point whose value is a factory taking
`(model: str, options: dict)`. A teacher spec in a recipe is `NAME:MODEL`, e.g.
`hf:/models/Qwen2.5-7B-Instruct` or `openai:gpt-4o-mini`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterator, Protocol


@dataclass(frozen=True)
class Request:
    """One completion to make: a conversation, sampling parameters, and which sample of it."""

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


class Backend(Protocol):
    """The protocol every teacher backend implements."""

    name: str
    model: str

    def generate(self, requests: list[Request], progress: Callable[[int], None] | None = None,
                 admit: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Completion | Exception]]:
        """Yield `(index into requests, completion)` in any order, each admitted request exactly once.

        `admit(i)`, when given, is asked before request i is started; a False stops new work.
        A request that failed for good is yielded with the exception in place of a completion.
        """
        ...

    def close(self) -> None: ...


_REGISTRY: dict[str, Callable[[str, dict], Backend]] = {}


def register(name: str) -> Callable:
    """Decorator: register a backend factory under `name`."""

    def deco(factory: Callable[[str, dict], Backend]) -> Callable[[str, dict], Backend]:
        _REGISTRY[name] = factory
        return factory

    return deco


def _load_entry_points() -> None:
    for ep in entry_points(group="stillhouse.teachers"):
        _REGISTRY.setdefault(ep.name, ep.load())


def known_backends() -> list[str]:
    _load_entry_points()
    return sorted(_REGISTRY)


def parse_spec(spec: str) -> tuple[str, str]:
    """Split `NAME:MODEL`; raise ValueError naming what is wrong."""
    name, sep, model = spec.partition(":")
    if not sep or not name or not model:
        raise ValueError(f"teacher spec {spec!r} must look like BACKEND:MODEL, e.g. hf:/path/to/model or openai:gpt-4o-mini")
    if name not in known_backends():
        close = difflib.get_close_matches(name, known_backends(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known_backends())}"
        raise ValueError(f"unknown teacher backend {name!r} in {spec!r}{hint}")
    return name, model


def load_backend(spec: str, options: dict | None = None) -> Backend:
    """Build the backend named by a `NAME:MODEL` spec."""
    name, model = parse_spec(spec)
    return _REGISTRY[name](model, options or {})


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Split a leading `<think>...</think>` block from a completion: (reasoning, rest)."""
    if text.startswith("<think>") and "</think>" in text:
        head, _, rest = text.partition("</think>")
        return head[len("<think>"):], rest.lstrip("\n")
    return None, text


@register("hf")
def _hf(model: str, options: dict) -> Backend:
    from stillhouse.teachers.hf import HFBackend  # imported on use: torch is slow to import

    return HFBackend(model, options)


@register("openai")
def _openai(model: str, options: dict) -> Backend:
    from stillhouse.teachers.openai_backend import OpenAIBackend

    return OpenAIBackend(model, options)
