"""Watermark radioactivity: exact p-values, each pair scored once, prompt copies left out, the empirical null, the
refusal of a mismatched scheme, and the command on a file of texts."""

import json
import math
import random
from fractions import Fraction

import pytest
from typer.testing import CliRunner

from stillhouse.audit.radioactivity import (GreenLists, binomial_p, check_scheme, count_green, radioactivity)
from stillhouse.cli import app
from stillhouse.errors import StillhouseError

KEY = {"scheme": "kgw", "hashing_key": 123456789, "greenlist_ratio": 0.25, "bias": 2.0, "seeding_scheme": "lefthash",
       "context_width": 1}
VOCAB = 102


def exact_tail(k: int, n: int, gamma: Fraction) -> float:
    return float(sum(math.comb(n, i) * gamma ** i * (1 - gamma) ** (n - i) for i in range(k, n + 1)))


@pytest.mark.parametrize("k,n,gamma", [(0, 10, Fraction(1, 4)), (7, 10, Fraction(1, 4)), (30, 60, Fraction(25, 102)),
                                       (60, 60, Fraction(25, 102)), (200, 400, Fraction(1, 2))])
def test_p_values_are_the_exact_binomial_tail(k, n, gamma):
    assert binomial_p(k, n, float(gamma)) == pytest.approx(exact_tail(k, n, gamma), rel=1e-9, abs=1e-300)


def sequences(key, n_texts=40, length=60, green_share=None, seed=0, vocab=VOCAB, ids=None):
    """Token sequences: each next token green under `key` with probability `green_share` (None: uniform)."""
    rng = random.Random(seed)
    lists = GreenLists(key, vocab)
    ids = ids or list(range(vocab))
    out = []
    for _ in range(n_texts):
        seq = [rng.choice(ids)]
        while len(seq) < length:
            ctx = tuple(seq[-key["context_width"]:])
            if green_share is None:
                seq.append(rng.choice(ids))
                continue
            greens = [t for t in ids if lists.is_green(ctx, t)]
            reds = [t for t in ids if t not in greens]
            seq.append(rng.choice(greens if rng.random() < green_share else reds))
        out.append(seq)
    return out


def test_gamma_is_the_schemes_exact_share_and_watermarked_text_is_found():
    res = count_green(sequences(KEY, green_share=0.6), KEY, VOCAB)
    assert res.gamma == 25 / 102
    assert res.scored > 500 and res.green / res.scored > 0.5
    assert res.p_value < 1e-30
    plain = count_green(sequences(KEY, green_share=None, seed=1), KEY, VOCAB)
    assert 1e-3 < plain.p_value  # uniform text: nothing to find


def test_each_context_token_pair_is_scored_once():
    lists = GreenLists(KEY, VOCAB)
    a = next(t for t in range(VOCAB) if lists.is_green((7,), t))  # a green token after 7
    repeated = [[7, a] * 50]
    res = count_green(repeated, KEY, VOCAB)
    # pairs (7, a) and (a, 7): two distinct pairs however often they repeat
    assert res.scored == 2 and res.skipped_repeats == 97
    again = count_green(repeated * 3, KEY, VOCAB)
    assert again.scored == 2 and again.p_value == res.p_value


@pytest.mark.parametrize("scheme", ["lefthash", "selfhash"])
def test_a_unit_is_one_green_list_draw_whatever_the_context_width(scheme):
    """transformers' lefthash seeds a green list from the last context token alone, whatever the width: windows
    that end in the same token are one draw, scored once (counting each window would count one coin many times);
    the colours read through the cached seeds are the generating processor's own."""
    import torch
    from transformers import WatermarkingConfig

    from stillhouse.watermark import _FIELDS

    key = {**KEY, "seeding_scheme": scheme, "context_width": 2 if scheme == "lefthash" else 3}
    lists = GreenLists(key, VOCAB)
    proc = WatermarkingConfig(**{f: key[f] for f in _FIELDS}).construct_processor(VOCAB, "cpu")
    rng = random.Random(5)
    for _ in range(300):
        ctx, tok = tuple(rng.randrange(VOCAB) for _ in range(key["context_width"])), rng.randrange(VOCAB)
        seq = torch.tensor(ctx + (tok,) if scheme == "selfhash" else ctx)
        assert lists.is_green(ctx, tok) == (tok in proc._get_greenlist_ids(seq).tolist())
    if scheme == "lefthash":
        res = count_green([[1, 7, 40], [2, 7, 40], [3, 7, 40]], key, VOCAB)
        assert res.scored == 1 and res.skipped_repeats == 2 and res.skipped_short == 6
        assert count_green([[1, 7, 40], [2, 7, 40]], {**key, "context_width": 1}, VOCAB).scored == 3


def test_pairs_copied_from_the_prompt_are_left_out():
    text = [5, 6, 7, 8, 9]
    res = count_green([text], KEY, VOCAB, prompts=[[1, 6, 7, 8, 2]])
    assert res.skipped_prompt == 2 and res.scored == 2  # (6,7), (7,8) were in the prompt; (5,6), (8,9) scored


def test_random_keys_give_the_null_and_the_true_key_stands_out():
    texts = sequences(KEY, n_texts=20, green_share=0.5, seed=2)
    res = radioactivity(texts, KEY, VOCAB, null_keys=60, seed=0)
    assert res.null_keys == 60 and res.key.p_value < 1e-10
    assert res.empirical_p == pytest.approx(1 / 61)  # no random key scores these texts as well as the true one
    assert res.false_positive_rate(1e-6) == 0.0
    # under the null the p-values spread out: a good share above 0.1, few below 0.01
    assert sum(p > 0.1 for p in res.null_p_values) >= 30 and sum(p <= 0.01 for p in res.null_p_values) <= 6


def test_a_mismatched_scheme_is_refused_in_one_line():
    check_scheme(KEY, {"greenlist_ratio": 0.25, "seeding_scheme": "lefthash"})  # the same: fine
    check_scheme(KEY, None)  # not recorded: nothing to compare
    with pytest.raises(StillhouseError, match=r"greenlist_ratio 0\.5 \(key: 0\.25\)") as e:
        check_scheme(KEY, {"greenlist_ratio": 0.5, "context_width": 1})
    assert "\n" not in str(e.value)


def test_audit_watermark_command_on_a_file_of_texts(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    vocab = len(tok)
    keyfile = tmp_path / "key.json"
    keyfile.write_text(json.dumps(KEY))
    # ids that survive decode -> encode (single characters), so the texts carry exactly the sampled tokens
    ids = [i for i in range(vocab) if i not in tok.all_special_ids
           and tok(tok.decode([i]), add_special_tokens=False)["input_ids"] == [i]]
    marked = sequences(KEY, n_texts=30, length=50, green_share=0.7, seed=3, vocab=vocab, ids=ids)
    texts = tmp_path / "suspect.jsonl"
    texts.write_text("".join(json.dumps({"text": tok.decode(s)}) + "\n" for s in marked))
    out = tmp_path / "evidence.json"
    r = CliRunner().invoke(app, ["audit", "watermark", str(texts), "--key", str(keyfile), "--tokenizer",
                                 str(tiny_models["base"]), "--null-keys", "20", "--out", str(out)])
    assert r.exit_code == 0, r.output
    ev = json.loads(out.read_text())
    assert ev["key"]["p_value"] < 1e-20 and ev["null_keys"] == 20 and ev["false_positive_rate"]["1e-06"] == 0.0

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "abc", "watermark": {"greenlist_ratio": 0.5}}) + "\n")
    r = CliRunner().invoke(app, ["audit", "watermark", str(bad), "--key", str(keyfile), "--tokenizer",
                                 str(tiny_models["base"])])
    assert r.exit_code != 0 and "different watermark scheme" in str(r.exception or r.output)


def test_text_the_engine_watermarked_is_found_and_plain_text_is_not(tiny_models, tmp_path):
    """Generation (the hf backend's engine with the key) and detection agree on the scheme, end to end."""
    from transformers import AutoTokenizer

    from stillhouse.teachers import Request, load_backend
    from stillhouse.watermark import keygen, read_key

    keyfile = tmp_path / "wm.json"
    keygen(keyfile, bias=2.0)
    key = read_key(keyfile)
    model = str(tiny_models["teacher"])
    tok = AutoTokenizer.from_pretrained(model)

    def p_value(opts):
        b = load_backend(f"hf:{model}", opts)
        reqs = [Request(messages=({"role": "user", "content": f"Tell me about {i}."},), max_tokens=60,
                        temperature=1.0, seed=i) for i in range(12)]
        texts = [c.text for _, c in sorted(b.generate(reqs))]
        return count_green([tok(t, add_special_tokens=False)["input_ids"] for t in texts], key, len(tok)).p_value

    assert p_value({"watermark": str(keyfile)}) < 1e-6
    assert p_value({}) > 1e-3


def test_positions_the_reference_was_sure_of_are_left_out():
    seqs = sequences(KEY, n_texts=10, length=30, green_share=0.9, seed=4)
    keep = [[j % 3 != 0 for j in range(len(s))] for s in seqs]  # every third token "certain"
    full = count_green(seqs, KEY, VOCAB)
    kept = count_green(seqs, KEY, VOCAB, keep=keep)
    assert kept.skipped_low_entropy == sum(j % 3 == 0 for s in seqs for j in range(1, len(s)))
    assert 0 < kept.scored < full.scored
    # the mask is applied the same way under every key, so random keys still give the null
    res = radioactivity(seqs, KEY, VOCAB, keep=keep, null_keys=50)
    assert res.key.skipped_low_entropy == kept.skipped_low_entropy and res.false_positive_rate(1e-3) <= 0.04


def test_reference_entropies_match_a_direct_forward_pass(tiny_models, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillhouse.audit.radioactivity import _chat_prefix, reference_entropies

    model_dir = str(tiny_models["teacher"])
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [tok("Answer: Zorvel", add_special_tokens=False)["input_ids"], tok("ab", add_special_tokens=False)["input_ids"]]
    prompts = ["Invent a name.", None]
    ent = reference_entropies(model_dir, tok, prompts, texts)
    assert [len(e) for e in ent] == [len(t) for t in texts]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prefix = _chat_prefix(tok, prompts[0])
    with torch.no_grad():
        p = model(torch.tensor([prefix + texts[0]])).logits[0].float().softmax(-1)
    want = [float(-(p[len(prefix) + j - 1] * p[len(prefix) + j - 1].log()).sum()) for j in range(len(texts[0]))]
    assert ent[0] == pytest.approx(want, abs=1e-4)
    assert ent[1][0] == pytest.approx(math.log(p.shape[-1]), abs=1e-4)  # no context at all: uniform
    assert all(0 <= h <= math.log(p.shape[-1]) + 1e-4 for row in ent for h in row)
    # with the position after the text (where the model chose to stop), and for an empty text
    from stillhouse.audit.radioactivity import next_token_distributions

    d = list(next_token_distributions(model_dir, tok, [prefix, [], []], [texts[0], [], []], extra=1, batch_size=2))
    assert d[0].shape[0] == len(texts[0]) + 1 and torch.allclose(d[0], p[len(prefix) - 1:len(prefix) + len(texts[0])],
                                                                 atol=1e-5)
    assert d[1].shape[0] == 1 and torch.allclose(d[1][0], torch.full_like(d[1][0], 1 / p.shape[-1]))
    assert [x.shape[0] for x in next_token_distributions(model_dir, tok, [[]], [[]])] == [0]
    # a logits budget that fits one text at a time gives the same rows
    from stillhouse.audit import radioactivity as rad

    monkeypatch.setattr(rad, "_LOGITS_BUDGET", 1)
    one_by_one = reference_entropies(model_dir, tok, prompts, texts)
    assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(one_by_one, ent)) and len(one_by_one) == len(ent)


@pytest.mark.parametrize("width", [1, 2])
def test_lefthash_processors_for_many_keys_are_those_the_key_builds(width):
    """Null keys reuse one constructed lefthash processor with their own key (the processor's permutation table is
    selfhash's alone): every green list and seed is the one a processor built from that key gives."""
    import torch
    from transformers import WatermarkingConfig

    from stillhouse.watermark import _FIELDS

    rng = random.Random(width)
    for _ in range(5):
        key = {**KEY, "context_width": width, "hashing_key": rng.getrandbits(63)}
        fresh = WatermarkingConfig(**{f: key[f] for f in _FIELDS}).construct_processor(VOCAB, "cpu")
        lists = GreenLists(key, VOCAB)
        for _ in range(20):
            ctx = tuple(rng.randrange(VOCAB) for _ in range(width))
            assert lists.processor._get_greenlist_ids(torch.tensor(ctx)).tolist() == \
                fresh._get_greenlist_ids(torch.tensor(ctx)).tolist()
            fresh.set_seed(torch.tensor(ctx))
            assert lists.seed(ctx, 0) == fresh.rng.initial_seed()


def _whitebox_with(monkeypatch, tiny_models, bias: float):
    """`whitebox` on the tiny model's tokenizer, the suspect's distributions replaced by ones that add `bias` to the
    logits of the key's green list at each context (what a student that absorbed the watermark would have)."""
    import torch
    from transformers import AutoTokenizer

    from stillhouse.audit import radioactivity as rad

    tok = AutoTokenizer.from_pretrained(str(tiny_models["teacher"]))
    lists = GreenLists(KEY, len(tok))
    gen = torch.Generator().manual_seed(0)

    def fake(model_dir, tok_, prefixes, texts, batch_size=8, extra=0):
        for seq in texts:
            rows = []
            for j in range(len(seq) + extra):
                logits = torch.randn(len(tok), generator=gen)
                if j >= 1:
                    gl = lists.processor._get_greenlist_ids(torch.tensor([seq[j - 1]]))
                    logits[gl] += bias
                rows.append(logits.softmax(-1))
            yield torch.stack(rows)

    monkeypatch.setattr(rad, "next_token_distributions", fake)
    texts = ["".join(random.Random(i).choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(40)) for i in range(30)]
    return rad.whitebox("unused", KEY, str(tiny_models["teacher"]), [None] * len(texts), texts, null_keys=40)


def test_whitebox_finds_green_mass_a_watermarked_model_would_carry(monkeypatch, tiny_models):
    marked = _whitebox_with(monkeypatch, tiny_models, bias=1.0)
    assert marked.green_mass > marked.expected + 0.05 and marked.p_value < 1e-6
    assert marked.empirical_p == pytest.approx(1 / 41) and max(marked.null_z) < marked.z
    plain = _whitebox_with(monkeypatch, tiny_models, bias=0.0)
    assert plain.p_value > 1e-3 and abs(plain.green_mass - plain.expected) < 0.03
    assert sum(abs(z) > 3 for z in plain.null_z) <= 2  # the null statistic is roughly standard normal


def test_whitebox_runs_on_a_real_local_model(tiny_models):
    from stillhouse.audit.radioactivity import whitebox

    res = whitebox(str(tiny_models["teacher"]), KEY, str(tiny_models["teacher"]), ["Say a word."] * 3,
                   ["hello there", "general words", "abc"], null_keys=10)
    assert res.contexts > 5 and math.isfinite(res.z) and 0 <= res.p_value <= 1 and res.null_keys == 10
