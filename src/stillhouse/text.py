"""Text similarity every stage may use: one tokenizer for any script and rouge-score's ROUGE-L over its tokens.

Curation's novelty filter (self-instruct's ROUGE-L gate) and the audit's provenance test both compare texts by
ROUGE-L; the code lives below both so that neither stage imports the other.
"""

from __future__ import annotations

import re
from typing import Literal

from rouge_score import rouge_scorer, tokenizers

TokenizerName = Literal["rouge", "unicode"]


class UnicodeTokenizer(tokenizers.Tokenizer):
    """rouge-score's tokenizer for any script: lower-cased letter/digit runs, each CJK character its own token.

    rouge-score's default tokenizer keeps only [a-z0-9] and so reads a Chinese or Japanese
    instruction as empty (never similar to anything); this one is for such data.
    """

    _TOKEN = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self._TOKEN.findall(text.lower())


def make_tokenizer(name: TokenizerName = "rouge") -> tokenizers.Tokenizer:
    """The tokenizer both the index and ROUGE-L use: rouge-score's default (as Alpaca: no stemming) or `unicode`."""
    if name == "rouge":
        return tokenizers.DefaultTokenizer(use_stemmer=False)
    if name == "unicode":
        return UnicodeTokenizer()
    raise ValueError(f"unknown tokenizer {name!r} (known: rouge, unicode)")


def rouge_l(a: list[str], b: list[str]) -> float:
    """ROUGE-L F-measure of two token lists, computed by rouge-score (symmetric in a and b)."""
    # rouge-score's scorer re-tokenizes both texts on every call; its LCS scorer on tokens made once is what
    # Alpaca's generate_instruction.py calls too.
    return rouge_scorer._score_lcs(a, b).fmeasure
