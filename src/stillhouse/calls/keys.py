"""Cache keys and per-request seeds.

A key is a tagged hash of canonical JSON over everything that determines an answer: the
backend's answer identity (the model, for a local one its weights, and every non-transport
option: dtype, logprobs asked for, a watermark key), the messages, the sampling parameters,
the sample index, and the caller's tag (the generation method and its template). Options
that only say how to reach the model (endpoint, concurrency, timeouts, batch size) are not
in it, so a teacher reached another way is the same teacher.
"""

from __future__ import annotations

import hashlib
from typing import Any

from stillhouse.rundir import tagged_hash
from stillhouse.teachers import Request


def request_key(identity: dict[str, Any], req: Request, tag: dict[str, Any] | None = None) -> str:
    """The cache key of one call to the model `identity` (see `teachers.answer_identity`)."""
    return tagged_hash({"model": identity, "messages": list(req.messages), "params": req.params(),
                        "sample_index": req.sample_index, "tag": tag or {}})


def derive_seed(key: str) -> int:
    """The seed a backend samples request `key` with: a function of the key alone (which holds the recipe's
    seed and the sample index), so an answer does not depend on batch size, order or a resume, and two
    (seed, sample index) pairs never share a seed the way `seed + index` did. 63 bits: any API takes it."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1
