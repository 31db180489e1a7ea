"""GGUF files as models: dequantized once into a Hugging Face directory, cached by the file's sha256.

Every consumer of a model (the engine, training, the audit's white-box tests, parameter counts, fingerprints) reads a
Hugging Face directory, so a GGUF file becomes one: transformers' own GGUF support parses the file, dequantizes its
tensors and rebuilds its tokenizer and chat template (`from_pretrained(..., gguf_file=...)`), and the result is saved
with `save_pretrained` under `$STILLHOUSE_CACHE/gguf/<sha256[:16]>/` (default `~/.cache/stillhouse/gguf/...`). What is
written here by hand is only the cache discipline: the key, the atomic publish, and the record of where it came from.

The directory is built in a temporary directory beside it and renamed into place, so a run killed mid-conversion
leaves at most a temporary directory (cleaned up by a later conversion), never a half-written cache; a cache is used
only when its `stillhouse_gguf.json` names the same sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from stillhouse.errors import StillhouseError

MARKER = "stillhouse_gguf.json"
FORMAT = 1  # bumped when a conversion would come out differently: older caches are then rebuilt
GGUF_MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'stillhouse[gguf]'"

_sha_memo: dict[tuple, str] = {}


def cache_root() -> Path:
    """Where converted GGUF models live: `$STILLHOUSE_CACHE/gguf`, else `$XDG_CACHE_HOME/stillhouse/gguf`, else
    `~/.cache/stillhouse/gguf`."""
    base = os.environ.get("STILLHOUSE_CACHE")
    if base:
        return Path(base).expanduser() / "gguf"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "stillhouse" / "gguf"


def find_gguf(p: Path) -> Path | None:
    """The GGUF file `p` names: `p` itself when it is a `.gguf` file, or the one `.gguf` file in a directory that is
    not a Hugging Face directory (no config.json); None when `p` is neither."""
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(f for f in p.iterdir() if f.suffix.lower() == ".gguf" and f.is_file())
        if len(found) > 1:
            raise StillhouseError(f"{str(p)!r} holds {len(found)} .gguf files ({', '.join(f.name for f in found)}); "
                                  f"name the one to use")
        return found[0] if found else None
    return None


def file_sha256(path: Path) -> str:
    """The file's sha256, computed once per process for a file that has not changed (a multi-GB file takes seconds,
    and one run resolves the same model several times)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _sha_memo:
        with open(path, "rb") as fh:
            _sha_memo[key] = hashlib.file_digest(fh, "sha256").hexdigest()
    return _sha_memo[key]


def _complete(d: Path, sha: str) -> bool:
    try:
        record = json.loads((d / MARKER).read_text())
        return record["sha256"] == sha and record.get("format") == FORMAT and (d / "config.json").is_file()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def materialize(path: Path, log=None) -> Path:
    """The Hugging Face directory holding the GGUF file at `path`, dequantized: from the cache when it is there,
    else converted now (once; later calls, in any process, reuse it)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as e:
        raise StillhouseError(f"cannot read GGUF file {str(path)!r}: {e.strerror or e}") from None
    if magic != GGUF_MAGIC:
        raise StillhouseError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")
    sha = file_sha256(path)
    out = cache_root() / sha[:16]
    if _complete(out, sha):
        return out
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise StillhouseError(f"loading the GGUF file {str(path)!r} needs the gguf package: {INSTALL_HINT}")
    if log is None:
        from stillhouse.ui import console

        log = console.print
    log(f"[dim]{path.name}: dequantizing into a Hugging Face directory at {out} (once; cached by its sha256)[/]")
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared $STILLHOUSE_CACHE from its other users
        (tmp / ".pid").write_text(str(os.getpid()))
        _convert(path, tmp, sha)
        (tmp / ".pid").unlink()
        _publish(tmp, out, sha)
    except OSError as e:  # a read-only home, a full disk
        raise StillhouseError(f"cannot write the model converted from {str(path)!r} to {str(out.parent)!r} "
                              f"({e.strerror or e}); set STILLHOUSE_CACHE to a writable directory with room") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when it was published
    return out


def _publish(tmp: Path, out: Path, sha: str) -> None:
    """Rename the finished `tmp` to `out` in one step; another process that finished first wins, and a damaged
    directory at `out` is replaced."""
    try:
        os.rename(tmp, out)
        return
    except OSError:
        if _complete(out, sha):  # another process converted the same file meanwhile
            return
    stale = out.with_name(f".{out.name}.stale.{os.getpid()}")
    os.rename(out, stale)
    shutil.rmtree(stale, ignore_errors=True)
    os.rename(tmp, out)


def _remove_abandoned(root: Path) -> None:
    """Temporary directories of conversions whose process is gone (killed mid-way)."""
    for d in root.glob(".*.*"):
        try:
            pid = int((d / ".pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            pass  # still running, another user's, or not ours to judge


def _storage_dtype(path: Path) -> tuple[str, list[str]]:
    """(dtype the dequantized weights are saved in, the file's tensor types).

    A file of plain floats keeps its own type (exact). Block-quantized weights are a float16 scale times a small
    integer (plus a float16 offset), so float16 holds them to well under one quantization step at half float32's
    size; `_convert` checks that every value fit, and falls back to float32 when one did not.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 -- any parse failure means the same thing to the user
        raise StillhouseError(f"{str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    types = sorted({t.tensor_type.name for t in reader.tensors})
    floats = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    if not types:
        raise StillhouseError(f"GGUF file {str(path)!r} holds no tensors")
    if set(types) <= set(floats):
        return ("bfloat16" if "BF16" in types else "float16" if "F16" in types else "float32"), types
    return "float16", types


def _convert(path: Path, out: Path, sha: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype, types = _storage_dtype(path)
    try:
        from transformers import GgufConfig

        # dequantize=True: dense weights, and transformers drops the quantization config after loading, which is
        # what makes the model serializable (packed GGUF weights are not: "quantized with gguf and is not
        # serializable").
        quant = {"quantization_config": GgufConfig(dequantize=True)}
    except ImportError:  # older transformers: GGUF weights are always dequantized and carry no quantizer
        quant = {}
    where, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
        lm = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=getattr(torch, dtype), **quant)
        if dtype == "float16" and not all(torch.isfinite(p).all() for p in lm.parameters()):
            dtype = "float32"
            lm = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32, **quant)
    except ImportError as e:  # e.g. a gguf package older than transformers needs
        raise StillhouseError(f"loading the GGUF file {str(path)!r} needs a newer gguf package ({e}): "
                              f"{INSTALL_HINT}") from None
    except Exception as e:  # noqa: BLE001 -- unsupported architecture, damaged tensors: one message naming the file
        raise StillhouseError(f"cannot load GGUF file {str(path)!r} through transformers "
                              f"({type(e).__name__}: {e})") from None
    quantizer = getattr(lm, "hf_quantizer", None)
    if quantizer is not None:  # the weights are dense already; only the markers that refuse saving are left
        quantizer.remove_quantization_config(lm)
    lm.save_pretrained(out)
    tokenizer.save_pretrained(out)
    import transformers

    record = {"source": str(path.resolve()), "sha256": sha, "size": path.stat().st_size, "dtype": dtype,
              "gguf_tensor_types": types, "architecture": lm.config.model_type, "format": FORMAT,
              "transformers": transformers.__version__}
    (out / MARKER).write_text(json.dumps(record, indent=1) + "\n")
