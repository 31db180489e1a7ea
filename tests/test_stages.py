"""Stages as registered units: a third party's stage installed through an entry point runs, skips, and is a command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from stillhouse.errors import StillhouseError
from stillhouse.stages import STAGES, ordered_stages
from tests.conftest import STILLHOUSE

TOY = '''
import json

from pydantic import BaseModel, ConfigDict

from stillhouse.stages import Stage, StageResult


class ToyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    greeting: str = "hello"


class ToyStage(Stage):
    name = "toy"
    summary = "Count the generated samples -> toy/out.json."
    reads = ("generated",)
    writes = ("toy",)
    section = "toy"
    config_model = ToyConfig

    def execute(self, recipe, run):
        import pyarrow.parquet as pq

        n = pq.read_metadata(run.generated).num_rows
        out = run.root / "toy" / "out.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"greeting": recipe.extensions["toy"].greeting, "samples": n}))
        return StageResult({"toy": out}, {"samples": n})
'''


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch) -> Path:
    """A package `toyplug` with a `stillhouse.stages` entry point, installed by putting it on the path."""
    root = tmp_path / "site"
    (root / "toyplug").mkdir(parents=True)
    (root / "toyplug" / "__init__.py").write_text(textwrap.dedent(TOY))
    dist = root / "toyplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toyplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[stillhouse.stages]\ntoy = toyplug:ToyStage\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    STAGES.reset()
    yield root
    monkeypatch.undo()
    sys.modules.pop("toyplug", None)
    STAGES.reset()


def test_builtin_stages_are_registered_and_ordered_by_what_they_read():
    names = [s.name for s in ordered_stages()]
    assert names == ["generate", "curate", "train", "audit", "evaluate", "report"]
    assert names.index("report") > names.index("audit")  # the report draws the audit's evidence
    with pytest.raises(StillhouseError, match="did you mean 'train'"):
        STAGES.get("trian")


def test_a_third_party_stage_runs_in_order_skips_when_finished_and_is_a_command(toy_plugin, tiny_models, tmp_path):
    names = [s.name for s in ordered_stages()]
    assert names.index("toy") > names.index("generate")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: toyrun\nrun_dir: {tmp_path / 'run'}\nteacher: {{spec: 'hf:{tiny_models['teacher']}'}}\n"
                      f"prompts: {{n: 5}}\ngeneration: {{max_tokens: 4}}\nstudent: {{base: '{tiny_models['base']}'}}\n"
                      "toy: {greeting: hi}\n")
    env = {**os.environ}
    out = subprocess.run([*STILLHOUSE, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert "toy" in out.stdout and "Count the generated samples" in out.stdout
    out = subprocess.run([*STILLHOUSE, "toy", str(recipe)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "run `stillhouse generate` first" in out.stderr, out.stderr
    assert subprocess.run([*STILLHOUSE, "generate", str(recipe)], capture_output=True, env=env, timeout=300).returncode == 0
    out = subprocess.run([*STILLHOUSE, "toy", str(recipe)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "run" / "toy" / "out.json").read_text()) == {"greeting": "hi", "samples": 5}
    m = json.loads((tmp_path / "run" / "stages" / "toy.json").read_text())
    assert m["counts"] == {"samples": 5} and m["config"] == {"greeting": "hi"}
    out = subprocess.run([*STILLHOUSE, "toy", str(recipe)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "toy: already finished" in out.stderr
    # its recipe section is typed like ours: a typo names the field, the line and the fix
    recipe.write_text(recipe.read_text().replace("greeting: hi", "greting: hi"))
    out = subprocess.run([*STILLHOUSE, "toy", str(recipe)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "r.yaml:7: toy.greting: unknown key; did you mean 'greeting'?" in out.stderr


def test_a_third_party_stage_runs_only_in_recipes_with_its_section(toy_plugin, tiny_models):
    from stillhouse.recipe import parse_recipe

    base = f"name: t\nteacher: {{spec: 'hf:{tiny_models['teacher']}'}}\nstudent: {{base: '{tiny_models['base']}'}}\n"
    toy = next(s for s in ordered_stages() if s.name == "toy")
    assert not toy.enabled(parse_recipe(base))
    with_toy = parse_recipe(base + "toy: {}\n")
    assert toy.enabled(with_toy) and with_toy.extensions["toy"].greeting == "hello"
    assert "toy:" in with_toy.dump() and parse_recipe(with_toy.dump()).extensions == with_toy.extensions


def test_nothing_outside_demo_imports_demo():
    """The demo world plugs in through entry points like a user's package; the pipeline never imports it."""
    import ast

    src = Path(__file__).parents[1] / "src" / "stillhouse"
    offenders = []
    for f in src.rglob("*.py"):
        if "demo" in f.relative_to(src).parts:
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{f.relative_to(src)}: {n}" for n in names if n.startswith("stillhouse.demo")]
    assert offenders == []
