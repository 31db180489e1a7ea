"""lm-evaluation-harness against `stillhouse serve`, on two local tasks (tests/data/lm_eval/, no hub access).

- `local-completions` on a loglikelihood (multiple-choice) task: lm-eval sends token-id prompts to
  /v1/completions with echo + logprobs and sums the continuation's logprobs. Every per-choice loglikelihood
  and greedy flag it logs is checked against the same tiny model run in-process with transformers.
- `local-chat-completions` on a generate_until task: every answer lm-eval logs is checked against greedy
  generation in-process from the same chat prompt (with a stop string that cuts some replies), and its
  exact_match against one computed from those.
- The /v1/completions prompt shapes lm-eval relies on (strings and token ids, single and batched), and a clear
  400 for a token id outside the vocabulary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch

from stillhouse.serve import running

# No hub: the tasks' data are local files and the tokenizer a local directory.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
TASKS = REPO / "tests" / "data" / "lm_eval"
MAX_GEN = 8  # stillhouse_gen.yaml's max_gen_toks


def _docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASKS / name).read_text().splitlines() if line.strip()]


class Reference:
    """The served model, run in-process: what the server's answers must agree with."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
        """log P(continuation | context), and whether every continuation token is the argmax."""
        ctx, full = self.ids(context), self.ids(context + continuation)
        assert full[: len(ctx)] == ctx  # the pair splits cleanly into tokens (true of this char-level tokenizer)
        cont = torch.tensor(full[len(ctx):])
        logp = self.model(torch.tensor([full])).logits[0].float().log_softmax(-1)
        rows = logp[len(ctx) - 1: len(full) - 1]  # row t predicts token t + 1
        return float(rows.gather(1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all())

    @torch.inference_mode()
    def greedy_chat(self, user: str) -> str:
        """Greedy reply to one user message, `MAX_GEN` tokens or up to EOS, special tokens dropped."""
        prompt = self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                              add_generation_prompt=True)
        ids = torch.tensor([self.ids(prompt)])
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=MAX_GEN, eos_token_id=self.tok.eos_token_id,
                                  pad_token_id=self.tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if self.tok.eos_token_id in out:
            out = out[: out.index(self.tok.eos_token_id)]
        return self.tok.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random model shaped like `tiny_models`' but with untied input and output embeddings.

    A tied random model's greedy output just repeats the prompt's last token (here the chat template's newline,
    which is also the task's stop string), so every reply would be "" and the generation check vacuous.
    """
    from transformers import LlamaForCausalLM

    from stillhouse.demo.build import SHAPES, make_model
    from stillhouse.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cfg = make_model(SHAPES["tiny"], tok, 0).config
    cfg.tie_word_embeddings = False
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    out = tmp_path_factory.mktemp("untied")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(model_dir):
    with running(str(model_dir), model_name="tiny", window_ms=5, dtype="float32") as url:
        yield url


@pytest.fixture(scope="module")
def ref(model_dir) -> Reference:
    return Reference(model_dir)


def _evaluate(monkeypatch, model: str, model_args: dict, task: str, **kw) -> dict:
    from lm_eval import simple_evaluate  # here, not at the top: importing lm_eval takes seconds
    from lm_eval.tasks import TaskManager

    # The task YAMLs name their data files relative to the repository root.
    monkeypatch.chdir(REPO)
    # include_defaults=False: indexing lm-eval's thousands of built-in task YAMLs would take ~15 s.
    tm = TaskManager(include_path=str(TASKS), include_defaults=False)
    out = simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=tm, log_samples=True,
                          bootstrap_iters=0, **kw)
    assert out is not None
    return out


def test_lm_eval_loglikelihood_task_via_local_completions(server, ref, model_dir, monkeypatch):
    docs = _docs("mc.jsonl")
    out = _evaluate(monkeypatch, "local-completions", {
        "model": "tiny", "base_url": server + "/completions",
        # lm-eval tokenizes locally (to know where the context ends) and sends token ids (tokenized_requests=True)
        "tokenizer_backend": "huggingface", "tokenizer": str(model_dir),
        "max_length": 256,  # the tiny model's context
        "batch_size": 4,  # several prompts per request: `prompt` arrives as a list of token-id lists
        "max_retries": 1,
    }, "stillhouse_mc")

    samples = sorted(out["samples"]["stillhouse_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    hits = []
    for s, doc in zip(samples, docs):
        context, conts = f"Q: {doc['question']}\nA:", [" " + c for c in doc["choices"]]
        assert [tuple(a) for a in s["arguments"]] == [(context, c) for c in conts]
        want = [ref.loglikelihood(context, c) for c in conts]
        got = [r[0] for r in s["resps"]]  # one (loglikelihood, is_greedy) per choice
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-3), doc
        assert [g for _, g in got] == [g for _, g in want], doc
        hits.append(max(range(len(conts)), key=lambda k: want[k][0]) == doc["answer"])
    assert out["results"]["stillhouse_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_lm_eval_generation_task_via_local_chat_completions(server, ref, monkeypatch):
    docs = _docs("gen.jsonl")
    full = [ref.greedy_chat(d["question"]) for d in docs]
    # The YAML stops at a newline, which this random model does not write. To exercise `until` (which lm-eval leaves
    # to the server as `stop`), stop instead at a character from the middle of the longest reply.
    longest = max(full, key=len)
    stop = longest[len(longest) // 2]
    want = [r.split(stop)[0] for r in full]
    assert want != full and any(want), (full, stop)  # some replies are cut, and not all are empty

    out = _evaluate(monkeypatch, "local-chat-completions",
                    {"model": "tiny", "base_url": server + "/chat/completions", "max_retries": 1},
                    "stillhouse_gen", apply_chat_template=True, gen_kwargs={"until": [stop]})

    samples = sorted(out["samples"]["stillhouse_gen"], key=lambda s: s["doc_id"])
    assert len(samples) == len(docs)
    for s, d in zip(samples, docs):  # lm-eval sent what the reference was given
        (chat, kwargs), = s["arguments"]  # chat: lm-eval's JsonChatStr, the messages as one JSON string
        # (some lm-eval versions add "type": "text" to each message; the server ignores unknown fields)
        sent = [(m["role"], m["content"]) for m in json.loads(chat[0])]
        assert sent == [("user", d["question"])] and kwargs["until"] == [stop]
    assert [s["resps"][0][0] for s in samples] == want
    expected_em = sum(w == d["answer"] for w, d in zip(want, docs)) / len(docs)
    assert out["results"]["stillhouse_gen"]["exact_match,none"] == pytest.approx(expected_em)


# -- the /v1/completions prompt shapes lm-eval relies on ----------------------------------------------------------

def _complete(server: str, prompt) -> httpx.Response:
    return httpx.post(server + "/completions", timeout=60, json={
        "model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1})


def test_completions_accepts_strings_and_token_ids_alike(server, ref):
    a, b = "Q: Hi\nA:", "Cats <|im_end|>"  # the second holds a special token, which must round-trip through echo
    ids_a, ids_b = ref.ids(a), ref.ids(b)
    assert ref.tok.eos_token_id in ids_b

    def choices(prompt) -> list[tuple[str, list]]:
        r = _complete(server, prompt)
        assert r.status_code == 200, r.text
        return [(c["text"], c["logprobs"]["token_logprobs"]) for c in r.json()["choices"]]

    one, many = choices(a), choices([a, b])
    assert len(one) == 1 and len(many) == 2
    assert many[0][0].startswith(a) and many[1][0].startswith(b)  # echoed, then 2 generated tokens
    assert len(many[1][1]) == len(ids_b) + 2
    for by_text, by_ids in ((one, choices(ids_a)), (many, choices([ids_a, ids_b]))):
        assert [t for t, _ in by_ids] == [t for t, _ in by_text]
        for (_, x), (_, y) in zip(by_ids, by_text):
            assert x[0] is None and y[0] is None  # the first prompt token has no logprob
            assert x[1:] == pytest.approx(y[1:], abs=1e-5)


@pytest.mark.parametrize("prompt, says", [
    ("vocab", "prompt: token id"),  # one past the last id
    ([-1, 5], "prompt: token id -1"),
    ([[5, 6], [7, 10**9]], "prompt[1]: token id 1000000000"),
    ([True, 5], "prompt: Value error, must be a string, a list of strings"),  # a boolean is not a token id
    ([1.0, 5], "list of token ids (integers)"),
    ([[1, "a"]], "or a list of token-id lists"),
    ([], "must not be empty"),
])
def test_completions_rejects_bad_prompts_with_a_clear_400(server, ref, prompt, says):
    if prompt == "vocab":
        prompt = [5, len(ref.tok)]
    r = _complete(server, prompt)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith("prompt")
    assert says in err["message"]
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200


def test_echo_logprobs_keep_one_generated_token_even_when_it_is_eos(tmp_path):
    """lm-eval asks for echo + logprobs + max_tokens=1 and sums token_logprobs[ctxlen:-1]: it relies on exactly one
    generated token after the prompt. When the model's greedy next token is EOS, that token must still be there."""
    from stillhouse.demo.build import SHAPES, make_model
    from stillhouse.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = make_model(SHAPES["tiny"], tok, 3)
    ids = tok("The end.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():  # point EOS's (tied) embedding along the final hidden state: EOS becomes the argmax
        h = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        model.model.embed_tokens.weight[tok.eos_token_id] = h / h.norm() * 50
        assert model(torch.tensor([ids])).logits[0, -1].argmax() == tok.eos_token_id
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with running(str(tmp_path), model_name="tiny", dtype="float32") as url:
        r = httpx.post(url + "/completions", timeout=60, json={
            "model": "tiny", "prompt": [ids], "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"][0]["logprobs"]["token_logprobs"]) == len(ids) + 1


# -- lm-eval's own `hf` model type, straight from a model directory ---------------------------------------------



def test_lm_eval_hf_model_type_loads_a_student_directory(tmp_path, model_dir, ref, monkeypatch):
    """A student as the train stage saves it (weights, tokenizer, chat template in one directory) is evaluated by
    lm-eval's `hf` model type with no server and no hub, on held-out items of a world task: every answer lm-eval
    generates equals greedy generation in-process from the same chat prompt, and its score is theirs."""
    import shutil

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from stillhouse.demo import world
    from stillhouse.evaluate.lm_eval import write_task

    student = tmp_path / "run" / "student"
    shutil.copytree(model_dir, student)
    docs = [{"prompt": t.prompt, "answer": t.answer} for t in world.sample_tasks(12, "heldout", seed=2)]
    write_task(tmp_path / "tasks", "stillhouse_world_heldout", docs, max_tokens=MAX_GEN)
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = simple_evaluate(model="hf", model_args={"pretrained": str(student), "dtype": "float32", "device": "cpu"},
                          tasks=["stillhouse_world_heldout"], apply_chat_template=True, log_samples=True,
                          bootstrap_iters=0, task_manager=tm)
    assert out is not None
    samples = sorted(out["samples"]["stillhouse_world_heldout"], key=lambda s: s["doc_id"])
    assert [s["doc"]["prompt"] for s in samples] == [d["prompt"] for d in docs]
    want = [ref.greedy_chat(d["prompt"]) for d in docs]
    assert any(want)
    assert [s["resps"][0][0] for s in samples] == want
    got = [s["filtered_resps"][0] for s in samples]
    expected = sum(g == d["answer"] for g, d in zip(got, docs)) / len(docs)
    assert out["results"]["stillhouse_world_heldout"]["exact_match,final_answer"] == pytest.approx(expected)
