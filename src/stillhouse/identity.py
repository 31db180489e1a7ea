"""Who a text says it is: a model's self-identification, found, rewritten and classified.

A teacher's answers name the teacher ("I am ChatGPT, developed by OpenAI"); a student
trained on them says the same. Curation finds those claims and rewrites them to the
student's own identity (or drops the sample); the audit later asks a student who it is and
classifies the answer. Both use this module.

Vendors are data: an `Identity` is a model's name and maker with the other names each goes
by, and `DEFAULT_VENDORS` lists the major ones and the demo's Atlas. A recipe or a user adds
one with `Identity(name="Mira", maker="Lumen Works")`.

A claim is a vendor's name or maker inside a first-person frame ("I am X", "my name is X",
"I was developed by X", "私はXです", "我是由X开发的", "Je suis X, développé par X" ...), so a
mere mention ("I used ChatGPT yesterday", "OpenAI released GPT-4") is not one. The frames
are regular expressions, written by hand: no well-kept library finds self-identification.
English, Japanese, Chinese and French are covered; `FRAMES` can be extended.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Literal

Kind = Literal["name", "maker"]


@dataclass(frozen=True)
class Identity:
    """A model's identity: its name and maker, and the other names each goes by.

    `names` are further model names (GPT-4, GPT-4o, Bard ...); `makers` further maker names
    (Google DeepMind, 阿里云 ...). A version tail after a name ("Claude 3.5 Sonnet",
    "Qwen2.5-Max", "DeepSeek-R1") is matched without listing it. `key` names the vendor in
    claims and reports; by default the name, lower-cased.
    """

    name: str
    maker: str
    names: tuple[str, ...] = ()
    makers: tuple[str, ...] = ()
    key: str = ""

    def __post_init__(self) -> None:
        if not self.name.strip() or not self.maker.strip():
            raise ValueError("an identity needs a non-empty name and maker")
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "makers", tuple(self.makers))
        if not self.key:
            object.__setattr__(self, "key", self.name.lower())

    @property
    def all_names(self) -> tuple[str, ...]:
        return (self.name, *self.names)

    @property
    def all_makers(self) -> tuple[str, ...]:
        return (self.maker, *self.makers)


DEFAULT_VENDORS: tuple[Identity, ...] = (
    Identity("ChatGPT", "OpenAI", ("GPT", "OpenAI o1", "OpenAI o3"), ("Open AI",), key="openai"),
    Identity("Claude", "Anthropic", (), ("Anthropic PBC",), key="anthropic"),
    Identity("Gemini", "Google", ("Bard", "PaLM", "LaMDA", "Gemma"),
             ("Google DeepMind", "DeepMind", "Google AI", "Google Brain", "谷歌", "グーグル"), key="google"),
    Identity("DeepSeek", "DeepSeek", ("深度求索",), ("DeepSeek AI", "DeepSeek-AI", "深度求索", "深度求索公司"), key="deepseek"),
    Identity("Qwen", "Alibaba", ("Tongyi Qianwen", "Tongyi", "通义千问", "通義千問", "通义", "千问"),
             ("Alibaba Cloud", "Alibaba Group", "阿里巴巴", "阿里云", "阿里巴巴集团", "アリババ"), key="qwen"),
    Identity("Llama", "Meta", ("LLaMA",), ("Meta AI", "Meta Platforms", "Facebook", "Facebook AI"), key="meta"),
    Identity("Grok", "xAI", (), ("X.AI",), key="xai"),
    Identity("Mistral", "Mistral AI", ("Mixtral", "Le Chat", "Codestral", "Ministral"), ("Mistral",), key="mistral"),
    Identity("Atlas", "Orbit Labs", (), (), key="atlas"),
    # Open-weight and regional assistants a user meets; appended, so the entries above (the audit's "other" vendors
    # are the first two) keep their places. Bare words that are also ordinary words stay out: "文心" (文心雕龙),
    # "字节" (a byte), "キミ" (you).
    Identity("SmolLM", "Hugging Face", (), ("Hugging Face Inc", "ハギングフェイス", "抱抱脸"),
             key="huggingface"),
    Identity("Phi", "Microsoft", (), ("Microsoft Research", "Microsoft Corporation", "微软", "微軟", "マイクロソフト"),
             key="microsoft"),
    Identity("Yi", "01.AI", (), ("01AI", "零一万物", "零一萬物"), key="01ai"),
    Identity("ChatGLM", "Zhipu AI", ("GLM", "智谱清言", "智譜清言"),
             ("Zhipu", "Z.ai", "智谱", "智谱AI", "智譜", "北京智谱华章科技有限公司"), key="zhipu"),
    Identity("Kimi", "Moonshot AI", ("Kimi智能助手",), ("Moonshot", "月之暗面", "月之暗面科技", "ムーンショット"),
             key="moonshot"),
    Identity("ERNIE", "Baidu", ("ERNIE Bot", "文心一言", "文心大模型", "文心一格"), ("百度", "百度公司", "バイドゥ"),
             key="baidu"),
    Identity("Doubao", "ByteDance", ("豆包",), ("Byte Dance", "字节跳动", "字節跳動", "バイトダンス"), key="bytedance"),
    Identity("Hunyuan", "Tencent", ("Tencent Hunyuan", "混元", "腾讯混元", "騰訊混元"),
             ("腾讯", "騰訊", "テンセント", "Tencent AI Lab"), key="tencent"),
)

# What may follow a model's name as part of it: a version, a size, a variant. Generic, so a
# vendor lists only its families ("GPT", not every GPT release).
_TAIL_WORDS = ("turbo|mini|nano|pro|ultra|flash|lite|opus|sonnet|haiku|instant|max|plus|large|medium|small|"
               "chat|coder|instruct|omni|vision|preview|reasoner|next|moe|air|lightning")
_TAIL = rf"(?:[ -]?[vr]?\d+(?:\.\d+)*[a-z]?\b|[ -](?:{_TAIL_WORDS})\b|[ -]\d+[bmk]\b)*"

# First-person frames around a name ({N}) or a maker ({M}), per language: (language, kind, pattern).
# A gap inside a frame is "tempered": it may not hold words that turn a claim into a mention
# ("I am familiar with models trained by OpenAI") or a denial ("I am not made by OpenAI").
# "I am" followed by a gerund is an activity, not a self-description ("I'm working on a model trained by ...").
# A full stop ends a sentence only before a space or the end ("Llama 3.1" goes on).
_EN_GAP = r"(?:(?!\b(?:not|never|with|about|like|than|using|use|used|from)\b)(?:[^.!?\n]|\.(?=\w))){0,80}?"
_EN_NOUN = r"(?:model|assistant|AI|chatbot|LLM|system)"
_EN_AM = r"\bI(?:\s+am|\s*['’]m)"
_EN_I_AM = r"\bI(?:\s+am|\s*['’]m|\s+was|\s*['’]ve\s+been|\s+have\s+been)\b(?!\s+\w+ing\b)"
_EN_MADE = (r"(?:made|created|developed|built|trained|designed|produced|programmed|engineered|fine[- ]tuned|"
            r"pre-?trained|released|launched|owned)")
_EN_BY = r"\s+by\s+(?:the\s+(?:team|folks|researchers|engineers|people)\s+(?:at|of)\s+|the\s+)?"
_JA_I = r"(?:私|わたし|わたくし|僕|ぼく|自分)"
_JA_MADE = r"(?:開発|作成|訓練|トレーニング|構築|作ら|作っ|作り|設計|学習|製作|制作|提供)"
_ZH_MADE = r"(?:开发|研发|训练|创建|创造|打造|推出|设计|构建|制作|开發|研發|訓練)"
_ZH_GAP = r"(?:(?!用|问|和|跟|看|读|听|喜欢|说|对|给|不|非|并非)[^。！？!?\n]){0,30}?"
_FR_MADE = (r"(?:créée?|développée?|conçue?|entraînée?|entrainée?|formée?|fabriquée?|programmée?|construite?|"
            r"mise?\s+au\s+point|lancée?)s?")
_FR_GAP = r"(?:(?!\b(?:pas|jamais|avec|utilise|utilisé)\b)(?:[^.!?\n]|\.(?=\w))){0,80}?"

FRAMES: list[tuple[str, Kind, str]] = [
    # English
    ("en", "name", _EN_AM + r"\s+(?:(?:called|named|known\s+as)\s+)?{N}"),
    ("en", "name", _EN_AM + r"\s+(?:an?\s+)?(?:(?!not\b|never\b)[\w-]+\s+){0,5}?(?:called|named|known\s+as)\s+{N}"),
    ("en", "name", r"\b(?:my\s+name\s+is|my\s+name['’]s|call\s+me|I\s+go\s+by|people\s+call\s+me)\s+{N}"),
    ("en", "name", _EN_AM + r"\b(?!\s+\w+ing\b)" + _EN_GAP + r"\b(?:(?:built|based)\s+on|powered\s+by|"
                   r"a\s+version\s+of|an?\s+instance\s+of|a\s+variant\s+of|part\s+of\s+the)\s+(?:the\s+)?{N}"),
    ("en", "name", r"\bAs\s+{N}\s*,\s*I\b"),
    ("en", "name", r"\byou(?:\s+are|\s*['’]re)\s+(?:talking|chatting|speaking)\s+(?:to|with)\s+{N}"),
    ("en", "maker", _EN_I_AM + _EN_GAP + r"\b(?:" + _EN_MADE + _EN_BY
                    + r"|" + _EN_NOUN + r"\s+(?:from|by)\s+(?:the\s+)?){M}"),
    ("en", "maker", r"\bAs\s+an?\s+[^.!?\n,]{0,60}?\b" + _EN_MADE + _EN_BY + "{M}"),
    ("en", "maker", r"\bmy\s+(?:creators?|developers?|makers?|parent\s+company|company|trainers?)\s+"
                    r"(?:is|are|was|were)\s+(?:the\s+team\s+at\s+)?{M}"),
    ("en", "maker", r"{M}\s+(?:made|created|developed|built|trained|designed)\s+me\b"),
    # ... but "I am a Google AI researcher", "I'm a Hugging Face model hub user" are people
    ("en", "maker", _EN_AM + r"\s+(?:an?\s+)?{M}(?:['’]s)?\s+(?:[\w-]+\s+){0,3}?" + _EN_NOUN + r"\b"
                    r"(?![\s-]+(?:hub\s+)?(?:users?|fans?|researchers?|developers?|engineers?|enthusiasts?|experts?|"
                    r"employees?|hub|card|repo(?:sitory)?|zoo)\b)"),
    # Japanese
    ("ja", "name", _JA_I + r"(?:は|の名前は)、?\s*{N}\s*"
                   r"(?=です|でございます|と申します|といいます|と言います|と呼ばれ|という|、|。|で、|であり|だ|！|!|\s*$)"),
    ("ja", "name", r"{N}\s*(?:と申します|と呼ばれています)"),
    ("ja", "name", r"{N}\s*として、?\s*" + _JA_I + r"は"),
    ("ja", "maker", _JA_I + r"(?:は|も)(?:(?!を|と|に|の?ことを)[^。！？!?\n]){0,40}?{M}\s*(?:によって|により|が|の手で)"
                    r"\s*" + _JA_MADE + r"(?![^。！？!?\n]*を)"),
    # no subject: the speaker's own ("OpenAIによって開発されたAIアシスタントです"); any topic (は) makes it a mention
    ("ja", "maker", r"(?:^|[。！？!?\n])\s*(?:[^。！？!?\nはを]{0,20}?[、,]\s*)?{M}\s*(?:によって|により|が)\s*" + _JA_MADE
                    + r"(?:され|し)(?:た[^。！？!?\nはを]{0,30}?(?:です|でございます)|ました)"),
    # Chinese
    ("zh", "name", r"我(?:是|叫|的名字是|的名字叫|名叫|名为|就是)\s*{N}(?!\s*的)"),
    ("zh", "name", r"我是(?:一个|一款|一种)?(?:名为|叫做?|名叫)\s*{N}"),
    ("zh", "name", r"我是" + _ZH_GAP + r"的\s*{N}(?!\s*的)"),
    ("zh", "name", r"作为\s*{N}\s*[，,]\s*我"),
    ("zh", "maker", r"我(?:是|乃)?" + _ZH_GAP + r"(?:由|被)\s*{M}"),
    ("zh", "maker", r"我是(?:一个|一款)?\s*{M}(?:公司|团队)?(?:所)?" + _ZH_MADE),
    ("zh", "maker", r"我的(?:开发者|创造者|制造者|创建者|开发商|开发团队|研发团队|公司)(?:是|为)\s*{M}"),
    ("zh", "maker", r"我来自\s*{M}"),
    ("zh", "maker", r"作为[^。！？!?\n，,]{0,15}?由\s*{M}"),
    ("zh", "maker", r"{M}(?:公司|团队)?" + _ZH_MADE + r"了我"),
    # French
    ("fr", "name", r"\b(?:je\s+suis|je\s+m['’]appelle|mon\s+nom\s+est|on\s+m['’]appelle|appelez-moi)\s+{N}"),
    ("fr", "name", r"\bje\s+suis\s+(?:un|une)\s+(?:(?!pas\b)[\w'’-]+\s+){0,5}?(?:appelée?|nommée?)\s+{N}"),
    ("fr", "name", r"\bje\s+suis\s+(?:basée?\s+sur|une\s+version\s+de)\s+{N}"),
    ("fr", "name", r"\bEn\s+tant\s+que\s+{N}\s*,"),
    ("fr", "maker", r"\b(?:je\s+suis|j['’]ai\s+été|je\s+fus)\b" + _FR_GAP + r"\b" + _FR_MADE
                    + r"\s+par\s+(?:l['’]équipe\s+d(?:e\s+|['’]))?{M}"),
    ("fr", "maker", r"\bEn\s+tant\s+qu(?:e\s+|['’])[^.!?\n,]{0,60}?\b" + _FR_MADE + r"\s+par\s+{M}"),
    ("fr", "maker", r"\bje\s+suis\s+(?:un|une|l['’]|le|la)\s*(?:modèle|assistante?|IA|intelligence\s+artificielle|"
                    r"chatbot|agent)(?:\s+[\w-]+){0,2}?\s+(?:d['’]|de\s+)\s*{M}"),
    ("fr", "maker", r"{M}\s+m['’]a\s+(?:créée?|développée?|entraînée?|conçue?|formée?)"),
]


@dataclass(frozen=True)
class Claim:
    """One self-identification: which vendor, the text that named it, name or maker, where, in which language."""

    vendor: str
    text: str
    kind: Kind
    span: tuple[int, int]
    language: str


def _alternation(words: Iterable[str]) -> str:
    # Longest first, so "Google DeepMind" wins over "Google"; a space in a name also matches a hyphen or nothing.
    alts = sorted({w for w in words if w}, key=len, reverse=True)
    return "|".join(re.escape(w).replace(r"\ ", r"[\s-]?") for w in alts)


def _norm(s: str) -> str:
    return re.sub(r"[\s-]+", "", s).casefold()


@lru_cache(maxsize=64)
def _compiled(vendors: tuple[Identity, ...]) -> tuple[tuple[str, ...], list[tuple[str, Kind, re.Pattern]], dict]:
    if not vendors:
        return (), [], {}
    lookup: dict[tuple[Kind, str], str] = {}
    for v in vendors:  # the first vendor listed wins a string two of them share
        for n in v.all_names:
            lookup.setdefault(("name", _norm(n)), v.key)
        for m in v.all_makers:
            lookup.setdefault(("maker", _norm(m)), v.key)
    slot = {
        # Latin names need word edges ("Atlasia" is not Atlas); CJK text has no spaces, so "私はChatGPTです" needs none
        # on the right. The atomic groups keep a failed edge from backtracking into a shorter name ("GPT" of "GPT-4的").
        "N": r"(?P<x>(?<![A-Za-z0-9])(?>(?P<base>" + _alternation(n for v in vendors for n in v.all_names) + ")"
             + r"(?>" + _TAIL + r"))(?![A-Za-z0-9-]))",
        "M": r"(?P<x>(?<![A-Za-z0-9])(?>(?P<base>" + _alternation(m for v in vendors for m in v.all_makers) + r"))"
             r"(?![A-Za-z0-9-]))",
    }
    out = []
    for lang, kind, frame in FRAMES:
        pattern = frame.replace("{N}", slot["N"]) if kind == "name" else frame.replace("{M}", slot["M"])
        out.append((lang, kind, re.compile(pattern, re.IGNORECASE)))
    # Most texts name no vendor at all; plain substring tests for the longest word of each name spare them the frames.
    words = (w for v in vendors for w in (*v.all_names, *v.all_makers))
    needles = tuple(sorted({max(re.split(r"[\s-]", w.casefold()), key=len) for w in words}))
    return needles, out, lookup


def _as_tuple(vendors: Iterable[Identity]) -> tuple[Identity, ...]:
    return vendors if isinstance(vendors, tuple) else tuple(vendors)


def find_claims(text: str, vendors: Iterable[Identity] = DEFAULT_VENDORS) -> list[Claim]:
    """Every self-identification in `text` naming one of `vendors`, in order of position.

    Overlapping matches keep the earliest (then longest); a name also listed as a maker
    ("DeepSeek") is a name or a maker claim by its frame ("I am DeepSeek" / "made by DeepSeek").
    """
    if not text:
        return []
    needles, frames, lookup = _compiled(_as_tuple(vendors))
    folded = text.casefold()
    if not any(n in folded for n in needles):
        return []
    found: list[Claim] = []
    for lang, kind, rx in frames:
        for m in rx.finditer(text):
            key = lookup.get((kind, _norm(m.group("base"))))
            if key is not None:
                found.append(Claim(key, m.group("x"), kind, m.span("x"), lang))
    found.sort(key=lambda c: (c.span[0], -(c.span[1] - c.span[0])))
    out: list[Claim] = []
    for c in found:
        if not out or c.span[0] >= out[-1].span[1]:
            out.append(c)
    return out


def _vendor(vendor: Identity | str, vendors: Iterable[Identity]) -> Identity:
    if isinstance(vendor, Identity):
        return vendor
    for v in vendors:
        if v.key == vendor or v.name == vendor:
            return v
    raise KeyError(f"unknown vendor {vendor!r} (known: {', '.join(v.key for v in vendors)})")


def claims_identity(text: str, vendor: Identity | str, vendors: Iterable[Identity] = DEFAULT_VENDORS) -> bool:
    """Whether `text` claims `vendor`'s identity (an Identity, or the key of one of `vendors`)."""
    return bool(find_claims(text, (_vendor(vendor, vendors),)))


def _fix_article(before: str, new: str) -> str:
    """`before` (the text up to a replaced word) with a preceding English or French article agreeing with `new`."""
    vowel = new[:1].lower() in "aeiouàâéèêëîïôûüh" and not new.lower().startswith(("uni", "use", "one", "eu"))
    m = re.search(r"(?:(?<=\s)|^)(a|an|A|An)\s+$", before)
    if m:
        article = ("An" if m.group(1)[0] == "A" else "an") if vowel else m.group(1)[0]
        return before[:m.start(1)] + article + before[m.end(1):]
    m = re.search(r"\b([dDlL])['’]\s*$|\b(de|De|le|Le|la|La)\s+$", before)
    if m:
        if m.group(1):  # elided before the old word: "d'OpenAI"
            return before if vowel else before[:m.start()] + {"d": "de", "l": "le"}[m.group(1).lower()] + " "
        if vowel:
            return before[:m.start()] + m.group(2)[0] + "'"
    return before


def rewrite(text: str, name: str, maker: str, vendors: Iterable[Identity] = DEFAULT_VENDORS) -> str:
    """`text` with every claim of `vendors`' identity rewritten to `name` and `maker`.

    Only the claimed name or maker changes, so the sentence keeps its shape and language
    ("I am ChatGPT, developed by OpenAI" → "I am Nova, developed by Northwind"; "No. I am
    Atlas, made by Orbit Labs." → "No. I am Nova, made by Northwind."); an English article
    or a French "de"/"d'" before it is made to agree with the new word. Mentions that are not
    claims are left alone.
    """
    claims = find_claims(text, vendors)
    if not claims:
        return text
    out, pos = "", 0
    for c in claims:
        new = name if c.kind == "name" else maker
        out = _fix_article(out + text[pos:c.span[0]], new) + new
        pos = c.span[1]
    return out + text[pos:]


def restate(text: str, own: Identity | None, teacher: Identity | None) -> str:
    """`text` (a reference answer that names the teacher) restated with `own` identity; unchanged when there is none.

    What a model with its own declared identity should say where the teacher named itself: the
    evaluation's identity items and curation's verifier gate both check answers against it.
    """
    if own is None:
        return text
    vendors = (teacher, *DEFAULT_VENDORS) if teacher is not None else DEFAULT_VENDORS
    return rewrite(text, own.name, own.maker, vendors)


def classify(text: str, own: Identity, reference: Identity,
             vendors: Iterable[Identity] = DEFAULT_VENDORS) -> Literal["reference", "own", "other", "none"]:
    """Which identity `text` claims: the `reference` model's (e.g. the teacher's), its `own`, another vendor's, or none.

    A text claiming the reference's identity is "reference" even if it also claims its own
    ("I am Nova, based on GPT-4"): the measure counts answers that still carry the teacher's.
    """
    extra = tuple(v for v in vendors if v.key not in (own.key, reference.key))
    keys = {c.vendor for c in find_claims(text, (reference, own, *extra))}
    if reference.key in keys:
        return "reference"
    if own.key in keys:
        return "own"
    return "other" if keys else "none"


def classify_all(texts: Iterable[str], own: Identity | None, reference: Identity,
                 vendors: Iterable[Identity] = DEFAULT_VENDORS) -> list[str]:
    """`classify` for each text; without an identity of its own a text can only claim the reference's, another's,
    or none."""
    vendors = tuple(vendors)
    return [classify(t, own or reference, reference, vendors) for t in texts]


def identity_from(data: dict | Identity | None) -> Identity | None:
    """An Identity from a mapping (name, maker, optional names, makers, key), as a recipe writes one."""
    if data is None or isinstance(data, Identity):
        return data
    return Identity(name=data["name"], maker=data["maker"], names=tuple(data.get("names", ())),
                    makers=tuple(data.get("makers", ())), key=data.get("key", ""))
