"""The pairwise judge's prompt and how its reply is read: shared by every judge backend.

Our own wording. The judge sees one question and two final answers, labelled A and B,
gives each a score from 1 to 10 and ends with one line `Answer: A`, `Answer: B` or
`Answer: tie` (the same final-answer convention as every verifiable task, so one
extractor reads both). Final answers, not whole replies: a reasoning trace can run past a
small judge's context, and the verdict is about the answer.
"""

from __future__ import annotations

import re

JUDGE_TEMPLATE = "Question: {question}\nA: {a}\nB: {b}\nWhich is right: A, B or tie? Score both 1-10."

_SCORES = re.compile(r"Scores?:\s*A\s*[:=]?\s*(\d{1,2})\s*(?:/\s*10)?\s*[,;]?\s*B\s*[:=]?\s*(\d{1,2})", re.IGNORECASE)
_VERDICT = re.compile(r"^\s*(?:Answer|Verdict)\s*:\s*\**\s*(A|B|tie)\b", re.IGNORECASE | re.MULTILINE)


def judge_prompt(question: str, a: str, b: str, template: str = JUDGE_TEMPLATE) -> str:
    return template.format(question=question, a=a, b=b)


def parse_judgement(text: str) -> tuple[str | None, tuple[int, int] | None]:
    """(verdict 'A' | 'B' | 'tie' | None, (score A, score B) | None) from a judge's reply: the last verdict line
    after any think block, and the last scores mention (each 1 to 10, else None)."""
    body = text.split("</think>")[-1]
    verdicts = _VERDICT.findall(body)
    verdict = None
    if verdicts:
        v = verdicts[-1]
        verdict = "tie" if v.lower() == "tie" else v.upper()
    found = _SCORES.findall(text)
    scores = None
    if found:
        sa, sb = int(found[-1][0]), int(found[-1][1])
        if 1 <= sa <= 10 and 1 <= sb <= 10:
            scores = (sa, sb)
    return verdict, scores
