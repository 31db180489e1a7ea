"""The `openai` backend: any OpenAI-compatible chat endpoint (OpenAI, vLLM, llama.cpp, `stillhouse serve`).

Built on the official client's async API. A fixed pool of workers keeps `concurrency` calls
in flight at all times (a slow call never holds up the others, unlike batch-at-a-time
clients), each worker sending to the endpoint with the fewest calls in flight.

Retries are ours, not the client's (its `max_retries` is set to 0): the client does not
retry a 200 response whose body is malformed or truncated, and that must count as a failed
attempt, never as a sample. Back-off is exponential with full jitter, and honours
`Retry-After` when the server sends one.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import threading
import time
from typing import Callable, Iterator
from urllib.parse import urlparse

from pydantic import Field

from stillhouse.errors import StillhouseError
from stillhouse.teachers import BackendOptions, CallFailed, Completion, Request, Transport, split_reasoning

# Statuses where retrying cannot help: the request itself is wrong, or the key is.
_FATAL_STATUS = {400, 401, 403, 404, 422}


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

    # -- one call ---------------------------------------------------------------------------
    def _body(self, req: Request) -> dict:
        body = {"model": self.model, "messages": list(req.messages), "max_tokens": req.max_tokens,
                "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}
        if self.logprobs:
            body["logprobs"] = True
            if self.top_logprobs:
                body["top_logprobs"] = int(self.top_logprobs)
        return body

    @staticmethod
    def _parse(body: bytes) -> Completion:
        """Validate a response body; raise ValueError for anything that is not a usable completion.

        The raw JSON is read directly rather than through the client's pydantic models: at a
        few hundred calls a second that parsing is a measurable share of one core.
        """
        resp = json.loads(body)
        if not isinstance(resp, dict) or not resp.get("choices"):
            raise ValueError("response has no choices")
        choice = resp["choices"][0]
        msg = choice.get("message") or {}
        if not isinstance(msg.get("content"), str):
            raise ValueError("response choice has no message content")
        if choice.get("finish_reason") is None:
            raise ValueError("response choice has no finish_reason (truncated?)")
        think, _ = split_reasoning(msg["content"])
        usage = resp.get("usage") or {}
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
        retry_after = None
        response = getattr(exc, "response", None)
        if response is not None:
            h = response.headers.get("retry-after")
            try:
                retry_after = float(h) if h is not None else None
            except ValueError:
                retry_after = None
        if retry_after is not None:
            return min(retry_after, self.backoff_max)
        return random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** attempt))

    async def _call(self, clients, inflight, index: int, req: Request):
        import openai

        last = "no attempt made"
        for attempt in range(self.max_attempts):
            k = min(range(len(clients)), key=lambda j: inflight[j])
            inflight[k] += 1
            t0 = time.perf_counter()
            exc: Exception | None = None
            try:
                raw = await clients[k].chat.completions.with_raw_response.create(
                    **self._body(req), extra_body=self.extra_body or None)
                completion = self._parse(raw.content)
                completion.extra["latency_s"] = time.perf_counter() - t0
                completion.extra["attempts"] = attempt + 1
                return completion
            except openai.APIStatusError as e:
                if e.status_code in _FATAL_STATUS:
                    raise CallFailed(index, f"HTTP {e.status_code} from {urlparse(self.base_urls[k]).netloc}: "
                                            f"{_safe_message(e)}", attempt + 1) from None
                exc, last = e, f"HTTP {e.status_code}"
            except (openai.APITimeoutError, openai.APIConnectionError) as e:
                exc, last = e, type(e).__name__
            except (ValueError, openai.APIResponseValidationError) as e:  # includes JSONDecodeError
                exc, last = None, f"malformed response ({type(e).__name__})"
            finally:
                inflight[k] -= 1
            await asyncio.sleep(self._delay(attempt, exc))
        raise CallFailed(index, f"gave up after {self.max_attempts} attempts; last error: {last}", self.max_attempts)

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


def _safe_message(e: Exception) -> str:
    body = getattr(e, "body", None)
    msg = body.get("message") if isinstance(body, dict) else None
    return (msg or str(e))[:200]
