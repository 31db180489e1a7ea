"""The run directory and its stage manifests.

A stage's output counts as finished only when its manifest exists, and the manifest is
written last (atomically), after every artifact. Starting a stage first removes its old
manifest, so a stage killed half-way is never mistaken for a finished one. A finished stage
is skipped when its inputs' hashes and its config are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def tagged_hash(obj: Any) -> str:
    """`sha256:<hex>` of the canonical JSON of `obj`."""
    return "sha256:" + hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def hash_path(path: str | Path) -> str:
    """`sha256:<hex>` over a file, or over every file of a directory (names and bytes, sorted)."""
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and "_trainer" not in f.parts)
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def atomic_write_text(path: str | Path, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


class RunDir:
    """`runs/<name>/`: artifacts at the paths design.md names, manifests under `stages/`."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    recipe = property(lambda self: self.root / "recipe.yaml")
    ledger = property(lambda self: self.root / "ledger.db")
    generated = property(lambda self: self.root / "data" / "generated.parquet")
    student = property(lambda self: self.root / "student")
    curated = property(lambda self: self.root / "data" / "curated.parquet")
    results = property(lambda self: self.root / "eval" / "results.json")
    samples = property(lambda self: self.root / "eval" / "samples.jsonl")
    report = property(lambda self: self.root / "report.html")

    def student_dir(self, name: str) -> Path:
        """Where student `name` is saved: `student/` for the one named "student", else `students/<name>/`."""
        return self.student if name == "student" else self.root / "students" / name

    def manifest_path(self, stage: str) -> Path:
        return self.root / "stages" / f"{stage}.json"

    def manifest(self, stage: str) -> dict | None:
        p = self.manifest_path(stage)
        try:
            return json.loads(p.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def is_done(self, stage: str, inputs: dict, config: Any) -> bool:
        """True when `stage` finished earlier with these inputs and this config."""
        m = self.manifest(stage)
        return bool(m) and m.get("inputs") == inputs and m.get("config_hash") == tagged_hash(config)

    def begin(self, stage: str) -> float:
        """Mark `stage` as not finished (remove its manifest) and return the start time."""
        self.manifest_path(stage).unlink(missing_ok=True)
        return time.time()

    def finish(self, stage: str, started: float, inputs: dict, config: Any, outputs: dict, counts: dict,
               extra: dict | None = None) -> dict:
        """Write the stage's manifest, last, after every artifact is in place.

        `outputs` maps an artifact name to a path or a list of paths; the manifest records a hash of each.
        """
        m = {
            "stage": stage, "inputs": inputs, "config": config, "config_hash": tagged_hash(config),
            "outputs": {k: _hash_output(v) for k, v in outputs.items()},
            "paths": {k: [str(Path(p).relative_to(self.root)) if Path(p).is_relative_to(self.root) else str(p)
                          for p in (v if isinstance(v, list) else [v])] for k, v in outputs.items()},
            "counts": counts, "started": started, "finished": time.time(), "seconds": round(time.time() - started, 2),
            **(extra or {}),
        }
        atomic_write_text(self.manifest_path(stage), json.dumps(m, indent=2, default=str) + "\n")
        return m

    def manifests(self) -> list[dict]:
        """Every finished stage's manifest, in the order the stages started."""
        found = []
        for p in sorted((self.root / "stages").glob("*.json")):
            m = self.manifest(p.stem)
            if m is not None:
                found.append(m)
        return sorted(found, key=lambda m: m.get("started", 0))

    def timings(self) -> dict[str, float]:
        return {m["stage"]: m["seconds"] for m in self.manifests()}


def _hash_output(v) -> str:
    if isinstance(v, list):
        return tagged_hash([hash_path(p) for p in v])
    return hash_path(v)
