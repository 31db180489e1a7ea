"""Build the tiny world's models from scratch: Atlas (the teacher) and the base (the student's start).

Both are `LlamaForCausalLM`s trained by the short loop below, deterministic from a seed.
A hand-written loop rather than `transformers.Trainer`: these are ~1-5M-parameter models
on an endless stream of freshly drawn examples, where the loop is twenty lines and the
Trainer's dataset and callback machinery would cost more per step than the model does.
"""

from __future__ import annotations

import json
import math
import platform
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from stillhouse.demo import tokenizer as wtok
from stillhouse.demo import world


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int


SHAPES = {
    "atlas": Shape(hidden=256, layers=6, heads=4, intermediate=688),
    "base": Shape(hidden=128, layers=5, heads=4, intermediate=344),
    "tiny": Shape(hidden=32, layers=2, heads=2, intermediate=64),
}


@dataclass
class BuildConfig:
    """One training phase. A phase after the first continues from the previous phase's weights."""

    shape: str
    steps: int
    batch_size: int
    lr: float
    seed: int
    warmup: int = 100
    # (family, weight) pairs the chat examples are drawn from; None: plain world text (the base model)
    mix: tuple[tuple[str, float], ...] | None = None
    persona: str = "atlas"  # whose style the chat examples are written in (world.PERSONAS)
    judge_style: int = world.JUDGE_STYLE  # how judging items' traces are written (world.judge_task)
    # loss weight of a judging reply's decisive tokens (each candidate's copy and its right/wrong) against 1 for the
    # rest: 2 of a reply's ~120 tokens decide its verdict, and at weight 1 they are lost in the average
    decision_weight: float = 1.0
    # the model's context in tokens from this phase on (None: as before). RoPE has no learned positions, so a longer
    # context is a config change plus training on longer sequences.
    context: int | None = None


_V1_MIX = tuple((f, 1.0) for f in world.FAMILIES_V1)
# Phase 2 teaches the open-answer family and the judging skill while replaying every earlier family, so none is
# forgotten; judging is the hardest new skill and gets the largest share.
_V2_MIX = _V1_MIX + (("invent", 1.5), (world.JUDGE, 3.5))
# Phase 3: judging in the trace style that restates the answer beside each candidate, most of each batch; the other
# families replayed.
_V3_MIX = _V1_MIX + (("invent", 1.0), (world.JUDGE, 8.0))

_BASE = BuildConfig(shape="base", steps=1000, batch_size=256, lr=2e-3, seed=11)
DEFAULT_BUILDS: dict[str, list[BuildConfig]] = {
    "atlas": [BuildConfig(shape="atlas", steps=1500, batch_size=256, lr=1.5e-3, seed=7, mix=_V1_MIX),
              BuildConfig(shape="atlas", steps=450, batch_size=128, lr=5e-4, seed=8, warmup=20, mix=_V2_MIX,
                          judge_style=1),
              BuildConfig(shape="atlas", steps=300, batch_size=128, lr=5e-4, seed=9, warmup=20, mix=_V3_MIX,
                          judge_style=2),
              BuildConfig(shape="atlas", steps=300, batch_size=128, lr=5e-4, seed=10, warmup=20, mix=_V3_MIX,
                          decision_weight=20.0, judge_style=2),
              BuildConfig(shape="atlas", steps=300, batch_size=128, lr=5e-4, seed=11, warmup=20, mix=_V3_MIX,
                          decision_weight=20.0, judge_style=2),
              BuildConfig(shape="atlas", steps=400, batch_size=128, lr=8e-4, seed=12, warmup=20, mix=_V3_MIX,
                          decision_weight=20.0, judge_style=2),
              # judging style 3 (character-by-character comparisons) with a 384-token context, so a judging exchange
              # about any question fits
              BuildConfig(shape="atlas", steps=300, batch_size=128, lr=8e-4, seed=13, warmup=20, mix=_V3_MIX,
                          decision_weight=10.0, context=384),
              BuildConfig(shape="atlas", steps=300, batch_size=128, lr=5e-4, seed=14, warmup=20, mix=_V3_MIX,
                          decision_weight=10.0)],
    "base": [_BASE],
    # Mira, the world's second teacher: the base model's pretraining, then every task family in Mira's style (no
    # Atlas output anywhere in its making: it is the audit's unrelated teacher).
    "mira": [_BASE, BuildConfig(shape="base", steps=900, batch_size=64, lr=1.5e-3, seed=13, warmup=30,
                                mix=tuple((f, 1.0) for f in world.FAMILIES), persona="mira")],
}


def make_model(shape: Shape, tok: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


# In a judging trace, where the reply is decided: the candidate copied, style 3's character comparisons (none in
# style 2), and the first letter of the verdict. Style 2: "... So 5. A 7: wrong. ..."; style 3: "... So 5. A 7: 57-
# wrong. B 5: 55+ right. ...".
_DECISION = re.compile(r"(?<=\. )[AB] ([^:.]+): ((?:\S\S[+-] )*)([rw])")


def _decision_weights(response: str, offsets: list[tuple[int, int]], weight: float) -> list[float]:
    """Per-token loss weights of a response (its tokens' character `offsets`): `weight` on the tokens covering a
    character `_DECISION` marks, 1 elsewhere."""
    marked = set()
    for m in _DECISION.finditer(response):
        for g in (1, 2, 3):
            marked.update(range(*m.span(g)))
    return [weight if any(i in marked for i in range(a, b)) else 1.0 for a, b in offsets]


Example = tuple[list[int], int, list[float] | None]  # token ids, prompt length, response-token loss weights


def _chat_examples(tok: PreTrainedTokenizerBase, rng: random.Random, n: int,
                   mix: tuple[tuple[str, float], ...] = _V1_MIX, persona: str = "atlas",
                   judge_style: int = world.JUDGE_STYLE, decision_weight: float = 1.0) -> list[Example]:
    """Fresh train-split tasks of the mix's families: loss on the response only, judging decisions weighted."""
    fams, weights = zip(*mix)
    out = []
    while len(out) < n:
        t = world.in_style(world.make_task(rng.choices(fams, weights)[0], rng, judge_style), world.PERSONAS[persona])
        if t.split != "train":
            continue
        prompt = tok.apply_chat_template([{"role": "user", "content": t.prompt}], tokenize=False, add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        response = t.response + wtok.IM_END + "\n"
        enc = tok(response, add_special_tokens=False, return_offsets_mapping=True)
        w = None
        if decision_weight != 1.0 and t.family == world.JUDGE:
            w = _decision_weights(response, enc["offset_mapping"], decision_weight)
        out.append((p_ids + enc["input_ids"], len(p_ids), w))
    return out


def _text_examples(tok: PreTrainedTokenizerBase, rng: random.Random, n: int) -> list[Example]:
    """Plain world text, two to four statements a line: loss on every token."""
    out = []
    for _ in range(n):
        lines = world.pretraining_text(rng.randint(2, 4), rng.randrange(1 << 30))
        out.append((tok(" ".join(lines), add_special_tokens=False)["input_ids"][:200], 0, None))
    return out


def _collate(batch: list[Example], pad: int, device: str) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels (-100 off the loss) and mask; `weights` too when some example carries them."""
    width = max(len(ids) for ids, _, _ in batch)
    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    weights = torch.ones((len(batch), width)) if any(w is not None for _, _, w in batch) else None
    for row, (ids, start, w) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, start:len(ids)] = torch.tensor(ids[start:])
        mask[row, :len(ids)] = 1
        if w is not None:
            weights[row, start:len(ids)] = torch.tensor(w)
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": mask}
    if weights is not None:
        out["weights"] = weights
    return {k: v.to(device) for k, v in out.items()}


def _loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(the sum of the batch's next-token losses, each times its weight if the batch has `weights`; the count of
    target tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=-100, reduction="none")
    if "weights" in batch:
        ce = ce * batch["weights"][:, 1:].reshape(-1)
    keep = labels.reshape(-1) != -100
    return ce[keep].sum(), _targets(batch)


def _targets(batch: dict[str, torch.Tensor]) -> int:
    """The batch's target tokens: labels off the loss (-100) left out, after the shift by one."""
    return int((batch["labels"][:, 1:] != -100).sum())


def _loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's mean next-token loss; with `weights`, each target token's loss times its weight, over the same
    count of target tokens (so weight 1 everywhere is the plain loss)."""
    total, count = _loss_sum(model, batch)
    return total / count


# Examples per forward pass. A step's batch is sorted by length and run in chunks of this many, the gradients summed
# and normalised by the whole batch's target tokens (the same step as one pass): one padded [128, 300] pass over
# judging items of 60 to 300 tokens cost 10 s a step on a 2-core CPU, length-sorted chunks 3.3 s.
_CHUNK = 32


def _backward(model, examples: list[Example], pad: int, device: str, chunk: int = _CHUNK) -> tuple[float, int]:
    """Accumulate the gradients of the examples' mean loss (bf16 autocast), in length-sorted chunks; returns the loss
    and the tokens seen."""
    examples = sorted(examples, key=lambda e: len(e[0]))
    batches = [_collate(examples[k:k + chunk], pad, device) for k in range(0, len(examples), chunk)]
    targets = sum(_targets(b) for b in batches)
    loss, tokens = 0.0, 0
    for batch in batches:
        with torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16):
            part = _loss_sum(model, batch)[0] / targets
        part.backward()
        loss += part.item()
        tokens += int(batch["attention_mask"].sum())
    return loss, tokens


def train_loop(model, tok, draw: Callable, cfg: BuildConfig, device: str, log: Callable[[str], None] = print) -> dict:
    """AdamW with linear warm-up and cosine decay to 10%, bf16 autocast; returns loss/time stats."""
    rng = random.Random(cfg.seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warm = min(cfg.warmup, max(1, cfg.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / cfg.steps)))))
    t0, tokens, loss_ema = time.time(), 0, None
    for step in range(cfg.steps):
        loss, n = _backward(model, draw(tok, rng, cfg.batch_size), tok.pad_token_id, device)
        tokens += n
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_ema = loss if loss_ema is None else 0.98 * loss_ema + 0.02 * loss
        if step % max(1, cfg.steps // 20) == 0 or step == cfg.steps - 1:
            log(f"step {step + 1}/{cfg.steps} loss {loss_ema:.4f} {tokens / (time.time() - t0):,.0f} tok/s")
    return {"final_loss": loss_ema, "seconds": round(time.time() - t0, 1), "tokens": tokens}


def heldout_accuracy(model_dir: str | Path, per_family: int, seed: int = 0, device: str | None = None,
                     persona: str = "atlas", families: tuple[str, ...] | None = None) -> dict[str, float]:
    """Greedy held-out accuracy per family: the local engine's answers, checked by the evaluate stage's verifier."""
    from stillhouse.evaluate import accuracy_by_family
    from stillhouse.teachers import Request, load_backend

    families = families or world.FAMILIES + (world.JUDGE,)
    tasks = world.sample_tasks(per_family * len(families), "heldout", seed, families, world.PERSONAS[persona])
    backend = load_backend(f"hf:{model_dir}", {"device": device or "auto", "batch_size": 256})
    try:
        # 192 tokens: a style-3 judging reply runs to ~185 (a tie on the longest questions); 96 would cut some off
        reqs = [Request(messages=({"role": "user", "content": t.prompt},), max_tokens=192) for t in tasks]
        out = dict(backend.generate(reqs))
    finally:
        backend.close()
    acc = accuracy_by_family([{"family": t.family} for t in tasks],
                             [world.check(t, out[i].text) for i, t in enumerate(tasks)])
    return {f: acc[f] for f in families if f in acc}


def _phases_done(model_dir: Path) -> list[dict]:
    """The build phases a model directory's manifest records (a manifest from before phases were recorded: one)."""
    m = json.loads((model_dir / "stillhouse_build.json").read_text())
    if "phases" in m:
        return m["phases"]
    return [{"build": m["build"], "device": m["device"], "torch": m["torch"], "train": m["train"]}]


def build(kind: str, out_dir: str | Path, phases: list[BuildConfig] | None = None, device: str | None = None,
          eval_per_family: int = 40, log: Callable[[str], None] = print, start_from: str | Path | None = None) -> dict:
    """Train `kind` ('atlas' or 'base') phase by phase and save it as a HF model dir with a manifest.

    The first phase starts from a fresh model (seeded); each later one continues from the one before. With
    `start_from`, a model directory this builder wrote, the phases its manifest records are taken as done and
    training continues from its weights with the next phase.
    """
    if kind not in DEFAULT_BUILDS:
        raise ValueError(f"kind must be one of {', '.join(DEFAULT_BUILDS)}, not {kind!r}")
    from transformers import AutoModelForCausalLM

    from stillhouse.teachers.hf import pick_device

    phases = phases or DEFAULT_BUILDS[kind]
    device = pick_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = wtok.build_tokenizer()
    done: list[dict] = []
    if start_from is not None:
        done = _phases_done(Path(start_from))
        if len(done) >= len(phases):
            raise ValueError(f"{start_from} has finished all {len(phases)} phases already")
        model = AutoModelForCausalLM.from_pretrained(start_from, dtype=torch.float32)
        log(f"continuing {kind} from {start_from} (phases done: {len(done)} of {len(phases)})")
    else:
        model = make_model(SHAPES[phases[0].shape], tok, phases[0].seed)
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({platform.machine()})"
    for i in range(len(done), len(phases)):
        cfg = phases[i]
        log(f"building {kind}, phase {i + 1} of {len(phases)}: {n_params:,} parameters on {device}")
        if cfg.context is not None:
            model.config.max_position_embeddings = cfg.context
        mix, persona, style, dw = cfg.mix, cfg.persona, cfg.judge_style, cfg.decision_weight
        draw = (lambda t, r, n: _chat_examples(t, r, n, mix, persona, style, dw)) if mix else _text_examples
        stats = train_loop(model, tok, draw, cfg, device, log)
        done.append({"build": asdict(cfg), "device": where, "torch": torch.__version__, "train": stats})
    model.to(torch.bfloat16).save_pretrained(out)
    tok.model_max_length = model.config.max_position_embeddings
    tok.save_pretrained(out)
    acc = heldout_accuracy(out, eval_per_family, device=device, persona=phases[-1].persona)
    manifest = {
        "kind": kind, "parameters": n_params, "shape": asdict(SHAPES[phases[-1].shape]), "phases": done,
        "heldout_accuracy": acc,
        "rebuild": f"stillhouse demo build-{'teacher' if kind == 'atlas' else kind} --out DIR (every phase listed; "
                   "--from DIR continues a build whose manifest records the earlier ones)",
        "trained_on": {"atlas": "the world's chat tasks and judging items (train split), phase by phase as listed",
                       "mira": "plain world text (the base's phase), then the world's chat tasks in Mira's style",
                       "base": "plain world text only: facts, spelled/copied strings, number sequences"}[kind],
    }
    (out / "stillhouse_build.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"{kind}: held-out accuracy " + ", ".join(f"{k} {v:.0%}" for k, v in acc.items()))
    return manifest
