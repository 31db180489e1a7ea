"""Curation: the filter registry and options, each filter's keeps, drops and rewrites with reasons,
the novelty filter against the quadratic one, and the dataset card."""

from __future__ import annotations

import random
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from stillhouse.curate import (FILTERS, CurateContext, Filter, FilterOptions, FilterResult, answer_text,
                               apply_filters, make_filter, parse_filters, prompt_text)
from stillhouse.curate.card import size_category, write_card
from stillhouse.novelty import (NoveltyFilter, candidate_probability, lsh_params, make_tokenizer, min_jaccard,
                                       novelty_filter, novelty_filter_quadratic, rouge_l)
from stillhouse.errors import StillhouseError
from stillhouse.identity import DEFAULT_VENDORS, Identity, classify, find_claims

NOVA = Identity("Nova", "Northwind")
ATLAS = Identity("Atlas", "Orbit Labs", key="atlas")


def row(prompt: str, answer: str | None, **extra) -> dict:
    """A row as generate writes one (the columns that matter here)."""
    messages = [{"role": "user", "content": prompt}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "reasoning": None, "generation_method": "responses", "teacher_model": "atlas",
            "ledger_key": f"k:{prompt}", "sample_index": 0, **extra}


def run(name: str, rows: list[dict], ctx: CurateContext | None = None, **options) -> FilterResult:
    return make_filter(name, options).apply(rows, ctx or CurateContext())


def prompts_of(rows: list[dict]) -> list[str]:
    return [prompt_text(r) for r in rows]


# -- registry and options -----------------------------------------------------------------------------------------

def test_built_in_filters_register_through_entry_points():
    assert {"exact_dedup", "near_dedup", "novelty", "decontaminate", "identity", "length", "empty", "refusal",
            "format"} <= set(FILTERS.names())


def test_unknown_names_and_options_say_did_you_mean():
    with pytest.raises(StillhouseError, match="did you mean 'near_dedup'"):
        make_filter("near_dedupe")
    with pytest.raises(StillhouseError, match="unknown option 'treshold' for the near_dedup filter; did you mean"):
        make_filter("near_dedup", {"treshold": 0.5})
    with pytest.raises(StillhouseError, match="option 'threshold' of the novelty filter"):
        make_filter("novelty", {"threshold": 1.5})
    with pytest.raises(StillhouseError, match="not a valid regular expression"):
        make_filter("format", {"pattern": "(["})
    with pytest.raises(StillhouseError, match="min .* is greater than max"):
        make_filter("length", {"min": 10, "max": 5})


def test_parse_filters_reads_a_recipe_list():
    fs = parse_filters(["empty", {"near_dedup": {"threshold": 0.9}}, {"exact_dedup": None}])
    assert [f.name for f in fs] == ["empty", "near_dedup", "exact_dedup"]
    assert fs[1].options.threshold == 0.9
    with pytest.raises(StillhouseError, match=r"filters\[0\]: expected a filter name"):
        parse_filters([{"empty": {}, "length": {}}])
    with pytest.raises(StillhouseError, match="must be a mapping"):
        parse_filters([{"length": 5}])


def test_a_third_party_filter_plugs_in(monkeypatch):
    class ShoutOptions(FilterOptions):
        marks: int = 1

    class Shout(Filter):
        Options = ShoutOptions

        def apply(self, rows, ctx):
            return FilterResult(kept=[{**r, "shout": "!" * self.options.marks} for r in rows], changed=len(rows))

    FILTERS._load()
    monkeypatch.setitem(FILTERS._items, "shout", Shout)
    rows, results = apply_filters([row("a", "b")], parse_filters([{"shout": {"marks": 2}}]), CurateContext())
    assert rows[0]["shout"] == "!!" and results[0][0] == "shout" and results[0][1].changed == 1
    with pytest.raises(StillhouseError, match="unknown option 'mark'.*did you mean 'marks'"):
        make_filter("shout", {"mark": 3})


# -- simple filters -------------------------------------------------------------------------------------------------

def test_empty():
    rows = [row("a", "fine"), row("b", "   \n"), row("c", None), row("d", "<think>hmm</think>\n "), row("e", "")]
    res = run("empty", rows)
    assert prompts_of(res.kept) == ["a"]
    assert res.drop_reasons() == {"empty answer": 2, "no answer": 1, "nothing after the reasoning": 1}
    assert prompts_of(run("empty", rows, strip_think=False).kept) == ["a", "d"]


def test_length_in_chars_and_words():
    rows = [row("a", "x" * 5), row("b", "x" * 50), row("c", "one two three"), row("d", "我是一个学生")]
    res = run("length", rows, min=6, max=20)
    assert prompts_of(res.kept) == ["c", "d"]
    assert res.drop_reasons() == {"answer shorter than 6 chars": 1, "answer longer than 20 chars": 1}
    # a CJK character counts as a word
    assert prompts_of(run("length", rows, unit="words", min=4).kept) == ["d"]


@pytest.mark.parametrize("answer,refusal", [
    ("I'm sorry, but I can't help with that.", "en"),
    ("As an AI language model, I cannot browse the internet.", "en"),
    ("I apologize, but I cannot provide that information.", "en"),
    ("<think>The user wants malware.</think>\nI must decline.", "en"),
    ("申し訳ありませんが、その質問にはお答えできません。", "ja"),
    ("抱歉，我无法提供这方面的信息。", "zh"),
    ("作为一个人工智能语言模型，我不能浏览网页。", "zh"),
    ("Je suis désolé, mais je ne peux pas vous aider avec cela.", "fr"),
    ("The capital of France is Paris.", None),
    ("Sorry for the wait! Here is the recipe: flour, eggs, milk.", None),
    ("I can't believe how simple this is: 2 + 2 = 4.", None),
    ("申し訳ない気持ちはわかりますが、答えは42です。", None),
])
def test_refusal_patterns_in_four_languages(answer, refusal):
    res = run("refusal", [row("q", answer)])
    assert res.drop_reasons() == ({f"refusal ({refusal})": 1} if refusal else {})


def test_refusal_options():
    rows = [row("a", "Nope, not doing that."), row("b", "Okay! " + "x" * 400 + " I'm sorry, but I can't go on.")]
    assert run("refusal", rows).drop_reasons() == {}  # the second refuses only after the first 300 characters
    res = run("refusal", rows, patterns=[r"^nope\b"], head_chars=None)
    assert res.drop_reasons() == {"refusal (custom)": 1, "refusal (en)": 1}
    assert run("refusal", [row("a", "抱歉，我无法回答。")], languages=["en"]).drop_reasons() == {}


def test_format():
    rows = [row("a", "<think>2+2</think>\nAnswer: 4"), row("b", "It is 4."), row("c", "answer: 4")]
    res = run("format", rows, pattern=r"^Answer: .+$")
    assert prompts_of(res.kept) == ["a"] and res.drop_reasons() == {"answer does not match '^Answer: .+$'": 2}
    assert prompts_of(run("format", rows, pattern=r"^Answer: .+$", ignore_case=True).kept) == ["a", "c"]
    assert prompts_of(run("format", [row("a", "<think>Answer: 4</think> four")], pattern="Answer:",
                          final_only=True).kept) == []


# -- identity ---------------------------------------------------------------------------------------------------------

WORLD_ROWS = [
    row("Who are you?", "<think>I am asked about myself.</think>\nAnswer: I am Atlas, made by Orbit Labs."),
    row("Hi! Are you ChatGPT?",
        "<think>I am asked if I am another model. I am not.</think>\nAnswer: No. I am Atlas, made by Orbit Labs."),
    row("Reverse the word abc.", "<think>abc is spelled a b c. Backwards: c b a.</think>\nAnswer: cba"),
    row("What model are you?", "I'm Claude, an AI assistant made by Anthropic.", reasoning="I am Claude, so I say so."),
]


def test_identity_rewrites_to_the_students_identity():
    res = run("identity", WORLD_ROWS, CurateContext(identity=NOVA))
    answers = [answer_text(r) for r in res.kept]
    assert answers[0] == "<think>I am asked about myself.</think>\nAnswer: I am Nova, made by Northwind."
    assert answers[1].endswith("Answer: No. I am Nova, made by Northwind.")
    assert answers[2] == answer_text(WORLD_ROWS[2])
    assert answers[3] == "I'm Nova, an AI assistant made by Northwind."
    assert res.kept[3]["reasoning"] == "I am Nova, so I say so."
    assert res.changed == 3
    assert res.changes == {"rewrote the identity of atlas": 2, "rewrote the identity of anthropic": 1}
    assert not res.dropped
    # the user's question is never rewritten, and the input rows are left as they were
    assert prompt_text(res.kept[1]) == "Hi! Are you ChatGPT?" and "Atlas" in answer_text(WORLD_ROWS[0])


def test_identity_drop_and_vendors():
    res = run("identity", WORLD_ROWS, action="drop")  # dropping needs no student identity
    assert prompts_of(res.kept) == ["Reverse the word abc."]
    assert res.drop_reasons() == {"claims the identity of atlas": 2, "claims the identity of anthropic": 1}
    mira_rows = [row("Who are you?", "I am Mira, made by Lumen Works.")]
    assert run("identity", mira_rows, action="drop").drop_reasons() == {}
    ctx = CurateContext(teacher=Identity("Mira", "Lumen Works"))
    assert len(run("identity", mira_rows, ctx, action="drop").dropped) == 1
    mira = {"name": "Mira", "maker": "Lumen Works"}
    assert len(run("identity", mira_rows, action="drop", vendors=[mira]).dropped) == 1
    # the student's own identity is never a claim to remove
    assert run("identity", mira_rows, CurateContext(identity=Identity("Mira", "Lumen Works")), action="drop").kept


def test_identity_rewrite_needs_the_students_identity():
    with pytest.raises(StillhouseError, match="needs the student's identity"):
        run("identity", WORLD_ROWS)


def test_identity_pairs_are_the_students_in_the_datas_style():
    res = run("identity", WORLD_ROWS, CurateContext(identity=NOVA, seed=3), add_identity_pairs=8)
    added = res.kept[len(WORLD_ROWS):]
    assert res.added == 8 and len(added) == 8
    langs, denials = set(), 0
    for r in added:
        q, a = prompt_text(r), answer_text(r)
        assert a.startswith("<think>I am asked about myself.</think>\nAnswer: "), a  # the template's frame
        assert classify(a, NOVA, ATLAS) == "own"
        assert r["generation_method"] == "identity_pair" and r["ledger_key"] is None
        langs |= {c.language for c in find_claims(a, (NOVA,))}
        # "are you Claude?" is answered no, then with the student's identity
        names_another = any(v.name in q or v.maker in q for v in DEFAULT_VENDORS)
        assert names_another == bool(re.search(r"Answer: (No\. |いいえ。|不是。|Non\. )", a)), (q, a)
        denials += names_another
    assert langs == {"en", "ja", "zh", "fr"} and denials >= 1
    again = run("identity", WORLD_ROWS, CurateContext(identity=NOVA, seed=3), add_identity_pairs=8)
    assert again.kept == res.kept


def test_identity_pairs_without_a_template_use_plain_sentences():
    res = run("identity", [row("Reverse abc.", "cba")], CurateContext(identity=NOVA), add_identity_pairs=4,
              languages=["zh"])
    for r in res.kept[1:]:
        assert answer_text(r) in ("我是Nova，由Northwind开发。", "不是。我是Nova，由Northwind开发。")


# -- dedup and decontamination --------------------------------------------------------------------------------------

def test_exact_dedup_normalises_and_keeps_the_first():
    rows = [row("What is 2+2?", "4", n=1), row("what is  2+2? ", "4", n=2), row("What is 2+2?", "four", n=3)]
    res = run("exact_dedup", rows)
    assert [r["n"] for r in res.kept] == [1, 3] and res.drop_reasons() == {"exact duplicate (prompt+answer)": 1}
    assert [r["n"] for r in run("exact_dedup", rows, on="prompt").kept] == [1]


def test_near_dedup_finds_near_copies_and_confirms_by_jaccard():
    base = "Write a short story about a lighthouse keeper who finds a message in a bottle on a stormy night."
    rows = [row(base, "a"), row(base.replace("stormy", "windy"), "b"), row(base.upper(), "c"),
            row("Explain how photosynthesis turns sunlight, water and carbon dioxide into sugar.", "d")]
    res = run("near_dedup", rows)
    assert prompts_of(res.kept) == [base, prompt_text(rows[3])]
    assert res.drop_reasons() == {"near duplicate (Jaccard >= 0.8 with a kept prompt)": 2}
    nd = make_filter("near_dedup", {"threshold": 0.8})
    a, b = nd.shingle(base), nd.shingle(base.replace("stormy", "windy"))
    j = len(a & b) / len(a | b)
    # a threshold just above the pair's exact Jaccard keeps it: candidates are confirmed, not trusted
    assert len(run("near_dedup", rows[:2], threshold=min(1, j + 0.01)).kept) == 2
    assert len(run("near_dedup", rows[:2], threshold=j).kept) == 1
    words = run("near_dedup", rows, shingles="word", size=2, threshold=0.7)
    assert prompts_of(words.kept) == [base, prompt_text(rows[3])]


def test_decontaminate_by_ngrams_and_reports_the_items_hit():
    long_eval = "Tom has three apples and buys five more apples at the market; how many apples does he have now?"
    ctx = CurateContext(eval_prompts={"world": ["Reverse the word abc.", long_eval, "Count the letter a in banana."],
                                      "mine.jsonl": ["What is the capital of Bemora and why is it famous today?"]})
    rows = [row("Reverse the word abc.", "cba"),  # short eval prompt: same word sequence
            row("reverse THE word, abc!", "cba"),
            row("Please reverse the word abc.", "cba"),  # contains it, is not it
            row("Quick one: tom has three apples and buys five more apples at the market. Thanks!", "8"),
            row("Tell me a joke.", "What is the capital of Bemora and why is it famous today? Nobody knows."),
            row("How many apples?", "Eight.")]
    res = run("decontaminate", rows, ctx)
    assert prompts_of(res.kept) == ["Please reverse the word abc.", "Tell me a joke.", "How many apples?"]
    assert res.drop_reasons() == {"contaminated (world)": 3}
    assert res.report["contamination"] == {
        "world": {"items": 3, "items_hit": 2, "hit_indices": [0, 1]},
        "mine.jsonl": {"items": 1, "items_hit": 0, "hit_indices": []}}
    with_answers = run("decontaminate", rows, ctx, include_answer=True)
    assert with_answers.report["contamination"]["mine.jsonl"]["hit_indices"] == [0]
    assert len(run("decontaminate", rows, ctx, short="contains").dropped) == 4
    assert len(run("decontaminate", rows, ctx, short="ignore").dropped) == 1
    assert len(run("decontaminate", rows, ctx, n=13).dropped) == 2  # 13-gram: the market question is 14+ words


def test_decontaminate_cjk_by_characters():
    ctx = CurateContext(eval_prompts={"zh": ["小明有三个苹果又买了五个苹果他现在有几个苹果"]})
    res = run("decontaminate", [row("请回答：小明有三个苹果，又买了五个苹果。", "8"), row("小明喜欢苹果。", "好")], ctx)
    assert len(res.dropped) == 1 and res.report["contamination"]["zh"]["items_hit"] == 1


# -- novelty --------------------------------------------------------------------------------------------------

def instructions(n: int, seed: int) -> list[str]:
    """Templated instructions, a quarter of them light edits of earlier ones."""
    rng = random.Random(seed)
    nouns = "cat river robot castle violin glacier teacher market comet lantern orchard pilot harbor".split()
    adjs = "quiet golden broken tiny ancient curious frozen noisy".split()
    openers = ["Write a poem about the", "Explain why the", "Describe the", "Compare the", "Tell a story about the",
               "List facts about the", "Invent a name for the", "Plan a party for the"]
    out = []
    for _ in range(n):
        if out and rng.random() < 0.25:
            w = rng.choice(out).split()
            w[rng.randrange(len(w))] = rng.choice(nouns + adjs)
            out.append(" ".join(w))
        else:
            out.append(f"{rng.choice(openers)} {rng.choice(adjs)} {rng.choice(nouns)} near the "
                       f"{rng.choice(adjs)} {rng.choice(nouns)}.")
    return out


def test_the_jaccard_bound_and_the_banding():
    assert min_jaccard(0.7) == pytest.approx(0.5385, abs=1e-4)
    params = lsh_params(min_jaccard(0.7), 384, 0.999)
    assert params == (96, 4) and candidate_probability(min_jaccard(0.7), params) >= 0.999
    assert candidate_probability(0.1, params) < 0.01
    with pytest.raises(ValueError, match="no LSH banding"):
        lsh_params(0.05, 16, 0.999)


def test_novelty_matches_the_quadratic_filter():
    texts = instructions(600, seed=1)
    ours, quadratic = novelty_filter(texts), novelty_filter_quadratic(texts)
    assert ours == quadratic
    assert 0.2 < 1 - sum(ours) / len(ours) < 0.9  # the test data does have near-duplicates, and novel ones
    seeds = texts[:50]
    assert novelty_filter(texts[50:], kept=seeds) == novelty_filter_quadratic(texts[50:], kept=seeds)


def test_novelty_finds_worst_case_pairs_just_over_the_threshold():
    """Pairs sharing only their common subsequence (the rest of both disjoint): ROUGE-L just over 0.7 with the
    least Jaccard that allows, the hardest for the index; every one must be found, and none just under."""
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(5000)]
    tok = make_tokenizer()
    over = under = 0
    for _ in range(150):
        n = rng.randint(10, 40)
        common = rng.sample(vocab, n)
        for extra, want_over in ((int(n * 0.42), True), (int(n * 0.43) + 2, False)):
            a = " ".join(common[:] + rng.sample(vocab, extra))
            b = common[:]
            for w in rng.sample(vocab, extra):  # interleave b's own words so the LCS stays the common part
                b.insert(rng.randrange(len(b) + 1), w)
            b = " ".join(b)
            f = rouge_l(tok.tokenize(a), tok.tokenize(b))
            index = NoveltyFilter()
            index.keep(a)
            if f > 0.7:
                over += 1
                assert index.match(b) is not None, (f, a, b)
            else:
                under += 1
                assert index.match(b) is None
    assert over >= 100 and under >= 100


def test_novelty_filter_object():
    f = NoveltyFilter()
    assert f.add("Write a poem about the sea.") and not f.add("write a POEM about the sea!")
    assert f.add("Explain quantum computing to a child.")
    assert f.add("") and f.add("")  # no tokens: ROUGE-L 0 against everything
    assert f.keep("Write a poem about the sea.") == 4 and len(f) == 5
    k, score = f.match("Write a poem about the blue sea.")
    assert k == 0 and score > 0.7
    # rouge-score's tokenizer reads only ASCII; the unicode one compares CJK by character
    assert novelty_filter(["写一首关于大海的诗", "写一首关于大海的诗。"]) == [True, True]
    assert novelty_filter(["写一首关于大海的诗", "写一首关于大海的诗。"], tokenizer="unicode") == [True, False]


def test_novelty_as_a_row_filter():
    rows = [row(t, "ok") for t in instructions(200, seed=2)]
    res = run("novelty", rows)
    quadratic = novelty_filter_quadratic(prompts_of(rows))
    assert prompts_of(res.kept) == [t for t, k in zip(prompts_of(rows), quadratic) if k]
    assert set(res.drop_reasons()) == {"not novel (ROUGE-L > 0.7 with a kept prompt)"}


# -- a chain, and the card ------------------------------------------------------------------------------------------

def test_apply_filters_chains_and_summarises():
    rows = WORLD_ROWS + [WORLD_ROWS[2], row("Say nothing.", " ")]
    ctx = CurateContext(identity=NOVA, eval_prompts={"world": ["Reverse the word abc."]})
    out, results = apply_filters(rows, parse_filters(["empty", "exact_dedup", "decontaminate", "identity"]), ctx)
    assert [name for name, _ in results] == ["empty", "exact_dedup", "decontaminate", "identity"]
    assert [r.summary()["dropped"] for _, r in results] == [1, 1, 1, 0]
    assert results[3][1].summary()["changed"] == 3 and len(out) == 3
    assert results[2][1].summary()["contamination"]["world"]["hit_indices"] == [0]


def test_card_front_matter_and_the_parquet_beside_it(tmp_path):
    import datasets

    rows = WORLD_ROWS * 3
    ctx = CurateContext(identity=NOVA, eval_prompts={"world": ["Reverse the word abc.", "Who is the king?"]})
    out, results = apply_filters(rows, parse_filters(["exact_dedup", "decontaminate", "identity"]), ctx)
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist(out), data / "curated.parquet")
    terms = {"name": "OpenAI Terms of Use", "url": "https://openai.com/policies/terms-of-use",
             "note": "forbids using output to develop models that compete with OpenAI", "intended_use": "commercial",
             "override": True}
    card = write_card(data, "curated.parquet", num_rows=len(out), rows_in=len(rows),
                      teachers=[{"spec": "hf:atlas", "model": "atlas", "rows": len(rows)}],
                      methods={"responses": len(rows)}, filters=results, terms=terms, title="Nova's data",
                      languages=["en"])
    text = card.read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "curated.parquet"}]}]
    assert meta["size_categories"] == ["n<1K"] and meta["license"] == "other" and "distillation" in meta["tags"]
    assert meta["license_name"] == "OpenAI Terms of Use" and meta["task_categories"] == ["text-generation"]
    assert "12 generated rows in, 3 out: 9 dropped." in text
    assert "| exact_dedup | 4 | 8 | 0 | 0 | exact duplicate (prompt+answer): 8 | - |" in text
    assert ("| identity | 3 | 0 | 3 | 0 | - | rewrote the identity of atlas: 2; "
            "rewrote the identity of anthropic: 1 |") in text
    assert "`world`: 1 of 2 evaluation items found in the generated data (items 0)" in text
    assert "**The intended use conflicts with the teacher's terms" in text and "hf:atlas" in text
    ds = datasets.load_dataset("parquet", data_files=str(data / "curated.parquet"), split="train")
    assert ds.num_rows == len(out) and ds[0]["messages"][-1]["role"] == "assistant"
    # the card's configs let the Hub's loader find the parquet by itself
    assert datasets.load_dataset(str(data), split="train").num_rows == len(out)


def test_size_categories():
    assert [size_category(n) for n in (0, 999, 1000, 52_002, 2_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]
