import subprocess

import pytest

from stillhouse.errors import StillhouseError
from stillhouse.recipe import load_recipe, parse_recipe
from tests.conftest import STILLHOUSE

GOOD = """name: t
teacher:
  spec: hf:stillhouse:atlas
student:
  base: stillhouse:base
"""


def test_defaults_filled_and_dump_roundtrips():
    r = parse_recipe(GOOD)
    assert r.train.epochs == 3.0 and r.prompts.source == "world" and r.evaluate.n_per_family == 40
    assert parse_recipe(r.dump()) == r
    assert str(r.run_path()) == "runs/t"


@pytest.mark.parametrize("text, expected", [
    (GOOD + "train:\n  learnin_rate: 0.1\n", "r.yaml:7: train.learnin_rate: unknown key; did you mean 'learning_rate'?"),
    (GOOD + "train:\n  epochs: many\n", "r.yaml:7: train.epochs: Input should be a valid number"),
    (GOOD.replace("hf:stillhouse:atlas", "gpt-4o"), "r.yaml:3: teacher.spec: teacher spec 'gpt-4o' must look like BACKEND:MODEL"),
    (GOOD.replace("hf:stillhouse", "hff:stillhouse"), "r.yaml:3: teacher.spec: unknown teacher backend 'hff'"),
    (GOOD + "prompts:\n  source: /nope/prompts.jsonl\n", "r.yaml:7: prompts.source: file '/nope/prompts.jsonl' does not exist"),
    ("name: t\nteacher: [\n", "r.yaml:3: invalid YAML"),
    ("name: t\nteacher:\n  spec: hf:x\n", "r.yaml:1: recipe: a recipe needs a student"),
    ("- a\n- b\n", "r.yaml: a recipe must be a YAML mapping"),
    (GOOD + "train:\n  kd: {alpha: 0.9}\n", "r.yaml:7: train: kd settings are given but method is 'sft'"),
    (GOOD + "train:\n  method: kd\n  kd: {loss: kl}\n", "r.yaml:8: train.kd.loss: Input should be 'forward_kl'"),
])
def test_bad_recipes_name_the_field_and_line(text, expected):
    with pytest.raises(StillhouseError) as e:
        parse_recipe(text, "r.yaml")
    assert str(e.value).startswith(expected), str(e.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(StillhouseError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")


@pytest.mark.parametrize("body", ["name: t\nteacher:\n  spec: hf:x\nstudent: {base: b}\ntrain: {epohcs: 1}\n", "name: [\n"])
def test_cli_bad_recipe_one_line_exit_2(tmp_path, body):
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    out = subprocess.run([*STILLHOUSE, "run", str(p)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "runs").exists()
