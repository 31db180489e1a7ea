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
