"""The generation engine behind `stillhouse serve`: one local HF model, requests batched dynamically.

Requests that arrive within a short window and share sampling settings run as one batched
`generate`; each request keeps its own `max_tokens` and `stop` (applied to its own output).
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # None: no logprobs; 0: only the chosen token's
    future: Future = field(default_factory=Future)

    def group(self) -> tuple:
        return (self.temperature > 0, round(self.temperature, 6), round(self.top_p, 6), self.seed)


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[dict] | None


class Engine:
    """Owns the model; `submit()` is thread-safe and returns a Future of a GenResult."""

    def __init__(self, model_dir: str, *, device: str | None = None, max_batch: int = 64, window_ms: float = 10.0,
                 dtype: str = "auto", watermark: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from stillhouse.models import resolve_model
        from stillhouse.teachers.hf import pick_device

        from pathlib import Path

        from stillhouse.teachers.hf import _dir_fingerprint

        src = resolve_model(model_dir)
        self.fingerprint = _dir_fingerprint(Path(src)) if Path(src).exists() else None
        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(src)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype) if dtype != "auto" else "auto")
        self.model.to(self.device).eval()
        if watermark:
            from stillhouse.watermark import load_config

            self.watermark = load_config(watermark)
        else:
            self.watermark = None
        self.context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_batch, self.window = max_batch, window_ms / 1000
        self.queue: queue.Queue[GenRequest | None] = queue.Queue()
        self.batches_run = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="stillhouse-engine", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------------
    def submit(self, req: GenRequest) -> Future:
        self.queue.put(req)
        return req.future

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=30)

    @torch.inference_mode()
    def prompt_logprobs(self, ids: list[int], top: int) -> list[dict]:
        """Logprob of each prompt token given the ones before it (the first has none): for `echo`."""
        x = torch.tensor([ids], device=self.device)
        logp = self.model(input_ids=x).logits[0].float().log_softmax(-1)
        out = [{"id": ids[0], "logprob": None, "top": []}]
        for t in range(1, len(ids)):
            row = logp[t - 1]
            tops = row.topk(top) if top else None
            out.append({"id": ids[t], "logprob": float(row[ids[t]]),
                        "top": [] if tops is None else list(zip(tops.indices.tolist(), tops.values.tolist()))})
        return out

    # -- the batching loop --------------------------------------------------------------------
    def _loop(self) -> None:
        pending: list[GenRequest] = []
        while True:
            item = self.queue.get()
            if item is None:
                return
            pending.append(item)
            deadline = time.monotonic() + self.window
            while len(pending) < self.max_batch:
                try:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._run_all(pending)
                    return
                pending.append(item)
            self._run_all(pending)
            pending = []

    def _run_all(self, reqs: list[GenRequest]) -> None:
        groups: dict[tuple, list[GenRequest]] = {}
        for r in reqs:
            groups.setdefault(r.group(), []).append(r)
        for batch in groups.values():
            try:
                results = self._generate(batch)
                for r, res in zip(batch, results):
                    r.future.set_result(res)
            except Exception as e:  # a failed batch fails its requests, never the engine
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(e)

    @torch.inference_mode()
    def _generate(self, batch: list[GenRequest]) -> list[GenResult]:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        tok = self.tokenizer
        width = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, r in enumerate(batch):
            ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[row, width - len(r.prompt_ids):] = 1
        first = batch[0]
        kwargs: dict = {"max_new_tokens": max(r.max_tokens for r in batch), "pad_token_id": tok.pad_token_id,
                        "eos_token_id": tok.eos_token_id}
        if first.temperature > 0:
            if first.seed is not None:
                torch.manual_seed(first.seed)
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False)
        if self.watermark is not None:
            kwargs["watermarking_config"] = self.watermark
        want_lp = any(r.top_logprobs is not None for r in batch)
        if want_lp:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kwargs)
        seqs = out.sequences if want_lp else out
        logp = torch.stack(out.logits, 1).float().log_softmax(-1) if want_lp else None
        results = []
        for row, r in enumerate(batch):
            new = seqs[row, width:].tolist()[: r.max_tokens]
            finish = "length"
            if tok.eos_token_id in new:
                new = new[: new.index(tok.eos_token_id)]
                finish = "stop"
            text = tok.decode(new, skip_special_tokens=True)
            for s in r.stop:
                cut = text.find(s)
                if cut >= 0:
                    text, finish = text[:cut], "stop"
                    new = tok(text, add_special_tokens=False)["input_ids"]
            lps = None
            if r.top_logprobs is not None:
                lps = []
                for t, tid in enumerate(new):
                    row_lp = logp[row, t]
                    tops = row_lp.topk(r.top_logprobs) if r.top_logprobs else None
                    lps.append({"id": tid, "logprob": float(row_lp[tid]),
                                "top": [] if tops is None else list(zip(tops.indices.tolist(), tops.values.tolist()))})
            results.append(GenResult(text=text, token_ids=new, finish_reason=finish, logprobs=lps))
        return results
