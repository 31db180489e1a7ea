"""Supervised fine-tuning of a student on chat samples with TRL's `SFTTrainer`, optionally LoRA via PEFT."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from stillhouse.errors import StillhouseError


@dataclass
class SFTResult:
    parameters: int
    trainable_parameters: int
    steps: int
    seconds: float
    tokens_per_second: float
    final_loss: float | None
    dropped_too_long: int = 0
    resumed_from_step: int | None = None  # the checkpoint's step this run continued from
    rank_checksums: list[list[float]] | None = None  # data parallel: per rank, each parameter's sum and sum of squares
    kd: dict | None = None  # logit distillation: how many samples and tokens had the teacher's distribution
    # the system prompt the base's chat template injected into conversations without one ("You are Qwen, created by
    # Alibaba Cloud. ...") and what the student's template injects instead (its declared identity, or nothing)
    template_system_prompt: dict | None = None


# Padding-free batches on CPU. TRL's `padding_free=True` flattens a batch into one row with `position_ids` restarting at 0
# for each sequence and `cu_seq_lens_q` marking the boundaries; only FlashAttention reads those, and plain SDPA on CPU
# would either leak attention across sequences or (with transformers' block-diagonal mask) pay for the whole row squared.
# This attention scatters the row's sequences into a right-padded [sequences, heads, longest, dim] block and makes one
# causal SDPA call: with right padding, causality alone keeps every real token from seeing a pad or another sequence,
# so no mask is built. Only the attention sees the padding; the projections and MLPs, most of the FLOPs, run on the
# flat row. Same loss and gradients as the padded batch (tested). Anything else (a padding mask, decoding, no
# boundaries) goes to the stock SDPA path with transformers' own mask.
VARLEN_ATTENTION = "stillhouse_varlen_sdpa"


def _varlen_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or query.shape[2] == 1 or key.shape[2] != query.shape[2]:
        if attention_mask is None and query.shape[0] == 1 and query.shape[2] > 1 and kwargs.get("position_ids") is not None:
            pos = kwargs["position_ids"].reshape(-1)
            if bool((pos[1:] == 0).any()):  # packed sequences without their boundaries: never attend across them
                raise ValueError("padding-free attention got packed sequences without cu_seq_lens_q")
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    cu = cu.to(device=query.device, dtype=torch.long)
    lens = cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(len(lens), device=query.device), lens)  # each token's sequence
    pos = torch.arange(query.shape[2], device=query.device) - cu[seq]  # and its place in it

    def padded(x):  # [1, heads, tokens, dim] → [sequences, heads, longest, dim], zeros after each sequence's end
        block = x.new_zeros(len(lens), x.shape[1], int(lens.max()), x.shape[3])
        block[seq, :, pos] = x[0].transpose(0, 1)
        return block

    # One call for the batch. Length-sorted groups (less padding: 1.9x the needed attention work for 64 demo samples
    # in one block, ~1.1x in four) measured no faster: the smaller calls cost what the padding did.
    out = torch.nn.functional.scaled_dot_product_attention(padded(query), padded(key), padded(value),
                                                           dropout_p=dropout, scale=scaling, is_causal=True)
    return out[seq, :, pos].unsqueeze(0), None  # back to the flat row: [1, tokens, heads, dim]


def _varlen_mask(batch_size: int, *args, attention_mask=None, **kwargs):
    """No mask for one row without padding (the training batch): `_varlen_sdpa` separates its sequences by their
    boundaries, and transformers' block-diagonal mask for a 5,000-token row cost a quarter of each step."""
    from transformers.masking_utils import sdpa_mask

    if batch_size == 1 and attention_mask is None:
        return None
    return sdpa_mask(batch_size, *args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> str:
    """Register the padding-free SDPA with transformers (idempotent) and return its name for `attn_implementation`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN_ATTENTION, _varlen_sdpa)
    AttentionMaskInterface.register(VARLEN_ATTENTION, _varlen_mask)
    return VARLEN_ATTENTION


def _as_prompt_completion(rows: list[dict]) -> list[dict]:
    """OpenAI chat `messages` → TRL's conversational prompt/completion pairs (loss on the completion)."""
    out = []
    for r in rows:
        msgs = _ending_on_the_answer(r["messages"])
        out.append({"prompt": msgs[:-1], "completion": [msgs[-1]]})
    return out


def _ending_on_the_answer(messages) -> list[dict]:
    msgs = list(messages)
    if not msgs or msgs[-1]["role"] != "assistant":
        raise ValueError("each sample's messages must end with the assistant's answer")
    return msgs


def sft(rows: list[dict], base: str, out_dir: str | Path, *, epochs: float, learning_rate: float, batch_size: int,
        max_length: int, seed: int, warmup_ratio: float = 0.05, lora: dict | None = None, device: str = "auto",
        on_step: Callable[[int, int, float | None], None] | None = None, padding_free: bool = True,
        kd: dict | None = None, teacher_logprobs: list[list[dict] | None] | None = None,
        callbacks: list | None = None, identity: dict | None = None, teacher: str | None = None,
        checkpoint_dir: str | Path | None = None, save_steps: int = 0) -> SFTResult:
    """Fine-tune the model at `base` on `rows` (each with `messages`) and save it to `out_dir`.

    `padding_free` (the default) trains on each batch flattened into one row without pad tokens (same samples per
    step, same loss); `False` pads each batch to its longest sample as before.

    `kd` (loss, alpha, beta, min_aligned: `stillhouse.train.kd`) adds logit distillation towards
    `teacher_logprobs`, the ledger's per-token logprob entries of each row's answer (None where there are none).
    With `kd["source"] == "teacher"` it distils instead the whole next-token distribution of the local model at
    `teacher`, run beside the student (`stillhouse.train.kd.teacher_kd_setup`).

    A chat template that injects a default system prompt into a conversation without one (SmolLM2's, Qwen2.5's: the
    teacher's identity, for a student made from the teacher's tokenizer) is rewritten before any sample is rendered
    to inject `identity`'s instead ("You are Nova, made by Northwind."; name and maker), or nothing without one: the
    samples are learned under it, and the saved student's template keeps it (`stillhouse.templates`).

    Checkpoints go to `checkpoint_dir` (default `out_dir/_trainer`) every `save_steps` steps (0: only at SIGTERM or
    SIGINT, which stop training with a checkpoint and raise `TrainingInterrupted`); the newest complete one there is
    resumed from (`stillhouse.train.resume`). Under a launcher (torchrun, accelerate: `stillhouse.train.launch`)
    `batch_size` is the global batch, split over the processes, and only the main process writes `out_dir`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from stillhouse.templates import identity_system_prompt, replace_injected_system_prompt

    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    own_prompt = identity_system_prompt(identity)
    injected = replace_injected_system_prompt(tok, own_prompt)  # before any rendering: training and the saved template
    attn = register_varlen_attention() if padding_free else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation=attn)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32), lora_dropout=lora.get("dropout", 0.0),
                                 target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM")
    # Over-long samples are dropped rather than truncated: a cut-off answer teaches the student to stop mid-answer.
    if kd is None:
        lengths = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
                   for r in rows]
    else:
        encoded = [_encode(tok, r["messages"]) for r in rows]
        lengths = [len(ids) for ids, _ in encoded]
    keep = [n <= max_length for n in lengths]
    kept = [r for r, k in zip(rows, keep) if k]
    if not kept:
        raise ValueError(f"every sample is longer than max_length={max_length} tokens")
    trainer_class, extra, kd_counts = SFTTrainer, {}, None
    if kd is None:
        data = Dataset.from_list(_as_prompt_completion(kept))
    elif kd.get("source", "ledger") == "teacher":
        from stillhouse.train.kd import teacher_kd_setup

        data, trainer_class, extra, kd_counts = teacher_kd_setup(
            tok, [e for e, k in zip(encoded, keep) if k], kd, teacher, attn, "cuda" if use_cuda else "cpu", rows=kept)
    else:
        from stillhouse.train.kd import align, check_alignment, kd_trainer_class

        enc = [e for e, k in zip(encoded, keep) if k]
        lps = [lp for lp, k in zip(teacher_logprobs or [None] * len(rows), keep) if k]
        a = align([(ids[n:], r["messages"][-1]["content"], lp) for (ids, n), r, lp in zip(enc, kept, lps)], tok)
        check_alignment(a, kd.get("min_aligned", 0.5))
        data = Dataset.from_list([{"input_ids": ids, "labels": [-100] * n + ids[n:], "kd_ids": a.ids[k],
                                   "kd_logprobs": a.logprobs[k]} for k, (ids, n) in enumerate(enc)])
        trainer_class = kd_trainer_class()
        extra = {"kd": {k: kd[k] for k in ("loss", "alpha", "beta")}}
        kd_counts = {"samples": len(kept), "samples_with_logprobs": a.samples_with_logprobs,
                     "samples_aligned": a.samples_aligned, "tokens_with_teacher_distribution": a.tokens}
    # transformers 5.24 renamed `gradient_checkpointing` to `activation_checkpointing` (the old name warns until v6)
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__
                     else "gradient_checkpointing")
    from stillhouse.train.resume import Checkpoints, TrainingInterrupted, is_main_process, prepare_if_alone, step_of

    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(out_dir) / "_trainer"
    resume_from = prepare_if_alone(ckpt_dir)
    args = SFTConfig(
        output_dir=str(ckpt_dir),
        num_train_epochs=epochs, learning_rate=learning_rate, per_device_train_batch_size=per_process_batch(batch_size),
        lr_scheduler_type="cosine", warmup_steps=warmup_ratio, weight_decay=0.01,
        # Over-long samples are already dropped above; TRL refuses a max_length with padding_free and no packing.
        max_length=None if padding_free else max_length, padding_free=padding_free,
        # TRL turns both on by default. Checkpointing only costs time at the sizes that fit one
        # machine's memory anyway; bf16 autocast pays on a GPU but made CPU steps ~17% slower here.
        **{checkpointing: False}, bf16=use_cuda, use_cpu=not use_cuda,
        completion_only_loss=True, logging_steps=5, report_to=[], seed=seed, data_seed=seed,
        # two kept: the newest may be one a kill cut short (not marked complete), and then the one before is resumed
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or None, save_total_limit=2,
        ddp_find_unused_parameters=False,  # (under DDP) every trainable parameter takes part in every step
        dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=kd is None,  # the teacher's slots ride beside the tokens to the KD collator
    )

    class _Progress(TrainerCallback):
        loss: float | None = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                _Progress.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kw):
            if on_step:
                on_step(state.global_step, state.max_steps, _Progress.loss)

    stopper = Checkpoints()
    trainer = trainer_class(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config,
                            callbacks=[_Progress(), stopper, *(callbacks or [])], **extra)  # `callbacks`: e.g. train.progress
    trainer.remove_callback(PrinterCallback)  # progress goes to our bar, not to printed dicts
    t0 = time.time()
    try:
        out = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stopper.restore()
    seconds = time.time() - t0
    if stopper.signum is not None and trainer.state.global_step < trainer.state.max_steps:
        import signal

        name = signal.Signals(stopper.signum).name
        raise TrainingInterrupted(f"training stopped by {name} at step {trainer.state.global_step} of "
                                  f"{trainer.state.max_steps}; its checkpoint is in {ckpt_dir}: run the same command "
                                  "again to resume from it", stopper.signum)
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    checksums = rank_checksums(model)  # (a collective: every rank takes part)
    if peft_config is not None:
        model = model.merge_and_unload()
    if is_main_process():  # the other ranks hold the same weights (DDP); one writes them
        model.config.use_cache = True
        model.set_attn_implementation("sdpa")  # the saved student must load where this module's attention is not registered
        model.save_pretrained(str(out_dir))
        tok.padding_side = "left"
        tok.save_pretrained(str(out_dir))
    # tokens this session trained on: a resumed run counts only the steps it made
    done = (out.global_step - step_of(resume_from)) / max(out.global_step, 1) if resume_from else 1.0
    n_tokens = sum(n for n in lengths if n <= max_length) * epochs * done
    return SFTResult(
        parameters=sum(p.numel() for p in model.parameters()),
        trainable_parameters=trainable,
        steps=out.global_step, seconds=round(seconds, 2), tokens_per_second=round(n_tokens / max(seconds, 1e-9), 1),
        final_loss=_Progress.loss, dropped_too_long=len(rows) - len(kept), kd=kd_counts,
        template_system_prompt={"injected": injected, "replaced_by": own_prompt} if injected else None,
        resumed_from_step=step_of(resume_from) if resume_from else None, rank_checksums=checksums,
    )


def per_process_batch(batch_size: int) -> int:
    """Each process's share of the global batch `batch_size` (the recipe's): the same samples per optimizer step,
    and so the same training, whatever the number of processes."""
    from stillhouse.train.resume import world_size

    n = world_size()
    if batch_size % n:
        raise StillhouseError(f"train.batch_size {batch_size} is the global batch and must divide evenly among the "
                              f"{n} training processes; make it a multiple of {n}")
    return batch_size // n


def rank_checksums(model) -> list[list[float]] | None:
    """Under data parallelism, each rank's sum and sum of squares of every parameter tensor (one all-gather of two
    numbers per tensor), so that a run records that its ranks ended with the same weights; None in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    params = list(model.parameters())
    device = params[0].device if params[0].device.type != "meta" else torch.device("cpu")
    mine = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()]) for p in params])
    mine = mine.flatten().to(device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    return [t.cpu().tolist() for t in every]


def _encode(tok, messages: list[dict]) -> tuple[list[int], int]:
    """A chat sample's token ids and where its answer starts, as TRL's prompt/completion tokenization makes them
    (the prompt with the generation prompt; the answer from where prompt and full conversation diverge)."""
    msgs = _ending_on_the_answer(messages)
    prompt = tok.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    full = tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), min(len(prompt), len(full)))
    return list(full), n
