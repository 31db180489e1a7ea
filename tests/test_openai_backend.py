"""The openai backend for every model a user names: reasoning models' parameters, retries that wait only when they
will try again, Retry-After in both forms, prompt-token bounds that hold for any script, billed failures costed."""

from __future__ import annotations

import email.utils
import time
from types import SimpleNamespace

import pytest

from stillhouse.calls import Ledger
from stillhouse.calls.costs import estimate_prompt_tokens
from stillhouse.errors import StillhouseError
from stillhouse.recipe import parse_recipe
from stillhouse.stages import open_run
from stillhouse.teachers import CallFailed, Request, load_backend
from stillhouse.teachers.openai_backend import retry_after_seconds
from tests.conftest import generate
from tests.fake_openai import FakeOpenAI

REQ = Request(messages=({"role": "user", "content": "hi"},), max_tokens=7, temperature=0.5, top_p=0.9, seed=3)


def _backend(model: str, **opts):
    return load_backend(f"openai:{model}", {"base_url": "http://127.0.0.1:9/v1", **opts})


@pytest.mark.parametrize("model,reasoning", [("o3-mini", True), ("o4-mini-2025-04-16", True), ("o1", True),
                                             ("gpt-5", True), ("gpt-5-mini", True), ("gpt-5-chat-latest", False),
                                             ("gpt-4o-mini", False), ("gpt-4.1", False), ("Qwen2.5-7B", False)])
def test_reasoning_models_get_max_completion_tokens_and_no_sampling_parameters(model, reasoning):
    body = _backend(model).request_body(REQ)
    if reasoning:
        assert body["max_completion_tokens"] == 7 and not {"max_tokens", "temperature", "top_p"} & set(body)
    else:
        assert body["max_tokens"] == 7 and body["temperature"] == 0.5 and body["top_p"] == 0.9
        assert "max_completion_tokens" not in body


def test_the_pattern_table_is_an_option_and_not_in_the_cache_key():
    from stillhouse.teachers import answer_identity

    assert "max_completion_tokens" in _backend("my-thinker-1", reasoning_models=["my-thinker"]).request_body(REQ)
    assert "max_tokens" in _backend("o3-mini", reasoning_models=[]).request_body(REQ)
    assert answer_identity("openai:o3", {"reasoning_models": []}) == answer_identity("openai:o3", {})
    with pytest.raises(StillhouseError, match="reasoning_models: not a regular expression"):
        _backend("o3", reasoning_models=["("])


def test_a_reasoning_model_is_called_without_the_parameters_it_rejects(tmp_path):
    with FakeOpenAI(reasoning_model=True, model="o4-mini") as srv:
        r = parse_recipe(f"name: o\nrun_dir: {tmp_path / 'run'}\nteacher: {{spec: 'openai:o4-mini', options: "
                         f"{{base_url: '{srv.base_url}', max_attempts: 1}}}}\nprompts: {{n: 3}}\n"
                         "generation: {max_tokens: 9, temperature: 0.7}\nstudent: {base: stillhouse:base}\n")
        m = generate(r, open_run(r))
        assert m["counts"]["calls_made"] == 3
        assert all(b["max_completion_tokens"] == 9 and "temperature" not in b for b in srv.bodies)


def test_no_wait_after_the_last_attempt(monkeypatch):
    import stillhouse.teachers.openai_backend as ob

    waits: list[float] = []
    real_sleep = ob.asyncio.sleep

    async def sleep(s):
        waits.append(s)
        await real_sleep(0)

    monkeypatch.setattr(ob.asyncio, "sleep", sleep)
    with FakeOpenAI(fault_rate=1.0, faults=("500",), max_faults_per_request=3) as srv:
        b = load_backend("openai:fake", {"base_url": srv.base_url, "max_attempts": 3, "backoff_base": 0.0})
        (_, result), = list(b.generate([REQ]))
    assert isinstance(result, CallFailed) or srv.requests == 3
    assert srv.requests == len(waits) + 1  # a wait between attempts, none after the last


def test_retry_after_in_both_forms_honoured_up_to_the_call_timeout():
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    in_20 = email.utils.formatdate(time.time() + 20, usegmt=True)
    assert 15 < retry_after_seconds({"retry-after": in_20}) <= 20
    assert retry_after_seconds({"retry-after": email.utils.formatdate(time.time() - 60, usegmt=True)}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None and retry_after_seconds({}) is None
    b = _backend("gpt-4o-mini", timeout=5.0, backoff_max=1.0)
    exc = SimpleNamespace(response=SimpleNamespace(headers={"retry-after": "100"}))
    assert b._delay(0, exc) == 5.0  # beyond the old 60 s cap's reach: the call's own timeout bounds it
    exc.response.headers = {"retry-after": "2"}
    assert b._delay(0, exc) == 2.0  # longer than backoff_max: the server's word wins


def test_prompt_token_bound_never_undercounts_cjk():
    from stillhouse.demo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    for text in ("你好，世界。" * 40, "Grüße aus Köln " * 20, "plain english words " * 30, "🙂" * 50):
        msgs = [{"role": "user", "content": text}]
        assert estimate_prompt_tokens(msgs) >= len(tok(text)["input_ids"])
        assert estimate_prompt_tokens(msgs) >= len(text)  # every character at least one token
    # the teacher's own count wins where its backend has one; a backend that cannot count falls back to the bound
    assert estimate_prompt_tokens([{"content": "abc"}], lambda m: 2) == 2
    assert estimate_prompt_tokens([{"content": "abc"}], lambda m: None) == 3 + 8 + 3


def test_a_failed_call_that_was_billed_is_costed(tmp_path):
    price = "price: {input_per_million: 1000000, output_per_million: 1000000}"

    def recipe(attempts: int) -> str:
        return (f"name: b\nrun_dir: {tmp_path / 'run'}\nteacher: {{spec: 'openai:fake', {price}, options: "
                f"{{base_url: '{url}', max_attempts: {attempts}, backoff_base: 0.0}}}}\nprompts: {{n: 2}}\n"
                "generation: {max_tokens: 8}\nstudent: {base: stillhouse:base}\n")

    with FakeOpenAI(fault_rate=1.0, faults=("billed_empty",), max_faults_per_request=1) as srv:
        url = srv.base_url
        r = parse_recipe(recipe(1))
        with pytest.raises(StillhouseError, match="2 calls failed"):
            generate(r, open_run(r))
        led = Ledger(tmp_path / "run" / "ledger.db")
        rows = list(led.export())
        assert len(rows) == 2 and all(x["status"] == "failed" and x["completion_tokens"] > 0 for x in rows)
        billed = {x["key"]: x["cost_usd"] for x in rows}
        assert all(c == x["prompt_tokens"] + x["completion_tokens"] for x, c in zip(rows, billed.values()))
        assert led.spent() == sum(billed.values()) > 0
        led.close()
        generate(parse_recipe(recipe(2)), open_run(r))  # the retry succeeds: its cost is added to the failure's
    led = Ledger(tmp_path / "run" / "ledger.db")
    for x in led.export():
        assert x["status"] == "ok" and x["cost_usd"] == billed[x["key"]] + x["prompt_tokens"] + x["completion_tokens"]
    led.close()
