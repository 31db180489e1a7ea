"""`stillhouse run --help` lists the stages `run` walks, from the stage registry (a plug-in's included)."""

from __future__ import annotations

import subprocess

from stillhouse.stages import STAGES, Stage, ordered_stages
from tests.conftest import STILLHOUSE


def test_run_help_names_every_registered_stage():
    out = subprocess.run([*STILLHOUSE, "run", "--help"], capture_output=True, text=True, timeout=120,
                         env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    flat = " ".join(out.stdout.split())
    names = [s.name for s in ordered_stages()]
    assert {"generate", "curate", "train", "evaluate", "audit", "report"} <= set(names)
    listed = flat.split("dependency order:")[1]
    assert [n for n in names if n in listed] == names
    assert listed.index("generate") < listed.index("curate") < listed.index("train") < listed.index("evaluate")
    assert "audit (when the recipe has the `audit:` section)" in flat


def test_a_plug_in_stage_is_in_the_help():
    from stillhouse.cli import run_help

    class Polish(Stage):
        name = "polish"
        reads = ("students",)
        section = "polish"

    STAGES.register("polish", Polish)
    try:
        assert "polish (when the recipe has the `polish:` section)" in run_help()
    finally:
        STAGES._items.pop("polish", None)
    assert "polish" not in run_help()
