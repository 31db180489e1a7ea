"""Named registries that third parties extend through Python entry points.

Stages, teacher backends, prompt sources, benchmarks and packaged models all resolve by
name here. Built-in entries register through the same entry-point groups a user's package
would use (see pyproject.toml), so nothing in the pipeline knows which package supplied
what; an unknown name is answered with "did you mean …" and the known names.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Callable, Generic, Iterator, TypeVar

from stillhouse.errors import StillhouseError

T = TypeVar("T")


class Registry(Generic[T]):
    """`name -> object`, filled by `register()` and, on first use, by the entry-point group `group`."""

    def __init__(self, group: str, kind: str):
        self.group, self.kind = group, kind
        self._items: dict[str, T] = {}
        self._from_entry_points: set[str] = set()
        self._loaded = False

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register `obj` under `name`; without `obj`, a decorator that does."""
        if obj is not None:
            self._items[name] = obj
            return obj

        def deco(o: T) -> T:
            self._items[name] = o
            return o

        return deco

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._items:
                try:
                    self._items[ep.name] = ep.load()
                    self._from_entry_points.add(ep.name)
                except Exception as e:  # a broken plug-in names itself instead of breaking every command
                    raise StillhouseError(f"the {self.kind} {ep.name!r} from entry point {ep.value!r} "
                                          f"({self.group}) failed to load: {type(e).__name__}: {e}") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[tuple[str, T]]:
        self._load()
        return iter(sorted(self._items.items()))

    def unknown(self, name: str) -> str:
        """The message for an unknown `name`: what it is, a close match, and the known names."""
        close = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.kind} {name!r}{hint} (known: {', '.join(self.names()) or 'none'})"

    def get(self, name: str) -> T:
        """The entry `name`; a StillhouseError saying "did you mean" when there is none."""
        self._load()
        if name not in self._items:
            raise StillhouseError(self.unknown(name))
        return self._items[name]

    def reset(self) -> None:
        """Forget what came from entry points; the next use reads them again (a plug-in installed at run time)."""
        for name in self._from_entry_points:
            self._items.pop(name, None)
        self._from_entry_points.clear()
        self._loaded = False



def validate_options(model, options, owner: str):
    """`options` (a mapping, or None for all defaults) validated by the pydantic `model` of `owner` (say "the hf
    backend"); a StillhouseError naming the option, with "did you mean" for an unknown one. Every registry whose
    entries take typed options (backends, methods, filters, verifiers) checks them here."""
    from pydantic import BaseModel, ValidationError

    if isinstance(options, model):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump()
    try:
        return model.model_validate(options or {})
    except ValidationError as e:
        err = e.errors()[0]
        opt = ".".join(str(p) for p in err["loc"]) or "options"
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), list(model.model_fields), n=1)
            raise StillhouseError(f"unknown option {opt!r} for {owner}" + (f"; did you mean {close[0]!r}?" if close else "")
                                  + f" (known: {', '.join(model.model_fields) or 'none'})") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise StillhouseError(f"option {opt!r} of {owner}: {msg} (got {err.get('input')!r})") from None
