"""Recipes: YAML validated by pydantic models that forbid unknown keys.

A typo in a recipe is an error naming the field and its line, never a silent default.
The resolved recipe (every default filled in) is written into the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from stillhouse.errors import StillhouseError
from stillhouse.yamlerrors import raise_validation


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PriceSpec(_Strict):
    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)


class IdentitySpec(_Strict):
    name: str = Field(min_length=1, description="the model's name, e.g. Nova")
    maker: str = Field(min_length=1, description="who made it, e.g. Northwind")
    names: list[str] = Field(default_factory=list, description="other names it goes by")
    makers: list[str] = Field(default_factory=list)

    def to_identity(self):
        from stillhouse.identity import Identity

        return Identity(self.name, self.maker, tuple(self.names), tuple(self.makers))


class TeacherSpec(_Strict):
    spec: str = Field(description="BACKEND:MODEL, e.g. hf:/models/Qwen2.5-7B-Instruct or openai:gpt-4o-mini")
    options: dict[str, Any] = Field(default_factory=dict, description="backend options, e.g. batch_size, base_url")
    price: PriceSpec | None = Field(None, description="USD per million tokens; default: the built-in table, else 0")
    max_cost_usd: float | None = Field(None, gt=0, description="stop generating before teacher spend would pass this")
    terms: str = Field("unknown", description="the teacher's terms of use, an id from stillhouse.terms.REGISTRY")
    parameters: int | None = Field(None, ge=1, description="the teacher's size, for reports, when it cannot be read "
                                                          "from a local checkpoint (an API teacher)")
    identity: IdentitySpec | None = Field(None, description="who the teacher says it is; known vendors are recognised "
                                                            "without it (stillhouse.identity)")

    def cache_identity(self) -> dict:
        """This teacher as a finished stage's config records it: what determines its answers (the model, its
        weights when local, every non-transport option), never how it is reached (endpoint, port, concurrency)."""
        from stillhouse.teachers import answer_identity

        return {"answers": answer_identity(self.spec, self.options), "price": self.price and self.price.model_dump(),
                "terms": self.terms}

    @field_validator("terms")
    @classmethod
    def _check_terms(cls, v: str) -> str:
        from stillhouse.terms import REGISTRY

        if v not in REGISTRY:
            import difflib

            close = difflib.get_close_matches(v, list(REGISTRY), n=1, cutoff=0.5)
            raise ValueError(f"unknown terms {v!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                             + f" (known: {', '.join(REGISTRY)})")
        return v

    @field_validator("options")
    @classmethod
    def _check_options(cls, v: dict, info: ValidationInfo) -> dict:
        if "api_key" in v:
            raise ValueError("put the key in an environment variable and name it with api_key_env; "
                             "a key in a recipe would be copied into the run directory")
        spec = info.data.get("spec")
        if spec:  # (a bad spec has its own error)
            from stillhouse.teachers import parse_options, parse_spec

            parse_options(parse_spec(spec)[0], v)
        return v

    @field_validator("spec")
    @classmethod
    def _check_spec(cls, v: str) -> str:
        from stillhouse.teachers import parse_spec

        parse_spec(v)
        return v


def _prompt_source(v: str) -> str:
    from stillhouse.sources import PROMPT_SOURCES, check_source

    return check_source(v, PROMPT_SOURCES)


def _benchmark(v: str) -> str:
    from stillhouse.sources import check_benchmark

    try:
        return check_benchmark(v)
    except StillhouseError as e:  # a bad task file: its own file, line and field, inside the recipe's
        raise ValueError(str(e)) from None


class PromptsSpec(_Strict):
    source: str = Field("world", description="a registered prompt source (the demo world registers 'world') or a "
                                             ".jsonl/.parquet file with a 'prompt' or 'messages' per row")
    n: int | None = Field(2000, ge=1, description="how many prompts to use (all of a file when null)")
    seed: int = 0

    _check_source = field_validator("source")(classmethod(lambda cls, v: _prompt_source(v)))


class BatchSpec(_Strict):
    """How `generation.mode: batch` makes its calls: which runner, how failures are retried, how often to look."""
    runner: str = Field("openai", description="openai: the Files + Batches API at the teacher's base_url (any server "
                                              "that implements it); vllm: `vllm run-batch` on this machine")
    retry: Literal["online", "batch", "none"] = Field(
        "online", description="requests a batch did not answer (errors, expiry): retried online, in a new batch, or "
                              "left failed")
    max_rounds: int = Field(3, ge=1, description="with retry: batch, the most batch rounds (the first included)")
    max_requests: int | None = Field(None, ge=1, description="requests per batch file (default: the runner's limit; "
                                                             "OpenAI's is 50,000)")
    max_bytes: int | None = Field(None, ge=1024, description="bytes per batch file (default: the runner's; 200 MB)")
    completion_window: str = Field("24h", description="the provider's completion window")
    poll_seconds: float = Field(30.0, gt=0, description="seconds between looks at batches in progress")
    price_factor: float = Field(0.5, gt=0, le=1, description="the batch price as a share of the online price")
    command: list[str] = Field(default_factory=lambda: ["vllm"], min_length=1,
                               description="the vllm runner's executable (and any leading arguments)")
    args: list[str] = Field(default_factory=list, description="more arguments to `vllm run-batch`")

    @field_validator("runner")
    @classmethod
    def _check_runner(cls, v: str) -> str:
        from stillhouse.calls.batch import BATCH_RUNNERS

        if v not in BATCH_RUNNERS:
            raise ValueError(BATCH_RUNNERS.unknown(v))
        return v


class GenerationSpec(_Strict):
    mode: Literal["online", "batch"] = Field(
        "online", description="online: one request per call, answers as they come; batch: the provider's batch API "
                              "(about half the price, results within its window; a killed run resumes its batches)")
    batch: BatchSpec = Field(default_factory=BatchSpec, description="batch mode's settings")
    method: str = Field("responses", description="a registered generation method: responses, reasoning, rejection, "
                                                 "self_instruct, evol_instruct, or a plug-in's")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options")
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    samples_per_prompt: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _batch_needs_its_mode(self):
        if self.mode != "batch" and self.batch != BatchSpec():  # (a dump writes the defaults; only a change counts)
            raise ValueError(f"batch settings are given but mode is {self.mode!r}: set mode: batch to use them")
        return self

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str) -> str:
        from stillhouse.generate.methods import METHODS

        if v not in METHODS:
            raise ValueError(METHODS.unknown(v))
        return v

    @field_validator("options")
    @classmethod
    def _check_options(cls, v: dict, info: ValidationInfo) -> dict:
        method = info.data.get("method")
        if method:
            from stillhouse.generate.methods import method_options

            method_options(method, v)
        return v


class LoraSpec(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class KDSpec(_Strict):
    """Logit distillation from the teacher's logprobs in the ledger (generate with top_logprobs)."""
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field(
        "forward_kl", description="forward_kl: KL(teacher || student); reverse_kl: KL(student || teacher); "
                                  "jsd: beta * KL(teacher || m) + (1 - beta) * KL(student || m)")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the divergence; 1 - alpha stays on the sampled "
                                                      "tokens' cross-entropy")
    beta: float = Field(0.5, gt=0, lt=1, description="the teacher's weight in the jsd mixture")
    min_aligned: float = Field(0.5, ge=0, le=1, description="refuse the run if fewer of the samples with logprobs "
                                                            "line up with the student's tokenizer")
    source: Literal["ledger", "teacher"] = Field(
        "ledger", description="ledger: the teacher's top-k logprobs recorded at generation; teacher: a local teacher "
                              "(teacher.spec hf:...) run beside the student for its whole next-token distribution")
    chunk_tokens: int = Field(1024, ge=1, description="source teacher: answer tokens per projection tile")
    chunk_vocab: int = Field(16384, ge=1, description="source teacher: vocabulary columns per projection tile "
                                                      "(memory: chunk_tokens x chunk_vocab x 4 bytes per model)")
    teacher_device: str | None = Field(None, description="source teacher: where the teacher runs (e.g. cuda:1); "
                                                         "default the student's device")


class OnPolicySpec(_Strict):
    """On-policy distillation: the student answers the prompts itself and the teacher scores the student's tokens."""
    max_new_tokens: int = Field(64, ge=1, description="the longest answer the student samples")
    temperature: float = Field(1.0, gt=0, description="the student's sampling temperature")
    top_logprobs: int = Field(20, ge=1, description="a served teacher: alternatives asked per scored token")
    prompt_logprobs: bool = Field(False, description="a served teacher: ask vLLM's `prompt_logprobs` (else the "
                                                     "OpenAI-style `echo` with `logprobs`)")


class TrainSpec(_Strict):
    method: Literal["sft", "kd", "on_policy"] = Field(
        "sft", description="sft: the teacher's answers as text; kd: also its next-token distributions (the kd "
                           "section); on_policy: the student's own answers, scored by the teacher (kd.loss, kd.beta)")
    kd: KDSpec = Field(default_factory=KDSpec)
    on_policy: OnPolicySpec = Field(default_factory=OnPolicySpec)
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=8)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lora: LoraSpec | None = None
    save_steps: int = Field(100, ge=0, description="a checkpoint every N optimizer steps, kept under "
                                                   "checkpoints/NAME/ until the student is complete, which a rerun "
                                                   "resumes from (0: only at SIGTERM or Ctrl-C)")

    @model_validator(mode="after")
    def _kd_needs_its_method(self):
        # (a dump writes the defaults; only a change is a mistake)
        if self.method not in ("kd", "on_policy") and self.kd != KDSpec():
            raise ValueError(f"kd settings are given but method is {self.method!r}: set method: kd to use them")
        if self.method != "on_policy" and self.on_policy != OnPolicySpec():
            raise ValueError(f"on_policy settings are given but method is {self.method!r}: set method: on_policy "
                             "to use them")
        return self


class StudentSpec(_Strict):
    name: str = Field("student", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="names the student in results and its directory: student/ for 'student', "
                                  "else students/NAME/")
    base: str = Field(description="the student's starting model: a local HF directory, a hub name, or stillhouse:NAME")
    train: TrainSpec | None = Field(None, description="this student's training settings (default: the train section)")
    identity: IdentitySpec | None = Field(None, description="who the student says it is: the teacher's self-"
                                                            "identifications in its data are rewritten to this")

    @field_validator("base")
    @classmethod
    def _check_base(cls, v: str) -> str:
        from stillhouse.models import resolve_model

        try:
            resolve_model(v)
        except StillhouseError as e:
            raise ValueError(str(e)) from None
        return v


class ControlSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    model: str = Field(description="BACKEND:MODEL, or a local model directory (served in-process by the hf backend)")
    options: dict[str, Any] = Field(default_factory=dict)
    role: Literal["control"] = "control"
    identity: IdentitySpec | None = None

    def spec(self) -> str:
        from stillhouse.models import backend_spec

        return backend_spec(self.model)


class JudgeSpec(_Strict):
    """The pairwise judge: the run's teacher (`spec: teacher`) or any backend, with its own options and budget."""

    spec: str = Field(description="'teacher': the run's teacher, called exactly as generation calls it (its options, "
                                  "price and cap); or BACKEND:MODEL, e.g. openai:gpt-4o")
    options: dict[str, Any] = Field(default_factory=dict, description="backend options (not with spec: teacher)")
    price: PriceSpec | None = Field(None, description="USD per million tokens (not with spec: teacher)")
    max_cost_usd: float | None = Field(None, gt=0, description="stop judging before spend would pass this "
                                                              "(not with spec: teacher)")
    max_tokens: int = Field(256, ge=1, description="the judge's reply: scores, a verdict line, any reasoning")
    answer_chars: int = Field(40, ge=8, description="final answers longer than this are cut (with '...') before the "
                                                    "judge sees them: a small judge's context is short")
    min_swap_consistency: float = Field(0.65, ge=0, le=1, description="a judge whose verdicts agree across the two "
                                                                      "orders less often than this is flagged "
                                                                      "untrustworthy")
    models: list[str] | None = Field(None, description="the models judged against the teacher, by name (default: "
                                                       "every other model in the run)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"spec": v} if isinstance(v, str) else v  # `judge: teacher` or `judge: openai:gpt-4o`

    @field_validator("spec")
    @classmethod
    def _check_spec(cls, v: str) -> str:
        if v != "teacher":
            from stillhouse.teachers import parse_spec

            parse_spec(v)
        return v

    @field_validator("options")
    @classmethod
    def _check_options(cls, v: dict, info: ValidationInfo) -> dict:
        spec = info.data.get("spec")
        if spec and spec != "teacher":
            from stillhouse.teachers import parse_options, parse_spec

            parse_options(parse_spec(spec)[0], v)
        return v

    @model_validator(mode="after")
    def _teacher_is_as_configured(self) -> "JudgeSpec":
        if self.spec == "teacher":
            given = [k for k in ("options", "price", "max_cost_usd") if getattr(self, k)]
            if given:
                raise ValueError(f"with spec: teacher the judge is called exactly as the teacher section says; set "
                                 f"{given[0]} there, or give the judge a spec of its own")
        return self


class EvaluateSpec(_Strict):
    benchmark: str = Field("world", description="a registered benchmark (the demo world registers 'world'), a .jsonl "
                                                "with prompt/answer/family, or a .yaml of tasks (data, prompt "
                                                "template, extractor, verifier, few-shot examples)")
    n_per_family: int = Field(40, ge=1)
    max_tokens: int = Field(128, ge=1)
    seed: int = 0
    samples: int = Field(1, ge=1, description="sampled answers per item beside the greedy one, for pass@k "
                                              "(1: greedy only)")
    temperature: float = Field(0.8, gt=0.0, le=2.0, description="the sampled answers' temperature (samples > 1)")
    bootstrap_resamples: int = Field(1000, ge=10, description="resamples of the items behind every interval "
                                                              "(seeded by `seed`)")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="the intervals' coverage")
    identity_probes: str | None = Field(None, description="a registered benchmark or .jsonl of identity questions in "
                                                          "phrasings never trained on, for the identity-claim rate")
    judge: JudgeSpec | None = Field(None, description="a pairwise judge of every model against the teacher, e.g. "
                                                      "{spec: teacher}")

    _check_probes = field_validator("identity_probes")(classmethod(lambda cls, v: v if v is None else _benchmark(v)))
    _check_benchmark = field_validator("benchmark")(classmethod(lambda cls, v: _benchmark(v)))


class FilterSpec(BaseModel):
    """One curation filter: its registered name and its options (validated by the filter's own model)."""

    model_config = ConfigDict(extra="allow")
    name: str

    def options(self) -> dict:
        return {k: v for k, v in (self.model_extra or {}).items()}


def _default_filters() -> list[FilterSpec]:
    # (`identity` joins these when a student declares an identity to rewrite to)
    return [FilterSpec(name=n) for n in ("empty", "exact_dedup", "decontaminate")]


class VerifyGateSpec(_Strict):
    verifier: str = Field("exact", description="a registered verifier (stillhouse.verify)")
    options: dict[str, Any] = Field(default_factory=dict)


class CurateSpec(_Strict):
    filters: list[FilterSpec] = Field(default_factory=_default_filters,
                                      description="applied in order; each a registered filter with its options")
    eval_files: list[str] = Field(default_factory=list, description="more evaluation sets (.jsonl with 'prompt') to "
                                                                   "decontaminate against, beside the run's benchmark")
    verify: VerifyGateSpec | None = Field(None, description="drop samples whose final answer fails this verifier "
                                                            "against the prompt's reference answer")

    @field_validator("filters")
    @classmethod
    def _check_filters(cls, v: list[FilterSpec]) -> list[FilterSpec]:
        from stillhouse.curate import parse_options

        for f in v:
            try:
                parse_options(f.name, f.options())
            except StillhouseError as e:
                raise ValueError(str(e)) from None
        return v

    @field_validator("eval_files")
    @classmethod
    def _check_files(cls, v: list[str]) -> list[str]:
        for f in v:
            if not Path(f).is_file():
                raise ValueError(f"file {f!r} does not exist")
        return v


class UseSpec(_Strict):
    intended: Literal["research", "internal", "commercial", "open-weights"] = Field(
        "research", description="what the student is for; checked against the teacher's terms")
    override_terms_conflict: bool = Field(False, description="run despite a conflict; recorded in the cards")


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="names the run directory runs/<name>")
    run_dir: str | None = None
    teacher: TeacherSpec
    prompts: PromptsSpec = Field(default_factory=PromptsSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    student: StudentSpec | None = Field(None, description="one student (shorthand for a one-item students list)")
    students: list[StudentSpec] = Field(default_factory=list, description="every student the run trains")
    controls: list[ControlSpec] = Field(default_factory=list, description="models evaluated beside the students")
    curate: CurateSpec = Field(default_factory=CurateSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    use: UseSpec = Field(default_factory=UseSpec)
    extensions: dict[str, Any] = Field(default_factory=dict, exclude=True,
                                       description="sections of third-party stages, validated by their models")

    @model_validator(mode="after")
    def _one_list_of_students(self) -> "Recipe":
        if self.student is not None:
            if self.students:
                raise ValueError("give either student or students, not both")
            self.students, self.student = [self.student], None
        if not self.students:
            raise ValueError("a recipe needs a student (student: {base: ...}) or a students list")
        declared = any(s.identity is not None for s in self.students)
        if "filters" not in self.curate.model_fields_set and declared:
            self.curate.filters.append(FilterSpec(name="identity"))
        for f in self.curate.filters:
            if f.name == "identity" and f.options().get("action", "rewrite") == "rewrite" and not declared:
                raise ValueError("curate.filters: the identity filter rewrites the teacher's self-identifications to "
                                 "the student's own; declare student.identity {name, maker}, or give the filter "
                                 "action: drop")
        names = [s.name for s in self.students] + [c.name for c in self.controls]
        dup = sorted({n for n in names if names.count(n) > 1} | ({"teacher"} & set(names)))
        if dup:
            raise ValueError(f"model names must be unique and not 'teacher': {', '.join(dup)}")
        return self

    def train_for(self, student: StudentSpec) -> TrainSpec:
        return student.train or self.train

    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def dump(self) -> str:
        data = self.model_dump(mode="json", exclude={"student"})
        for k, v in self.extensions.items():
            data[k] = v.model_dump(mode="json") if isinstance(v, BaseModel) else v
        return yaml.safe_dump(data, sort_keys=False)


def _sections() -> list[str]:
    from stillhouse.stages import section_models

    return sorted(section_models())


def parse_recipe(text: str, source: str = "<recipe>", overrides: dict | None = None) -> Recipe:
    """Validate recipe text; raise StillhouseError naming the field and line on any problem."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise StillhouseError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        raise StillhouseError(f"{source}: the recipe is empty; it needs at least name, teacher and student")
    if not isinstance(data, dict):
        raise StillhouseError(f"{source}: a recipe must be a YAML mapping of sections (name, teacher, student, ...)")
    for k, v in (overrides or {}).items():
        data[k] = v
    # Sections of registered third-party stages are validated by the stage's own model.
    extensions = {}
    plugin_sections = None
    for key in [k for k in data if k not in Recipe.model_fields]:
        if plugin_sections is None:
            from stillhouse.stages import section_models

            plugin_sections = section_models()
        if key in plugin_sections:
            model, value = plugin_sections[key], data.pop(key)
            if model is not None:
                try:
                    value = model.model_validate(value if value is not None else {})
                except ValidationError as e:
                    raise_validation(e, root, source, model, (key,))
            extensions[key] = value
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise_validation(e, root, source, Recipe, extra_known=_sections)
    recipe.extensions = extensions
    return recipe


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe file. Relative paths in it are taken relative to the current directory."""
    p = Path(path)
    if p.is_dir():
        raise StillhouseError(f"{str(p)!r} is a directory; give the path of a recipe YAML file")
    if not p.is_file():
        raise StillhouseError(f"recipe file {str(p)!r} does not exist")
    raw = p.read_bytes()
    if b"\0" in raw[:8192]:
        raise StillhouseError(f"{p}: a binary file, not a recipe (a recipe is YAML text)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise StillhouseError(f"{p}:{line}: not UTF-8 text (byte {raw[e.start]:#04x}); save the recipe as UTF-8") from None
    if not text.strip():
        raise StillhouseError(f"{p}: the recipe is empty; it needs at least name, teacher and student")
    return parse_recipe(text, str(p), overrides)
