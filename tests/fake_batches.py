"""A local fake of OpenAI's Files and Batches endpoints (and chat completions), on 127.0.0.1, for tests and benchmarks.

FastAPI under uvicorn in a thread of the test process, so it outlives a `stillhouse generate` subprocess killed with
-9 and counts everything it was sent: uploads, batches created, and how many times each request (messages and
seed) arrived in a batch or online. A batch moves through validating -> in_progress -> completed by the clock, with
scripted faults: a slow `validating` phase, whole batches that fail validation or expire half-done, requests answered
with an error line (once: a retry succeeds), lines left out, and slow upload / create / download calls with an event
set as each starts, so a test can kill the client in the middle of one.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from email.parser import BytesParser
from email.policy import HTTP

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.fake_openai import _h, chat_completion


def request_id(body: dict) -> str:
    """What identifies a request to the fake: its messages and seed (as the model sees it)."""
    return json.dumps([body["messages"], body.get("seed")], sort_keys=True)


class FakeBatches:
    """Start with `with FakeBatches(...) as srv:`; `srv.base_url` is the /v1 URL."""

    def __init__(self, api_key: str = "sk-fake-batches-0123456789", model: str = "fake-teacher",
                 validating_s: float = 0.0, in_progress_s: float = 0.0, fail_batches: tuple[int, ...] = (),
                 expire_batches: tuple[int, ...] = (), expire_share: float = 0.5, error_rate: float = 0.0,
                 drop_rate: float = 0.0, slow: dict[str, float] | None = None):
        self.api_key, self.model = api_key, model
        self.validating_s, self.in_progress_s = validating_s, in_progress_s
        self.fail_batches, self.expire_batches, self.expire_share = set(fail_batches), set(expire_batches), expire_share
        self.error_rate, self.drop_rate = error_rate, drop_rate
        self.slow = dict(slow or {})  # "upload" / "create" / "content" -> seconds that call takes
        self.lock = threading.Lock()
        self.files: dict[str, dict] = {}
        self.batches: dict[str, dict] = {}
        self.uploads = 0
        self.creates = 0
        self.in_batches: Counter = Counter()  # request id -> times it arrived in a created batch
        self.online: Counter = Counter()  # request id -> online chat calls
        self.events = {k: threading.Event() for k in ("upload", "create", "poll", "content")}
        self.app = self._app()

    # -- the API ----------------------------------------------------------------------------------------------------
    def _app(self) -> FastAPI:
        app, srv = FastAPI(), self

        @app.middleware("http")
        async def auth(request: Request, call_next):
            if request.headers.get("authorization") != f"Bearer {srv.api_key}":
                return JSONResponse({"error": {"message": "invalid api key", "type": "invalid_request_error"}}, 401)
            return await call_next(request)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            with srv.lock:
                srv.online[request_id(body)] += 1
            return chat_completion(body, srv.model)

        @app.post("/v1/files")
        async def upload(request: Request):
            raw = await request.body()
            srv.events["upload"].set()
            await asyncio.sleep(srv.slow.get("upload", 0))
            form = BytesParser(policy=HTTP).parsebytes(
                b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + raw)
            fields = {p.get_param("name", header="content-disposition"): p for p in form.iter_parts()}
            data = fields["file"].get_payload(decode=True)
            with srv.lock:
                srv.uploads += 1
                f = srv._file(fields["file"].get_filename(), data, fields["purpose"].get_content().strip())
            return f["meta"]

        @app.get("/v1/files")
        def list_files(purpose: str | None = None):
            with srv.lock:
                data = [f["meta"] for f in srv.files.values() if purpose in (None, f["meta"]["purpose"])]
            return {"object": "list", "data": data[::-1], "has_more": False}

        @app.get("/v1/files/{fid}/content")
        def content(fid: str):
            srv.events["content"].set()
            time.sleep(srv.slow.get("content", 0))
            if fid not in srv.files:
                return JSONResponse({"error": {"message": f"no file {fid}"}}, 404)
            return Response(srv.files[fid]["data"], media_type="application/octet-stream")

        @app.post("/v1/batches")
        async def create(request: Request):
            body = await request.json()
            srv.events["create"].set()
            with srv.lock:
                if body["input_file_id"] not in srv.files:
                    return JSONResponse({"error": {"message": "no such file"}}, 400)
                srv.creates += 1
                bid = f"batch_{srv.creates:04d}"
                lines = [json.loads(x) for x in srv.files[body["input_file_id"]]["data"].splitlines() if x.strip()]
                for line in lines:
                    srv.in_batches[request_id(line["body"])] += 1
                srv.batches[bid] = {"n": srv.creates, "lines": lines, "created": time.time(), "meta": {
                    "id": bid, "object": "batch", "endpoint": body["endpoint"], "errors": None,
                    "input_file_id": body["input_file_id"], "completion_window": body["completion_window"],
                    "status": "validating", "output_file_id": None, "error_file_id": None,
                    "created_at": int(time.time()), "metadata": body.get("metadata"),
                    "request_counts": {"total": len(lines), "completed": 0, "failed": 0}}}
            # the batch exists now; a slow answer is where a killed client must not create it again
            await asyncio.sleep(srv.slow.get("create", 0))
            return srv._advance(bid)

        @app.get("/v1/batches")
        def list_batches(limit: int = 20, after: str | None = None):
            with srv.lock:
                ids = list(srv.batches)[::-1]
            return {"object": "list", "data": [srv._advance(i) for i in ids], "has_more": False}

        @app.get("/v1/batches/{bid}")
        def retrieve(bid: str):
            srv.events["poll"].set()
            if bid not in srv.batches:
                return JSONResponse({"error": {"message": f"no batch {bid}"}}, 404)
            return srv._advance(bid)

        return app

    def _file(self, name: str, data: bytes, purpose: str) -> dict:
        fid = f"file-{len(self.files) + 1:05d}"
        self.files[fid] = {"data": data, "meta": {"id": fid, "object": "file", "bytes": len(data), "filename": name,
                                                  "purpose": purpose, "created_at": int(time.time()),
                                                  "status": "processed"}}
        return self.files[fid]

    def _advance(self, bid: str) -> dict:
        """The batch as the clock has moved it; its output and error files made when it ends."""
        with self.lock:
            b = self.batches[bid]
            m = b["meta"]
            if m["status"] in ("completed", "failed", "expired"):
                return m
            age = time.time() - b["created"]
            if age < self.validating_s:
                return m
            if b["n"] in self.fail_batches:
                m["status"] = "failed"
                m["errors"] = {"object": "list", "data": [{"code": "invalid_file", "message": "scripted failure",
                                                           "line": None, "param": None}]}
                m["request_counts"]["failed"] = len(b["lines"])
                return m
            if age < self.validating_s + self.in_progress_s:
                m["status"] = "in_progress"
                return m
            out, err = [], []
            expired = b["n"] in self.expire_batches
            for j, line in enumerate(b["lines"]):
                rid = request_id(line["body"])
                h = _h(rid) % 1000 / 1000
                if expired and j >= int(len(b["lines"]) * self.expire_share):
                    err.append({"id": f"req_{bid}_{j}", "custom_id": line["custom_id"], "response": None,
                                "error": {"code": "batch_expired", "message": "not run before the window closed"}})
                elif self.in_batches[rid] == 1 and self.online[rid] == 0 and h < self.error_rate:
                    err.append({"id": f"req_{bid}_{j}", "custom_id": line["custom_id"], "error": None,
                                "response": {"status_code": 500, "request_id": f"r{j}",
                                             "body": {"error": {"message": "scripted server error",
                                                                "type": "server_error"}}}})
                elif self.in_batches[rid] == 1 and self.error_rate <= h < self.error_rate + self.drop_rate:
                    continue  # a partial result: the line is simply not there
                else:
                    out.append({"id": f"req_{bid}_{j}", "custom_id": line["custom_id"], "error": None,
                                "response": {"status_code": 200, "request_id": f"r{j}",
                                             "body": chat_completion(line["body"], self.model)}})
            m["status"] = "expired" if expired else "completed"
            m["request_counts"] = {"total": len(b["lines"]), "completed": len(out), "failed": len(err)}
            if out:
                m["output_file_id"] = self._file(f"{bid}_output.jsonl", _jsonl(out), "batch_output")["meta"]["id"]
            if err:
                m["error_file_id"] = self._file(f"{bid}_errors.jsonl", _jsonl(err), "batch_output")["meta"]["id"]
            return m

    # -- counts a test asserts on -----------------------------------------------------------------------------------
    @property
    def duplicates(self) -> int:
        """Requests that arrived in a batch more than once."""
        return sum(n - 1 for n in self.in_batches.values() if n > 1)

    # -- the server -------------------------------------------------------------------------------------------------
    def __enter__(self) -> "FakeBatches":
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="error", lifespan="off"))
        self.server.install_signal_handlers = lambda: None  # (older uvicorn) the test process keeps its own handlers
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)
