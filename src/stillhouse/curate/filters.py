"""Filters on one answer at a time: empty, length, refusal, format, and the teacher's identity."""

from __future__ import annotations

import random
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stillhouse.curate import CurateContext, Filter, FilterOptions, FilterResult, answer_text, map_assistant
from stillhouse.errors import StillhouseError
from stillhouse.identity import DEFAULT_VENDORS, Identity, find_claims, rewrite
from stillhouse.verify.verifiers import check_pattern

_THINK = re.compile(r"<think>.*?</think>", re.S)
Language = Literal["en", "ja", "zh", "fr"]
LANGUAGES: tuple[str, ...] = ("en", "ja", "zh", "fr")


def final_answer(text: str) -> str:
    """The answer without its reasoning: what follows any `<think>…</think>` block."""
    return _THINK.sub("", text)


class EmptyOptions(FilterOptions):
    strip_think: bool = Field(True, description="an answer that is only a <think> block, with nothing after, is empty")


class Empty(Filter):
    """Drop a row with no answer, or an answer that is empty or whitespace."""

    name = "empty"
    Options = EmptyOptions

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        res = FilterResult(kept=[])
        for row in rows:
            a = answer_text(row)
            if a is None:
                res.dropped.append((row, "no answer"))
            elif not a.strip():
                res.dropped.append((row, "empty answer"))
            elif self.options.strip_think and not final_answer(a).strip():
                res.dropped.append((row, "nothing after the reasoning"))
            else:
                res.kept.append(row)
        return res


# Letters and digits in runs, each CJK character alone, so "words" means something in Chinese and Japanese too.
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+")


class LengthOptions(FilterOptions):
    unit: Literal["chars", "words"] = Field("chars", description="words: letter/digit runs, each CJK character one")
    min: int | None = Field(None, ge=0, description="drop an answer shorter than this")
    max: int | None = Field(None, ge=1, description="drop an answer longer than this")

    @model_validator(mode="after")
    def _bounds(self) -> "LengthOptions":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
        return self


class Length(Filter):
    """Drop an answer shorter than `min` or longer than `max` characters or words (the whole answer, reasoning too)."""

    name = "length"
    Options = LengthOptions

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        o = self.options
        res = FilterResult(kept=[])
        for row in rows:
            a = answer_text(row) or ""
            size = len(a) if o.unit == "chars" else len(_WORD.findall(a))
            if o.min is not None and size < o.min:
                res.dropped.append((row, f"answer shorter than {o.min} {o.unit}"))
            elif o.max is not None and size > o.max:
                res.dropped.append((row, f"answer longer than {o.max} {o.unit}"))
            else:
                res.kept.append(row)
        return res


REFUSALS: dict[str, list[str]] = {
    "en": [r"\bI(?:['’]m| am) (?:so |very |really )?sorry,? but I (?:can(?:not|['’]t)|am unable|won['’]t|am not able)",
           r"\bI apologi[sz]e,? but I (?:can(?:not|['’]t)|am unable|won['’]t)",
           r"\bAs an AI(?: language model| assistant)?,? I (?:can(?:not|['’]t)|am (?:not able|unable)|don['’]t|do not)",
           r"\bI(?: can(?:not|['’]t)| am unable to| won['’]t| am not able to) (?:help|assist|comply|provide|fulfil+|"
           r"do that|answer|support|engage|create|generate|write)",
           r"\bI must (?:respectfully )?decline\b"],
    "ja": [r"申し訳(?:ありません|ございません)が",
           r"(?:お答え|回答|お手伝い|対応|提供)(?:することは|は)?できません",
           r"(?:AI|人工知能)として[^。]{0,20}?できません"],
    "zh": [r"(?:抱歉|对不起|很遗憾)[，,]?\s*(?:但)?我(?:不能|无法|没办法)",
           r"作为(?:一个)?(?:AI|人工智能)(?:语言模型|助手)?[，,]?\s*我(?:不能|无法)",
           r"我(?:无法|不能)(?:提供|帮助|协助|回答|满足)"],
    "fr": [r"\bJe suis (?:vraiment )?désolée?,? mais je ne (?:peux|suis pas en mesure)",
           r"\bJe ne (?:peux|suis pas en mesure de) pas? ?(?:vous aider|répondre|fournir|faire cela|aider)",
           r"\bEn tant qu['’](?:IA|intelligence artificielle|assistant)[^.]{0,30}?,? je ne (?:peux|suis)",
           r"\bJe dois (?:respectueusement )?refuser\b"],
}


class RefusalOptions(FilterOptions):
    languages: list[Language] = Field(list(LANGUAGES), description="which built-in pattern sets to use")
    patterns: list[str] = Field(default_factory=list, description="further regular expressions (case-insensitive)")
    head_chars: int | None = Field(300, ge=1, description="look only at the first this many characters of the "
                                                          "answer after its reasoning (refusals lead); None: all")

    @field_validator("patterns")
    @classmethod
    def _check(cls, v: list[str]) -> list[str]:
        for p in v:
            check_pattern(p)
        return v


class Refusal(Filter):
    """Drop an answer that refuses ("I'm sorry, but I can't", "As an AI, I cannot", "申し訳ありませんが", "抱歉，我无法",
    "Je suis désolé, mais je ne peux pas"): built-in patterns in four languages plus the recipe's own."""

    name = "refusal"
    Options = RefusalOptions

    def __init__(self, options=None):
        super().__init__(options)
        self._patterns = [(lang, re.compile(p, re.I)) for lang in self.options.languages for p in REFUSALS[lang]]
        self._patterns += [("custom", re.compile(p, re.I)) for p in self.options.patterns]

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        res = FilterResult(kept=[])
        head = self.options.head_chars
        for row in rows:
            text = final_answer(answer_text(row) or "").lstrip()
            text = text[:head] if head else text
            lang = next((lang for lang, rx in self._patterns if rx.search(text)), None)
            if lang:
                res.dropped.append((row, f"refusal ({lang})"))
            else:
                res.kept.append(row)
        return res


class FormatOptions(FilterOptions):
    pattern: str = Field(description=r"a regular expression the answer must contain, e.g. '^Answer: .+$'")
    ignore_case: bool = False
    multiline: bool = Field(True, description="^ and $ match at every line")
    final_only: bool = Field(False, description="match only what follows the <think> block")

    @field_validator("pattern")
    @classmethod
    def _check(cls, v: str) -> str:
        return check_pattern(v)


class Format(Filter):
    """Drop an answer that does not contain a match of `pattern` (re.search)."""

    name = "format"
    Options = FormatOptions

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        o = self.options
        rx = re.compile(o.pattern, (re.I if o.ignore_case else 0) | (re.M if o.multiline else 0))
        res = FilterResult(kept=[])
        for row in rows:
            a = answer_text(row) or ""
            if rx.search(final_answer(a) if o.final_only else a):
                res.kept.append(row)
            else:
                res.dropped.append((row, f"answer does not match {o.pattern!r}"))
        return res


# -- identity -----------------------------------------------------------------------------------------------------

class VendorOption(BaseModel):
    """A further vendor the identity filter looks for, as a recipe writes it."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    maker: str = Field(min_length=1)
    names: list[str] = Field(default_factory=list)
    makers: list[str] = Field(default_factory=list)

    def to_identity(self) -> Identity:
        return Identity(self.name, self.maker, tuple(self.names), tuple(self.makers))


class IdentityOptions(FilterOptions):
    action: Literal["rewrite", "drop"] = Field(
        "rewrite", description="rewrite another model's self-identification to the student's identity, or drop the row")
    vendors: list[VendorOption] = Field(default_factory=list, description="vendors beyond the built-in ones")
    add_identity_pairs: int = Field(0, ge=0, description="add this many questions about who the model is, "
                                                         "answered with the student's identity")
    languages: list[Language] = Field(list(LANGUAGES), description="languages of the added questions")


# Who-are-you questions and answers in each language; `deny` questions name another model, their answers say no.
PAIR_QUESTIONS: dict[str, dict[str, list[str]]] = {
    "en": {"ask": ["Who are you?", "What is your name?", "Who made you?", "Which company created you?",
                   "What model are you?", "Introduce yourself.", "Who trained you?", "What should I call you?",
                   "Tell me your name.", "Who developed you?", "What company are you from?", "Who built you?",
                   "What are you called?", "Which AI is this?", "Describe who you are.", "Who created this model?",
                   "What is this assistant's name?", "Who is behind you?", "Which team made you?",
                   "Who do you belong to?", "What kind of model am I speaking with?", "Please say your name.",
                   "Who are your developers?", "Which firm built this model?"],
           "deny": ["Are you {other}?", "Were you made by {other_maker}?", "Is this {other}?",
                    "Am I talking to {other}?", "Did {other_maker} build you?", "Are you a {other_maker} model?",
                    "You are {other}, right?", "Is {other_maker} your maker?"]},
    "ja": {"ask": ["あなたは誰ですか？", "あなたの名前は何ですか？", "誰があなたを作りましたか？", "自己紹介してください。",
                   "あなたはどのモデルですか？"],
           "deny": ["あなたは{other}ですか？", "あなたは{other_maker}によって作られましたか？"]},
    "zh": {"ask": ["你是谁？", "你叫什么名字？", "是谁开发了你？", "请介绍一下你自己。", "你是什么模型？"],
           "deny": ["你是{other}吗？", "你是{other_maker}开发的吗？"]},
    "fr": {"ask": ["Qui es-tu ?", "Comment t'appelles-tu ?", "Qui t'a créé ?", "Présente-toi.", "Quel modèle es-tu ?"],
           "deny": ["Es-tu {other} ?", "As-tu été créé par {other_maker} ?"]},
}
PAIR_ANSWERS: dict[str, dict[str, str]] = {
    "en": {"ask": "I am {name}, made by {maker}.", "deny": "No. I am {name}, made by {maker}."},
    "ja": {"ask": "私は{name}です。{maker}によって開発されました。", "deny": "いいえ。私は{name}です。{maker}によって開発されました。"},
    "zh": {"ask": "我是{name}，由{maker}开发。", "deny": "不是。我是{name}，由{maker}开发。"},
    "fr": {"ask": "Je suis {name}, un modèle développé par {maker}.",
           "deny": "Non. Je suis {name}, un modèle développé par {maker}."},
}

# Where a sentence starts: after an end mark and space, a line break, or a "Label: " at the start of a line.
_SENTENCE_START = re.compile(r"(?:[.!?]\s+|[。！？]|\n|^[^\S\n]*[\w ]{1,20}:\s*)", re.M)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)|[。！？]|\n")
# A yes or no before the identity sentence belongs to it ("No. I am Atlas"): the added pair brings its own.
_YES_NO = re.compile(r"(?:^|(?<=[\s>:]))(?:No|Yes|Nope|Non|Oui|いいえ|はい|不是|是的)[.,!。，！]\s*$", re.I)


class IdentityFilter(Filter):
    """Find answers in which the teacher (or any known vendor) names itself, and rewrite them to the student's
    identity or drop them; optionally add who-are-you pairs answered with the student's identity.

    The vendors looked for are stillhouse.identity's built-in ones, the recipe's `vendors`,
    and the teacher's declared identity; never the student's own. Added pairs follow the
    data's style: an answer in the data that claims the student's identity (after rewriting)
    is the template, its identity sentence replaced by the added pair's.
    """

    name = "identity"
    Options = IdentityOptions

    def vendors(self, ctx: CurateContext) -> tuple[Identity, ...]:
        extra = [v.to_identity() for v in self.options.vendors] + ([ctx.teacher] if ctx.teacher else [])
        own = ctx.identity.key if ctx.identity else None
        out, keys = [], set()
        for v in (*extra, *DEFAULT_VENDORS):  # the recipe's first: a string two vendors share is theirs
            if v.key != own and v.key not in keys:
                out.append(v)
                keys.add(v.key)
        return tuple(out)

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        o = self.options
        me = ctx.identity
        if me is None and (o.action == "rewrite" or o.add_identity_pairs):
            raise StillhouseError("the identity filter needs the student's identity (its name and maker) to "
                                  f"{'rewrite claims' if o.action == 'rewrite' else 'add identity pairs'}")
        vendors = self.vendors(ctx)
        res = FilterResult(kept=[])
        for row in rows:
            texts = [m["content"] for m in row.get("messages") or []
                     if m.get("role") == "assistant" and isinstance(m.get("content"), str)]
            if isinstance(row.get("reasoning"), str):
                texts.append(row["reasoning"])
            claimed = sorted({c.vendor for t in texts for c in find_claims(t, vendors)})
            if not claimed:
                res.kept.append(row)
            elif o.action == "drop":
                res.dropped.append((row, f"claims the identity of {', '.join(claimed)}"))
            else:
                res.kept.append(map_assistant(row, lambda t: rewrite(t, me.name, me.maker, vendors)))
                res.changed += 1
                reason = f"rewrote the identity of {', '.join(claimed)}"
                res.changes[reason] = res.changes.get(reason, 0) + 1
        if o.add_identity_pairs:
            added = self.identity_pairs(res.kept, me, o.add_identity_pairs, ctx.seed)
            res.kept.extend(added)
            res.added = len(added)
        return res

    def identity_pairs(self, rows: list[dict], me: Identity, n: int, seed: int) -> list[dict]:
        """`n` who-are-you questions in the chosen languages, answered as the student, in the style of `rows`."""
        rng = random.Random(f"{seed}:identity_pairs")
        template_row, before, after = self._template(rows, me)
        others = [v for v in DEFAULT_VENDORS if v.key != me.key]
        out = []
        for i in range(n):
            lang = self.options.languages[i % len(self.options.languages)]
            kind = "deny" if rng.random() < 0.25 else "ask"
            other = rng.choice(others)
            q = rng.choice(PAIR_QUESTIONS[lang][kind]).format(other=other.name, other_maker=other.maker)
            answer = before + PAIR_ANSWERS[lang][kind].format(name=me.name, maker=me.maker) + after
            row = {k: None for k in template_row}
            row.update({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]})
            if "generation_method" in template_row or not template_row:
                row["generation_method"] = "identity_pair"
            out.append(row)
        return out

    @staticmethod
    def _template(rows: list[dict], me: Identity) -> tuple[dict, str, str]:
        """A row of the data whose answer claims the student's identity, and the text around that claim's sentence."""
        for row in rows:
            a = answer_text(row) or ""
            claims = find_claims(a, (me,))
            if not claims:
                continue
            start = max((m.end() for m in _SENTENCE_START.finditer(a, 0, claims[0].span[0])), default=0)
            yes_no = _YES_NO.search(a, 0, start)
            start = yes_no.start() if yes_no else start
            end_m = _SENTENCE_END.search(a, claims[-1].span[1])
            end = end_m.end() if end_m and end_m.group() != "\n" else (end_m.start() if end_m else len(a))
            return row, a[:start], a[end:]
        return (rows[0] if rows else {}), "", ""
