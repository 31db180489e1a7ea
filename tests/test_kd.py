"""Logit distillation from the teacher's top-k logprobs (stillhouse.train.kd)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stillhouse.errors import StillhouseError
from stillhouse.train.kd import align, check_alignment, kd_loss_sum
from stillhouse.train.sft import _encode, sft


def _slots(logp: torch.Tensor, k: int):
    top = logp.topk(k, -1)
    return top.indices, top.values


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_divergence_is_zero_for_the_teachers_own_distribution(loss):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 20, generator=g) * 3
    ids, lps = _slots(logits.log_softmax(-1), 5)
    d = kd_loss_sum(logits, ids[:, 0], ids, lps, loss=loss, alpha=1.0)
    assert abs(float(d)) < 1e-5
    other = torch.randn(6, 20, generator=g) * 3
    assert float(kd_loss_sum(other, ids[:, 0], ids, lps, loss=loss, alpha=1.0)) > 0.1


def test_over_the_whole_vocabulary_the_divergences_are_the_exact_ones():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    ls, lt = s.log_softmax(-1), t.log_softmax(-1)
    ids, lps = _slots(lt, 9)  # every token listed: the "rest" bucket is empty
    fwd = (lt.exp() * (lt - ls)).sum()
    rev = (ls.exp() * (ls - lt)).sum()
    m = (0.5 * lt.exp() + 0.5 * ls.exp()).log()
    jsd = 0.5 * (lt.exp() * (lt - m)).sum() + 0.5 * (ls.exp() * (ls - m)).sum()
    y = ids[:, 0]
    assert float(kd_loss_sum(s, y, ids, lps, loss="forward_kl", alpha=1.0)) == pytest.approx(float(fwd), abs=1e-4)
    assert float(kd_loss_sum(s, y, ids, lps, loss="reverse_kl", alpha=1.0)) == pytest.approx(float(rev), abs=1e-4)
    assert float(kd_loss_sum(s, y, ids, lps, loss="jsd", alpha=1.0)) == pytest.approx(float(jsd), abs=1e-4)
    # top-3 of 9: the coarse-grained KL is a lower bound on the full one (data processing), and not a trivial one
    ids3, lps3 = _slots(lt, 3)
    coarse = float(kd_loss_sum(s, y, ids3, lps3, loss="forward_kl", alpha=1.0))
    assert 0 < coarse <= float(fwd) + 1e-5


def test_alpha_mixes_cross_entropy_and_tokens_without_slots_keep_cross_entropy():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 12, generator=g), torch.randn(5, 12, generator=g)
    ids, lps = _slots(t.log_softmax(-1), 4)
    lps[3:] = -math.inf  # the last two tokens have no teacher distribution
    y = torch.tensor([1, 2, 3, 4, 5])
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
    d = kd_loss_sum(s[:3], y[:3], ids[:3], lps[:3], loss="forward_kl", alpha=1.0)
    got = kd_loss_sum(s, y, ids, lps, loss="forward_kl", alpha=0.25)
    assert float(got) == pytest.approx(float(0.75 * ce[:3].sum() + 0.25 * d + ce[3:].sum()), abs=1e-4)
    assert float(kd_loss_sum(s, y, ids, lps, loss="forward_kl", alpha=0.0)) == pytest.approx(float(ce.sum()), abs=1e-4)


def _answers(n):
    return [{"messages": [{"role": "user", "content": f"Spell {w}"}, {"role": "assistant", "content": w * 2}]}
            for w in ["cat", "dog", "owl", "emu", "yak", "elk", "ram", "cod"][:n]]


def _teacher_entries(model_dir, rows, k=5, with_ids=True):
    """The teacher's logprobs at each answer token, by teacher forcing, in the ledger's shape (an OpenAI-compatible
    API gives the token texts only; the hf backend adds ids)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for r in rows:
        ids, n = _encode(tok, r["messages"])
        answer = len(tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        entries = []
        for j in range(n, n + answer):
            top = logp[j - 1].topk(k)

            def e(i, v):
                return {"token": tok.decode([i]), "logprob": float(v), **({"id": int(i)} if with_ids else {})}

            entries.append({**e(ids[j], logp[j - 1, ids[j]]),
                            "top_logprobs": [e(int(i), v) for i, v in zip(top.indices, top.values)]})
        out.append(entries)
    return out


def _samples(tok, rows, entries):
    enc = [_encode(tok, r["messages"]) for r in rows]
    return [(ids[n:], r["messages"][-1]["content"], e) for (ids, n), r, e in zip(enc, rows, entries)]


def test_alignment_by_id_and_by_token_text_agree(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    rows = _answers(4)
    by_id = align(_samples(tok, rows, _teacher_entries(tiny_models["teacher"], rows)), tok)
    by_text = align(_samples(tok, rows, _teacher_entries(tiny_models["teacher"], rows, with_ids=False)), tok)
    assert by_id.samples_aligned == by_text.samples_aligned == 4
    assert by_id.ids == by_text.ids and by_id.logprobs == by_text.logprobs
    assert by_id.tokens == sum(len(r["messages"][-1]["content"]) for r in rows)  # one character a token
    # the answer's tokens carry the teacher's slots (top-5 plus the chosen token when outside them); the chat
    # template's closing tokens after the answer have none
    comp = _samples(tok, rows[:1], [None])[0][0]
    assert [len(x) > 0 for x in by_id.ids[0]] == [True] * 6 + [False] * (len(comp) - 6)
    assert all(5 <= len(x) <= 6 for x in by_id.ids[0][:6])


def test_a_rewritten_answer_falls_back_to_its_text_and_a_foreign_tokenizer_is_refused(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    rows = _answers(4)
    entries = _teacher_entries(tiny_models["teacher"], rows)
    rewritten = [dict(r) for r in rows]
    rewritten[1] = {"messages": [rows[1]["messages"][0], {"role": "assistant", "content": "dogDOG"}]}
    a = align(_samples(tok, rewritten, entries), tok)
    assert a.samples_aligned == 3 and a.samples_with_logprobs == 4 and not any(a.ids[1])
    assert "sample 1: at answer token 3" in a.first_mismatch
    check_alignment(a, 0.5)
    # a teacher whose tokens are whole words (another tokenizer): nothing lines up, and the run is refused
    words = [[{"token": r["messages"][-1]["content"], "logprob": -0.1, "top_logprobs": []}] for r in rows]
    with pytest.raises(StillhouseError, match=r"line up .* in only 0 of 4 samples .*method: sft"):
        check_alignment(align(_samples(tok, rows, words), tok), 0.5)
    with pytest.raises(StillhouseError, match="none of the curated samples has the teacher's logprobs"):
        check_alignment(align(_samples(tok, rows, [None] * 4), tok), 0.5)


def _coarse_kl(model_dir, rows, entries) -> float:
    """Mean forward KL, over the answer tokens, from the teacher's top-k (plus rest) to the model's distribution."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    a = align(_samples(tok, rows, entries), tok)
    total, n = 0.0, 0
    for r, ids_rows, lp_rows in zip(rows, a.ids, a.logprobs):
        ids, start = _encode(tok, r["messages"])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0]
        for j, (i, lp) in enumerate(zip(ids_rows, lp_rows)):
            if i:
                pos = start + j - 1
                total += float(kd_loss_sum(logits[pos:pos + 1], torch.tensor([ids[start + j]]), torch.tensor([i]),
                                           torch.tensor([lp]), loss="forward_kl", alpha=1.0))
                n += 1
    return total / n


def _spread_entries(model_dir, rows):
    """A teacher that puts 40% on the token it said and 50% on four others (the same four letters throughout):
    what the sampled text alone cannot teach."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    others = [tok.convert_tokens_to_ids(c) for c in "wxyz"]
    out = []
    for r in rows:
        ids, n = _encode(tok, r["messages"])
        answer = len(tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"])
        out.append([{"token": tok.decode([ids[j]]), "logprob": math.log(0.4),
                     "top_logprobs": [{"token": tok.decode([i]), "logprob": math.log(p)}
                                      for i, p in zip(others, (0.2, 0.15, 0.1, 0.05))]}
                    for j in range(n, n + answer)])
    return out


def test_distillation_moves_the_student_towards_the_teachers_distribution(tiny_models, tmp_path):
    rows = _answers(8)
    entries = _spread_entries(tiny_models["base"], rows)
    common = dict(epochs=20, learning_rate=1e-2, batch_size=4, max_length=128, seed=0, device="cpu")
    sft(rows, str(tiny_models["base"]), tmp_path / "sft", **common)
    res = sft(rows, str(tiny_models["base"]), tmp_path / "kd", **common, teacher_logprobs=entries,
              kd={"loss": "forward_kl", "alpha": 0.9, "beta": 0.5, "min_aligned": 0.5})
    assert res.kd == {"samples": 8, "samples_with_logprobs": 8, "samples_aligned": 8,
                      "tokens_with_teacher_distribution": 48}
    before = _coarse_kl(tiny_models["base"], rows, entries)
    after_sft = _coarse_kl(tmp_path / "sft", rows, entries)
    after_kd = _coarse_kl(tmp_path / "kd", rows, entries)
    # the sampled tokens alone push the student towards certainty on them, away from the teacher's spread; the
    # distillation term brings it to the teacher's distribution
    assert after_kd < 0.5 * before and after_kd < 0.5 * after_sft


def _kd_recipe(tmp_path, tiny_models, options: str):
    from stillhouse.recipe import parse_recipe

    return parse_recipe(f"""name: kd
run_dir: {tmp_path / 'run'}
teacher: {{spec: "hf:{tiny_models['teacher']}", options: {{{options}}}}}
prompts: {{source: world, n: 8}}
generation: {{max_tokens: 8, temperature: 1.0}}
curate: {{filters: [{{name: exact_dedup}}]}}
student: {{base: "{tiny_models['base']}"}}
train: {{method: kd, kd: {{loss: jsd, alpha: 0.5, min_aligned: 0.0}}, epochs: 1, learning_rate: 0.001, batch_size: 4,
         max_length: 128}}
evaluate: {{n_per_family: 1, max_tokens: 8}}
""")


def test_the_train_stage_distils_from_the_ledgers_logprobs(tiny_models, tmp_path):
    import json

    from stillhouse.stages import get_stage, open_run

    r = _kd_recipe(tmp_path, tiny_models, "top_logprobs: 5")
    run = open_run(r)
    for stage in ("generate", "curate", "train", "evaluate", "report"):
        get_stage(stage).run(r, run)
    counts = json.loads((run.root / "stages" / "train.json").read_text())["counts"]
    kd = counts["students"]["student"]["kd"]
    assert kd["samples"] == counts["samples"] and kd["samples_with_logprobs"] == counts["samples"]
    # (a random tiny teacher now and then says a pad token inside an answer, which the text cannot show; those
    # samples are learned from their text alone)
    assert 0 < kd["samples_aligned"] <= kd["samples_with_logprobs"] and kd["tokens_with_teacher_distribution"] > 0
    card = (run.root / "student" / "README.md").read_text()
    assert "logit distillation (jsd, alpha 0.5)" in card
    assert json.loads((run.root / "student" / "stillhouse_provenance.json").read_text())["train"]["kd"]["loss"] == "jsd"
    report = (run.root / "report.html").read_text()
    assert (f"student: logit distillation towards the teacher's logprobs on {kd['samples_aligned']} of "
            f"{kd['samples']} samples") in report


def test_distillation_without_logprobs_in_the_ledger_is_refused_before_training(tiny_models, tmp_path):
    import subprocess

    import yaml

    from tests.conftest import STILLHOUSE

    r = _kd_recipe(tmp_path, tiny_models, "batch_size: 8")  # generated without logprobs
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(r.model_dump(mode="json", exclude_unset=True)))
    for stage in ("generate", "curate", "train"):
        out = subprocess.run([*STILLHOUSE, stage, str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "the ledger has none for the curated samples" in out.stderr and "top_logprobs: 20" in out.stderr
    assert not (tmp_path / "run" / "student").exists()
