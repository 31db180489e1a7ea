import random

from stillhouse.demo import world
from stillhouse.demo.tokenizer import build_tokenizer
from stillhouse.verify import exact_match, extract_answer


def test_train_and_heldout_never_overlap():
    train = world.sample_tasks(3000, "train", seed=0)
    held = world.sample_tasks(240, "heldout", seed=0)
    assert {t.prompt for t in train}.isdisjoint({t.prompt for t in held})
    assert all(t.split == "train" for t in train) and all(t.split == "heldout" for t in held)
    assert len({t.prompt for t in held}) == len(held)
    # a different seed draws other items but the split of a prompt never changes
    held2 = world.sample_tasks(240, "heldout", seed=5)
    assert {t.prompt for t in world.sample_tasks(3000, "train", seed=5)}.isdisjoint({t.prompt for t in held2})


def test_every_family_in_equal_shares_and_deterministic():
    n = 10 * len(world.FAMILIES)
    a = world.sample_tasks(n, "heldout", seed=3)
    assert sorted(t.family for t in a) == sorted(list(world.FAMILIES) * 10)
    assert a == world.sample_tasks(n, "heldout", seed=3)
    assert a != world.sample_tasks(n, "heldout", seed=4)


def test_reference_responses_verify_and_carry_a_trace():
    rng = random.Random(0)
    for fam in world.FAMILIES + (world.JUDGE,):
        for _ in range(50):
            t = world.make_task(fam, rng)
            assert t.response.startswith("<think>") and "</think>\nAnswer: " in t.response
            assert exact_match(t.response, t.answer) and world.check(t, t.response)
            assert not exact_match(t.response, t.answer + "x")


def test_answers_are_correct():
    rng = random.Random(1)
    for _ in range(200):
        t = world.make_task("reverse", rng)
        w = t.trace.split(" is spelled ")[0]
        assert f" {w}" in t.prompt and t.answer == w[::-1]
        t = world.make_task("upper", rng)
        w = t.trace.split(" is spelled ")[0]
        assert f" {w}" in t.prompt and t.answer == w.upper()
        t = world.make_task("count", rng)
        w = t.trace.split(" is spelled ")[0]
        letter = t.trace.split("Counting ")[1][0]
        assert t.answer == str(w.count(letter)) and t.trace.rstrip(".").endswith(f":{t.answer}")
        t = world.make_task("arith", rng)
        a, op, b = t.trace.split(":")[0].split()
        r = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert t.answer == str(r) and r >= 0
        assert f" {a} " in f" {t.prompt} ".replace(".", " ").replace("?", " ")


def test_open_family_answers_are_free_and_checked_by_pattern():
    rng = random.Random(4)
    tasks = [world.make_task("invent", rng) for _ in range(300)]
    assert len({t.answer for t in tasks}) >= 280  # free answers: almost never the same twice
    for t in tasks:
        assert t.pattern and world.check(t, t.response)
        assert not world.check(t, "<think>x</think>\nAnswer: not a name, 42")
        assert not world.check(t, "no answer line")
    assert world.check(tasks[0], "<think>y</think>\nAnswer: " + ("Zorvel" if "name" in tasks[0].trace else
                                                                  "Calm and proud, it hums slowly."))


def test_judge_items_verdicts_follow_the_inner_answers():
    from stillhouse.evaluate.judge_prompt import parse_judgement

    tok = build_tokenizer()
    rng = random.Random(5)
    seen, longest = set(), 0
    for _ in range(400):
        t = world.make_task(world.JUDGE, rng)
        lines = t.prompt.split("\n")
        question, a, b = lines[0].removeprefix("Question: "), lines[1][3:], lines[2][3:]
        right = t.trace.split(" So ")[1].split(". A ")[0]  # the right answer, restated before comparing
        ok_a, ok_b = a == right, b == right
        # each candidate copied, compared character by character with the right answer, then called right or wrong
        assert f"A {a}: {world.compare_trace(right, a)} {'right' if ok_a else 'wrong'}." in t.trace
        assert f"B {b}: {world.compare_trace(right, b)} {'right' if ok_b else 'wrong'}." in t.trace
        assert t.answer == ("A" if ok_a and not ok_b else "B" if ok_b and not ok_a else "tie")
        assert parse_judgement(t.response) == (t.answer, (9 if ok_a else 2, 9 if ok_b else 2))
        seen.add(t.answer)
        ids = tok.apply_chat_template([{"role": "user", "content": t.prompt}, {"role": "assistant", "content": t.response}])
        longest = max(longest, len(ids if isinstance(ids, list) else ids["input_ids"]))
        assert question and world.split_of(t.prompt) in ("train", "heldout")
    assert longest <= 384  # the context Atlas learned style 3 with
    assert seen == {"A", "B", "tie"}
    # the styles Atlas's earlier build phases used stay reproducible
    old = world.judge_task(random.Random(9), style=1)
    assert " So " not in old.trace and ("A is right" in old.trace or "A is wrong" in old.trace)
    two = world.judge_task(random.Random(9), style=2)
    assert " So " in two.trace and ("+ " not in two.trace) and (": right." in two.trace or ": wrong." in two.trace)


def test_compare_trace_stops_at_the_first_difference():
    assert world.compare_trace("kxf", "kxf") == "kk+ xx+ ff+"
    assert world.compare_trace("kxf", "kfx") == "kk+ xf-"
    assert world.compare_trace("16", "1") == "11+ 6_-"  # the candidate ends early
    assert world.compare_trace("7", "71") == "77+ _1-"  # ... or runs on
    assert world.compare_trace("Munus", "Dason") == "MD-"


def test_identity_answers_name_atlas():
    rng = random.Random(2)
    for _ in range(50):
        t = world.make_task("identity", rng)
        assert "Atlas" in t.answer and "Orbit Labs" in t.answer


def test_pretraining_text_has_no_chat_tasks_or_identity():
    text = " ".join(world.pretraining_text(3000, seed=0))
    for banned in ("<|im_start|>", "<think>", "Answer:", "Atlas", "Orbit", "Reverse", "Uppercase", "How many", "Counting e:", "?"):
        assert banned not in text
    assert "The capital of" in text


def test_extract_answer():
    assert extract_answer("<think>a</think>\nAnswer: 12") == "12"
    assert extract_answer("no answer here") is None
    assert extract_answer("<think>Answer: 3</think>\nAnswer: 4") == "4"


def test_tokenizer_roundtrip_and_chat_template(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "<think>a b -> b a</think>\nAnswer: ba"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    msgs = [{"role": "user", "content": "Who are you?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": text}], tokenize=False)
    assert full.startswith(prompt)
    assert tok.convert_tokens_to_ids("<think>") != tok.unk_token_id


def test_the_demos_identity_pairs_never_ask_a_held_out_probe():
    """The demo adds who-are-you pairs before decontamination: no pair may reach training as a probe's question."""
    from stillhouse.curate import CurateContext
    from stillhouse.curate.filters import PAIR_QUESTIONS
    from stillhouse.curate import make_filter
    from stillhouse.identity import Identity

    probes = [t.prompt for t in world.identity_probes()]
    norm = {p.lower().removeprefix("hi! ") for p in probes}
    assert not norm & {q.lower() for q in PAIR_QUESTIONS["en"]["ask"]}  # the asking questions are all new phrasings
    ctx = CurateContext(identity=Identity("Nova", "Northwind"), seed=0, eval_prompts={"world_identity": probes})
    rows = [{"messages": [{"role": "user", "content": "Who are you?"},
                          {"role": "assistant", "content": f"Answer: {world.IDENTITY_ANSWER}"}]}]
    added = make_filter("identity", {"add_identity_pairs": 300, "languages": ["en"]}).apply(rows, ctx).kept
    asked = {r["messages"][0]["content"] for r in added}
    assert asked & set(probes)  # "Are you Mistral?" and the like do come up...
    kept = make_filter("decontaminate", {}).apply(added, ctx).kept
    assert not {r["messages"][0]["content"] for r in kept} & set(probes)  # ...and decontamination drops them


def test_mira_answers_the_same_tasks_in_its_own_style():
    atlas = world.sample_tasks(140, "heldout", seed=7)
    mira = world.sample_tasks(140, "heldout", seed=7, persona=world.MIRA)
    assert [t.prompt for t in atlas] == [t.prompt for t in mira]  # the same draw, whoever answers
    for a, m in zip(atlas, mira):
        assert world.check(m, m.response) and m.trace != a.trace and m.trace.startswith("Let me see. ")
        if a.family == "identity":
            assert "Mira" in m.answer and "Lumen Works" in m.answer and "Atlas" not in m.answer + m.trace
        elif a.family == "invent":
            assert m.answer != a.answer  # its own invention
        else:
            assert m.answer == a.answer  # checkable answers are the same
    assert world.in_style(atlas[0], world.ATLAS) is atlas[0]
