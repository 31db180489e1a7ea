"""`stillhouse demo ...`: the tiny world's commands, added to the CLI through the `stillhouse.cli` entry point."""

from __future__ import annotations

from pathlib import Path

import typer

from stillhouse.errors import StillhouseError

demo_app = typer.Typer(help="The embedded tiny world: run the demo, or rebuild its models.", invoke_without_command=True)


def add_commands(app: typer.Typer) -> None:
    app.add_typer(demo_app, name="demo")


@demo_app.callback()
def demo(ctx: typer.Context, out: Path = typer.Option(Path("runs/demo"), help="run directory"),
         force: bool = typer.Option(False, "--force", help="redo stages even if they finished with the same inputs"),
         in_process: bool = typer.Option(False, "--in-process",
                                         help="run Atlas inside this process (the `hf` backend) instead of serving it"),
         recipe_path: Path = typer.Option(None, "--recipe", help="a variation of the demo's recipe to run instead "
                                          "(a copy of src/stillhouse/demo/recipe.yaml, edited)")
         ) -> None:
    """Distil Atlas, the embedded teacher, into the embedded base model, then evaluate and report.

    Atlas is served the way a provider serves a model: `stillhouse serve` with a watermark key,
    in its own process on a free local port, and the recipe's teacher becomes that endpoint
    (the `openai` backend, as for any hosted teacher). The server is stopped at the end, on
    failure and on Ctrl-C too. With --in-process the recipe runs as written, Atlas loaded by
    the `hf` backend.
    """
    if ctx.invoked_subcommand is not None:
        return
    from stillhouse.cli import print_headline
    from stillhouse.demo import DEMO_RECIPE
    from stillhouse.recipe import load_recipe
    from stillhouse.stages import run_all
    from stillhouse.ui import console

    overrides = {"run_dir": str(out)}
    path = recipe_path or DEMO_RECIPE
    if in_process:
        print_headline(run_all(load_recipe(path, overrides=overrides), force=force))
        return
    from stillhouse.models import count_parameters, resolve_model
    from stillhouse.serve import subprocess_server
    from stillhouse.watermark import keygen

    key = out / "atlas-watermark-key.json"  # the provider's secret; kept so later audits can use it
    if not key.exists():
        keygen(key)
    recipe = load_recipe(path, overrides=overrides)
    with subprocess_server("stillhouse:atlas", "--model-name", "atlas", "--watermark", str(key),
                           "--max-batch", "256") as url:
        console.print(f"Atlas served at {url} with watermark key {key}")
        teacher = recipe.teacher.model_dump()
        top = recipe.teacher.options.get("top_logprobs")  # the recipe's hf option, asked of the server instead
        teacher.update(spec="openai:atlas", options={"base_url": url, "concurrency": 256, "timeout": 600,
                                                     "api_key_required": False,
                                                     **({"logprobs": True, "top_logprobs": top} if top else {})},
                       parameters=count_parameters(resolve_model("stillhouse:atlas")))
        extra = {"teacher": teacher}
        if "audit" in recipe.extensions:  # the provider's key: the audit's watermark test
            extra["audit"] = {**recipe.extensions["audit"].model_dump(exclude_unset=True),
                              "watermark_key": str(key)}
        recipe = load_recipe(path, overrides={**overrides, **extra})
        print_headline(run_all(recipe, force=force))


def _build(kind: str, out: Path, steps: int | None, device: str | None, start_from: Path | None = None) -> None:
    import dataclasses

    from stillhouse.demo.build import DEFAULT_BUILDS, build
    from stillhouse.ui import console

    phases = list(DEFAULT_BUILDS[kind])
    if steps is not None:
        if steps < 1:
            raise StillhouseError(f"--steps must be at least 1, not {steps}")
        phases[-1] = dataclasses.replace(phases[-1], steps=steps)
    if start_from is not None and not (start_from / "stillhouse_build.json").is_file():
        raise StillhouseError(f"--from {start_from}: not a model directory this builder wrote (no stillhouse_build.json)")
    try:
        build(kind, out, phases, device=device, log=console.print, start_from=start_from)
    except ValueError as e:
        raise StillhouseError(str(e)) from None


@demo_app.command("build-teacher")
def build_teacher(out: Path = typer.Option(..., help="directory to write Atlas to"),
                  steps: int = typer.Option(None, help="training steps of the last phase (default: as shipped)"),
                  device: str = typer.Option("auto", help="cpu, cuda or auto"),
                  start_from: Path = typer.Option(None, "--from", help="continue from this build's finished phases "
                                                  "(e.g. stillhouse's first-phase Atlas) instead of from scratch")
                  ) -> None:
    """Train Atlas, the tiny world's teacher (deterministic from its seeds): phase 1 learns the first six families
    from scratch, phase 2 continues on every family plus judging."""
    _build("atlas", out, steps, device, start_from)


@demo_app.command("build-mira")
def build_mira(out: Path = typer.Option(..., help="directory to write Mira to"),
               steps: int = typer.Option(None, help="training steps of the last phase (default: as shipped)"),
               device: str = typer.Option("auto", help="cpu, cuda or auto"),
               start_from: Path = typer.Option(None, "--from", help="continue from a built base model "
                                               "(its pretraining phase) instead of from scratch")) -> None:
    """Train Mira, the world's second teacher (own name, maker and style): the base model's pretraining, then the
    world's tasks in Mira's style. The audit's control teacher: nothing of Atlas's goes into it."""
    _build("mira", out, steps, device, start_from)


@demo_app.command("build-base")
def build_base(out: Path = typer.Option(..., help="directory to write the base model to"),
               steps: int = typer.Option(None, help="training steps (default: as shipped)"),
               device: str = typer.Option("auto", help="cpu, cuda or auto")) -> None:
    """Pretrain the student's base model on the tiny world's plain text (no chat, no tasks)."""
    _build("base", out, steps, device)
