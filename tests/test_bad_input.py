"""Bad input wherever a user hands us a file: one line naming the file and what is wrong, exit 2, no traceback,
and nothing already in the run directory is lost."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import STILLHOUSE


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _recipe(tmp: Path, *, prompts: str = "world", base: str = "stillhouse:base") -> str:
    return (f"name: bad\nrun_dir: {tmp / 'run'}\nteacher: {{spec: 'hf:stillhouse:atlas'}}\n"
            f"prompts: {{source: '{prompts}', n: 4}}\nstudent: {{base: '{base}'}}\n")


def _case(kind: str, tmp: Path) -> tuple[list[str], str]:
    """(command args, expected message) for one kind of bad input, its files written under `tmp`."""
    r = tmp / "r.yaml"
    if kind == "binary recipe":
        r.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
        return ["run", str(r)], f"{r}: a binary file, not a recipe"
    if kind == "recipe not UTF-8":
        r.write_bytes(b"name: caf\xe9\nteacher: {spec: 'hf:x'}\n")
        return ["run", str(r)], f"{r}:1: not UTF-8 text (byte 0xe9)"
    if kind == "empty recipe":
        r.write_text("\n  \n")
        return ["run", str(r)], f"{r}: the recipe is empty"
    if kind == "recipe is a directory":
        return ["run", str(tmp)], "is a directory; give the path of a recipe YAML file"
    if kind == "prompts line not UTF-8":
        p = tmp / "p.jsonl"
        p.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
        r.write_text(_recipe(tmp, prompts=str(p)))
        return ["generate", str(r)], f"{p}:2: not UTF-8 text"
    if kind == "prompts row not an object":
        p = tmp / "p.jsonl"
        p.write_text('["a list", "not an object"]\n')
        r.write_text(_recipe(tmp, prompts=str(p)))
        return ["generate", str(r)], f"{p}:1: each line must be a JSON object, not list"
    if kind == "prompts parquet without the columns":
        p = tmp / "p.parquet"
        pq.write_table(pa.table({"question": ["a", "b"]}), p)
        r.write_text(_recipe(tmp, prompts=str(p)))
        return ["generate", str(r)], f"{p}: has none of the columns 'prompt', 'messages' (its columns: question)"
    if kind == "prompts not a Parquet file":
        p = tmp / "p.parquet"
        p.write_text("this is not parquet")
        r.write_text(_recipe(tmp, prompts=str(p)))
        return ["generate", str(r)], f"{p}: not a readable Parquet file"
    if kind == "student base without config.json":
        (tmp / "notamodel").mkdir()
        r.write_text(_recipe(tmp, base=str(tmp / "notamodel")))
        return ["train", str(r)], f"{r}:5: student.base: '{tmp / 'notamodel'}' is not a Hugging Face model directory"
    if kind == "student base is a file":
        (tmp / "model.bin").write_bytes(b"\0" * 10)
        r.write_text(_recipe(tmp, base=str(tmp / "model.bin")))
        return ["train", str(r)], "is a file, not a Hugging Face model directory"
    if kind == "benchmark task file with an unknown verifier":
        (tmp / "sums.jsonl").write_text('{"q": "2+2", "target": 4}\n')
        b = tmp / "bench.yaml"
        b.write_text("tasks:\n  - data: sums.jsonl\n    verifier: {name: numerik}\n")
        r.write_text(_recipe(tmp) + f"evaluate: {{benchmark: '{b}'}}\n")
        return ["evaluate", str(r)], f"{b}:3: tasks.0.verifier: unknown verifier 'numerik'; did you mean 'numeric'?"
    raise ValueError(kind)


KINDS = ["binary recipe", "recipe not UTF-8", "empty recipe", "recipe is a directory", "prompts line not UTF-8",
         "prompts row not an object", "prompts parquet without the columns", "prompts not a Parquet file",
         "student base without config.json", "student base is a file",
         "benchmark task file with an unknown verifier"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_is_one_line_exit_2_and_loses_nothing(kind, tmp_path):
    run = tmp_path / "run"  # a run directory with earlier work in it
    (run / "stages").mkdir(parents=True)
    (run / "stages" / "generate.json").write_text(json.dumps({"stage": "generate", "outputs": {}}))
    (run / "recipe.yaml").write_text("name: earlier\n")
    (run / "ledger.db").write_bytes(b"earlier calls")
    before = _snapshot(run)
    args, expected = _case(kind, tmp_path)
    out = subprocess.run([*STILLHOUSE, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    lines = [x for x in (out.stdout + out.stderr).splitlines() if x.strip()]
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(lines) == 1, out.stderr
    assert lines[0].startswith("error:") and expected in " ".join(lines), lines[0]
    assert _snapshot(run) == before


@pytest.mark.parametrize("args, says", [(["serve", "x", "--bogus"], "No such option: --bogus"),
                                        (["generate", "r.yaml", "--nope"], "No such option: --nope"),
                                        (["serve", "x", "--max-batch", "abc"], "Invalid value for '--max-batch'")])
def test_command_line_usage_errors_say_what_is_wrong_without_a_traceback(args, says, tmp_path):
    """Unknown options and values of the wrong type: click's usage message and exit 2 (typer 0.2x raises them from its
    own copy of click, whose errors are not click's)."""
    out = subprocess.run([*STILLHOUSE, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
