"""`stillhouse chat` fits each request to the model's context and survives a server's errors: against a real
`stillhouse serve` of a tiny config-built model (a 256-token context), driven through typer's CliRunner."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from stillhouse.chat import Fitted, TooLong, exchanges, fit, refit, refusal_numbers
from stillhouse.cli import app
from stillhouse.serve import running


def _chat(*args: str, lines: list[str]):
    r = CliRunner().invoke(app, ["chat", *args, "--temperature", "0"], input="".join(x + "\n" for x in lines))
    assert r.exception is None or isinstance(r.exception, SystemExit), r.output
    assert "Traceback" not in r.output and "BadRequestError" not in r.output, r.output
    return r


@pytest.fixture(autouse=True)
def _absl_leaves_pytests_stderr_open(monkeypatch):
    """A local target's server starts inside CliRunner, where uvicorn's logging config closes every existing handler;
    absl's (imported by earlier tests' libraries) then closes its stream unless it is the *current* sys.stderr, and
    inside CliRunner it is not: the stream is pytest's capture, and the session dies with "lost sys.stderr"."""
    import sys

    if "absl.logging" in sys.modules:
        monkeypatch.setattr(sys.modules["absl.logging"].get_absl_handler().python_handler, "close", lambda: None)


@pytest.fixture(scope="module")
def server(tiny_models):
    with running(str(tiny_models["teacher"]), model_name="tiny", window_ms=5) as url:
        yield url


def test_a_local_model_with_max_tokens_past_its_context(tiny_models):
    """The first message used to end in `max_tokens=256 plus the prompt's 31 tokens exceeds the context of 256`."""
    r = _chat(str(tiny_models["teacher"]), "--max-tokens", "256", lines=["Who are you?", "And who made you?", "/exit"])
    assert r.exit_code == 0, r.output
    assert "256-token context" in r.output and r.output.count("assistant> ") == 2 and "error" not in r.output


def test_a_long_conversation_drops_its_oldest_turns_and_says_so(tiny_models):
    long = " ".join(["river"] * 8)  # ~50 tokens
    r = _chat(str(tiny_models["teacher"]), "--max-tokens", "48", lines=[f"{long} {i}" for i in range(6)])
    assert r.exit_code == 0, r.output
    assert r.output.count("assistant> ") == 6 and "error" not in r.output
    assert "left the conversation to fit the model's 256-token context" in r.output


def test_a_message_longer_than_the_context_is_not_sent_and_the_chat_goes_on(tiny_models):
    r = _chat(str(tiny_models["teacher"]), "--max-tokens", "16", lines=[" ".join(["comet"] * 400), "Hello", "/exit"])
    assert r.exit_code == 0, r.output
    assert "(not sent: your message is" in r.output and "the model's context is 256" in r.output
    assert r.output.count("assistant> ") == 1


def test_a_servers_error_is_one_line_and_the_conversation_continues(server):
    r = _chat(server, "--model", "nobody", lines=["Hello", "Hello again", "/exit"])
    assert r.exit_code == 0, r.output
    errors = [ln for ln in r.output.splitlines() if "(error:" in ln]
    assert len(errors) == 2 and all("the server refused (404)" in ln and "does not exist" in ln for ln in errors)


def test_a_url_is_fitted_from_the_servers_refusal(server):
    """Against a URL there is no tokenizer here: the server's 400 names the prompt and the context, and the request
    is re-sent with max_tokens capped (and, once the history outgrows the context, without its oldest turns)."""
    long = " ".join(["harbor"] * 8)
    r = _chat(server, "--max-tokens", "1000", lines=[f"{long} {i}" for i in range(5)])
    assert r.exit_code == 0, r.output
    assert r.output.count("assistant> ") == 5 and "error" not in r.output
    assert "left the conversation" in r.output


def _words(messages):
    return sum(len(m["content"].split()) for m in messages) + 2 * len(messages)


def _turns(n, words=10):
    out = []
    for i in range(n):
        out += [{"role": "user", "content": " ".join(["q"] * words)}, {"role": "assistant", "content": " ".join(["a"] * words)}]
    return out + [{"role": "user", "content": "last"}]


def test_fit_caps_the_reply_then_drops_the_oldest_exchanges():
    h = _turns(0)
    got = fit(h, 256, 100, _words)
    assert got == Fitted(h, 97, 0, 3)  # max_tokens capped to the context the prompt leaves
    h = _turns(3)  # 3 exchanges of 24 + the new message: 75 tokens
    got = fit(h, 256, 90, _words)  # a quarter of the context (22) kept for the reply: one exchange goes
    assert got.dropped == 1 and got.messages == h[2:] and got.max_tokens == 90 - 51
    assert fit(h, 256, 60, _words).dropped == 2
    assert fit(h, 10, 90, _words).dropped == 0  # room for 10 tokens: nothing dropped
    system = [{"role": "system", "content": "be brief"}]
    got = fit(system + h, 256, 90, _words)
    assert got.messages[0] == system[0] and got.dropped == 1 and got.messages[1:] == h[2:]
    assert [len(x) for x in exchanges(system + h)] == [1, 2, 2, 2, 1]
    with pytest.raises(TooLong):
        fit([{"role": "user", "content": " ".join(["x"] * 200)}], 16, 100, _words)
    assert fit(h, 256, None, None) == Fitted(h, 256)


def test_refusals_are_read_and_refit():
    ours = "max_tokens=256 plus the prompt's 31 tokens exceeds the context of 256"
    assert refusal_numbers(ours) == (31, 256)
    assert refusal_numbers("the prompt is 300 tokens; this model's context is 256") == (300, 256)
    vllm = ("This model's maximum context length is 4096 tokens. However, you requested 5000 tokens (4000 in the "
            "messages, 1000 in the completion).")
    assert refusal_numbers(vllm) == (4000, 4096)
    assert refusal_numbers("model 'x' does not exist") is None
    h = _turns(2)
    assert refit(Fitted(h, 256), 256, ours) == (Fitted(h, 225, 0, 31), 256)
    again, ctx = refit(Fitted(h, 256), 256, "the prompt is 300 tokens; this model's context is 256")
    assert ctx == 256 and again.messages == h[2:] and again.dropped == 1
    assert refit(Fitted(h[-1:], 256), 256, "the prompt is 300 tokens; this model's context is 256") is None
