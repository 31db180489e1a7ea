"""Generation methods on a scripted teacher: a backend that replies by fixed rules, registered like a plug-in."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from stillhouse.errors import StillhouseError
from stillhouse.recipe import parse_recipe
from stillhouse.stages import open_run
from tests.conftest import generate

from tests.scripted import NOUNS  # noqa: E402  (the scripted teacher's vocabulary)


def _run(tmp_path, method: str, options: str = "", prompts: str = "source: world, n: 12", gen: str = "",
         force: bool = True):
    r = parse_recipe(f"name: m\nrun_dir: {tmp_path / 'run'}\nteacher: {{spec: 'scripted:t'}}\nprompts: {{{prompts}}}\n"
                     f"generation: {{method: {method}, options: {{{options}}}, max_tokens: 64{gen}}}\n"
                     "student: {base: stillhouse:base}\n")
    m = generate(r, open_run(r), force=force)  # forced: a re-run is answered from the ledger, not skipped
    return m, pq.read_table(tmp_path / "run" / "data" / "generated.parquet").to_pylist()


def test_self_instruct_proposes_filters_for_novelty_and_answers(tmp_path):
    m, rows = _run(tmp_path, "self_instruct", "n_instructions: 20, per_request: 6")
    c = m["counts"]
    assert c["kept_instructions"] == 20 and len(rows) == 20
    assert c["not_novel"] >= c["requests"]  # every reply's first task copies an example
    instructions = [r["instruction"] for r in rows]
    assert len(set(instructions)) == 20
    seeds = [json.loads(x)["instruction"] for x in open("src/stillhouse/generate/seed_tasks.jsonl")]
    assert not set(instructions) & set(seeds)
    assert all(r["messages"][0]["content"].startswith(r["instruction"]) for r in rows)
    assert all(r["messages"][-1]["content"].startswith("<think>") for r in rows)
    # a re-run is answered from the ledger: the same tasks, no new call
    m2, rows2 = _run(tmp_path, "self_instruct", "n_instructions: 20, per_request: 6")
    assert m2["counts"]["calls_made"] == 0 and [r["instruction"] for r in rows2] == instructions


def test_self_instruct_with_the_users_seeds_and_a_bad_seed_file(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"instruction": f"Name a {n}."}) + "\n" for n in NOUNS[:5]))
    m, rows = _run(tmp_path, "self_instruct", f"seeds: {seeds}, n_instructions: 5, per_request: 5, examples: 3")
    assert m["counts"]["seeds"] == 5 and len(rows) == 5
    seeds.write_text('{"input": "no instruction"}\n')
    with pytest.raises(StillhouseError, match="seeds.jsonl: row 1: each seed task needs a non-empty 'instruction'"):
        _run(tmp_path, "self_instruct", f"seeds: {seeds}, n_instructions: 5")


def test_evol_instruct_keeps_good_evolutions_and_drops_failed_ones(tmp_path):
    m, rows = _run(tmp_path, "evol_instruct")
    c = m["counts"]
    assert c["prompts"] == 12 and c["evolved"] + c["failed_evolutions"] == 12
    assert set(c["failed_by_reason"]) <= {"refusal", "unchanged"} and c["failed_evolutions"] > 0
    assert len(rows) == c["evolved"] > 0
    for r in rows:
        assert r["evolutions"] == "deepen" and r["messages"][0]["content"] == r["evolved_from"] + " Explain every step."
    m, rows = _run(tmp_path, "evol_instruct", "evolutions: [deepen], keep_original: true")
    assert len(rows) == 24 and sum(r["evolved_from"] is None for r in rows) == 12


def test_rejection_keeps_verified_samples_and_records_pass_rates(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Repeat the word {w}.", "answer": w, "family": "repeat"}) + "\n"
                               for w in NOUNS[:10]))
    m, rows = _run(tmp_path, "rejection", "k: 6, keep: all", f"source: {prompts}, n: null", ", temperature: 1.0")
    c = m["counts"]
    assert c["drawn"] == 60 and c["passed"] == len(rows) and 0 < len(rows) < 60
    assert all(r["verified"] and r["messages"][-1]["content"].endswith(r["reference_answer"]) for r in rows)
    assert 0.3 < c["mean_pass_rate"] < 0.95 and set(c["pass_rate_by_family"]) == {"repeat"}
    m, first = _run(tmp_path, "rejection", "k: 6, keep: first", f"source: {prompts}, n: null", ", temperature: 1.0")
    assert m["counts"]["calls_made"] == 0  # the same 60 samples, from the ledger
    assert len(first) == c["prompts_with_a_pass"] and {r["reference_answer"] for r in first} <= set(NOUNS)
    with pytest.raises(StillhouseError, match="temperature above 0"):
        _run(tmp_path, "rejection", "k: 3", f"source: {prompts}, n: null")
    nolabel = tmp_path / "n.jsonl"
    nolabel.write_text(json.dumps({"prompt": "Repeat the word x."}) + "\n")
    with pytest.raises(StillhouseError, match="1 of 1 prompts have no reference 'answer'"):
        _run(tmp_path, "rejection", "k: 3", f"source: {nolabel}, n: null", ", temperature: 1.0")


def test_reasoning_keeps_the_trace_in_its_own_column_from_either_place(tmp_path):
    m, rows = _run(tmp_path, "reasoning")
    assert len(rows) == 12 and all(r["reasoning"].startswith("about ") for r in rows)
    assert all(r["messages"][-1]["content"].startswith("<think>about ") for r in rows)
    m, rows = _run(tmp_path, "reasoning", "format: separate")
    assert all(r["messages"][-1]["content"].startswith("Answer:") for r in rows)
    prompts = tmp_path / "p.jsonl"  # a teacher that returns its reasoning in a separate API field
    prompts.write_text(json.dumps({"prompt": "What is six times seven? [reasoning field]"}) + "\n")
    m, rows = _run(tmp_path, "reasoning", "", f"source: {prompts}, n: null")
    assert rows[0]["reasoning"] == "field reasoning"
    assert rows[0]["messages"][-1]["content"] == "<think>field reasoning</think>\nAnswer: 42"


def test_method_options_are_typed(tmp_path):
    with pytest.raises(StillhouseError, match="unknown option 'n_instruction' for the self_instruct method; did you "
                                              "mean 'n_instructions'"):
        _run(tmp_path, "self_instruct", "n_instruction: 3")
    with pytest.raises(StillhouseError, match="unknown generation method 'self_instrct'; did you mean 'self_instruct'"):
        _run(tmp_path, "self_instrct")
