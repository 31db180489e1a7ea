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
    temperature: float = Field(0.0, ge=0, description="every model's answers to `prompts` (the CLI's default too)")
    max_tokens: int = Field(96, ge=1)
    candidates: list[CandidateSpec] = Field(default_factory=list, description="teachers attribution chooses among")
    pool: list[CandidateSpec] = Field(default_factory=list, description="models unrelated to the teacher for the "
                                                                        "provenance test and the identity null; the "
                                                                        "candidates other than the teacher and the "
                                                                        "recipe's controls join them")
    provenance: bool = Field(True, description="run the provenance test against the pool (the candidates other than "
                                               "the teacher, the recipe's controls and `pool`) when it has models")
    alpha: float = Field(1e-3, gt=0, lt=1, description="the verdict's family-wise false-positive rate")
    null_keys: int = Field(200, ge=0)
    identity_null_rate: float = Field(0.01, gt=0, lt=1, description="the stated bound the identity test uses when "
                                                                      "there is no pool to measure it on")
    seed: int = 0


def _key(target) -> str:
    """What two audit targets are compared by: a model's spec or a texts file's path."""
    return getattr(target, "spec", str(target))


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
    summary = ("Audit the run's students against the teacher: provenance against unrelated models, identity probes, "
               "watermark radioactivity, attribution.")
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
        if (spec.watermark_key or spec.candidates or spec.pool or recipe.controls) and spec.prompts is None:
            raise StillhouseError("audit: the watermark, provenance and attribution tests need audit.prompts")
        if any(c.model == "teacher" for c in spec.pool):
            raise StillhouseError("audit.pool: the teacher is the reference; the pool holds models unrelated to it")

    def execute(self, recipe, run: RunDir) -> StageResult:
        from stillhouse.audit.run import run_audit
        from stillhouse.calls import ModelRef
        from stillhouse.calls import teacher_ref
        from stillhouse.models import backend_spec

        spec: AuditSpec = self.section_config(recipe)
        reference = recipe.teacher.identity and recipe.teacher.identity.to_identity()
        def ref_of(c: CandidateSpec):
            if c.model == "teacher":
                return teacher_ref(recipe)
            return c.model if c.model.endswith(".jsonl") else ModelRef(backend_spec(c.model), c.options)

        candidates = {c.name: ref_of(c) for c in spec.candidates}
        pool = {c.name: ref_of(c) for c in [*spec.candidates, *spec.pool] if c.model != "teacher"}
        pool.update({c.name: ModelRef(c.spec(), c.options) for c in recipe.controls if c.name not in pool})
        suspects = _suspects(recipe, run, spec)
        root = run.root / "audit"
        rows, paths = [], []
        for name, target, own in suspects:
            # the suspect itself (a control audited as a suspect) never stands in its own pool
            own_pool = {k: v for k, v in pool.items() if k != name and _key(v) != _key(target)} \
                if spec.provenance else {}
            ev = run_audit(target, root / name, reference_identity=reference, suspect_identity=own,
                           watermark_key=spec.watermark_key, tokenizer=spec.tokenizer, prompts=spec.prompts,
                           n_prompts=spec.n_prompts, candidates=candidates or None,
                           reference=teacher_ref(recipe) if own_pool else None, pool=own_pool or None,
                           identity_null_rate=spec.identity_null_rate, alpha=spec.alpha, null_keys=spec.null_keys,
                           max_tokens=spec.max_tokens, temperature=spec.temperature, seed=spec.seed,
                           ledger_path=run.ledger, label=name)
            paths.append(root / name / "evidence.json")
            v = ev.get("verdict") or {}
            attribution = ev["reported"].get("attribution") or {}
            prov = ev["tests"].get("provenance") or {}
            rows.append({"suspect": name, "evidence": f"audit/{name}/evidence.json", "verdict": v.get("verdict"),
                         "deciding_test": v.get("deciding_test"),
                         "provenance": prov and {"closest": prov["closest"], "test": prov["test"]},
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
