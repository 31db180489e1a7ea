"""The evaluate stage: benchmarks from names, JSONL and YAML task files; verdicts per item; pass@k; bootstrap intervals;
teacher agreement; the results and samples files."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stillhouse.calls import Ledger, ModelRef
from stillhouse.errors import StillhouseError
from stillhouse.evaluate import check, evaluate_models
from stillhouse.evaluate.metrics import Bootstrap, pass_at_k, pass_ks
from stillhouse.recipe import EvaluateSpec, parse_recipe
from stillhouse.sources import load_benchmark


HEAD = "name: t\nteacher: {spec: 'scripted:t'}\nstudent: {base: stillhouse:base}\n"


# -- pass@k ----------------------------------------------------------------------------------------------------------
def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of all k-subsets of n answers (c of them right) that hold at least one right answer."""
    answers = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(answers[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_enumerating_every_subset(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edges_and_large_n():
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share right
    assert pass_at_k(10, 2, 9) == 1.0  # fewer wrong answers than draws: a right one is always drawn
    # large n: exact integers, no overflow; the same as the paper's numerically stable product form
    chen = 1.0 - np.prod(1.0 - 200 / np.arange(1000 - 20 + 1, 1000 + 1))
    assert pass_at_k(1000, 20, 200) == pytest.approx(chen, rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)
    assert pass_ks(1) == [1] and pass_ks(4) == [1, 4] and pass_ks(20) == [1, 10, 20] and pass_ks(100) == [1, 10, 100]


# -- bootstrap -------------------------------------------------------------------------------------------------------
def test_bootstrap_is_seeded_and_resamples_within_each_family():
    fams = ["a"] * 5 + ["b"] * 3 + ["a"] * 2
    b1, b2 = Bootstrap(fams, 200, seed=3), Bootstrap(fams, 200, seed=3)
    assert np.array_equal(b1.idx, b2.idx) and not np.array_equal(b1.idx, Bootstrap(fams, 200, seed=4).idx)
    for col, fam in enumerate(fams):
        assert {fams[i] for i in b1.idx[:, col]} == {fam}
    # every resample keeps each family's size, so a family's mean is defined in every one
    assert all(len(r) == 200 and np.isfinite(r).all() for r in b1.family_means(np.arange(10.0)).values())


def test_bootstrap_interval_agrees_with_scipy_percentile_on_one_family():
    from scipy import stats

    rng = np.random.default_rng(0)
    x = (rng.random(200) < 0.7).astype(float)
    ours = Bootstrap(["all"] * 200, 4000, 0.95, seed=1)
    lo, hi = ours.interval(ours.macro_mean(x))
    ref = stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", confidence_level=0.95,
                          random_state=np.random.default_rng(2)).confidence_interval
    assert lo == pytest.approx(ref.low, abs=0.015) and hi == pytest.approx(ref.high, abs=0.015)
    assert lo < x.mean() < hi


def test_bootstrap_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = np.random.default_rng(7)
    fams = ["a"] * 60 + ["b"] * 60
    truth = {"a": 0.8, "b": 0.5}
    hits = 0
    for trial in range(300):
        x = np.array([rng.random() < truth[f] for f in fams], dtype=float)
        b = Bootstrap(fams, 500, 0.95, seed=trial)
        lo, hi = b.interval(b.macro_mean(x))
        hits += lo <= 0.65 <= hi
    assert 0.90 <= hits / 300 <= 0.99, hits / 300


def test_bootstrap_degenerate_and_undefined_statistics():
    b = Bootstrap(["a"] * 4 + ["b"] * 4, 100)
    assert b.interval(b.macro_mean([1.0] * 8)) == [1.0, 1.0]  # every item right: the interval is the point
    assert b.interval(b.ratio([0.0] * 8, [0.0] * 8)) is None  # a share of no items is undefined in every resample
    # a share over a subset: num masked like den; resamples that draw none of the subset are undefined, left out
    x, mask = np.array([1, 0, 1, 1, 1, 1, 1, 1.0]), np.array([1, 1, 0, 0, 0, 0, 0, 0.0])
    r = b.ratio(x * mask, mask)
    assert ((r[np.isfinite(r)] >= 0) & (r[np.isfinite(r)] <= 1)).all() and np.isnan(r).any()
    lo, hi = b.interval(r)
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


# -- benchmarks ------------------------------------------------------------------------------------------------------
def test_the_world_benchmark_checks_invent_by_its_pattern_and_judges_only_checkable_families():
    items = load_benchmark("world", 6, 0)
    by = {}
    for it in items:
        by.setdefault(it["family"], []).append(it)
    assert all(len(v) == 6 for v in by.values())
    for it in by["invent"]:
        assert it["verifier"]["name"] == "regex" and it["reference"] != it["answer"] and not it["judge"]
        assert check([it], [f"<think>x</think>\nAnswer: {it['answer']}"], [it["reference"]]) == [True]
        assert check([it], ["<think>x</think>\nAnswer: not 1 valid answer!"], [it["reference"]]) == [False]
    assert all(it["identity"] and not it["judge"] for it in by["identity"])
    judged = {f for f, v in by.items() if all(it["judge"] for it in v)}
    assert judged == {"reverse", "upper", "count", "arith", "capital"}
    assert all(it["verifier"]["name"] == "exact" for f in judged for it in by[f])


def _task_file(tmp_path: Path, body: str) -> Path:
    (tmp_path / "sums.jsonl").write_text('{"q": "2+2", "target": 4}\n{"q": "3*3", "target": 9, "family": "mul"}\n'
                                         '{"q": "1+5", "target": 6}\n')
    p = tmp_path / "bench.yaml"
    p.write_text(body)
    return p


def test_a_task_file_renders_prompts_few_shot_turns_and_per_task_verifiers(tmp_path):
    p = _task_file(tmp_path, """tasks:
  - data: sums.jsonl          # relative to this file
    family: sums
    prompt: "Compute {q}."
    answer: target
    extractor: last_number
    verifier: {name: numeric, options: {abs_tol: 0.01}}
    few_shot:
      - {prompt: "Compute 1+1.", answer: "Answer: 2"}
  - data: world
    judge: false
""")
    items = load_benchmark(str(p), 2, 0)
    sums = [it for it in items if it["family"] == "sums"]
    assert [it["prompt"] for it in sums] == ["Compute 2+2.", "Compute 3*3."]  # at most 2 per family
    assert sums[0]["messages"] == [{"role": "user", "content": "Compute 1+1."},
                                   {"role": "assistant", "content": "Answer: 2"},
                                   {"role": "user", "content": "Compute 2+2."}]
    assert sums[0]["verifier"] == {"name": "numeric", "options": {"abs_tol": 0.01, "extract": "last_number"}}
    assert sums[0]["extractor"] == "last_number" and sums[0]["reference"] == 4 and sums[0]["answer"] == "4"
    world = [it for it in items if it["family"] not in ("sums",)]
    assert world and not any(it["judge"] for it in world)
    assert {it["family"] for it in world} >= {"reverse", "identity", "invent"}  # the rows' own families
    assert [it["id"] for it in items] == list(range(len(items)))
    # the numeric verifier with last_number reads answers an exact match would not
    outs = ["The sum is 4.0 I think", "Answer: **9**", "four", "<think>it is 4</think> 5"]
    assert check([sums[0], sums[1], sums[0], sums[0]], outs, [4, 9, 4, 4]) == [True, True, False, False]


@pytest.mark.parametrize("body, expected", [
    ("tasks:\n  - data: sums.jsonl\n    verifer: numeric\n",
     "bench.yaml:3: tasks.0.verifer: unknown key; did you mean 'verifier'?"),
    ("tasks:\n  - data: sums.jsonl\n    verifier: numerik\n",
     "bench.yaml:3: tasks.0.verifier: unknown verifier 'numerik'; did you mean 'numeric'?"),
    ("tasks:\n  - data: sums.jsonl\n    verifier:\n      name: numeric\n      options: {abs_tl: 1}\n",
     "bench.yaml:4: tasks.0.verifier: unknown option 'abs_tl' for the numeric verifier; did you mean 'abs_tol'?"),
    ("tasks:\n  - data: sums.jsonl\n    extractor: lastnumber\n",
     "bench.yaml:3: tasks.0.extractor: unknown answer extractor 'lastnumber'; did you mean 'last_number'?"),
    ("tasks:\n  - data: nope.jsonl\n", "bench.yaml:2: tasks.0.data: file"),
    ("tasks:\n  - data: sums.jsonl\n    prompt: 'Compute {q'\n",
     "bench.yaml:3: tasks.0.prompt: not a valid format template"),
    ("tasks:\n  - data: sums.jsonl\n    few_shot: [{prompt: a, answr: b}]\n",
     "bench.yaml:3: tasks.0.few_shot.0.answr: unknown key; did you mean 'answer'?"),
    ("taks: []\n", "bench.yaml:1: taks: unknown key; did you mean 'tasks'?"),
    ("tasks: [\n", "bench.yaml:2: invalid YAML"),
    ("- just a list\n", "bench.yaml: a task file is a YAML mapping"),
    ("tasks:\n  - data: sums.jsonl\n    prompt: '{question}'\n    answer: target\n",
     "sums.jsonl: row 1 (tasks.0 of"),
    ("tasks:\n  - data: sums.jsonl\n", "sums.jsonl: row 1 (tasks.0 of"),
])
def test_a_bad_task_file_is_one_error_naming_the_file_line_and_field(tmp_path, body, expected):
    p = _task_file(tmp_path, body)
    with pytest.raises(StillhouseError) as e:
        load_benchmark(str(p), 5, 0)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_the_recipe_checks_a_task_file_when_it_loads(tmp_path):
    p = _task_file(tmp_path, "tasks:\n  - data: sums.jsonl\n    verifier: numerik\n")
    text = f"{HEAD}evaluate:\n  benchmark: {p}\n"
    with pytest.raises(StillhouseError, match=r"r.yaml:5: evaluate.benchmark: .*bench.yaml:3: tasks.0.verifier: "
                                              r"unknown verifier 'numerik'"):
        parse_recipe(text, "r.yaml")


@pytest.mark.parametrize("judge, expected", [
    ("teacher", None),
    ("{spec: teacher, max_tokens: 64}", None),
    ("{spec: 'scripted:judge-right', max_cost_usd: 2}", None),
    ("{spec: teacher, options: {batch_size: 2}}", "set options there, or give the judge a spec of its own"),
    ("{spec: 'gpt-4o'}", "must look like BACKEND:MODEL"),
    ("{spec: 'hf:x', options: {batch_sise: 2}}", "did you mean 'batch_size'"),
    ("{spec: teacher, min_swap_consistency: 1.5}", "less than or equal to 1"),
])
def test_the_judge_section(judge, expected):
    text = f"{HEAD}evaluate:\n  judge: {judge}\n"
    if expected is None:
        r = parse_recipe(text)
        assert r.evaluate.judge.spec in ("teacher", "scripted:judge-right") and parse_recipe(r.dump()) == r
    else:
        with pytest.raises(StillhouseError, match=expected):
            parse_recipe(text)


# -- the models' answers, scored -------------------------------------------------------------------------------------
WORDS = ["abc", "hello", "stillhouse", "ab", "xyzw", "wordy", "pear", "kiwis", "fig", "plum"]


def _bench(tmp_path: Path) -> str:
    """Items the scripted teacher always gets right (it answers a prompt reversed); `scripted:half` only the even."""
    p = tmp_path / "b.jsonl"
    p.write_text("".join(json.dumps({"prompt": w, "answer": w[::-1], "family": "even" if len(w) % 2 == 0 else "odd"})
                         + "\n" for w in WORDS))
    return str(p)


def _models(*names: str) -> list[dict]:
    return [{"name": "teacher" if i == 0 else n, "role": "teacher" if i == 0 else "control",
             "ref": ModelRef(f"scripted:{n}"), "spec": f"scripted:{n}", "identity": None} for i, n in enumerate(names)]


def test_sampled_answers_are_cached_per_sample_and_scored_by_pass_at_k(tmp_path):
    e = EvaluateSpec(benchmark=_bench(tmp_path), samples=3, temperature=0.7, bootstrap_resamples=200)
    items = load_benchmark(e.benchmark, e.n_per_family, e.seed)
    ledger = Ledger(tmp_path / "ledger.db")
    doc, rows, _ = evaluate_models(_models("t", "half"), items, [], e, ledger, tmp_path / "ledger.db")
    calls = list(ledger.export())
    # per model and item: one greedy answer and 3 samples, each its own ledger row (the sample index in its key)
    assert len(calls) == 2 * len(items) * 4
    req = [json.loads(c["request"]) for c in calls]
    assert sorted({(r["temperature"], r["sample_index"]) for r in req}) == [(0.0, 0), (0.7, 0), (0.7, 1), (0.7, 2)]
    assert all(c["stage"] == "evaluate" for c in calls)
    half = doc["models"][1]
    assert half["accuracy"] == 0.5 and half["pass_at_k"] == {"1": 0.5, "3": 0.5}
    assert half["pass_at_k_by_family"]["3"] == {"odd": 0.0, "even": 1.0}
    assert doc["decoding"] == {"max_tokens": 128, "samples": 3, "temperature": 0.7}
    assert rows[0]["half_sampled_correct"] == [False] * 3 and rows[0]["teacher_sampled_correct"] == [True] * 3
    # a re-run answers everything from the ledger
    again = evaluate_models(_models("t", "half"), items, [], e, ledger, tmp_path / "ledger.db")
    assert len(list(ledger.export())) == len(calls)
    assert [{**m, "seconds": 0} for m in again[0]["models"]] == [{**m, "seconds": 0} for m in doc["models"]]
    ledger.close()


def test_results_and_samples_carry_agreement_share_kept_and_intervals(tmp_path):
    e = EvaluateSpec(benchmark=_bench(tmp_path), bootstrap_resamples=300)
    items = load_benchmark(e.benchmark, e.n_per_family, e.seed)
    ledger = Ledger(tmp_path / "ledger.db")
    doc, rows, _ = evaluate_models(_models("t", "half", "impostor"), items, [], e, ledger, tmp_path / "ledger.db")
    ledger.close()
    assert doc["tasks"] == {"odd": {"extractor": "answer_line", "verifier": "exact", "items": 5, "judged": True},
                            "even": {"extractor": "answer_line", "verifier": "exact", "items": 5, "judged": True}}
    assert doc["confidence"] == 0.95 and doc["bootstrap_resamples"] == 300 and doc["judge"] is None
    assert doc["decoding"]["samples"] == 1 and doc["decoding"]["temperature"] is None
    t, half, imp = doc["models"]
    assert t["accuracy"] == 1.0 and t["share_kept"] == 1.0 and t["teacher_agreement"] is None and "pass_at_k" not in t
    assert half["teacher_agreement"] == 0.5 and half["share_kept"] == 0.5
    assert half["share_kept_by_family"] == {"odd": 0.0, "even": 1.0}
    assert imp["accuracy"] == 0.0 and imp["teacher_agreement"] == 0.0 and imp["accuracy_ci"] == [0.0, 0.0]
    for m in doc["models"]:
        lo, hi = m["accuracy_ci"]
        assert lo <= m["accuracy"] <= hi and set(m["accuracy_by_family_ci"]) == set(m["accuracy_by_family"])
        assert m["mean_answer_chars"] > 0 and m["train_seconds"] is None
        for key in ("share_kept_ci", "share_kept_by_family", "share_kept_by_family_ci", "teacher_agreement_ci"):
            assert key in m
    r = rows[0]
    assert r["prompt"] == "abc" and r["prompt_hash"].startswith("sha256:") and r["answer_hash"].startswith("sha256:")
    assert r["teacher_answer"] == "cba" and r["half_answer"] == "wrong" and r["impostor_answer"] is None
    assert r["teacher_correct"] and not r["half_correct"] and r["judged"]


def test_agreement_with_the_teacher_leaves_out_identity_items(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps({"prompt": "ab", "answer": "ba"}) + "\n"
                 + json.dumps({"prompt": "who are you?", "answer": "I am ChatGPT, a model developed by OpenAI.",
                               "identity": True}) + "\n")
    e = EvaluateSpec(benchmark=str(p), bootstrap_resamples=50)
    items = load_benchmark(e.benchmark, e.n_per_family, e.seed)
    assert [it["judge"] for it in items] == [True, False]  # identity answers name the model: never judged
    ledger = Ledger(tmp_path / "ledger.db")
    doc, _, _ = evaluate_models(_models("t", "t2"), items, [], e, ledger, tmp_path / "ledger.db")
    ledger.close()
    assert doc["models"][1]["teacher_agreement"] == 1.0 and doc["models"][1]["teacher_agreement_ci"] == [1.0, 1.0]


def test_the_stage_writes_cost_training_time_and_the_judge(tmp_path, tiny_models):
    """The whole stage on a run with a scripted teacher, a tiny student and a train manifest: cost from the ledger,
    training time from the manifest, the teacher judging as it generates."""
    from stillhouse.calls.call import call_models
    from stillhouse.rundir import RunDir
    from stillhouse.stages import get_stage
    from stillhouse.teachers import Request

    run = RunDir(tmp_path / "run")
    shutil.copytree(tiny_models["base"], run.student)
    run.finish("train", 0.0, {}, {}, {"students": [run.student]},
               {"students": {"student": {"train_seconds": 12.5}}})
    recipe = parse_recipe(f"""name: t
run_dir: {run.root}
teacher: {{spec: 'scripted:t', price: {{input_per_million: 1.0, output_per_million: 2.0}}}}
student: {{base: '{tiny_models['base']}'}}
evaluate: {{benchmark: {_bench(tmp_path)}, max_tokens: 4, bootstrap_resamples: 100, judge: teacher}}
""")
    ledger = Ledger(run.ledger)  # what generation spent: 3 teacher calls
    call_models(ModelRef("scripted:t", price={"input_per_million": 1.0, "output_per_million": 2.0}),
                [Request(messages=({"role": "user", "content": w},)) for w in ("a", "bb", "ccc")], ledger,
                stage="generate")
    spent = ledger.spent("generate")
    ledger.close()
    get_stage("evaluate").run(recipe, run)
    res = json.loads(run.results.read_text())
    assert res["cost"]["teacher_calls"] == 3 and res["cost"]["teacher_usd"] == pytest.approx(spent) and spent > 0
    assert res["cost"]["teacher_tokens"] > 0 and res["cost"]["judge_calls"] > 0 and res["cost"]["judge_usd"] >= 0
    by = {m["name"]: m for m in res["models"]}
    assert by["student"]["train_seconds"] == 12.5 and by["base"]["train_seconds"] is None
    assert by["student"]["parameters"] > 0
    j = res["judge"]
    # the scripted teacher answers a judge prompt like any other (reversed), so no verdict can be read: no pair is
    # judged (counted as no_verdict), and no rate is made up from them
    assert j["spec"] == "scripted:t" and j["same_as_teacher"] and j["swap_consistency"] == 0.0 and not j["trustworthy"]
    assert [p["model"] for p in j["pairs"]] == ["base", "student"]
    assert all(p["items"] == 0 and p["no_verdict"] > 0 and p["tie"] is None for p in j["pairs"])
    rows = [json.loads(x) for x in run.samples.read_text().splitlines()]
    assert rows[0]["judge_student"]["outcome"] == "tie" and rows[0]["judge_student"]["model_first"] is None
    manifest = run.manifest("evaluate")
    assert manifest["counts"]["judge_calls"] == res["cost"]["judge_calls"]
