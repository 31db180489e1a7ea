"""Batch mode (`generation.mode: batch`) against a local fake of the Files and Batches endpoints and a stand-in
`vllm run-batch`: the same answers as online at half the price, faults retried by the recipe's choice, and a run
killed with -9 during upload, create, polling and download that loses nothing, duplicates nothing and never submits a
request twice (the fake counts what it was sent). The API key is in no file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stillhouse.calls import Ledger
from stillhouse.errors import StillhouseError
from stillhouse.recipe import parse_recipe
from stillhouse.stages import open_run
from tests.conftest import STILLHOUSE, generate
from tests.fake_batches import FakeBatches
from tests.fake_openai import chat_completion, expected_answer

KEY_ENV = "STILLHOUSE_TEST_BATCH_KEY"
FAKE_VLLM = Path(__file__).with_name("fake_vllm.py")


def _prompts(tmp: Path, n: int) -> Path:
    p = tmp / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} squared?"}) + "\n" for i in range(n)))
    return p


def _recipe(tmp: Path, url: str, n: int, *, run: str = "run", mode: str = "batch", batch: str = "",
            spec: str = "openai:fake-teacher") -> Path:
    opts = f"options: {{base_url: '{url}', api_key_env: {KEY_ENV}, max_attempts: 2, backoff_base: 0.01}}, " \
        if spec.startswith("openai") else ""
    settings = f", batch: {{poll_seconds: 0.05, {batch}}}" if mode == "batch" else ""
    text = (f"name: b\nrun_dir: {tmp / run}\nteacher: {{spec: '{spec}', {opts}"
            "price: {input_per_million: 1000, output_per_million: 2000}}\n"
            f"prompts: {{source: '{_prompts(tmp, n)}', n: null}}\n"
            f"generation: {{mode: {mode}, max_tokens: 16, temperature: 0.7{settings}}}\n"
            "student: {base: stillhouse:base}\n")
    p = tmp / f"{run}.yaml"
    p.write_text(text)
    return p


def _rows(tmp: Path, run: str = "run") -> list[dict]:
    return pq.read_table(tmp / run / "data" / "generated.parquet").to_pylist()


def _answers_are_the_fakes(tmp: Path, run: str = "run") -> int:
    """Every ok answer in the ledger is the fake's answer to the request and seed the ledger says were sent."""
    led = Ledger(tmp / run / "ledger.db")
    rows = [x for x in led.export() if x["status"] == "ok"]
    led.close()
    for x in rows:
        req = json.loads(x["request"])
        assert x["response"] == expected_answer(req["messages"], req["sent_seed"])
    return len(rows)


def _key_in_no_file(root: Path, key: str) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert key.encode() not in p.read_bytes(), p


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-fake-batches-0123456789")
    return "sk-fake-batches-0123456789"


def test_batch_answers_equal_online_at_half_the_price_through_faults(tmp_path, key):
    # 30 requests in 3 batch files; a slow validating phase, 15% error lines, 5% lines missing, batch 2 expires
    # half-done: everything a batch did not answer is retried online, once
    with FakeBatches(api_key=key, validating_s=0.3, error_rate=0.15, drop_rate=0.05, expire_batches=(2,)) as srv:
        r = parse_recipe(_recipe(tmp_path, srv.base_url, 30, batch="max_requests: 10").read_text())
        m = generate(r, open_run(r))
        assert srv.creates == 3 and srv.uploads == 3 and srv.duplicates == 0
        retried = sum(srv.online.values())
        assert 0 < retried < 30 and max(srv.online.values()) == 1
        assert m["counts"]["samples"] == 30 and m["counts"]["calls_made"] == 30
        rows = _rows(tmp_path)
        modes = [x["generation_mode"] for x in rows]
        assert modes.count("online") == retried and modes.count("batch") == 30 - retried
        assert all((x["batch"] is not None) == (x["generation_mode"] == "batch") for x in rows)
        # the same requests online: the same keys and answers, interchangeable; the batch ones at half the price
        r2 = parse_recipe(_recipe(tmp_path, srv.base_url, 30, run="online", mode="online").read_text())
        generate(r2, open_run(r2))
        online = {x["ledger_key"]: x for x in _rows(tmp_path, "online")}
        assert set(online) == {x["ledger_key"] for x in rows}
        for x in rows:
            o = online[x["ledger_key"]]
            assert x["messages"] == o["messages"] and x["sampling_params"] == o["sampling_params"]
            assert x["cost_usd"] == pytest.approx(o["cost_usd"] * (0.5 if x["generation_mode"] == "batch" else 1))
        assert _answers_are_the_fakes(tmp_path) == 30  # each sent with the seed derived from its key, as online
        # a re-run makes no call and submits nothing
        before = (srv.uploads, srv.creates, sum(srv.online.values()))
        m = generate(r, open_run(r), force=True)
        assert m["counts"]["calls_made"] == 0 and (srv.uploads, srv.creates, sum(srv.online.values())) == before
    led = Ledger(tmp_path / "run" / "ledger.db")
    batches = led.stats()["batches"]
    led.close()
    assert [b["remote_status"] for b in batches] == ["completed", "expired", "completed"]
    assert all(b["status"] == "collected" for b in batches)
    assert sum(b["answered"] for b in batches) == 30 - retried
    out = subprocess.run([*STILLHOUSE, "ledger", "stats", str(tmp_path / "run")], capture_output=True, text=True)
    assert "batch_0002" in out.stderr and "expired" in out.stderr and "batch  " in out.stderr
    _key_in_no_file(tmp_path, key)


def test_a_failed_batch_is_retried_in_a_new_batch_or_left_failed(tmp_path, key):
    with FakeBatches(api_key=key, fail_batches=(1,)) as srv:
        r = parse_recipe(_recipe(tmp_path, srv.base_url, 6, batch="retry: none").read_text())
        with pytest.raises(StillhouseError, match="6 calls failed after retries.*batch failed .invalid_file"):
            generate(r, open_run(r))
        assert srv.creates == 1 and sum(srv.online.values()) == 0
        r = parse_recipe(_recipe(tmp_path, srv.base_url, 6, batch="retry: batch").read_text())
        m = generate(r, open_run(r))
        assert m["counts"]["samples"] == 6 and srv.creates == 2 and sum(srv.online.values()) == 0
        assert sorted(srv.in_batches.values()) == [2] * 6  # the failed batch's requests, once more in a new one
    assert {x["generation_mode"] for x in _rows(tmp_path)} == {"batch"}


def test_bad_batch_settings_are_one_clear_error(tmp_path, key, tiny_models):
    with pytest.raises(StillhouseError, match="generation.batch.runner: unknown batch runner 'vlm'; did you mean "
                                              "'vllm'"):
        parse_recipe(_recipe(tmp_path, "http://127.0.0.1:9/v1", 1, batch="runner: vlm").read_text())
    text = _recipe(tmp_path, "http://127.0.0.1:9/v1", 1, mode="online").read_text()
    with pytest.raises(StillhouseError, match="batch settings are given but mode is 'online'"):
        parse_recipe(text.replace("temperature: 0.7", "temperature: 0.7, batch: {retry: none}"))
    r = parse_recipe(_recipe(tmp_path, "", 1, spec=f"hf:{tiny_models['teacher']}").read_text())
    with pytest.raises(StillhouseError, match="the openai runner .* needs an openai: teacher.*runner: vllm"):
        generate(r, open_run(r))


def test_dry_run_prints_online_and_batch_cost(tmp_path, key, capsys):
    r = parse_recipe(_recipe(tmp_path, "http://127.0.0.1:9/v1", 4, batch="max_requests: 3").read_text())
    assert generate(r, open_run(r), dry_run=True) is None
    err = capsys.readouterr().err
    online = float(err.split("online: $")[1].split()[0])
    batch = float(err.split("batch:  $")[1].split()[0])
    assert online > 0 and batch == pytest.approx(online / 2, abs=1e-4) and "2 batches" in err
    assert "<- generation.mode" in err.split("batch:")[1]
    assert not (tmp_path / "run").exists()  # a dry run creates nothing


def test_vllm_run_batch_stand_in(tmp_path, tiny_models, monkeypatch):
    log = tmp_path / "vllm.log"
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    text = _recipe(tmp_path, "", 5, spec=f"hf:{tiny_models['teacher']}",
                   batch=f"runner: vllm, command: ['{sys.executable}', '{FAKE_VLLM}'], max_requests: 3").read_text()
    r = parse_recipe(text)
    m = generate(r, open_run(r))
    assert m["counts"]["samples"] == 5
    ran = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(ran) == 5 and len({rid for _, rid in ran}) == 5  # each request run once, in two batch files
    for x in _rows(tmp_path):
        body = {"messages": x["messages"][:-1], "seed": json.loads(x["sampling_params"])["seed"]}
        assert x["generation_mode"] == "batch" and x["messages"][-1]["content"].startswith("<think>")
        assert x["reported_model"] == chat_completion(body, str(tiny_models["teacher"]))["model"]
    generate(r, open_run(r), force=True)
    assert len(log.read_text().splitlines()) == 5  # the re-run answers from the ledger
    assert len(list((tmp_path / "run" / "batches").glob("*.output.jsonl"))) == 2


def _wait_and_kill(proc: subprocess.Popen, event) -> None:
    assert event.wait(timeout=120), proc.poll()
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_during_upload_create_poll_and_download_loses_nothing_and_submits_once(tmp_path, key):
    """Four runs killed with -9, each at a different step, then one that finishes: 12 answers, none twice, no
    request in two batches, no batch created twice (the kill during `create` comes after the fake made the batch)."""
    env = {**os.environ, KEY_ENV: key}
    with FakeBatches(api_key=key) as srv:
        recipe = _recipe(tmp_path, srv.base_url, 12, batch="max_requests: 4")

        def start() -> subprocess.Popen:
            for e in srv.events.values():
                e.clear()
            return subprocess.Popen([*STILLHOUSE, "generate", str(recipe)], env=env, cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        srv.slow = {"upload": 60}
        _wait_and_kill(start(), srv.events["upload"])
        led = Ledger(tmp_path / "run" / "ledger.db")
        assert [b["status"] for b in led.stats()["batches"]] == ["prepared"] * 3  # recorded before anything was sent
        led.close()
        srv.slow = {"create": 60}
        _wait_and_kill(start(), srv.events["create"])
        assert srv.creates == 1  # the fake made it; the client died before it learnt the batch's id
        srv.slow, srv.validating_s = {}, 60.0
        _wait_and_kill(start(), srv.events["poll"])
        assert srv.creates == 3  # the first found by its name, not created again
        srv.slow, srv.validating_s = {"content": 60}, 0.0
        _wait_and_kill(start(), srv.events["content"])
        srv.slow = {}
        done = subprocess.run([*STILLHOUSE, "generate", str(recipe)], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert srv.creates == 3 and srv.duplicates == 0 and sorted(srv.in_batches.values()) == [1] * 12
        assert sum(srv.online.values()) == 0 and srv.uploads <= 4  # (the killed upload's file is found by name)
    rows = _rows(tmp_path)
    assert len(rows) == 12 and len({x["ledger_key"] for x in rows}) == 12
    assert {x["generation_mode"] for x in rows} == {"batch"} and _answers_are_the_fakes(tmp_path) == 12
    _key_in_no_file(tmp_path, key)
