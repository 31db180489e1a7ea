"""Shared fixtures: tiny models built from a config (never downloaded), an isolated working dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

STILLHOUSE = [sys.executable, "-m", "stillhouse.cli"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny teacher and a tiny base (hidden 32, 2 layers, random weights) with the world's tokenizer."""
    from stillhouse.demo.build import SHAPES, make_model
    from stillhouse.demo.tokenizer import build_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = build_tokenizer()
    out = {}
    for name, seed in (("teacher", 1), ("base", 2)):
        model = make_model(SHAPES["tiny"], tok, seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def generate(recipe, run, force: bool = False, dry_run: bool = False):
    """The generate stage, as `stillhouse generate` runs it."""
    from stillhouse.stages import get_stage

    return get_stage("generate").run(recipe, run, force=force, dry_run=dry_run)


@pytest.fixture(autouse=True)
def scripted_backend():
    """The scripted teacher (tests/scripted.py) registered as the `scripted` backend, for every test."""
    from stillhouse.teachers import BACKENDS
    from tests.scripted import Scripted

    BACKENDS.register("scripted", Scripted)
    yield
    BACKENDS._items.pop("scripted", None)
