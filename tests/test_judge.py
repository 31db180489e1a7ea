"""The pairwise judge: reading verdicts, both orders and the tie rule, and what is reported about the judge itself,
with scripted judges (tests/scripted.py): one that always says A, one that judges right, one that always fails."""

from __future__ import annotations

import itertools
import json

import pytest

from stillhouse.calls import Ledger, ModelRef
from stillhouse.errors import StillhouseError
from stillhouse.evaluate import evaluate_models, judge_ref
from stillhouse.evaluate.judge import NO_ANSWER, PairJudgement, shown_answer
from stillhouse.evaluate.judge_prompt import JUDGE_TEMPLATE, judge_prompt, parse_judgement
from stillhouse.recipe import EvaluateSpec, parse_recipe
from stillhouse.sources import load_benchmark


def test_the_template_is_pinned():
    """The embedded teacher is trained on this exact text: a change is a change of the judge."""
    assert JUDGE_TEMPLATE == "Question: {question}\nA: {a}\nB: {b}\nWhich is right: A, B or tie? Score both 1-10."
    assert judge_prompt("Q?", "x", "y") == "Question: Q?\nA: x\nB: y\nWhich is right: A, B or tie? Score both 1-10."


@pytest.mark.parametrize("text, expected", [
    ("<think>A is right. Scores: A 9, B 2.</think>\nAnswer: A", ("A", (9, 2))),
    ("Scores: A 3, B 8\nAnswer: B", ("B", (3, 8))),
    ("answer: TIE", ("tie", None)),
    ("Verdict: **B**", ("B", None)),
    ("Score: A=7/10; B=3/10\nAnswer: A", ("A", (7, 3))),
    ("<think>Answer: A</think>\nno verdict after it", (None, None)),  # a verdict inside the think block is not one
    ("Answer: A\nOn reflection...\nAnswer: B", ("B", None)),  # the last verdict line counts
    ("I prefer A.", (None, None)),  # no verdict line
    ("Answer: Apple", (None, None)),  # a word starting with A is not a verdict
    ("Scores: A 11, B 2\nAnswer: A", ("A", None)),  # scores out of 1-10 are not read
    ("Scores: A 0, B 2\nAnswer: B", ("B", None)),
    ("", (None, None)),
])
def test_parse_judgement(text, expected):
    assert parse_judgement(text) == expected


VERDICTS = ["A", "B", "tie", None]


@pytest.mark.parametrize("mf, tf", list(itertools.product(VERDICTS, VERDICTS)))
def test_both_orders_agree_or_it_is_a_tie(mf, tf):
    """With the model's answer as A, 'A' is the model's win; with the teacher's as A, 'B' is. Agreement across the
    swap is the verdict; anything else, an unreadable verdict included, is a tie."""
    j = PairJudgement(mf, tf)
    model_view = {"A": "win", "B": "loss", "tie": "tie", None: None}
    teacher_view = {"A": "loss", "B": "win", "tie": "tie", None: None}
    agree = model_view[mf] is not None and model_view[mf] == teacher_view[tf]
    assert j.consistent == agree
    assert j.outcome == (model_view[mf] if agree else "tie")
    assert j.row()["outcome"] == j.outcome and j.row()["model_first"] == mf and j.row()["teacher_first"] == tf


def test_scores_are_summed_over_both_orders_from_each_side():
    j = PairJudgement("A", "B", (8, 3), (4, 9))  # model first: model 8, teacher 3; teacher first: teacher 4, model 9
    assert j.scores() == (17, 7)
    assert PairJudgement("A", None, (8, 3), None).scores() == (8, 3)
    assert PairJudgement(None, None).scores() == (0, 0)


def test_the_judge_sees_final_answers_on_one_line_cut_short():
    assert shown_answer(None, 40) == shown_answer("  ", 40) == NO_ANSWER == "(no answer)"
    assert shown_answer("a\nb   c", 40) == "a b c"
    long = "x" * 100
    assert shown_answer(long, 40) == "x" * 37 + "..." and len(shown_answer(long, 40)) == 40
    assert shown_answer("x" * 40, 40) == "x" * 40


# -- scripted judges through the ledger ------------------------------------------------------------------------------
WORDS = ["abc", "hello", "stillhouse", "ab", "xyzw", "wordy", "pear", "kiwis", "fig", "plum"]


def _run(tmp_path, judge: str, resamples: int = 200):
    """The scripted teacher (always right: it answers a word reversed) against `scripted:half` (right on words of
    even length only) and `scripted:impostor` (never answers), judged by `judge`."""
    p = tmp_path / "b.jsonl"
    p.write_text("".join(json.dumps({"prompt": w, "answer": w[::-1], "family": "even" if len(w) % 2 == 0 else "odd"})
                         + "\n" for w in WORDS))
    e = EvaluateSpec(benchmark=str(p), bootstrap_resamples=resamples, judge={"spec": judge, "max_tokens": 64})
    items = load_benchmark(e.benchmark, e.n_per_family, e.seed)
    models = [{"name": "teacher" if i == 0 else n, "role": "teacher" if i == 0 else "control",
               "ref": ModelRef(f"scripted:{n}"), "spec": f"scripted:{n}", "identity": None}
              for i, n in enumerate(("t", "half", "impostor"))]
    ledger = Ledger(tmp_path / "ledger.db")
    try:
        doc, rows, stats = evaluate_models(models, items, [], e, ledger, tmp_path / "ledger.db", ModelRef(judge), judge)
        calls = list(ledger.export())
    finally:
        ledger.close()
    return doc, rows, stats, calls


def test_a_judge_that_always_says_a_is_all_ties_and_flagged(tmp_path):
    doc, rows, _, _ = _run(tmp_path, "scripted:judge-first")
    j = doc["judge"]
    assert j["swap_consistency"] == 0.0 and j["first_position_share"] == 1.0
    assert j["trustworthy"] is False and j["threshold"] == 0.65
    assert j["accuracy_on_verifiable"] == 0.0  # it never picks the right answer in both orders
    for pair in j["pairs"]:
        assert (pair["win"], pair["tie"], pair["loss"]) == (0.0, 1.0, 0.0) and pair["swap_consistency"] == 0.0
        assert pair["relative_score"] == 1.0  # 8 + 3 for each side: position bias cancels out in the sums
    assert rows[0]["judge_half"] == {"model_first": "A", "teacher_first": "A", "outcome": "tie",
                                     "scores": {"model_first": [8, 3], "teacher_first": [8, 3]}}


def test_a_judge_that_judges_right(tmp_path):
    doc, rows, stats, calls = _run(tmp_path, "scripted:judge-right")
    j = doc["judge"]
    assert j["swap_consistency"] == 1.0 and j["trustworthy"] is True and j["first_position_share"] == 0.5
    # verifiable pairs: half's 5 wrong answers, impostor's 10 missing ones; the teacher is always right
    assert j["verifiable_pairs"] == 15 and j["accuracy_on_verifiable"] == 1.0
    half, imp = j["pairs"]
    assert half["model"] == "half" and half["against"] == "teacher" and half["items"] == 10
    assert (half["win"], half["tie"], half["loss"]) == (0.0, 0.5, 0.5)
    assert (imp["win"], imp["tie"], imp["loss"]) == (0.0, 0.0, 1.0)
    for pair in (half, imp):
        for o in ("win", "tie", "loss"):
            lo, hi = pair[f"{o}_ci"]
            assert 0.0 <= lo <= pair[o] <= hi <= 1.0
    assert imp["relative_score"] == pytest.approx(2 / 9) and imp["relative_score_ci"] == [pytest.approx(2 / 9)] * 2
    # both right: 9 and 9; half wrong: 2 against 9, over both orders
    assert half["relative_score"] == pytest.approx((5 * 18 + 5 * 4) / (10 * 18))
    assert imp["mean_chars"] == {"model": len(NO_ANSWER), "against": pytest.approx(sum(map(len, WORDS)) / 10)}
    for r in rows:
        want = "tie" if r["half_correct"] else "loss"
        assert r["judge_half"]["outcome"] == want and r["judge_impostor"]["outcome"] == "loss"
    judged = [json.loads(c["request"])["messages"][0]["content"] for c in calls
              if c["request"] and "Which is right" in c["request"]]
    assert all(c["stage"] == "evaluate" for c in calls)
    # every pair in both orders; a prompt asked twice (both answers the same) is one call
    assert "Question: abc\nA: wrong\nB: cba\nWhich is right: A, B or tie? Score both 1-10." in judged
    assert "Question: abc\nA: cba\nB: wrong\nWhich is right: A, B or tie? Score both 1-10." in judged
    assert "Question: abc\nA: (no answer)\nB: cba\nWhich is right: A, B or tie? Score both 1-10." in judged
    assert stats["calls"] == len(judged) == 2 * 10 + 2 * 10 - 5


def test_a_judge_that_fails_stops_the_stage(tmp_path):
    with pytest.raises(StillhouseError, match=r"evaluate \(judge\): \d+ calls failed"):
        _run(tmp_path, "scripted:judge-broken")


def test_judging_again_makes_no_new_calls(tmp_path):
    first = _run(tmp_path, "scripted:judge-right")
    again = _run(tmp_path, "scripted:judge-right")
    assert len(again[3]) == len(first[3]) and again[0]["judge"] == first[0]["judge"]


def test_spec_teacher_is_the_teacher_called_as_generation_calls_it():
    from stillhouse.calls import teacher_ref

    r = parse_recipe("name: t\nteacher:\n  spec: 'scripted:t'\n  price: {input_per_million: 1, output_per_million: 2}\n"
                     "  max_cost_usd: 3\nstudent: {base: stillhouse:base}\nevaluate: {judge: {spec: teacher}}\n")
    assert judge_ref(r) == teacher_ref(r) and judge_ref(r).max_cost_usd == 3
    r = parse_recipe("name: t\nteacher: {spec: 'scripted:t'}\nstudent: {base: stillhouse:base}\n"
                     "evaluate: {judge: {spec: 'scripted:judge-right', max_cost_usd: 1.5}}\n")
    assert judge_ref(r) == ModelRef("scripted:judge-right", {}, None, 1.5)
    assert judge_ref(parse_recipe("name: t\nteacher: {spec: 'scripted:t'}\nstudent: {base: stillhouse:base}\n")) is None


def test_the_demo_recipe_has_the_teacher_judge():
    from stillhouse.recipe import load_recipe
    from stillhouse.sources import BENCHMARKS

    assert "world" in BENCHMARKS  # the demo world is installed
    from stillhouse.demo import DEMO_RECIPE

    assert load_recipe(DEMO_RECIPE).evaluate.judge.spec == "teacher"


def test_a_pair_with_no_readable_verdict_is_left_out_not_scored_as_a_tie():
    """A judge that never answers in the format must not read as parity with the teacher: pairs where neither order
    gave a verdict are counted apart and the rates rest on the others (none left: no rates)."""
    from stillhouse.evaluate.judge import pair_summary
    from stillhouse.evaluate.metrics import Bootstrap

    boot = Bootstrap(["f"] * 4, resamples=50)
    chars = ([3] * 4, [3] * 4)
    silent = pair_summary("s", {i: PairJudgement(None, None) for i in range(4)}, boot, 4, chars)
    assert silent["items"] == 0 and silent["no_verdict"] == 4
    assert silent["win"] is None and silent["tie"] is None and silent["loss"] is None
    mixed = {0: PairJudgement("A", "B"), 1: PairJudgement(None, None), 2: PairJudgement("B", None),
             3: PairJudgement(None, None)}
    s = pair_summary("s", mixed, boot, 4, chars)
    assert s["items"] == 2 and s["no_verdict"] == 2
    assert (s["win"], s["tie"], s["loss"]) == (0.5, 0.5, 0.0)  # one agreed win; one order unreadable: a tie
