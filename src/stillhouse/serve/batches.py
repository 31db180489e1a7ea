"""The engine's running batch and its KV cache, in two layouts.

`_SlotBatch` (full-attention models): one cache row ("slot") per request from its prefill to its
end, written in place, so requests join and leave without copying the batch's cache.
`_CohortBatch` (sliding-window or recurrent cache layers): transformers' own cache, new requests
admitted only between cohorts. Both offer `prefill(seqs, prefix)`, `step(context)` and
`remove(dead)`, which is all `Engine` asks of a batch. `_Prefixes` keeps the keys and values of
prompt beginnings that requests share (a chat template's system prompt), which `_SlotBatch`
prefills only once.
"""

from __future__ import annotations

import collections
import inspect
import threading
from typing import TYPE_CHECKING

import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

if TYPE_CHECKING:
    from stillhouse.serve.engine import _Seq


def _cache_kw(model) -> str:
    """The name `model.forward` takes its KV cache by: transformers 5.24 renamed `past_key_values` to `cache` (the old
    name still works there, with a warning, until 5.40); earlier 5.x releases know only the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _out_cache(out):
    return out.cache if "cache" in getattr(out, "__dataclass_fields__", {}) else out.past_key_values


class _Prefixes:
    """Keys and values of prompt beginnings shared by many requests, so that each prefills only the rest of its prompt.

    Served chat models see the same template and system prompt at the start of nearly every request (24 of SmolLM2's
    39 tokens a prompt in the real job's set), and prefill was about a third of the engine's time at 64 clients.
    Found as they come, with no configuration: each new prompt is compared with the last `RECENT` ones, and a beginning
    of at least `MIN_TOKENS` tokens that it shares with one of them is computed once (one forward pass) and kept, the
    least recently used dropped past `MAX_BYTES` of keys and values kept in all (256 MiB: ~5,800 tokens of SmolLM2 in
    float32, ~2,000 of a 7B Llama in bf16). A request then uses the longest kept beginning
    of its prompt. A new beginning is computed only where it is `MIN_TOKENS` longer than one already kept, so prompts
    that go on sharing a word or two past the system prompt do not each cost a forward pass.
    """

    MIN_TOKENS = 16
    RECENT = 64
    MAX_BYTES = 256 << 20

    def __init__(self):
        self.kept: collections.OrderedDict[tuple[int, ...], tuple[list, list]] = collections.OrderedDict()
        self.bytes: dict[tuple[int, ...], int] = {}
        self.recent: collections.deque[tuple[int, ...]] = collections.deque(maxlen=self.RECENT)
        self.hits = 0  # requests that used a kept beginning
        self.tokens_saved = 0  # prompt tokens they did not prefill

    def longest(self, ids: tuple[int, ...]) -> tuple[int, ...] | None:
        """The longest kept beginning of `ids` that leaves at least one token of it to prefill."""
        best = None
        for key in self.kept:
            if len(key) < len(ids) and (best is None or len(key) > len(best)) and ids[:len(key)] == key:
                best = key
        return best

    def wanted(self, ids: tuple[int, ...]) -> tuple[int, ...] | None:
        """A beginning of `ids` worth computing: shared with a recent prompt, and `MIN_TOKENS` past any kept one."""
        need = len(self.longest(ids) or ()) + self.MIN_TOKENS
        shared = 0
        if len(ids) > need:
            head = ids[:need]
            for other in self.recent:
                if len(other) >= need and other[:need] == head:  # compared in C: long prompts stay cheap
                    shared = max(shared, _common(ids, other, need, min(len(ids) - 1, len(other))))
        self.recent.append(ids)
        return ids[:shared] if shared else None

    def keep(self, key: tuple[int, ...], keys: list, values: list) -> None:
        self.kept[key] = (keys, values)
        self.bytes[key] = sum(t.numel() * t.element_size() for t in keys + values)
        while sum(self.bytes.values()) > self.MAX_BYTES and len(self.kept) > 1:
            gone, _ = self.kept.popitem(last=False)
            del self.bytes[gone]

    def use(self, key: tuple[int, ...]) -> tuple[list, list]:
        self.kept.move_to_end(key)
        return self.kept[key]


def _common(a: tuple, b: tuple, lo: int, hi: int) -> int:
    """The length of the longest common beginning of `a` and `b`, known to be at least `lo` and at most `hi`."""
    while lo < hi:  # bisection over slice comparisons, each done in C
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


# The attention implementation a packed step runs under (`_SlotBatch.step` with joining prompts): transformers looks up
# its attention function by the config's name for it, and no built-in one attends over our slots.
PACKED = "stillhouse_packed"
_packing = threading.local()  # the batch whose packed step is running in this thread


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    return _packing.batch.attend(module, query, scaling, kwargs)


AttentionInterface.register(PACKED, _packed_attention)


class _SlotLayer(DynamicLayer):
    """One layer of `_SlotBatch`'s cache, as transformers' attention layers see it."""

    def __init__(self, batch: "_SlotBatch", index: int):
        super().__init__()
        self.batch, self.index = batch, index
        self.is_initialized = True  # the buffers belong to the batch; transformers must not set them up

    def update(self, key_states, value_states, *args, **kwargs):
        return self.batch.write(self.index, key_states, value_states)


class _SlotBatch:
    """The running batch of a full-attention model: one cache row ("slot") per request, written in place.

    The first design kept one left-padded cache for the batch and rebuilt it to let requests in
    (padding and concatenating) or to drop finished ones: at a few hundred rows those copies were
    a quarter of the engine's time. Here a request keeps its row from prefill to its end. Rows
    differ in length, so a decode step writes each row's new key and value at that row's own
    column and a 4-D attention mask (which transformers passes to the attention unchanged) lets
    each row see only its own columns. Rows stay packed at the front: a finished row's place is
    taken by the last live row, a copy of that one row. Prompts are prefilled left-padded, so
    their last tokens line up and `logits_to_keep=1` gives every row's next-token logits.

    A group of prompts that begin alike (`_Prefixes`) gets that beginning's keys and values copied
    into columns [0, p) of its rows and prefills only the rest, left-padded after it; the row sees
    columns [0, pre) and [start, start + length]. Keys carry their positions (rotary embeddings are
    applied before the cache), so the hole of padding between the two changes nothing.

    With SDPA attention (`packs`), new prompts join in a decoding step instead (`step(context, joining)`): one forward
    pass over the running rows' tokens and the new prompts' tokens laid end to end, [1, rows + prompt tokens], no
    padding. The linear layers, most of the work, run once over all of them and read the weights once; attention is
    computed per part over the slots (`attend`). On SmolLM2 in fp32 a separate prefill of 8 short prompts (211 ms)
    cost more than a decoding step of 64 rows (156 ms), and prefill was a fifth to a quarter of the engine's time at
    64 clients; packed into a step of 46 rows, the same tokens cost 13-15% less than the two passes, and prompts join
    at every step rather than in groups: 1.10x the generated tokens/s at 64 clients (BENCHMARKS.md `engine_real`).
    """

    ROWS_STEP = 64  # rows are allocated in steps of this (doubling), up to max_batch
    PACK = True  # new prompts join within a decoding step where the attention is SDPA (False: a prefill pass apart)

    def __init__(self, model, max_rows: int, pad_id: int, prefixes: _Prefixes | None = None):
        from transformers import DynamicCache

        self.model, self.max_rows, self.pad_id, self.prefixes = model, max_rows, pad_id, prefixes
        self.ckw = _cache_kw(model)
        self.cache = DynamicCache(config=model.config)
        self.cache.layers = [_SlotLayer(self, i) for i in range(len(self.cache.layers))]
        self.k: list[torch.Tensor | None] = [None] * len(self.cache.layers)  # [rows, heads, columns, head_dim]
        self.v: list[torch.Tensor | None] = [None] * len(self.cache.layers)
        self.cap_rows = self.cap_cols = 0
        self.seqs: list[_Seq] = []
        device = model.device
        self.pre = torch.zeros(0, dtype=torch.long, device=device)  # each row's shared beginning: columns [0, pre)
        self.start = torch.zeros(0, dtype=torch.long, device=device)  # each row's first column after the padding
        self.length = torch.zeros(0, dtype=torch.long, device=device)  # tokens each row holds from `start` on
        self.last = torch.zeros(0, dtype=torch.long, device=device)  # each row's latest token, not yet cached
        # where the forward in progress writes: ("prefill", first row, first column), ("capture", lists),
        # ("packed", rows, columns) or ("decode", rows, columns, width)
        self._write: tuple | None = None
        self._neg = torch.finfo(model.dtype).min
        self.packs = self.PACK and model.config._attn_implementation == "sdpa"
        self._plan: tuple | None = None  # what `attend` needs of the packed step in progress
        self._no_mask = torch.zeros(1, 1, 1, 1, device=device)  # 4-D: transformers passes it on without building one

    @staticmethod
    def supports(model) -> bool:
        """Whether the model's cache is plain full attention and its attention takes an additive 4-D mask."""
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        return (bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)
                and model.config._attn_implementation in ("sdpa", "eager"))

    def write(self, i: int, k: torch.Tensor, v: torch.Tensor):
        mode = self._write[0]  # a string: comparing a tensor with one instead cost ~15 us a call, 30 calls a step
        if mode == "capture":  # a shared beginning's keys and values, kept outside the buffers
            self._write[1].append(k)
            self._write[2].append(v)
            return k, v
        self._alloc(i, k, v)
        if mode == "packed":  # every token of the packed step at its own row and column
            rows, cols = self._write[1], self._write[2]
            self.k[i][rows, :, cols] = k[0].transpose(0, 1)
            self.v[i][rows, :, cols] = v[0].transpose(0, 1)
            return k, v
        if mode == "prefill":
            a, off = self._write[1], self._write[2]
            self.k[i][a:a + k.shape[0], :, off:off + k.shape[2]] = k
            self.v[i][a:a + v.shape[0], :, off:off + v.shape[2]] = v
            if not off:
                return k, v
            return self.k[i][a:a + k.shape[0], :, :off + k.shape[2]], self.v[i][a:a + v.shape[0], :, :off + v.shape[2]]
        _, rows, cols, width = self._write
        self.k[i][rows, :, cols] = k[:, :, 0]
        self.v[i][rows, :, cols] = v[:, :, 0]
        n = len(self.seqs)
        return self.k[i][:n, :, :width], self.v[i][:n, :, :width]

    def _alloc(self, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.k[i] is None:  # first use: heads and head size come from the model's own keys
            self.k[i] = k.new_zeros(self.cap_rows, k.shape[1], self.cap_cols, k.shape[3])
            self.v[i] = v.new_zeros(self.cap_rows, v.shape[1], self.cap_cols, v.shape[3])

    def _reserve(self, rows: int, cols: int) -> None:
        """Make the buffers hold at least `rows` rows and `cols` columns, keeping what they hold."""
        if rows <= self.cap_rows and cols <= self.cap_cols:
            return
        new_rows = self.cap_rows
        while new_rows < rows and new_rows < self.max_rows:  # (the engine never admits past max_rows)
            new_rows = min(self.max_rows, max(self.ROWS_STEP, 2 * new_rows))
        new_cols = max(self.cap_cols, -(-cols // 64) * 64)
        n, used = len(self.seqs), int((self.start + self.length).max()) if self.seqs else 0
        for bufs in (self.k, self.v):
            for i, old in enumerate(bufs):
                if old is not None:
                    bufs[i] = old.new_zeros(new_rows, old.shape[1], new_cols, old.shape[3])
                    bufs[i][:n, :, :used] = old[:n, :, :used]
        self.cap_rows, self.cap_cols = new_rows, max(new_cols, 1)

    def fresh(self, seq: _Seq) -> int:
        """The prompt tokens `seq` would prefill after the longest beginning of its prompt kept now."""
        ids = seq.req.prompt_ids
        return len(ids) - len(self.prefixes.longest(tuple(ids)) or ()) if self.prefixes else len(ids)

    def plan(self, seqs: list[_Seq]) -> list[tuple[int, ...] | None]:
        """Each prompt's kept beginning to prefill it after (None: the whole prompt), computing new ones first."""
        if self.prefixes is None:
            return [None] * len(seqs)
        prompts = [tuple(s.req.prompt_ids) for s in seqs]
        for ids in prompts:
            key = self.prefixes.wanted(ids)
            if key is not None and key not in self.prefixes.kept:
                self.prefixes.keep(key, *self._capture(key))
        return [self.prefixes.longest(ids) for ids in prompts]

    @torch.inference_mode()
    def _capture(self, ids: tuple[int, ...]) -> tuple[list, list]:
        """Every layer's keys and values for `ids`, one causal forward pass at batch 1."""
        keys, values = [], []
        self._write = ("capture", keys, values)
        try:
            self._forward([ids], torch.zeros(1, dtype=torch.long), 0)
        finally:
            self._write = None
        return keys, values

    def _forward(self, prompts: list, start: torch.Tensor, pre: int):
        """Prefill `prompts`, left-padded to the longest, after `pre` shared columns every row sees."""
        dev = self.start.device
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
        start = start.to(dev)
        col = torch.arange(width, device=dev)
        # causal, and none of a row's padding; a padding query sees itself, so that no softmax row is empty
        see = ((col[None, None, :] <= col[None, :, None]) & (col[None, None, :] >= start[:, None, None])
               | torch.eye(width, dtype=torch.bool, device=dev))
        if pre:
            see = torch.cat([see.new_ones(len(prompts), width, pre), see], -1)
        mask = torch.zeros(see.shape, dtype=self.model.dtype, device=dev).masked_fill_(~see, self._neg)[:, None]
        pos = pre + (col[None, :] - start[:, None]).clamp(min=0)
        return self.model(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos, **{self.ckw: self.cache},
                          use_cache=True, logits_to_keep=1)

    @torch.inference_mode()
    def prefill(self, seqs: list[_Seq], prefix: tuple[int, ...] | None = None) -> torch.Tensor:
        """Put the prompts of `seqs` into new rows; returns their next-token logits. `prefix`: a kept beginning
        (`plan`) all of their prompts start with, whose keys and values are copied rather than computed."""
        dev = self.start.device
        pre = len(prefix) if prefix else 0
        rest = [s.req.prompt_ids[pre:] for s in seqs]
        lens = torch.tensor([len(p) for p in rest], device=dev)
        width = int(lens.max())
        first = len(self.seqs)
        self._reserve(first + len(seqs), pre + width + max(s.req.max_tokens for s in seqs))
        if pre:
            keys, values = self.prefixes.use(prefix)
            for i, (k, v) in enumerate(zip(keys, values)):
                self._alloc(i, k, v)
                self.k[i][first:first + len(seqs), :, :pre] = k
                self.v[i][first:first + len(seqs), :, :pre] = v
            self.prefixes.hits += len(seqs)
            self.prefixes.tokens_saved += pre * len(seqs)
        start = width - lens
        self._write = ("prefill", first, pre)
        out = self._forward(rest, start, pre)
        self.seqs += seqs
        self.pre = torch.cat([self.pre, torch.full_like(lens, pre)])
        self.start = torch.cat([self.start, pre + start])
        self.length = torch.cat([self.length, lens])
        return out.logits[:, -1]

    @torch.inference_mode()
    def step(self, context: int, joining: list[tuple[_Seq, tuple[int, ...] | None]] = ()) -> torch.Tensor:
        """One decoding step of every row (feeding each its latest token); returns the next-token logits.

        `joining` (only where `packs`): new requests, each with the kept beginning of its prompt (`plan`; None: none),
        prefilled in the same forward pass into new rows after the running ones; their next-token logits follow the
        running rows'. Nothing of the batch changes if the pass fails.
        """
        if joining:
            return self._packed_step(context, joining)
        n, dev = len(self.seqs), self.start.device
        cols = self.start + self.length
        width, mask = self._decode_mask(cols)
        # clamped: a row is never asked for a position past the model's context
        pos = (self.pre + self.length).clamp(max=context - 1)[:, None]
        self._write = ("decode", torch.arange(n, device=dev), cols, width)
        out = self.model(input_ids=self.last[:, None], attention_mask=mask, position_ids=pos,
                         **{self.ckw: self.cache}, use_cache=True, logits_to_keep=1)
        self.length += 1
        return out.logits[:, -1]

    def _decode_mask(self, cols: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The columns a decoding step reads and its additive mask [rows, 1, 1, width]: each row sees its shared
        beginning and its own columns up to `cols`, where its new token is written."""
        width = int(cols.max()) + 1
        col = torch.arange(width, device=cols.device)[None, :]
        see = (col >= self.start[:, None]) & (col <= cols[:, None]) | (col < self.pre[:, None])
        return width, torch.zeros(see.shape, dtype=self.model.dtype, device=cols.device).masked_fill_(~see, self._neg)[
            :, None, None]

    def _packed_step(self, context: int, joining: list) -> torch.Tensor:
        n, dev = len(self.seqs), self.start.device
        by_key: dict = {}  # rows that share a kept beginning next to each other: one copy of it for all of them
        for s, key in joining:
            by_key.setdefault(key, []).append(s)
        new = [s for group in by_key.values() for s in group]
        pres = [len(key or ()) for key, group in by_key.items() for _ in group]
        rests = [s.req.prompt_ids[p:] for s, p in zip(new, pres)]
        g, lens = len(new), [len(r) for r in rests]
        self._reserve(n + g, max(p + L + s.req.max_tokens for p, L, s in zip(pres, lens, new)))
        row = n
        for key, group in by_key.items():
            if key:
                keys, values = self.prefixes.use(key)
                for i, (k, v) in enumerate(zip(keys, values)):
                    self._alloc(i, k, v)
                    self.k[i][row:row + len(group), :, :len(key)] = k
                    self.v[i][row:row + len(group), :, :len(key)] = v
            row += len(group)
        pre_t = torch.tensor(pres, dtype=torch.long, device=dev)
        len_t = torch.tensor(lens, dtype=torch.long, device=dev)
        which = torch.repeat_interleave(torch.arange(g, device=dev), len_t)  # each new token's prompt
        at = torch.arange(len(which), device=dev) - torch.repeat_interleave(len_t.cumsum(0) - len_t, len_t)  # its index
        cols = self.start + self.length
        ids = torch.cat([self.last, torch.tensor([t for r in rests for t in r], dtype=torch.long, device=dev)])
        pos = torch.cat([(self.pre + self.length).clamp(max=context - 1), pre_t[which] + at])
        width, dmask = self._decode_mask(cols) if n else (None, None)
        # each new prompt sees its own columns up to its own position; a padding query (past its prompt's end) sees
        # what the prompt's last token sees, and is thrown away
        span, top = max(lens), int((pre_t + len_t).max())
        t = torch.arange(span, device=dev)
        last = pre_t[:, None] + torch.minimum(t[None, :], len_t[:, None] - 1)
        see = torch.arange(top, device=dev)[None, None, :] <= last[:, :, None]
        pmask = torch.zeros(see.shape, dtype=self.model.dtype, device=dev).masked_fill_(~see, self._neg)[:, None]
        keep = torch.cat([torch.arange(n, device=dev), n + len_t.cumsum(0) - 1])
        self._write = ("packed", torch.cat([torch.arange(n, device=dev), n + which]),
                       torch.cat([cols, pre_t[which] + at]))
        self._plan = (n, width, dmask, g, top, pmask, which, at, span)
        cfg, was = self.model.config, self.model.config._attn_implementation
        _packing.batch = self
        cfg._attn_implementation = PACKED
        try:
            out = self.model(input_ids=ids[None], attention_mask=self._no_mask, position_ids=pos[None],
                             **{self.ckw: self.cache}, use_cache=True, logits_to_keep=keep)
        finally:
            cfg._attn_implementation = was
            _packing.batch = self._plan = self._write = None
        self.length += 1
        self.seqs += new
        if self.prefixes is not None:
            self.prefixes.hits += sum(map(bool, pres))
            self.prefixes.tokens_saved += sum(pres)
        self.pre = torch.cat([self.pre, pre_t])
        self.start = torch.cat([self.start, pre_t])
        self.length = torch.cat([self.length, len_t])
        return out.logits[0]

    def attend(self, module, query: torch.Tensor, scaling, kwargs) -> torch.Tensor:
        """Attention of a packed step's queries [1, heads, tokens, head_dim], each over its own row of the slots:
        the running rows' one token each, then the new prompts, padded to the longest (attention only: the linear
        layers never see the padding). Returns [1, tokens, heads, head_dim], as transformers' attention does."""
        i = module.layer_idx
        n, width, dmask, g, top, pmask, which, at, span = self._plan
        _, heads, _, dim = query.shape
        out = query.new_empty(1, query.shape[2], heads, dim)
        if n:
            q = query[0, :, :n].transpose(0, 1)[:, :, None].contiguous()
            o, _ = sdpa_attention_forward(module, q, self.k[i][:n, :, :width], self.v[i][:n, :, :width], dmask,
                                          scaling=scaling, **kwargs)
            out[0, :n] = o[:, 0]
        q = query.new_zeros(g, heads, span, dim)
        q[which, :, at] = query[0, :, n:].transpose(0, 1)
        o, _ = sdpa_attention_forward(module, q, self.k[i][n:n + g, :, :top], self.v[i][n:n + g, :, :top], pmask,
                                      scaling=scaling, **kwargs)
        out[0, n:] = o[which, at]
        return out, None

    def remove(self, dead: list[int]) -> None:
        """Drop rows `dead` (ascending); the last live rows move into their places."""
        n = len(self.seqs) - len(dead)
        gone = set(dead)
        holes = [i for i in dead if i < n]
        movers = [i for i in range(n, len(self.seqs)) if i not in gone]
        if holes:
            h = torch.tensor(holes, device=self.start.device)
            m = torch.tensor(movers, device=self.start.device)
            used = int((self.start[m] + self.length[m]).max())
            for bufs in (self.k, self.v):
                for buf in bufs:
                    if buf is not None:
                        buf[h, :, :used] = buf[m, :, :used]
            for t in (self.pre, self.start, self.length, self.last):
                t[h] = t[m]
            for a, b in zip(holes, movers):
                self.seqs[a] = self.seqs[b]
        del self.seqs[n:]
        self.pre, self.start, self.length, self.last = self.pre[:n], self.start[:n], self.length[:n], self.last[:n]


class _CohortBatch:
    """The running batch of any other model (sliding-window or recurrent caches): transformers' own cache, left-
    padded, with requests let in only when the batch is empty, and finished rows selected out."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = model, pad_id
        self.ckw = _cache_kw(model)
        self.seqs: list[_Seq] = []
        self.cache = self.mask = None
        self.last = torch.zeros(0, dtype=torch.long, device=model.device)

    @torch.inference_mode()
    def prefill(self, seqs: list[_Seq], prefix: None = None) -> torch.Tensor:
        """As `_SlotBatch.prefill`; a cohort has no prefix cache (the engine never plans one for it)."""
        from transformers import DynamicCache

        width = max(len(s.req.prompt_ids) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, s in enumerate(seqs):
            p = s.req.prompt_ids
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        dev = self.model.device
        ids, mask = ids.to(dev), mask.to(dev)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                         **{self.ckw: cache}, use_cache=True, logits_to_keep=1)
        self.seqs, self.cache, self.mask = list(seqs), _out_cache(out), mask
        return out.logits[:, -1]

    @torch.inference_mode()
    def step(self, context: int) -> torch.Tensor:
        pos = self.mask.sum(1, keepdim=True).clamp(max=context - 1)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.seqs), 1)], 1)
        out = self.model(input_ids=self.last[:, None], attention_mask=self.mask, position_ids=pos,
                         **{self.ckw: self.cache}, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]

    def remove(self, dead: list[int]) -> None:
        gone = set(dead)
        keep = [i for i in range(len(self.seqs)) if i not in gone]
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            self.last = self.last[:0]
            return
        idx = torch.tensor(keep, device=self.last.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.last = self.mask[idx], self.last[idx]
