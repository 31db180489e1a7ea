"""Verification: extract an answer from a completion and decide whether it is right.

Extractors (`extract.py`) pick the answer out of a completion; verifiers (`verifiers.py`)
compare it with the reference; the sandbox (`sandbox.py`) runs a completion's program and
an item's unit tests for `python_tests`. Verifiers and extractors resolve by name through
the `stillhouse.verifiers` and `stillhouse.extractors` entry-point groups:

    verifier = get_verifier("numeric", {"extract": "last_number", "abs_tol": 1e-6})
    verdict = verifier("... so the answer is 1,234.", "1234")   # Verdict(ok=True, extracted='1,234', reason='')
    verdicts = verify_many(verifier, completions, references)

`extract_answer` and `exact_match` are the evaluate stage's original pair, now the
`answer_line` extractor and the `exact` verifier.
"""

from __future__ import annotations

from functools import cache

from stillhouse.verify.extract import EXTRACTORS, Extractor, answer_line, get_extractor
from stillhouse.verify.sandbox import Limits, SandboxResult, run_python
from stillhouse.verify.verifiers import (
    VERIFIERS,
    ExactVerifier,
    Verdict,
    Verifier,
    VerifierOptions,
    get_verifier,
    normalize_text,
    parse_number,
    verify_many,
)

__all__ = [
    "EXTRACTORS", "VERIFIERS", "Extractor", "Limits", "SandboxResult", "Verdict", "Verifier", "VerifierOptions",
    "exact_match", "extract_answer", "get_extractor", "get_verifier", "normalize_text", "parse_number",
    "run_python", "verify_many",
]


def extract_answer(text: str) -> str | None:
    """The text after the last `Answer:` in a completion (outside the think block), or None if there is none."""
    return answer_line(text)


@cache
def _exact() -> ExactVerifier:
    return ExactVerifier(ExactVerifier.Options(extract="answer_line"))


def exact_match(completion: str, answer: str) -> bool:
    """True when the completion's final answer equals `answer` (whitespace-trimmed)."""
    return _exact()(completion, answer).ok
