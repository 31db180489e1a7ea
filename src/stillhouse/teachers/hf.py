"""The local Hugging Face backend: any causal LM directory, driven by the serve engine in-process.

There is one local generation path: this backend submits its requests to the same
continuous-batching `Engine` that `stillhouse serve` puts behind HTTP, so both share one
end-of-sequence rule, one seeding rule (a per-request generator: a sampled answer does not
depend on what else shares its batch) and one logprob helper.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, wait
from pathlib import Path
from typing import Callable, Iterator, Literal

from pydantic import Field, model_validator

# Loading lives in stillhouse.models, below both this backend and the serve engine; re-exported for older importers.
from stillhouse.models import (DTYPES, compute_dtype, cpu_flags, dir_fingerprint, load_local_lm,  # noqa: F401
                               pick_device, quantized_dtype, resolve_model)
from stillhouse.teachers import BackendOptions, Completion, Request, Transport, split_reasoning

class HFOptions(BackendOptions):
    batch_size: int = Transport(128, ge=1, description="most requests decoded together")
    device: Literal["auto", "cpu", "cuda"] | str = Transport("auto", description="cpu, cuda, cuda:N or auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute dtype; auto: bf16 where the hardware runs it natively, else fp32")
    quantize: Literal["none", "int8", "int4"] = Field(
        "none", description="int8: every linear layer's weight in int8, computing in bf16 (faster for few rows at a "
                            "time, no faster than fp32 for many; it changes more greedy answers than bf16); int4: "
                            "4-bit weights in groups of 32 (CPU), faster still for one client, changing more again")
    top_logprobs: int = Field(0, ge=0, le=20, description="keep the k most likely tokens per generated token")
    watermark: str | None = Field(None, description="a key file from `stillhouse watermark keygen`")
    watermark_logprobs: bool = Field(False, description="logprobs of the watermarked distribution the tokens are drawn "
                                                        "from, not the model's own (needs watermark)")

    @model_validator(mode="after")
    def _watermark_logprobs_need_a_key(self):
        if self.watermark_logprobs and not self.watermark:
            raise ValueError("watermark_logprobs needs a watermark key file")
        return self


class HFBackend:
    """Generates with a local model through the continuous-batching engine, in this process."""

    name = "hf"
    Options = HFOptions
    # In flight at once: enough to keep the engine's batch full, few enough that a budget refusal stops work soon.
    IN_FLIGHT_PER_ROW = 4

    def __init__(self, model: str, options: HFOptions):
        from stillhouse.serve.engine import Engine

        self.model = model
        self.options = options
        self.engine = Engine(model, device=options.device, max_batch=options.batch_size, window_ms=2.0,
                             dtype=options.dtype, watermark=options.watermark,
                             watermark_logprobs=options.watermark_logprobs, quantize=options.quantize)
        self.tokenizer = self.engine.tokenizer
        self.fingerprint = self.engine.fingerprint

    @staticmethod
    def answer_identity(model: str, options: HFOptions) -> dict:
        """The model named by its weights (a model retrained in place gets new keys), the resolved
        compute dtype and any quantization, the logprobs asked for, and the watermark key's contents (not its path)."""
        src = Path(resolve_model(model))
        wm = None
        if options.watermark:
            from stillhouse.watermark import key_identity

            wm = key_identity(options.watermark)
        return {"backend": "hf", "model": model, "weights": dir_fingerprint(src) if src.exists() else None,
                "dtype": quantized_dtype(pick_device(options.device), options.dtype, options.quantize)[0],
                **({"quantize": options.quantize} if options.quantize != "none" else {}),
                "top_logprobs": options.top_logprobs, "watermark": wm,
                **({"watermark_logprobs": True} if options.watermark_logprobs else {})}

    def generate(self, requests: list[Request], progress: Callable[[int], None] | None = None,
                 admit: Callable[[int], bool] | None = None) -> Iterator[tuple[int, Completion]]:
        from stillhouse.serve.engine import GenRequest

        tok = self.tokenizer
        # shortest prompts first: rows that start together end together, and the batch wastes less on padding
        texts = [tok.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True) for r in requests]
        order = iter(sorted(range(len(requests)), key=lambda i: len(texts[i])))
        top = self.options.top_logprobs
        pending: dict = {}
        limit = max(1, self.options.batch_size * self.IN_FLIGHT_PER_ROW)
        stopped = False
        try:
            while True:
                while not stopped and len(pending) < limit:
                    i = next(order, None)
                    if i is None or (admit is not None and not admit(i)):
                        stopped = True
                        break
                    r = requests[i]
                    ids = tok(texts[i], add_special_tokens=False)["input_ids"]
                    g = GenRequest(ids, r.max_tokens, r.temperature, r.top_p, r.seed, [], top if top else None)
                    pending[self.engine.submit(g)] = (i, len(ids))
                if not pending:
                    return
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for fut in done:
                    i, n_prompt = pending.pop(fut)
                    res = fut.result()
                    reasoning, _ = split_reasoning(res.text)
                    extra = {"logprobs": self._logprobs(res.logprobs)} if top else {}
                    if progress:
                        progress(1)
                    yield i, Completion(text=res.text, reasoning=reasoning, prompt_tokens=n_prompt,
                                        completion_tokens=len(res.token_ids),
                                        finish_reason="stop" if res.finish_reason == "stop" else "length",
                                        model=self.model, system_fingerprint=self.fingerprint, extra=extra)
        finally:
            for fut in pending:
                fut.cancel()

    def _logprobs(self, entries: list[dict] | None) -> list[dict]:
        """The engine's (id, logprob) entries in the ledger's shape: OpenAI's, with token ids beside the strings."""
        conv = self.tokenizer.convert_ids_to_tokens
        return [{"id": e["id"], "token": conv(e["id"]), "logprob": e["logprob"],
                 "top_logprobs": [{"id": j, "token": conv(j), "logprob": v} for j, v in e["top"]]}
                for e in entries or []]

    def close(self) -> None:
        self.engine.close()
