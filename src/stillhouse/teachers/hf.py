"""The local Hugging Face backend: batched `generate` on any causal LM directory."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterator

import torch

from stillhouse.models import resolve_model
from stillhouse.teachers import Completion, Request, split_reasoning


def pick_device(requested: str | None = None) -> str:
    if requested and requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_local_lm(model: str, device: str, dtype: str = "auto"):
    """(tokenizer with a pad token, causal LM in eval mode on `device`, weights fingerprint or None) for a local
    model directory, `stillhouse:NAME`, or a hub name where reachable.

    dtype "auto" keeps the checkpoint's own: a bf16 checkpoint generates ~2x faster on CPU than in fp32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(model)
    tokenizer = AutoTokenizer.from_pretrained(src)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype) if dtype != "auto" else "auto")
    fingerprint = _dir_fingerprint(Path(src)) if Path(src).exists() else None
    return tokenizer, lm.to(device).eval(), fingerprint


class HFBackend:
    """Generates with `transformers` from a local model directory (or a hub name where reachable).

    Requests are sorted by prompt length and run in batches with left padding, so a batch
    wastes little on padding. Sampling is seeded per batch from the requests' own seeds and
    sample indices, so the same requests give the same completions.
    """

    name = "hf"

    def __init__(self, model: str, options: dict):
        self.model = model
        self.batch_size = int(options.get("batch_size", 128))
        self.device = pick_device(options.get("device"))
        self.tokenizer, self.lm, self.fingerprint = load_local_lm(model, self.device, options.get("dtype", "auto"))
        self.tokenizer.padding_side = "left"
        self.model_id = model
        self.top_logprobs = int(options.get("top_logprobs", 0))  # >0: keep the k most likely tokens per step
        self.watermark = None
        if options.get("watermark"):  # a key file from `stillhouse watermark keygen`
            from stillhouse.watermark import load_config

            self.watermark = load_config(options["watermark"])

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt(self, req: Request) -> str:
        return self.tokenizer.apply_chat_template(list(req.messages), tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def generate(self, requests: list[Request], progress: Callable[[int], None] | None = None,
                 admit: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Completion]]:
        prompts = [self._prompt(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(prompts[i]))
        # Batches share sampling parameters, so group by them first.
        groups: dict[tuple, list[int]] = {}
        for i in order:
            r = requests[i]
            groups.setdefault((r.max_tokens, r.temperature, r.top_p), []).append(i)
        eos = [self.tokenizer.eos_token_id]
        for (max_tokens, temperature, top_p), idxs in groups.items():
            for start in range(0, len(idxs), self.batch_size):
                batch = idxs[start:start + self.batch_size]
                if admit is not None:
                    allowed = [i for i in batch if admit(i)]  # admit() reserves; stop at the first refusal
                    stopping = len(allowed) < len(batch)
                    batch = allowed
                    if not batch:
                        return
                enc = self.tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.device)
                kwargs = dict(max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)
                if temperature > 0:
                    seed_src = ",".join(f"{requests[i].seed}/{requests[i].sample_index}/{prompts[i]}" for i in batch)
                    torch.manual_seed(int.from_bytes(hashlib.sha256(seed_src.encode()).digest()[:8], "big") % 2**63)
                    kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
                else:
                    kwargs.update(do_sample=False)
                if self.top_logprobs:
                    kwargs.update(output_logits=True, return_dict_in_generate=True)
                if self.watermark is not None:
                    kwargs["watermarking_config"] = self.watermark
                out = self.lm.generate(**enc, **kwargs)
                seqs = out.sequences if self.top_logprobs else out
                new = seqs[:, enc["input_ids"].shape[1]:]
                # raw logits (before temperature / top-p) per step: what logit distillation wants
                steps = torch.stack(out.logits, 1).float().log_softmax(-1) if self.top_logprobs else None
                for row, i in enumerate(batch):
                    ids = new[row].tolist()
                    finish = "length"
                    if eos[0] in ids:
                        ids = ids[:ids.index(eos[0])]
                        finish = "stop"
                    while ids and ids[-1] == self.tokenizer.pad_token_id:
                        ids.pop()
                    text = self.tokenizer.decode(ids, skip_special_tokens=True)
                    reasoning, _ = split_reasoning(text)
                    extra = {"logprobs": self._logprobs(steps[row], new[row], len(ids) + (finish == "stop"))} \
                        if steps is not None else {}
                    yield i, Completion(
                        text=text, reasoning=reasoning,
                        prompt_tokens=int(enc["attention_mask"][row].sum()), completion_tokens=len(ids) + (finish == "stop"),
                        finish_reason=finish, model=self.model_id, system_fingerprint=self.fingerprint, extra=extra,
                    )
                if progress:
                    progress(len(batch))
                if admit is not None and stopping:
                    return

    def _logprobs(self, logp: torch.Tensor, chosen: torch.Tensor, n: int) -> list[dict]:
        """Per generated token: its id, text and logprob, and the top-k alternatives (OpenAI's shape, plus ids)."""
        top = logp[:n].topk(self.top_logprobs, dim=-1)
        conv = self.tokenizer.convert_ids_to_tokens
        return [{"id": int(chosen[t]), "token": conv(int(chosen[t])), "logprob": float(logp[t, chosen[t]]),
                 "top_logprobs": [{"id": int(j), "token": conv(int(j)), "logprob": float(v)}
                                  for v, j in zip(top.values[t].tolist(), top.indices[t].tolist())]}
                for t in range(n)]

    def close(self) -> None:
        self.lm = None


def _dir_fingerprint(path: Path) -> str | None:
    """A short hash of a model directory's weights, standing in for a server's system_fingerprint.

    The first MiB of each weights file (its header and first tensors) and 32 slices spread
    through the rest: reading whole checkpoints would take minutes for large models, and a
    fine-tune changes weights everywhere, so the slices see it.
    """
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            for k in range(32):
                fh.seek(size * k // 32)
                h.update(fh.read(1 << 16))
    return "fp_" + h.hexdigest()[:12]
