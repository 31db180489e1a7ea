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
    a = world.sample_tasks(60, "heldout", seed=3)
    assert sorted(t.family for t in a) == sorted(list(world.FAMILIES) * 10)
    assert a == world.sample_tasks(60, "heldout", seed=3)
    assert a != world.sample_tasks(60, "heldout", seed=4)


def test_reference_responses_verify_and_carry_a_trace():
    rng = random.Random(0)
    for fam in world.FAMILIES:
        for _ in range(50):
            t = world.make_task(fam, rng)
            assert t.response.startswith("<think>") and "</think>\nAnswer: " in t.response
            assert exact_match(t.response, t.answer)
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
