"""The pairwise judge: every model's final answers against the teacher's, each pair judged in both orders.

MT-Bench's protocol (Zheng et al. 2023, "Judging LLM-as-a-Judge"), on our own prompt
(`judge_prompt.py`): the judge sees one question and two final answers, A and B, and says
A, B or tie, scoring each 1-10. Every pair is asked twice, the model's answer first and then
the teacher's first; a verdict that changes with the order is position bias, not a
preference, so orders that disagree count as a tie. What is reported beside the win rates
says how far to trust them: the judge's swap consistency (the share of pairs whose two
verdicts agree; below `min_swap_consistency` the judge is flagged untrustworthy), its
first-position preference, its accuracy where the verifier knows the answer, and the answer
lengths (judges favour longer answers). The judge is any backend, called through the ledger
like every model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stillhouse.calls import Ledger, ModelRef, call_models
from stillhouse.evaluate.judge_prompt import JUDGE_TEMPLATE, judge_prompt, parse_judgement
from stillhouse.evaluate.metrics import Bootstrap, share
from stillhouse.rundir import tagged_hash
from stillhouse.teachers import Request

TEMPLATE_NAME = "stillhouse pairwise v1"
NO_ANSWER = "(no answer)"
OUTCOMES = ("win", "tie", "loss")
RELATIVE_SCORE_CAVEATS = ("one judge's 1-10 scores, summed for the model and divided by the sum for the teacher "
                          "(Vicuna's relative score): scores are not calibrated across questions or judges, and "
                          "single judges favour the first position and longer answers; read it beside swap "
                          "consistency and answer lengths, never alone")


def shown_answer(answer: str | None, limit: int) -> str:
    """A final answer as the judge sees it: on one line, cut to `limit` characters (a small judge's context is
    short), and "(no answer)" where the extractor found none."""
    if answer is None or not answer.strip():
        return NO_ANSWER
    text = " ".join(answer.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _model_view(verdict: str | None, model_is_a: bool) -> str | None:
    """A single-order verdict as the model's win, loss or tie (None: no verdict could be read)."""
    if verdict is None or verdict == "tie":
        return verdict
    return "win" if (verdict == "A") == model_is_a else "loss"


@dataclass(frozen=True)
class PairJudgement:
    """One question judged in both orders: the verdict and scores (A, B) with the model's answer as A, then with the
    teacher's as A."""

    model_first: str | None
    teacher_first: str | None
    model_first_scores: tuple[int, int] | None = None
    teacher_first_scores: tuple[int, int] | None = None

    @property
    def consistent(self) -> bool:
        """Both orders gave a verdict, and the same one once the swap is undone."""
        a, b = _model_view(self.model_first, True), _model_view(self.teacher_first, False)
        return a is not None and a == b

    @property
    def outcome(self) -> str:
        """'win', 'tie' or 'loss' for the model: the verdict both orders agree on, else a tie."""
        return _model_view(self.model_first, True) if self.consistent else "tie"

    def scores(self) -> tuple[int, int]:
        """(the model's, the teacher's) 1-10 scores summed over the orders that gave scores."""
        m = t = 0
        if self.model_first_scores:
            m, t = m + self.model_first_scores[0], t + self.model_first_scores[1]
        if self.teacher_first_scores:
            m, t = m + self.teacher_first_scores[1], t + self.teacher_first_scores[0]
        return m, t

    def row(self) -> dict:
        """As `eval/samples.jsonl` records it."""
        return {"model_first": self.model_first, "teacher_first": self.teacher_first, "outcome": self.outcome,
                "scores": {"model_first": list(self.model_first_scores) if self.model_first_scores else None,
                           "teacher_first": list(self.teacher_first_scores) if self.teacher_first_scores else None}}


@dataclass
class JudgeCalls:
    judgements: list[PairJudgement]
    calls: int  # distinct requests the verdicts rest on (a repeated judge prompt is one call)
    cost_usd: float
    seconds: float


def judge_pairs(judge: ModelRef, pairs: list[tuple[str, str | None, str | None]], ledger: Ledger, *, max_tokens: int,
                answer_chars: int, ledger_path, label: str = "judge") -> JudgeCalls:
    """Judge each `(question, model's final answer, teacher's final answer)` in both orders, through the ledger
    (stage `evaluate`); a failed or budget-stopped call stops the stage (a StillhouseError), like any model's."""
    reqs = []
    for question, mine, theirs in pairs:
        m, t = shown_answer(mine, answer_chars), shown_answer(theirs, answer_chars)
        for a, b in ((m, t), (t, m)):
            reqs.append(Request(messages=({"role": "user", "content": judge_prompt(question, a, b)},),
                                max_tokens=max_tokens))
    if not reqs:
        return JudgeCalls([], 0, 0.0, 0.0)
    batch = call_models(judge, reqs, ledger, stage="evaluate", label=label,
                        tag={"judge": TEMPLATE_NAME, "template": tagged_hash(JUDGE_TEMPLATE)})
    batch.raise_if_incomplete("evaluate (judge)", ledger_path, judge.max_cost_usd)
    parsed = [parse_judgement(batch.completion(i).text) for i in range(len(reqs))]
    out = [PairJudgement(parsed[2 * i][0], parsed[2 * i + 1][0], parsed[2 * i][1], parsed[2 * i + 1][1])
           for i in range(len(pairs))]
    distinct = set(batch.keys)
    return JudgeCalls(out, len(distinct), sum(batch.calls[k].cost_usd for k in distinct), batch.seconds)


def pair_summary(model: str, judged: dict[int, PairJudgement], boot: Bootstrap, n_items: int,
                 chars: tuple[list[int], list[int]]) -> dict:
    """Win / tie / loss of `model` against the teacher with intervals (resampling items), its swap consistency, the
    relative score and the mean length of the answers the judge was shown (`chars`: the model's, the teacher's).

    A pair on which neither order gave a readable verdict is no judgement at all: it is counted (`no_verdict`) and
    left out, not scored as a tie (a judge that never answered in the format would otherwise read as parity)."""
    pos = sorted(p for p, j in judged.items() if j.model_first is not None or j.teacher_first is not None)
    mask = np.zeros(n_items)
    mask[pos] = 1
    out: dict = {"model": model, "against": "teacher", "items": len(pos), "no_verdict": len(judged) - len(pos)}
    for o in OUTCOMES:
        x = np.zeros(n_items)
        x[[p for p in pos if judged[p].outcome == o]] = 1
        out[o], out[f"{o}_ci"] = share(x, mask), boot.interval(boot.ratio(x, mask))
    cons = np.zeros(n_items)
    cons[[p for p in pos if judged[p].consistent]] = 1
    out["swap_consistency"] = share(cons, mask)
    ms, ts = np.zeros(n_items), np.zeros(n_items)
    for p in pos:
        ms[p], ts[p] = judged[p].scores()
    scored = ts.sum() > 0
    out["relative_score"] = float(ms.sum() / ts.sum()) if scored else None
    out["relative_score_ci"] = boot.interval(boot.ratio(ms, ts)) if scored else None
    out["mean_chars"] = {"model": float(np.mean(chars[0])) if chars[0] else None,
                         "against": float(np.mean(chars[1])) if chars[1] else None}
    return out


def judge_summary(spec: str, same_as_teacher: bool, threshold: float, pairs: list[dict],
                  judgements: list[PairJudgement], verifiable: list[tuple[PairJudgement, bool]]) -> dict:
    """The judge's own record over every pair it judged: swap consistency (and whether it clears `threshold`), its
    first-position preference, and its accuracy on the pairs where exactly one answer is right per the verifier
    (`verifiable`: each judgement with whether the model's answer is the right one)."""
    singles = [v for j in judgements for v in (j.model_first, j.teacher_first) if v in ("A", "B")]
    consistency = sum(j.consistent for j in judgements) / len(judgements) if judgements else None
    picked = [j.outcome == ("win" if model_right else "loss") for j, model_right in verifiable]
    return {"spec": spec, "same_as_teacher": same_as_teacher, "template": TEMPLATE_NAME,
            "swap_consistency": consistency,
            "first_position_share": singles.count("A") / len(singles) if singles else None,
            "unreadable_verdicts": sum((j.model_first is None) + (j.teacher_first is None) for j in judgements),
            "trustworthy": consistency is not None and consistency >= threshold, "threshold": threshold,
            "accuracy_on_verifiable": sum(picked) / len(picked) if picked else None,
            "verifiable_pairs": len(picked),
            "rule": "each pair judged in both orders; orders that disagree count as a tie",
            "relative_score_caveats": RELATIVE_SCORE_CAVEATS, "pairs": pairs}
