"""Logit distillation between different tokenizers (stillhouse.train.align): the world's character-level tokenizer
and a small BPE trained with `tokenizers`, both built here; aligned by character offsets."""

import math

import pytest
import torch

from stillhouse.train.align import Characters, char_logprobs, same_vocabulary, token_starts


def build_bpe():
    """A byte-level BPE of ~300 tokens trained on the world's prompts and answers, with the world's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from stillhouse.demo import world
    from stillhouse.demo.tokenizer import CHAT_TEMPLATE, IM_END, IM_START, PAD, UNK

    core = Tokenizer(models.BPE(unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    texts = [t.prompt + " " + t.answer for t in world.sample_tasks(300, "train", 0)]
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=[PAD, UNK, IM_START, IM_END],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK, eos_token=IM_END,
                                  additional_special_tokens=[IM_START])
    tok.chat_template = CHAT_TEMPLATE
    return tok


@pytest.fixture(scope="module")
def two_tokenizers(tmp_path_factory):
    """Model directories: `char` (the world's tokenizer) and `bpe`, a tiny random model each, and a sharp BPE teacher."""
    from stillhouse.demo.build import SHAPES, make_model
    from stillhouse.demo.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("two_tokenizers")
    out = {}
    for name, tok, seed, scale in (("char", build_tokenizer(), 2, 1.0), ("bpe", build_bpe(), 3, 1.0),
                                   ("bpe_teacher", build_bpe(), 4, 6.0)):
        m = make_model(SHAPES["tiny"], tok, seed)
        with torch.no_grad():  # (tied: scaling the table sharpens the output distribution, as a trained model's)
            m.get_output_embeddings().weight.mul_(scale)
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


def _rows():
    return [{"messages": [{"role": "user", "content": f"Spell {w} twice"}, {"role": "assistant", "content": f"{w} {w}"}]}
            for w in ["cattle", "doggerel", "owlish", "emulate", "yakking", "elkhound", "rampart", "codling"]]


def test_two_tokenizers_start_tokens_at_shared_characters_and_the_marginals_are_distributions(two_tokenizers):
    from transformers import AutoTokenizer

    from stillhouse.train.sft import _encode

    char = AutoTokenizer.from_pretrained(two_tokenizers["char"])
    bpe = AutoTokenizer.from_pretrained(two_tokenizers["bpe"])
    assert not same_vocabulary(char, bpe) and same_vocabulary(char, AutoTokenizer.from_pretrained(two_tokenizers["char"]))
    r = _rows()[1]
    content = r["messages"][-1]["content"]
    c_ids, c_n = _encode(char, r["messages"])
    b_ids, b_n = _encode(bpe, r["messages"])
    c_at, b_at = token_starts(char, c_ids, c_n, content), token_starts(bpe, b_ids, b_n, content)
    assert sorted(c_at) == list(range(len(content)))  # one character a token
    assert 0 in b_at and len(b_at) < len(content)  # BPE merges: fewer starts, all of them shared with the characters
    assert set(b_at) <= set(c_at)
    assert bpe.decode([b_ids[b_at[c]] for c in sorted(b_at)]) == content
    chars = Characters(char, bpe)
    logits = torch.randn(3, len(bpe))
    lp = char_logprobs(logits, chars.group(1), len(chars))
    assert torch.allclose(lp.exp().sum(-1), torch.ones(3), atol=1e-5)
    # the character-level tokenizer's marginal is its own distribution, letter by letter
    logits = torch.randn(2, len(char))
    lp = char_logprobs(logits, chars.group(0), len(chars))
    a = chars.chars.index("a")
    assert float(lp[0, a]) == pytest.approx(float(logits.log_softmax(-1)[0, char.convert_tokens_to_ids("a")]), abs=1e-5)


def _char_kl(student_dir, teacher_dir, rows) -> float:
    """Mean KL(teacher || student) between next-character distributions where both tokenizers start a token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillhouse.train.sft import _encode

    s_tok, t_tok = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir)
    s = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    t = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    chars = Characters(s_tok, t_tok)
    total, n = 0.0, 0
    for r in rows:
        content = r["messages"][-1]["content"]
        (si, sn), (ti, tn) = _encode(s_tok, r["messages"]), _encode(t_tok, r["messages"])
        s_at, t_at = token_starts(s_tok, si, sn, content), token_starts(t_tok, ti, tn, content)
        shared = sorted(set(s_at) & set(t_at))
        with torch.no_grad():
            ls = char_logprobs(s(torch.tensor([si])).logits[0, [s_at[c] - 1 for c in shared]], chars.group(0), len(chars))
            lt = char_logprobs(t(torch.tensor([ti])).logits[0, [t_at[c] - 1 for c in shared]], chars.group(1), len(chars))
        total += float((lt.exp() * (lt - ls)).sum())
        n += len(shared)
    return total / n


def test_a_character_level_student_learns_a_bpe_teachers_next_character_distribution(two_tokenizers, tmp_path):
    from stillhouse.train.sft import sft

    rows = _rows()
    common = dict(epochs=10, learning_rate=1e-2, batch_size=4, max_length=128, seed=0, device="cpu")
    sft(rows, str(two_tokenizers["char"]), tmp_path / "sft", **common)
    res = sft(rows, str(two_tokenizers["char"]), tmp_path / "kd", **common, teacher=str(two_tokenizers["bpe_teacher"]),
              kd={"source": "teacher", "loss": "forward_kl", "alpha": 0.9, "beta": 0.5})
    k = res.kd
    assert k["vocabulary"].startswith("different (student 102 tokens, teacher 300;")
    assert k["samples_aligned"] == 8 and 0 < k["tokens_with_teacher_distribution"] < k["answer_tokens"]
    assert k["answer_tokens"] == sum(len(r["messages"][-1]["content"]) for r in rows)
    before = _char_kl(two_tokenizers["char"], two_tokenizers["bpe_teacher"], rows)
    after_sft = _char_kl(tmp_path / "sft", two_tokenizers["bpe_teacher"], rows)
    after_kd = _char_kl(tmp_path / "kd", two_tokenizers["bpe_teacher"], rows)
    assert after_kd < 0.5 * before and after_kd < 0.5 * after_sft


def test_a_bpe_student_distils_from_a_character_level_teacher(two_tokenizers, tiny_models, tmp_path):
    from stillhouse.train.sft import sft

    res = sft(_rows(), str(two_tokenizers["bpe"]), tmp_path / "kd", epochs=1, learning_rate=1e-3, batch_size=4,
              max_length=128, seed=0, device="cpu", teacher=str(tiny_models["teacher"]),
              kd={"source": "teacher", "loss": "jsd", "alpha": 0.5, "beta": 0.5})
    # every BPE token starts at a character the character-level teacher also starts one at
    assert res.kd["tokens_with_teacher_distribution"] == res.kd["answer_tokens"] > 0 and res.steps == 2
    assert res.final_loss is None or math.isfinite(res.final_loss)
