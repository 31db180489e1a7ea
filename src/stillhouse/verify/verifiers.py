"""Verifiers: does a completion's answer match the reference? One call shape for all.

`get_verifier(name, options)` builds one from the `stillhouse.verifiers` registry (the
built-ins below register through entry points like a third party's), its options typed
and checked; `verifier(completion, reference)` answers a `Verdict`. A bad completion is
never an exception, only `ok=False` with a reason; a bad reference (a reference that is not
a number for `numeric`, an invalid per-item pattern for `regex`) is a data error and raises
StillhouseError.

A third party's entry point is a class (or factory) called with its validated `Options`
(a pydantic model, attribute `Options`; a plain dict when it declares none) that returns a
callable `(completion, reference) -> Verdict`; an integer attribute `concurrency` tells
`verify_many` how many items it may check at once.
"""

from __future__ import annotations

import math
import os
import re
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any, Callable, ClassVar, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from stillhouse.errors import StillhouseError
from stillhouse.registry import Registry, validate_options
from stillhouse.verify.extract import EXTRACTORS, get_extractor
from stillhouse.verify.sandbox import Limits, run_python


@dataclass(frozen=True)
class Verdict:
    """One verification: whether it passed, the answer that was compared, and why it failed ("" when ok)."""

    ok: bool
    extracted: str | None
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class VerifierOptions(BaseModel):
    """Base of every verifier's options: unknown options are errors, never silent defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    extract: str = Field("answer_line", description="which answer extractor reads the completion")

    @field_validator("extract")
    @classmethod
    def _known_extractor(cls, name: str) -> str:
        if name not in EXTRACTORS:
            raise ValueError(EXTRACTORS.unknown(name))
        return name


_NOTHING_EXTRACTED = {"answer_line": "no Answer: line", "last_number": "no number", "boxed": "no \\boxed{...}",
                      "whole": "empty completion", "python_block": "empty completion"}


class Verifier:
    """Base of the built-in verifiers: extract the answer with the chosen extractor, then `check` it."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[VerifierOptions]] = VerifierOptions
    concurrency: int = 1

    def __init__(self, options: VerifierOptions | None = None):
        self.options = options if options is not None else self.Options()
        self._extract = get_extractor(self.options.extract)

    def spec(self) -> dict[str, Any]:
        """Name and options, as results and cache keys record which verifier decided."""
        return {"verifier": self.name, "options": self.options.model_dump(mode="json")}

    def __call__(self, completion: str, reference: Any) -> Verdict:
        """Verify one completion against its reference."""
        if not isinstance(completion, str):
            return Verdict(False, None, f"no completion (got {type(completion).__name__})")
        try:
            answer = self._extract(completion)
        except Exception as e:  # noqa: BLE001 - a plug-in extractor's failure is this completion's verdict
            return Verdict(False, None, f"the {self.options.extract} extractor failed: {type(e).__name__}: {e}")
        if answer is None:
            return Verdict(False, None, _NOTHING_EXTRACTED.get(self.options.extract, "nothing extracted"))
        return self.check(answer, reference)

    def check(self, answer: str, reference: Any) -> Verdict:
        """Compare an extracted answer with the reference."""
        raise NotImplementedError


def _text_reference(verifier: str, reference: Any) -> str:
    if isinstance(reference, (str, int, float, Decimal, Fraction)) and not isinstance(reference, bool):
        return str(reference)
    raise StillhouseError(f"the {verifier} verifier needs a reference answer as text or a number, "
                          f"got {type(reference).__name__}: {reference!r}")


class ExactVerifier(Verifier):
    """`exact`: the extracted answer equals the reference once both are trimmed of surrounding whitespace."""

    name = "exact"

    def check(self, answer: str, reference: Any) -> Verdict:
        ref = _text_reference(self.name, reference).strip()
        if answer.strip() == ref:
            return Verdict(True, answer)
        return Verdict(False, answer, f"{answer.strip()!r} != {ref!r}")


def normalize_text(text: str, casefold: bool = True, strip_punctuation: bool = True) -> str:
    """The `normalized` verifier's form of a string, in this order:

    1. Unicode NFKC (full-width letters and digits become ASCII, ligatures split, ...);
    2. `str.casefold()` (lower case, and e.g. "ß" becomes "ss"), then NFKC again;
    3. runs of whitespace become one space;
    4. whitespace and Unicode punctuation (categories Pc Pd Ps Pe Pi Pf Po: . , ; : ! ? " ' * ( ) ...)
       are stripped from both ends, except that a leading "-" or "." directly before a digit
       is kept, so "-5" and ".5" stay numbers. Symbols such as $ + = are not punctuation
       (but % is: Unicode puts it in Po).
    Punctuation inside the text is kept.
    """
    text = unicodedata.normalize("NFKC", text)
    if casefold:
        text = unicodedata.normalize("NFKC", text.casefold())
    text = " ".join(text.split())
    if not strip_punctuation:
        return text
    start, end = 0, len(text)
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        if text[start] in "-." and start + 1 < end and text[start + 1].isdigit():
            break
        start += 1
    return text[start:end]


class NormalizedOptions(VerifierOptions):
    casefold: bool = True
    strip_punctuation: bool = True


class NormalizedVerifier(Verifier):
    """`normalized`: equality after `normalize_text` on both sides (NFKC, case, whitespace, surrounding punctuation)."""

    name = "normalized"
    Options = NormalizedOptions

    def check(self, answer: str, reference: Any) -> Verdict:
        o = self.options
        got = normalize_text(answer, o.casefold, o.strip_punctuation)
        want = normalize_text(_text_reference(self.name, reference), o.casefold, o.strip_punctuation)
        if got == want:
            return Verdict(True, answer)
        return Verdict(False, answer, f"{got!r} != {want!r} after normalising")


# A number as written in an answer: sign, thousands separators, decimals, an exponent, a
# fraction a/b, or LaTeX \frac{a}{b}; then an optional percent sign.
_PLAIN = r"(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER = re.compile(
    rf"(?P<sign>[-+])?\s*(?:\\[dt]?frac\{{\s*(?P<fn>{_PLAIN})\s*\}}\{{\s*(?P<fd>{_PLAIN})\s*\}}"
    rf"|(?P<num>{_PLAIN})(?:\s*/\s*(?P<den>{_PLAIN}))?)\s*(?P<pct>\\?%)?")
_MAX_EXPONENT = 1000  # "1e999999999" would take minutes to expand exactly


def _plain(s: str) -> Fraction:
    mantissa, _, exponent = s.replace(",", "").lower().partition("e")
    if exponent and abs(int(exponent)) > _MAX_EXPONENT:
        raise ValueError("exponent out of range")
    return Fraction(mantissa) * Fraction(10) ** int(exponent or 0)


def parse_number(text: str, percent: Literal["ignore", "fraction"] = "ignore") -> Fraction | None:
    """The exact value of a number written as an answer, or None when `text` is not one number.

    Accepts "42", "-3", "+3", "1,234", "1,234.5", ".5", "2.", "1e-3", "3/4", "\\frac{3}{4}",
    "\\dfrac{3}{4}", "12%" and "12\\%" (12, or 0.12 with percent="fraction"), after NFKC (so
    full-width digits), with a typographic minus, surrounding whitespace, `$` and `**`, and a
    trailing sentence punctuation mark (".", ",", ";", ":", "!", "?") allowed around it.
    """
    s = unicodedata.normalize("NFKC", text).replace("\u2212", "-").strip()
    s = s.rstrip(".,;:!?").strip().strip("$*").strip()
    m = _NUMBER.fullmatch(s)
    if m is None:
        return None
    try:
        if m["fn"] is not None:
            value = _plain(m["fn"]) / _plain(m["fd"])
        else:
            value = _plain(m["num"])
            if m["den"] is not None:
                value /= _plain(m["den"])
    except (ValueError, ZeroDivisionError):  # a zero denominator, or past int's digit limit
        return None
    if m["sign"] == "-":
        value = -value
    if m["pct"] and percent == "fraction":
        value /= 100
    return value


class NumericOptions(VerifierOptions):
    rel_tol: float = Field(1e-9, ge=0, description="relative tolerance, as in math.isclose")
    abs_tol: float = Field(0.0, ge=0, description="absolute tolerance, as in math.isclose")
    percent: Literal["ignore", "fraction"] = Field(
        "ignore", description='"12%" is 12 ("ignore": the sign is dropped) or 0.12 ("fraction")')


class NumericVerifier(Verifier):
    """`numeric`: both sides parse as numbers (`parse_number`) and agree within `rel_tol` / `abs_tol`.

    Values are exact fractions, so "0.30000000000000004" and "0.3" differ by exactly 4e-17
    and a float reference counts as the decimal it prints as; the test is math.isclose's,
    |a - b| <= max(rel_tol * max(|a|, |b|), abs_tol).
    """

    name = "numeric"
    Options = NumericOptions

    def _reference(self, reference: Any) -> Fraction:
        if isinstance(reference, bool):
            value = None
        elif isinstance(reference, float):
            value = Fraction(repr(reference)) if math.isfinite(reference) else None
        elif isinstance(reference, (int, Fraction, Decimal)):
            value = Fraction(reference) if not isinstance(reference, Decimal) or reference.is_finite() else None
        elif isinstance(reference, str):
            value = parse_number(reference, self.options.percent)
        else:
            value = None
        if value is None:
            raise StillhouseError(f"the numeric verifier's reference {reference!r} is not a finite number")
        return value

    def check(self, answer: str, reference: Any) -> Verdict:
        want = self._reference(reference)
        got = parse_number(answer, self.options.percent)
        if got is None:
            return Verdict(False, answer, f"{answer!r} is not a number")
        o = self.options
        if abs(got - want) <= max(Fraction(o.rel_tol) * max(abs(got), abs(want)), Fraction(o.abs_tol)):
            return Verdict(True, answer)
        return Verdict(False, answer, f"{answer!r} is not {reference!r} within rel_tol={o.rel_tol:g}, abs_tol={o.abs_tol:g}")


def check_pattern(pattern: str | None) -> str | None:
    """A pydantic validator's check that a regular expression compiles (None passes): the message names the error."""
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
    return pattern


class RegexOptions(VerifierOptions):
    pattern: str | None = Field(None, description="used for every item; without it, each item's reference is its pattern")
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        return check_pattern(pattern)


class RegexVerifier(Verifier):
    """`regex`: the extracted answer fully matches a pattern.

    The pattern is the `pattern` option when given (the reference is then ignored), else the
    item's reference: a string, or a mapping with a "pattern" key. Patterns come from the
    recipe or the data and are trusted; one that backtracks catastrophically is not stopped.
    """

    name = "regex"
    Options = RegexOptions

    def check(self, answer: str, reference: Any) -> Verdict:
        pattern = self.options.pattern
        if pattern is None:
            pattern = reference.get("pattern") if isinstance(reference, dict) else reference
        if not isinstance(pattern, str):
            raise StillhouseError(f"the regex verifier needs a pattern: give `pattern` in its options or one per item "
                                  f"(a string, or {{'pattern': ...}}), got {reference!r}")
        try:
            compiled = re.compile(pattern, re.IGNORECASE if self.options.ignore_case else 0)
        except re.error as e:
            raise StillhouseError(f"the regex verifier's pattern {pattern!r} is not a valid regular expression: {e}") from None
        if compiled.fullmatch(answer):
            return Verdict(True, answer)
        return Verdict(False, answer, f"{answer!r} does not fully match {pattern!r}")


class PythonTestsOptions(VerifierOptions):
    extract: str = "python_block"
    timeout_s: float = Field(5.0, gt=0, le=600, description="wall-clock limit per program")
    memory_mb: int = Field(512, ge=16, description="address-space limit (RLIMIT_AS)")
    cpu_s: int | None = Field(None, ge=1, description="CPU-time limit; default: timeout_s rounded up, plus one")
    file_size_mb: int = Field(16, ge=1, description="largest file, stdout and stderr included (RLIMIT_FSIZE)")
    max_processes: int = Field(64, ge=1, description="RLIMIT_NPROC, enforced where the child runs as nobody")
    concurrency: int = Field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)), ge=1,
                             description="programs verify_many runs at once")


class PythonTestsVerifier(Verifier):
    """`python_tests`: the completion's program, then the item's unit tests, run in the sandbox.

    The program is what the extractor returns (by default the last ```python block, else the
    whole text); the reference is the tests, Python source or a list of statements, run after
    the program in the same namespace. Passes when the tests run to the end without an
    exception. See `stillhouse.verify.sandbox` for what the sandbox guarantees.
    """

    name = "python_tests"
    Options = PythonTestsOptions

    def __init__(self, options: PythonTestsOptions | None = None):
        super().__init__(options)
        o = self.options
        self.concurrency = o.concurrency
        self.limits = Limits(timeout_s=o.timeout_s, memory_mb=o.memory_mb, cpu_s=o.cpu_s,
                             file_size_mb=o.file_size_mb, max_processes=o.max_processes)

    def check(self, answer: str, reference: Any) -> Verdict:
        if isinstance(reference, (list, tuple)) and all(isinstance(t, str) for t in reference):
            tests = "\n".join(reference)
        elif isinstance(reference, str):
            tests = reference
        else:
            raise StillhouseError(f"the python_tests verifier needs unit tests as Python source or a list of "
                                  f"statements, got {type(reference).__name__}")
        result = run_python(answer, tests, self.limits)
        return Verdict(result.ok, answer, result.reason)


VERIFIERS: Registry[Callable[..., Callable[[str, Any], Verdict]]] = Registry("stillhouse.verifiers", "verifier")


def _parse_options(name: str, model: type[BaseModel], options: dict | BaseModel | None) -> BaseModel:
    return validate_options(model, options, f"the {name} verifier")


def get_verifier(name: str, options: dict | BaseModel | None = None) -> Callable[[str, Any], Verdict]:
    """The verifier registered as `name`, built with `options` checked against its typed Options.

    An unknown name or option raises StillhouseError with "did you mean ..."; an option of the
    wrong type or value names the option.
    """
    factory = VERIFIERS.get(name)
    model = getattr(factory, "Options", None)
    if model is None:
        return factory(dict(options or {}))
    return factory(_parse_options(name, model, options))


def verify_many(verifier: Callable[[str, Any], Verdict], completions: Sequence[str], references: Sequence[Any],
                max_workers: int | None = None) -> list[Verdict]:
    """Verdicts for `completions[i]` against `references[i]`, in order.

    Up to `max_workers` (default: the verifier's `concurrency`, 1 when it has none) items are
    checked at once, in threads; python_tests spends them waiting on its subprocesses.
    """
    if len(completions) != len(references):
        raise ValueError(f"{len(completions)} completions but {len(references)} references")
    workers = max_workers or getattr(verifier, "concurrency", 1)
    if workers <= 1 or len(completions) <= 1:
        return [verifier(c, r) for c, r in zip(completions, references)]
    with ThreadPoolExecutor(min(workers, len(completions)), thread_name_prefix="verify") as pool:
        return list(pool.map(verifier, completions, references))
