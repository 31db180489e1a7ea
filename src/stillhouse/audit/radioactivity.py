"""Black-box watermark radioactivity: is a suspect's text greener under a provider's key than chance allows?

A text generated with a KGW watermark (Kirchenbauer et al. 2023) over-uses each step's green
list; a student distilled on such text inherits some of that bias (Sander et al. 2024 call it
radioactivity). The test here counts green tokens in the suspect's answers under the key and
asks how likely that many would be by chance.

The statistics are written here from the mathematics, not taken from any detector:

- A scored unit is one green-list draw: the seed the scheme derives from the context (the
  `context_width` tokens before the token) and the token. Each distinct unit is scored **once**
  across all texts: a suspect that repeats a phrase would otherwise count its colour again and
  again, and the count would stop being a sum of independent draws. The unit is the seed, not
  the raw context, because transformers' `lefthash` seeds from the last context token alone
  whatever the width (and `selfhash` from one token of the window and the token scored):
  counting every distinct wider window would count the same draw many times over.
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

- Tokens the reference model was nearly sure of are left out when the reference's weights are
  at hand (`reference_entropies`): a watermark cannot move a token whose probability is ~1, so
  scoring it only adds noise. Which tokens are left out depends on the reference's
  distribution alone, never on the key, so the null distribution is unchanged.
- White-box, when the suspect's weights are local (`whitebox`): the suspect's own next-token
  distributions, scored for green mass above the scheme's share.

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
    skipped_low_entropy: int = 0  # tokens the reference model was nearly sure of


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


_PROCESSORS: dict[tuple, object] = {}  # one constructed lefthash processor per scheme and vocabulary


def _processor(key: dict, vocab_size: int):
    """transformers' watermark processor for `key`. A null distribution scores hundreds of random keys, and each
    construction draws a 1,000,003-entry permutation from the key (~14 ms; 5.5 of the demo audit's 21 s of
    scoring), a table only selfhash reads: lefthash seeds a green list from the key and the last token alone. So a
    lefthash key gets a copy of one constructed processor with its own key and generator (tested to give every
    green list the processor built from that key gives), and a selfhash key a processor of its own."""
    import copy

    import torch
    from transformers import WatermarkingConfig

    cfg = WatermarkingConfig(**{f: key[f] for f in _FIELDS})
    if key["seeding_scheme"] != "lefthash":
        return cfg.construct_processor(vocab_size, "cpu")
    shape = (vocab_size, *(key[f] for f in _FIELDS if f != "hashing_key"))
    if shape not in _PROCESSORS:
        _PROCESSORS[shape] = cfg.construct_processor(vocab_size, "cpu")
    proc = copy.copy(_PROCESSORS[shape])
    proc.hash_key = int(key["hashing_key"])
    proc.rng = torch.Generator(device="cpu")
    proc.rng.manual_seed(proc.hash_key)
    return proc


class GreenLists:
    """Which tokens a key colours green after a context, from the generating processor itself (cached)."""

    def __init__(self, key: dict, vocab_size: int):
        self.processor = _processor(key, vocab_size)
        self.width = int(key["context_width"])
        self.selfhash = key["seeding_scheme"] == "selfhash"
        self.gamma = self.processor.greenlist_size / vocab_size
        self._lists: dict[int, frozenset[int]] = {}  # by seed
        self._seeds: dict[tuple[int, ...], int] = {}

    def seed(self, context: tuple[int, ...], token: int) -> int:
        """The seed of the green list that decides `token`'s colour after `context`: the processor's own
        (`set_seed` reads what it needs from the sequence: lefthash its last token, selfhash the window with the
        token), so two positions with one seed are one draw, whatever else their contexts hold."""
        import torch

        seq = (context + (token,) if self.selfhash else context)[-self.width:]
        seed = self._seeds.get(seq)
        if seed is None:
            self.processor.set_seed(torch.tensor(seq, dtype=torch.long))
            seed = self._seeds[seq] = self.processor.rng.initial_seed()
        return seed

    def unit(self, context: tuple[int, ...], token: int) -> tuple[int, int]:
        """What a position is scored as: (its green list's seed, the token)."""
        return self.seed(context, token), token

    def is_green(self, context: tuple[int, ...], token: int) -> bool:
        import torch

        seed = self.seed(context, token)
        ids = self._lists.get(seed)
        if ids is None:
            seq = torch.tensor(context + (token,) if self.selfhash else context, dtype=torch.long)
            ids = self._lists[seed] = frozenset(self.processor._get_greenlist_ids(seq).tolist())
        return token in ids


def count_green(token_texts: list[list[int]], key: dict, vocab_size: int,
                prompts: list[list[int]] | None = None, keep: list[list[bool]] | None = None) -> GreenCount:
    """Score token sequences under `key`: each distinct unit (green-list seed, token) once, prompt copies left out,
    and where `keep` is given, only the positions it marks (the rest counted as low-entropy skips)."""
    lists = GreenLists(key, vocab_size)
    w = lists.width
    seen: set[tuple[int, int]] = set()
    green = repeats = in_prompt = short = low = 0
    for i, ids in enumerate(token_texts):
        prompt_units = set()
        if prompts is not None and prompts[i]:
            p = prompts[i]
            prompt_units = {lists.unit(tuple(p[j - w:j]), p[j]) for j in range(w, len(p))}
        short += min(w, len(ids))
        for j in range(w, len(ids)):
            if keep is not None and not keep[i][j]:
                low += 1
                continue
            context, token = tuple(ids[j - w:j]), ids[j]
            u = lists.unit(context, token)
            if u in seen:
                repeats += 1
                continue
            if u in prompt_units:
                in_prompt += 1
                continue
            seen.add(u)
            green += lists.is_green(context, token)
    n, g = len(seen), lists.gamma
    z = (green - g * n) / (n * g * (1 - g)) ** 0.5 if n else 0.0
    return GreenCount(scored=n, green=green, gamma=g, p_value=binomial_p(green, n, g), z=z,
                      skipped_repeats=repeats, skipped_prompt=in_prompt, skipped_short=short,
                      skipped_low_entropy=low)


def radioactivity(token_texts: list[list[int]], key: dict, vocab_size: int, *,
                  prompts: list[list[int]] | None = None, null_keys: int = 200, seed: int = 0,
                  keep: list[list[bool]] | None = None) -> RadioactivityResult:
    """The key's green count and p-value on the texts, beside `null_keys` random keys of the same scheme."""
    observed = count_green(token_texts, key, vocab_size, prompts, keep)
    rng = random.Random(f"radioactivity-null:{seed}")
    nulls = []
    for _ in range(null_keys):
        other = {**key, "hashing_key": rng.getrandbits(63)}
        if other["hashing_key"] == key["hashing_key"]:
            continue
        nulls.append(count_green(token_texts, other, vocab_size, prompts, keep).p_value)
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


def _model(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM

    from stillhouse.models import resolve_model

    return AutoModelForCausalLM.from_pretrained(resolve_model(model_dir), dtype=torch.float32).eval()


def _chat_prefix(tok, prompt: str | None) -> list[int]:
    """The tokens a chat model saw before its answer to `prompt` (nothing when the prompt is unknown)."""
    if not prompt:
        return []
    if getattr(tok, "chat_template", None):
        out = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True, add_generation_prompt=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
    return tok(prompt, add_special_tokens=False)["input_ids"]


# The most logits one forward pass of `next_token_distributions` may hold (rows x positions x vocabulary, float32:
# 256 MiB): 32 texts at once for a small vocabulary, one or two for a 150K-token one.
_LOGITS_BUDGET = 64 * 2**20


def next_token_distributions(model_dir: str, tok, prefixes: list[list[int]], texts: list[list[int]],
                             batch_size: int = 32, extra: int = 0):
    """Yield, text by text, the model's next-token distribution (float32, [len(text) + extra, vocab]) before each of
    its tokens (with `extra=1`, also the one after its last), given its prefix; positions without any context at all
    get a uniform row. A generator, so a caller reduces each text's rows at once and a large vocabulary never holds
    more than a batch in memory."""
    import torch

    model = _model(model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    longest = max((len(p) + len(t) for p, t in zip(prefixes, texts)), default=1)
    vocab = model.config.get_text_config().vocab_size
    batch_size = max(1, min(batch_size, _LOGITS_BUDGET // (max(1, longest) * vocab)))
    with torch.inference_mode():
        for b in range(0, len(texts), batch_size):
            rows = [prefixes[i] + texts[i] for i in range(b, min(b + batch_size, len(texts)))]
            width = max(1, max(len(r) for r in rows))
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, seq in enumerate(rows):
                ids[r, :len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[r, :len(seq)] = 1
            probs = model(input_ids=ids, attention_mask=mask).logits.float().softmax(-1)
            for r in range(len(rows)):
                i = b + r
                start, n = len(prefixes[i]), len(texts[i]) + extra
                # the row at position start + j - 1 predicts token start + j; with no prefix, token 0 has no context
                dist = probs[r, max(start - 1, 0):start - 1 + n].clone() if n else probs.new_empty((0, probs.shape[-1]))
                if start == 0 and n:
                    dist = torch.cat([torch.full((1, probs.shape[-1]), 1.0 / probs.shape[-1]), dist])
                yield dist


def reference_entropies(reference_dir: str, tok, prompts: list[str | None], texts: list[list[int]]) -> list[list[float]]:
    """The reference model's next-token entropy (nats) before each token of each text, given the text's prompt."""
    dists = next_token_distributions(reference_dir, tok, [_chat_prefix(tok, q) for q in prompts], texts)
    return [(-(d.clamp_min(1e-12).log() * d).sum(-1)).tolist() for d in dists]


def score_texts(texts: list[str], prompts: list[str | None], key: dict, tokenizer_dir: str, *, null_keys: int = 200,
                seed: int = 0, min_entropy: float | None = None) -> tuple[RadioactivityResult, int]:
    """`radioactivity` of texts (and the prompts they answer, None where unknown), tokenized as the reference model
    the key watermarked; also returns that model's vocabulary size. With `min_entropy` (nats), `tokenizer_dir` must
    be the reference model itself: tokens it predicted with less entropy than that are left out."""
    from transformers import AutoConfig, AutoTokenizer

    from stillhouse.models import resolve_model

    src = resolve_model(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(src)
    vocab = AutoConfig.from_pretrained(src).get_text_config().vocab_size
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prompt_ids = [tok(q, add_special_tokens=False)["input_ids"] if q else [] for q in prompts]
    keep = None
    if min_entropy is not None:
        ent = reference_entropies(src, tok, prompts, ids)
        keep = [[h >= min_entropy for h in row] for row in ent]
    return radioactivity(ids, key, vocab, prompts=prompt_ids, null_keys=null_keys, seed=seed, keep=keep), vocab


@dataclass
class WhiteboxResult:
    contexts: int  # distinct contexts scored
    green_mass: float  # mean over contexts of the suspect's probability mass on the context's green list
    expected: float  # its value under the null: the scheme's green share
    z: float
    p_value: float  # one-sided, a Chernoff bound on the tail of the green mass's sum (see `chernoff_p`)
    p_normal: float = 1.0  # the normal approximation's tail, for reference: smaller than the bound, not guaranteed
    null_keys: int = 0
    null_z: list[float] = field(default_factory=list)
    empirical_p: float | None = None


def whitebox(suspect_dir: str, key: dict, tokenizer_dir: str, prompts: list[str], texts: list[str], *,
             null_keys: int = 200, seed: int = 0) -> WhiteboxResult:
    """White-box radioactivity: the suspect's own next-token distributions along `texts` (its answers to `prompts`,
    after the chat prefix), scored for probability mass on the key's green lists.

    At each distinct green-list seed c (what the scheme derives from the `context_width` tokens before a position;
    lefthash: the last of them) the suspect's distributions there are averaged into p_c, and S_c is p_c's mass on
    c's green list. A green list that does not depend on the suspect is a
    uniformly random k-subset of the V tokens, so E[S_c] = k/V and Var[S_c] = k(V-k)/(V(V-1)) * sum_t (p_c(t) - 1/V)^2
    (sampling without replacement). Contexts hash to independent lists, so Z = sum_c (S_c - k/V) / sqrt(sum_c Var)
    is approximately standard normal. Its normal tail is reported as `p_normal`, but a normal tail over at most |V|
    near-Bernoulli terms understates the truth far out (42 green of 102 at 1/4: 4.5e-5 normal, 1.5e-4 exact), so the
    p-value is `chernoff_p`'s bound, valid at any number of contexts; the same statistic under `null_keys` random
    keys gives an empirical (permutation) null beside it, whose resolution is 1/(null_keys + 1).
    """

    import torch
    from scipy.stats import norm
    from transformers import AutoConfig, AutoTokenizer

    from stillhouse.models import resolve_model

    src = resolve_model(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(src)
    vocab = AutoConfig.from_pretrained(src).get_text_config().vocab_size
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    prefixes = [_chat_prefix(tok, q) for q in prompts]
    # every position of each answer, and the one after it (where the model chose to stop): an empty answer still
    # shows the distribution its model drew the first token from
    dists = next_token_distributions(suspect_dir, tok, prefixes, ids, extra=1)
    w = int(key["context_width"])
    if key["seeding_scheme"] == "selfhash":
        raise StillhouseError("white-box radioactivity scores lefthash keys (a selfhash green list depends on the "
                              "token it colours, so a distribution has no single green list)")
    lists = GreenLists(key, vocab)
    size = lists.processor.greenlist_size
    # grouped by the key's green-list seed (lefthash: one per last token, whatever the width), each group's first
    # context standing for it: a random key gives every group one list, as it gives the key's own
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    first: dict[int, tuple[int, ...]] = {}
    for prefix, seq, dist in zip(prefixes, ids, dists):
        full = prefix + seq
        for j in range(len(seq) + 1):
            at = len(prefix) + j
            if at < w:
                continue
            ctx = tuple(full[at - w:at])
            g = lists.seed(ctx, 0)  # a lefthash seed does not read the token
            p = dist[j, :vocab]
            if g in sums:
                sums[g] += p
            else:
                sums[g], first[g] = p.clone(), ctx
            counts[g] = counts.get(g, 0) + 1
    if not sums:  # nothing with a full context: no evidence either way
        return WhiteboxResult(contexts=0, green_mass=size / vocab, expected=size / vocab, z=0.0, p_value=1.0)
    contexts = [first[g] for g in sums]
    means = torch.stack([sums[g] / counts[g] for g in sums])  # [contexts, vocab]

    def z_of(k: dict) -> tuple[float, float]:
        proc = GreenLists(k, vocab).processor
        # each row's mass on its own list, gathered (a dense [contexts, vocab] mask per key was 240 MB at 49K tokens)
        mass = torch.stack([means[r, proc._get_greenlist_ids(torch.tensor(c, dtype=torch.long))].sum()
                            for r, c in enumerate(contexts)])
        z = float((mass - size / vocab).sum() / sd)
        return z, float(mass.sum())

    sd = whitebox_sd(means, size, vocab)

    z, observed = z_of(key)  # the green mass summed over contexts: the bound's statistic
    mass = observed / len(contexts)
    rng = random.Random(f"whitebox-null:{seed}")
    nulls = [z_of({**key, "hashing_key": rng.getrandbits(63)})[0] for _ in range(null_keys)]
    emp = (1 + sum(n >= z for n in nulls)) / (1 + len(nulls)) if nulls else None
    return WhiteboxResult(contexts=len(contexts), green_mass=mass, expected=size / vocab, z=z,
                          p_value=chernoff_p(means, size / vocab, observed), p_normal=float(norm.sf(z)),
                          null_keys=len(nulls), null_z=nulls, empirical_p=emp)


def whitebox_sd(means, size: int, vocab: int) -> float:
    """The standard deviation of the green mass summed over the rows of `means` (one averaged next-token distribution
    per context) under a random key whose lists hold `size` of the `vocab` tokens: the same for every key."""
    import math

    var = size * (vocab - size) / (vocab * (vocab - 1)) * ((means - 1.0 / vocab) ** 2).sum(-1)
    return math.sqrt(float(var.sum())) or 1e-30


def chernoff_p(means, gamma: float, observed: float, top: int = 256) -> float:
    """A bound on P(sum_c S_c >= observed) when each row's green list is a uniformly random subset holding a share
    `gamma` of the vocabulary, independently across rows (S_c: row c's probability mass on its list).

    The indicators "token t is green" of one random subset are negatively associated, so the moment generating
    function of S_c is at most that of independent Bernoulli(gamma) indicators (Dubhashi and Ranjan 1998):
    E exp(l S_c) <= prod_t (1 - gamma + gamma exp(l p_c(t))). Chernoff's bound, minimised over l >= 0, is then valid
    at any number of rows; on one-hot rows it is the binomial's Chernoff bound. Tokens outside a row's `top` largest
    enter through the bound log(1 + gamma(e^x - 1)) <= gamma(e^x - 1) <= gamma (m / eps)(e^(l eps) - 1) for mass m
    spread over tokens of at most eps each, so a 150K vocabulary costs what `top` tokens do. Written here because
    no library bounds this sum; scipy minimises the convex exponent."""
    import math

    import torch
    from scipy.optimize import minimize_scalar

    m = means.double()
    rows, vocab = m.shape
    if observed <= gamma * float(m.sum()) or rows == 0:
        return 1.0
    k = min(top, vocab)
    head, _ = torch.topk(m, k, dim=-1)
    tail = (m.sum(-1) - head.sum(-1)).clamp_min(0.0)  # mass outside the top k
    eps = head[:, -1] if k < vocab else torch.zeros(rows, dtype=m.dtype)
    lg, l1g = math.log(gamma), math.log1p(-gamma)

    def exponent(lam: float) -> float:
        log_mgf = torch.logaddexp(torch.full_like(head, l1g), lg + lam * head).sum()
        if k < vocab:
            safe = eps.clamp_min(1e-30)
            log_mgf = log_mgf + (gamma * tail / safe * torch.expm1(lam * safe)).sum()
        return float(log_mgf) - lam * observed

    hi = 1.0
    while exponent(2 * hi) < exponent(hi) and hi < 1e6:
        hi *= 2
    res = minimize_scalar(exponent, bounds=(0.0, 2 * hi), method="bounded", options={"xatol": 1e-6})
    return float(min(1.0, math.exp(min(0.0, res.fun))))


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
