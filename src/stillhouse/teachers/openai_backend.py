"""The `openai` backend: any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, `stillhouse serve`).

Built on the official client's async API. A fixed pool of workers keeps `concurrency` calls
in flight at all times (a slow call never holds up the others, unlike batch-at-a-time
clients), each worker sending to the endpoint with the fewest calls in flight.

Retries are ours, not the client's (its `max_retries` is set to 0): the client does not
retry a 200 response whose body is malformed or truncated, and that must count as a failed
attempt, never as a sample. Back-off is exponential with full jitter, and honours
`Retry-After` (seconds or an HTTP date, or OpenAI's `retry-after-ms`) up to the call's timeout.

Reasoning models (OpenAI's o-series and gpt-5) reject `max_tokens` and sampling parameters with a
400: a model whose name matches `reasoning_models` is sent `max_completion_tokens` and no
temperature or top_p. The table is an option, so a new model family needs no release.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import re
import threading
import time
from email.utils import parsedate_to_datetime
from typing import Callable, Iterator
from urllib.parse import urlparse

from pydantic import Field

from stillhouse.errors import StillhouseError
from stillhouse.teachers import BackendOptions, CallFailed, Completion, Request, Transport, split_reasoning

# Statuses where retrying cannot help: the request itself is wrong, or the key is.
_FATAL_STATUS = {400, 401, 403, 404, 422}

# Model names (regular expressions, matched from the start) that take `max_completion_tokens` and no sampling
# parameters: OpenAI's reasoning models. gpt-5-chat is a chat model and takes both.
REASONING_MODELS = [r"o\d", r"gpt-5(?!-chat)", r"codex-"]

# Model names tiktoken knows the tokenizer of (OpenAI's own).
_OPENAI_MODELS = re.compile(r"(gpt-|o\d|chatgpt-|text-embedding-|davinci|babbage)")


class OpenAIOptions(BackendOptions):
    base_url: str | list[str] | None = Transport(
        None, description="one endpoint or several (calls go to the least loaded); default $OPENAI_BASE_URL, "
                          "else OpenAI's")
    api_key_env: str = Transport("OPENAI_API_KEY", description="the environment variable holding the key")
    api_key_required: bool = Transport(True, description="refuse to start without a key when calling OpenAI itself")
    concurrency: int = Transport(16, ge=1, description="calls in flight at once")
    timeout: float = Transport(120.0, gt=0, description="seconds per attempt")
    max_attempts: int = Transport(8, ge=1)
    backoff_base: float = Transport(0.5, ge=0)
    backoff_max: float = Transport(60.0, ge=0)
    logprobs: bool = Field(False, description="ask for the chosen tokens' logprobs")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="and the k most likely alternatives")
    extra_body: dict = Field(default_factory=dict, description="extra JSON fields sent with every request")
    reasoning_models: list[str] = Transport(
        list(REASONING_MODELS),
        description="model-name patterns (regular expressions from the start of the name) of reasoning models: "
                    "they are sent max_completion_tokens and no temperature or top_p")


class OpenAIBackend:
    name = "openai"
    Options = OpenAIOptions

    def __init__(self, model: str, options: OpenAIOptions):
        self.model = model
        urls = options.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.base_urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.base_urls:
            raise StillhouseError("teacher.options.base_url: give at least one endpoint URL")
        key_env = options.api_key_env
        self.api_key = os.environ.get(key_env)
        if self.api_key is None:
            if options.api_key_required and any("api.openai.com" in u for u in self.base_urls):
                raise StillhouseError(f"teacher.options.api_key_env: environment variable {key_env} is not set")
            self.api_key = "none"  # local servers usually need no key; the client insists on one
        self.concurrency = options.concurrency
        self.timeout = options.timeout
        self.max_attempts = options.max_attempts
        self.backoff_base = options.backoff_base
        self.backoff_max = options.backoff_max
        self.logprobs = options.logprobs
        self.top_logprobs = options.top_logprobs
        self.extra_body = dict(options.extra_body)
        self.endpoint = ",".join(urlparse(u).netloc for u in self.base_urls)  # hosts only: never a key
        try:
            self.reasoning = any(re.match(p, model) for p in options.reasoning_models)
        except re.error as e:
            raise StillhouseError(f"teacher.options.reasoning_models: not a regular expression ({e})") from None
        self._encoding = None

    # -- one call ---------------------------------------------------------------------------
    def request_body(self, req: Request) -> dict:
        """The JSON body of one chat completion request (online, or as a line of a batch file)."""
        if self.reasoning:
            body = {"model": self.model, "messages": list(req.messages), "max_completion_tokens": req.max_tokens,
                    "seed": req.seed}
        else:
            body = {"model": self.model, "messages": list(req.messages), "max_tokens": req.max_tokens,
                    "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
        body.update(self.extra_body)
        if self.logprobs:
            body["logprobs"] = True
            if self.top_logprobs:
                body["top_logprobs"] = int(self.top_logprobs)
        return body

    def count_prompt_tokens(self, messages) -> int | None:
        """The prompt's tokens by tiktoken where the model is OpenAI's and tiktoken can load its encoding; None where
        the tokenizer is unknown (the call layer then uses a bound that cannot undercount)."""
        if self._encoding is None:
            self._encoding = _tiktoken_encoding(self.model) or False
        if self._encoding is False:
            return None
        # each message's role and separators cost a few tokens beyond its content (OpenAI's cookbook counts 3-4)
        return sum(len(self._encoding.encode(str(m.get("content") or ""), disallowed_special=())) + 4
                   for m in messages) + 3

    @staticmethod
    def _parse(body: bytes | dict) -> Completion:
        """Validate a response body; raise `Unusable` (a ValueError) for anything that is not a usable completion.

        The raw JSON is read directly rather than through the client's pydantic models: at a
        few hundred calls a second that parsing is a measurable share of one core.
        """
        resp = json.loads(body) if isinstance(body, (bytes, str)) else body
        usage = (resp.get("usage") or {}) if isinstance(resp, dict) else {}
        if not isinstance(resp, dict) or not resp.get("choices"):
            raise Unusable("response has no choices", usage)
        choice = resp["choices"][0]
        msg = choice.get("message") or {}
        if not isinstance(msg.get("content"), str):
            raise Unusable("response choice has no message content", usage)
        if choice.get("finish_reason") is None:
            raise Unusable("response choice has no finish_reason (truncated?)", usage)
        think, _ = split_reasoning(msg["content"])
        extra = {}
        content_lp = (choice.get("logprobs") or {}).get("content")
        if content_lp is not None:
            extra["logprobs"] = [
                {"token": t["token"], "logprob": t["logprob"],
                 "top_logprobs": [{"token": x["token"], "logprob": x["logprob"]} for x in t.get("top_logprobs") or []]}
                for t in content_lp]
        return Completion(
            text=msg["content"], reasoning=msg.get("reasoning_content") or msg.get("reasoning") or think,
            prompt_tokens=int(usage.get("prompt_tokens") or 0), completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice["finish_reason"], model=resp.get("model", ""),
            system_fingerprint=resp.get("system_fingerprint"), extra=extra)

    def _delay(self, attempt: int, exc: Exception | None) -> float:
        response = getattr(exc, "response", None)
        retry_after = retry_after_seconds(response.headers) if response is not None else None
        if retry_after is not None:  # the server knows when it will take the call: wait that long, up to a call's time
            return min(retry_after, self.timeout)
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))

    async def _call(self, clients, inflight, index: int, req: Request):
        import openai

        last = "no attempt made"
        billed = [0, 0]  # tokens the provider charged for attempts that gave no usable answer
        for attempt in range(self.max_attempts):
            k = min(range(len(clients)), key=lambda j: inflight[j])
            inflight[k] += 1
            t0 = time.perf_counter()
            exc: Exception | None = None
            try:
                body = self.request_body(req)
                extra = {k: body.pop(k) for k in self.extra_body}  # the client's signature knows only its own fields
                raw = await clients[k].chat.completions.with_raw_response.create(**body, extra_body=extra or None)
                completion = self._parse(raw.content)
                completion.extra["latency_s"] = time.perf_counter() - t0
                completion.extra["attempts"] = attempt + 1
                if billed != [0, 0]:
                    completion.extra["billed_failures"] = tuple(billed)
                return completion
            except openai.APIStatusError as e:
                _add_usage(billed, getattr(e, "body", None))
                if e.status_code in _FATAL_STATUS:
                    raise CallFailed(index, f"HTTP {e.status_code} from {urlparse(self.base_urls[k]).netloc}: "
                                            f"{_safe_message(e)}", attempt + 1, tuple(billed)) from None
                exc, last = e, f"HTTP {e.status_code}"
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                exc, last = e, type(e).__name__
            except (ValueError, openai.APIResponseValidationError) as e:  # includes JSONDecodeError
                _add_usage(billed, {"usage": getattr(e, "usage", None)})
                exc, last = None, f"malformed response ({e if isinstance(e, Unusable) else type(e).__name__})"
            finally:
                inflight[k] -= 1
            if attempt + 1 < self.max_attempts:  # no wait after the last attempt: nothing follows it
                await asyncio.sleep(self._delay(attempt, exc))
        raise CallFailed(index, f"gave up after {self.max_attempts} attempts; last error: {last}", self.max_attempts,
                         tuple(billed))

    # -- the pool ---------------------------------------------------------------------------
    def generate(self, requests: list[Request], progress: Callable[[int], None] | None = None,
                 admit: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Completion]]:
        """Yield `(index, completion)` as calls finish; a CallFailed is yielded in place of a completion.

        `admit(i)` is asked before request i is sent; once it answers False no new call starts
        (calls in flight finish), which is how a budget cap stops a run cleanly.
        """
        out: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        async def main() -> None:
            from openai import AsyncOpenAI

            clients = [AsyncOpenAI(base_url=u, api_key=self.api_key, max_retries=0, timeout=self.timeout)
                       for u in self.base_urls]
            inflight = [0] * len(clients)
            # Shortest prompts first: a batching server (vLLM, `stillhouse serve`) then decodes similar requests
            # together and wastes less on padding (the demo's served generation: 19% faster). Nothing else depends on
            # the order: results are yielded with their index.
            todo = iter(sorted(range(len(requests)),
                               key=lambda i: sum(len(str(m.get("content") or "")) for m in requests[i].messages)))
            lock = asyncio.Lock()

            async def worker() -> None:
                while not stop.is_set():
                    async with lock:
                        i = next(todo, None)
                        if i is None or (admit is not None and not admit(i)):
                            return
                    try:
                        out.put((i, await self._call(clients, inflight, i, requests[i])))
                    except CallFailed as e:
                        out.put((i, e))

            try:
                await asyncio.gather(*(worker() for _ in range(min(self.concurrency, max(1, len(requests))))))
            finally:
                for c in clients:
                    await c.close()

        def runner() -> None:
            try:
                with asyncio.Runner(loop_factory=_loop_factory()) as r:
                    r.run(main())
            except BaseException as e:  # surface crashes of the loop to the consumer
                out.put((None, e))
            finally:
                out.put(done)

        thread = threading.Thread(target=runner, name="stillhouse-openai", daemon=True)
        thread.start()
        try:
            while True:
                item = out.get()
                if item is done:
                    break
                i, result = item
                if i is None:
                    raise result
                if progress:
                    progress(1)
                yield i, result
        finally:
            stop.set()

    def close(self) -> None:
        pass


def _loop_factory():
    """uvloop's event loop where installed (it roughly halves the client's per-call CPU), else asyncio's."""
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:
        return None


class Unusable(ValueError):
    """A response that is no completion; `usage` is what the provider says it billed for it anyway (maybe {})."""

    def __init__(self, reason: str, usage: dict | None):
        super().__init__(reason)
        self.usage = usage or {}


def _add_usage(billed: list[int], body) -> None:
    usage = body.get("usage") if isinstance(body, dict) else None
    if isinstance(usage, dict):
        billed[0] += int(usage.get("prompt_tokens") or 0)
        billed[1] += int(usage.get("completion_tokens") or 0)


def retry_after_seconds(headers) -> float | None:
    """How long a response asks the client to wait: `retry-after-ms`, or `Retry-After` in seconds or as an HTTP date
    (RFC 9110); None when it does not say, or says something unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    h = headers.get("retry-after")
    if h is None:
        return None
    try:
        return max(0.0, float(h))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(h)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _tiktoken_encoding(model: str):
    """tiktoken's encoding of an OpenAI model, or None: another vendor's model, tiktoken not installed, or its
    encoding file not cached and not downloadable (offline)."""
    if not _OPENAI_MODELS.match(model):
        return None
    try:
        import tiktoken
    except ImportError:
        return None
    try:
        try:
            return tiktoken.encoding_for_model(model)
        except KeyError:  # a model newer than the installed tiktoken: its newest encoding
            return tiktoken.get_encoding("o200k_base")
    except Exception:  # the encoding could not be loaded (no network, no cache): the bound does the job
        return None


def _safe_message(e: Exception) -> str:
    body = getattr(e, "body", None)
    msg = body.get("message") if isinstance(body, dict) else None
    return (msg or str(e))[:200]
