"""`stillhouse chat`: a conversation with a model that fits each request to the model's context.

A model has a fixed context (prompt + reply, in tokens). The conversation grows with every turn, so each request
is fitted before it is sent: the oldest exchanges are dropped while the conversation leaves too little room for a
reply (the user is told), and `max_tokens` is capped to the context left after the prompt. The count is exact where
the model is local (its own tokenizer and chat template, as the server renders them). Against a URL, the context is
taken from `/v1/models` where the server says it (vLLM's `max_model_len`), and the request is re-fitted from a
server's refusal that names the numbers (stillhouse's and vLLM's messages). A server's error never ends the
conversation: it is one line, and the next message goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, TextIO

Counter = Callable[[list[dict]], int]

# Refusals that say how long the prompt was and how long the context is: (regex, group of the prompt's tokens or None,
# group of the context). stillhouse serve's two, then vLLM's.
_REFUSALS = [
    (re.compile(r"max_tokens=\d+ plus the prompt's (\d+) tokens exceeds the context of (\d+)"), 1, 2),
    (re.compile(r"the prompt is (\d+) tokens; this model's context is (\d+)"), 1, 2),
    (re.compile(r"maximum context length is (\d+) tokens.*?\((\d+) in the messages", re.S), 2, 1),
    (re.compile(r"maximum context length is (\d+) tokens", re.S), None, 1),
]


@dataclass
class Fitted:
    """A request fitted to the context: the messages to send, the reply's token cap, and how many of the oldest
    exchanges were dropped to make room (they leave the conversation)."""

    messages: list[dict]
    max_tokens: int
    dropped: int = 0
    prompt_tokens: int | None = None


class TooLong(Exception):
    """The newest message alone leaves no room for a reply."""


def exchanges(history: list[dict]) -> list[list[dict]]:
    """The conversation cut at each user turn (a leading system prompt on its own)."""
    out: list[list[dict]] = []
    for m in history:
        if m.get("role") == "user" or not out or out[-1][0].get("role") == "system":
            out.append([m])
        else:
            out[-1].append(m)
    return out


def reply_room(max_tokens: int, context: int) -> int:
    """The room kept for a reply before older turns are dropped: the asked-for `max_tokens`, but never more than a
    quarter of the context (a reply asked for 256 tokens of a 384-token context would otherwise push out every
    earlier turn; the conversation is worth more than room for a reply most models never fill)."""
    return max(1, min(max_tokens, context // 4))


def fit(history: list[dict], max_tokens: int, context: int | None, count: Counter | None) -> Fitted:
    """Fit `history` (ending on the new user message) to `context`: drop the oldest exchanges while the prompt
    leaves less than `reply_room` for the reply, then cap `max_tokens` to what is left. Without a context or a
    counter, the request goes as it is (the server's refusal fits it: `refit`)."""
    if context is None or count is None:
        return Fitted(list(history), max_tokens)
    parts = exchanges(history)
    system = parts[0] if parts and parts[0][0].get("role") == "system" else []
    turns = parts[1:] if system else parts
    dropped = 0
    want = reply_room(max_tokens, context)
    n = count(system + [m for t in turns for m in t])
    while len(turns) > 1 and n + want > context:
        turns, dropped = turns[1:], dropped + 1
        n = count(system + [m for t in turns for m in t])
    if n >= context:
        raise TooLong(f"your message is {n:,} tokens with the chat template; the model's context is {context:,}")
    return Fitted(system + [m for t in turns for m in t], min(max_tokens, context - n), dropped, n)


def refusal_numbers(message: str) -> tuple[int | None, int] | None:
    """(the prompt's tokens or None, the context) from a server's refusal of an over-long request, or None."""
    for rx, prompt, ctx in _REFUSALS:
        m = rx.search(message)
        if m:
            return (int(m.group(prompt)) if prompt else None), int(m.group(ctx))
    return None


def refit(sent: Fitted, max_tokens: int, message: str) -> tuple[Fitted, int] | None:
    """A smaller request after the server refused `sent` as too long (its `message`), and the context it named; None
    when the message names no context or nothing is left to drop. With the prompt's size known and room for a reply,
    only `max_tokens` is capped; else the oldest exchange goes."""
    nums = refusal_numbers(message)
    if nums is None:
        return None
    n, context = nums
    if n is not None and context - n >= reply_room(max_tokens, context):
        return Fitted(sent.messages, context - n, sent.dropped, n), context
    parts = exchanges(sent.messages)
    system = parts[0] if parts and parts[0][0].get("role") == "system" else []
    turns = parts[1:] if system else parts
    if len(turns) <= 1:
        if n is not None and context - n >= 1:
            return Fitted(sent.messages, context - n, sent.dropped, n), context
        return None
    return Fitted(system + [m for t in turns[1:] for m in t], max_tokens, sent.dropped + 1), context


def error_line(e: Exception) -> str:
    """A server's or client's error as one line."""
    import openai

    body = getattr(e, "body", None)
    msg = None
    if isinstance(body, dict):
        inner = body.get("error") if isinstance(body.get("error"), dict) else body
        msg = inner.get("message") if isinstance(inner.get("message"), str) else None
    status = getattr(e, "status_code", None)
    if isinstance(e, openai.APIConnectionError):
        return f"cannot reach the server ({type(e).__name__}); is it still running?"
    text = " ".join(str(msg or e).split())
    return f"the server refused ({status}): {text}" if status else f"{type(e).__name__}: {text}"


def local_counter(model_dir: str) -> tuple[int, Counter]:
    """A local model's context and a prompt counter that renders messages as `stillhouse serve` does."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    context = int(getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", 2048))

    def count(messages: list[dict]) -> int:
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return len(tok(prompt, add_special_tokens=False)["input_ids"])

    return context, count


def served_context(model) -> int | None:
    """The context a server states for a model in /v1/models (vLLM: `max_model_len`), else None."""
    extra = getattr(model, "model_extra", None) or {}
    for key in ("max_model_len", "context_length", "context_window", "max_context_length"):
        v = extra.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None


def converse(client, name: str, lines: Iterable[str], out: TextIO, *, max_tokens: int, temperature: float,
             context: int | None = None, count: Counter | None = None, ask: Callable[[], str] | None = None) -> None:
    """The chat loop: each line a user message (`/exit` ends it), each reply streamed to `out`. `ask` reads the next
    line (default: from `lines`); the loop ends at EOF."""
    import openai

    it = iter(lines)
    history: list[dict] = []

    def say(text: str = "", end: str = "\n") -> None:
        out.write(text + end)
        out.flush()

    while True:
        try:
            line = ask() if ask is not None else next(it)
        except (EOFError, StopIteration):
            say()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        try:
            req = fit(history, max_tokens, context, count)
        except TooLong as e:
            history.pop()
            say(f"(not sent: {e}; shorten it)")
            continue
        reply, streamed = [], False
        for _ in range(len(history) + 2):  # each refusal that names the numbers shrinks the request
            try:
                stream = client.chat.completions.create(model=name, messages=req.messages, stream=True,
                                                        max_tokens=req.max_tokens, temperature=temperature)
                if req.dropped:
                    say(f"(the oldest {req.dropped} exchange{'s' if req.dropped > 1 else ''} left the conversation to "
                        f"fit the model's {context or 'limited'}{'-token' if context else ''} context)")
                    history[:] = req.messages
                    req.dropped = 0
                say("assistant> ", end="")
                streamed = True
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        reply.append(chunk.choices[0].delta.content)
                        say(reply[-1], end="")
                say()
                break
            except openai.BadRequestError as e:
                again = None if streamed else refit(req, max_tokens, error_line(e))
                if again is None:
                    say(("\n" if streamed else "") + f"(error: {error_line(e)})")
                    break
                req, context = again
            except openai.OpenAIError as e:
                say(("\n" if streamed else "") + f"(error: {error_line(e)})")
                break
            except KeyboardInterrupt:
                say("\n(reply interrupted)")
                break
        else:
            say("(error: the server kept refusing the request as too long)")
        if reply:
            history.append({"role": "assistant", "content": "".join(reply)})
        else:  # nothing came back: the question leaves the conversation, so the next one is not sent with it twice
            history.pop()
