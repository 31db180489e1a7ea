"""Logit distillation from the teacher's logprobs in the ledger: the student learns the teacher's next-token
distribution at every answer token, not only the token the teacher happened to sample.

An API teacher returns at most its top-k alternatives per token (OpenAI: k <= 20), so the target is a coarse-grained
distribution: the k listed tokens plus one "everything else" bucket holding the mass they leave. The student's
distribution is coarse-grained the same way (its probability of each listed token, and the rest), and the divergence
is taken between the two (k+1)-way distributions. That is exact for what the API tells us, and by the data-processing
inequality a lower bound on the divergence over the full vocabulary. TRL's distillation trainers need the teacher's
full logits from a local model, which an API teacher never gives, hence this module.

Alignment: the teacher's tokens are matched to the student's tokenization of the same answer, token by token (by id
where the ledger has ids, else by each token's text). Logit distillation is only meaningful with the teacher's
tokenizer; answers whose tokens do not line up (a different tokenizer, or an answer curation rewrote) are learned
from their text alone, and a run where too few line up is refused.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from stillhouse.errors import StillhouseError

LOSSES = ("forward_kl", "reverse_kl", "jsd")
HOW_TO_GET_LOGPROBS = ("generate with them (teacher.options: logprobs: true, top_logprobs: 20 for an OpenAI-compatible "
                       "teacher; top_logprobs: 20 for an hf one)")
_EPS = 1e-6  # floor on a bucket's probability: the teacher's "rest" can round to <= 0, and log 0 has no gradient


@dataclass
class Alignment:
    """Per sample, per completion token: the teacher's (student token id, logprob) pairs, or an empty list."""
    ids: list[list[list[int]]]
    logprobs: list[list[list[float]]]
    samples_with_logprobs: int  # rows whose ledger entry has logprobs
    samples_aligned: int  # of those, rows whose tokens matched the student's tokenization of the answer
    tokens: int  # answer tokens given a teacher distribution
    first_mismatch: str | None  # a readable example of a row that did not line up


class _TokenText:
    """Token id <-> the text OpenAI-style APIs report for it (the token decoded alone), built once, lazily."""

    def __init__(self, tok):
        self.tok = tok
        self._to_id: dict[str, int | None] | None = None

    def text(self, i: int) -> str:
        return self.tok.decode([i])

    def id_of(self, text: str) -> int | None:
        if self._to_id is None:
            m: dict[str, int | None] = {}
            for i in range(len(self.tok)):
                s = self.tok.decode([i])
                m[s] = None if s in m else i  # two ids that decode alike: neither can be told from the text
            self._to_id = m
        return self._to_id.get(text)


def _same(student_id: int, entry: dict, tt: _TokenText) -> bool:
    if entry.get("id") is not None:
        return int(entry["id"]) == student_id
    return tt.text(student_id) == entry.get("token")


def align_sample(completion_ids: list[int], content: str, entries: list[dict] | None, tt: _TokenText):
    """The teacher's distributions for one sample's completion tokens, or (None, why) where they do not line up.

    The teacher's tokens must appear as one run in the completion (the chat template may put tokens before the answer
    and after it) and spell exactly the answer the student is trained on."""
    if not entries:
        return None, None
    first = next((s for s, i in enumerate(completion_ids) if _same(i, entries[0], tt)), None)
    if first is None:
        return None, f"the teacher's first token {entries[0].get('token')!r} is not one of the student's"
    n = 0
    while n < len(entries) and first + n < len(completion_ids) and _same(completion_ids[first + n], entries[n], tt):
        n += 1
    spelled = tt.tok.decode(completion_ids[first:first + n], skip_special_tokens=True)
    if spelled != content:
        where = first + n
        got = tt.text(completion_ids[where]) if where < len(completion_ids) else "(end)"
        want = entries[n].get("token") if n < len(entries) else "(end)"
        return None, f"at answer token {n}: teacher {want!r}, student {got!r}"
    ids: list[list[int]] = [[] for _ in completion_ids]
    lps: list[list[float]] = [[] for _ in completion_ids]
    for j, e in enumerate(entries[:n]):
        slots: dict[int, float] = {}
        chosen = {"id": completion_ids[first + j], "logprob": e.get("logprob")}
        for alt in [*(e.get("top_logprobs") or []), chosen]:
            i = alt.get("id")
            i = tt.id_of(alt.get("token", "")) if i is None else int(i)
            lp = alt.get("logprob")
            if i is not None and lp is not None and math.isfinite(lp) and i not in slots:
                slots[i] = float(lp)
        ids[first + j], lps[first + j] = list(slots), list(slots.values())
    return (ids, lps), None


def align(samples: list[tuple[list[int], str, list[dict] | None]], tok) -> Alignment:
    """`samples`: (completion token ids, the answer's text, the ledger's logprob entries or None) per row."""
    tt = _TokenText(tok)
    out_ids, out_lps, with_lp, aligned, tokens, mismatch = [], [], 0, 0, 0, None
    for k, (comp, content, entries) in enumerate(samples):
        got, why = align_sample(comp, content, entries, tt)
        with_lp += bool(entries)
        if got is None:
            out_ids.append([[] for _ in comp])
            out_lps.append([[] for _ in comp])
            if why and mismatch is None:
                mismatch = f"sample {k}: {why}"
            continue
        aligned += 1
        tokens += sum(1 for r in got[0] if r)
        out_ids.append(got[0])
        out_lps.append(got[1])
    return Alignment(out_ids, out_lps, with_lp, aligned, tokens, mismatch)


def check_alignment(a: Alignment, min_aligned: float) -> None:
    """Refuse a run whose teacher tokens mostly do not match the student's tokenizer."""
    if a.samples_with_logprobs == 0:
        raise StillhouseError("train.method kd: none of the curated samples has the teacher's logprobs in the ledger; "
                              + HOW_TO_GET_LOGPROBS)
    share = a.samples_aligned / a.samples_with_logprobs
    if share < min_aligned:
        raise StillhouseError(
            f"train.kd: the teacher's tokens line up with the student's tokenization in only {a.samples_aligned} of "
            f"{a.samples_with_logprobs} samples ({share:.0%}, below kd.min_aligned={min_aligned:.0%}; first: "
            f"{a.first_mismatch}). The ledger's top-k needs the teacher's tokenizer; a local teacher with another "
            "one is distilled with kd.source: teacher (aligned by characters); method: sft learns from the text alone")


class KDCollator:
    """Wraps TRL's collator: the teacher's slots of every completion token in the batch, in the order the completion
    tokens appear in the (flattened or padded) batch, as `kd_ids` [tokens, k] and `kd_logprobs` (-inf: no slot)."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples: list[dict]) -> dict:
        rows_i = [r for e in examples for r in e["kd_ids"]]
        rows_l = [r for e in examples for r in e["kd_logprobs"]]
        out = self.base([{k: v for k, v in e.items() if k not in ("kd_ids", "kd_logprobs")} for e in examples])
        k = max([1, *map(len, rows_i)])
        ids = torch.zeros(len(rows_i), k, dtype=torch.long)
        lps = torch.full((len(rows_i), k), -math.inf)
        for t, (a, b) in enumerate(zip(rows_i, rows_l)):
            if a:
                ids[t] = a[0]  # unused slots repeat a listed id; their logprob stays -inf and masks them out
                ids[t, :len(a)] = torch.tensor(a)
                lps[t, :len(b)] = torch.tensor(b)
        out["kd_ids"], out["kd_logprobs"] = ids, lps
        return out


def kd_loss_sum(logits: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, lps: torch.Tensor, *, loss: str,
                alpha: float, beta: float = 0.5) -> torch.Tensor:
    """Summed per-token loss over completion tokens: `logits` [T, V], `targets` [T] (the sampled tokens),
    `ids`/`lps` [T, k] the teacher's slots. A token with teacher slots costs (1 - alpha) * cross-entropy +
    alpha * divergence; a token without them, cross-entropy alone."""
    logq = logits.float().log_softmax(-1)
    ce = -logq.gather(1, targets[:, None])[:, 0]
    has = torch.isfinite(lps).any(-1)
    if alpha == 0 or not bool(has.any()):
        return ce.sum()
    lq, lp = logq[has].gather(1, ids[has]), lps[has]
    valid = torch.isfinite(lp)
    lp = lp.masked_fill(~valid, 0.0)
    q_listed = (lq.exp() * valid).sum(-1)
    p_listed = (lp.exp() * valid).sum(-1)
    # the "everything else" bucket of each distribution; the student's through log1p so that its gradient survives
    lq_rest = torch.log1p(-q_listed.clamp(max=1 - _EPS))
    lp_rest = torch.log((1 - p_listed).clamp(min=_EPS))
    lq = torch.cat([lq, lq_rest[:, None]], 1)
    lp = torch.cat([lp, lp_rest[:, None]], 1)
    w = torch.cat([valid, torch.ones_like(valid[:, :1])], 1).to(lq.dtype)
    if loss == "forward_kl":  # KL(teacher || student): cover every token the teacher would say
        d = (w * lp.exp() * (lp - lq)).sum(-1)
    elif loss == "reverse_kl":  # KL(student || teacher): say only what the teacher would
        d = (w * lq.exp() * (lq - lp)).sum(-1)
    elif loss == "jsd":  # generalised Jensen-Shannon: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1 - beta) q
        if not 0 < beta < 1:
            raise ValueError("jsd needs 0 < beta < 1")
        lm = torch.logaddexp(math.log(beta) + lp, math.log(1 - beta) + lq)
        d = (w * (beta * lp.exp() * (lp - lm) + (1 - beta) * lq.exp() * (lq - lm))).sum(-1)
    else:
        raise ValueError(f"unknown distillation loss {loss!r} (one of {', '.join(LOSSES)})")
    per = ce.clone()
    per[has] = (1 - alpha) * ce[has] + alpha * d
    return per.sum()


def kd_trainer_class():
    """SFTTrainer with the loss above (imported late: TRL is seconds of start-up)."""
    from trl import SFTTrainer

    class KDTrainer(SFTTrainer):
        def __init__(self, *args, kd: dict, **kwargs):
            self.kd = kd
            super().__init__(*args, **kwargs)
            # TRL refuses a custom collator with padding-free batches; its own one is wrapped instead
            self.data_collator = KDCollator(self.data_collator)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids, lps, labels = inputs.pop("kd_ids"), inputs.pop("kd_logprobs"), inputs.pop("labels")
            out = model(**inputs, use_cache=False)
            target = labels[:, 1:]
            sel = target != -100
            if int(sel.sum()) != ids.shape[0]:  # the collator's rows must be exactly the batch's completion tokens
                raise RuntimeError(f"logit distillation: {int(sel.sum())} completion tokens, {ids.shape[0]} teacher rows")
            total = kd_loss_sum(out.logits[:, :-1][sel], target[sel], ids.to(sel.device), lps.to(sel.device), **self.kd)
            n = num_items_in_batch if num_items_in_batch is not None else sel.sum()
            loss = total / n
            return (loss, out) if return_outputs else loss

    return KDTrainer


# -- kd.source: teacher --------------------------------------------------------------------------------------------
# A local teacher runs beside the student and gives its whole next-token distribution at every answer token. Neither
# model's [tokens, vocabulary] logits are ever built: both project their last hidden states through their heads one
# [chunk_tokens, chunk_vocab] tile at a time, with TRL's chunked kernels (the ones its DistillationTrainer uses):
# `ChunkedDivergenceFunction` for the divergence and `ChunkedLogProbFunction` for the sampled token's cross-entropy,
# each with a Triton kernel on GPUs and a torch fallback elsewhere.

# TRL's divergence kernel's beta: 0 is KL(teacher || student), 1 is KL(student || teacher), between them the
# generalised JSD whose mixture gives the teacher weight beta (the kd section's own meaning of beta)
def _trl_beta(loss: str, beta: float) -> float:
    if loss == "forward_kl":
        return 0.0
    if loss == "reverse_kl":
        return 1.0
    if loss == "jsd":
        return beta
    raise ValueError(f"unknown distillation loss {loss!r} (one of {', '.join(LOSSES)})")


def set_chunks(tokens: int, vocab: int) -> None:
    """The tile TRL's chunked kernels project onto: at most `tokens` rows by `vocab` columns (fp32) per model.

    TRL reads them as module constants, in the forward and again in the backward, so they are set for the process
    (every KD run of one process uses the same recipe's values)."""
    from trl.kernels import chunked_divergence, chunked_logprob

    chunked_divergence.TOKEN_CHUNK_SIZE = chunked_logprob.TOKEN_CHUNK_SIZE = int(tokens)
    chunked_divergence.VOCAB_CHUNK_SIZE = int(vocab)


def full_kd_loss_sum(h_s: torch.Tensor, head_s, h_t: torch.Tensor, head_t, targets: torch.Tensor, *, loss: str,
                     alpha: float, beta: float = 0.5, chunk_vocab: int = 32768) -> torch.Tensor:
    """Summed per-token loss against the teacher's full distribution: `h_s` [T, H_s] and `h_t` [T, H_t] the two
    models' last hidden states before the answer tokens `targets` [T], `head_s`/`head_t` their output layers
    (`get_output_embeddings()`; same vocabulary). A token costs (1 - alpha) * cross-entropy + alpha * divergence,
    as in `kd_loss_sum` with every token of the vocabulary listed."""
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    w_s, b_s, w_t, b_t = head_s.weight, head_s.bias, head_t.weight, head_t.bias
    if w_s.shape[0] != w_t.shape[0]:  # rows past the tokenizer that one of the two padded its embeddings with
        v = min(w_s.shape[0], w_t.shape[0])
        w_s, w_t = w_s[:v], w_t[:v]
        b_s, b_t = (b_s[:v] if b_s is not None else None), (b_t[:v] if b_t is not None else None)
    total = h_s.new_zeros((), dtype=torch.float32)
    if alpha < 1:
        lp = ChunkedLogProbFunction.apply(h_s, w_s, b_s, targets, 1.0, min(chunk_vocab, w_s.shape[0]), None, 1.0, ())[0]
        total = total - (1 - alpha) * lp.float().sum()
    if alpha > 0:
        d, _ = ChunkedDivergenceFunction.apply(h_s, w_s, b_s, h_t.to(h_s.dtype), w_t, b_t, _trl_beta(loss, beta))
        total = total + alpha * d.float().sum()
    return total


def _backbone(model):
    """The decoder stack under the LM head (under a PEFT wrapper too): it returns hidden states, never logits."""
    if hasattr(model, "peft_config"):
        model = model.base_model.model
    return model.base_model


def load_teacher(path: str, attn: str, device) -> torch.nn.Module:
    """The local teacher, frozen, in eval mode, on `device` (bf16 on a GPU, fp32 elsewhere)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    t = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).to(device).eval()
    t.requires_grad_(False)
    return t


def teacher_kd_trainer_class():
    """SFTTrainer whose loss distils a local teacher's full distribution (chunked; `full_kd_loss_sum`)."""
    from trl import SFTTrainer

    class TeacherKDTrainer(SFTTrainer):
        def __init__(self, *args, kd: dict, teacher, **kwargs):
            self.kd = kd
            super().__init__(*args, **kwargs)
            self.teacher = teacher.to(kd.get("teacher_device") or self.args.device)
            # the divergence is taken where the student is: the teacher's hidden states come over each step, its
            # output layer once (a teacher on another device keeps its body there)
            head = self.teacher.get_output_embeddings()
            self.teacher_head = head if head.weight.device == self.args.device else \
                copy.deepcopy(head).to(self.args.device)
            set_chunks(kd["chunk_tokens"], kd["chunk_vocab"])

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            target = labels[:, 1:]
            sel = target != -100
            h_s = _backbone(model)(**inputs, use_cache=False).last_hidden_state[:, :-1][sel]
            with torch.no_grad():  # the same (flattened) batch: the two models share the tokenizer
                t_dev = self.teacher.device
                t_in = {k: v.to(t_dev) if torch.is_tensor(v) else v for k, v in inputs.items()}
                h_t = _backbone(self.teacher)(**t_in, use_cache=False).last_hidden_state[:, :-1][sel.to(t_dev)]
                h_t = h_t.to(h_s.device)
            m = model.base_model.model if hasattr(model, "peft_config") else model
            total = full_kd_loss_sum(h_s, m.get_output_embeddings(), h_t, self.teacher_head,
                                     target[sel], loss=self.kd["loss"], alpha=self.kd["alpha"], beta=self.kd["beta"],
                                     chunk_vocab=self.kd["chunk_vocab"])
            n = num_items_in_batch if num_items_in_batch is not None else sel.sum()
            loss = total / n
            return (loss, None) if return_outputs else loss

    return TeacherKDTrainer


def teacher_kd_setup(tok, encoded: list[tuple[list[int], int]], kd: dict, teacher: str, attn: str, device,
                     rows: list[dict] | None = None):
    """For `sft`: the dataset, trainer class, its extra arguments and the counts of a `kd.source: teacher` run.

    `encoded`: each kept sample's token ids and where its answer starts; `rows`: those samples (`messages`). A teacher whose tokenizer is the student's
    is distilled over the whole vocabulary; another tokenizer goes through `stillhouse.train.align`."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from stillhouse.train.align import same_vocabulary

    kd = {"loss": "forward_kl", "alpha": 0.5, "beta": 0.5, "chunk_tokens": 1024, "chunk_vocab": 16384, **kd}
    t_tok = AutoTokenizer.from_pretrained(teacher)
    if not same_vocabulary(tok, t_tok):
        from stillhouse.train.align import cross_tokenizer_setup

        if rows is None:
            raise ValueError("a teacher with another tokenizer needs the samples' messages (rows)")
        return cross_tokenizer_setup(tok, t_tok, encoded, rows, kd, teacher, device)
    data = Dataset.from_list([{"input_ids": ids, "labels": [-100] * n + ids[n:]} for ids, n in encoded])
    counts = {"source": "teacher", "samples": len(encoded), "samples_aligned": len(encoded),
              "tokens_with_teacher_distribution": sum(len(ids) - n for ids, n in encoded), "vocabulary": "shared"}
    teacher_model = load_teacher(teacher, attn, kd.get("teacher_device") or device)
    return data, teacher_kd_trainer_class(), {"kd": kd, "teacher": teacher_model}, counts
