"""The train stage: SFT of the student on the teacher's answers → `student/` with its model card."""

from __future__ import annotations

from stillhouse.train.sft import SFTResult, sft

__all__ = ["SFTResult", "sft", "train"]


def train(recipe, run, force: bool = False) -> dict:
    """Run the train stage: SFT of the recipe's student base on `data/generated.parquet` → `student/`."""
    import json

    import pyarrow.parquet as pq

    from stillhouse.models import count_parameters, resolve_model
    from stillhouse.ui import console, progress_bar

    gen = run.require("generate", "train")
    config = {"student": recipe.student.model_dump(), "train": recipe.train.model_dump()}
    inputs = {"generated": gen["outputs"]["generated"]}
    if not force and run.is_done("train", inputs, config):
        console.print("train: already finished, skipping (use --force to redo)")
        return run.manifest("train")
    started = run.begin("train")
    base = resolve_model(recipe.student.base)
    rows = pq.read_table(run.generated, columns=["messages"]).to_pylist()
    t = recipe.train
    with progress_bar("train", None) as advance:
        last = [0]

        def on_step(step: int, total: int, loss: float | None) -> None:
            advance(step - last[0], **({"loss": f"{loss:.3f}"} if loss is not None else {}))
            last[0] = step

        result = sft(rows, base, run.student, epochs=t.epochs, learning_rate=t.learning_rate, batch_size=t.batch_size,
                     max_length=t.max_length, seed=t.seed, warmup_ratio=t.warmup_ratio, device=t.device,
                     lora=t.lora.model_dump() if t.lora else None, on_step=on_step)
    import shutil

    shutil.rmtree(run.student / "_trainer", ignore_errors=True)
    data_hash = gen["outputs"]["generated"]
    card = _model_card(recipe, data_hash, result, len(rows))
    (run.student / "README.md").write_text(card)
    (run.student / "stillhouse_provenance.json").write_text(json.dumps(
        {"teacher": recipe.teacher.spec, "base": recipe.student.base, "data_hash": data_hash, "samples": len(rows),
         "teacher_terms": recipe.teacher.terms, "use": recipe.use.model_dump(),
         "train": config["train"]}, indent=2) + "\n")
    counts = {"samples": len(rows), "steps": result.steps, "parameters": result.parameters,
              "trainable_parameters": result.trainable_parameters, "base_parameters": count_parameters(base),
              "final_loss": result.final_loss, "dropped_too_long": result.dropped_too_long, "train_seconds": result.seconds,
              "tokens_per_second": result.tokens_per_second}
    return run.finish("train", started, inputs, config, {"student": run.student}, counts)


def _model_card(recipe, data_hash: str, result: SFTResult, n: int) -> str:
    t = recipe.train
    return f"""---
base_model: {recipe.student.base}
tags: [stillhouse, distillation, sft]
---
# {recipe.name} student

Distilled by stillhouse from teacher `{recipe.teacher.spec}` into base `{recipe.student.base}`.

- Method: supervised fine-tuning on the teacher's answers (loss on the answers only){' with LoRA r=' + str(t.lora.r) if t.lora else ''}
- Training data: {n} samples, `data/generated.parquet` with hash `{data_hash}`
- Epochs {t.epochs}, learning rate {t.learning_rate}, batch size {t.batch_size}, seed {t.seed}
- Parameters: {result.parameters:,}; {result.steps} steps in {result.seconds:.1f} s; final loss {result.final_loss}

## Terms of use

{_terms_section(recipe)}
"""


def _terms_section(recipe) -> str:
    from stillhouse.terms import REGISTRY, check_use

    t = REGISTRY[recipe.teacher.terms]
    lines = [f"- Teacher's terms: **{t.name}** ({t.url or 'no source given'}): {t.note}",
             f"- Declared intended use: **{recipe.use.intended}**"]
    if check_use(t.id, recipe.use.intended, override=False):
        lines.append("- **The declared use conflicts with these terms; the run was made with "
                     "`use.override_terms_conflict: true`.**")
    return "\n".join(lines)
