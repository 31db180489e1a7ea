"""The ledger: one SQLite row per teacher or judge call.

It is the cache (a call whose key is already here is never made again), the resume log (a
call is committed the moment it completes, so after `kill -9` a re-run makes only the
missing calls), and the account book (tokens and cost per model and stage). SQLite in WAL
mode: each completed call is one small transaction, and a reader never blocks the writer.
The schema changes only by appending to MIGRATIONS. API keys are never written here.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from stillhouse.teachers import Completion


def _m001_calls(db: sqlite3.Connection) -> None:
    db.execute("""
        CREATE TABLE calls (
            id INTEGER PRIMARY KEY,
            key TEXT NOT NULL UNIQUE,
            stage TEXT NOT NULL,
            backend TEXT NOT NULL,
            endpoint TEXT,
            model TEXT NOT NULL,
            request TEXT NOT NULL,
            response TEXT NOT NULL,
            reasoning TEXT,
            logprobs TEXT,
            finish_reason TEXT,
            reported_model TEXT,
            system_fingerprint TEXT,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            latency_s REAL,
            cost_usd REAL NOT NULL DEFAULT 0,
            attempts INTEGER NOT NULL DEFAULT 1,
            status TEXT NOT NULL DEFAULT 'ok',
            created_at REAL NOT NULL
        )""")
    db.execute("CREATE INDEX calls_stage_model ON calls(stage, model)")


def _m002_sessions(db: sqlite3.Connection) -> None:
    # One row per stage invocation: how many calls it needed, found cached, made, and failed.
    db.execute("""
        CREATE TABLE sessions (
            id INTEGER PRIMARY KEY,
            stage TEXT NOT NULL,
            model TEXT NOT NULL,
            requested INTEGER NOT NULL,
            cache_hits INTEGER NOT NULL,
            calls_made INTEGER NOT NULL DEFAULT 0,
            failed INTEGER NOT NULL DEFAULT 0,
            stopped_by_budget INTEGER NOT NULL DEFAULT 0,
            started_at REAL NOT NULL,
            finished_at REAL
        )""")


def _m003_failures(db: sqlite3.Connection) -> None:
    # A call that failed for good is a row too (status 'failed', its error and attempts), never a cache hit; a
    # later success replaces it.
    db.execute("ALTER TABLE calls ADD COLUMN error TEXT")
    db.execute("CREATE INDEX calls_status ON calls(status)")


def _m004_batches(db: sqlite3.Connection) -> None:
    # Batch generation. A batch and its requests' keys are committed before its file is uploaded, so a run killed at
    # any point finds them and polls the same batch instead of submitting again. `name` is ours (sent as the batch's
    # metadata, so a batch created just before a kill is found at the provider); `remote_id` the provider's.
    db.execute("""
        CREATE TABLE batches (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            runner TEXT NOT NULL,
            stage TEXT NOT NULL,
            model TEXT NOT NULL,
            endpoint TEXT,
            round INTEGER NOT NULL DEFAULT 0,
            requests INTEGER NOT NULL,
            status TEXT NOT NULL,
            remote_id TEXT,
            remote_status TEXT,
            input_file_id TEXT,
            output_file_id TEXT,
            error_file_id TEXT,
            error TEXT,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""")
    db.execute("""
        CREATE TABLE batch_requests (
            batch_id INTEGER NOT NULL REFERENCES batches(id),
            custom_id TEXT NOT NULL,
            key TEXT NOT NULL,
            body TEXT NOT NULL,
            request TEXT NOT NULL,
            PRIMARY KEY (batch_id, custom_id)
        )""")
    db.execute("CREATE INDEX batch_requests_key ON batch_requests(key)")
    # which way a call was made: 'online' (one request) or 'batch' (and which batch)
    db.execute("ALTER TABLE calls ADD COLUMN mode TEXT NOT NULL DEFAULT 'online'")
    db.execute("ALTER TABLE calls ADD COLUMN batch TEXT")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_m001_calls, _m002_sessions, _m003_failures,
                                                          _m004_batches]

# A batch in one of these has nothing more to give: its results are in the calls table.
BATCH_DONE = ("collected",)


@dataclass
class CachedCall:
    key: str
    completion: Completion
    cost_usd: float
    created_at: float
    mode: str = "online"
    batch: str | None = None


class Ledger:
    """The SQLite call ledger at `path` (created and migrated on open)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a process kill
        self._migrate()

    def _migrate(self) -> None:
        self.db.execute("CREATE TABLE IF NOT EXISTS migrations (id INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL)")
        done = {r[0] for r in self.db.execute("SELECT id FROM migrations")}
        for i, m in enumerate(MIGRATIONS, 1):
            if i in done:
                continue
            self.db.execute("BEGIN IMMEDIATE")
            try:
                m(self.db)
                self.db.execute("INSERT INTO migrations VALUES (?, ?, ?)", (i, m.__name__.lstrip("_"), time.time()))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self.db.close()

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedCall]:
        """The recorded calls among `keys`."""
        keys = list(keys)
        out: dict[str, CachedCall] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            q = ("SELECT key, response, reasoning, logprobs, finish_reason, reported_model, system_fingerprint, "
                 "prompt_tokens, completion_tokens, cost_usd, created_at, mode, batch FROM calls WHERE status = 'ok' "
                 "AND key IN "
                 f"({','.join('?' * len(chunk))})")
            for row in self.db.execute(q, chunk):
                c = Completion(text=row[1], reasoning=row[2], prompt_tokens=row[7], completion_tokens=row[8],
                               finish_reason=row[4], model=row[5], system_fingerprint=row[6],
                               extra={"logprobs": json.loads(row[3])} if row[3] else {})
                out[row[0]] = CachedCall(row[0], c, row[9], row[10], row[11], row[12])
        return out

    def record(self, key: str, *, stage: str, backend: str, endpoint: str | None, model: str, request: dict,
               completion: Completion, latency_s: float | None, cost_usd: float, attempts: int = 1,
               mode: str = "online", batch: str | None = None) -> bool:
        """Commit one completed call; returns False (and changes nothing) if its key is already recorded as ok.

        A row left by an earlier failure of the same call is replaced (what the failures were billed stays added)."""
        cur = self.db.execute(
            "INSERT INTO calls (key, stage, backend, endpoint, model, request, response, reasoning, logprobs, "
            "finish_reason, reported_model, system_fingerprint, prompt_tokens, completion_tokens, latency_s, cost_usd, "
            "attempts, status, error, created_at, mode, batch) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'ok',NULL,?,?,?) "
            "ON CONFLICT(key) DO UPDATE SET stage=excluded.stage, backend=excluded.backend, endpoint=excluded.endpoint, "
            "model=excluded.model, request=excluded.request, response=excluded.response, reasoning=excluded.reasoning, "
            "logprobs=excluded.logprobs, finish_reason=excluded.finish_reason, reported_model=excluded.reported_model, "
            "system_fingerprint=excluded.system_fingerprint, prompt_tokens=excluded.prompt_tokens, "
            "completion_tokens=excluded.completion_tokens, latency_s=excluded.latency_s, "
            "cost_usd=calls.cost_usd + excluded.cost_usd, attempts=calls.attempts + excluded.attempts, status='ok', "
            "error=NULL, created_at=excluded.created_at, mode=excluded.mode, batch=excluded.batch "
            "WHERE calls.status != 'ok'",
            (key, stage, backend, endpoint, model, json.dumps(request, sort_keys=True), completion.text,
             completion.reasoning, json.dumps(completion.extra["logprobs"]) if completion.extra.get("logprobs") else None,
             completion.finish_reason, completion.model, completion.system_fingerprint, completion.prompt_tokens,
             completion.completion_tokens, latency_s, cost_usd, attempts, time.time(), mode, batch))
        return cur.rowcount == 1

    def record_failure(self, key: str, *, stage: str, backend: str, endpoint: str | None, model: str, request: dict,
                       error: str, attempts: int, cost_usd: float = 0.0, billed: tuple[int, int] = (0, 0),
                       mode: str = "online", batch: str | None = None) -> None:
        """Commit a call that failed for good: status 'failed', why, how many attempts, and what the provider billed
        for them where it said so (each added to earlier failures')."""
        self.db.execute(
            "INSERT INTO calls (key, stage, backend, endpoint, model, request, response, prompt_tokens, "
            "completion_tokens, cost_usd, attempts, status, error, created_at, mode, batch) "
            "VALUES (?,?,?,?,?,?,'',?,?,?,?,'failed',?,?,?,?) "
            "ON CONFLICT(key) DO UPDATE SET attempts=calls.attempts + excluded.attempts, error=excluded.error, "
            "prompt_tokens=calls.prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens=calls.completion_tokens + excluded.completion_tokens, "
            "cost_usd=calls.cost_usd + excluded.cost_usd, created_at=excluded.created_at, mode=excluded.mode, "
            "batch=excluded.batch WHERE calls.status != 'ok'",
            (key, stage, backend, endpoint, model, json.dumps(request, sort_keys=True), int(billed[0]), int(billed[1]),
             cost_usd, attempts, error, time.time(), mode, batch))

    def failures(self) -> list[dict]:
        """Calls that failed for good and have not succeeded since: key, stage, model, error, attempts."""
        return [dict(zip(("key", "stage", "model", "error", "attempts"), r)) for r in self.db.execute(
            "SELECT key, stage, model, error, attempts FROM calls WHERE status = 'failed' ORDER BY id")]

    def start_session(self, stage: str, model: str, requested: int, cache_hits: int) -> int:
        cur = self.db.execute("INSERT INTO sessions (stage, model, requested, cache_hits, started_at) VALUES (?,?,?,?,?)",
                              (stage, model, requested, cache_hits, time.time()))
        return cur.lastrowid

    def end_session(self, sid: int, calls_made: int, failed: int, stopped_by_budget: bool) -> None:
        self.db.execute("UPDATE sessions SET calls_made=?, failed=?, stopped_by_budget=?, finished_at=? WHERE id=?",
                        (calls_made, failed, int(stopped_by_budget), time.time(), sid))

    def spent(self, stage: str | None = None) -> float:
        q, args = "SELECT COALESCE(SUM(cost_usd), 0) FROM calls", ()
        if stage:
            q, args = q + " WHERE stage = ?", (stage,)
        return float(self.db.execute(q, args).fetchone()[0])

    def stats(self) -> dict:
        """Calls, failures, cache hits, tokens and cost, per stage, model and mode (online or batch); the batches."""
        per = [dict(zip(("stage", "model", "mode", "calls", "failed", "prompt_tokens", "completion_tokens", "cost_usd",
                         "mean_latency_s"), r))
               for r in self.db.execute(
                   "SELECT stage, model, mode, SUM(status = 'ok'), SUM(status = 'failed'), SUM(prompt_tokens), "
                   "SUM(completion_tokens), SUM(cost_usd), AVG(CASE WHEN status = 'ok' THEN latency_s END) "
                   "FROM calls GROUP BY stage, model, mode ORDER BY stage, model, mode")]
        sess = self.db.execute("SELECT COUNT(*), COALESCE(SUM(requested),0), COALESCE(SUM(cache_hits),0), "
                               "COALESCE(SUM(calls_made),0), COALESCE(SUM(failed),0) FROM sessions").fetchone()
        return {"by_stage_model": per, "calls": sum(p["calls"] for p in per), "failed": sum(p["failed"] for p in per),
                "cost_usd": sum(p["cost_usd"] or 0 for p in per),
                "sessions": dict(zip(("runs", "requested", "cache_hits", "calls_made", "failed"), sess)),
                "batches": self.batches()}

    # -- batches ---------------------------------------------------------------------------------------------------
    def create_batch(self, name: str, *, runner: str, stage: str, model: str, endpoint: str | None, round: int,
                     rows: list[tuple[str, str, dict, dict]]) -> int:
        """Commit a batch (status 'prepared') and its requests `(custom_id, key, body, request)` in one transaction,
        before anything is sent anywhere; returns its id."""
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            bid = self.db.execute(
                "INSERT INTO batches (name, runner, stage, model, endpoint, round, requests, status, created_at, "
                "updated_at) VALUES (?,?,?,?,?,?,?,'prepared',?,?)",
                (name, runner, stage, model, endpoint, round, len(rows), now, now)).lastrowid
            self.db.executemany("INSERT INTO batch_requests VALUES (?,?,?,?,?)",
                                [(bid, c, k, json.dumps(b, sort_keys=True), json.dumps(r, sort_keys=True))
                                 for c, k, b, r in rows])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return bid

    def update_batch(self, bid: int, **fields) -> None:
        """Commit changes to a batch's row (status, remote_id, file ids, error)."""
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE batches SET {cols}, updated_at = ? WHERE id = ?", (*fields.values(), time.time(), bid))

    def batch(self, bid: int) -> dict:
        cur = self.db.execute("SELECT * FROM batches WHERE id = ?", (bid,))
        return dict(zip([d[0] for d in cur.description], cur.fetchone()))

    def open_batches(self, keys: Iterable[str]) -> list[dict]:
        """The batches not yet collected that hold any of `keys`, oldest first."""
        keys, ids = list(keys), set()
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            ids |= {r[0] for r in self.db.execute(
                "SELECT DISTINCT r.batch_id FROM batch_requests r JOIN batches b ON b.id = r.batch_id WHERE "
                f"b.status NOT IN ({','.join('?' * len(BATCH_DONE))}) AND r.key IN ({','.join('?' * len(chunk))})",
                (*BATCH_DONE, *chunk))}
        return [self.batch(i) for i in sorted(ids)]

    def batch_requests(self, bid: int) -> list[dict]:
        """A batch's requests: custom_id, key, body (the line's JSON body), request (as the calls table records it)."""
        return [{"custom_id": c, "key": k, "body": json.loads(b), "request": json.loads(r)} for c, k, b, r in
                self.db.execute("SELECT custom_id, key, body, request FROM batch_requests WHERE batch_id = ? "
                                "ORDER BY rowid", (bid,))]

    def batches(self) -> list[dict]:
        """Every batch with its requests' outcome: ok (answered, by any way), failed, and still open."""
        cur = self.db.execute(
            "SELECT b.id, b.name, b.runner, b.stage, b.model, b.round, b.requests, b.status, b.remote_id, "
            "b.remote_status, b.created_at, b.updated_at, b.error, "
            "SUM(c.status = 'ok' AND c.batch = b.name), SUM(c.status = 'failed' AND c.batch = b.name) "
            "FROM batches b JOIN batch_requests r ON r.batch_id = b.id LEFT JOIN calls c ON c.key = r.key "
            "GROUP BY b.id ORDER BY b.id")
        names = [d[0] for d in cur.description][:13] + ["answered", "failed"]
        return [dict(zip(names, row)) for row in cur]

    def export(self) -> Iterable[dict]:
        cols = [d[1] for d in self.db.execute("PRAGMA table_info(calls)")]
        for row in self.db.execute(f"SELECT {', '.join(cols)} FROM calls ORDER BY id"):
            yield dict(zip(cols, row))
