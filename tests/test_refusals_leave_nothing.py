"""Issue 27's bad-input cases: a refused run leaves no empty run directory, the unknown key is what a recipe with one
is told about, a section given as a string gets a sentence, and `ledger stats` keeps whole names when piped."""

from __future__ import annotations

import subprocess

import pytest

from stillhouse.calls import Ledger
from stillhouse.errors import StillhouseError
from stillhouse.recipe import parse_recipe
from stillhouse.teachers import Completion
from tests.conftest import STILLHOUSE


@pytest.mark.parametrize("kind", ["prompts line is an array", "hf teacher directory missing"])
def test_an_early_refusal_leaves_no_run_directory(kind, tmp_path):
    (tmp_path / "p.jsonl").write_text('["not", "an object"]\n')
    teacher, prompts = ("hf:stillhouse:atlas", "p.jsonl") if kind.startswith("prompts") else \
        (f"hf:{tmp_path / 'nope'}", "world")
    (tmp_path / "r.yaml").write_text(f"name: fresh\nteacher: {{spec: '{teacher}'}}\nprompts: {{source: {prompts}, n: 2}}"
                                     "\nstudent: {base: stillhouse:base}\n")
    out = subprocess.run([*STILLHOUSE, "generate", "r.yaml"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    lines = [x for x in (out.stdout + out.stderr).splitlines() if x.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert not (tmp_path / "runs").exists()


def test_an_unknown_key_is_reported_before_a_missing_teacher():
    with pytest.raises(StillhouseError, match=r"^r.yaml:2: bogus: unknown key \(known: name, run_dir, teacher"):
        parse_recipe("name: x\nbogus: 1\n", "r.yaml")


def test_a_section_given_as_a_string_is_told_in_a_sentence():
    with pytest.raises(StillhouseError) as e:
        parse_recipe("name: x\nteacher: openai:gpt-4o\nstudent: {base: stillhouse:base}\n", "r.yaml")
    assert str(e.value) == ("r.yaml:2: teacher: must be a mapping of keys (spec, ...), e.g. {spec: 'openai:gpt-4o'}, "
                            "not a string")
    assert "TeacherSpec" not in str(e.value)


def test_ledger_stats_keeps_whole_names_when_piped(tmp_path):
    led = Ledger(tmp_path / "ledger.db")
    model = "a-rather-long-teacher-model-name-2026-01-01"
    led.record("k1", stage="generate", backend="openai", endpoint=None, model=model, request={}, latency_s=0.1,
               completion=Completion("hi", None, 3, 1, "stop", model), cost_usd=0.0)
    led.close()
    out = subprocess.run([*STILLHOUSE, "ledger", "stats", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and model in out.stderr and "generate" in out.stderr and "…" not in out.stderr
