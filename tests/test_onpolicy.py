"""On-policy distillation (stillhouse.train.onpolicy): the student samples, a local or served teacher scores its
tokens; served scoring through `stillhouse serve`'s echo and through vLLM-shaped prompt_logprobs, via the ledger."""

import math

import pytest
import torch

from stillhouse.calls import Ledger, ModelRef
from stillhouse.serve import running
from stillhouse.train.onpolicy import ServedScorer, on_policy
from tests.vllm_like import vllm_like


def _rows(n=8):
    return [{"messages": [{"role": "user", "content": f"Spell {w}"}, {"role": "assistant", "content": w * 2}]}
            for w in ["cat", "dog", "owl", "emu", "yak", "elk", "ram", "cod"][:n]]


def _teacher_logp(model_dir, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].log_softmax(-1)


def _ids(tok, alts):
    from stillhouse.train.kd import _TokenText

    tt = _TokenText(tok)
    return [tt.id_of(x["token"]) for x in alts]


def test_served_scores_by_echo_and_by_prompt_logprobs_are_the_teachers_and_go_through_the_ledger(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    seqs = [tok.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"] for r in _rows(3)]
    want = [_teacher_logp(tiny_models["teacher"], s) for s in seqs]
    led = Ledger(tmp_path / "ledger.db")
    with running(str(tiny_models["teacher"]), model_name="tiny", api_key_env=None, window_ms=5) as url:
        echo = ServedScorer(ModelRef("openai:tiny", {"base_url": url}), led, tok, top=5)
        by_echo = echo.score(seqs)
    with vllm_like(str(tiny_models["teacher"])) as (url, app):
        vl = ServedScorer(ModelRef("openai:tiny", {"base_url": url}), led, tok, top=5, prompt_logprobs=True)
        by_plp = vl.score(seqs)
        assert app.state.calls == 3 and vl.made == 3
        assert vl.score(seqs) == by_plp and app.state.calls == 3 and vl.cached == 3  # a second time: the ledger
    assert echo.made == 3 and led.stats()["calls"] == 6
    # (the server's engine computes in its own dtype and batch shapes: its logprobs agree to ~3e-3, not bit for bit,
    # so its top-5 is checked by each listed token's logprob rather than by which five near-ties it picked)
    for s, lp, a, b in zip(seqs, want, by_echo, by_plp):
        assert len(a) == len(b) == len(s) - 1
        for p, (ea, eb) in enumerate(zip(a, b), start=1):
            assert ea["id"] == eb["id"] == s[p]
            assert ea["logprob"] == pytest.approx(float(lp[p - 1, s[p]]), abs=1e-2)
            assert eb["logprob"] == pytest.approx(float(lp[p - 1, s[p]]), abs=1e-4)
            top = lp[p - 1].topk(5)
            listed = _ids(tok, ea["top_logprobs"])
            assert len(set(listed)) == 5 and None not in listed
            assert [x["logprob"] for x in ea["top_logprobs"]] == pytest.approx(lp[p - 1, listed].tolist(), abs=1e-2)
            assert min(x["logprob"] for x in ea["top_logprobs"]) >= float(top.values[-1]) - 1e-2
            assert sorted(x["id"] for x in eb["top_logprobs"]) == sorted(top.indices.tolist())


def _sample_kl(student_dir, teacher_dir, rows, n=4, seed=0) -> float:
    """Mean reverse KL(student || teacher) per token over the whole vocabulary, on the student's own greedy-free
    samples of the prompts (the quantity on-policy distillation lowers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    s = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    t = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    total, count = 0.0, 0
    for r in rows:
        prompt = tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
        x = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(n):
                seq = s.generate(x, attention_mask=torch.ones_like(x), do_sample=True, max_new_tokens=8, top_k=0,
                                 pad_token_id=tok.pad_token_id)
                ls = s(seq).logits[0, len(prompt) - 1:-1].log_softmax(-1)
                lt = t(seq).logits[0, len(prompt) - 1:-1].log_softmax(-1)
                total += float((ls.exp() * (ls - lt)).sum())
                count += ls.shape[0]
    return total / count


COMMON = dict(epochs=10, learning_rate=2e-2, batch_size=4, seed=0, device="cpu",
              kd={"loss": "reverse_kl", "beta": 0.5}, on_policy={"max_new_tokens": 8, "temperature": 1.0})


def test_on_policy_from_a_local_teacher_lowers_the_divergence_on_the_students_own_samples(tiny_models, tmp_path):
    from tests.test_kd_teacher import _sharp_teacher

    teacher = _sharp_teacher(tiny_models, tmp_path / "teacher")
    rows = _rows()
    res = on_policy(rows, str(tiny_models["base"]), tmp_path / "op", teacher=str(teacher), **COMMON)
    assert res.kd["teacher"] == "local" and res.steps == 20
    before = _sample_kl(tiny_models["base"], teacher, rows)
    after = _sample_kl(tmp_path / "op", teacher, rows)
    assert after < 0.6 * before


def test_on_policy_from_a_served_teacher_scores_through_the_ledger_and_a_rerun_makes_no_call(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_kd_teacher import _sharp_teacher

    teacher = _sharp_teacher(tiny_models, tmp_path / "teacher")
    rows = _rows()
    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    led = Ledger(tmp_path / "ledger.db")
    with vllm_like(str(teacher)) as (url, app):
        ref = ModelRef("openai:tiny", {"base_url": url})
        first = on_policy(rows, str(tiny_models["base"]), tmp_path / "a", **COMMON,
                          scorer=ServedScorer(ref, led, tok, top=20, prompt_logprobs=True))
        assert first.kd["scoring_calls_made"] == app.state.calls == 10 * 8 and first.kd["scoring_calls_cached"] == 0
        again = on_policy(rows, str(tiny_models["base"]), tmp_path / "b", **COMMON,
                          scorer=ServedScorer(ref, led, tok, top=20, prompt_logprobs=True))
        # the same seed samples the same answers: every score comes from the ledger, and the student is the same
        assert again.kd["scoring_calls_made"] == 0 and again.kd["scoring_calls_cached"] == 80 and app.state.calls == 80
    assert led.stats()["calls"] == 80
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = _sample_kl(tiny_models["base"], teacher, rows)
    after = _sample_kl(tmp_path / "a", teacher, rows)
    assert after < 0.95 * before  # (top-20 and a tail bucket: a weaker pull than the local teacher's full one)


def test_a_served_teacher_listing_its_whole_vocabulary_gives_the_local_teachers_loss(tiny_models, tmp_path):
    """The served path's coarse-grained divergence is the local path's chunked one when nothing is left out."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    from stillhouse.train.onpolicy import served_trainer_class

    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    p1 = tok.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True, tokenize=True,
                                 return_dict=True)["input_ids"]
    c1, c2, pad = tok("abcde")["input_ids"], tok("xy")["input_ids"], tok.pad_token_id
    P, C = len(p1), len(c1)
    inputs = {"prompt_ids": torch.tensor([p1, [pad] * 3 + p1[3:]]), "prompt_mask": torch.tensor([[1] * P, [0] * 3 + [1] * (P - 3)]),
              "completion_ids": torch.tensor([c1, c2 + [pad] * (C - 2)]),
              "completion_mask": torch.tensor([[1] * C, [1, 1] + [0] * (C - 2)])}
    student = AutoModelForCausalLM.from_pretrained(tiny_models["base"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": "hi"}]}])
    for loss, beta in (("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.3)):
        args = DistillationConfig(output_dir=str(tmp_path / "o"), use_cpu=True, report_to=[], beta=beta)
        local = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=data,
                                    processing_class=tok)._compute_loss(student, inputs, None)
        with vllm_like(str(tiny_models["teacher"])) as (url, app):
            scorer = ServedScorer(ModelRef("openai:tiny", {"base_url": url}), Ledger(tmp_path / f"{loss}.db"), tok,
                                  top=len(tok), prompt_logprobs=True)
            served = served_trainer_class()(model=student, scorer=scorer, kd={"loss": loss, "beta": 0.3}, args=args,
                                            train_dataset=data, processing_class=tok)._compute_loss(student, inputs, None)
        assert int(local[2]) == int(served[2]) == C + 2
        assert float(served[0]) == pytest.approx(float(local[0]), rel=1e-4) and float(local[0]) > 1e-4


def test_the_train_stage_distils_on_policy_from_stillhouse_serve_through_the_run_ledger(tiny_models, tmp_path):
    import json

    from stillhouse.recipe import parse_recipe
    from stillhouse.stages import get_stage, open_run

    with running(str(tiny_models["teacher"]), model_name="tiny", api_key_env=None, window_ms=5) as url:
        r = parse_recipe(f"""name: op
run_dir: {tmp_path / 'run'}
teacher: {{spec: "openai:tiny", options: {{base_url: "{url}", api_key_required: false}}}}
prompts: {{source: world, n: 8}}
generation: {{max_tokens: 8, temperature: 1.0}}
curate: {{filters: [{{name: exact_dedup}}]}}
student: {{base: "{tiny_models['base']}"}}
train: {{method: on_policy, kd: {{loss: jsd, beta: 0.5}}, on_policy: {{max_new_tokens: 6, top_logprobs: 5}}, epochs: 1,
         learning_rate: 0.001, batch_size: 4, max_length: 128}}
evaluate: {{n_per_family: 1, max_tokens: 8}}
""")
        run = open_run(r)
        for stage in ("generate", "curate", "train"):
            get_stage(stage).run(r, run)
    counts = json.loads((run.root / "stages" / "train.json").read_text())["counts"]
    op = counts["students"]["student"]["kd"]
    assert op["teacher"] == "served" and op["scoring_via"] == "echo" and op["prompts"] == counts["samples"]
    assert op["scoring_calls_made"] == counts["samples"] and op["scoring_calls_cached"] == 0
    by_stage = {row["stage"]: row["calls"] for row in Ledger(run.ledger).stats()["by_stage_model"]}
    assert by_stage["train"] == op["scoring_calls_made"]  # every scoring call is a ledger row of the train stage
    card = (run.root / "student" / "README.md").read_text()
    assert "on-policy distillation (jsd)" in card and "top-5 logprobs (echo" in card
    assert not (run.root / "student" / "_trainer").exists()


def test_a_served_teacher_with_another_tokenizer_or_no_echo_is_refused_naming_what_differs(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    from stillhouse.errors import StillhouseError

    tok = AutoTokenizer.from_pretrained(tiny_models["base"])
    scorer = ServedScorer(ModelRef("openai:tiny", {"base_url": "http://127.0.0.1:9/v1"}), Ledger(tmp_path / "l.db"), tok)
    ids = tok("cat")["input_ids"]
    words = {"tokens": ["c", "at", ""], "token_logprobs": [None, -0.1, -0.2], "top_logprobs": [None, {}, {}]}
    with pytest.raises(StillhouseError, match=r"position 1: teacher 'at', student 'a'.*needs the teacher's tokenizer"):
        scorer._entries(ids, {"logprobs": words})
    with pytest.raises(StillhouseError, match="did not echo"):
        scorer._entries(ids, {"logprobs": None})


def _on_policy_recipe(tmp_path, teacher: str, base):
    """A minimal on_policy recipe with this teacher spec, for the refusals."""
    from stillhouse.recipe import parse_recipe

    return parse_recipe(f"""name: op
run_dir: {tmp_path / 'run'}
teacher: {{spec: "{teacher}"}}
prompts: {{source: world, n: 8}}
student: {{base: "{base}"}}
train: {{method: on_policy}}
""")


def test_on_policy_refuses_a_teacher_that_can_neither_run_here_nor_score(tiny_models, tmp_path):
    from stillhouse.errors import StillhouseError
    from stillhouse.train.onpolicy import check_teacher

    r = _on_policy_recipe(tmp_path, "scripted:x", tiny_models["base"])
    with pytest.raises(StillhouseError, match="neither a local model .* nor a server that scores text"):
        check_teacher(r)


def test_on_policy_under_a_launcher_is_refused_before_training(tiny_models, tmp_path):
    from stillhouse.errors import StillhouseError
    from stillhouse.stages import open_run
    from stillhouse.train import TrainStage
    from stillhouse.train.launch import Launch

    r = _on_policy_recipe(tmp_path, f"hf:{tiny_models['teacher']}", tiny_models["base"])
    stage = TrainStage()
    stage.launch = Launch(nproc=2)
    with pytest.raises(StillhouseError, match="on_policy trains in one process"):
        stage.check(r, open_run(r))
