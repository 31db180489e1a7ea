"""An OpenAI-compatible HTTP API over any local causal LM: FastAPI routes over the batching Engine."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from stillhouse.serve.engine import Engine, GenRequest, GenResult, QueueFull, Stopping


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers


def _error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error",
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": type_, "param": param, "code": code}})


class _BodyLimit:
    """Answers 413 to a request body over `limit` bytes, whether or not it declares a Content-Length.

    A chunked body has no Content-Length to check up front, so the body is read here (it is read
    in full for JSON parsing anyway) and handed on only once it is known to be within the limit.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = _error(413, f"request body is larger than {self.limit} bytes")
        n = dict(scope.get("headers") or []).get(b"content-length")
        if n is not None and n.isdigit() and int(n) > self.limit:
            return await too_big(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_big(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then the disconnect, which a streaming response listens for

        return await self.app(scope, replay, send)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


# Parameters that would change what is generated and that this server does not implement, each with the values
# that mean "off" (clients such as the openai client may send those). Any other value is a 400 naming the
# parameter, never silently ignored.
UNSUPPORTED: dict[str, tuple] = {
    "best_of": (None, 1), "suffix": (None, ""), "typical_p": (None, 1), "min_tokens": (None, 0),
    "ignore_eos": (None, False), "stop_token_ids": (None, []), "length_penalty": (None, 1),
    "use_beam_search": (None, False), "response_format": (None, {"type": "text"}), "tools": (None, []),
    "tool_choice": (None, "none", "auto"), "functions": (None, []), "function_call": (None, "none", "auto"),
    "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "prediction": (None,), "audio": (None,), "modalities": (None, ["text"]), "include_stop_str_in_output": (None, False),
    "skip_special_tokens": (None, True), "truncate_prompt_tokens": (None,), "top_a": (None, 0), "tfs": (None, 1),
    "mirostat_mode": (None, 0), "echo": (None, False),
}


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, metadata, ...)
    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    top_k: int | None = Field(None, ge=-1)  # None, 0 or -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None

    def unsupported(self) -> str | None:
        """The first parameter sent with a value this server cannot honour, if any."""
        extra = self.model_extra or {}
        return next((k for k, ok in UNSUPPORTED.items() if k in extra and extra[k] not in ok), None)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


# A token id in a prompt: strict, so that JSON `true` or `1.0` is a 400 rather than silently token 1.
TokenId = Annotated[int, Strict()]


class CompletionRequest(_Sampling):
    # OpenAI's four prompt shapes: a string, a batch of strings, one token-id list, a batch of token-id lists.
    # lm-evaluation-harness's `local-completions` sends token ids by default.
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_shape(cls, v, handler):
        # One message for a prompt of none of the four shapes, not the first of the union's per-member errors.
        try:
            return handler(v)
        except ValidationError:
            raise ValueError("must be a string, a list of strings, a list of token ids (integers) "
                             "or a list of token-id lists") from None


# Which distribution the `logprobs` in an answer describe, said on every completion: the model's own next-token
# distribution at temperature 1, taken before a watermark's green-list bias, repetition penalties, temperature and
# top-k/top-p/min-p, so a watermarked server samples its tokens from scores its logprobs do not show; or, with
# `--watermark-logprobs`, the watermarked distribution (after the bias, before the rest).
LOGPROBS_HEADER = {"X-Stillhouse-Logprobs": "model; before watermark, penalties, temperature, top-k, top-p, min-p"}
WATERMARKED_LOGPROBS_HEADER = {"X-Stillhouse-Logprobs": "watermarked; after watermark, before penalties, temperature, "
                                                        "top-k, top-p, min-p"}


_STOPPING_BODY = {"error": {"message": "", "type": "server_error", "param": None, "code": "server_stopping"}}


def _stopping_error(e: Stopping) -> JSONResponse:
    """503 with Retry-After: the request was not served because the server is stopping."""
    return JSONResponse(status_code=503, headers={"Retry-After": "5"},
                        content=_STOPPING_BODY | {"error": _STOPPING_BODY["error"] | {"message": str(e)}})


def create_app(engine: Engine, model_name: str, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    """The FastAPI app serving `engine` as model `model_name`; requests need `Bearer api_key` when one is set."""
    app = FastAPI(title="stillhouse serve", docs_url=None, redoc_url=None)
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    tok = engine.tokenizer
    logprobs_header = WATERMARKED_LOGPROBS_HEADER if engine.watermark_logprobs else LOGPROBS_HEADER
    # Chat templates and tokenizers are CPU work that would stall every other request on the event loop; one
    # thread, because a fast tokenizer is not safe to use from several threads at once.
    tokenize = ThreadPoolExecutor(1, thread_name_prefix="stillhouse-tokenize")

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.param, e.type, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ())[1:]) or None
        if err.get("type") == "json_invalid":
            return _error(400, "request body is not valid JSON", None, code="invalid_json")
        return _error(400, f"{loc or 'body'}: {err.get('msg')}", loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Stopping)  # accepted, then not finished within the drain limit; or arrived while stopping
    async def _stopping(_, e: Stopping):
        return _stopping_error(e)

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}", type_="server_error")

    async def auth(request: Request) -> None:
        # constant-time, so that response timing does not reveal how much of a guessed key is right
        if api_key is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                           f"Bearer {api_key}".encode()):
            raise APIError(401, "missing or invalid API key", type_="authentication_error", code="invalid_api_key")

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize, fn, *args)

    def check_sampling(body: _Sampling) -> dict:
        """The request's sampling settings as GenRequest fields; a 400 naming any that cannot be honoured."""
        bad = body.unsupported()
        if bad is not None:
            raise APIError(400, f"{bad} is not supported by this server (send it unset, or with its neutral value)",
                           bad, code="unsupported_parameter")
        bias = {}
        for key, value in (body.logit_bias or {}).items():
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < engine.vocab:
                raise APIError(400, f"logit_bias: {key!r} is not a token id of this model (0 to {engine.vocab - 1})",
                               "logit_bias")
            bias[int(key)] = value
        return {"top_k": max(0, body.top_k or 0), "min_p": body.min_p, "frequency_penalty": body.frequency_penalty,
                "presence_penalty": body.presence_penalty, "repetition_penalty": body.repetition_penalty,
                "logit_bias": bias or None}

    def submit(reqs: list[GenRequest]) -> list:
        try:
            return engine.submit_all(reqs)
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except Stopping:
            raise
        except RuntimeError as e:  # closed or stopped
            raise APIError(503, str(e), type_="server_error", code="unavailable") from None

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", "model",
                           code="model_not_found")

    def budget(prompt_len: int, max_tokens: int | None, default: int, param: str = "messages") -> int:
        room = engine.context - prompt_len
        if room <= 0:
            raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is {engine.context}", param)
        if max_tokens is None:
            return min(default, room)
        if max_tokens > room:
            raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the context "
                                f"of {engine.context}", "max_tokens")
        return max_tokens

    async def run(reqs: list[GenRequest]) -> list[GenResult]:
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in submit(reqs))))

    def stops(stop) -> list[str]:
        return [stop] if isinstance(stop, str) else list(stop or [])

    def chat_logprobs(res: GenResult) -> dict:
        return {"content": [{"token": tok.decode([x["id"]]), "logprob": x["logprob"], "bytes": None,
                             "top_logprobs": [{"token": tok.decode([i]), "logprob": v, "bytes": None} for i, v in x["top"]]}
                            for x in res.logprobs or []]} if res.logprobs is not None else None

    @app.get("/health")
    async def health():
        running, waiting = engine.load()
        return {"status": "ok", "model": model_name, "batches_run": engine.batches_run,
                "largest_batch": engine.largest_batch, "running": running, "waiting": waiting}

    @app.get("/v1/models", dependencies=[Depends(auth)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "stillhouse"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(auth)])
    async def chat(body: ChatRequest):
        check_model(body.model)
        extra = check_sampling(body)

        def encode(messages: list[dict]) -> list[int]:
            prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(prompt, add_special_tokens=False)["input_ids"]

        ids = await off_loop(encode, [m.model_dump(include={"role", "content"}) for m in body.messages])
        mt = budget(len(ids), body.max_completion_tokens or body.max_tokens, 512)
        top = (body.top_logprobs or 0) if body.logprobs else None
        reqs = [GenRequest(ids, mt, body.temperature, body.top_p, None if body.seed is None else body.seed + k,
                           stops(body.stop), top, **extra) for k in range(body.n)]
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            # Text goes out as the engine samples it: the engine thread hands each piece (and each
            # finished request) to this event loop through a queue.
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            for k, r in enumerate(reqs):
                r.on_text = lambda piece, k=k: loop.call_soon_threadsafe(events.put_nowait, (k, piece))
            futures = submit(reqs)
            for k, f in enumerate(futures):
                f.add_done_callback(lambda f, k=k: loop.call_soon_threadsafe(events.put_nowait, (k, f)))
            return StreamingResponse(_chat_stream(cid, created, model_name, events, futures, len(ids), chat_logprobs),
                                     media_type="text/event-stream", headers=logprobs_header)
        results = await run(reqs)
        usage = {"prompt_tokens": len(ids), "completion_tokens": sum(len(r.token_ids) for r in results),
                 "total_tokens": len(ids) + sum(len(r.token_ids) for r in results)}
        # plain dicts and strings already: a JSONResponse skips FastAPI's jsonable_encoder walk, per-request work on
        # the event loop that the engine thread competes with
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                             "system_fingerprint": engine.fingerprint,
                             "choices": [{"index": k, "message": {"role": "assistant", "content": r.text},
                                          "logprobs": chat_logprobs(r), "finish_reason": r.finish_reason}
                                         for k, r in enumerate(results)],
                             "usage": usage}, headers=logprobs_header)

    @app.post("/v1/completions", dependencies=[Depends(auth)])
    async def completions(body: CompletionRequest):
        check_model(body.model)
        extra = check_sampling(body)
        if body.stream:
            raise APIError(400, "stream is not supported on /v1/completions (it is on /v1/chat/completions)", "stream",
                           code="unsupported_parameter")
        single = isinstance(body.prompt, str) or (body.prompt and isinstance(body.prompt[0], int))
        prompts = [body.prompt] if single else body.prompt
        if not prompts:
            raise APIError(400, "prompt must not be empty", "prompt")
        # Every prompt as (its text, its token ids, its max_tokens), all checked before any is run. An id must be both
        # a token the tokenizer can decode and a row of the embedding (which may be padded past the tokenizer).
        vocab = min(len(tok), engine.model.get_input_embeddings().num_embeddings)

        def encode(q) -> tuple[str, list[int]]:
            if isinstance(q, str):
                return q, tok(q, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
            return tok.decode(q or [tok.eos_token_id]), q or [tok.eos_token_id]  # echoed: special tokens kept

        for k, q in enumerate(prompts):
            bad = next((i for i in q if not 0 <= i < vocab), None) if not isinstance(q, str) else None
            if bad is not None:
                where = "prompt" if single else f"prompt[{k}]"
                raise APIError(400, f"{where}: token id {bad} is not in the model's vocabulary "
                                    f"(ids 0 to {vocab - 1})", "prompt")
        encoded = [(text, ids, budget(len(ids), body.max_tokens, 16, "prompt"))
                   for text, ids in await off_loop(lambda: [encode(q) for q in prompts])]

        # all prompts' requests queued at once (or none, when the queue has no room for all): the engine batches them
        reqs = [[GenRequest(ids, mt, body.temperature, body.top_p, None if body.seed is None else body.seed + k,
                            stops(body.stop), body.logprobs, **extra) for k in range(body.n)] if mt else []
                for _, ids, mt in encoded]
        futures = iter(submit([r for rs in reqs for r in rs]))
        pending = [[next(futures) for _ in rs] for rs in reqs]

        async def one(ids: list[int], futs: list) -> tuple[list[GenResult], list[dict] | None]:
            results = list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futs))) if futs else \
                [GenResult("", [], "length", [] if body.logprobs is not None else None)] * body.n
            echo_lp = await asyncio.wrap_future(engine.score(ids, body.logprobs or 0)) \
                if body.echo and body.logprobs is not None else None
            return results, echo_lp

        outs = await asyncio.gather(*(one(ids, futs) for (_, ids, _), futs in zip(encoded, pending)))
        choices, pt, ct = [], 0, 0
        for (p, ids, _), (results, echo_lp) in zip(encoded, outs):
            pt += len(ids)
            for r in results:
                ct += len(r.token_ids)
                text = (p if body.echo else "") + r.text
                lp = None
                if body.logprobs is not None:
                    items = (echo_lp or []) + (r.logprobs or [])
                    toks = [tok.decode([x["id"]]) for x in items]
                    offs, pos = [], 0
                    for t in toks:
                        offs.append(pos)
                        pos += len(t)
                    lp = {"tokens": toks, "token_logprobs": [x["logprob"] for x in items],
                          "top_logprobs": [({tok.decode([i]): v for i, v in x["top"]} if x["top"] else None) for x in items],
                          "text_offset": offs}
                choices.append({"index": len(choices), "text": text, "logprobs": lp, "finish_reason": r.finish_reason})
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
                             "created": int(time.time()), "model": model_name, "system_fingerprint": engine.fingerprint,
                             "choices": choices,
                             "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}},
                            headers=logprobs_header)

    return app


async def _chat_stream(cid: str, created: int, model: str, events: asyncio.Queue, futures: list, prompt_tokens: int,
                       logprobs_of):
    """Server-sent events in OpenAI's chunk format: each choice's role, its text as it is sampled, its finish
    (with its logprobs, when asked for), then the usage and `[DONE]`. A client that goes away cancels its requests."""
    def event(payload: dict) -> str:
        return "data: " + json.dumps(payload) + "\n\n"

    def chunk(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> str:
        return event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                      "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

    try:
        for k in range(len(futures)):
            yield chunk(k, {"role": "assistant", "content": ""}, None)
        completion_tokens, left = 0, len(futures)
        while left:
            k, item = await events.get()
            if isinstance(item, str):
                yield chunk(k, {"content": item}, None)
                continue
            left -= 1
            if isinstance(item.exception(), Stopping):
                yield event(_STOPPING_BODY | {"error": _STOPPING_BODY["error"] | {"message": str(item.exception())}})
                return
            if item.exception() is not None:
                yield event({"error": {"message": f"generation failed: {type(item.exception()).__name__}",
                                       "type": "server_error", "param": None, "code": None}})
                return
            res = item.result()
            completion_tokens += len(res.token_ids)
            yield chunk(k, {}, res.finish_reason, logprobs_of(res))
        yield event({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                               "total_tokens": prompt_tokens + completion_tokens}})
        yield "data: [DONE]\n\n"
    finally:
        for f in futures:
            f.cancel()
