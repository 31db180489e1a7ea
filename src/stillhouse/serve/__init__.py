"""Serve any local causal LM over an OpenAI-compatible API (FastAPI + uvicorn), with continuous batching."""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from typing import Iterator

from stillhouse.errors import StillhouseError

# Requests a server lets wait for a place in the batch before it answers 429: a client flood must not grow memory
# and latency without limit.
MAX_QUEUE = 1024


def build(model_dir: str, model_name: str | None = None, api_key_env: str | None = None, max_queue: int | None = MAX_QUEUE,
          max_body_bytes: int = 1 << 20, **engine_kw):
    """The engine and the FastAPI app for `model_dir`; past `max_queue` waiting requests, clients get 429."""
    from pathlib import Path

    from stillhouse.serve.app import create_app
    from stillhouse.serve.engine import Engine

    if engine_kw.get("max_batch", 1) < 1:
        raise StillhouseError(f"--max-batch must be at least 1, not {engine_kw['max_batch']}")
    if engine_kw.get("window_ms", 0) < 0:
        raise StillhouseError(f"--window-ms must not be negative, not {engine_kw['window_ms']}")
    if max_queue is not None and max_queue < 1:
        raise StillhouseError(f"--max-queue must be at least 1, not {max_queue}")
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise StillhouseError(f"--api-key-env: environment variable {api_key_env} is not set")
    engine = Engine(model_dir, max_queue=max_queue, **engine_kw)
    name = model_name or Path(model_dir.split(":", 1)[-1]).name
    return engine, create_app(engine, name, api_key=key, max_body_bytes=max_body_bytes)


# How long an idle keep-alive connection stays open. uvicorn's default, 5 s, is also httpx's (and so the openai
# client's) idle expiry: a client that sends its next request on a connection just as the server closes it gets a
# connection reset instead of an answer (seen as httpx.ReadError under 512 concurrent clients on a loaded machine).
# A server that waits longer than its clients do never closes a connection they are about to reuse.
KEEP_ALIVE_S = 30


# How long requests accepted before SIGTERM/SIGINT may take to finish, by default.
DRAIN_TIMEOUT_S = 60.0
# Past the drain limit, the time uvicorn gives the failed requests to send their 503s before it cancels what is left.
_ANSWER_MARGIN_S = 10.0


def _server(app, engine, drain_timeout: float, **config):
    """A uvicorn server whose stop drains the engine first.

    uvicorn alone waits a fixed time for requests in flight and then cancels them: each client got a plain-text 500
    and the log a traceback, even for requests the server had accepted. Here the first SIGTERM/SIGINT stops new
    requests (503 "the server is stopping") and gives those accepted, running or waiting, `drain_timeout` seconds to
    finish; those still unfinished then fail with the same OpenAI-shaped 503, which uvicorn has time to send.
    """
    import uvicorn

    class _Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not self.should_exit:
                engine.drain(drain_timeout)
            super().handle_exit(sig, frame)

    return _Draining(uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
                                    timeout_graceful_shutdown=drain_timeout + _ANSWER_MARGIN_S, **config))


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8000, drain_timeout: float = DRAIN_TIMEOUT_S,
          on_ready=None, **kw) -> None:
    """Serve until SIGINT/SIGTERM, then let accepted requests finish for up to `drain_timeout` seconds (those left
    get an OpenAI-shaped 503 saying the server is stopping). `on_ready()` is called once the model has loaded."""
    if drain_timeout < 0:
        raise StillhouseError(f"--drain-timeout must not be negative, not {drain_timeout}")
    engine, app = build(model_dir, **kw)
    try:
        if on_ready is not None:
            on_ready()
        _server(app, engine, drain_timeout, host=host, port=port).run()
    finally:
        engine.close()


@contextmanager
def running(model_dir: str, **kw) -> Iterator[str]:
    """Serve in a background thread on a free 127.0.0.1 port; yields the /v1 base URL; always stops it."""
    import uvicorn

    engine, app = build(model_dir, **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=KEEP_ALIVE_S))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise StillhouseError("the server failed to start")
            threading.Event().wait(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        engine.close()


@contextmanager
def subprocess_server(model_dir: str, *args: str, startup_timeout: float = 180) -> Iterator[str]:
    """`stillhouse serve` in its own process on a free 127.0.0.1 port, as a provider's server would be.

    Yields the /v1 base URL once /health answers; on exit (normal, error or Ctrl-C) sends
    SIGTERM, waits for it to drain, and kills it if it does not stop.
    """
    import subprocess
    import sys
    import time

    import httpx

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    # the server's stderr goes to a file, not a pipe: a pipe nobody reads fills (64 KB of warnings over a long run)
    # and then blocks the server mid-request
    log = tempfile.TemporaryFile(mode="w+", encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "stillhouse.cli", "serve", model_dir, "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    # SIGTERM to this process (a scheduler's stop, `kill`) unwinds through the finally below, as Ctrl-C does, so the
    # server is stopped rather than left running on its port
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    if previous is not None:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                err = log.read().strip().splitlines()
                raise StillhouseError(f"the server for {model_dir} exited at start-up: {err[-1] if err else proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise StillhouseError(f"the server for {model_dir} did not start within {startup_timeout:.0f} s")
            time.sleep(0.2)
        yield url + "/v1"
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)
