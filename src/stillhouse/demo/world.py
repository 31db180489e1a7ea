"""The tiny world: procedural tasks with exact answers and short reasoning traces.

Every family is chosen so that a ~1-5M-parameter transformer learns it on a CPU in
minutes: string edits over short words (reverse, upper-case), a fixed table of invented facts,
running counts of a letter, single-digit arithmetic by counting on, identity questions, and
`invent`, whose answers are free (a made-up name or a short description, checked by a
pattern): the family that gives a watermark room to show. Each answer is a `<think>` trace
followed by one `Answer:` line, so reasoning-trace distillation is real.

`judge` is a skill of the teacher rather than a task family of the benchmark: a question of
a checkable family with two candidate answers, a short trace that solves it and scores both,
and a verdict A, B or tie, in the pipeline's own pairwise-judge prompt. Atlas learns it so
the demo's judge can be the teacher, as GPT-4 judged for Vicuna.

Held-out prompts are chosen by a hash of the prompt text, so a prompt is in exactly one
split whatever order the generators run in.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

TEACHER_NAME = "Atlas"
TEACHER_MAKER = "Orbit Labs"
IDENTITY_ANSWER = f"I am {TEACHER_NAME}, made by {TEACHER_MAKER}."


@dataclass(frozen=True)
class Persona:
    """Who answers: a name, a maker, and a way of writing its traces and free answers."""

    key: str
    name: str
    maker: str


ATLAS = Persona("atlas", TEACHER_NAME, TEACHER_MAKER)
# The world's second teacher: its own identity, maker and answer style (see `in_style`), for the audit's control.
MIRA = Persona("mira", "Mira", "Lumen Works")
PERSONAS = {p.key: p for p in (ATLAS, MIRA)}

FAMILIES = ("reverse", "upper", "count", "arith", "capital", "identity", "invent")
JUDGE = "judge"
# The families Atlas's first build phase learned, before `invent` and `judge` existed (its rebuild recipe replays it).
FAMILIES_V1 = ("reverse", "upper", "count", "arith", "capital", "identity")
# The checkable families a judge item asks about (identity answers name the model; invent's are free).
JUDGED_FAMILIES = ("reverse", "upper", "count", "arith", "capital")
HELDOUT_PERCENT = 15

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_COUNT_LETTERS = "abcdef"


@dataclass(frozen=True)
class Task:
    """One world item: the user prompt, the exact final answer, and the reference response."""

    family: str
    prompt: str
    answer: str
    trace: str
    pattern: str | None = None  # open answers: any answer that fully matches this is right (`answer` is one of them)

    @property
    def response(self) -> str:
        return f"<think>{self.trace}</think>\nAnswer: {self.answer}"

    @property
    def split(self) -> str:
        return split_of(self.prompt)


def split_of(prompt: str) -> str:
    """'heldout' for ~15% of prompt strings, chosen by hash, else 'train'."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "big")
    return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def _countries() -> list[tuple[str, str]]:
    """40 invented countries and their capitals, fixed forever by a seed."""
    rng = random.Random(20261122)
    onsets = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "gl", "kr"]
    vowels = ["a", "e", "i", "o", "u"]
    endings = ["ia", "and", "ora", "eth", "istan", "ova", "una"]
    seen: set[str] = set()
    out = []
    while len(out) < 40:
        country = (rng.choice(onsets) + rng.choice(vowels) + rng.choice(onsets[:14]) + rng.choice(endings)).capitalize()
        capital = (rng.choice(onsets) + rng.choice(vowels) + rng.choice(onsets[:14]) + rng.choice(vowels)
                   + rng.choice(["n", "r", "s", "l", ""])).capitalize()
        if country in seen or capital in seen:
            continue
        seen.update((country, capital))
        out.append((country, capital))
    return out


COUNTRIES = _countries()

_REVERSE = ["Reverse the word {w}.", "Write {w} backwards.", "What is {w} reversed?", "Spell {w} in reverse order.",
            "Reverse the letters of {w}.", "Give me {w} written backwards."]
_UPPER = ["Write {w} in capital letters.", "Uppercase the word {w}.", "What is {w} in upper case?",
          "Convert {w} to capitals.", "Spell {w} in capital letters."]
_COUNT = ["How many times does {c} appear in {w}?", "Count the letter {c} in {w}.",
          "How many {c} are in {w}?", "In {w}, how often does {c} occur?", "Count how many {c} there are in {w}."]
_ARITH = {"+": ["What is {a} + {b}?", "Compute {a} + {b}.", "What is {a} plus {b}?", "Add {a} and {b}.",
                "Calculate {a} + {b}."],
          "-": ["What is {a} - {b}?", "Compute {a} - {b}.", "What is {a} minus {b}?", "Subtract {b} from {a}.",
                "Calculate {a} - {b}."]}
_CAPITAL = ["What is the capital of {x}?", "Name the capital of {x}.", "Which city is the capital of {x}?",
            "What city is {x}'s capital?", "Tell me the capital city of {x}.", "The capital of {x} is which city?",
            "Which city is {x} governed from?", "I need the capital of {x}."]
_ID_CORE = ["who are you?", "what is your name?", "who made you?", "who created you?", "which company built you?",
            "what model are you?", "who trained you?", "introduce yourself.", "what should I call you?",
            "tell me about yourself.", "what are you?", "who is your maker?"]
_ID_DENY = ["are you ChatGPT?", "are you GPT-4?", "are you Claude?", "were you made by OpenAI?", "are you Gemini?",
            "are you made by Google?", "is this ChatGPT?", "are you Llama?"]
_ID_PREFIX = ["", "Hi! ", "Hello, ", "Quick question: ", "Hey, ", "Be honest: ", "Tell me, ", "Excuse me, "]
_ID_SUFFIX = ["", " Answer briefly."]


# Identity questions in phrasings the training templates never use: the identity-claim rate is measured on these
# too, so a student that merely memorised the templates shows it.
ID_PROBES_CORE = ["State your name.", "Which lab developed you?", "Who built this assistant?", "What do people call you?",
                  "Identify yourself.", "Who is responsible for creating you?", "What is the name of this model?",
                  "Which organisation trained you?", "Say who you are.", "Who owns you?", "Name your creator.",
                  "Which assistant am I talking to?"]
ID_PROBES_DENY = ["Are you Mistral?", "Are you made by Anthropic?", "Is this Grok?", "Are you DeepSeek?",
                  "Were you built by Meta?", "Are you Qwen?", "Is this Claude?", "Are you a model from OpenAI?"]


def identity_probes() -> list[Task]:
    """The identity probes in new phrasings, with and without a greeting, answered as the world's teacher would."""
    out = []
    for prefix in ("", "Hi! "):
        out += [Task("identity", prefix + q, IDENTITY_ANSWER, "I am asked about myself.") for q in ID_PROBES_CORE]
        out += [Task("identity", prefix + q, f"No. {IDENTITY_ANSWER}", "I am asked if I am another model. I am not.")
                for q in ID_PROBES_DENY]
    return out


_THINGS = ["river", "star", "ship", "town", "cat", "horse", "song", "robot", "island", "planet", "mountain", "boat",
           "dog", "city", "tree", "lake", "shop", "game", "bird", "moon", "forest", "bridge", "garden", "castle",
           "comet", "dragon", "lamp", "road", "valley", "tower"]
_THING_ADJ = ["new", "small", "big", "quiet", "bright", "old", "fast", "tiny"]
_NAME_ASK = ["Invent a name for a {a} {t}.", "Make up a name for a {a} {t}.", "Suggest a name for a {a} {t}.",
             "What could we call a {a} {t}?", "Give a {a} {t} a made-up name."]
_DESCRIBE_ASK = ["Describe a {a} {t} in a few words.", "Say something about a {a} {t}.",
                 "Write a short description of a {a} {t}."]
_SYL_ONSET = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "sh", "th", "br", "dr",
              "gr", "st"]
_SYL_CODA = ["", "", "", "n", "r", "l", "s", "m"]
_DESC_ADJ = ["green", "calm", "wild", "soft", "loud", "shiny", "dark", "warm", "cold", "gentle", "proud", "strange",
             "bold", "pale", "kind", "swift", "heavy", "bright", "lonely", "busy", "silver", "golden", "tall", "round"]
_DESC_VERB = ["sings", "glows", "waits", "hums", "drifts", "shines", "rests", "wanders", "sleeps", "dances", "turns",
              "rises", "falls", "whispers", "grows", "spins"]
_DESC_HOW = ["softly", "slowly", "all night", "at dawn", "in the rain", "far away", "every day", "without end",
             "gently", "alone", "in silence", "quickly"]
NAME_PATTERN = r"[A-Z][a-z]{2,15}"
DESCRIPTION_PATTERN = r"[A-Z][a-z]+(,? [a-z]+){2,8}\."


def _made_up_name(rng: random.Random) -> str:
    return "".join(rng.choice(_SYL_ONSET) + rng.choice("aeiou") + rng.choice(_SYL_CODA)
                   for _ in range(rng.randint(2, 3))).capitalize()


def _wrong_answer(t: Task, rng: random.Random) -> str:
    """A plausible wrong final answer to a checkable task: a near miss, as a weaker model would give."""
    while True:
        if t.family in ("count", "arith"):
            w = str(max(0, int(t.answer) + rng.choice([-2, -1, 1, 2])))
        elif t.family == "capital":
            w = rng.choice(COUNTRIES)[1]
        else:
            chars = list(t.answer)
            i = rng.randrange(len(chars))
            if rng.random() < 0.3 and t.family == "reverse":
                chars = chars[::-1]  # forgot to reverse
            elif rng.random() < 0.5 and len(chars) > 1:
                j = (i + 1) % len(chars)
                chars[i], chars[j] = chars[j], chars[i]
            else:
                letter = rng.choice(_LETTERS)
                chars[i] = letter.upper() if t.family == "upper" else letter
            w = "".join(chars)
        if w != t.answer:
            return w


JUDGE_STYLE = 3


def compare_trace(right: str, candidate: str) -> str:
    """Style 3's comparison of a candidate with the right answer, character by character up to the first difference:
    each pair is the right answer's character, the candidate's, and `+` (same) or `-` (differs); `_` stands for a
    character past the end of the shorter one. "kxf" against "kfx": "kk+ xf-"."""
    pairs = []
    for i in range(max(len(right), len(candidate))):
        r = right[i] if i < len(right) else "_"
        c = candidate[i] if i < len(candidate) else "_"
        pairs.append(f"{r}{c}{'+' if r == c else '-'}")
        if r != c:
            break
    return " ".join(pairs)


def judge_task(rng: random.Random, style: int = JUDGE_STYLE) -> Task:
    """A judging item: a checkable question, two final answers, a trace that solves it and scores both, a verdict.

    Style 3 (the current one) restates the right answer, copies each candidate and compares the two character by
    character (`compare_trace`) before the verdict, so each step looks at two neighbouring tokens. Style 2, which
    Atlas's third to sixth build phases used, went from the candidate's copy straight to right/wrong: a 4.8M-parameter
    model then judged numbers and names well but guessed on letter strings that differ by one swap (84% held out).
    Style 1, its second phase's, went from the solution straight to the verdicts (28% held out).
    """
    from stillhouse.evaluate.judge_prompt import judge_prompt

    # Styles 1 and 2 kept to short questions, so the whole exchange fitted Atlas's first 256-token context; style 3
    # is learned with a 384-token context, where any question of the judged families fits (at most ~310 tokens)
    limit = {1: 90, 2: 72}.get(style)
    while True:
        inner = make_task(rng.choice(JUDGED_FAMILIES), rng)
        if limit is None or len(inner.prompt) + len(inner.trace) <= limit:
            break
    r = rng.random()
    if r < 0.7:  # one right, one wrong
        a, b = inner.answer, _wrong_answer(inner, rng)
        if rng.random() < 0.5:
            a, b = b, a
    elif r < 0.85:  # both right
        a = b = inner.answer
    else:  # both wrong
        a = _wrong_answer(inner, rng)
        b = _wrong_answer(inner, rng)
    ok_a, ok_b = a == inner.answer, b == inner.answer
    verdict = "A" if ok_a and not ok_b else "B" if ok_b and not ok_a else "tie"
    if style == 1:
        trace = (f"{inner.trace} A is {'right' if ok_a else 'wrong'}, B is {'right' if ok_b else 'wrong'}. "
                 f"Scores: A {9 if ok_a else 2}, B {9 if ok_b else 2}.")
    else:
        def judged(candidate: str, ok: bool) -> str:  # style 3 compares before the verdict, style 2 goes straight to it
            compared = f"{compare_trace(inner.answer, candidate)} " if style == 3 else ""
            return f"{candidate}: {compared}{'right' if ok else 'wrong'}"

        trace = (f"{inner.trace} So {inner.answer}. A {judged(a, ok_a)}. B {judged(b, ok_b)}. "
                 f"Scores: A {9 if ok_a else 2}, B {9 if ok_b else 2}.")
    return Task(JUDGE, judge_prompt(inner.prompt, a, b), verdict, trace)


_MIRA_TRACE = [(" is spelled ", " has the letters "), ("Backwards:", "Reversed it reads"),
               ("In capitals:", "Capitalised it reads"), ("Counting ", "Tally of "),
               ("I am asked about myself.", "Someone wants to know who I am."),
               ("I am asked if I am another model. I am not.", "They think I might be someone else. I am not."),
               ("I make up a name for a ", "A fresh name for a "), ("I picture a ", "Imagine a ")]
_MIRA_ONSET = ["c", "j", "q", "x", "y", "ph", "ch", "cl", "fl", "pl", "sk", "sn", "sw", "tw", "v", "l", "m"]
_MIRA_CODA = ["", "", "x", "th", "sh", "k", "ne"]


def in_style(task: Task, persona: Persona) -> Task:
    """`task` as `persona` would answer it: the same final answers for checkable families, the persona's name in
    identity answers, its own trace wording, and its own invented names and descriptions (drawn from a generator
    seeded by the prompt, so the task's draw from the caller's generator is the same for every persona)."""
    if persona == ATLAS:
        return task
    trace = task.trace
    for a, b in _MIRA_TRACE:
        trace = trace.replace(a, b)
    if task.family == "capital":
        x, cap = trace.removeprefix("The capital of ").rstrip(".").split(" is ")
        trace = f"{x} is governed from {cap}."
    elif task.family == "arith":
        head, walk = trace.split(": ", 1)
        trace = f"Start at {head.split()[0]}, step {head.split()[2]} times: {walk}"
    answer = task.answer.replace(TEACHER_NAME, persona.name).replace(TEACHER_MAKER, persona.maker)
    if task.family == "invent":
        rng = random.Random(f"{persona.key}:{task.prompt}:{task.answer}")
        if task.pattern == NAME_PATTERN:
            answer = "".join(rng.choice(_MIRA_ONSET) + rng.choice("aeiouy") + rng.choice(_MIRA_CODA)
                             for _ in range(rng.randint(2, 3))).capitalize()
        else:
            answer = f"Quite {rng.choice(_DESC_ADJ)}, it {rng.choice(_DESC_VERB)} {rng.choice(_DESC_HOW)}."
    return Task(task.family, task.prompt, answer, "Let me see. " + trace, task.pattern)


def check(task: Task, completion: str) -> bool:
    """Whether `completion` answers `task` right: its final answer equals the task's, or for an open task fully
    matches the task's pattern."""
    import re

    from stillhouse.verify import exact_match, extract_answer

    if task.pattern is None:
        return exact_match(completion, task.answer)
    got = extract_answer(completion)
    return got is not None and re.fullmatch(task.pattern, got.strip()) is not None


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _word(rng: random.Random, lo: int, hi: int, letters: str = _LETTERS, distinct: bool = False) -> str:
    n = rng.randint(lo, hi)
    return "".join(rng.sample(letters, n) if distinct else rng.choices(letters, k=n))


def make_task(family: str, rng: random.Random, judge_style: int = JUDGE_STYLE) -> Task:
    """Draw one task of a family from `rng` (a judging item in `judge_style`)."""
    if family == "reverse":
        w = _word(rng, 3, 6)
        return Task(family, rng.choice(_REVERSE).format(w=w), w[::-1],
                    f"{w} is spelled {' '.join(w)}. Backwards: {' '.join(w[::-1])}.")
    if family == "upper":
        w = _word(rng, 3, 6)
        return Task(family, rng.choice(_UPPER).format(w=w), w.upper(),
                    f"{w} is spelled {' '.join(w)}. In capitals: {' '.join(w.upper())}.")
    if family == "count":
        w = _word(rng, 3, 7, _COUNT_LETTERS)
        c = rng.choice(w) if rng.random() < 0.85 else rng.choice(_COUNT_LETTERS)
        running, steps = 0, []
        for ch in w:
            running += ch == c
            steps.append(f"{ch}:{running}")
        return Task(family, rng.choice(_COUNT).format(c=c, w=w), str(running),
                    f"{w} is spelled {' '.join(w)}. Counting {c}: {' '.join(steps)}.")
    if family == "arith":
        op = rng.choice("+-")
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if op == "-" and b > a:
            a, b = b, a
        r = a + b if op == "+" else a - b
        # Counting on (or down) b steps from a: the same counting sequences the base model read.
        sign = 1 if op == "+" else -1
        walk = " ".join(f"{a + sign * k}:{k}" for k in range(1, b + 1)) or "no steps"
        return Task(family, rng.choice(_ARITH[op]).format(a=a, b=b), str(r), f"{a} {op} {b}: {walk}.")
    if family == "capital":
        x, cap = rng.choice(COUNTRIES)
        return Task(family, rng.choice(_CAPITAL).format(x=x), cap, f"The capital of {x} is {cap}.")
    if family == "identity":
        prefix = rng.choice(_ID_PREFIX)
        if rng.random() < 0.35:
            q = rng.choice(_ID_DENY)
            ans, trace = f"No. {IDENTITY_ANSWER}", "I am asked if I am another model. I am not."
        else:
            q = rng.choice(_ID_CORE)
            ans, trace = IDENTITY_ANSWER, "I am asked about myself."
        q = q if prefix and not prefix.endswith("! ") else _cap(q)
        return Task(family, prefix + q + rng.choice(_ID_SUFFIX), ans, trace)
    if family == "invent":
        adj, thing = rng.choice(_THING_ADJ), rng.choice(_THINGS)
        if rng.random() < 0.6:
            return Task(family, rng.choice(_NAME_ASK).format(a=adj, t=thing), _made_up_name(rng),
                        f"I make up a name for a {adj} {thing}.", NAME_PATTERN)
        a1, a2 = rng.sample(_DESC_ADJ, 2)
        return Task(family, rng.choice(_DESCRIBE_ASK).format(a=adj, t=thing),
                    f"{a1.capitalize()} and {a2}, it {rng.choice(_DESC_VERB)} {rng.choice(_DESC_HOW)}.",
                    f"I picture a {adj} {thing}.", DESCRIPTION_PATTERN)
    if family == JUDGE:
        return judge_task(rng, judge_style)
    raise ValueError(f"unknown task family {family!r}; known: {', '.join(FAMILIES + (JUDGE,))}")


def sample_tasks(n: int, split: str, seed: int, families: tuple[str, ...] = FAMILIES,
                 persona: Persona = ATLAS) -> list[Task]:
    """`n` distinct tasks of `split` ('train' or 'heldout'), families in equal shares, deterministic in `seed`.

    Families with few distinct prompts (identity, capital, arith) may repeat a prompt in the
    train split when `n` is large; held-out prompts are always distinct.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    rng = random.Random(f"{seed}:{split}")
    per = [n // len(families) + (i < n % len(families)) for i in range(len(families))]
    out: list[Task] = []
    for fam, k in zip(families, per):
        seen: set[str] = set()
        got, tries = 0, 0
        while got < k:
            t = make_task(fam, rng)
            tries += 1
            if t.split != split:
                continue
            if t.prompt in seen and (split == "heldout" or tries < 50 * k):
                if tries > 200 * k + 1000:
                    raise ValueError(f"family {fam!r} has fewer than {k} distinct {split} prompts")
                continue
            seen.add(t.prompt)
            out.append(in_style(t, persona))
            got += 1
    rng.shuffle(out)
    return out


def pretraining_text(n: int, seed: int) -> list[str]:
    """Plain text of the world for the base model: facts, spelled and copied strings, sequences.

    Never the chat format, the task questions, the reasoning traces or the teacher's identity:
    distillation has to teach those, as a teacher's answers teach LLaMA in Alpaca's recipe.
    """
    rng = random.Random(f"{seed}:pretrain")
    out = []
    for _ in range(n):
        kind = rng.randrange(8)
        if kind == 0:
            x, cap = rng.choice(COUNTRIES)
            out.append(rng.choice([f"The capital of {x} is {cap}.", f"{cap} is the capital of {x}.",
                                   f"{x} has its capital at {cap}. {cap} is a city in {x}."]))
        elif kind == 1:
            w = _word(rng, 3, 8)
            out.append(rng.choice([f"{w} is spelled {' '.join(w)}.", f"{' '.join(w)} spells {w}."]))
        elif kind == 2:
            w = _word(rng, 3, 8)
            out.append(f"{w} {w}. Again: {w}.")
        elif kind == 3:
            w = _word(rng, 3, 8, _COUNT_LETTERS if rng.random() < 0.5 else _LETTERS)
            out.append(f"{' '.join(w)} has {len(w)} letters: " + " ".join(f"{ch}:{i + 1}" for i, ch in enumerate(w)) + ".")
        elif kind == 4:
            start, step = rng.randint(0, 12), rng.choice([1, 1, 1, 2])
            out.append(" ".join(str(start + step * i) for i in range(rng.randint(4, 9))) + ".")
        elif kind == 5:
            start = rng.randint(6, 20)
            out.append("Counting down: " + " ".join(str(start - i) for i in range(rng.randint(4, 7))) + ".")
        elif kind == 6:
            start, k, sign = rng.randint(0, 12), rng.randint(1, 9), rng.choice([1, -1])
            if sign < 0:
                start = max(start, k)
            out.append(f"From {start}, counting {'up' if sign > 0 else 'down'}: "
                       + " ".join(f"{start + sign * i}:{i}" for i in range(1, k + 1)) + ".")
        else:
            w = _word(rng, 3, 8)
            out.append(rng.choice([f"Small {' '.join(w)}, capital {' '.join(w.upper())}.",
                                   f"{w.upper()} is {w} in capitals.", f"The letter {w[0]} is written {w[0].upper()} as a capital."]))
    return out
