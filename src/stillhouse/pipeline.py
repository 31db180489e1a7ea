"""Run every stage of a recipe in order; each stage skips itself when already finished."""

from __future__ import annotations

import json
import time

from stillhouse.evaluate import evaluate
from stillhouse.generate import generate
from stillhouse.recipe import Recipe
from stillhouse.report import report
from stillhouse.rundir import RunDir, atomic_write_text
from stillhouse.train import train

STAGE_FUNCS = {"generate": generate, "train": train, "evaluate": evaluate, "report": report}


def open_run(recipe: Recipe) -> RunDir:
    """The recipe's run directory, with the resolved recipe written into it."""
    run = RunDir(recipe.run_path())
    run.root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.recipe, recipe.dump())
    return run


def run_stage(stage: str, recipe: Recipe, force: bool = False) -> dict:
    return STAGE_FUNCS[stage](recipe, open_run(recipe), force=force)


def run_all(recipe: Recipe, force: bool = False) -> dict:
    """Every stage in order; returns the headline numbers."""
    run = open_run(recipe)
    t0 = time.time()
    for stage, fn in STAGE_FUNCS.items():
        fn(recipe, run, force=force)
    res = json.loads(run.results.read_text())
    return {"report": str(run.report), "teacher_accuracy": res["accuracy"]["teacher"],
            "student_accuracy": res["accuracy"]["student"], "base_accuracy": res["accuracy"]["base"],
            "share_kept": res["share_kept"], "teacher_parameters": res["parameters"]["teacher"],
            "student_parameters": res["parameters"]["student"], "wall_seconds": round(time.time() - t0, 1),
            "stage_seconds": run.timings()}
