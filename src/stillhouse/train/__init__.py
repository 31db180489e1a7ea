"""The train stage: SFT of the student on the teacher's answers → `student/` with its model card."""

from __future__ import annotations

from stillhouse.stages import Stage, StageResult

# The SFT itself is `stillhouse.train.sft.sft`, imported when the stage runs: it imports torch and TRL, seconds of
# start-up that commands which never train (help, ledger) should not pay.
__all__ = ["STAGE", "TrainStage"]


class TrainStage(Stage):
    name = "train"
    summary = "Train every student on the curated data → student/ (several: students/NAME/)."
    reads = ("curated",)
    writes = ("students",)
    section = "train"
    always = True
    command = False  # `stillhouse train` is a built-in command of its own: it takes the launcher's options
    launch = None  # a `stillhouse.train.launch.Launch` to train in processes a launcher starts (else in this one)

    def config(self, recipe) -> dict:
        return {"students": [{"name": s.name, "base": s.base, "train": _settings(recipe.train_for(s))}
                             for s in recipe.students]}

    def check(self, recipe, run) -> None:
        from stillhouse.models import resolve_model
        from stillhouse.sources import require_columns

        for s in recipe.students:  # every base checked before any training
            resolve_model(s.base)
        if any(_needs_local_teacher(recipe.train_for(s)) for s in recipe.students):
            local_teacher(recipe)
        if any(recipe.train_for(s).method == "on_policy" for s in recipe.students):
            from stillhouse.errors import StillhouseError
            from stillhouse.train.onpolicy import check_teacher

            check_teacher(recipe)
            if self.launch is not None and self.launch.used:
                raise StillhouseError("train.method on_policy trains in one process: run it without --nproc/--launcher")
        require_columns(run.curated, ("messages",))
        if _distils(recipe):  # read once here, refused before the stage begins, used by execute
            self._kd_logprobs = _teacher_logprobs(run, check=True)

    def execute(self, recipe, run) -> StageResult:
        import json
        import shutil

        import pyarrow.parquet as pq

        from stillhouse.models import count_parameters, resolve_model
        from stillhouse.rundir import tagged_hash
        from stillhouse.train.launch import Launch, checkpoint_folder, run_workers
        from stillhouse.train.resume import prepare, step_of
        from stillhouse.ui import console

        data_hash = self.inputs(recipe, run)["curated"]
        launch = self.launch or Launch()
        launch.check({s.name: recipe.train_for(s).batch_size for s in recipe.students})
        n_rows = pq.read_metadata(run.curated).num_rows
        kd_logprobs = self.__dict__.pop("_kd_logprobs", None)
        bases = {s.name: resolve_model(s.base) for s in recipe.students}  # every base checked before any training
        dirs, per = [], {}
        for student in recipe.students:
            t, out = recipe.train_for(student), run.student_dir(student.name)
            # Checkpoints and the trained weights stay under checkpoints/NAME/ until the student is complete; a
            # rerun of the same job (same base, data and settings) resumes from the newest checkpoint.
            folder = checkpoint_folder(run, student.name)
            job = {"base": student.base, "data": data_hash, "train": _settings(t),
                   "identity": student.identity.model_dump() if student.identity else None}
            resume_from = prepare(folder, tagged_hash(job))
            if resume_from is not None:
                console.print(f"train {student.name}: resuming from {resume_from.name} (step {step_of(resume_from)})")
            if launch.used:
                result = run_workers(launch, run.root, student.name, folder)
            else:
                from stillhouse.train.progress import TrainingProgress
                from stillhouse.train.sft import sft

                # steps of the total, loss and an ETA from the first step: a bar on a terminal, else a line every 5%
                with TrainingProgress(f"train {student.name}" if len(recipe.students) > 1 else "train") as progress:
                    if t.method == "on_policy":  # the student's own samples, scored by the teacher
                        from stillhouse.train.onpolicy import on_policy, on_policy_arguments

                        result = on_policy(**on_policy_arguments(recipe, run, student, folder / "final"),
                                           callbacks=[progress])
                    else:
                        result = sft(**sft_arguments(recipe, run, student, kd_logprobs), callbacks=[progress])
            staged = folder / "final"
            (staged / "README.md").write_text(_model_card(recipe, student, t, data_hash, result, n_rows))
            (staged / "stillhouse_provenance.json").write_text(json.dumps(
                {"teacher": recipe.teacher.spec, "student": student.name, "base": student.base, "data_hash": data_hash,
                 "samples": n_rows, "teacher_terms": recipe.teacher.terms, "use": recipe.use.model_dump(),
                 "train": _settings(t),
                 # the base template's default system prompt (a teacher's identity) and the student's in its place
                 **({"template_system_prompt": result.template_system_prompt} if result.template_system_prompt else {})},
                indent=2) + "\n")
            _publish(staged, out)
            shutil.rmtree(folder, ignore_errors=True)
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()
            per[student.name] = {"steps": result.steps, "parameters": result.parameters,
                                 "trainable_parameters": result.trainable_parameters,
                                 "base_parameters": count_parameters(bases[student.name]),
                                 "final_loss": result.final_loss, "dropped_too_long": result.dropped_too_long,
                                 "train_seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                                 **({"kd": result.kd} if result.kd else {}),
                                 **({"template_system_prompt": result.template_system_prompt}
                                    if result.template_system_prompt else {}),
                                 **({"resumed_from_step": result.resumed_from_step}
                                    if result.resumed_from_step else {}),
                                 **({"processes": len(result.rank_checksums),
                                     "ranks_agree": all(c == result.rank_checksums[0] for c in result.rank_checksums)}
                                    if result.rank_checksums else {})}
            dirs.append(out)
        first = per[recipe.students[0].name]
        counts = {"samples": n_rows, **first, "students": per}
        return StageResult({"students": dirs}, counts)


def sft_arguments(recipe, run, student, kd_logprobs=None) -> dict:
    """Everything `stillhouse.train.sft.sft` is called with for `student` (but callbacks): the same in this process
    and in each process a launcher starts (`stillhouse.train.launch`). The weights go to the student's checkpoint
    folder's `final/`, which becomes `student/` once the model card is written beside them."""
    import pyarrow.parquet as pq

    from stillhouse.models import resolve_model
    from stillhouse.train.launch import checkpoint_folder

    t = recipe.train_for(student)
    rows = pq.read_table(run.curated, columns=["messages"]).to_pylist()
    folder = checkpoint_folder(run, student.name)
    if _distils_from_ledger(t) and kd_logprobs is None:
        kd_logprobs = _teacher_logprobs(run)
    return dict(rows=rows, base=resolve_model(student.base), out_dir=folder / "final", checkpoint_dir=folder,
                save_steps=t.save_steps, epochs=t.epochs, learning_rate=t.learning_rate, batch_size=t.batch_size,
                max_length=t.max_length, seed=t.seed, warmup_ratio=t.warmup_ratio, device=t.device,
                lora=t.lora.model_dump() if t.lora else None,
                identity=student.identity.model_dump() if student.identity else None,
                **({"kd": t.kd.model_dump(), "teacher_logprobs": kd_logprobs} if t.method == "kd" else {}),
                **({"teacher": local_teacher(recipe)} if _needs_local_teacher(t) else {}))


def _distils_from_ledger(t) -> bool:
    return t.method == "kd" and t.kd.source == "ledger"


def _publish(staged, out) -> None:
    """Put the complete student in place: a reader finds the old student or the new one, never a half-written one
    (the old one is moved aside, the new one renamed in, the old one removed)."""
    import os
    import shutil

    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        os.replace(out, old)
    os.replace(staged, out)
    shutil.rmtree(old, ignore_errors=True)


def _distils(recipe) -> bool:
    """Whether any student of the recipe learns from the teacher's logprobs in the ledger."""
    return any(recipe.train_for(s).method == "kd" and recipe.train_for(s).kd.source == "ledger"
               for s in recipe.students)


def _needs_local_teacher(t) -> bool:
    return t.method == "kd" and t.kd.source == "teacher"


def local_teacher(recipe) -> str:
    """The teacher's model directory, for training beside it; refused for a teacher behind an API."""
    from stillhouse.errors import StillhouseError
    from stillhouse.models import resolve_model
    from stillhouse.teachers import parse_spec

    backend, model = parse_spec(recipe.teacher.spec)
    if backend != "hf":
        raise StillhouseError(f"train.kd.source: teacher runs the teacher beside the student, and teacher.spec "
                              f"{recipe.teacher.spec!r} is reached through an API (which gives at most its top-k "
                              "logprobs): use kd.source: ledger, or method: on_policy to have it score the student's "
                              "own answers")
    return resolve_model(model)


def _settings(t) -> dict:
    """A student's training settings; the kd section only where it is used (an SFT run's hash stays what it was)."""
    d = t.model_dump()
    if t.method not in ("kd", "on_policy"):
        d.pop("kd")
    elif t.kd.source == "ledger":  # (a top-k run's hash stays what it was before the teacher source existed)
        for k in ("source", "chunk_tokens", "chunk_vocab", "teacher_device"):
            d["kd"].pop(k)
    if t.method != "on_policy":
        d.pop("on_policy")
    d.pop("save_steps")  # how often checkpoints are written changes no weight (a resumed run equals an unbroken one)
    return d


def _teacher_logprobs(run, check: bool = False) -> list[list[dict] | None]:
    """Per curated row, the teacher's per-token logprobs from the ledger (None for a row without them: a pair curation
    added, or a call made without logprobs). `check`: refuse now, before any training, if no row has them."""
    import pyarrow.parquet as pq

    from stillhouse.calls.ledger import Ledger
    from stillhouse.errors import StillhouseError
    from stillhouse.train.kd import HOW_TO_GET_LOGPROBS

    names = pq.read_schema(run.curated).names
    keys = pq.read_table(run.curated, columns=["ledger_key"])["ledger_key"].to_pylist() if "ledger_key" in names else []
    found = {}
    if any(keys) and run.ledger.exists():
        led = Ledger(run.ledger)
        try:
            found = led.get_many(k for k in keys if k)
        finally:
            led.close()
    out = [(found[k].completion.extra.get("logprobs") or None) if k in found else None for k in keys]
    if check and not any(out):
        raise StillhouseError("train.method kd learns from the teacher's logprobs, and the ledger has none for the "
                              f"curated samples in {run.curated}: " + HOW_TO_GET_LOGPROBS)
    return out or [None] * pq.read_metadata(run.curated).num_rows


def _model_card(recipe, student, t, data_hash: str, result, n: int) -> str:
    return f"""---
base_model: {student.base}
tags: [stillhouse, distillation, sft]
---
# {recipe.name}: {student.name}

Distilled by stillhouse from teacher `{recipe.teacher.spec}` into base `{student.base}`.

- Method: {_method_line(t, result)}{' with LoRA r=' + str(t.lora.r) if t.lora else ''}
- Training data: {n} samples, `data/curated.parquet` (card: `data/README.md`) with hash `{data_hash}`
- Epochs {t.epochs}, learning rate {t.learning_rate}, batch size {t.batch_size}, seed {t.seed}
- Parameters: {result.parameters:,}; {result.steps} steps in {result.seconds:.1f} s; final loss {result.final_loss}

## Terms of use

{_terms_section(recipe)}
"""


def _method_line(t, result) -> str:
    if t.method == "on_policy":
        k = result.kd or {}
        how = ("a local teacher's full next-token distribution" if k.get("teacher") == "local" else
               f"a served teacher's top-{k.get('top_logprobs')} logprobs ({k.get('scoring_via')}; "
               f"{k.get('scoring_calls_made', 0)} scoring calls made, {k.get('scoring_calls_cached', 0)} from the ledger)")
        return (f"on-policy distillation ({t.kd.loss}): the student answered the {k.get('prompts', 0)} prompts itself "
                f"(up to {t.on_policy.max_new_tokens} tokens at temperature {t.on_policy.temperature}), scored by {how}")
    if t.method != "kd":
        return "supervised fine-tuning on the teacher's answers (loss on the answers only)"
    k = result.kd or {}
    if t.kd.source == "teacher":
        return (f"logit distillation ({t.kd.loss}, alpha {t.kd.alpha}) towards the local teacher's full next-token "
                f"distribution ({k.get('vocabulary', 'shared')} vocabulary) on {k.get('samples_aligned', 0)} of "
                f"{k.get('samples', 0)} samples ({k.get('tokens_with_teacher_distribution', 0):,} answer tokens), "
                "cross-entropy on the teacher's answers for all")
    return (f"logit distillation ({t.kd.loss}, alpha {t.kd.alpha}) towards the teacher's top-k logprobs on "
            f"{k.get('samples_aligned', 0)} of {k.get('samples', 0)} samples ({k.get('tokens_with_teacher_distribution', 0):,} "
            "answer tokens), cross-entropy on the teacher's answers for all")


def _terms_section(recipe) -> str:
    from stillhouse.terms import REGISTRY, check_use

    t = REGISTRY[recipe.teacher.terms]
    lines = [f"- Teacher's terms: **{t.name}** ({t.url or 'no source given'}): {t.note}",
             f"- Declared intended use: **{recipe.use.intended}**"]
    if check_use(t.id, recipe.use.intended, override=False):
        lines.append("- **The declared use conflicts with these terms; the run was made with "
                     "`use.override_terms_conflict: true`.**")
    return "\n".join(lines)


STAGE = TrainStage
