"""The embedded tiny world: tasks with verifiable answers, a local tokenizer, Atlas and the base model."""

from pathlib import Path

DEMO_RECIPE = Path(__file__).parent / "recipe.yaml"
