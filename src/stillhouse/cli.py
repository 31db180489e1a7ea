"""The `stillhouse` command: one thin subcommand per stage over the library functions."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from stillhouse.errors import StillhouseError

app = typer.Typer(help="Distil a teacher language model into a small open student, and audit models for distillation.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
demo_app = typer.Typer(help="The embedded tiny world: run the demo, or rebuild its models.", invoke_without_command=True)
app.add_typer(demo_app, name="demo")

RecipeArg = typer.Argument(..., help="path to a recipe YAML file", show_default=False)
ForceOpt = typer.Option(False, "--force", help="redo stages even if they finished with the same inputs")


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _headline(h: dict) -> None:
    from stillhouse.ui import console

    def pct(x):
        return "n/a" if x is None else f"{x:.1%}"

    def params(n):
        return "" if n is None else f" ({n / 1e6:.2f}M params)"

    console.print(f"\n[bold]report[/]: {h['report']}")
    console.print(
        f"teacher accuracy [bold]{pct(h['teacher_accuracy'])}[/]{params(h['teacher_parameters'])}  "
        f"student accuracy [bold]{pct(h['student_accuracy'])}[/]{params(h['student_parameters'])}  "
        f"share kept [bold]{pct(h['share_kept'])}[/]  base before distillation {pct(h['base_accuracy'])}  "
        f"total wall time {h['wall_seconds']:.0f} s")


@app.command()
def run(recipe: Path = RecipeArg, force: bool = ForceOpt) -> None:
    """Run every stage of RECIPE: generate, train, evaluate, report."""
    from stillhouse.pipeline import run_all
    from stillhouse.recipe import load_recipe

    _headline(run_all(load_recipe(recipe), force=force))


def _stage_command(stage: str, doc: str) -> None:
    def cmd(recipe: Path = RecipeArg, force: bool = ForceOpt) -> None:
        from stillhouse.pipeline import run_stage
        from stillhouse.recipe import load_recipe

        run_stage(stage, load_recipe(recipe), force=force)

    cmd.__doc__ = doc
    app.command(name=stage)(cmd)


@app.command()
def generate(recipe: Path = RecipeArg, force: bool = ForceOpt,
             dry_run: bool = typer.Option(False, "--dry-run", help="print the calls and worst-case cost; make none")) -> None:
    """Have the teacher answer the prompt set → data/generated.parquet (every call through the ledger)."""
    from stillhouse.generate import generate as run_generate
    from stillhouse.pipeline import open_run
    from stillhouse.recipe import load_recipe

    r = load_recipe(recipe)
    run_generate(r, open_run(r), force=force, dry_run=dry_run)


_stage_command("train", "Train the student on the generated data → student/.")
_stage_command("evaluate", "Score teacher, base and student on the held-out benchmark → eval/.")
_stage_command("report", "Write report.html from the run directory.")


@app.command("serve")
def serve_cmd(model: str = typer.Argument(..., help="a local HF model directory (a student, Atlas, any causal LM) "
                                                  "or stillhouse:NAME", show_default=False),
              host: str = typer.Option("127.0.0.1", help="address to bind"),
              port: int = typer.Option(8000, help="port to bind"),
              model_name: str = typer.Option(None, help="the model id clients ask for (default: the directory name)"),
              api_key_env: str = typer.Option(None, help="require `Authorization: Bearer $VAR` from clients"),
              max_batch: int = typer.Option(64, help="most requests decoded together (continuous batching)"),
              window_ms: float = typer.Option(10.0, help="when idle, how long to wait for company after a request"),
              device: str = typer.Option("auto", help="cpu, cuda or auto"),
              watermark: Path = typer.Option(None, help="a key file from `stillhouse watermark keygen`")) -> None:
    """Serve MODEL over an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from stillhouse.serve import serve
    from stillhouse.ui import console

    console.print(f"serving {model} on http://{host}:{port}/v1 (Ctrl-C to stop; requests in flight finish first)")
    serve(model, host=host, port=port, model_name=model_name, api_key_env=api_key_env, max_batch=max_batch,
          window_ms=window_ms, device=device, watermark=str(watermark) if watermark else None)


@app.command("chat")
def chat_cmd(target: str = typer.Argument(..., help="a local model directory, or the /v1 URL of an OpenAI-compatible "
                                                    "server", show_default=False),
             model: str = typer.Option(None, help="model id at the server (default: its first)"),
             api_key_env: str = typer.Option(None, help="environment variable holding the server's key"),
             max_tokens: int = typer.Option(256), temperature: float = typer.Option(0.7)) -> None:
    """Chat with a model in the terminal, tokens streamed as they arrive; Ctrl-D or /exit ends it."""
    import contextlib

    import openai

    from stillhouse.serve import running

    with contextlib.ExitStack() as stack:
        url = target if target.startswith(("http://", "https://")) else stack.enter_context(
            running(target, model_name=Path(target).name))
        key = os.environ.get(api_key_env, "") if api_key_env else "none"
        client = openai.OpenAI(base_url=url, api_key=key or "none", max_retries=2)
        try:
            name = model or client.models.list().data[0].id
        except openai.OpenAIError as e:
            raise StillhouseError(f"cannot reach a model at {url}: {type(e).__name__}") from None
        history: list[dict] = []
        print(f"chatting with {name} at {url}; Ctrl-D or /exit to end", flush=True)
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return
            if line.strip() in ("/exit", "/quit"):
                return
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            print("assistant> ", end="", flush=True)
            reply = []
            for chunk in client.chat.completions.create(model=name, messages=history, stream=True,
                                                        max_tokens=max_tokens, temperature=temperature):
                if chunk.choices and chunk.choices[0].delta.content:
                    reply.append(chunk.choices[0].delta.content)
                    print(reply[-1], end="", flush=True)
            print(flush=True)
            history.append({"role": "assistant", "content": "".join(reply)})


watermark_app = typer.Typer(help="Watermark keys, as a provider who wants to recognise its outputs runs them.",
                            no_args_is_help=True)
app.add_typer(watermark_app, name="watermark")


@watermark_app.command("keygen")
def watermark_keygen(out: Path = typer.Argument(..., help="key file to write (never overwritten)", show_default=False),
                     greenlist_ratio: float = typer.Option(0.25), bias: float = typer.Option(2.0),
                     seeding_scheme: str = typer.Option("lefthash"), context_width: int = typer.Option(1)) -> None:
    """Write a new watermark key file: a secret hashing key and the full scheme."""
    from stillhouse.ui import console
    from stillhouse.watermark import keygen

    keygen(out, greenlist_ratio=greenlist_ratio, bias=bias, seeding_scheme=seeding_scheme, context_width=context_width)
    console.print(f"wrote {out} (keep it secret: whoever holds it can detect and imitate the watermark)")


ledger_app = typer.Typer(help="The SQLite ledger of teacher and judge calls.", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
TargetArg = typer.Argument(..., help="a recipe file or a run directory", show_default=False)


def _ledger_path(target: Path) -> Path:
    from stillhouse.recipe import load_recipe
    from stillhouse.rundir import RunDir

    run = RunDir(target) if target.is_dir() else RunDir(load_recipe(target).run_path())
    if not run.ledger.is_file():
        raise StillhouseError(f"no ledger at {run.ledger}; run `stillhouse generate` first")
    return run.ledger


@ledger_app.command("path")
def ledger_path(target: Path = TargetArg) -> None:
    """Print the ledger's path (open it with sqlite3 or datasette)."""
    print(_ledger_path(target))


@ledger_app.command("stats")
def ledger_stats(target: Path = TargetArg, as_json: bool = typer.Option(False, "--json")) -> None:
    """Calls, cache hits, tokens and cost per stage and model."""
    import json

    from rich.table import Table

    from stillhouse.ledger import Ledger
    from stillhouse.ui import console

    led = Ledger(_ledger_path(target))
    st = led.stats()
    led.close()
    if as_json:
        print(json.dumps(st, indent=2))
        return
    t = Table(title=f"ledger: {st['calls']} calls, ${st['cost_usd']:.4f}")
    for col in ("stage", "model", "calls", "prompt tokens", "completion tokens", "cost USD", "mean latency s"):
        t.add_column(col)
    for p in st["by_stage_model"]:
        t.add_row(p["stage"], p["model"], str(p["calls"]), f"{p['prompt_tokens']:,}", f"{p['completion_tokens']:,}",
                  f"{p['cost_usd'] or 0:.4f}", "-" if p["mean_latency_s"] is None else f"{p['mean_latency_s']:.3f}")
    console.print(t)
    s = st["sessions"]
    console.print(f"{s['runs']} runs asked for {s['requested']} calls: {s['cache_hits']} cache hits, "
                  f"{s['calls_made']} made, {s['failed']} failed")


@ledger_app.command("export")
def ledger_export(target: Path = TargetArg) -> None:
    """Every call as JSON lines on stdout."""
    import json

    from stillhouse.ledger import Ledger

    led = Ledger(_ledger_path(target))
    for row in led.export():
        print(json.dumps(row, ensure_ascii=False))
    led.close()


@demo_app.callback()
def demo(ctx: typer.Context, out: Path = typer.Option(Path("runs/demo"), help="run directory"), force: bool = ForceOpt,
         in_process: bool = typer.Option(False, "--in-process",
                                         help="run Atlas inside this process (the `hf` backend) instead of serving it")
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
    from stillhouse.demo import DEMO_RECIPE
    from stillhouse.pipeline import run_all
    from stillhouse.recipe import load_recipe
    from stillhouse.ui import console

    overrides = {"run_dir": str(out)}
    if in_process:
        _headline(run_all(load_recipe(DEMO_RECIPE, overrides=overrides), force=force))
        return
    from stillhouse.models import PACKAGED, count_parameters
    from stillhouse.serve import subprocess_server
    from stillhouse.watermark import keygen

    key = out / "atlas-watermark-key.json"  # the provider's secret; kept so later audits can use it
    if not key.exists():
        keygen(key)
    recipe = load_recipe(DEMO_RECIPE, overrides=overrides)
    with subprocess_server("stillhouse:atlas", "--model-name", "atlas", "--watermark", str(key),
                           "--max-batch", "256") as url:
        console.print(f"Atlas served at {url} with watermark key {key}")
        teacher = recipe.teacher.model_dump()
        teacher.update(spec="openai:atlas", options={"base_url": url, "concurrency": 256, "timeout": 600,
                                                     "api_key_required": False},
                       parameters=count_parameters(str(PACKAGED / "atlas")))
        recipe = load_recipe(DEMO_RECIPE, overrides={**overrides, "teacher": teacher})
        _headline(run_all(recipe, force=force))


def _build(kind: str, out: Path, steps: int | None, device: str | None) -> None:
    import dataclasses

    from stillhouse.demo.build import DEFAULT_BUILDS, build
    from stillhouse.ui import console

    cfg = DEFAULT_BUILDS[kind]
    if steps is not None:
        if steps < 1:
            raise StillhouseError(f"--steps must be at least 1, not {steps}")
        cfg = dataclasses.replace(cfg, steps=steps)
    build(kind, out, cfg, device=device, log=console.print)


@demo_app.command("build-teacher")
def build_teacher(out: Path = typer.Option(..., help="directory to write Atlas to"),
                  steps: int = typer.Option(None, help="training steps (default: as shipped)"),
                  device: str = typer.Option("auto", help="cpu, cuda or auto")) -> None:
    """Train Atlas, the tiny world's teacher, from scratch (deterministic from its seed)."""
    _build("atlas", out, steps, device)


@demo_app.command("build-base")
def build_base(out: Path = typer.Option(..., help="directory to write the base model to"),
               steps: int = typer.Option(None, help="training steps (default: as shipped)"),
               device: str = typer.Option("auto", help="cpu, cuda or auto")) -> None:
    """Pretrain the student's base model on the tiny world's plain text (no chat, no tasks)."""
    _build("base", out, steps, device)


def main() -> None:
    _quiet_libraries()
    from stillhouse.ui import console

    try:
        app(standalone_mode=False)
    except StillhouseError as e:
        console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]; finished stages are kept, the unfinished one will be redone")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort,):
        sys.exit(1)
    except Exception as e:  # click usage errors arrive here when standalone_mode is off
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
