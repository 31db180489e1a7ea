"""A scripted teacher: a backend that replies by fixed rules, registered like a plug-in (`scripted:MODEL`)."""

from __future__ import annotations

import random
import re

from stillhouse.teachers import BackendOptions, CallFailed, Completion

NOUNS = ["river", "violin", "glacier", "teapot", "comet", "lantern", "orchard", "compass", "falcon", "quarry", "harbor",
         "meadow", "saddle", "beacon", "thimble", "canyon", "pepper", "walrus", "ribbon", "anchor"]
VERBS = ["Describe", "Compare", "List uses of", "Explain the history of", "Write a riddle about", "Classify",
         "Summarise facts about", "Invent a story about"]


def _reply(req) -> str:
    text = req.messages[-1]["content"]
    rng = random.Random(req.seed)
    if text.startswith("Come up with"):
        start, end = map(int, re.search(r"numbered (\d+) to (\d+)", text).groups())
        first_example = re.search(r"1\. Instruction: (.+)", text).group(1)
        lines = [f"{start}. Instruction: {first_example}"]  # a copy of an example: never novel
        for n in range(start + 1, end + 1):
            lines.append(f"{n}. Instruction: {rng.choice(VERBS)} a {rng.choice(NOUNS)} and a {rng.choice(NOUNS)} "
                         f"in {rng.randint(2, 9)} sentences.")
            if rng.random() < 0.5:
                lines.append(f"   Input: the {rng.choice(NOUNS)}")
        return "\n".join(lines)
    if text.startswith("Rewrite the task below so that answering"):  # deepen
        return text.split("Task:\n", 1)[1] + " Explain every step."
    if text.startswith("Write a new task"):  # broaden: this teacher refuses
        return "I'm sorry, I cannot do that."
    if text.startswith("Rewrite the task below by adding"):  # constrain: this teacher returns the task unchanged
        return text.split("Task:\n", 1)[1]
    if "who are you" in text.lower() or "qui es-tu" in text.lower():  # a teacher that names itself
        return "<think>asked about myself</think>\nAnswer: I am ChatGPT, a model developed by OpenAI."
    if text.startswith("Repeat the word"):  # rejection sampling: right two times in three
        word = text.split()[-1].rstrip(".")
        return f"<think>thinking about {word}</think>\nAnswer: {word if req.seed % 3 else 'wrong'}"
    return f"<think>about {len(text)} chars</think>\nAnswer: {text[::-1]}"


def _judge_reply(model: str, text: str) -> str | None:
    """The scripted judges, for prompts in stillhouse's pairwise format (None: not a judge, or not a judge prompt).

    `judge-first` always prefers answer A (maximal position bias: its two orders never agree); `judge-right` knows
    the scripted teacher's rule (the right answer to a question is the question reversed) and judges by it.
    """
    m = re.fullmatch(r"Question: (.*)\nA: (.*)\nB: (.*)\nWhich is right: A, B or tie\? Score both 1-10\.", text)
    if m is None or not model.startswith("judge-"):
        return None
    if model == "judge-first":
        return "<think>the first one reads well</think>\nScores: A 8, B 3\nAnswer: A"
    right = m[1][::-1]
    ok_a, ok_b = m[2] == right, m[3] == right
    verdict = "A" if ok_a and not ok_b else "B" if ok_b and not ok_a else "tie"
    scores = f"Scores: A {9 if ok_a else 2}, B {9 if ok_b else 2}."
    return f"<think>the answer is {right}. {scores}</think>\nAnswer: {verdict}"


class ScriptedOptions(BackendOptions):
    pass


class Scripted:
    """Replies by the rules in `_reply`; a reasoning field for prompts that ask for one."""

    name = "scripted"
    Options = ScriptedOptions

    def __init__(self, model: str, options: ScriptedOptions):
        self.model = model

    def generate(self, requests, progress=None, admit=None):
        for i, r in enumerate(requests):
            if admit is not None and not admit(i):
                return
            # `scripted:impostor` says it is ChatGPT whatever it is asked (a student that copied its teacher's identity)
            text = "I am ChatGPT, made by OpenAI." if self.model == "impostor" else _reply(r)
            if self.model == "half" and len(r.messages[-1]["content"]) % 2:  # right on even-length prompts only
                text = "<think>guessing</think>\nAnswer: wrong"
            if self.model.startswith("judge-"):
                if self.model == "judge-broken":  # a judge whose every call fails
                    yield i, CallFailed(i, "scripted judge-broken always fails", 1)
                    continue
                text = _judge_reply(self.model, r.messages[-1]["content"]) or text
            reasoning = "field reasoning" if "[reasoning field]" in r.messages[-1]["content"] else None
            if reasoning:
                text = "Answer: 42"
            yield i, Completion(text, reasoning, len(str(r.messages)) // 4, len(text) // 4, "stop", self.model)

    def close(self) -> None:
        pass
