"""Batch generation through the ledger: the calls a run is missing, made as provider batches at the batch price.

Every step is written to the ledger before the next one starts, so a run killed anywhere resumes where it was and
never submits a request twice:

    prepared    the batch's name and its requests' cache keys are committed (nothing sent yet)
    uploaded    its input file is at the runner (a re-run looks the file up by name before uploading again)
    submitting  about to create the batch (a re-run first looks for a batch carrying our name in its metadata:
                the create call may have reached the provider before the kill)
    submitted   the provider's batch id is recorded; the runner is polled until the batch ends
    finished    it ended (completed, failed, expired or cancelled); its output and error files are read and each
                result recorded as an ordinary ledger row (same key as an online call, `mode` 'batch')
    collected   every result is in the ledger; nothing more to do

Requests a batch did not answer (errors, expiry, a failed batch) are retried by the recipe's choice: online, in a
new batch, or not at all. Runners are registered by name (`stillhouse.batch_runners`): OpenAI's Files + Batches API
(any server that implements it) and a local `vllm run-batch` are built in.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator, Protocol

from stillhouse.calls.costs import Budget, Price, estimate_prompt_tokens
from stillhouse.calls.keys import derive_seed
from stillhouse.calls.ledger import Ledger
from stillhouse.errors import StillhouseError
from stillhouse.registry import Registry
from stillhouse.teachers import Request, load_backend, parse_spec
from stillhouse.ui import progress_bar

BATCH_RUNNERS: Registry = Registry("stillhouse.batch_runners", "batch runner")

# The provider's words for a batch that has ended.
TERMINAL = ("completed", "failed", "expired", "cancelled")
CHAT_URL = "/v1/chat/completions"


class BatchRunner(Protocol):
    """What a batch runner does. Each step must be safe to repeat after a kill: `find_file` and `find_batch` find
    what an interrupted `upload` or `create` left at the provider, by the batch's name."""

    name: str
    endpoint: str | None
    max_requests: int  # per batch file
    max_bytes: int

    def find_file(self, name: str) -> str | None: ...

    def upload(self, name: str, data: bytes) -> str: ...

    def find_batch(self, name: str) -> dict | None: ...

    def create(self, name: str, file_id: str) -> dict: ...

    def poll(self, remote_id: str) -> dict: ...

    def results(self, info: dict) -> Iterator[dict]: ...

    def close(self) -> None: ...


# -- OpenAI's Files + Batches API ---------------------------------------------------------------------------------
class OpenAIBatches:
    """OpenAI's Batch API (https://platform.openai.com/docs/guides/batch) through the official client: a JSONL file
    uploaded with purpose `batch`, a batch created over it, polled, its output and error files read. Any server
    that implements those endpoints works (the teacher's `base_url`)."""

    name = "openai"
    max_requests = 50_000
    max_bytes = 200 * 1000 * 1000

    def __init__(self, spec: str, options: dict, settings):
        from openai import OpenAI

        backend_name, self.model = parse_spec(spec)
        if backend_name != "openai":
            raise StillhouseError(f"generation.batch.runner: the openai runner sends batches to an OpenAI-compatible "
                                  f"API, so it needs an openai: teacher, not {spec!r} (a local model: runner: vllm)")
        backend = load_backend(spec, options)  # its options validated, its key read from the environment, never stored
        self.backend = backend
        self.endpoint = backend.endpoint
        self.window = settings.completion_window
        self.client = OpenAI(base_url=backend.base_urls[0], api_key=backend.api_key, max_retries=3,
                             timeout=backend.timeout)
        # creating a batch is the one call that must never be repeated blindly: its retries are ours (find, then create)
        self.creator = self.client.with_options(max_retries=0)

    def find_file(self, name: str) -> str | None:
        for f in self.client.files.list(purpose="batch"):
            if f.filename == f"{name}.jsonl":
                return f.id
        return None

    def upload(self, name: str, data: bytes) -> str:
        return self.client.files.create(file=(f"{name}.jsonl", data, "application/jsonl"), purpose="batch").id

    def find_batch(self, name: str) -> dict | None:
        for b in self.client.batches.list(limit=100):
            if (b.metadata or {}).get("stillhouse_batch") == name:
                return _info(b)
        return None

    def create(self, name: str, file_id: str) -> dict:
        import openai

        for attempt in range(5):
            try:
                return _info(self.creator.batches.create(input_file_id=file_id, endpoint=CHAT_URL,
                                                         completion_window=self.window,
                                                         metadata={"stillhouse_batch": name}))
            except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError,
                    openai.RateLimitError):
                found = self.find_batch(name)  # the request may have arrived though its answer did not
                if found is not None:
                    return found
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
        return _info(self.creator.batches.create(input_file_id=file_id, endpoint=CHAT_URL,
                                                 completion_window=self.window, metadata={"stillhouse_batch": name}))

    def poll(self, remote_id: str) -> dict:
        return _info(self.client.batches.retrieve(remote_id))

    def results(self, info: dict) -> Iterator[dict]:
        for fid in (info.get("output_file_id"), info.get("error_file_id")):
            if fid:
                yield from _lines(self.client.files.content(fid).content, fid)

    def close(self) -> None:
        self.client.close()


def _info(b) -> dict:
    counts = getattr(b, "request_counts", None)
    errors = getattr(getattr(b, "errors", None), "data", None) or []
    return {"remote_id": b.id, "status": b.status, "output_file_id": b.output_file_id,
            "error_file_id": b.error_file_id, "input_file_id": b.input_file_id,
            "counts": counts.model_dump() if counts is not None else None,
            "error": "; ".join(f"{e.code}: {e.message}" for e in errors)[:300] or None}


def _lines(data: bytes, where: str) -> Iterator[dict]:
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a half-written last line of an interrupted writer: its request is retried
            continue
        if isinstance(row, dict) and row.get("custom_id") is not None:
            yield row


# -- a local `vllm run-batch` ---------------------------------------------------------------------------------------
class VLLMRunBatch:
    """`vllm run-batch -i IN -o OUT --model M` on this machine's GPUs: the same JSONL line format as OpenAI's. The
    batch's files live in the run directory's `batches/`; the process is started detached (it survives this one),
    its pid recorded, and a re-run polls it or reads what it wrote."""

    name = "vllm"
    max_requests = 1_000_000
    max_bytes = 10 ** 12

    def __init__(self, spec: str, options: dict, settings, folder: Path):
        backend_name, model = parse_spec(spec)
        if backend_name not in ("hf", "openai"):
            raise StillhouseError(f"generation.batch.runner: vllm runs a local model directory or hub name; the "
                                  f"teacher {spec!r} is neither hf: nor openai:")
        from stillhouse.models import resolve_model

        self.model = str(resolve_model(model)) if backend_name == "hf" else model
        self.command = list(settings.command)
        self.args = list(settings.args)
        self.folder = folder
        self.endpoint = "local"

    def _paths(self, name: str) -> tuple[Path, Path, Path]:
        return (self.folder / f"{name}.input.jsonl", self.folder / f"{name}.output.jsonl",
                self.folder / f"{name}.pid")

    def find_file(self, name: str) -> str | None:
        inp = self._paths(name)[0]
        return str(inp) if inp.is_file() else None

    def upload(self, name: str, data: bytes) -> str:
        inp = self._paths(name)[0]
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = inp.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(inp)
        return str(inp)

    def find_batch(self, name: str) -> dict | None:
        pid = self._paths(name)[2]
        return {"remote_id": name, "status": "in_progress"} if pid.is_file() else None

    def create(self, name: str, file_id: str) -> dict:
        inp, out, pid = self._paths(name)
        cmd = [*self.command, "run-batch", "-i", str(inp), "-o", str(out), "--model", self.model, *self.args]
        log = open(self.folder / f"{name}.log", "ab")
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        except OSError as e:
            raise StillhouseError(f"generation.batch.command: cannot run {cmd[0]!r} ({e.strerror}); install vLLM or "
                                  "name its executable there") from None
        finally:
            log.close()
        _PROCS[name] = proc
        pid.write_text(str(proc.pid))
        return {"remote_id": name, "status": "in_progress"}

    def poll(self, remote_id: str) -> dict:
        inp, out, pidf = self._paths(remote_id)
        proc = _PROCS.get(remote_id)
        if proc is not None:
            rc = proc.poll()
            if rc is None:
                return {"remote_id": remote_id, "status": "in_progress"}
            _PROCS.pop(remote_id)
            status = "completed" if rc == 0 else "failed"
            return {"remote_id": remote_id, "status": status, "output_file_id": str(out) if out.is_file() else None,
                    "error": None if rc == 0 else f"exit status {rc} (see {self.folder / (remote_id + '.log')})"}
        # started by an earlier, killed run: alive, or gone (then what it wrote is what there is)
        try:
            os.kill(int(pidf.read_text()), 0)
            alive = not _zombie(int(pidf.read_text()))
        except (OSError, ValueError):
            alive = False
        if alive:
            return {"remote_id": remote_id, "status": "in_progress"}
        return {"remote_id": remote_id, "status": "completed" if out.is_file() else "failed",
                "output_file_id": str(out) if out.is_file() else None,
                "error": None if out.is_file() else "the vllm process ended without writing its output"}

    def results(self, info: dict) -> Iterator[dict]:
        if info.get("output_file_id"):
            yield from _lines(Path(info["output_file_id"]).read_bytes(), info["output_file_id"])

    def close(self) -> None:
        for name, proc in list(_PROCS.items()):  # a run stopped early (an error) leaves no process behind
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait()
            _PROCS.pop(name, None)


_PROCS: dict[str, subprocess.Popen] = {}


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return False


BATCH_RUNNERS.register("openai", OpenAIBatches)
BATCH_RUNNERS.register("vllm", VLLMRunBatch)


def make_runner(spec: str, options: dict, settings, folder: Path):
    factory = BATCH_RUNNERS.get(settings.runner)
    if factory is VLLMRunBatch:
        return factory(spec, options, settings, folder)
    return factory(spec, options, settings)


# -- the ledgered batch call --------------------------------------------------------------------------------------
def request_body(model_ref, backend, req: Request) -> dict:
    """The chat request a batch line carries: the teacher backend's own body where it builds one (the openai backend:
    reasoning models' parameters, logprobs, extra_body), else the plain OpenAI form."""
    if backend is not None and hasattr(backend, "request_body"):
        return backend.request_body(req)
    return {"model": model_ref, "messages": list(req.messages), "max_tokens": req.max_tokens,
            "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed}


def call_batched(model, reqs: list[Request], keys: list[str], missing: list[int], ledger: Ledger, stage: str,
                 label: str, price: Price, budget: Budget, n_cached: int, settings) -> tuple[int, list[str]]:
    """Make the `missing` calls through batches (see the module's docstring); returns (answers recorded, failures)."""
    from stillhouse.calls.call import _call_missing, ledger_request

    folder = ledger.path.parent / "batches"
    runner = make_runner(model.spec, model.options, settings, folder)
    backend = getattr(runner, "backend", None)
    bprice = Price(price.input_per_million * settings.price_factor, price.output_per_million * settings.price_factor)
    counter = getattr(backend, "count_prompt_tokens", None)
    wanted = {keys[i]: i for i in missing}
    backend_name = parse_spec(model.spec)[0]
    made, t0, refused = 0, time.time(), set()
    try:
        with progress_bar(f"{label} (batch)", len(reqs)) as advance:
            advance(n_cached, cached=n_cached)
            open_ = ledger.open_batches(wanted)  # batches an earlier, interrupted run left: polled, never resubmitted
            held = {r["key"] for b in open_ for r in ledger.batch_requests(b["id"])}
            rnd = max((b["round"] for b in open_), default=0)
            todo = [i for i in missing if keys[i] not in held]
            while True:
                if todo:
                    new, stopped = _prepare(todo, reqs, keys, ledger, stage, runner, backend, model, budget, bprice,
                                            counter, rnd, ledger_request, settings)
                    open_ += new
                    refused |= set(stopped)
                made += _drive(open_, runner, ledger, stage, bprice, settings, advance, t0, backend_name)
                # the batches' real costs are in the ledger now: what a retry may spend starts from them
                budget.reserved, budget.spent = 0.0, ledger.spent()
                done = ledger.get_many(wanted)
                retry = [i for i in missing if keys[i] not in done and i not in refused]
                if not retry or settings.retry == "none":
                    break
                if settings.retry == "online":
                    m, _ = _call_missing(model, reqs, keys, retry, ledger, stage, f"{label} (online retry)", price,
                                         budget, len(reqs) - len(retry))
                    made += m
                    break
                rnd += 1
                if rnd >= settings.max_rounds:
                    break
                todo, open_ = retry, []
    finally:
        runner.close()
    done = ledger.get_many(wanted)
    fails = {f["key"]: f["error"] for f in ledger.failures() if f["key"] in wanted and f["key"] not in done}
    return made, [fails.get(keys[i]) or "no result" for i in missing if keys[i] not in done and i not in refused]


def _prepare(todo, reqs, keys, ledger: Ledger, stage, runner, backend, model, budget: Budget, bprice: Price, counter,
             rnd: int, ledger_request, settings) -> tuple[list[dict], list[int]]:
    """Commit new batches over the requests `todo` (split at the runner's limits), nothing sent yet; returns them and
    the requests the budget cap left out."""
    model_name = model.model
    lines, refused = [], []
    for i in todo:
        if not budget.admit(bprice.cost(estimate_prompt_tokens(reqs[i].messages, counter), reqs[i].max_tokens)):
            refused.append(i)
            continue
        req = dataclasses.replace(reqs[i], seed=derive_seed(keys[i]))
        body = request_body(getattr(runner, "model", model_name), backend, req)
        lines.append((i, body))
    batches, chunk, size = [], [], 0
    limit_n = min(settings.max_requests or runner.max_requests, runner.max_requests)
    limit_b = min(settings.max_bytes or runner.max_bytes, runner.max_bytes)

    def flush() -> None:
        if not chunk:
            return
        name = f"stillhouse-{uuid.uuid4().hex[:16]}"
        rows = [(f"r{j}", keys[i], {"custom_id": f"r{j}", "method": "POST", "url": CHAT_URL, "body": body},
                 ledger_request(reqs[i], keys[i])) for j, (i, body) in enumerate(chunk)]
        bid = ledger.create_batch(name, runner=runner.name, stage=stage, model=model_name, endpoint=runner.endpoint,
                                  round=rnd, rows=rows)
        batches.append(ledger.batch(bid))
        chunk.clear()

    for i, body in lines:
        n = len(json.dumps({"custom_id": "r0000000", "method": "POST", "url": CHAT_URL, "body": body})) + 1
        if chunk and (len(chunk) >= limit_n or size + n > limit_b):
            flush()
            size = 0
        chunk.append((i, body))
        size += n
    flush()
    return batches, refused


def _file_bytes(ledger: Ledger, bid: int) -> bytes:
    return b"".join(json.dumps(r["body"], sort_keys=True).encode() + b"\n" for r in ledger.batch_requests(bid))


def _drive(batches: list[dict], runner, ledger: Ledger, stage: str, bprice: Price, settings, advance, t0: float,
           backend_name: str) -> int:
    """Take every batch to `collected`, one step at a time, each step committed before the next; returns how many
    answers were recorded."""
    made = 0
    while True:
        states = [ledger.batch(b["id"]) for b in batches]
        pending = [b for b in states if b["status"] != "collected"]
        _status(advance, states, made, t0)
        if not pending:
            return made
        waiting = True
        for b in pending:
            bid, name = b["id"], b["name"]
            try:
                if b["status"] == "prepared":
                    fid = runner.find_file(name) or runner.upload(name, _file_bytes(ledger, bid))
                    ledger.update_batch(bid, status="uploaded", input_file_id=fid)
                    b = ledger.batch(bid)
                if b["status"] == "uploaded":
                    ledger.update_batch(bid, status="submitting")
                    info = runner.create(name, b["input_file_id"])
                    ledger.update_batch(bid, status="submitted", remote_id=info["remote_id"],
                                        remote_status=info["status"])
                    waiting = False
                    continue
                if b["status"] == "submitting":  # killed around the create call: it may have reached the provider
                    info = runner.find_batch(name) or runner.create(name, b["input_file_id"])
                    ledger.update_batch(bid, status="submitted", remote_id=info["remote_id"],
                                        remote_status=info["status"])
                    continue
                if b["status"] == "submitted":
                    info = runner.poll(b["remote_id"])
                    if info["status"] != b["remote_status"]:
                        ledger.update_batch(bid, remote_status=info["status"])
                    if info["status"] not in TERMINAL:
                        continue
                    ledger.update_batch(bid, status="finished", output_file_id=info.get("output_file_id"),
                                        error_file_id=info.get("error_file_id"), error=info.get("error"))
                    b = ledger.batch(bid)
                if b["status"] == "finished":
                    n = _collect(b, runner, ledger, stage, bprice, backend_name)
                    made += n
                    advance(n)
                    ledger.update_batch(bid, status="collected")
                    waiting = False
            except StillhouseError:
                raise
            except Exception as e:  # the runner's API refused or failed: the ledger holds everything; a re-run resumes
                raise StillhouseError(f"{stage}: batch {name}: {type(e).__name__}: {_safe(e)}; every batch and answer "
                                      f"so far is recorded in {ledger.path}; re-run to continue (nothing is "
                                      "submitted twice)") from None
        if waiting:
            time.sleep(settings.poll_seconds)


def _collect(b: dict, runner, ledger: Ledger, stage: str, bprice: Price, backend_name: str) -> int:
    """Record a finished batch's results: each answer an ok row (mode 'batch'), each error a failed row with what the
    provider billed, each request with no line at all a failed row saying why (expired, or the batch failed)."""
    from stillhouse.teachers.openai_backend import OpenAIBackend, Unusable

    by_id = {r["custom_id"]: r for r in ledger.batch_requests(b["id"])}
    info = {"output_file_id": b["output_file_id"], "error_file_id": b["error_file_id"]}
    seen, made = set(), 0
    common = dict(stage=stage, backend=backend_name, endpoint=b["endpoint"], model=b["model"])
    for line in runner.results(info) if (info["output_file_id"] or info["error_file_id"]) else ():
        r = by_id.get(str(line["custom_id"]))
        if r is None or r["custom_id"] in seen:
            continue
        seen.add(r["custom_id"])
        resp = line.get("response") or {}
        body = resp.get("body")
        status = resp.get("status_code")
        usage = (body or {}).get("usage") if isinstance(body, dict) else None
        billed = (int((usage or {}).get("prompt_tokens") or 0), int((usage or {}).get("completion_tokens") or 0))
        error = None
        if status == 200 and isinstance(body, dict):
            try:
                c = OpenAIBackend._parse(body)
            except Unusable as e:
                error = f"malformed result ({e})"
            else:
                if ledger.record(r["key"], request=r["request"], completion=c, latency_s=None, attempts=1,
                                 cost_usd=bprice.cost(c.prompt_tokens, c.completion_tokens), mode="batch",
                                 batch=b["name"], **common):
                    made += 1
                continue
        if error is None:
            err = line.get("error") or ((body or {}).get("error") if isinstance(body, dict) else None) or {}
            error = f"HTTP {status}: " if status else ""
            error += f"{err.get('code') or ''} {err.get('message') or ''}".strip()[:200] or "no answer"
        ledger.record_failure(r["key"], request=r["request"], error=f"batch {b['name']}: {error}", attempts=1,
                              cost_usd=bprice.cost(*billed), billed=billed, mode="batch", batch=b["name"], **common)
    why = {"expired": "the batch expired before this request was run", "cancelled": "the batch was cancelled",
           "failed": f"the batch failed ({b['error'] or 'no reason given'})"}.get(b["remote_status"],
                                                                                   "the batch gave no result for it")
    done = ledger.get_many([r["key"] for r in by_id.values()])
    for cid, r in by_id.items():
        if cid not in seen and r["key"] not in done:
            ledger.record_failure(r["key"], request=r["request"], error=f"batch {b['name']}: {why}", attempts=1,
                                  mode="batch", batch=b["name"], **common)
    return made


def _status(advance, states: list[dict], made: int, t0: float) -> None:
    submitted = sum(b["status"] in ("prepared", "uploaded", "submitting") for b in states)
    running = sum(b["status"] in ("submitted", "finished") for b in states)
    done = sum(b["status"] == "collected" for b in states)
    reqs = sum(b["requests"] for b in states if b["status"] != "collected")
    advance(0, batches=f"{submitted} preparing, {running} in progress ({reqs:,} requests), {done} done")


def _safe(e: Exception) -> str:
    body = getattr(e, "body", None)
    msg = body.get("message") if isinstance(body, dict) else None
    return (msg or str(e))[:200]


def worst_case(reqs: list[Request], price: Price, factor: float, counter=None) -> tuple[float, float]:
    """The online and the batch worst-case cost of `reqs` (every answer at max_tokens)."""
    online = sum(price.cost(estimate_prompt_tokens(r.messages, counter), r.max_tokens) for r in reqs)
    return online, online * factor

