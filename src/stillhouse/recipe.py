"""Recipes: YAML validated by pydantic models that forbid unknown keys.

A typo in a recipe is an error naming the field and its line, never a silent default.
The resolved recipe (every default filled in) is written into the run directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stillhouse.errors import StillhouseError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PriceSpec(_Strict):
    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)


class TeacherSpec(_Strict):
    spec: str = Field(description="BACKEND:MODEL, e.g. hf:/models/Qwen2.5-7B-Instruct or openai:gpt-4o-mini")
    options: dict[str, Any] = Field(default_factory=dict, description="backend options, e.g. batch_size, base_url")
    price: PriceSpec | None = Field(None, description="USD per million tokens; default: the built-in table, else 0")
    max_cost_usd: float | None = Field(None, gt=0, description="stop generating before teacher spend would pass this")
    terms: str = Field("unknown", description="the teacher's terms of use, an id from stillhouse.terms.REGISTRY")
    parameters: int | None = Field(None, ge=1, description="the teacher's size, for reports, when it cannot be read "
                                                          "from a local checkpoint (an API teacher)")

    # Options that say how to reach the teacher, not what it answers: a stage finished through one
    # endpoint (or port, or concurrency) is still finished when the same teacher is reached another way.
    TRANSPORT_OPTIONS: ClassVar[frozenset] = frozenset({"base_url", "api_key_env", "api_key_required", "concurrency", "timeout",
                                   "max_attempts"})

    def identity(self) -> dict:
        """This teacher as a finished stage's config records it: without the transport options."""
        d = self.model_dump()
        d["options"] = {k: v for k, v in d["options"].items() if k not in self.TRANSPORT_OPTIONS}
        return d

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
    def _no_inline_keys(cls, v: dict) -> dict:
        if "api_key" in v:
            raise ValueError("put the key in an environment variable and name it with api_key_env; "
                             "a key in a recipe would be copied into the run directory")
        return v

    @field_validator("spec")
    @classmethod
    def _check_spec(cls, v: str) -> str:
        from stillhouse.teachers import parse_spec

        parse_spec(v)
        return v


def _existing_file(v: str) -> str:
    if v != "world" and not Path(v).is_file():
        raise ValueError(f"file {v!r} does not exist")
    return v


class PromptsSpec(_Strict):
    source: str = Field("world", description="'world' (the built-in task world's train split) or a .jsonl/.parquet path")
    n: int | None = Field(2000, ge=1, description="how many prompts to use (all of a file when null)")
    seed: int = 0

    _check_source = field_validator("source")(classmethod(lambda cls, v: _existing_file(v)))


class GenerationSpec(_Strict):
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = 0
    samples_per_prompt: int = Field(1, ge=1)


class StudentSpec(_Strict):
    base: str = Field(description="the student's starting model: a local HF directory, a hub name, or stillhouse:NAME")


class LoraSpec(_Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class TrainSpec(_Strict):
    method: Literal["sft"] = "sft"
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0)
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(1024, ge=8)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lora: LoraSpec | None = None


class EvaluateSpec(_Strict):
    benchmark: str = Field("world", description="'world' (the task world's held-out split) or a .jsonl with prompt/answer/family")
    n_per_family: int = Field(40, ge=1)
    max_tokens: int = Field(128, ge=1)
    seed: int = 0

    _check_benchmark = field_validator("benchmark")(classmethod(lambda cls, v: _existing_file(v)))


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
    student: StudentSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    evaluate: EvaluateSpec = Field(default_factory=EvaluateSpec)
    use: UseSpec = Field(default_factory=UseSpec)

    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def dump(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    node, line = root, None
    for key in loc:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            node = None
    return node.start_mark.line + 1 if node is not None else line


def _key_line(root: yaml.Node | None, loc: tuple) -> int | None:
    """Like `_line_of`, but for an unknown key returns the line of the key itself."""
    node = root
    for i, key in enumerate(loc):
        if not isinstance(node, yaml.MappingNode):
            return _line_of(root, loc)
        pair = next(((k, v) for k, v in node.value if k.value == key), None)
        if pair is None:
            return _line_of(root, loc[:i])
        if i == len(loc) - 1:
            return pair[0].start_mark.line + 1
        node = pair[1]
    return _line_of(root, loc)


def parse_recipe(text: str, source: str = "<recipe>", overrides: dict | None = None) -> Recipe:
    """Validate recipe text; raise StillhouseError naming the field and line on any problem."""
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise StillhouseError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(data, dict):
        raise StillhouseError(f"{source}: a recipe must be a YAML mapping of sections (name, teacher, student, ...)")
    for k, v in (overrides or {}).items():
        data[k] = v
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"])
        field = ".".join(str(p) for p in loc) or "recipe"
        line = _key_line(root, loc) if err["type"] == "extra_forbidden" else _line_of(root, loc)
        where = f"{source}:{line}" if line else source
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = _known_fields(loc[:-1])
            import difflib

            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            msg = f"unknown key{f'; did you mean {close[0]!r}?' if close else ''} (known: {', '.join(known)})"
        elif err["type"] == "missing":
            msg = "required field is missing"
        else:
            got = err.get("input")
            msg = f"{msg} (got {got!r})" if "input" in err and not isinstance(got, dict) and repr(got) not in msg else msg
        raise StillhouseError(f"{where}: {field}: {msg}") from None


def _known_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for key in loc:
        ann = model.model_fields[key].annotation
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
    return list(model.model_fields)


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read and validate a recipe file. Relative paths in it are taken relative to the current directory."""
    p = Path(path)
    if not p.is_file():
        raise StillhouseError(f"recipe file {str(p)!r} does not exist")
    return parse_recipe(p.read_text(), str(p), overrides)
