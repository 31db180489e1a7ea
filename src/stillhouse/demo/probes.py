"""The world's prompt source for audits: held-out questions whose answers leave the model free.

`world_open` draws from the `invent` family's held-out split (a made-up name, a short
description): prompts no model of the world was trained on, whose answers are chosen among
thousands of equally good ones, which is where a watermark's bias has room to show and a
model's style its room to differ.
"""

from __future__ import annotations


def world_open_prompts(n: int, seed: int) -> list[dict]:
    """`n` held-out open-answer prompts (distinct while they last, then repeated: a sampled model answers a repeat
    anew), one user turn each."""
    from stillhouse.demo import world

    pool = world.sample_tasks(min(n, 250), "heldout", seed, ("invent",))
    return [{"messages": [{"role": "user", "content": pool[i % len(pool)].prompt}], "family": "invent"}
            for i in range(n)]
