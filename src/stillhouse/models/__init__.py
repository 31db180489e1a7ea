"""Models: what a model reference names, and loading a local causal LM.

A reference is a local Hugging Face directory, a GGUF file (or a directory holding exactly one, turned into a Hugging
Face directory once and cached: `models/gguf.py`), a hub name, or `stillhouse:NAME` for a model shipped in a package.
Every stage, the teacher backends and the server resolve models through `resolve_model` and load them through
`load_local_lm`; this package sits below all of them and imports none of them.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Callable

from stillhouse.errors import StillhouseError
from stillhouse.registry import Registry

PACKAGES: Registry = Registry("stillhouse.packaged_models", "model package")

DTYPES = ("auto", "float32", "bfloat16", "float16")


def packaged() -> dict[str, Path]:
    """Every model shipped by an installed package (entry-point group `stillhouse.packaged_models`: a function
    returning `{name: directory}`), by the name `stillhouse:NAME` refers to it."""
    out: dict[str, Path] = {}
    for _, fn in PACKAGES:
        out.update(fn())
    return out


def resolve_model(ref: str) -> str:
    """Turn a model reference into something `from_pretrained` accepts; raise if a local one is missing.

    A GGUF file (or a directory holding one and no config.json) resolves to its dequantized Hugging Face directory,
    built on first use and cached by the file's sha256 (`stillhouse.models.gguf`)."""
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
        from stillhouse.models import gguf

        gguf_path = gguf.find_gguf(p)
        if gguf_path is not None:
            return str(gguf.materialize(gguf_path))
        if not p.is_dir():
            raise StillhouseError(f"{ref!r} is a file, not a Hugging Face model directory or a .gguf file")
        if not (p / "config.json").is_file():
            raise StillhouseError(f"{ref!r} is not a Hugging Face model directory (no config.json) and holds no "
                                  f".gguf file")
        return str(p)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1 or ref.endswith(".gguf"):
        raise StillhouseError(f"model {'file' if ref.endswith('.gguf') else 'directory'} {ref!r} does not exist")
    return ref  # a hub name such as Qwen/Qwen2.5-0.5B; from_pretrained fetches it where the hub is reachable


def backend_spec(model: str) -> str:
    """The backend spec a recipe's model string means: a local directory or GGUF file, a packaged `stillhouse:NAME`
    or a hub name (no backend prefix) through the in-process `hf` backend; anything else is `BACKEND:MODEL` as
    given."""
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


# -- loading a local model -------------------------------------------------------------------------------------------

def pick_device(requested: str | None = None) -> str:
    import torch

    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is not readable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def compute_dtype(device: str, requested: str = "auto") -> tuple[str, str]:
    """(dtype name, why) for running a model on `device`.

    "auto" chooses by what the hardware does fast, never by the checkpoint's storage dtype:
    a CPU without native bf16 (no AVX512-BF16 / AMX, no ARM BF16) runs a bf16 matmul about
    100x slower than fp32, so there the answer is float32 even for a bf16 checkpoint.
    """
    if requested != "auto":
        return requested, "asked for"
    forced = os.environ.get("STILLHOUSE_DTYPE")
    if forced:  # one switch for every local model of a run, the served teacher's process included
        if forced not in DTYPES[1:]:
            raise StillhouseError(f"STILLHOUSE_DTYPE must be one of {', '.join(DTYPES[1:])}, not {forced!r}")
        return forced, "STILLHOUSE_DTYPE"
    if device.startswith("cuda"):
        import torch

        if torch.cuda.is_bf16_supported():
            return "bfloat16", "this GPU has native bf16"
        return "float32", "this GPU has no native bf16"
    if device == "cpu":
        flags = cpu_flags()
        native = sorted(flags & {"avx512_bf16", "amx_bf16", "bf16"})
        if native:
            return "bfloat16", f"this CPU has native bf16 ({', '.join(native)})"
        return "float32", "this CPU has no native bf16"
    return "float32", f"no bf16 rule for device {device!r}"


def load_local_lm(model: str, device: str, dtype: str = "auto", log: Callable[[str], None] | None = None,
                  quantize: str = "none"):
    """(tokenizer with a pad token, causal LM in eval mode on `device`, weights fingerprint or None) for a local
    model directory, a GGUF file, `stillhouse:NAME`, or a hub name where reachable; the compute dtype fits the
    hardware (`compute_dtype`), and the choice is logged. `quantize="int8"` (or "int4") stores every linear layer's
    weight as int8 (int4) (`stillhouse.models.quantize`) and computes in bfloat16; the fingerprint says so."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, why = quantized_dtype(device, dtype, quantize)
    src = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(src)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, name)).to(device).eval()
    if log is None:
        from stillhouse.ui import console

        log = console.print
    fingerprint = dir_fingerprint(Path(src)) if Path(src).exists() else None
    if quantize != "none":
        from stillhouse.models.quantize import quantize as quantize_model

        counts = quantize_model(lm, quantize)
        why += "; linear layers' weights in " + ", ".join(f"{k} ({v})" for k, v in counts.items() if v)
        fingerprint = fingerprint and f"{fingerprint}-{quantize}"
    log(f"[dim]{model}: computing in {name} on {device} ({why})[/]")
    return tokenizer, lm, fingerprint


def quantized_dtype(device: str, dtype: str = "auto", quantize: str = "none") -> tuple[str, str]:
    """`compute_dtype`, where int8 (int4) weights need 16-bit activations: PyTorch's int8-weight kernel
    in float32 ran ~10-30x slower than a float32 matmul here, so float32 is refused and auto means bfloat16."""
    from stillhouse.models.quantize import METHODS

    if quantize not in METHODS:
        raise StillhouseError(f"--quantize must be one of {', '.join(METHODS)}, not {quantize!r}")
    if quantize == "none":
        return compute_dtype(device, dtype)
    name, why = compute_dtype(device, dtype)
    if dtype == "auto" and name != "bfloat16":
        return "bfloat16", f"{quantize} weights compute in bf16 ({why}: slower than where bf16 is native)"
    if name == "float32":
        raise StillhouseError(f"--quantize {quantize} computes in bfloat16 (or float16); it cannot be combined with "
                              "--dtype float32")
    if quantize == "int4" and name != "bfloat16":
        raise StillhouseError(f"--quantize int4 computes in bfloat16; it cannot be combined with --dtype {name}")
    return name, why


def dir_fingerprint(path: Path) -> str | None:
    """A short hash of a model directory's weights, standing in for a server's system_fingerprint.

    The first MiB of each weights file (its header and first tensors) and 32 slices spread
    through the rest: reading whole checkpoints would take minutes for large models, and a
    fine-tune changes weights everywhere, so the slices see it.
    """
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            for k in range(32):
                fh.seek(size * k // 32)
                h.update(fh.read(1 << 16))
    return "fp_" + h.hexdigest()[:12]
