"""The `audit` stage: put the run's students (and any other suspects) through `stillhouse audit` against the teacher.

A recipe turns it on with an `audit:` section. Each suspect gets the identity probes about the
teacher's declared identity, the watermark test when the teacher's key is given, and
attribution among the candidate teachers when they are given; every question goes through the
run's ledger, like every other model call. Writes `audit/<suspect>/evidence.json` for each
suspect and `audit/summary.json` (one row per suspect: verdict, each test's p-value, the
attribution), which the report draws.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from stillhouse.errors import StillhouseError
from stillhouse.rundir import RunDir, atomic_write_text
from stillhouse.stages import Stage, StageResult


class CandidateSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field(description="'teacher' (the run's teacher, called as generation calls it), BACKEND:MODEL, a "
                                   "local model directory, or a .jsonl of its texts")
    options: dict[str, Any] = Field(default_factory=dict)


class SuspectSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str | None = Field(None, description="a run's student or control by its name (the default: `name`), "
                                                "BACKEND:MODEL, a local model directory, or a .jsonl of texts")
    options: dict[str, Any] = Field(default_factory=dict)


class AuditSpec(BaseModel):
    """The `audit:` section of a recipe."""

    model_config = ConfigDict(extra="forbid")
    suspects: list[SuspectSpec] | None = Field(None, description="default: every student of the run")
    watermark_key: str | None = Field(None, description="the teacher's watermark key file, when it was served with one")
    tokenizer: str | None = Field(None, description="the teacher's tokenizer (a model directory or stillhouse:NAME), "
                                                    "needed with watermark_key")
    prompts: str | None = Field(None, description="prompt source or file the suspects and candidates answer, for "
                                                  "the watermark and attribution tests; answers that leave the model "
                                                  "free (names, descriptions) show a watermark best")
    n_prompts: int = Field(200, ge=1)
    temperature: float = Field(0.0, ge=0)
    max_tokens: int = Field(96, ge=1)
    candidates: list[CandidateSpec] = Field(default_factory=list, description="teachers attribution chooses among")
    alpha: float = Field(1e-3, gt=0, lt=1, description="the verdict's family-wise false-positive rate")
    null_keys: int = Field(200, ge=0)
    identity_null_rate: float = Field(0.01, gt=0, lt=1)
    seed: int = 0


def _suspects(recipe, run: RunDir, spec: AuditSpec) -> list[tuple[str, Any, Any]]:
    """(name, what to audit, its declared identity) for each suspect: a ModelRef, or a texts file's path."""
    from stillhouse.calls import ModelRef
    from stillhouse.models import backend_spec

    students = {s.name: s for s in recipe.students}
    controls = {c.name: c for c in recipe.controls}
    wanted = spec.suspects or [SuspectSpec(name=s.name) for s in recipe.students]
    out = []
    for s in wanted:
        target = s.model or s.name
        if target in students:
            st = students[target]
            out.append((s.name, ModelRef(f"hf:{run.student_dir(st.name)}"), st.identity and st.identity.to_identity()))
        elif target in controls:
            c = controls[target]
            out.append((s.name, ModelRef(c.spec(), c.options), c.identity and c.identity.to_identity()))
        elif target.endswith(".jsonl"):
            out.append((s.name, target, None))
        else:
            out.append((s.name, ModelRef(backend_spec(target), s.options), None))
    return out


class AuditStage(Stage):
    name = "audit"
    summary = "Audit the run's students against the teacher: identity probes, watermark radioactivity, attribution."
    reads = ("students",)
    writes = ("audit",)
    section = "audit"
    config_model = AuditSpec
    command = False  # `stillhouse audit --recipe RECIPE`

    def config(self, recipe) -> dict:
        spec: AuditSpec = self.section_config(recipe)
        cfg = spec.model_dump(mode="json")
        if spec.watermark_key:  # the key's contents, not its path, decide the result
            from stillhouse.watermark import key_identity

            cfg["watermark_key"] = key_identity(spec.watermark_key)
        cfg["teacher"] = recipe.teacher.cache_identity()
        cfg["reference"] = recipe.teacher.identity and recipe.teacher.identity.model_dump()
        return cfg

    def check(self, recipe, run: RunDir) -> None:
        spec: AuditSpec = self.section_config(recipe)
        if recipe.teacher.identity is None and spec.watermark_key is None and not spec.candidates:
            raise StillhouseError("audit: nothing to test; declare teacher.identity, give audit.watermark_key, or "
                                  "list audit.candidates")
        if spec.watermark_key is not None:
            from stillhouse.watermark import read_key

            read_key(spec.watermark_key)
            if spec.tokenizer is None:
                raise StillhouseError("audit.watermark_key needs audit.tokenizer (the teacher's tokenizer)")
        if (spec.watermark_key or spec.candidates) and spec.prompts is None:
            raise StillhouseError("audit: the watermark and attribution tests need audit.prompts")

    def execute(self, recipe, run: RunDir) -> StageResult:
        from stillhouse.audit.run import run_audit
        from stillhouse.calls import ModelRef
        from stillhouse.generate import teacher_ref
        from stillhouse.models import backend_spec

        spec: AuditSpec = self.section_config(recipe)
        reference = recipe.teacher.identity and recipe.teacher.identity.to_identity()
        candidates = {}
        for c in spec.candidates:
            if c.model == "teacher":
                candidates[c.name] = teacher_ref(recipe)
            elif c.model.endswith(".jsonl"):
                candidates[c.name] = c.model
            else:
                candidates[c.name] = ModelRef(backend_spec(c.model), c.options)
        root = run.root / "audit"
        rows, paths = [], []
        for name, target, own in _suspects(recipe, run, spec):
            ev = run_audit(target, root / name, reference_identity=reference, suspect_identity=own,
                           watermark_key=spec.watermark_key, tokenizer=spec.tokenizer, prompts=spec.prompts,
                           n_prompts=spec.n_prompts, candidates=candidates or None,
                           identity_null_rate=spec.identity_null_rate, alpha=spec.alpha, null_keys=spec.null_keys,
                           max_tokens=spec.max_tokens, temperature=spec.temperature, seed=spec.seed,
                           ledger_path=run.ledger, label=name)
            paths.append(root / name / "evidence.json")
            v = ev.get("verdict") or {}
            attribution = ev["reported"].get("attribution") or {}
            rows.append({"suspect": name, "evidence": f"audit/{name}/evidence.json", "verdict": v.get("verdict"),
                         "distilled": v.get("distilled"), "method": v.get("method"), "alpha": v.get("alpha"),
                         "p_values": {t: d["p_value"] for t, d in ev["tests"].items()},
                         "identity_claims": (ev["tests"].get("identity") or {}).get("claims_reference"),
                         "identity_probes": (ev["tests"].get("identity") or {}).get("probes"),
                         "attribution": attribution.get("probability"), "likeliest": attribution.get("likeliest"),
                         "attribution_cv_accuracy": attribution.get("cv_accuracy")})
        summary = {"reference": reference and {"name": reference.name, "maker": reference.maker},
                   "watermark": spec.watermark_key is not None, "alpha": spec.alpha, "suspects": rows}
        atomic_write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
        flagged = sum(bool(r["distilled"]) for r in rows)
        return StageResult({"audit": [root / "summary.json", *paths]}, {"suspects": len(rows), "flagged": flagged})


STAGE = AuditStage
