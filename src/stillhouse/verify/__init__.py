"""Answer extraction and verifiers: the final `Answer:` line, compared exactly."""

from __future__ import annotations

import re

_ANSWER = re.compile(r"Answer:\s*(.*?)\s*$", re.MULTILINE)


def extract_answer(text: str) -> str | None:
    """The text after the last `Answer:` in a completion, or None if there is none."""
    found = _ANSWER.findall(text.split("</think>")[-1])
    return found[-1].strip() if found else None


def exact_match(completion: str, answer: str) -> bool:
    """True when the completion's final answer equals `answer` (whitespace-trimmed)."""
    got = extract_answer(completion)
    return got is not None and got == answer.strip()
