"""`stillhouse serve`'s limits and refusals: a full queue, oversized bodies, parameters it cannot honour."""

import asyncio
import json
import threading

import httpx
import pytest

from stillhouse.serve import running

MSG = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def server(tiny_models):
    with running(str(tiny_models["teacher"]), model_name="tiny", window_ms=5) as url:
        yield url


def _chat(url, **kw):
    return httpx.post(url + "/chat/completions", json={"model": "tiny", "messages": MSG, "max_tokens": 4, **kw},
                      timeout=60)


def test_a_flood_past_the_queue_gets_429_with_retry_after_and_the_server_recovers(tiny_models):
    with running(str(tiny_models["teacher"]), model_name="tiny", max_batch=1, max_queue=2, window_ms=1) as url:
        async def flood():
            async with httpx.AsyncClient(timeout=120) as c:
                return await asyncio.gather(*(c.post(url + "/chat/completions", json={
                    "model": "tiny", "messages": MSG, "max_tokens": 24, "temperature": 0}) for _ in range(30)))

        rs = asyncio.run(flood())
        codes = [r.status_code for r in rs]
        # one decoding and two waiting at a time: most of a simultaneous flood is refused (how many depends on how
        # fast the first ones finish, so only the shape is asserted)
        assert set(codes) == {200, 429}
        busy = next(r for r in rs if r.status_code == 429)
        assert int(busy.headers["retry-after"]) >= 1
        assert busy.json()["error"]["type"] == "rate_limit_error" and busy.json()["error"]["code"] == "rate_limit_exceeded"
        assert _chat(url).status_code == 200


def test_a_chunked_body_over_the_limit_gets_413(server):
    def chunks(n):
        for _ in range(n):
            yield b" " * (64 << 10)

    big = httpx.post(server + "/chat/completions", content=chunks(40), timeout=30,  # 2.5 MiB, no Content-Length
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["message"]
    body = json.dumps({"model": "tiny", "messages": MSG, "max_tokens": 3}).encode()
    small = httpx.post(server + "/chat/completions", content=iter([body[:10], body[10:]]), timeout=30,
                       headers={"content-type": "application/json"})
    assert small.status_code == 200, small.text


@pytest.mark.parametrize("param, value", [
    ("best_of", 3), ("typical_p", 0.5), ("min_tokens", 5), ("ignore_eos", True), ("stop_token_ids", [5]),
    ("response_format", {"type": "json_object"}), ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("guided_json", {"type": "object"}), ("echo", True), ("length_penalty", 0.5), ("use_beam_search", True),
])
def test_parameters_that_are_not_implemented_get_a_400_naming_them(server, param, value):
    r = _chat(server, **{param: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


@pytest.mark.parametrize("extra", [dict(frequency_penalty=0, presence_penalty=0, logit_bias=None, top_k=-1),
                                   dict(top_k=0, min_p=0, repetition_penalty=1, best_of=1, response_format={"type": "text"}),
                                   dict(tool_choice="none", stop_token_ids=[], ignore_eos=False)])
def test_neutral_values_of_those_parameters_are_accepted(server, extra):
    assert _chat(server, **extra).status_code == 200


@pytest.mark.parametrize("extra, param", [(dict(top_k=-2), "top_k"), (dict(frequency_penalty=3), "frequency_penalty"),
                                          (dict(logit_bias={"abc": 1}), "logit_bias"),
                                          (dict(logit_bias={"100000": 1}), "logit_bias"),
                                          (dict(logit_bias={"5": 101}), "logit_bias.5")])
def test_bad_values_of_implemented_parameters_get_a_400(server, extra, param):
    r = _chat(server, **extra)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_implemented_sampling_parameters_reach_the_engine(server):
    forced = _chat(server, max_tokens=6, temperature=0, logit_bias={"40": 100}).json()  # id 40 is a printable character
    assert len(set(forced["choices"][0]["message"]["content"])) == 1
    greedy = _chat(server, max_tokens=8, temperature=0).json()["choices"][0]["message"]["content"]
    top1 = _chat(server, max_tokens=8, temperature=1.5, seed=3, top_k=1).json()["choices"][0]["message"]["content"]
    assert top1 == greedy


def test_completions_refuse_stream_rather_than_ignore_it(server):
    r = httpx.post(server + "/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 3, "stream": True},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_chat_templates_and_tokenizers_run_off_the_event_loop(tiny_models, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    threads = []
    real = PreTrainedTokenizerBase.apply_chat_template

    def spy(self, *a, **k):
        threads.append(threading.current_thread().name)
        return real(self, *a, **k)

    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", spy)
    with running(str(tiny_models["teacher"]), model_name="tiny") as url:
        assert _chat(url).status_code == 200
    assert threads and all(name.startswith("stillhouse-tokenize") for name in threads)


def test_api_keys_are_compared_in_constant_time(tiny_models, monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: (calls.append((a, b)), real(a, b))[1])
    monkeypatch.setenv("SERVE_LIMITS_KEY", "k-9")
    with running(str(tiny_models["teacher"]), model_name="tiny", api_key_env="SERVE_LIMITS_KEY") as url:
        assert httpx.get(url + "/models", headers={"authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(url + "/models", headers={"authorization": "Bearer k-9"}).status_code == 200
    assert (b"Bearer nope", b"Bearer k-9") in calls


def test_an_idle_connection_outlives_the_clients_own_keep_alive(server):
    """A keep-alive connection left idle past httpx's (and the openai client's) 5 s expiry is still open: the server
    never closes one that a client may be about to reuse (with uvicorn's default 5 s, a client sending just then got a
    connection reset under load)."""
    import socket
    import time
    from urllib.parse import urlsplit

    host, port = urlsplit(server).hostname, urlsplit(server).port
    with socket.create_connection((host, port), timeout=30) as s:
        def get() -> bytes:
            s.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            return s.recv(4096)

        assert get().startswith(b"HTTP/1.1 200")
        time.sleep(httpx.Limits().keepalive_expiry + 1.5)
        assert get().startswith(b"HTTP/1.1 200")  # the same connection, still served
