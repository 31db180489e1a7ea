"""Teachers' terms of use, and whether a recipe's declared use of the student fits them.

Summaries for orientation, not legal advice: each entry links its source. A recipe names the
teacher's terms and its intended use; a conflict stops the run unless the recipe sets
`use.override_terms_conflict: true`, which is then written into the dataset and model cards.
"""

from __future__ import annotations

from dataclasses import dataclass

USES = ("research", "internal", "commercial", "open-weights")


@dataclass(frozen=True)
class Terms:
    id: str
    name: str
    url: str
    allows: frozenset[str]
    note: str


REGISTRY: dict[str, Terms] = {t.id: t for t in [
    Terms("openai-terms", "OpenAI Terms of Use", "https://openai.com/policies/terms-of-use",
          frozenset({"research"}), "forbids using output to develop models that compete with OpenAI"),
    Terms("anthropic-commercial-terms", "Anthropic Commercial Terms of Service", "https://www.anthropic.com/legal/commercial-terms",
          frozenset({"research"}), "forbids using the services to build a competing product, including training competing models"),
    Terms("gemini-api-terms", "Gemini API Additional Terms of Service", "https://ai.google.dev/gemini-api/terms",
          frozenset({"research"}), "forbids using the services to develop models that compete with Gemini"),
    Terms("llama-3.1-community", "Llama 3.1 Community License", "https://www.llama.com/llama3_1/license/",
          frozenset(USES), "allows training other models on outputs; derived models must say 'Built with Llama' and start their name with 'Llama'"),
    Terms("deepseek-mit", "DeepSeek-R1 (MIT License)", "https://github.com/deepseek-ai/DeepSeek-R1/blob/main/LICENSE",
          frozenset(USES), "MIT; the model card explicitly permits distillation"),
    Terms("apache-2.0", "Apache License 2.0", "https://www.apache.org/licenses/LICENSE-2.0",
          frozenset(USES), "permissive; keep the licence and notices"),
    Terms("mit", "MIT License", "https://opensource.org/license/mit", frozenset(USES), "permissive; keep the notice"),
    Terms("unknown", "Unknown terms", "", frozenset({"research", "internal"}),
          "the teacher's terms were not declared; check them before any commercial or open release"),
]}


def check_use(terms_id: str, use: str, override: bool) -> str | None:
    """None if `use` fits the terms; else the conflict, as a sentence. Raises KeyError for unknown ids."""
    t = REGISTRY[terms_id]
    if use in t.allows:
        return None
    msg = f"the declared use {use!r} conflicts with the teacher's terms {t.name!r} ({t.note}; {t.url or 'no source'})"
    return msg if not override else None
