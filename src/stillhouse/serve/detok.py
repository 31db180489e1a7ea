"""Streaming detokenization: the text a growing token sequence adds, token by token."""

from __future__ import annotations


class IncrementalText:
    """A growing token sequence's text, decoding only a few recent ids per new token.

    Decoding the whole sequence at every token is quadratic in its length. As text-generation-
    inference and vLLM do, this decodes the ids from `prefix` on twice (without and with the new
    ones) and keeps the difference: starting a little before the new ids lets tokenizers that
    treat a sequence's first token specially (SentencePiece's leading space) decode it as they
    would in context. A trailing U+FFFD means a character whose bytes are split across tokens:
    it waits for the rest (or for `finish`, which takes whatever is left).
    """

    def __init__(self):
        self.prefix = self.read = 0
        self.text = ""

    def add(self, tokenizer, ids: list[int]) -> str:
        """The text that `ids` (the full sequence so far) adds; empty while a character is incomplete."""
        before = tokenizer.decode(ids[self.prefix:self.read], skip_special_tokens=True)
        now = tokenizer.decode(ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(ids)
        self.text += now[len(before):]
        return now[len(before):]

    def finish(self, tokenizer, ids: list[int]) -> str:
        """Whatever text is still held back, at the end of the sequence."""
        before = tokenizer.decode(ids[self.prefix:self.read], skip_special_tokens=True)
        now = tokenizer.decode(ids[self.prefix:], skip_special_tokens=True)
        self.prefix = self.read = len(ids)
        tail = now[len(before):] if now.startswith(before) else ""
        self.text += tail
        return tail
