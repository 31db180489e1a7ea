"""A real OpenAI-compatible HTTP server on 127.0.0.1 that injects faults, for tests and benchmarks.

Answers are a pure function of the request (messages, seed), so a test can check every
sample against what it should be. Faults are planned per request: the first k attempts of a
request fail (k and the kinds chosen by a hash of it), later attempts succeed.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAULTS = ("429", "500", "stall", "malformed", "drop", "truncated", "no_choices")


def expected_answer(messages: list[dict], seed: int) -> str:
    text = messages[-1]["content"]
    return f"<think>reading {len(text)} chars</think>\nAnswer: {text[::-1]} #{seed}"


def chat_completion(req: dict, model: str = "fake-teacher") -> dict:
    """The fake's answer to a chat request, as a response body (also a batch output line's body)."""
    text = expected_answer(req["messages"], req.get("seed", 0))
    key = json.dumps([req["messages"], req.get("seed")], sort_keys=True)
    pt = sum(len(m["content"]) for m in req["messages"]) // 4 + 1
    ct = len(text) // 4 + 1
    return {"id": f"chatcmpl-{_h(key)}", "object": "chat.completion", "created": int(time.time()),
            "model": model + "-2026-01-01", "system_fingerprint": "fp_fake01",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}


def _h(s: str) -> int:
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:4], "big")


class FakeOpenAI:
    """Start with `with FakeOpenAI(...) as srv:`; `srv.base_url` is the /v1 URL."""

    def __init__(self, fault_rate: float = 0.0, faults: tuple[str, ...] = FAULTS, max_faults_per_request: int = 2,
                 latency_s: float = 0.0, stall_s: float = 2.0, max_concurrency: int | None = None,
                 api_key: str | None = None, reasoning_field: bool = False, model: str = "fake-teacher",
                 reasoning_model: bool = False):
        self.fault_rate, self.faults, self.max_faults = fault_rate, faults, max_faults_per_request
        self.latency_s, self.stall_s, self.api_key = latency_s, stall_s, api_key
        self.reasoning_field, self.model = reasoning_field, model
        self.reasoning_model = reasoning_model  # answer 400 to max_tokens / temperature / top_p, as OpenAI's o-series do
        self.bodies: list[dict] = []
        self.sem = threading.BoundedSemaphore(max_concurrency) if max_concurrency else None
        self.lock = threading.Lock()
        self.attempts: dict[str, int] = {}
        self.successes: dict[str, int] = {}
        self.faults_served: dict[str, int] = {}
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.httpd: ThreadingHTTPServer | None = None

    # -- planning ----------------------------------------------------------------------------
    def _plan(self, key: str, attempt: int) -> str | None:
        h = _h(key)
        if (h % 1000) / 1000 >= self.fault_rate:
            return None
        n_faults = 1 + (h >> 10) % self.max_faults
        if attempt >= n_faults:
            return None
        return self.faults[(h >> 4 ^ attempt * 7) % len(self.faults)]

    @property
    def total_successes(self) -> int:
        return sum(self.successes.values())

    # -- server ------------------------------------------------------------------------------
    def __enter__(self) -> "FakeOpenAI":
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep test output clean
                pass

            def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
                body = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [{"id": srv.model, "object": "model", "created": 0,
                                                                 "owned_by": "test"}]})
                else:
                    self._json(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self):
                n = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(n)
                if srv.api_key is not None and self.headers.get("Authorization") != f"Bearer {srv.api_key}":
                    return self._json(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
                if srv.sem:
                    srv.sem.acquire()
                with srv.lock:
                    srv.requests += 1
                    srv.in_flight += 1
                    srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
                try:
                    self._complete(json.loads(raw))
                finally:
                    with srv.lock:
                        srv.in_flight -= 1
                    if srv.sem:
                        srv.sem.release()

            def _complete(self, req: dict) -> None:
                with srv.lock:
                    srv.bodies.append(req)
                if srv.reasoning_model:
                    bad = [k for k in ("max_tokens", "temperature", "top_p") if k in req]
                    if bad:
                        return self._json(400, {"error": {"message": f"Unsupported parameter: '{bad[0]}' is not "
                                                                     "supported with this model.",
                                                          "type": "invalid_request_error", "param": bad[0]}})
                key = json.dumps([req["messages"], req.get("seed")], sort_keys=True)
                with srv.lock:
                    attempt = srv.attempts.get(key, 0)
                    srv.attempts[key] = attempt + 1
                fault = srv._plan(key, attempt)
                if srv.latency_s:
                    time.sleep(srv.latency_s)
                if fault:
                    with srv.lock:
                        srv.faults_served[fault] = srv.faults_served.get(fault, 0) + 1
                if fault == "429":
                    return self._json(429, {"error": {"message": "rate limited", "type": "rate_limit"}}, {"Retry-After": "0.05"})
                if fault == "500":
                    return self._json(500, {"error": {"message": "boom", "type": "server_error"}})
                if fault == "stall":
                    time.sleep(srv.stall_s)
                elif fault in ("malformed", "truncated"):
                    body = b'{"id": "x", "choices": [{"index": 0, "mess'
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body) + (500 if fault == "truncated" else 0)))
                    self.end_headers()
                    self.wfile.write(body)
                    self.close_connection = True
                    return
                elif fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                text = expected_answer(req["messages"], req.get("seed", 0))
                reasoning = None
                if srv.reasoning_field:
                    reasoning, text = text.split("</think>")[0][len("<think>"):], text.split("</think>\n")[1]
                msg = {"role": "assistant", "content": text}
                if reasoning is not None:
                    msg["reasoning_content"] = reasoning
                choice = {"index": 0, "message": msg, "finish_reason": "stop"}
                if req.get("logprobs"):
                    k = req.get("top_logprobs") or 0
                    choice["logprobs"] = {"content": [
                        {"token": ch, "logprob": -0.1, "bytes": list(ch.encode()),
                         "top_logprobs": [{"token": ch, "logprob": -0.1, "bytes": list(ch.encode())}] * k}
                        for ch in text[:8]]}
                if fault == "no_choices":
                    choice = None
                if fault == "billed_empty":  # the provider spent the tokens (on reasoning, say) and billed them
                    choice = {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": "length"}
                pt = sum(len(m["content"]) for m in req["messages"]) // 4 + 1
                body = {"id": f"chatcmpl-{_h(key)}", "object": "chat.completion", "created": int(time.time()),
                        "model": srv.model + "-2026-01-01", "system_fingerprint": "fp_fake01",
                        "choices": [choice] if choice else [],
                        "usage": {"prompt_tokens": pt, "completion_tokens": len(text) // 4 + 1,
                                  "total_tokens": pt + len(text) // 4 + 1}}
                if fault is None or fault == "stall":
                    with srv.lock:
                        srv.successes[key] = srv.successes.get(key, 0) + 1
                try:
                    self._json(200, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request, client_address):  # a client that hung up is not a server error
                pass

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def main() -> None:
    """Serve until killed: `python -m tests.fake_openai --latency 0.2 --max-concurrency 64` prints the base URL."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    args = ap.parse_args()
    with FakeOpenAI(latency_s=args.latency, max_concurrency=args.max_concurrency, fault_rate=args.fault_rate) as srv:
        print(srv.base_url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
