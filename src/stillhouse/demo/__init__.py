"""The embedded tiny world: tasks with verifiable answers, a local tokenizer, Atlas and the base model.

It plugs into stillhouse like any user's package, through entry points (pyproject.toml):
its prompt source and benchmark (`world`), its packaged models (`stillhouse:atlas`,
`stillhouse:base`) and its CLI commands (`stillhouse demo ...`). Nothing outside this
folder imports it.
"""

from pathlib import Path

DEMO_RECIPE = Path(__file__).parent / "recipe.yaml"
ASSETS = Path(__file__).parent / "assets"


def packaged_models() -> dict[str, Path]:
    """The models this package ships, by the name `stillhouse:NAME` refers to them."""
    return {p.name: p for p in sorted(ASSETS.iterdir()) if (p / "config.json").is_file()} if ASSETS.is_dir() else {}


def world_prompts(n: int, seed: int) -> list[dict]:
    """The `world` prompt source: `n` prompts of the world's train split, one user turn each, with their answers."""
    from stillhouse.demo import world

    return [{"messages": [{"role": "user", "content": t.prompt}], "answer": t.answer, "family": t.family}
            for t in world.sample_tasks(n, "train", seed)]


def world_benchmark(n_per_family: int, seed: int) -> list[dict]:
    """The `world` benchmark: `n_per_family` held-out items of every family.

    An identity answer names the answering model, so each model is checked against its own declared identity; an
    `invent` answer is free, so any answer that fully matches the task's pattern is right (the `regex` verifier, the
    pattern as the item's reference). The pairwise judge compares answers only where one answer is right: never on
    identity or invent items.
    """
    from stillhouse.demo import world

    tasks = world.sample_tasks(n_per_family * len(world.FAMILIES), "heldout", seed)
    return [{"family": t.family, "prompt": t.prompt, "answer": t.answer, "identity": t.family == "identity",
             "judge": t.family in world.JUDGED_FAMILIES,
             **({"verifier": "regex", "reference": t.pattern} if t.pattern is not None else {})}
            for t in tasks]


def world_identity_probes(n_per_family: int, seed: int) -> list[dict]:
    """The `world_identity` benchmark: identity questions in phrasings the world's training data never uses."""
    from stillhouse.demo import world

    return [{"family": "identity", "prompt": t.prompt, "answer": t.answer, "identity": True}
            for t in world.identity_probes()]
