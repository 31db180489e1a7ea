"""Teacher and student with different tokenizers: what lines up between them, by character offsets."""

from __future__ import annotations


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers give every token the same id (then logits can be compared column by column)."""
    return a.get_vocab() == b.get_vocab()
