"""`stillhouse serve` against real clients: the official openai client (sync, async, streaming) and our backend."""

import asyncio
import json

import httpx
import openai
import pytest

from stillhouse.serve import running


@pytest.fixture(scope="module")
def server(tiny_models):
    with running(str(tiny_models["teacher"]), model_name="tiny", api_key_env=None, window_ms=20) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0)


MSG = [{"role": "user", "content": "Who are you?"}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert httpx.get(server.removesuffix("/v1") + "/health").json()["status"] == "ok"


def test_chat_parses_into_the_clients_types_with_usage(client, tiny_models):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models["teacher"])
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=0, n=2)
    assert len(r.choices) == 2 and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy
    prompt = tok.apply_chat_template(MSG, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(prompt, add_special_tokens=False)["input_ids"])
    # generated tokens are counted, special ones included (they are skipped in the text)
    if all(c.finish_reason == "length" for c in r.choices):
        assert r.usage.completion_tokens == 2 * 8
    else:
        assert 0 <= r.usage.completion_tokens < 2 * 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason in ("stop", "length")


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and len(lp[0].top_logprobs) == 3
    assert lp[0].logprob == pytest.approx(lp[0].top_logprobs[0].logprob, abs=1e-4)


def test_sampling_with_seed_is_reproducible(client):
    a = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=1.0, seed=5)
    b = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, temperature=1.0, seed=5)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_streaming_reassembles_to_the_full_answer(client):
    full = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10, temperature=0)
    parts = [c.choices[0].delta.content or "" for c in
             client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10, temperature=0, stream=True)
             if c.choices]
    assert "".join(parts) == full.choices[0].message.content and len(parts) > 2


def test_async_client_concurrent_requests_are_batched(server):
    async def go():
        c = openai.AsyncOpenAI(base_url=server, api_key="unused", max_retries=0)
        rs = await asyncio.gather(*(c.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"What is {i} + 1?"}], max_tokens=4, temperature=0)
            for i in range(12)))
        await c.close()
        return rs
    rs = asyncio.run(go())
    assert len(rs) == 12 and all(r.choices[0].message.content is not None for r in rs)
    assert httpx.get(server.removesuffix("/v1") + "/health").json()["largest_batch"] > 1


def test_completions_echo_logprobs(client):
    r = client.completions.create(model="tiny", prompt="The capital of", max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == "The capital of"
    assert len(lp.tokens) == len("The capital of") and lp.token_logprobs[0] is None
    assert all(x < 0 for x in lp.token_logprobs[1:])


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (json.dumps({"model": "nope", "messages": MSG}).encode(), 404),
    (json.dumps({"model": "tiny"}).encode(), 400),
    (json.dumps({"model": "tiny", "messages": []}).encode(), 400),
    (json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 100000}).encode(), 400),
    (json.dumps({"model": "tiny", "messages": MSG, "temperature": "hot"}).encode(), 400),
    (json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode(), 413),
])
def test_bad_requests_get_openai_shaped_4xx_and_the_server_stays_up(server, body, status):
    r = httpx.post(server + "/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200


def test_stillhouse_openai_backend_against_the_server(server):
    from stillhouse.teachers import Request, load_backend

    b = load_backend("openai:tiny", {"base_url": server, "api_key_required": False, "concurrency": 4})
    reqs = [Request(messages=({"role": "user", "content": f"What is {i} + 2?"},), max_tokens=6) for i in range(8)]
    got = dict(b.generate(reqs))
    assert sorted(got) == list(range(8)) and all(not isinstance(c, Exception) for c in got.values())
    assert got[0].model == "tiny" and got[0].prompt_tokens > 0


def test_bearer_key_auth(tiny_models, monkeypatch):
    monkeypatch.setenv("SERVE_TEST_KEY", "k-123")
    with running(str(tiny_models["teacher"]), model_name="tiny", api_key_env="SERVE_TEST_KEY") as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        assert [m.id for m in openai.OpenAI(base_url=url, api_key="k-123").models.list()] == ["tiny"]


def test_served_watermark_is_detectable(tiny_models, tmp_path):
    import statistics

    from stillhouse.watermark import keygen, z_scores

    key = tmp_path / "wm.json"
    keygen(key, bias=4.0)
    model = str(tiny_models["teacher"])
    with running(model, model_name="tiny", watermark=str(key)) as url:
        c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        texts = [c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": f"Tell me about {i}."}],
                                           max_tokens=60, temperature=1.0, seed=i).choices[0].message.content
                 for i in range(8)]
    z = [x for x in z_scores(model, texts, key) if x == x]  # NaN: a text too short to score
    assert len(z) >= 4 and statistics.mean(z) > 4, z


def _serve_process(model_dir, *args):
    """`stillhouse serve` in a subprocess on a free port: (process, base URL) once /health answers."""
    import socket
    import subprocess
    import time

    from tests.conftest import STILLHOUSE

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = subprocess.Popen([*STILLHOUSE, "serve", str(model_dir), "--port", str(port), "--model-name", "tiny", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    pytest.fail("the server did not start")


def _sigterm_with_requests_in_flight(model_dir, n, max_tokens, drain):
    """n chat requests (the last one streamed) accepted by a server decoding one at a time, then SIGTERM; returns
    each request's (status, body or stream text), the server's exit code and its stderr."""
    import os
    import signal
    import threading
    import time

    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    proc, url = _serve_process(model_dir, "--max-batch", "1", "--window-ms", "0", "--drain-timeout", str(drain))
    try:
        out = [None] * n

        def call(k):
            body = {"model": "tiny", "messages": [{"role": "user", "content": f"Count to {k}."}], "temperature": 0,
                    "max_tokens": max_tokens, "logit_bias": {str(eos): -100}}  # no early end: every answer runs long
            if k == n - 1:
                with httpx.stream("POST", url + "/v1/chat/completions", json=body | {"stream": True}, timeout=300) as r:
                    out[k] = (r.status_code, r.read().decode())
            else:
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
                out[k] = (r.status_code, r.json())

        threads = [threading.Thread(target=call, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        while True:  # every request accepted: one decoding, the rest waiting for its place
            h = httpx.get(url + "/health", timeout=10).json()
            if h["running"] + h["waiting"] == n:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(300)
        code = proc.wait(60)
        return out, code, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_lets_every_accepted_request_finish_within_the_drain_limit(tiny_models):
    import signal

    out, code, err = _sigterm_with_requests_in_flight(tiny_models["teacher"], 4, 120, drain=120)
    for status, body in out[:-1]:
        assert status == 200 and body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 120
    status, stream = out[-1]
    assert status == 200 and '"finish_reason": "length"' in stream and stream.rstrip().endswith("data: [DONE]")
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    assert "Traceback" not in err and "Error" not in err, err


def test_requests_left_at_the_drain_limit_get_an_openai_shaped_error_saying_the_server_is_stopping(tmp_path):
    import signal

    from stillhouse.demo.build import SHAPES, make_model
    from stillhouse.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = make_model(SHAPES["tiny"], tok, 1)
    model.config.max_position_embeddings = tok.model_max_length = 8192  # answers long enough to be cut off
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out, code, err = _sigterm_with_requests_in_flight(str(tmp_path / "m"), 4, 8000, drain=0)
    for status, body in out[:-1]:
        assert status == 503, body
        assert body["error"]["code"] == "server_stopping" and "the server is stopping" in body["error"]["message"]
        assert body["error"]["type"] == "server_error"
    status, stream = out[-1]
    assert status == 200 and '"code": "server_stopping"' in stream and "[DONE]" not in stream
    assert code in (0, -signal.SIGTERM)
    assert "Traceback" not in err and "Error" not in err, err


def test_chat_cli_streams_a_reply_from_a_local_model(tiny_models):
    import subprocess

    from tests.conftest import STILLHOUSE

    out = subprocess.run([*STILLHOUSE, "chat", str(tiny_models["teacher"]), "--max-tokens", "6", "--temperature", "0"],
                         input="Who are you?\n/exit\n", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert "chatting with teacher" in out.stdout and "assistant> " in out.stdout


@pytest.mark.parametrize("args, says", [(["--max-batch", "0"], "--max-batch must be at least 1"),
                                        (["--window-ms", "-5"], "--window-ms must not be negative"),
                                        (["--watermark-logprobs"], "--watermark-logprobs needs --watermark KEYFILE"),
                                        (["--quantize", "int3"], "--quantize must be one of none, int8, int4, not 'int3'"),
                                        (["--quantize", "int8", "--dtype", "float32"],
                                         "cannot be combined with --dtype float32")])
def test_bad_serve_options_fail_with_one_clear_line(tiny_models, args, says):
    import subprocess

    from tests.conftest import STILLHOUSE

    r = subprocess.run([*STILLHOUSE, "serve", str(tiny_models["teacher"]), *args], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and says in r.stderr + r.stdout and "Traceback" not in r.stderr


def test_a_watermarked_servers_logprobs_are_the_models_own_and_say_so(tiny_models, tmp_path):
    """Logprobs describe the model's distribution before the watermark's bias (the header says so): the first
    answer token's top logprobs equal the raw model's, although that token was chosen from biased scores."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillhouse.watermark import keygen

    key = tmp_path / "wm.json"
    keygen(key, bias=8.0)
    model = str(tiny_models["teacher"])
    with running(model, model_name="tiny", watermark=str(key), dtype="float32") as url:
        r = httpx.post(url + "/chat/completions", timeout=60, json={
            "model": "tiny", "messages": MSG, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 5})
    assert r.status_code == 200 and r.headers["X-Stillhouse-Logprobs"].startswith("model; before watermark")
    first = r.json()["choices"][0]["logprobs"]["content"][0]
    tok = AutoTokenizer.from_pretrained(model)
    ids = tok.apply_chat_template(MSG, add_generation_prompt=True, return_dict=True)["input_ids"]
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    with torch.no_grad():
        raw = lm(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    want = raw.topk(5).values.tolist()
    assert [x["logprob"] for x in first["top_logprobs"]] == pytest.approx(want, abs=1e-4)
    chosen = tok.get_vocab()[first["token"]]  # the token the biased scores chose, at its unbiased logprob
    assert first["logprob"] == pytest.approx(float(raw[chosen]), abs=1e-4)


def test_watermark_logprobs_report_the_distribution_the_tokens_are_drawn_from(tiny_models, tmp_path):
    """With --watermark-logprobs the reported logprobs are the watermarked distribution: the raw model's logits with
    the key's bias on the green list of the preceding token, renormalized; the header says so. A prompt scored with
    echo gets the same treatment, each position under its own preceding token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stillhouse.audit.radioactivity import GreenLists
    from stillhouse.watermark import keygen, read_key

    key = tmp_path / "wm.json"
    keygen(key, bias=3.0)
    model = str(tiny_models["teacher"])
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    greens = GreenLists(read_key(key), lm.config.vocab_size)

    def watermarked(ids):  # next-token logprobs after `ids`, as the watermark biases them
        with torch.no_grad():
            raw = lm(torch.tensor([ids])).logits[0].float()
        for t in range(len(ids)):
            ctx = tuple(ids[max(0, t + 1 - greens.width):t + 1])
            raw[t] += torch.tensor([3.0 * greens.is_green(ctx, j) for j in range(raw.shape[1])])
        return raw.log_softmax(-1)

    with running(model, model_name="tiny", watermark=str(key), watermark_logprobs=True, dtype="float32") as url:
        r = httpx.post(url + "/chat/completions", timeout=60, json={
            "model": "tiny", "messages": MSG, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 5})
        ids = tok("The capital of", add_special_tokens=False)["input_ids"]
        echo = httpx.post(url + "/completions", timeout=60, json={
            "model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1}).json()
    assert r.status_code == 200 and r.headers["X-Stillhouse-Logprobs"].startswith("watermarked; after watermark")
    prompt = tok.apply_chat_template(MSG, add_generation_prompt=True, return_dict=True)["input_ids"]
    first = r.json()["choices"][0]["logprobs"]["content"][0]
    want = watermarked(prompt)[-1]
    assert [x["logprob"] for x in first["top_logprobs"]] == pytest.approx(want.topk(5).values.tolist(), abs=1e-4)
    # greedy over the watermarked scores: the chosen token is the most likely one of the reported distribution
    assert first["logprob"] == pytest.approx(float(want.max()), abs=1e-4)
    # ... and the raw model's distribution differs from it (the bias is visible in what is reported)
    with torch.no_grad():
        raw = lm(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    assert max(abs(a - b) for a, b in zip(raw.topk(5).values.tolist(), want.topk(5).values.tolist())) > 0.01
    scored = echo["choices"][0]["logprobs"]["token_logprobs"]
    w = watermarked(ids)
    assert scored[1:] == pytest.approx([float(w[t - 1, ids[t]]) for t in range(1, len(ids))], abs=1e-4)


def test_watermark_logprobs_need_a_key():
    from stillhouse.teachers.hf import HFOptions

    with pytest.raises(ValueError, match="watermark_logprobs needs a watermark key file"):
        HFOptions(watermark_logprobs=True)


def test_serve_hands_no_prefix_cache_to_the_engine(tiny_models, monkeypatch):
    from typer.testing import CliRunner

    import stillhouse.serve as srv
    from stillhouse.cli import app

    seen = []
    monkeypatch.setattr(srv, "serve", lambda model, **kw: seen.append(kw))
    for args, want in (([], None), (["--no-prefix-cache"], False)):
        r = CliRunner().invoke(app, ["serve", str(tiny_models["teacher"]), *args])
        assert r.exit_code == 0, r.output
        assert seen[-1].get("prefix_cache") is want  # on unless asked: the engine's default
