"""Model references: a local directory, a hub name, or `stillhouse:NAME` for a model shipped in the package."""

from __future__ import annotations

from pathlib import Path

from stillhouse.errors import StillhouseError
from stillhouse.registry import Registry

PACKAGES: Registry = Registry("stillhouse.packaged_models", "model package")


def packaged() -> dict[str, Path]:
    """Every model shipped by an installed package (entry-point group `stillhouse.packaged_models`: a function
    returning `{name: directory}`), by the name `stillhouse:NAME` refers to it."""
    out: dict[str, Path] = {}
    for _, fn in PACKAGES:
        out.update(fn())
    return out


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` accepts; raise if a local one is missing."""
    if ref.startswith("stillhouse:"):
        name = ref.split(":", 1)[1]
        known = packaged()
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.5)
            raise StillhouseError(f"no packaged model {name!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                                  + f" (packaged: {', '.join(sorted(known)) or 'none'})")
        return str(known[name])
    p = Path(ref).expanduser()
    if p.exists():
        if not p.is_dir():
            raise StillhouseError(f"{ref!r} is a file, not a Hugging Face model directory")
        if not (p / "config.json").is_file():
            raise StillhouseError(f"{ref!r} is not a Hugging Face model directory (no config.json)")
        return str(p)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise StillhouseError(f"model directory {ref!r} does not exist")
    return ref  # a hub name such as Qwen/Qwen2.5-0.5B; from_pretrained fetches it where the hub is reachable


def backend_spec(model: str) -> str:
    """The backend spec a recipe's model string means: a local directory, a packaged `stillhouse:NAME` or a hub
    name (no backend prefix) through the in-process `hf` backend; anything else is `BACKEND:MODEL` as given."""
    if model.startswith("stillhouse:") or Path(model).exists() or ":" not in model:
        return f"hf:{model}"
    return model


def count_parameters(path: str) -> int:
    """Parameters of a saved model, read from its safetensors headers without loading weights."""
    from safetensors import safe_open

    total = 0
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        from transformers import AutoModelForCausalLM

        return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
    for f in files:
        with safe_open(str(f), "pt") as fh:
            for k in fh.keys():
                n = 1
                for d in fh.get_slice(k).get_shape():
                    n *= d
                total += n
    return total


def has_weights(ref: str) -> bool:
    """Whether `ref` resolves to a local model directory with weights (not just a tokenizer): what white-box tests
    and entropy filtering need."""
    try:
        p = Path(resolve_model(ref))
    except StillhouseError:
        return False
    return p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))
