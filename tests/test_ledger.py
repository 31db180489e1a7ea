"""The openai backend and the ledger against a real fault-injecting server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stillhouse.calls import derive_seed
from stillhouse.errors import StillhouseError
from tests.conftest import generate
from stillhouse.calls import Ledger
from stillhouse.stages import open_run
from stillhouse.recipe import parse_recipe
from tests.conftest import STILLHOUSE
from tests.fake_openai import FAULTS, FakeOpenAI, expected_answer

KEY = "sk-test-DO-NOT-LEAK-4242"


def write_prompts(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"question number {i}: what is {i} reversed?"}) + "\n" for i in range(n)))
    return path


def recipe_text(tmp: Path, base_urls, n: int, *, options: str = "", teacher_extra: str = "", extra: str = "") -> str:
    prompts = write_prompts(tmp / "prompts.jsonl", n)
    urls = json.dumps(base_urls if isinstance(base_urls, list) else [base_urls])
    return f"""name: net
run_dir: {tmp / 'run'}
teacher:
  spec: openai:fake-teacher
  options: {{base_url: {urls}, api_key_env: STILLHOUSE_TEST_KEY, concurrency: 8, timeout: 0.5,
             backoff_base: 0.01, backoff_max: 0.2, max_attempts: 8{options}}}
{teacher_extra}prompts: {{source: {prompts}, n: null}}
generation: {{max_tokens: 32, seed: 3}}
student: {{base: stillhouse:base}}
{extra}"""


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv("STILLHOUSE_TEST_KEY", KEY)


def _rows(tmp: Path) -> list[dict]:
    return pq.read_table(tmp / "run" / "data" / "generated.parquet").to_pylist()


def test_every_fault_survived_each_sample_exactly_once(tmp_path):
    with FakeOpenAI(fault_rate=0.7, api_key=KEY, stall_s=1.5) as srv:
        r = parse_recipe(recipe_text(tmp_path, srv.base_url, 60))
        m = generate(r, open_run(r))
        served = dict(srv.faults_served)
    assert set(served) == set(FAULTS), served  # every kind of fault really happened
    rows = _rows(tmp_path)
    assert len(rows) == 60 and len({x["ledger_key"] for x in rows}) == 60
    for x in rows:
        user = x["messages"][0]["content"]
        # the server saw the per-request seed derived from the call's key (which holds the recipe's seed, 3)
        assert x["messages"][-1]["content"] == expected_answer([{"role": "user", "content": user}],
                                                               derive_seed(x["ledger_key"]))
        assert x["reported_model"] == "fake-teacher-2026-01-01" and x["system_fingerprint"] == "fp_fake01"
        assert x["reasoning"] == f"reading {len(user)} chars"
    assert m["counts"]["calls_made"] == 60 and m["counts"]["cache_hits"] == 0
    led = Ledger(tmp_path / "run" / "ledger.db")
    assert led.stats()["calls"] == 60
    assert led.db.execute("SELECT MAX(attempts) FROM calls").fetchone()[0] > 1
    assert led.db.execute("SELECT endpoint FROM calls LIMIT 1").fetchone()[0].startswith("127.0.0.1:")


def test_rerun_makes_zero_calls_and_force_reuses_the_ledger(tmp_path):
    with FakeOpenAI(api_key=KEY) as srv:
        r = parse_recipe(recipe_text(tmp_path, srv.base_url, 20))
        generate(r, open_run(r))
        before = srv.requests
        generate(r, open_run(r))                  # finished: skipped
        m = generate(r, open_run(r), force=True)  # redone from the ledger
        assert srv.requests == before == 20
    assert m["counts"]["cache_hits"] == 20 and m["counts"]["calls_made"] == 0


def test_a_finished_generation_stays_finished_when_the_teacher_moves_to_another_endpoint(tmp_path):
    """A teacher served on a new port (as `stillhouse demo` does on every run) is the same teacher."""
    with FakeOpenAI(api_key=KEY) as a, FakeOpenAI(api_key=KEY) as b:
        r = parse_recipe(recipe_text(tmp_path, a.base_url, 6))
        generate(r, open_run(r))
        moved = parse_recipe(recipe_text(tmp_path, b.base_url, 6).replace("concurrency: 8", "concurrency: 2"))
        m = generate(moved, open_run(moved))
        assert b.requests == 0 and m["counts"]["calls_made"] == 6  # the first run's manifest, not a new run
        other = parse_recipe(recipe_text(tmp_path, b.base_url, 6).replace("seed: 3", "seed: 4"))
        generate(other, open_run(other))  # what the teacher answers changed: generated anew
        assert b.requests == 6


def test_n_samples_of_one_prompt_are_n_distinct_calls(tmp_path):
    with FakeOpenAI(api_key=KEY) as srv:
        text = recipe_text(tmp_path, srv.base_url, 3).replace("generation: {max_tokens: 32, seed: 3}",
                                                               "generation: {max_tokens: 32, seed: 3, temperature: 0.7, samples_per_prompt: 4}")
        r = parse_recipe(text)
        generate(r, open_run(r))
        assert srv.requests == 12
    rows = _rows(tmp_path)
    assert len({x["ledger_key"] for x in rows}) == 12 and sorted({x["sample_index"] for x in rows}) == [0, 1, 2, 3]


def test_reasoning_content_and_logprobs_are_captured(tmp_path):
    with FakeOpenAI(api_key=KEY, reasoning_field=True) as srv:
        r = parse_recipe(recipe_text(tmp_path, srv.base_url, 4, options=", logprobs: true, top_logprobs: 2"))
        generate(r, open_run(r))
    rows = _rows(tmp_path)
    assert all(x["reasoning"].startswith("reading ") and x["messages"][-1]["content"].startswith("Answer:") for x in rows)
    led = Ledger(tmp_path / "run" / "ledger.db")
    lp = json.loads(led.db.execute("SELECT logprobs FROM calls LIMIT 1").fetchone()[0])
    assert len(lp) == 8 and len(lp[0]["top_logprobs"]) == 2


def test_load_balances_across_endpoints(tmp_path):
    with FakeOpenAI(api_key=KEY, latency_s=0.02) as a, FakeOpenAI(api_key=KEY, latency_s=0.02) as b:
        r = parse_recipe(recipe_text(tmp_path, [a.base_url, b.base_url], 40))
        generate(r, open_run(r))
        assert a.requests > 5 and b.requests > 5 and a.requests + b.requests == 40


def test_concurrency_is_kept_full(tmp_path):
    with FakeOpenAI(api_key=KEY, latency_s=0.05) as srv:
        r = parse_recipe(recipe_text(tmp_path, srv.base_url, 64))
        generate(r, open_run(r))
        assert srv.max_in_flight == 8


def test_budget_cap_stops_cleanly_then_resumes(tmp_path):
    price = "  price: {input_per_million: 1000, output_per_million: 1000}\n  max_cost_usd: 0.5\n"
    with FakeOpenAI(api_key=KEY) as srv:
        r = parse_recipe(recipe_text(tmp_path, srv.base_url, 40, teacher_extra=price))
        with pytest.raises(StillhouseError, match="stopped before exceeding teacher.max_cost_usd"):
            generate(r, open_run(r))
        led = Ledger(tmp_path / "run" / "ledger.db")
        done = led.stats()["calls"]
        assert 0 < done < 40 and led.spent() <= 0.5
        assert not (tmp_path / "run" / "stages" / "generate.json").exists()
        r2 = parse_recipe(recipe_text(tmp_path, srv.base_url, 40, teacher_extra=price.replace("0.5", "50")))
        m = generate(r2, open_run(r2))
        assert m["counts"]["cache_hits"] == done and m["counts"]["calls_made"] == 40 - done
        assert srv.requests == 40


def test_dry_run_makes_no_calls(tmp_path, capsys):
    with FakeOpenAI(api_key=KEY) as srv:
        r = parse_recipe(recipe_text(tmp_path, srv.base_url, 10,
                                     teacher_extra="  price: {input_per_million: 2, output_per_million: 8}\n"))
        assert generate(r, open_run(r), dry_run=True) is None
        assert srv.requests == 0


def test_wrong_key_is_a_clear_error_that_never_shows_the_key(tmp_path, monkeypatch):
    with FakeOpenAI(api_key="the-right-one") as srv:
        r = parse_recipe(recipe_text(tmp_path, srv.base_url, 3))
        with pytest.raises(StillhouseError) as e:
            generate(r, open_run(r))
    assert "HTTP 401" in str(e.value) and KEY not in str(e.value)


def test_key_in_recipe_is_refused(tmp_path):
    with pytest.raises(StillhouseError, match="api_key_env"):
        parse_recipe(recipe_text(tmp_path, "http://127.0.0.1:9/v1", 1, options=", api_key: sk-123"))


def test_no_key_anywhere_in_the_run_directory(tmp_path):
    with FakeOpenAI(api_key=KEY, fault_rate=0.3) as srv:
        r = parse_recipe(recipe_text(tmp_path, srv.base_url, 10))
        generate(r, open_run(r))
    hits = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert hits == []


def test_terms_conflict_stops_unless_overridden(tmp_path):
    with FakeOpenAI(api_key=KEY) as srv:
        text = recipe_text(tmp_path, srv.base_url, 2, teacher_extra="  terms: openai-terms\n", extra="use: {intended: commercial}\n")
        r = parse_recipe(text)
        with pytest.raises(StillhouseError, match="conflicts with the teacher's terms 'OpenAI Terms of Use'"):
            generate(r, open_run(r))
        assert srv.requests == 0
        r = parse_recipe(text.replace("use: {intended: commercial}", "use: {intended: commercial, override_terms_conflict: true}"))
        generate(r, open_run(r))
    assert _rows(tmp_path)[0]["teacher_terms"] == "openai-terms"


def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path):
    n = 150
    with FakeOpenAI(api_key=KEY, latency_s=0.03, fault_rate=0.2) as srv:
        recipe = tmp_path / "net.yaml"
        recipe.write_text(recipe_text(tmp_path, srv.base_url, n))
        env = {**os.environ, "STILLHOUSE_TEST_KEY": KEY}
        proc = subprocess.Popen([*STILLHOUSE, "generate", str(recipe)], cwd=tmp_path, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        db = tmp_path / "run" / "ledger.db"
        deadline = time.time() + 60
        done_before = 0
        while time.time() < deadline:
            if db.exists():
                try:
                    with sqlite3.connect(db, timeout=5) as c:
                        done_before = c.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
                except sqlite3.OperationalError:
                    pass
            if done_before >= 30:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert 30 <= done_before < n
        with sqlite3.connect(db) as c:
            assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            in_ledger = c.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        assert not (tmp_path / "run" / "stages" / "generate.json").exists()
        out = subprocess.run([*STILLHOUSE, "generate", str(recipe)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((tmp_path / "run" / "stages" / "generate.json").read_text())
    assert m["counts"]["cache_hits"] == in_ledger and m["counts"]["calls_made"] == n - in_ledger
    rows = _rows(tmp_path)
    assert len(rows) == n and len({x["ledger_key"] for x in rows}) == n
    assert sorted(x["messages"][0]["content"] for x in rows) == sorted(f"question number {i}: what is {i} reversed?" for i in range(n))
    with sqlite3.connect(tmp_path / "run" / "ledger.db") as c:
        assert c.execute("SELECT COUNT(*), COUNT(DISTINCT key) FROM calls").fetchone() == (n, n)
