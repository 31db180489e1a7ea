"""Stages: registered units over artifacts in the run directory, walked in dependency order.

A stage has a name, the artifacts it reads and writes (logical names such as `generated` or
`results`, mapped to files by the stage that writes them), the recipe section that
configures it, and `run(recipe, run, force)`. The built-in stages register through the
`stillhouse.stages` entry-point group exactly as a third party's would; `stillhouse run`
walks every enabled stage in dependency order (a stage runs after the stages that write
what it reads) and the CLI makes one subcommand per stage.

`Stage.run` owns the rules every stage keeps: skip when finished with the same inputs and
config (unless forced); remove the old manifest before starting, so a stage killed half-way
is never mistaken for finished; write the manifest last, after every artifact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from stillhouse.errors import StillhouseError
from stillhouse.registry import Registry
from stillhouse.rundir import RunDir, atomic_write_text

STAGES: Registry = Registry("stillhouse.stages", "stage")


@dataclass
class StageResult:
    """What a stage's `execute` made: artifact name -> path (or paths), counts for the manifest, anything else."""

    outputs: dict[str, Path | list[Path]]
    counts: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Stage:
    """Base of every stage; a subclass sets the class attributes and implements `config` and `execute`.

    `section` names the recipe section that configures the stage. A third-party stage also
    gives `config_model` (a pydantic model of its section, validated when the recipe loads)
    and runs only in recipes that have its section; built-in stages set `always = True`.
    `flags` are extra boolean CLI options (`{"dry_run": "help text"}`) passed to `execute`.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str | None] = None
    config_model: ClassVar[type[BaseModel] | None] = None
    always: ClassVar[bool] = False
    flags: ClassVar[dict[str, str]] = {}
    command: ClassVar[bool] = True  # False: the CLI reaches the stage through a built-in command of its own
    # stages this one runs after when they run too, though it does not need them (the report draws an audit's
    # artifacts when there are any)
    after: ClassVar[tuple[str, ...]] = ()

    def enabled(self, recipe) -> bool:
        return self.always or (self.section is not None and self.section in recipe.extensions)

    def section_config(self, recipe) -> Any:
        """This stage's recipe section (validated), or None."""
        if self.section is None:
            return None
        if self.section in recipe.extensions:
            return recipe.extensions[self.section]
        return getattr(recipe, self.section, None)

    def config(self, recipe) -> Any:
        """Everything in the recipe that changes this stage's output (a finished stage is redone when it changes)."""
        cfg = self.section_config(recipe)
        return cfg.model_dump(mode="json") if isinstance(cfg, BaseModel) else cfg

    def inputs(self, recipe, run: RunDir) -> dict[str, str]:
        """The hashes of what this stage reads, from the manifests of the stages that wrote it."""
        out = {}
        for name in self.reads:
            producer = producer_of(name)
            m = run.manifest(producer)
            if m is None or name not in m.get("outputs", {}):
                raise StillhouseError(f"{self.name} needs the {producer} stage's output ({name}) in {run.root}, which "
                                      f"is missing or unfinished; run `stillhouse {producer}` first")
            out[name] = m["outputs"][name]
        return out

    def check(self, recipe, run: RunDir) -> None:
        """Raise StillhouseError for bad input before anything is touched (the old manifest included)."""

    def execute(self, recipe, run: RunDir, **flags: bool) -> StageResult | None:
        """Do the work; return what was written (None: nothing to record, e.g. a dry run)."""
        raise NotImplementedError

    def run(self, recipe, run: RunDir, force: bool = False, **flags: bool) -> dict | None:
        """Run unless finished with the same inputs and config; returns the stage's manifest."""
        from stillhouse.ui import console

        inputs, config = self.inputs(recipe, run), self.config(recipe)
        if not force and not any(flags.values()) and run.is_done(self.name, inputs, config):
            console.print(f"{self.name}: already finished, skipping (use --force to redo)")
            return run.manifest(self.name)
        self.check(recipe, run)
        if any(flags.values()):  # a flag such as --dry-run looks, and leaves the finished stage as it was
            self.execute(recipe, run, **flags)
            return None
        atomic_write_text(run.recipe, recipe.dump())  # the resolved recipe, exactly as run
        started = run.begin(self.name)
        result = self.execute(recipe, run)
        return run.finish(self.name, started, inputs, config, result.outputs, result.counts, result.extra)


def producer_of(artifact: str) -> str:
    """The name of the stage that writes `artifact`."""
    for name, stage in STAGES:
        if artifact in stage.writes:
            return name
    raise StillhouseError(f"no registered stage writes the artifact {artifact!r}")


def get_stage(name: str) -> Stage:
    obj = STAGES.get(name)
    return obj() if isinstance(obj, type) else obj


def ordered_stages() -> list[Stage]:
    """Every registered stage, each after the stages that write what it reads and those it names in `after`
    (ties: by name)."""
    stages = {name: get_stage(name) for name in STAGES.names()}
    writer = {a: n for n, s in stages.items() for a in s.writes}
    needs = {n: {writer[a] for a in s.reads if a in writer and writer[a] != n} | (set(s.after) & set(stages) - {n})
             for n, s in stages.items()}
    order: list[str] = []
    while needs:
        ready = sorted(n for n, d in needs.items() if not d - set(order))
        if not ready:
            raise StillhouseError(f"stages depend on each other in a cycle: {', '.join(sorted(needs))}")
        order.append(ready[0])
        del needs[ready[0]]
    return [stages[n] for n in order]


def section_models() -> dict[str, type[BaseModel] | None]:
    """Recipe sections that registered stages add (beyond the built-in recipe fields), with their models."""
    return {s.section: s.config_model for s in ordered_stages() if s.section is not None and not s.always}


def open_run(recipe) -> RunDir:
    """The recipe's run directory. Nothing is created here: it appears when a stage starts (the resolved recipe
    written first), so a run refused for bad input leaves no empty `runs/NAME/` behind."""
    return RunDir(recipe.run_path())


def run_stage(name: str, recipe, force: bool = False, **flags: bool) -> dict | None:
    return get_stage(name).run(recipe, open_run(recipe), force=force, **flags)


def run_all(recipe, force: bool = False) -> dict:
    """Every enabled stage in dependency order; returns the run's headline (see `headline`)."""
    run = open_run(recipe)
    t0 = time.time()
    for stage in ordered_stages():
        if stage.enabled(recipe):
            stage.run(recipe, run, force=force)
    return headline(run, wall_seconds=time.time() - t0)


def headline(run: RunDir, wall_seconds: float | None = None) -> dict:
    """The numbers a person wants first, from the run directory's files: every evaluated model with its role,
    accuracy, share of the teacher kept and size, and the time each stage took."""
    import json

    out: dict[str, Any] = {"run": str(run.root), "report": str(run.report) if run.report.is_file() else None,
                           "models": [], "stage_seconds": run.timings(), "wall_seconds": wall_seconds}
    if run.results.is_file():
        res = json.loads(run.results.read_text())
        out["models"] = [{k: m.get(k) for k in ("name", "role", "accuracy", "share_kept", "parameters")}
                         for m in res.get("models", [])]
        teacher = next((m for m in res.get("models", []) if m.get("role") == "teacher"), None)
        if teacher is not None:  # the report's rule for when a share of the teacher is a number worth printing
            from stillhouse.report.sections import share_kept_caveat

            for row, m in zip(out["models"], res.get("models", [])):
                if m is not teacher and m.get("share_kept") is not None:
                    row["share_kept_caveat"] = share_kept_caveat(None, None, teacher.get("accuracy"),
                                                                 teacher.get("accuracy_ci"), m.get("share_kept_ci"))
    return out
