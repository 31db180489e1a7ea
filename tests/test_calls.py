"""The call layer: complete cache keys, per-request seeds, and an honest ledger."""

from __future__ import annotations

import json
import subprocess

import pyarrow.parquet as pq
import pytest

from stillhouse.calls import Ledger, ModelRef, call_models, derive_seed
from stillhouse.calls.call import plan
from stillhouse.errors import StillhouseError
from stillhouse.recipe import parse_recipe
from stillhouse.stages import open_run
from tests.conftest import STILLHOUSE, generate
from tests.fake_openai import FakeOpenAI


def _recipe(tmp_path, url, name: str, *, options: str = "", generation: str = "", prompts_n: int = 3) -> str:
    return (f"name: {name}\nrun_dir: {tmp_path / 'run'}\nteacher:\n  spec: openai:fake-teacher\n"
            f"  options: {{base_url: {url}, api_key_required: false{options}}}\n"
            f"prompts: {{n: {prompts_n}}}\ngeneration: {{max_tokens: 8{generation}}}\nstudent: {{base: stillhouse:base}}\n")


def _calls_made(tmp_path, text: str) -> int:
    r = parse_recipe(text)
    return generate(r, open_run(r))["counts"]["calls_made"]


ANSWER_CHANGES = [  # (options, generation): each changes what the teacher answers
    (", logprobs: true", ""),
    (", logprobs: true, top_logprobs: 3", ""),
    (", extra_body: {reasoning_effort: high}", ""),
    ("", ", max_tokens: 9"),
    ("", ", temperature: 0.7"),
    ("", ", top_p: 0.9"),
    ("", ", seed: 5"),
    ("", ", samples_per_prompt: 2"),
]
TRANSPORT_CHANGES = [", concurrency: 3", ", timeout: 33", ", max_attempts: 2", ", backoff_base: 0.1", ", backoff_max: 3",
                     ", api_key_env: SOME_OTHER_VAR"]


def test_each_answer_determining_option_is_a_new_call_and_each_transport_option_is_not(tmp_path):
    with FakeOpenAI() as a, FakeOpenAI() as b:
        assert _calls_made(tmp_path, _recipe(tmp_path, a.base_url, "k")) == 3
        for opts, gen in ANSWER_CHANGES:
            made = _calls_made(tmp_path, _recipe(tmp_path, a.base_url, "k", options=opts, generation=gen))
            assert made >= 3, (opts, gen)  # samples_per_prompt 2 reuses sample 0 of each prompt: 3 new calls
        for opts in TRANSPORT_CHANGES:
            assert _calls_made(tmp_path, _recipe(tmp_path, a.base_url, "k", options=opts)) == 0, opts
        # another endpoint serving the same model is the same teacher
        assert _calls_made(tmp_path, _recipe(tmp_path, b.base_url, "k")) == 0
        assert b.requests == 0
        # a different prompt set: new calls for the new prompts only
        assert _calls_made(tmp_path, _recipe(tmp_path, a.base_url, "k", prompts_n=4)) == 1


def test_local_model_keys_follow_dtype_logprobs_and_watermark_not_batch_size(tiny_models, tmp_path):
    from stillhouse.teachers import Request
    from stillhouse.watermark import keygen

    reqs = [Request(messages=({"role": "user", "content": "hi"},))]
    spec = f"hf:{tiny_models['teacher']}"

    def key(**opts) -> str:
        return plan(ModelRef(spec, opts), reqs)[0]

    k1, k2 = keygen(tmp_path / "k1.json"), keygen(tmp_path / "k2.json")
    assert k1["hashing_key"] != k2["hashing_key"]
    from stillhouse.teachers.hf import compute_dtype

    assert key() == key(batch_size=7) == key(device="cpu")  # how it is run, not what it answers
    auto = compute_dtype("cpu", "auto")[0]
    assert key(dtype=auto) == key()  # the key holds the dtype the model really computes in
    other = "float32" if auto == "bfloat16" else "bfloat16"
    changed = [key(dtype=other), key(top_logprobs=2), key(watermark=str(tmp_path / "k1.json")),
               key(watermark=str(tmp_path / "k2.json"))]
    assert len(set(changed)) == 4 and key() not in changed
    # a key file moved elsewhere is the same key: its contents count, not its path
    (tmp_path / "moved.json").write_text((tmp_path / "k1.json").read_text())
    assert key(watermark=str(tmp_path / "moved.json")) == key(watermark=str(tmp_path / "k1.json"))
    # the generation method is in the key too
    assert plan(ModelRef(spec), reqs, {"method": "a"}) != plan(ModelRef(spec), reqs, {"method": "b"})


def test_derived_seeds_never_collide_the_way_seed_plus_index_did(tiny_models):
    from stillhouse.teachers import Request

    msgs = ({"role": "user", "content": "hi"},)
    reqs = [Request(messages=msgs, temperature=1.0, seed=s, sample_index=i) for s in range(3) for i in range(3)]
    keys = plan(ModelRef(f"hf:{tiny_models['teacher']}"), reqs)
    seeds = [derive_seed(k) for k in keys]
    assert len(set(seeds)) == 9 and all(0 <= s < 2**63 for s in seeds)  # seed 1 / sample 0 != seed 0 / sample 1


def _sampled(tiny_models, tmp_path, name: str, batch_size: int, cap: float | None = None) -> tuple[dict, list[str]]:
    text = (f"name: {name}\nrun_dir: {tmp_path / name}\nteacher:\n  spec: hf:{tiny_models['teacher']}\n"
            f"  options: {{batch_size: {batch_size}}}\n  price: {{input_per_million: 1000, output_per_million: 1000}}\n"
            + (f"  max_cost_usd: {cap}\n" if cap else "")
            + "prompts: {n: 14}\ngeneration: {max_tokens: 10, temperature: 1.0, seed: 4, samples_per_prompt: 2}\n"
              "student: {base: stillhouse:base}\n")
    r = parse_recipe(text)
    try:
        m = generate(r, open_run(r))
    except StillhouseError as e:
        return {"stopped": str(e)}, []
    rows = pq.read_table(tmp_path / name / "data" / "generated.parquet").to_pylist()
    return m, [x["messages"][-1]["content"] for x in rows]


def test_sampled_answers_do_not_depend_on_batch_size_or_a_resume(tiny_models, tmp_path):
    _, one = _sampled(tiny_models, tmp_path, "b1", 1)
    _, seven = _sampled(tiny_models, tmp_path, "b7", 7)
    assert len(one) == 28 and one == seven
    assert len(set(one)) > 14  # really sampled: the two samples of a prompt differ
    # interrupted (the budget stops it part-way), then resumed with a higher cap in another batch size
    stopped, _ = _sampled(tiny_models, tmp_path, "resumed", 3, cap=0.5)
    assert "stopped before exceeding" in stopped["stopped"]
    led = Ledger(tmp_path / "resumed" / "ledger.db")
    done = led.stats()["calls"]
    led.close()
    assert 0 < done < 28
    m, resumed = _sampled(tiny_models, tmp_path, "resumed", 5, cap=100.0)
    assert m["counts"]["cache_hits"] == done and m["counts"]["calls_made"] == 28 - done
    assert resumed == one


def test_a_call_that_fails_for_good_is_a_failed_row_and_never_a_cache_hit(tmp_path):
    # every request's first one to three attempts fail with a 500; one attempt allowed: all three fail for good
    with FakeOpenAI(fault_rate=1.0, faults=("500",), max_faults_per_request=3) as srv:
        text = _recipe(tmp_path, srv.base_url, "f", options=", max_attempts: 1, backoff_base: 0.01")
        r = parse_recipe(text)
        with pytest.raises(StillhouseError, match="3 calls failed after retries"):
            generate(r, open_run(r))
        led = Ledger(tmp_path / "run" / "ledger.db")
        fails = led.failures()
        assert len(fails) == 3 and all(f["attempts"] == 1 and "HTTP 500" in f["error"] for f in fails)
        st = led.stats()
        assert st["failed"] == 3 and st["calls"] == 0
        keys = [f["key"] for f in fails]
        assert led.get_many(keys) == {}  # a failure is never served from the cache
        led.close()
        out = subprocess.run([*STILLHOUSE, "ledger", "stats", str(tmp_path / "run")], capture_output=True, text=True)
        assert "3 failed" in out.stderr and "HTTP 500" in out.stderr
        # the retry succeeds within five attempts: the failed rows become ok rows, their attempts added up
        r = parse_recipe(_recipe(tmp_path, srv.base_url, "f", options=", max_attempts: 5, backoff_base: 0.01"))
        m = generate(r, open_run(r))
    assert m["counts"]["calls_made"] == 3
    led = Ledger(tmp_path / "run" / "ledger.db")
    rows = {x["key"]: x for x in led.export()}
    led.close()
    assert all(rows[k]["status"] == "ok" and rows[k]["error"] is None and rows[k]["attempts"] >= 2 for k in keys)
    assert json.loads(rows[keys[0]]["request"])["sent_seed"] == derive_seed(keys[0])


def test_every_model_call_goes_through_one_function(tiny_models, tmp_path):
    """Generation and evaluation both reach models through `call_models`: answers are shared across stages."""
    from stillhouse.teachers import Request

    led = Ledger(tmp_path / "l.db")
    reqs = [Request(messages=({"role": "user", "content": f"Reverse the word ab{c}."},), max_tokens=6) for c in "xyz"]
    first = call_models(ModelRef(f"hf:{tiny_models['teacher']}"), reqs, led, stage="generate")
    again = call_models(ModelRef(f"hf:{tiny_models['teacher']}", {"batch_size": 2}), reqs, led, stage="evaluate")
    assert first.made == 3 and again.made == 0 and again.cache_hits == 3
    assert [again.completion(i).text for i in range(3)] == [first.completion(i).text for i in range(3)]
    led.close()
