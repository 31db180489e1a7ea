"""Black-box watermark radioactivity: is a suspect's text greener under a provider's key than chance allows?

A text generated with a KGW watermark (Kirchenbauer et al. 2023) over-uses each step's green
list; a student distilled on such text inherits some of that bias (Sander et al. 2024 call it
radioactivity). The test here counts green tokens in the suspect's answers under the key and
asks how likely that many would be by chance.

The statistics are written here from the mathematics, not taken from any detector:

- A scored unit is one (context, token) pair, where the context is the `context_width` tokens
  before the token. Each distinct pair is scored **once** across all texts: a suspect that
  repeats a phrase would otherwise count its colour again and again, and the count would stop
  being a sum of independent draws.
- A pair whose context and token appear together in the text's own prompt is left out: it may
  have been copied from the prompt rather than chosen by the model.
- Under the null (the text does not depend on the key) each scored pair is green with
  probability gamma = greenlist_size / vocab_size, the exact share the key's scheme colours
  (not the nominal ratio: 25 of 102 tokens is 0.245, not 0.25), and the green count is
  Binomial(n, gamma). The p-value is that binomial's exact upper tail (scipy), never only the
  normal approximation.
- An empirical null: the same texts scored under random keys of the same scheme. The share of
  those keys whose p-value is at or below a threshold is the false-positive rate measured on
  this very data, and the true key's rank among them is a p-value that assumes nothing about
  independence.

Green lists come from transformers' own `WatermarkLogitsProcessor` built from the key file, the
same object `stillhouse serve --watermark` generates with, so scoring and generation cannot
disagree about the scheme.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stillhouse.errors import StillhouseError
from stillhouse.watermark import _FIELDS, read_key

# The scheme fields that decide which tokens are green (the bias only decides how strongly they were pushed).
SCHEME_FIELDS = ("greenlist_ratio", "seeding_scheme", "context_width")


@dataclass
class GreenCount:
    scored: int  # distinct (context, token) pairs scored
    green: int
    gamma: float  # the chance a pair is green under the null
    p_value: float  # exact binomial upper tail
    z: float
    skipped_repeats: int = 0  # pairs seen before (counted once)
    skipped_prompt: int = 0  # pairs that occur in the text's prompt
    skipped_short: int = 0  # tokens without a full context


@dataclass
class RadioactivityResult:
    key: GreenCount
    null_keys: int
    null_p_values: list[float] = field(default_factory=list)
    empirical_p: float | None = None  # (1 + null keys with p <= the key's) / (1 + null keys)

    def false_positive_rate(self, threshold: float) -> float | None:
        """The share of random keys whose p-value is at or below `threshold` on these texts."""
        if not self.null_p_values:
            return None
        return sum(p <= threshold for p in self.null_p_values) / len(self.null_p_values)

    def as_dict(self, thresholds=(1e-2, 1e-3, 1e-6)) -> dict:
        d = asdict(self)
        d["false_positive_rate"] = {str(t): self.false_positive_rate(t) for t in thresholds}
        return d


def binomial_p(green: int, n: int, gamma: float) -> float:
    """P[X >= green] for X ~ Binomial(n, gamma): the exact chance of at least this many green pairs by luck."""
    from scipy.stats import binom

    if n == 0:
        return 1.0
    return float(binom.sf(green - 1, n, gamma))


def check_scheme(key: dict, recorded: dict | None, where: str = "the texts") -> None:
    """Refuse, in one line, a key whose scheme differs from the one `recorded` with the text (when it was)."""
    if not recorded:
        return
    diff = [f"{f} {recorded[f]!r} (key: {key.get(f)!r})" for f in SCHEME_FIELDS
            if f in recorded and recorded[f] != key.get(f)]
    if diff:
        raise StillhouseError(f"{where} were generated with a different watermark scheme: " + ", ".join(diff)
                              + "; scoring them under this key would find nothing whatever their origin")


class GreenLists:
    """Which tokens a key colours green after a context, from the generating processor itself (cached)."""

    def __init__(self, key: dict, vocab_size: int):
        from transformers import WatermarkingConfig

        cfg = WatermarkingConfig(**{f: key[f] for f in _FIELDS})
        self.processor = cfg.construct_processor(vocab_size, "cpu")
        self.width = int(key["context_width"])
        self.selfhash = key["seeding_scheme"] == "selfhash"
        self.gamma = self.processor.greenlist_size / vocab_size
        self._lists: dict[tuple[int, ...], frozenset[int]] = {}

    def is_green(self, context: tuple[int, ...], token: int) -> bool:
        import torch

        # lefthash seeds from the last context token; selfhash also from the token being scored
        seed_seq = context + (token,) if self.selfhash else context[-1:]
        ids = self._lists.get(seed_seq)
        if ids is None:
            seq = torch.tensor(context + (token,) if self.selfhash else context, dtype=torch.long)
            ids = self._lists[seed_seq] = frozenset(self.processor._get_greenlist_ids(seq).tolist())
        return token in ids


def count_green(token_texts: list[list[int]], key: dict, vocab_size: int,
                prompts: list[list[int]] | None = None) -> GreenCount:
    """Score token sequences under `key`: each distinct (context, token) pair once, prompt copies left out."""
    lists = GreenLists(key, vocab_size)
    w = lists.width
    seen: set[tuple[int, ...]] = set()
    green = repeats = in_prompt = short = 0
    for i, ids in enumerate(token_texts):
        prompt_grams = set()
        if prompts is not None and prompts[i]:
            p = prompts[i]
            prompt_grams = {tuple(p[j:j + w + 1]) for j in range(len(p) - w)}
        short += min(w, len(ids))
        for j in range(w, len(ids)):
            gram = tuple(ids[j - w:j + 1])
            if gram in seen:
                repeats += 1
                continue
            if gram in prompt_grams:
                in_prompt += 1
                continue
            seen.add(gram)
            green += lists.is_green(gram[:-1], gram[-1])
    n, g = len(seen), lists.gamma
    z = (green - g * n) / (n * g * (1 - g)) ** 0.5 if n else 0.0
    return GreenCount(scored=n, green=green, gamma=g, p_value=binomial_p(green, n, g), z=z,
                      skipped_repeats=repeats, skipped_prompt=in_prompt, skipped_short=short)


def radioactivity(token_texts: list[list[int]], key: dict, vocab_size: int, *,
                  prompts: list[list[int]] | None = None, null_keys: int = 200, seed: int = 0) -> RadioactivityResult:
    """The key's green count and p-value on the texts, beside `null_keys` random keys of the same scheme."""
    observed = count_green(token_texts, key, vocab_size, prompts)
    rng = random.Random(f"radioactivity-null:{seed}")
    nulls = []
    for _ in range(null_keys):
        other = {**key, "hashing_key": rng.getrandbits(63)}
        if other["hashing_key"] == key["hashing_key"]:
            continue
        nulls.append(count_green(token_texts, other, vocab_size, prompts).p_value)
    emp = (1 + sum(p <= observed.p_value for p in nulls)) / (1 + len(nulls)) if nulls else None
    return RadioactivityResult(key=observed, null_keys=len(nulls), null_p_values=nulls, empirical_p=emp)


def read_texts(path: str | Path) -> list[dict]:
    """A JSONL (or Parquet) file of suspect outputs: each row with a string `text`, optionally the `prompt` it
    answers and the `watermark` scheme it was generated under, when known."""
    from stillhouse.sources import read_rows

    p = Path(path)
    if not p.is_file():
        raise StillhouseError(f"texts file {str(p)!r} does not exist")
    rows = read_rows(p, ("text",))
    for n, row in enumerate(rows, 1):
        if not isinstance(row.get("text"), str):
            raise StillhouseError(f"{p}, row {n}: each row must have a string 'text'")
    if not rows:
        raise StillhouseError(f"{p}: no texts")
    return rows


def texts_and_prompts(rows: list[dict]) -> tuple[list[str], list[str | None]]:
    """A texts file's texts, and the prompt each answers (None where the row has none)."""
    return [r["text"] for r in rows], [r["prompt"] if isinstance(r.get("prompt"), str) else None for r in rows]


def check_rows(key: dict, rows: list[dict], source: str | Path) -> None:
    """`check_scheme` for every row of a texts file that records the scheme it was generated under."""
    for n, row in enumerate(rows, 1):
        check_scheme(key, row.get("watermark"), where=f"{source}, row {n}: the texts")


def score_texts(texts: list[str], prompts: list[str | None], key: dict, tokenizer_dir: str, *, null_keys: int = 200,
                seed: int = 0) -> tuple[RadioactivityResult, int]:
    """`radioactivity` of texts (and the prompts they answer, None where unknown), tokenized as the reference model
    the key watermarked; also returns that model's vocabulary size."""
    from transformers import AutoConfig, AutoTokenizer

    from stillhouse.models import resolve_model

    src = resolve_model(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(src)
    vocab = AutoConfig.from_pretrained(src).get_text_config().vocab_size
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompt_ids = [tok(q, add_special_tokens=False)["input_ids"] if q else [] for q in prompts]
    return radioactivity(ids, key, vocab, prompts=prompt_ids, null_keys=null_keys, seed=seed), vocab


def audit_texts(texts_path: str | Path, key_path: str | Path, tokenizer_dir: str, *, null_keys: int = 200,
                seed: int = 0) -> dict:
    """Score a file of suspect texts under a key with the reference model's tokenizer; the evidence as a dict."""
    key = read_key(key_path)
    rows = read_texts(texts_path)
    check_rows(key, rows, texts_path)
    res, vocab = score_texts(*texts_and_prompts(rows), key, tokenizer_dir, null_keys=null_keys, seed=seed)
    return {"test": "watermark_radioactivity_blackbox", "texts": str(texts_path), "n_texts": len(rows),
            "tokenizer": str(tokenizer_dir), "vocab_size": vocab,
            "scheme": {f: key[f] for f in SCHEME_FIELDS}, **res.as_dict()}
