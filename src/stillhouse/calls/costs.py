"""Prices per million tokens, and the budget that stops a run before it overspends."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

# USD per million input / output tokens, from the providers' public price pages (2025).
# A recipe's `teacher.price` overrides these; an unlisted model costs 0 unless priced there.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    "deepseek-chat": (0.27, 1.10),
    "deepseek-reasoner": (0.55, 2.19),
    "claude-3-5-haiku-latest": (0.80, 4.00),
    "claude-sonnet-4-0": (3.00, 15.00),
    "gemini-2.0-flash": (0.10, 0.40),
}


@dataclass(frozen=True)
class Price:
    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


def price_for(model: str, override: dict | None = None) -> Price:
    if override:
        return Price(**override)
    return Price(*DEFAULT_PRICES.get(model, (0.0, 0.0)))


def estimate_prompt_tokens(messages, counter: Callable[[Any], int | None] | None = None) -> int:
    """The prompt tokens a budget reserves for: the teacher's own count where its backend knows its tokenizer
    (`counter`, e.g. tiktoken for OpenAI's models), else a bound that cannot undercount.

    The bound is the UTF-8 bytes (no byte-level BPE makes more tokens than bytes) plus each message's framing: about
    four times English's real count, and never under CJK text's, which characters / 3 undercounted.
    """
    if counter is not None:
        n = counter(messages)
        if n is not None:
            return n
    return sum(len(str(m.get("content") or "").encode()) + 8 for m in messages) + 3


class Budget:
    """Admits a call only if spent + reserved + this call's worst case stays within the cap.

    The worst case of a call is its estimated prompt plus `max_tokens` of output, so the
    cap holds however long the answers turn out; a finished call swaps its reservation for
    its real cost.
    """

    def __init__(self, cap_usd: float | None, spent_usd: float = 0.0):
        self.cap, self.spent, self.reserved = cap_usd, spent_usd, 0.0
        self.refused = False
        self._lock = threading.Lock()

    def admit(self, worst_case_usd: float) -> bool:
        with self._lock:
            if self.cap is not None and self.spent + self.reserved + worst_case_usd > self.cap:
                self.refused = True
                return False
            self.reserved += worst_case_usd
            return True

    def __str__(self) -> str:
        return f"${self.spent:.4f}" + (f" of ${self.cap:.2f}" if self.cap is not None else "")

    def settle(self, worst_case_usd: float, actual_usd: float) -> None:
        with self._lock:
            self.reserved -= worst_case_usd
            self.spent += actual_usd
