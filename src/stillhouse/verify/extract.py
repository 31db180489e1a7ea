"""Answer extractors: which part of a completion a verifier compares.

An extractor is `(text: str) -> str | None`, None meaning "no answer found". Extractors
register by name in the `stillhouse.extractors` entry-point group (the built-ins below
exactly as a third party's would), and every verifier picks one with its `extract` option.

Every built-in looks only at the text after the last `</think>`, so a reasoning block never
supplies the answer. A `<think>` left unclosed (a truncated completion) is not stripped:
that is how `extract_answer` has always behaved and evaluate results depend on it.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Callable

from stillhouse.registry import Registry

Extractor = Callable[[str], "str | None"]

EXTRACTORS: Registry[Extractor] = Registry("stillhouse.extractors", "answer extractor")

_ANSWER = re.compile(r"Answer:\s*(.*?)\s*$", re.MULTILINE)

# A sign counts only where it cannot be a hyphen or an operator between two operands
# ("pages 3-5" ends in 5, "x = -5" in -5); U+2212 is the typographic minus models emit.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])[-+\u2212])?"
    r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:/\d+)?(?:[eE][-+]?\d+)?%?"
)

_FENCE = re.compile(r"^[ \t]*```[ \t]*(?:python3?|py)[ \t]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)


def _after_think(text: str) -> str:
    return text.split("</think>")[-1]


def answer_line(text: str) -> str | None:
    """The text after the last `Answer:` outside the think block, trimmed; None if there is none."""
    found = _ANSWER.findall(_after_think(text))
    return found[-1].strip() if found else None


def last_number(text: str) -> str | None:
    """The last number: a sign, thousands separators, decimals, a fraction `a/b`, an exponent, a `%`.

    Read from the NFKC form of the text, so full-width digits count; returned as written
    there ("1,234", "-3/4", "12.5%"). `numeric` parses it; `exact` compares it verbatim.
    """
    found = _NUMBER.findall(unicodedata.normalize("NFKC", _after_think(text)))
    return found[-1].replace("\u2212", "-") if found else None


def boxed(text: str) -> str | None:
    """The content of the last top-level `\\boxed{...}`, braces balanced (so `\\boxed{\\frac{1}{2}}` works)."""
    text = _after_think(text)
    last, i = None, 0
    while (start := text.find("\\boxed{", i)) >= 0:
        depth, j = 0, start + len("\\boxed")
        for j in range(j, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                break
        if depth != 0:  # unclosed: a truncated completion has no boxed answer there
            break
        last, i = text[start + len("\\boxed{"):j].strip(), j + 1
    return last


def whole(text: str) -> str | None:
    """The whole completion after the think block, trimmed; None when that is empty."""
    return _after_think(text).strip() or None


def python_block(text: str) -> str | None:
    """The last fenced ```python (or py, python3) block; the whole text when there is none."""
    blocks = _FENCE.findall(_after_think(text))
    return blocks[-1] if blocks else whole(text)


def get_extractor(name: str) -> Extractor:
    """The extractor registered as `name`; a StillhouseError saying "did you mean" when there is none."""
    return EXTRACTORS.get(name)
