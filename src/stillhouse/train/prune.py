"""Depth pruning: a smaller student initialised from a subset of its teacher's decoder layers.

DistilBERT started its student from every other layer of BERT; Minitron and ShortGPT drop whole blocks of a
Llama's layers (the late-middle ones matter least) and retrain briefly. `prune_layers` does the first half of
that: it copies the embeddings, the kept layers (renumbered), the final norm and the head of any local causal LM
with a `model.layers` stack (Llama, Qwen2, Mistral, SmolLM...) into a new Hugging Face directory, with the
tokenizer and `stillhouse_prune.json` (the source, its fingerprint, the layers kept, the sizes). Training on the
teacher's data is the other half (`stillhouse train`).

`stillhouse prune SRC --layers 0-7,22-29 --out DIR` from the command line; the real job (`stillhouse real`) makes its
student this way. A directory already holding the same pruning of the same source is reused, not rebuilt.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import typer

from stillhouse.errors import StillhouseError

MANIFEST = "stillhouse_prune.json"


def parse_layers(spec: str | list[int], n_layers: int) -> list[int]:
    """`"0-7,22-29"` (or a list of ints) as a sorted list of distinct layer indices, each checked against the
    source's `n_layers`."""
    if isinstance(spec, str):
        out: list[int] = []
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            try:
                if "-" in part:
                    a, b = (int(x) for x in part.split("-", 1))
                    out += list(range(a, b + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise StillhouseError(f"--layers: {part!r} is not a layer index or a range such as 0-7") from None
    else:
        out = [int(x) for x in spec]
    layers = sorted(set(out))
    if not layers:
        raise StillhouseError("--layers: keep at least one layer")
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise StillhouseError(f"--layers: {bad} out of range; the source has layers 0-{n_layers - 1}")
    return layers


def _manifest_for(source: str, fingerprint: str | None, layers: list[int]) -> dict:
    return {"source": source, "source_fingerprint": fingerprint, "layers": layers}


def prune_layers(source: str, out: Path, layers: str | list[int], log=print) -> dict:
    """Write a copy of `source` that keeps only `layers` to `out` (atomically); return its manifest.

    Reused when `out` already holds the same layers of the same source (by the source's weights fingerprint)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from stillhouse.models import dir_fingerprint, resolve_model

    src = resolve_model(source)
    config = AutoConfig.from_pretrained(src)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        raise StillhouseError(f"{source}: its config has no num_hidden_layers; depth pruning needs a decoder stack")
    keep = parse_layers(layers, n)
    fingerprint = dir_fingerprint(Path(src))
    want = _manifest_for(source, fingerprint, keep)
    out = Path(out)
    done = out / MANIFEST
    if done.is_file():
        have = json.loads(done.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            log(f"[dim]{out}: already holds layers {_ranges(keep)} of {source}; reused[/]")
            return have
        raise StillhouseError(f"{out} holds another pruning ({have.get('source')}, layers {have.get('layers')}); "
                              "choose another --out or remove it")
    if out.exists() and any(out.iterdir()):
        raise StillhouseError(f"{out} exists and is not a pruned model this command wrote; choose another --out")

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    stack = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(stack, torch.nn.ModuleList) or len(stack) != n:
        raise StillhouseError(f"{source}: no `model.layers` stack of {n} layers to prune ({type(model).__name__})")
    before = sum(p.numel() for p in model.parameters())
    model.model.layers = torch.nn.ModuleList([stack[i] for i in keep])
    for new_idx, layer in enumerate(model.model.layers):  # the KV cache is indexed by each attention's layer_idx
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
    model.config.num_hidden_layers = len(keep)
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    after = sum(p.numel() for p in model.parameters())

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)
        manifest = {**want, "source_layers": n, "kept": len(keep), "parameters": after, "source_parameters": before,
                    "method": "depth pruning: embeddings, the kept decoder layers in order, final norm and head copied"}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()  # empty (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"pruned {source}: layers {_ranges(keep)} of {n} kept, {before / 1e6:.1f}M -> {after / 1e6:.1f}M parameters "
        f"-> {out}")
    return manifest


def _ranges(layers: list[int]) -> str:
    parts, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            parts.append(f"{start}-{x}" if x != start else str(x))
            start = None
    return ",".join(parts)


def add_commands(app: typer.Typer) -> None:
    @app.command("prune")
    def prune(source: str = typer.Argument(..., help="the model to prune: a local HF directory, a .gguf file, "
                                                      "stillhouse:NAME or a hub name"),
              layers: str = typer.Option(..., help="decoder layers to keep, e.g. 0-7,22-29 (0-based)"),
              out: Path = typer.Option(..., help="directory to write the pruned model to")) -> None:
        """Depth-prune a causal LM: a smaller student initialised from a subset of its layers (as DistilBERT and
        Minitron start theirs); train it on the teacher's data afterwards."""
        from stillhouse.ui import console

        prune_layers(source, out, layers, log=console.print)
