"""Extractors and verifiers on tricky strings; the registries' errors; the evaluate stage's original pair."""

from __future__ import annotations

from fractions import Fraction

import pytest

from stillhouse.errors import StillhouseError
from stillhouse.verify import (
    EXTRACTORS,
    VERIFIERS,
    Verdict,
    exact_match,
    extract_answer,
    get_extractor,
    get_verifier,
    normalize_text,
    parse_number,
    verify_many,
)


@pytest.mark.parametrize("text, expected", [
    ("Answer: 1\nmore thought\nAnswer: 2", "2"),
    ("<think>so Answer: 3</think>\nAnswer: 4", "4"),
    ("<think>Answer: 3</think>\nno final line", None),
    ("Answer:   Paris.  ", "Paris."),
    ("no answer here", None),
    ("<think>a</think>\nAnswer: 12", "12"),
])
def test_answer_line(text, expected):
    assert get_extractor("answer_line")(text) == expected
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("the answer is 1,234.", "1,234"),
    ("x = -5", "-5"),
    ("from 2 we get \u22127", "-7"),  # typographic minus
    ("pages 3-5", "5"),
    ("about 12.5% of 40", "40"),
    ("a share of 12.5%", "12.5%"),
    ("it is -3/4", "-3/4"),
    ("\uff11\uff12\uff13 apples", "123"),  # full-width digits
    ("<think>42</think> none after", None),
    ("1e-3 then", "1e-3"),
])
def test_last_number(text, expected):
    assert get_extractor("last_number")(text) == expected


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{1} first, then \boxed{ {2} }", "{2}"),
    (r"\boxed{7} and a truncated \boxed{\frac{1}{", "7"),
    ("no box", None),
])
def test_boxed(text, expected):
    assert get_extractor("boxed")(text) == expected


def test_whole_and_python_block():
    assert get_extractor("whole")("<think>x</think>\n  all of it \n") == "all of it"
    assert get_extractor("whole")("<think>x</think>  ") is None
    text = "first\n```python\na = 1\n```\nthen\n```py\nb = 2\n```\n```bash\nls\n```\n"
    assert get_extractor("python_block")(text) == "b = 2\n"
    assert get_extractor("python_block")("def f():\n    return 1") == "def f():\n    return 1"


def test_exact_trims_but_keeps_punctuation():
    v = get_verifier("exact")
    assert v("Answer:  42 ", "42") == Verdict(True, "42", "")
    verdict = v("Answer: 42.", "42")
    assert not verdict.ok and verdict.extracted == "42." and "'42.' != '42'" in verdict.reason
    assert v("no final line", "42").reason == "no Answer: line"


def test_exact_match_and_extract_answer_keep_their_behaviour():
    assert exact_match("<think>Answer: 3</think>\nAnswer: 4", "4")
    assert exact_match("Answer: Atlas ", " Atlas")
    assert not exact_match("Answer: 4", "4x")
    assert not exact_match("nothing", "4")
    assert extract_answer("Answer:\n42") == "42"  # \s* after "Answer:" crosses a newline, as it always did


@pytest.mark.parametrize("text, expected", [
    ("  **Paris.**  ", "paris"),
    ("\u201cNew   York\u201d!", "new york"),
    ("\uff11\uff12\uff13", "123"),  # full-width digits under NFKC
    ("\uff30\uff41\uff52\uff49\uff53", "paris"),  # full-width letters
    ("STRASSE", "strasse"),
    ("Stra\u00dfe", "strasse"),  # casefold, not lower
    ("-5.", "-5"),
    (".5", ".5"),
    ("(a, b)", "a, b"),
    ("$5%", "$5"),  # $ is a symbol (Sc) and stays; % is punctuation (Po)
])
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_normalized_verifier():
    v = get_verifier("normalized")
    assert v("Answer: **PARIS**.", "Paris").ok
    assert v("Answer: \uff14\uff12", "42").ok
    assert not v("Answer: -5", "5").ok
    strict = get_verifier("normalized", {"casefold": False, "strip_punctuation": False})
    assert strict("Answer: \uff30aris", "Paris").ok  # NFKC always applies
    assert not strict("Answer: paris", "Paris").ok
    assert not strict("Answer: Paris.", "Paris").ok


@pytest.mark.parametrize("text, expected", [
    ("42", Fraction(42)),
    ("-3", Fraction(-3)),
    ("\u22123", Fraction(-3)),
    ("+3", Fraction(3)),
    ("1,234.", Fraction(1234)),
    ("1,234.5", Fraction(12345, 10)),
    ("3/4", Fraction(3, 4)),
    ("-\\frac{1}{2}", Fraction(-1, 2)),
    ("\\dfrac{3}{4}", Fraction(3, 4)),
    ("$12$", Fraction(12)),
    ("**7**", Fraction(7)),
    ("12%", Fraction(12)),
    (".5", Fraction(1, 2)),
    ("1e-3", Fraction(1, 1000)),
    ("\uff14\uff12", Fraction(42)),
    ("1,23", None),
    ("3 or 4", None),
    ("1/0", None),
    ("1e999999999", None),
    ("forty-two", None),
])
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_numeric_tolerances_and_forms():
    v = get_verifier("numeric")
    assert v(f"Answer: {0.1 + 0.2}", "0.3").ok  # 0.30000000000000004
    assert v(f"Answer: {0.1 + 0.2}", 0.3).ok
    assert not v("Answer: 0.31", "0.3").ok
    assert v("Answer: 3/4", 0.75).ok
    assert v("Answer: -1,234", -1234).ok
    assert not v("Answer: 1234", -1234).ok
    assert get_verifier("numeric", {"abs_tol": 0.02})("Answer: 0.31", "0.3").ok
    assert get_verifier("numeric", {"rel_tol": 0.1})("Answer: 105", 100).ok
    assert v("Answer: 50%", 50).ok
    assert get_verifier("numeric", {"percent": "fraction"})("Answer: 50%", 0.5).ok
    assert get_verifier("numeric", {"extract": "last_number"})("so the answer is 1,234.", 1234).ok
    assert get_verifier("numeric", {"extract": "boxed"})(r"thus \boxed{\frac{1}{2}}", "0.5").ok
    verdict = v("Answer: about forty", 40)
    assert not verdict.ok and verdict.reason == "'about forty' is not a number"
    with pytest.raises(StillhouseError, match="not a finite number"):
        v("Answer: 1", "one")


def test_regex_full_match_not_partial():
    v = get_verifier("regex", {"pattern": r"\d+"})
    assert v("Answer: 42", None).ok
    verdict = v("Answer: 42 apples", None)
    assert not verdict.ok and "does not fully match" in verdict.reason
    assert v("Answer: 42", "ignored when the options give a pattern").ok
    per_item = get_verifier("regex", {"ignore_case": True})
    assert per_item("Answer: Paris", r"paris|lyon").ok
    assert per_item("Answer: LYON", {"pattern": r"paris|lyon"}).ok
    assert not per_item("Answer: Parisian", r"paris|lyon").ok
    with pytest.raises(StillhouseError, match="needs a pattern"):
        per_item("Answer: x", None)
    with pytest.raises(StillhouseError, match="not a valid regular expression"):
        per_item("Answer: x", "(")


def test_a_bad_completion_is_a_verdict_never_an_exception():
    for name in ("exact", "normalized", "numeric", "regex"):
        v = get_verifier(name)
        verdict = v(None, "1")
        assert verdict == Verdict(False, None, "no completion (got NoneType)")
        assert v("", "1").reason == "no Answer: line"
    assert get_verifier("numeric", {"extract": "boxed"})("no box", 1).reason == "no \\boxed{...}"


def test_unknown_verifier_says_did_you_mean():
    with pytest.raises(StillhouseError, match=r"unknown verifier 'numerc'; did you mean 'numeric'\?"):
        get_verifier("numerc")
    assert {"exact", "normalized", "numeric", "regex", "python_tests"} <= set(VERIFIERS.names())
    assert {"answer_line", "last_number", "boxed", "whole", "python_block"} <= set(EXTRACTORS.names())


def test_option_typos_name_the_option():
    with pytest.raises(StillhouseError, match=r"unknown option 'rel_tl' for the numeric verifier; did you mean 'rel_tol'\?"):
        get_verifier("numeric", {"rel_tl": 0.1})
    with pytest.raises(StillhouseError, match=r"option 'extract' of the exact verifier: unknown answer extractor 'boxd'; "
                                              r"did you mean 'boxed'\?"):
        get_verifier("exact", {"extract": "boxd"})
    with pytest.raises(StillhouseError, match=r"option 'abs_tol' of the numeric verifier"):
        get_verifier("numeric", {"abs_tol": -1})
    with pytest.raises(StillhouseError, match=r"option 'pattern' of the regex verifier: not a valid regular expression"):
        get_verifier("regex", {"pattern": "(unclosed"})


def test_a_third_party_verifier_registers_by_name():
    class Options(get_verifier("exact").Options):
        suffix: str = "!"

    class Shouted:
        def __init__(self, options):
            self.options = options

        def __call__(self, completion, reference):
            return Verdict(completion == reference + self.options.suffix, completion)

    Shouted.Options = Options
    VERIFIERS.register("shouted", Shouted)
    try:
        v = get_verifier("shouted", {"suffix": "!!"})
        assert v("hi!!", "hi").ok and not v("hi!", "hi").ok
        with pytest.raises(StillhouseError, match="did you mean 'suffix'"):
            get_verifier("shouted", {"sufix": "?"})
    finally:
        VERIFIERS._items.pop("shouted")


def test_verify_many_keeps_order_and_checks_lengths():
    v = get_verifier("exact")
    completions = [f"Answer: {i}" for i in range(20)]
    references = [str(i if i % 3 else -1) for i in range(20)]
    assert [d.ok for d in verify_many(v, completions, references, max_workers=4)] == [bool(i % 3) for i in range(20)]
    assert verify_many(v, completions, references) == verify_many(v, completions, references, max_workers=4)
    with pytest.raises(ValueError, match="2 completions but 1 references"):
        verify_many(v, ["a", "b"], ["a"])


def test_spec_records_name_and_options():
    v = get_verifier("numeric", {"abs_tol": 0.5})
    assert v.spec() == {"verifier": "numeric",
                        "options": {"extract": "answer_line", "rel_tol": 1e-9, "abs_tol": 0.5, "percent": "ignore"}}
