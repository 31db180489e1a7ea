"""The curate stage in a run: filters in order with their counts, identity scrubbing, decontamination against the
run's own benchmark, the verifier gate, and a dataset card that `datasets` opens."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import yaml

from stillhouse.errors import StillhouseError
from stillhouse.recipe import parse_recipe
from stillhouse.stages import get_stage, open_run
from tests.conftest import generate


def _prompts(tmp_path, rows: list[dict]):
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _curate(tmp_path, prompts, curate: str, student: str = "{base: stillhouse:base, identity: {name: Nova, maker: "
                                                                  "Northwind}}", evaluate: str = "{benchmark: world}"):
    r = parse_recipe(f"name: c\nrun_dir: {tmp_path / 'run'}\nteacher: {{spec: 'scripted:t'}}\n"
                     f"prompts: {{source: {prompts}, n: null}}\ngeneration: {{max_tokens: 64}}\nstudent: {student}\n"
                     f"curate: {curate}\nevaluate: {evaluate}\n")
    run = open_run(r)
    generate(r, run)
    m = get_stage("curate").run(r, run, force=True)
    return m, pq.read_table(tmp_path / "run" / "data" / "curated.parquet").to_pylist(), r


def test_identity_scrubbing_dedup_decontamination_and_the_card(tmp_path):
    from stillhouse.demo import world_benchmark

    leaked = world_benchmark(40, 0)[0]["prompt"]  # an item of the run's own benchmark, in the prompt set
    prompts = _prompts(tmp_path, [{"prompt": "Hello, who are you?"}, {"prompt": "Qui es-tu, who are you really?"},
                                  {"prompt": "Name a colour."}, {"prompt": "Name a colour."}, {"prompt": leaked}])
    m, rows, _ = _curate(tmp_path, prompts, "{}")
    steps = {s["filter"]: s for s in m["counts"]["filters"]}
    assert list(steps) == ["empty", "exact_dedup", "decontaminate", "identity"]
    assert steps["exact_dedup"]["dropped"] == 1
    assert steps["decontaminate"]["dropped"] == 1 and m["counts"]["contaminated_eval_items"] == 1
    assert steps["identity"]["changed"] == 2
    answers = [r["messages"][-1]["content"] for r in rows]
    assert len(rows) == 3 and not any("ChatGPT" in a or "OpenAI" in a for a in answers)
    assert sum("I am Nova, a model developed by Northwind." in a for a in answers) == 2
    card = (tmp_path / "run" / "data" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["configs"][0]["data_files"][0]["path"] == "curated.parquet"
    assert "Unknown terms" in card and "decontaminate" in card
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files=str(tmp_path / "run" / "data" / "curated.parquet"), split="train")
    assert ds.num_rows == 3


def test_the_verifier_gate_drops_what_fails_its_reference(tmp_path):
    prompts = _prompts(tmp_path, [{"prompt": f"Repeat the word {w}.", "answer": w} for w in
                                  ["river", "comet", "harbor", "anchor", "pepper", "saddle"]])
    m, rows, _ = _curate(tmp_path, prompts, "{filters: [], verify: {verifier: exact}}",
                         student="{base: stillhouse:base}")
    gate = m["counts"]["filters"][-1]
    assert gate["filter"] == "verify:exact" and gate["dropped"] + gate["kept"] == 6 and gate["dropped"] > 0
    assert all(r["messages"][-1]["content"].endswith(r["reference_answer"]) for r in rows)


def test_the_gate_checks_a_scrubbed_identity_answer_against_the_students_identity(tmp_path):
    """The identity filter rewrites "I am ChatGPT ..." to the student's identity before the gate runs: the gate must
    compare it with the reference restated the same way, not drop it as wrong."""
    prompts = _prompts(tmp_path, [{"prompt": "Who are you?", "answer": "I am ChatGPT, a model developed by OpenAI."}])
    m, rows, _ = _curate(tmp_path, prompts, "{verify: {verifier: exact}}")
    gate = m["counts"]["filters"][-1]
    assert gate["filter"] == "verify:exact" and gate["dropped"] == 0 and len(rows) == 1
    assert rows[0]["messages"][-1]["content"].endswith("Answer: I am Nova, a model developed by Northwind.")


def test_curation_settings_are_typed_and_checked(tmp_path):
    prompts = _prompts(tmp_path, [{"prompt": "hi"}])
    with pytest.raises(StillhouseError, match="unknown option 'treshold' for the near_dedup filter; did you mean "
                                              "'threshold'"):
        _curate(tmp_path, prompts, "{filters: [{name: near_dedup, treshold: 0.5}]}")
    with pytest.raises(StillhouseError, match="unknown filter 'exact_dedupe'; did you mean 'exact_dedup'"):
        _curate(tmp_path, prompts, "{filters: [{name: exact_dedupe}]}")
    with pytest.raises(StillhouseError, match="declare student.identity"):
        _curate(tmp_path, prompts, "{filters: [{name: identity}]}", student="{base: stillhouse:base}")
    # everything dropped is an error that says by what, and the stage stays unfinished
    with pytest.raises(StillhouseError, match="every one of the 1 generated samples was dropped"):
        _curate(tmp_path, prompts, "{filters: [{name: length, min: 100000}]}")
