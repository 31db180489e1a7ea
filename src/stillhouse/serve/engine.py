"""The generation engine behind `stillhouse serve`: one local HF model, continuous batching.

Requests join the running batch at any decoding step (their prompts prefilled in that step's
forward pass, or in one of their own where the attention is not SDPA) and leave it at the step
they finish (end of sequence, their own `max_tokens`, or one of their `stop` strings), so a short
answer never waits for a long one and a freed slot is refilled at once. Each request keeps its own
sampling settings (temperature, top_p, seed; applied in `sampling.py`) and can stream its text
as it is sampled.

Why a hand-written decode loop: `model.generate` runs a fixed batch until its longest member
ends and takes one set of sampling settings per call, which is what made a served teacher
slower than the in-process one. The loop below is a plain forward pass of transformers' own
model over a cache of our own (`_SlotBatch`, in `batches.py`): each request keeps one cache row from its prefill
to its end, so letting requests in or dropping finished ones never copies the batch's cache.
A model whose cache layers are not plain full attention (sliding-window or recurrent ones)
still works (`_CohortBatch`), admitting new requests only between cohorts.
"""

from __future__ import annotations

import collections
import math
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch

from stillhouse.models.output import speed_up_output
from stillhouse.models.packed import pack_linears
from stillhouse.serve.batches import _CohortBatch, _Prefixes, _SlotBatch
from stillhouse.serve.detok import IncrementalText
from stillhouse.serve.sampling import choose, penalize


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0: only the chosen token's
    on_text: Callable[[str], None] | None = None  # called from the engine thread with each new piece of text
    future: Future = field(default_factory=Future)
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    frequency_penalty: float = 0.0  # OpenAI's: minus penalty x count, over the generated tokens
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0  # transformers' / vLLM's: over the prompt and the generated tokens
    logit_bias: dict[int, float] | None = None

    def size(self) -> int:
        """Tokens this request may hold in the batch's cache at most."""
        return len(self.prompt_ids) + self.max_tokens


class Stopping(RuntimeError):
    """The server is stopping: new requests are refused, and accepted ones still unfinished at the drain limit fail."""

    def __init__(self, message: str = "the server is stopping; send the request again to a running server"):
        super().__init__(message)


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; `retry_after` is a guess, in seconds, of when it will have room."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict] | None


@dataclass
class _Score:
    """A prompt to score (logprob of each token given the ones before it), run between steps."""
    ids: list[int]
    top: int
    future: Future = field(default_factory=Future)


class _Seq:
    """One request in the running batch."""

    def __init__(self, req: GenRequest, device: str, vocab: int | None = None):
        if not req.prompt_ids:
            raise ValueError("the prompt has no tokens")
        bad = [t for t in req.logit_bias or {} if vocab is not None and not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias: token id {bad[0]} is not in the model's vocabulary (ids 0 to {vocab - 1})")
        self.req = req
        self.ids: list[int] = []
        self.logprobs: list[dict] | None = [] if req.top_logprobs is not None else None
        self.text = ""
        self.sent = 0  # characters already streamed
        self.finish: str | None = None
        # set from whichever thread cancels the future: asking `future.cancelled()` of every row at every step takes
        # a lock per row, a few percent of a step at hundreds of rows
        self.abandoned = False
        req.future.add_done_callback(self._done)
        self.arrived = 0  # the engine's step count when it was queued
        self.rng = (torch.Generator(device=device).manual_seed(req.seed & 0xFFFF_FFFF_FFFF_FFFF)  # any int a client sends
                    if req.seed is not None else None)
        # a streamed piece must not be the start of a stop string that later completes
        self.holdback = max((len(s) for s in req.stop), default=1) - 1
        self.detok = IncrementalText() if req.stop or req.on_text else None
        self.processed = bool(req.frequency_penalty or req.presence_penalty or req.repetition_penalty != 1
                              or req.logit_bias)
        self.counts: torch.Tensor | None = None  # per vocabulary id: times generated (penalties only)
        self.seen: torch.Tensor | None = None  # per vocabulary id: in the prompt or generated (repetition penalty)
        self.bias: torch.Tensor | None = None


    def _done(self, fut: Future) -> None:
        if fut.cancelled():
            self.abandoned = True


class Engine:
    """Owns the model; `submit()` and `score()` are thread-safe and return Futures.

    `max_batch` caps the rows decoded together and `max_batch_tokens` the tokens they may hold
    (each request counts its prompt plus its `max_tokens`; by default what `KV_CACHE_BYTES` of
    cache holds). `max_queue` caps the requests waiting for a place: past it `submit` raises
    `QueueFull` (None: no cap, for callers in this process that bound their own work).
    `prefix_cache`: prompts that begin alike (a chat template's system prompt) prefill that
    beginning once (`_Prefixes`); off, every prompt is prefilled whole.
    """

    ADMIT_AFTER_STEPS = 8
    PREFILL_TOKENS = 1024
    KV_CACHE_BYTES = 4 << 30

    def __init__(self, model_dir: str, *, device: str | None = None, max_batch: int = 64, window_ms: float = 10.0,
                 dtype: str = "auto", watermark: str | None = None, max_batch_tokens: int | None = None,
                 max_queue: int | None = None, watermark_logprobs: bool = False, quantize: str = "none",
                 prefix_cache: bool = True):
        from stillhouse.models import pick_device

        self.device = pick_device(device)
        self.watermark = None
        self._wm = None
        if watermark_logprobs and not watermark:
            raise ValueError("watermark_logprobs needs a watermark key")
        # Which distribution logprobs describe: the model's own (the default), or the watermarked one the tokens are
        # drawn from, so that a student distilled from the logprobs learns the green-list bias as well.
        self.watermark_logprobs = watermark_logprobs
        if watermark:
            from stillhouse.watermark import load_config

            self.watermark = load_config(watermark)
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.max_queue = max_queue
        # kept across batches (a failed step starts a new batch); used by full-attention models only
        self.prefixes = _Prefixes() if prefix_cache else None
        self.queue: queue.Queue = queue.Queue()
        self._waiting = 0  # requests submitted and not yet in the running batch (nor failed)
        self._admitted: collections.deque = collections.deque(maxlen=256)  # when recent requests got a place
        self._count_lock = threading.Lock()
        self.peak_batch_tokens = 0  # most tokens (prompts plus max_tokens) held by the running batch at once
        self._rng = torch.Generator(device=self.device)
        self._rng.seed()  # its own random seed; the process's global RNG is left alone
        self.batches_run = 0  # prefills: groups of requests admitted together
        self.steps_run = 0  # decoding steps
        self.largest_batch = 0  # most requests decoded in one step
        self._last_admit = 0  # steps_run at the last admission
        self._dead: RuntimeError | None = None  # set if the loop ever fails outside a request
        self._closed = False
        self._drain_until: float | None = None  # set by `drain`: when accepted requests still unfinished fail
        self._stopped = False  # the loop has ended (set before its last drain of the queue)
        self._batch = None
        # The model is loaded by the thread that decodes with it, never by the caller's. PyTorch's CPU ops run on
        # OpenMP, and each thread that runs a parallel op gets its own OpenMP team; once the teams' threads outnumber
        # the cores, libgomp stops spinning between ops and puts its threads to sleep, waking them for every op.
        # Loading (and quantizing) in the caller's thread made a second team: one client's decode on SmolLM2 ran at
        # 18 tokens/s in int8 and 21 in bf16 against 34 and 24 with everything in one thread (2 cores).
        loaded: Future = Future()
        self._thread = threading.Thread(target=self._main, args=(model_dir, dtype, quantize, max_batch_tokens, loaded),
                                        name="stillhouse-engine", daemon=True)
        self._thread.start()
        loaded.result()  # the load's own error, raised here in the caller's thread

    def _setup(self, model_dir: str, dtype: str, quantize: str, max_batch_tokens: int | None) -> None:
        """Load the model and everything read from it (in the engine's thread: see `__init__`)."""
        from stillhouse.models import load_local_lm

        self.tokenizer, self.model, self.fingerprint = load_local_lm(model_dir, self.device, dtype, quantize=quantize)
        # a large model on CPU: weights laid out once for oneDNN (float32 / bfloat16); else, float32 on CPU, a
        # faster output layer for a batch of rows (the same function either way)
        self.packed = pack_linears(self.model)
        if not self.packed:
            speed_up_output(self.model)
        eos = self.model.generation_config.eos_token_id
        self.eos = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        head = self.model.get_output_embeddings()
        self.vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # the logits' width
        # never below the context, so that any request the model can take fits in an empty batch
        self.max_batch_tokens = max(self.context, max_batch_tokens or self._default_batch_tokens())
        if self.watermark is not None:
            from stillhouse.watermark import GreenListCache

            self._wm = GreenListCache(self.watermark.construct_processor(
                self.model.config.get_text_config().vocab_size, self.device))

    def _main(self, model_dir, dtype, quantize, max_batch_tokens, loaded: Future) -> None:
        try:
            self._setup(model_dir, dtype, quantize, max_batch_tokens)
        except BaseException as e:
            loaded.set_exception(e)
            return
        loaded.set_result(None)
        self._loop()

    # -- public -------------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> Future:
        """Queue one request; raises `QueueFull` when `max_queue` requests are already waiting."""
        return self.submit_all([req])[0]

    def submit_all(self, reqs: list[GenRequest]) -> list[Future]:
        """Queue all of `reqs` or, when the waiting queue has no room for all of them, none (`QueueFull`)."""
        self._check_open()
        with self._count_lock:
            if self.max_queue is not None and self._waiting + len(reqs) > self.max_queue:
                raise QueueFull(f"the server is busy: {self._waiting} requests are waiting (at most {self.max_queue})",
                                self._retry_after())
            self._waiting += len(reqs)
        for r in reqs:
            self._put(r)
        return [r.future for r in reqs]

    def score(self, ids: list[int], top: int = 0) -> Future:
        """A Future of the prompt's per-token logprobs (for `echo`); the first token has none."""
        self._check_open()
        job = _Score(ids, top)
        self._put(job)
        return job.future

    def close(self) -> None:
        """Stop after the requests already running finish; requests still waiting fail."""
        self._closed = True
        self.queue.put(None)
        self._thread.join()

    def drain(self, timeout: float) -> None:
        """Refuse new requests (`Stopping`) and keep working on the accepted ones, running or waiting, for up to
        `timeout` seconds; at that limit those still unfinished fail with `Stopping`. Returns at once."""
        self._drain_until = time.monotonic() + max(0.0, timeout)
        self._closed = True
        self.queue.put(_WAKE)  # an idle loop blocked on the queue checks the limit now

    def load(self) -> tuple[int, int]:
        """Requests decoding now and requests accepted but waiting for a place."""
        batch = self._batch
        return (len(batch.seqs) if batch is not None else 0), self._waiting

    def _put(self, item) -> None:
        self.queue.put(item)
        # The loop may have ended between `_check_open` and the put (a close racing this call): nobody would ever
        # take the item, so fail it here. The loop sets `_stopped` before its own last drain, so every item is
        # failed by one of the two drains.
        if self._stopped:
            self._fail_queued(self._dead)

    def _retry_after(self) -> int:
        """Seconds until the requests waiting now have likely got a place, from the recent admission rate."""
        now, times = time.monotonic(), list(self._admitted)
        if len(times) < 2 or now - times[0] <= 0:
            return 1
        rate = len(times) / (now - times[0])
        return max(1, min(60, math.ceil(self._waiting / rate)))

    def _unwait(self, n: int) -> None:
        with self._count_lock:
            self._waiting -= n

    def _check_open(self) -> None:
        if self._dead is not None:
            raise self._dead
        if self._drain_until is not None:
            raise Stopping()
        if self._closed:
            raise RuntimeError("the generation engine is closed")

    # -- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        waiting: list[_Seq] = []
        self._batch = None
        try:
            self._run(waiting)
        except BaseException as e:  # never die silently: fail every request and refuse new ones
            self._dead = RuntimeError(f"the generation engine stopped: {type(e).__name__}: {e}")
            self._stopped = True
            self._fail(self._batch.seqs if self._batch is not None else [], self._dead)
            self._fail_waiting(waiting, self._dead)
            self._fail_queued(self._dead)

    def _new_batch(self):
        if _SlotBatch.supports(self.model):
            return _SlotBatch(self.model, self.max_batch, self.tokenizer.pad_token_id, self.prefixes)
        return _CohortBatch(self.model, self.tokenizer.pad_token_id)

    @torch.inference_mode()  # all of the loop: its tensors are inference tensors, updated in place
    def _run(self, waiting: list[_Seq]) -> None:
        batch = self._batch = self._new_batch()
        stopping = False
        while True:
            if not stopping:
                stopping = self._collect(waiting, block=not batch.seqs and not waiting)
            if self._drain_until is not None and time.monotonic() >= self._drain_until:
                # the drain limit: every accepted request not yet finished fails, saying why
                if batch.seqs:
                    self._fail(batch.seqs, Stopping())
                    batch = self._batch = self._new_batch()
                self._fail_waiting(waiting, Stopping())
                self._fail_queued(Stopping())
            if stopping:  # close(): what is running finishes, what waits fails
                self._fail_waiting(waiting)
                if not batch.seqs:
                    self._stopped = True
                    self._fail_queued()
                    return
            live = batch.seqs
            packs = isinstance(batch, _SlotBatch) and batch.packs
            joining: list = []  # (request, kept beginning) pairs prefilled within this step (`packs` only)
            if waiting and (not live or (isinstance(batch, _SlotBatch) and self._admit_now(waiting, len(live), packs))):
                new = self._take(waiting, len(live), sum(s.req.size() for s in live), batch.fresh if packs else None)
                if new:
                    self._last_admit = self.steps_run
                    self._unwait(len(new))
                    self._admitted.extend([time.monotonic()] * len(new))
                    self.peak_batch_tokens = max(self.peak_batch_tokens, sum(s.req.size() for s in live + new))
                    if packs:
                        joining = list(zip(new, self._plan(batch, new)))
                    else:
                        self._prefill(batch, self._prefill_groups(batch, new))
            try:
                self._settle(batch)
                if joining:
                    try:
                        logits = batch.step(self.context, joining)
                    except Exception:  # prefilled apart instead, so that a prompt that fails fails only its request
                        self._prefill(batch, self._groups(joining))
                        joining = []
                    else:
                        self.batches_run += 1
                if batch.seqs:
                    self.largest_batch = max(self.largest_batch, len(batch.seqs))
                    self.steps_run += 1
                    if not joining:
                        logits = batch.step(self.context)
                    batch.last = self._sample(batch.seqs, logits)
                    self._settle(batch)
            except Exception as e:  # a failed step fails its requests, never the engine
                self._fail(batch.seqs, e)
                batch = self._batch = self._new_batch()

    def _prefill(self, batch, groups: list[tuple[list[_Seq], tuple[int, ...] | None]]) -> None:
        """Prefill each group of new requests in a forward pass of its own; a group that fails fails alone."""
        for group, prefix in groups:
            self.batches_run += 1
            try:
                logits = batch.prefill(group, prefix)
            except Exception as e:  # a failed prefill fails its own requests, not the running ones
                self._fail(group, e)
            else:
                batch.last = torch.cat([batch.last, self._sample(group, logits)])

    @staticmethod
    def _plan(batch, new: list[_Seq]) -> list[tuple[int, ...] | None]:
        """Each new prompt's kept beginning (None: none); see `_SlotBatch.plan`."""
        try:
            return batch.plan(new)  # may run a forward pass for a newly shared beginning
        except Exception:  # not worth failing requests over: they are prefilled whole (and fail there if it is real)
            return [None] * len(new)

    def _prefill_groups(self, batch, new: list[_Seq]) -> list[tuple[list[_Seq], tuple[int, ...] | None]]:
        """Prompts to prefill together, each group with the kept beginning its prompts share (None: none): by that
        beginning, then by the length of the rest, in groups of about `PREFILL_TOKENS` tokens.

        A group is left-padded to its longest prompt (after the shared beginning), and padding costs as much as real
        tokens: one group of hundreds of prompts of 30 to 75 tokens was more than half padding.
        """
        if not isinstance(batch, _SlotBatch):
            return [(new, None)]
        return self._groups(list(zip(new, self._plan(batch, new))))

    def _groups(self, planned: list[tuple[_Seq, tuple[int, ...] | None]]) -> list:
        by_key: dict = {}
        for s, key in planned:
            by_key.setdefault(key, []).append(s)
        groups: list[tuple[list[_Seq], tuple[int, ...] | None]] = []
        for key, seqs in by_key.items():
            pre, run = len(key or ()), []
            for s in sorted(seqs, key=lambda s: len(s.req.prompt_ids)):
                if run and (len(run) + 1) * (len(s.req.prompt_ids) - pre) > self.PREFILL_TOKENS:
                    groups.append((run, key))
                    run = []
                run.append(s)
            groups.append((run, key))
        return groups

    def _settle(self, batch) -> None:
        """Hand finished (or abandoned) requests their results and drop their rows."""
        dead = [i for i, s in enumerate(batch.seqs) if s.finish is not None or s.abandoned]
        for i in dead:
            s = batch.seqs[i]
            if s.finish is None:
                s.finish = "cancelled"
            _resolve(s.req.future, GenResult(s.text, s.ids, s.finish, s.logprobs))
        if dead:
            batch.remove(dead)

    def _take(self, waiting: list[_Seq], rows: int, tokens: int,
              fresh: Callable[[_Seq], int] | None = None) -> list[_Seq]:
        """Remove and return the longest head of `waiting` that fits beside `rows` rows holding `tokens` tokens.

        First come, first served: a large request at the head is not overtaken by smaller ones behind it, so it
        cannot starve. An empty batch always takes the head (the budget is never below one context). `fresh`: the
        prompt tokens a request would prefill, of which one step takes about `PREFILL_TOKENS` (at least one request).
        """
        n = prefill = 0
        while n < len(waiting) and rows + n < self.max_batch:
            size = waiting[n].req.size()
            if (rows or n) and tokens + size > self.max_batch_tokens:
                break
            if fresh is not None:
                prefill += fresh(waiting[n])
                if n and prefill > self.PREFILL_TOKENS:
                    break
            tokens += size
            n += 1
        new = waiting[:n]
        del waiting[:n]
        return new

    def _default_batch_tokens(self) -> int:
        """Tokens of cache that `KV_CACHE_BYTES` holds for this model (keys and values, every layer)."""
        cfg = self.model.config.get_text_config()
        heads = getattr(cfg, "num_attention_heads", None)
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
        layers = getattr(cfg, "num_hidden_layers", None)
        if not (kv_heads and head_dim and layers):
            return self.max_batch * self.context
        per_token = 2 * layers * kv_heads * head_dim * self.model.dtype.itemsize
        return self.KV_CACHE_BYTES // per_token

    def _admit_now(self, waiting: list[_Seq], running: int, packs: bool = False) -> bool:
        """Whether to prefill waiting requests into the running batch before the next step.

        A batch that `packs` prefills them within the step: at every step there is room. Otherwise each admission
        costs a forward pass, so while the batch is busy requests are let in in groups: once an eighth of the batch
        can be filled, or `ADMIT_AFTER_STEPS` steps after the last admission (so a lone request never waits long).
        A nearly idle batch admits at once.
        """
        room = self.max_batch - running
        if room <= 0 or packs:
            return room > 0
        group = max(1, self.max_batch // 8)
        return (min(room, len(waiting)) >= group or running < group
                or self.steps_run - max(waiting[0].arrived, self._last_admit) >= self.ADMIT_AFTER_STEPS)

    def _collect(self, waiting: list[_Seq], block: bool) -> bool:
        """Move queued requests to `waiting` (when idle: wait for one, then `window` for company).

        Prompt-scoring jobs run at once. Returns True once shutdown has been asked for.
        """
        deadline = None
        while True:
            try:
                if block and deadline is None:
                    item = self.queue.get()
                    deadline = time.monotonic() + self.window
                elif deadline is not None:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self.queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            if item is _WAKE:  # back to the loop, which checks the drain limit
                return False
            if isinstance(item, _Score):
                self._run_score(item)
            elif item.future.cancelled():
                self._unwait(1)
            else:
                try:
                    seq = _Seq(item, self.device, self.vocab)
                except Exception as e:
                    self._unwait(1)
                    _resolve(item.future, exc=e)
                    continue
                seq.arrived = self.steps_run
                waiting.append(seq)
            if deadline is not None and len(waiting) >= self.max_batch:
                return False

    @staticmethod
    def _fail(seqs: list[_Seq], exc: BaseException | None = None) -> None:
        for s in seqs:
            _resolve(s.req.future, exc=exc or Stopping())

    def _fail_waiting(self, waiting: list[_Seq], exc: BaseException | None = None) -> None:
        self._unwait(len(waiting))
        self._fail(waiting, exc)
        waiting.clear()

    def _fail_queued(self, exc: BaseException | None = None) -> None:
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item is not _WAKE:
                if isinstance(item, GenRequest):
                    self._unwait(1)
                _resolve(item.future, exc=exc or Stopping())

    @torch.inference_mode()
    def _run_score(self, job: _Score) -> None:
        try:
            x = torch.tensor([job.ids], device=self.device)
            logits = self.model(input_ids=x).logits[0].float()
            if self.watermark_logprobs and self._wm is not None:  # each position with its own preceding tokens
                cw = self._wm.context_width
                logits = self._wm.bias([job.ids[max(0, t + 1 - cw):t + 1] for t in range(len(job.ids))], logits,
                                       self.tokenizer.pad_token_id)
            logp = logits.log_softmax(-1)
            out = [{"id": job.ids[0], "logprob": None, "top": []}]
            for t in range(1, len(job.ids)):
                out.append(_lp_entry(logp[t - 1], job.ids[t], job.top))
            _resolve(job.future, out)
        except Exception as e:
            _resolve(job.future, exc=e)

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor) -> torch.Tensor:
        """Choose each row's next token under its own settings, record it, and return them as a tensor.

        The watermark and the logprobs' distribution are decided here; the per-row penalties and sampling
        settings are `sampling.py`'s.
        """
        logits = logits.float()
        scores = logits
        if self._wm is not None:  # the watermark sees each row's real previous tokens, as in `generate`
            scores = self._wm.bias([s.req.prompt_ids + s.ids for s in seqs], scores, self.tokenizer.pad_token_id)
        reported = scores if self.watermark_logprobs else logits  # before penalties, temperature and the rest
        processed = [i for i, s in enumerate(seqs) if s.processed]
        if processed:
            scores = scores.clone() if scores is logits else scores
            for i in processed:
                scores[i] = penalize(seqs[i], scores[i])
        chosen = choose(seqs, scores, self._rng)
        logp = reported.log_softmax(-1) if any(s.logprobs is not None for s in seqs) else None
        for row, (s, t) in enumerate(zip(seqs, chosen.tolist())):
            self._advance(s, t, None if s.logprobs is None else logp[row])
        return chosen

    def _advance(self, s: _Seq, t: int, logp: torch.Tensor | None) -> None:
        """Append token `t` to `s` and decide whether it has finished; stream what is now safe to send."""
        if s.finish is not None:  # a finished row waiting to be dropped: its token is ignored
            return
        # An end-of-sequence token counts as generated and keeps its logprob (lm-eval's log-likelihoods read one
        # generated entry after an echoed prompt); decoding skips it, so it never shows in the text.
        s.ids.append(t)
        if s.logprobs is not None:
            s.logprobs.append(_lp_entry(logp, t, s.req.top_logprobs))
        if s.counts is not None:
            s.counts[t] += 1
        if s.seen is not None:
            s.seen[t] = True
        if t in self.eos:
            s.finish = "stop"
        elif len(s.ids) >= s.req.max_tokens:
            s.finish = "length"
        if s.detok is not None:  # streamed or stop strings: the text as it grows
            before = len(s.text)
            if s.finish is None:
                s.detok.add(self.tokenizer, s.ids)
            else:  # the last token: also whatever an incomplete character held back
                s.detok.finish(self.tokenizer, s.ids)
            s.text = s.detok.text
            if s.req.stop and len(s.text) > before:
                start = max(0, before - s.holdback)
                cuts = [c for c in (s.text.find(x, start) for x in s.req.stop if x) if c >= 0]
                if cuts:
                    s.text, s.finish = s.text[:min(cuts)], "stop"
        elif s.finish is not None:  # decoded once, at the end
            s.text = self.tokenizer.decode(s.ids, skip_special_tokens=True)
        if s.req.on_text:
            end = len(s.text) if s.finish else len(s.text) - s.holdback
            if end > s.sent:
                try:
                    s.req.on_text(s.text[s.sent:end])
                except Exception:  # a listener that has gone away (closed event loop) must not fail the batch
                    pass
                s.sent = end


_WAKE = object()  # put on the queue to wake an idle loop


def _lp_entry(logp: torch.Tensor, t: int, top: int | None) -> dict:
    """One token's logprob and the `top` most likely alternatives, as (id, logprob) pairs."""
    tops = logp.topk(top) if top else None
    return {"id": t, "logprob": float(logp[t]),
            "top": [] if tops is None else list(zip(tops.indices.tolist(), tops.values.tolist()))}


def _resolve(fut: Future, result=None, exc: BaseException | None = None) -> None:
    """Complete a Future unless its caller has already given up on it."""
    if fut.done():
        return
    try:
        fut.set_exception(exc) if exc is not None else fut.set_result(result)
    except Exception:  # cancelled in between
        pass
