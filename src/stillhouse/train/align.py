"""Teacher and student with different tokenizers: what lines up between them, by character offsets.

Two tokenizers cut the same answer into different tokens, so their next-token distributions are over different
things and cannot be compared column by column. They can be compared where both cut the text at the same character:
there both models predict what comes next after the same prefix, and each distribution says how likely every next
*character* is (the sum over its tokens that begin with that character). Distilling that next-character marginal is
exact for what the two share (a coarse-graining of each model's distribution, so by the data-processing inequality a
lower bound on any divergence between them), needs no mapping between vocabularies, and is differentiable for the
student. TRL's GOLD trainer aligns by byte offsets too, but its ULD loss compares the two distributions' *sorted*
probabilities, pairing tokens of unrelated meaning; the character marginal compares the same events.

What still applies between different tokenizers: cross-entropy on the student's own tokenization of every answer,
and the divergence at the positions where both tokenizers start a token (the counts say how many). The student's
logits are built in full on this path (the teacher's marginals are computed once, before training).
"""

from __future__ import annotations

import math

import torch

from stillhouse.errors import StillhouseError

_EPS = 1e-9  # floor on a character's probability: a character one model never starts a token with


def same_vocabulary(a, b) -> bool:
    """Whether two tokenizers give every token the same id (then logits can be compared column by column)."""
    return a.get_vocab() == b.get_vocab()


class Characters:
    """The first character of every token of two tokenizers, as one index: `group(k)` maps each token id of the k-th
    tokenizer to the index of the character its text begins with. Index 0 is "anything else": special tokens, and
    characters only one of the tokenizers starts a token with (a byte-level BPE's tokens for the bytes of a multi-byte
    character decode alone to U+FFFD, which a character-level tokenizer never says); both sides coarse-grain the same
    way, so the distributions stay comparable."""

    def __init__(self, *toks):
        firsts = [self._firsts(t) for t in toks]
        chars = sorted(set.intersection(*({c for c in f if c} for f in firsts)))
        self.chars = ["", *chars]
        index = {c: i for i, c in enumerate(self.chars)}
        self._groups = [torch.tensor([index.get(c, 0) for c in f], dtype=torch.long) for f in firsts]

    @staticmethod
    def _firsts(tok) -> list[str]:
        special = set(tok.all_special_ids)
        out = []
        for i in range(len(tok)):
            s = "" if i in special else tok.decode([i])
            out.append(s[:1])
        return out

    def group(self, k: int) -> torch.Tensor:
        """The character index of each token of the k-th tokenizer given to the constructor."""
        return self._groups[k]

    def __len__(self) -> int:
        return len(self.chars)


def char_logprobs(logits: torch.Tensor, group: torch.Tensor, n: int) -> torch.Tensor:
    """[T, V] logits → [T, n] log-probabilities of the next token's first character (`group`: each token's)."""
    v = min(logits.shape[-1], group.shape[0])  # (embedding rows past the tokenizer: never a real token)
    p = logits[..., :v].float().softmax(-1)
    m = p.new_zeros(*p.shape[:-1], n).index_add_(-1, group[:v].to(p.device), p)
    return m.clamp(min=_EPS).log()


def token_starts(tok, ids: list[int], start: int, content: str) -> dict[int, int]:
    """Character offset in `content` → position in `ids` of the token that begins there, for the answer's tokens from
    `start` (the chat template's tokens after the answer are not part of its text and are left out)."""
    out, prev = {}, 0
    for j in range(start, len(ids)):
        text = tok.decode(ids[start:j + 1], skip_special_tokens=True)
        if not content.startswith(text):
            break
        if len(text) > prev:
            out.setdefault(prev, j)
        prev = len(text)
        if prev >= len(content):
            break
    return {c: j for c, j in out.items() if c < len(content)}


def cross_tokenizer_setup(tok, t_tok, encoded: list[tuple[list[int], int]], rows: list[dict], kd: dict,
                          teacher: str, device):
    """For `sft`: the dataset, trainer class, extra arguments and counts of KD from a teacher with another tokenizer.

    `encoded`: each sample's student token ids and where its answer starts; `rows`: the samples (`messages`). The
    teacher reads each conversation through its own tokenizer and chat template once, here; its next-character
    marginals at the positions where both tokenizers start a token become the targets."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from stillhouse.train.sft import _encode

    chars = Characters(tok, t_tok)
    t_group = chars.group(1)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).to(device).eval()
    data, aligned_tokens, answer_tokens, samples_aligned = [], 0, 0, 0
    for (ids, n), r in zip(encoded, rows):
        content = r["messages"][-1]["content"]
        t_ids, t_n = _encode(t_tok, r["messages"])
        s_at = token_starts(tok, ids, n, content)
        t_at = token_starts(t_tok, t_ids, t_n, content)
        shared = sorted(set(s_at) & set(t_at))
        targets: list[list[float]] = [[] for _ in ids[n:]]
        if shared:
            with torch.no_grad():
                logits = model(torch.tensor([t_ids], device=device)).logits[0]
            lp = char_logprobs(logits[[t_at[c] - 1 for c in shared]], t_group, len(chars)).cpu()
            for c, row in zip(shared, lp):
                targets[s_at[c] - n] = row.tolist()
            samples_aligned += 1
        aligned_tokens += len(shared)
        answer_tokens += len(s_at)
        data.append({"input_ids": ids, "labels": [-100] * n + ids[n:], "kd_chars": targets})
    del model
    if samples_aligned == 0:
        raise StillhouseError("train.kd.source teacher: the teacher's and the student's tokenizers never start a token "
                              "at the same character of any answer; method: sft learns from the text alone")
    counts = {"source": "teacher", "vocabulary": f"different (student {len(tok)} tokens, teacher {len(t_tok)}; "
                                                  "aligned by character offsets, next-character distributions)",
              "samples": len(encoded), "samples_aligned": samples_aligned, "tokens_with_teacher_distribution": aligned_tokens,
              "answer_tokens": answer_tokens, "shared_token_strings": len(set(tok.get_vocab()) & set(t_tok.get_vocab())),
              "characters": len(chars) - 1}
    return Dataset.from_list(data), cross_trainer_class(), {"kd": kd, "group": chars.group(0), "n_chars": len(chars)}, counts


def char_kd_loss_sum(logits: torch.Tensor, targets: torch.Tensor, t_chars: torch.Tensor, group: torch.Tensor, *,
                     loss: str, alpha: float, beta: float = 0.5) -> torch.Tensor:
    """Summed per-token loss: `logits` [T, V] the student's, `targets` [T] its tokens, `t_chars` [T, C] the teacher's
    next-character log-probabilities (a row of -inf: no teacher target there). A token with a target costs
    (1 - alpha) * cross-entropy + alpha * divergence between the two next-character distributions; others,
    cross-entropy alone."""
    logq = logits.float().log_softmax(-1)
    ce = -logq.gather(1, targets[:, None])[:, 0]
    has = torch.isfinite(t_chars).all(-1)
    if alpha == 0 or not bool(has.any()):
        return ce.sum()
    lq = char_logprobs(logits[has], group, t_chars.shape[-1])
    lp = t_chars[has]
    if loss == "forward_kl":
        d = (lp.exp() * (lp - lq)).sum(-1)
    elif loss == "reverse_kl":
        d = (lq.exp() * (lq - lp)).sum(-1)
    elif loss == "jsd":
        lm = torch.logaddexp(math.log(beta) + lp, math.log(1 - beta) + lq)
        d = (beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm)).sum(-1)
    else:
        raise ValueError(f"unknown distillation loss {loss!r}")
    per = ce.clone()
    per[has] = (1 - alpha) * ce[has] + alpha * d
    return per.sum()


class CharCollator:
    """Wraps TRL's collator: each completion token's teacher next-character row, in batch order, as `kd_chars`."""

    def __init__(self, base, n_chars: int):
        self.base, self.n = base, n_chars

    def __call__(self, examples: list[dict]) -> dict:
        rows = [r for e in examples for r in e["kd_chars"]]
        out = self.base([{k: v for k, v in e.items() if k != "kd_chars"} for e in examples])
        t = torch.full((len(rows), self.n), -math.inf)
        for i, r in enumerate(rows):
            if r:
                t[i] = torch.tensor(r)
        out["kd_chars"] = t
        return out


def cross_trainer_class():
    """SFTTrainer with `char_kd_loss_sum` as its loss."""
    from trl import SFTTrainer

    class CrossTokenizerKDTrainer(SFTTrainer):
        def __init__(self, *args, kd: dict, group: torch.Tensor, n_chars: int, **kwargs):
            self.kd, self.group = kd, group
            super().__init__(*args, **kwargs)
            self.data_collator = CharCollator(self.data_collator, n_chars)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            t_chars, labels = inputs.pop("kd_chars"), inputs.pop("labels")
            out = model(**inputs, use_cache=False)
            target = labels[:, 1:]
            sel = target != -100
            if int(sel.sum()) != t_chars.shape[0]:
                raise RuntimeError(f"cross-tokenizer distillation: {int(sel.sum())} completion tokens, "
                                   f"{t_chars.shape[0]} teacher rows")
            total = char_kd_loss_sum(out.logits[:, :-1][sel], target[sel], t_chars.to(sel.device), self.group,
                                     loss=self.kd["loss"], alpha=self.kd["alpha"], beta=self.kd["beta"])
            n = num_items_in_batch if num_items_in_batch is not None else sel.sum()
            loss = total / n
            return (loss, out) if return_outputs else loss

    return CrossTokenizerKDTrainer
