"""Logit distillation from a local teacher's full distribution (kd.source: teacher), chunked over tokens and
vocabulary."""

import pytest
import torch

from stillhouse.train.kd import full_kd_loss_sum, kd_loss_sum, set_chunks


@pytest.fixture
def small_chunks():
    from trl.kernels import chunked_divergence, chunked_logprob

    saved = (chunked_divergence.TOKEN_CHUNK_SIZE, chunked_divergence.VOCAB_CHUNK_SIZE, chunked_logprob.TOKEN_CHUNK_SIZE)
    set_chunks(3, 7)  # 10 tokens x 23 words: four token chunks, four vocabulary chunks (the last ones partial)
    yield
    (chunked_divergence.TOKEN_CHUNK_SIZE, chunked_divergence.VOCAB_CHUNK_SIZE, chunked_logprob.TOKEN_CHUNK_SIZE) = saved


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd"])
def test_the_chunked_loss_and_its_gradient_are_the_full_logits_ones(loss, small_chunks):
    g = torch.Generator().manual_seed(0)
    head_s, head_t = torch.nn.Linear(8, 23, bias=False), torch.nn.Linear(6, 23, bias=True)
    torch.nn.init.normal_(head_s.weight, generator=g)
    torch.nn.init.normal_(head_t.weight, generator=g)
    h_s = torch.randn(10, 8, generator=g, requires_grad=True)
    h_t = torch.randn(10, 6, generator=g)
    y = torch.randint(0, 23, (10,), generator=g)
    got = full_kd_loss_sum(h_s, head_s, h_t, head_t, y, loss=loss, alpha=0.3, beta=0.4, chunk_vocab=7)
    (g_chunked,) = torch.autograd.grad(got, h_s)
    # the same loss from the full [tokens, vocabulary] logits: every word listed, so the "rest" bucket is empty
    lt = head_t(h_t).log_softmax(-1)
    ids = torch.arange(23).expand(10, 23)
    want = kd_loss_sum(head_s(h_s), y, ids, lt.detach(), loss=loss, alpha=0.3, beta=0.4)
    (g_full,) = torch.autograd.grad(want, h_s)
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-4)
    assert torch.allclose(g_chunked, g_full, atol=1e-4)
    assert float(g_full.abs().max()) > 1e-3  # (a gradient that is there to compare)


def _answers(n):
    return [{"messages": [{"role": "user", "content": f"Spell {w}"}, {"role": "assistant", "content": w * 2}]}
            for w in ["cat", "dog", "owl", "emu", "yak", "elk", "ram", "cod"][:n]]


def _full_kl(student_dir, teacher_dir, rows) -> float:
    """Mean KL(teacher || student) over the answers' tokens, over the whole vocabulary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillhouse.train.sft import _encode

    tok = AutoTokenizer.from_pretrained(student_dir)
    s = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    t = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    total, n = 0.0, 0
    for r in rows:
        ids, start = _encode(tok, r["messages"])
        with torch.no_grad():
            ls = s(torch.tensor([ids])).logits[0, start - 1:-1].log_softmax(-1)
            lt = t(torch.tensor([ids])).logits[0, start - 1:-1].log_softmax(-1)
        total += float((lt.exp() * (lt - ls)).sum())
        n += len(ids) - start
    return total / n


def _sharp_teacher(tiny_models, path):
    """The tiny teacher with its output layer scaled up: random tiny models are nearly uniform, this one has
    distributions far from the base's and far from certain."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = AutoModelForCausalLM.from_pretrained(tiny_models["teacher"], dtype=torch.float32)
    t.config.tie_word_embeddings = False
    head = torch.nn.Linear(t.config.hidden_size, t.config.vocab_size, bias=False)
    head.weight.data = t.get_output_embeddings().weight.data.clone() * 6
    t.set_output_embeddings(head)
    t.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_models["teacher"]).save_pretrained(path)
    return path


def test_distilling_the_teachers_full_distribution_brings_the_student_to_it(tiny_models, tmp_path):
    from stillhouse.train.sft import sft

    teacher = _sharp_teacher(tiny_models, tmp_path / "teacher")
    rows = _answers(8)
    common = dict(epochs=10, learning_rate=1e-2, batch_size=4, max_length=128, seed=0, device="cpu")
    sft(rows, str(tiny_models["base"]), tmp_path / "sft", **common)
    res = sft(rows, str(tiny_models["base"]), tmp_path / "kd", **common, teacher=str(teacher),
              kd={"source": "teacher", "loss": "forward_kl", "alpha": 0.9, "beta": 0.5, "chunk_tokens": 16,
                  "chunk_vocab": 32})
    assert res.kd["source"] == "teacher" and res.kd["samples_aligned"] == 8
    assert res.kd["tokens_with_teacher_distribution"] == sum(len(r["messages"][-1]["content"]) + 2 for r in rows)
    before = _full_kl(tiny_models["base"], teacher, rows)
    after_sft = _full_kl(tmp_path / "sft", teacher, rows)
    after_kd = _full_kl(tmp_path / "kd", teacher, rows)
    # the answers alone do not teach the teacher's distributions; the teacher's own distributions bring the student
    # to them
    assert after_kd < 0.5 * before and after_kd < 0.5 * after_sft


def _recipe(tmp_path, teacher_spec: str, base):
    from stillhouse.recipe import parse_recipe

    return parse_recipe(f"""name: kdt
run_dir: {tmp_path / 'run'}
teacher: {{spec: "{teacher_spec}", options: {{}}}}
prompts: {{source: world, n: 8}}
generation: {{max_tokens: 8, temperature: 1.0}}
curate: {{filters: [{{name: exact_dedup}}]}}
student: {{base: "{base}"}}
train: {{method: kd, kd: {{source: teacher, loss: reverse_kl, alpha: 0.5}}, epochs: 1, learning_rate: 0.001,
         batch_size: 4, max_length: 128}}
evaluate: {{n_per_family: 1, max_tokens: 8}}
""")


def test_the_train_stage_distils_a_local_teachers_full_distribution(tiny_models, tmp_path):
    import json

    from stillhouse.stages import get_stage, open_run

    r = _recipe(tmp_path, f"hf:{tiny_models['teacher']}", tiny_models["base"])
    run = open_run(r)
    for stage in ("generate", "curate", "train"):
        get_stage(stage).run(r, run)
    counts = json.loads((run.root / "stages" / "train.json").read_text())["counts"]
    kd = counts["students"]["student"]["kd"]
    assert kd["source"] == "teacher" and kd["samples_aligned"] == kd["samples"] == counts["samples"]
    assert "towards the local teacher's full next-token distribution" in (run.root / "student" / "README.md").read_text()
    assert json.loads((run.root / "student" / "stillhouse_provenance.json").read_text())["train"]["kd"]["source"] == "teacher"


def test_a_teacher_behind_an_api_is_refused_for_the_teacher_source(tiny_models, tmp_path):
    from stillhouse.errors import StillhouseError
    from stillhouse.stages import open_run
    from stillhouse.train import TrainStage

    r = _recipe(tmp_path, "openai:gpt-4o-mini", tiny_models["base"])
    with pytest.raises(StillhouseError, match="reached through an API .* method: on_policy"):
        TrainStage().check(r, open_run(r))
