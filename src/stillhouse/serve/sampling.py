"""Each row's next token under its own request's settings: penalties and logit bias, then greedy or sampled with
temperature, top-k, top-p and min-p, from the row's own seed where it has one.

Done per row here because transformers' logits processors and warpers take one setting per batch, and a served
batch mixes requests that each asked for something else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from stillhouse.serve.engine import _Seq


def penalize(s: _Seq, row: torch.Tensor) -> torch.Tensor:
    """One row's scores under its repetition, frequency and presence penalties and its logit bias."""
    r = s.req
    if s.bias is None and r.logit_bias:
        s.bias = torch.zeros_like(row)
        for t, b in r.logit_bias.items():
            s.bias[t] = b
    if r.frequency_penalty or r.presence_penalty:
        if s.counts is None:
            s.counts = torch.zeros_like(row)
            for t in s.ids:
                s.counts[t] += 1
        row = row - r.frequency_penalty * s.counts - r.presence_penalty * (s.counts > 0)
    if r.repetition_penalty != 1:
        if s.seen is None:
            s.seen = torch.zeros(row.shape, dtype=torch.bool, device=row.device)
            s.seen[torch.tensor(r.prompt_ids + s.ids, dtype=torch.long, device=row.device)] = True
        row = torch.where(s.seen, torch.where(row < 0, row * r.repetition_penalty, row / r.repetition_penalty), row)
    return row if s.bias is None else row + s.bias


def choose(seqs: list[_Seq], scores: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Each row's token from its (penalized) `scores`: the argmax at temperature 0, else a draw under the row's
    temperature, top-k, top-p and min-p, from its own seeded generator or, unseeded, from `rng`."""
    chosen = scores.argmax(-1)
    dev = scores.device
    temps = torch.tensor([s.req.temperature for s in seqs], device=dev)
    sampled = (temps > 0).nonzero().flatten().tolist()
    if not sampled:
        return chosen
    sub = scores[sampled] / temps[sampled, None]
    top_p = torch.tensor([seqs[i].req.top_p for i in sampled], device=dev)[:, None]
    top_k = torch.tensor([seqs[i].req.top_k for i in sampled], device=dev)[:, None]
    min_p = torch.tensor([seqs[i].req.min_p for i in sampled], device=dev)[:, None]
    probs = sub.softmax(-1)
    sorted_p, order = probs.sort(-1, descending=True)
    # top-k first, then top-p over what top-k kept (renormalized), as transformers' warpers chain them;
    # min-p compares with the most likely token, which neither of the others removes
    rank = torch.arange(sorted_p.shape[-1], device=dev)[None]
    kept = sorted_p.masked_fill((top_k > 0) & (rank >= top_k), 0.0)
    renorm = kept / kept.sum(-1, keepdim=True)
    drop = ((renorm.cumsum(-1) - renorm) >= top_p) & (top_p < 1)  # the smallest set reaching top_p
    drop |= sorted_p < min_p * sorted_p[:, :1]
    probs = probs.scatter(-1, order, kept.masked_fill(drop, 0.0))
    free = [j for j, i in enumerate(sampled) if seqs[i].rng is None]
    if free:
        chosen[[sampled[j] for j in free]] = torch.multinomial(probs[free], 1, generator=rng)[:, 0]
    for j, i in enumerate(sampled):
        if seqs[i].rng is not None:
            chosen[i] = torch.multinomial(probs[j], 1, generator=seqs[i].rng)[0]
    return chosen
