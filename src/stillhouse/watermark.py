"""Watermark keys: what a provider who wants to recognise its outputs later runs its model with.

A key file holds the secret hashing key and the whole scheme (green-list ratio, bias,
seeding scheme, context width), so the same file drives `stillhouse serve --watermark`,
the `hf` backend's `watermark` option and detection. The scheme itself is transformers'
(`WatermarkingConfig`, `WatermarkDetector`, after Kirchenbauer et al. 2023).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from stillhouse.errors import StillhouseError

_FIELDS = ("greenlist_ratio", "bias", "hashing_key", "seeding_scheme", "context_width")


def keygen(path: str | Path, *, greenlist_ratio: float = 0.25, bias: float = 2.0, seeding_scheme: str = "lefthash",
           context_width: int = 1) -> dict:
    """Write a new key file (mode 600) with a random 63-bit hashing key; refuses to overwrite one."""
    p = Path(path)
    if p.exists():
        raise StillhouseError(f"{p} exists; a watermark key is never overwritten (outputs made with it could no "
                              "longer be recognised)")
    if not 0 < greenlist_ratio < 1:
        raise StillhouseError(f"--greenlist-ratio must be between 0 and 1, not {greenlist_ratio}")
    if seeding_scheme not in ("lefthash", "selfhash"):
        raise StillhouseError(f"--seeding-scheme must be lefthash or selfhash, not {seeding_scheme!r}")
    key = {"scheme": "kgw", "hashing_key": secrets.randbits(63), "greenlist_ratio": greenlist_ratio, "bias": bias,
           "seeding_scheme": seeding_scheme, "context_width": context_width, "created": int(time.time())}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(key, indent=2) + "\n")
    p.chmod(0o600)
    return key


def read_key(path: str | Path) -> dict:
    """A key file's scheme and secret; StillhouseError naming the file when it is not one."""
    p = Path(path)
    try:
        key = json.loads(p.read_text())
    except FileNotFoundError:
        raise StillhouseError(f"watermark key file {str(p)!r} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StillhouseError(f"{p}: not a watermark key file ({getattr(e, 'msg', None) or 'not UTF-8 text'})") from None
    missing = [f for f in _FIELDS if f not in key] if isinstance(key, dict) else list(_FIELDS)
    if not isinstance(key, dict) or key.get("scheme") != "kgw" or missing:
        raise StillhouseError(f"{p}: not a watermark key file (missing {', '.join(missing) or 'scheme: kgw'})")
    return key


def key_identity(path: str | Path) -> str:
    """A hash of the key's scheme and secret: what a watermarked model's cached answers depend on (the
    file's contents, not its path; the hash does not reveal the secret)."""
    from stillhouse.rundir import tagged_hash

    key = read_key(path)
    return tagged_hash({"scheme": key["scheme"], **{f: key[f] for f in _FIELDS}})


def load_config(path: str | Path):
    """The `transformers.WatermarkingConfig` a key file describes."""
    from transformers import WatermarkingConfig

    key = read_key(path)
    return WatermarkingConfig(**{f: key[f] for f in _FIELDS})


def z_scores(model_dir: str, texts: list[str], keyfile: str | Path) -> list[float]:
    """The detector's z-score of each text (tokenized with the model's tokenizer); high means watermarked.

    A text too short to score (no token after the seeding context) gets NaN.
    """
    import torch
    from transformers import AutoConfig, AutoTokenizer, WatermarkDetector

    from stillhouse.models import resolve_model

    src = resolve_model(model_dir)
    tok = AutoTokenizer.from_pretrained(src)
    cfg = AutoConfig.from_pretrained(src)
    if cfg.bos_token_id is None:  # the detector needs some id to tell padding from text; pad serves
        cfg.bos_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    wm = load_config(keyfile)
    det = WatermarkDetector(model_config=cfg, device="cpu", watermarking_config=wm)
    out = []
    for t in texts:
        ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[-1] <= wm.context_width or ids[0, 0] == cfg.bos_token_id and ids.shape[-1] <= wm.context_width + 1:
            out.append(float("nan"))
            continue
        out.append(float(det(ids.to(torch.long), return_dict=True).z_score[0]))
    return out


class GreenListCache:
    """transformers' KGW watermark processor, with each context's green list computed once.

    The processor draws a seeded permutation of the vocabulary for every row at every step;
    on a batch of hundreds of rows that Python loop cost a quarter of the decode time. With
    the `lefthash` scheme a green list depends only on the preceding token(s), so lists are
    kept (least recently used dropped past `CACHE_ENTRIES` ids in all) and the bias is added to
    the whole batch in one scatter. The lists come from the processor's own method, so the
    output is the processor's exactly; other schemes go through the processor unchanged.
    """

    CACHE_ENTRIES = 1 << 25  # ids kept in all (256 MiB of int64), however large the vocabulary

    def __init__(self, processor):
        from collections import OrderedDict

        self.processor = processor
        self.context_width = processor.context_width
        self.max_cached = max(16, self.CACHE_ENTRIES // max(1, processor.greenlist_size))
        self._lists: OrderedDict = OrderedDict()

    def bias(self, histories: list[list[int]], scores, pad_id: int):
        """`scores` (one row per history) with each row's green list biased, each row seeded by the last
        `context_width` tokens of its history (left-padded with `pad_id` where it is shorter)."""
        import torch

        cw = self.context_width
        hist = [h[-cw:] for h in histories]
        return self(torch.tensor([[pad_id] * (cw - len(h)) + h for h in hist], device=scores.device), scores)

    def __call__(self, hist, scores):
        import torch

        p = self.processor
        if p.seeding_scheme != "lefthash":
            return p(hist, scores)
        rows = []
        for key, row in zip(hist[:, -1].tolist(), hist):  # lefthash seeds from the last token alone
            ids = self._lists.get(key)
            if ids is None:
                ids = self._lists[key] = p._get_greenlist_ids(row)
                if len(self._lists) > self.max_cached:
                    self._lists.popitem(last=False)
            else:
                self._lists.move_to_end(key)
            rows.append(ids)
        idx = torch.stack(rows)
        return scores.scatter_add(1, idx, torch.full(idx.shape, p.bias, dtype=scores.dtype, device=scores.device))
