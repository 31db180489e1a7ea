"""On-policy distillation: the student answers the prompts itself, and the teacher scores the student's own tokens.

The loop is TRL's `DistillationTrainer` (on-policy by construction: each batch's answers are sampled from the student
being trained, by transformers' `generate` or vLLM, then the loss is a divergence at every sampled token). It is
used as it is for a local teacher: its chunked generalised-JSD loss over the full vocabulary, never the full logits.
TRL's `GKDTrainer` mixes on- and off-policy batches with a probability (`lmbda`) and materialises both models' logits;
with every batch on-policy TRL itself points to `DistillationTrainer`. Its `ServerDistillationTrainer` reaches a
teacher only through TRL's own vLLM server and top-1 support beyond forward KL.

A teacher behind an API is any server that scores text: the student's prompt-and-answer token ids are sent to
`/v1/completions` with `echo` and `logprobs` (OpenAI's legacy shape, which `stillhouse serve` answers), or with vLLM's
`prompt_logprobs`, through the same call; each scoring call is recorded in the run's ledger like any other teacher
call (a re-run with the same seed scores the same samples from the ledger, and the budget cap holds). Its top-k and
the chosen token's logprob become the coarse-grained divergence of `stillhouse.train.kd.kd_loss_sum` (the k listed
tokens and one bucket for the rest), in a subclass that replaces only the teacher's forward.
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import torch

from stillhouse.errors import StillhouseError


class ServedScorer:
    """Scores token sequences on a served teacher, through the ledger: `score(seqs)` gives, per sequence, one entry
    per position after the first (the ledger's logprob shape: token, id, logprob, top_logprobs)."""

    def __init__(self, ref, ledger, tok, *, top: int = 20, prompt_logprobs: bool = False, stage: str = "train"):
        from openai import OpenAI

        from stillhouse.calls.costs import Budget
        from stillhouse.teachers import parse_options, parse_spec
        from stillhouse.train.kd import _TokenText

        backend, self.model = parse_spec(ref.spec)
        if backend != "openai":
            raise StillhouseError(f"train.method on_policy: teacher.spec {ref.spec!r} is neither a local model (hf:) "
                                  "nor a server that scores text (openai: with a base_url)")
        opts = parse_options("openai", ref.options)
        urls = opts.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        urls = [urls] if isinstance(urls, str) else list(urls)
        key = os.environ.get(opts.api_key_env) or "none"
        # the openai client retries 429s, 5xx and dropped connections with backoff, honouring Retry-After
        self.clients = [OpenAI(base_url=u, api_key=key, timeout=opts.timeout, max_retries=opts.max_attempts - 1)
                        for u in urls]
        self.endpoint = ",".join(urlparse(u).netloc for u in urls)
        self.concurrency = opts.concurrency
        self.ref, self.ledger, self.tt = ref, ledger, _TokenText(tok)
        self.top, self.prompt_logprobs, self.stage = int(top), bool(prompt_logprobs), stage
        self.price = ref.priced()
        self.budget = Budget(ref.max_cost_usd, spent_usd=ledger.spent())
        self.made = self.cached = 0

    def key(self, ids: list[int]) -> str:
        from stillhouse.rundir import tagged_hash

        return tagged_hash({"model": self.ref.identity(), "score": list(ids), "top": self.top,
                            "via": "prompt_logprobs" if self.prompt_logprobs else "echo"})

    def score(self, seqs: list[list[int]]) -> list[list[dict]]:
        keys = [self.key(s) for s in seqs]
        found = self.ledger.get_many(keys)
        todo = {k: s for k, s in zip(keys, seqs) if k not in found}
        self.cached += len(seqs) - len(todo)
        if todo:
            for k, s in todo.items():  # every call admitted before any is made: a refusal loses nothing
                if not self.budget.admit(self.price.cost(len(s), 1)):
                    raise StillhouseError(f"train: scoring the student's samples would pass teacher.max_cost_usd="
                                          f"${self.ref.max_cost_usd} (spent ${self.budget.spent:.4f}; every scoring "
                                          f"call so far is saved in {self.ledger.path}); raise the cap and re-run")
            with ThreadPoolExecutor(max(1, min(self.concurrency, len(todo)))) as pool:
                results = list(pool.map(lambda kv: self._call(*kv), enumerate(todo.values())))
            for (k, s), (completion, latency) in zip(todo.items(), results):  # recorded from this thread: SQLite
                cost = self.price.cost(completion.prompt_tokens, completion.completion_tokens)
                self.ledger.record(k, stage=self.stage, backend="openai", endpoint=self.endpoint, model=self.model,
                                   request=self._body(s), completion=completion, latency_s=latency, cost_usd=cost)
                self.budget.settle(self.price.cost(len(s), 1), cost)
                self.made += 1
            found = self.ledger.get_many(keys)
        return [found[k].completion.extra["logprobs"] for k in keys]

    def _body(self, ids: list[int]) -> dict:
        # max_tokens 1 (as lm-evaluation-harness scores): some servers refuse 0; the one token sampled is not read
        body = {"model": self.model, "prompt": list(ids), "max_tokens": 1, "temperature": 0.0}
        if self.prompt_logprobs:
            body["prompt_logprobs"] = self.top
        else:
            body.update(echo=True, logprobs=self.top)
        return body

    def _call(self, j: int, ids: list[int]):
        from stillhouse.teachers import Completion

        body = self._body(ids)
        client = self.clients[j % len(self.clients)]
        t0 = time.time()
        extra = {k: v for k, v in body.items() if k not in ("model", "prompt", "max_tokens", "temperature")}
        resp = client.completions.create(model=body["model"], prompt=body["prompt"], max_tokens=1, temperature=0.0,
                                         extra_body=extra).model_dump()
        latency = time.time() - t0
        entries = self._entries(ids, resp["choices"][0])
        usage = resp.get("usage") or {}
        return Completion(text=self.tt.tok.decode(ids), reasoning=None, prompt_tokens=usage.get("prompt_tokens", len(ids)),
                          completion_tokens=usage.get("completion_tokens", 0), finish_reason="scored",
                          model=resp.get("model") or self.model, system_fingerprint=resp.get("system_fingerprint"),
                          extra={"logprobs": entries}), latency

    def _entries(self, ids: list[int], choice: dict) -> list[dict]:
        """The scored positions 1.. of `ids`, from vLLM's `prompt_logprobs` or an echoed `logprobs` block."""
        out = []
        if choice.get("prompt_logprobs") is not None:  # vLLM: [None, {"id": {"logprob", "rank", "decoded_token"}}, ...]
            plp = choice["prompt_logprobs"]
            for p in range(1, len(ids)):
                d = {int(i): v for i, v in (plp[p] or {}).items()}
                if ids[p] not in d:
                    raise StillhouseError(f"the served teacher's prompt_logprobs at position {p} do not include the "
                                          "prompt's own token: it did not score the ids it was sent")
                top = sorted(d.items(), key=lambda kv: -kv[1]["logprob"])[:self.top]
                out.append({"token": self.tt.text(ids[p]), "id": ids[p], "logprob": d[ids[p]]["logprob"],
                            "top_logprobs": [{"token": v.get("decoded_token") or self.tt.text(i), "id": i,
                                              "logprob": v["logprob"]} for i, v in top]})
            return out
        lp = choice.get("logprobs")
        if not lp or len(lp.get("tokens") or []) < len(ids):
            raise StillhouseError("the served teacher did not echo the scored tokens' logprobs (it needs "
                                  "/v1/completions with echo and logprobs, or vLLM's prompt_logprobs: "
                                  "train.on_policy.prompt_logprobs: true)")
        for p in range(1, len(ids)):
            want = self.tt.text(ids[p])
            if lp["tokens"][p] != want:
                raise StillhouseError(f"the served teacher's tokens are not the student's (position {p}: teacher "
                                      f"{lp['tokens'][p]!r}, student {want!r}): scoring the student's tokens needs "
                                      "the teacher's tokenizer")
            top = lp["top_logprobs"][p] or {}
            out.append({"token": want, "id": ids[p], "logprob": lp["token_logprobs"][p],
                        "top_logprobs": [{"token": t, "logprob": v} for t, v in top.items()]})
        return out


def _slots(entries: list[dict], ids: list[int], tt) -> tuple[list[list[int]], list[list[float]]]:
    """Per scored position: the teacher's (token id, logprob) slots, the chosen token's among them."""
    import math

    out_i, out_l = [], []
    for e, chosen in zip(entries, ids[1:]):
        slots: dict[int, float] = {}
        for alt in [*(e.get("top_logprobs") or []), {"id": chosen, "logprob": e.get("logprob")}]:
            i = alt.get("id")
            i = tt.id_of(alt.get("token", "")) if i is None else int(i)
            lp = alt.get("logprob")
            if i is not None and lp is not None and math.isfinite(lp) and i not in slots:
                slots[i] = float(lp)
        out_i.append(list(slots))
        out_l.append(list(slots.values()))
    return out_i, out_l


def served_trainer_class():
    """TRL's DistillationTrainer with the teacher's forward replaced by scoring calls to a served teacher."""
    from trl import DistillationTrainer

    from stillhouse.train.kd import kd_loss_sum

    class ServedDistillationTrainer(DistillationTrainer):
        def __init__(self, *args, scorer: ServedScorer, kd: dict, **kwargs):
            self.scorer, self.kd = scorer, kd
            super().__init__(*args, teacher_model=None, **kwargs)

        def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
            p_ids, p_mask = inputs["prompt_ids"], inputs["prompt_mask"]
            c_ids, c_mask = inputs["completion_ids"], inputs["completion_mask"]
            seqs = [torch.cat([p[pm.bool()], c[cm.bool()]]).tolist() for p, pm, c, cm in zip(p_ids, p_mask, c_ids, c_mask)]
            entries = self.scorer.score(seqs)
            rows_i, rows_l = [], []
            for s, e, pm, cm in zip(seqs, entries, p_mask, c_mask):
                ids, lps = _slots(e, s, self.scorer.tt)
                start = int(pm.sum()) - 1  # the entry predicting the first answer token
                rows_i += ids[start:start + int(cm.sum())]
                rows_l += lps[start:start + int(cm.sum())]
            k = max([1, *map(len, rows_i)])
            t_ids = torch.zeros(len(rows_i), k, dtype=torch.long)
            t_lps = torch.full((len(rows_i), k), -float("inf"))
            for t, (a, b) in enumerate(zip(rows_i, rows_l)):
                if a:
                    t_ids[t] = a[0]
                    t_ids[t, :len(a)] = torch.tensor(a)
                    t_lps[t, :len(b)] = torch.tensor(b)
            logits = unwrapped_student(input_ids=torch.cat([p_ids, c_ids], 1),
                                       attention_mask=torch.cat([p_mask, c_mask], 1), use_cache=False).logits
            sel = c_mask.bool()
            logits = logits[:, p_ids.shape[1] - 1:-1][sel]
            dev = logits.device
            total = kd_loss_sum(logits, c_ids[sel], t_ids.to(dev), t_lps.to(dev), loss=self.kd["loss"], alpha=1.0,
                                beta=self.kd["beta"])
            n = sel.sum()
            loss = total / (num_items_in_batch if num_items_in_batch is not None else n.clamp(min=1))
            with torch.no_grad():
                logq = logits.float().log_softmax(-1)
                entropy = -(logq.exp() * logq).sum()
            return loss, entropy, n

    return ServedDistillationTrainer


def on_policy(rows: list[dict], base: str, out_dir: str | Path, *, epochs: float, learning_rate: float,
              batch_size: int, seed: int, warmup_ratio: float = 0.05, device: str = "auto", lora: dict | None = None,
              callbacks: list | None = None, identity: dict | None = None, kd: dict, on_policy: dict,
              teacher: str | None = None, scorer: ServedScorer | None = None, max_length: int | None = None):
    """Distil on-policy from the prompts of `rows` (each `messages`, the last one the teacher's answer, unused) into the
    model at `base`, saved to `out_dir`: from the local model at `teacher`, or from a served one through `scorer`.

    `kd`: loss and beta (the divergence); `on_policy`: max_new_tokens and temperature of the student's samples."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from stillhouse.templates import identity_system_prompt, replace_injected_system_prompt
    from stillhouse.train.align import same_vocabulary
    from stillhouse.train.kd import _trl_beta, load_teacher
    from stillhouse.train.sft import SFTResult, _ending_on_the_answer

    if (teacher is None) == (scorer is None):
        raise ValueError("on_policy needs exactly one of a local teacher and a scorer")
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    tok = AutoTokenizer.from_pretrained(base)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # (the trainer pads prompts on the left for generation)
    own_prompt = identity_system_prompt(identity)
    injected = replace_injected_system_prompt(tok, own_prompt)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    prompts = [{"prompt": _ending_on_the_answer(r["messages"])[:-1]} for r in rows]
    args = DistillationConfig(
        output_dir=str(Path(out_dir) / "_trainer"), num_train_epochs=epochs, learning_rate=learning_rate,
        per_device_train_batch_size=batch_size, lr_scheduler_type="cosine", warmup_steps=warmup_ratio,
        weight_decay=0.01, max_completion_length=on_policy["max_new_tokens"], temperature=on_policy["temperature"],
        beta=_trl_beta(kd["loss"], kd["beta"]), bf16=use_cuda, use_cpu=not use_cuda, logging_steps=5,
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, dataloader_num_workers=0, disable_tqdm=True)
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=lora.get("r", 16), lora_alpha=lora.get("alpha", 32), lora_dropout=lora.get("dropout", 0.0),
                                 target_modules=lora.get("target_modules", "all-linear"), task_type="CAUSAL_LM")

    class _Progress(TrainerCallback):
        loss: float | None = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                _Progress.loss = float(logs["loss"])

    common = dict(model=model, args=args, train_dataset=Dataset.from_list(prompts), processing_class=tok,
                  peft_config=peft_config, callbacks=[_Progress(), *(callbacks or [])])
    if teacher is not None:
        t_tok = AutoTokenizer.from_pretrained(teacher)
        if not same_vocabulary(tok, t_tok):
            raise StillhouseError(
                f"train.method on_policy: the local teacher's tokenizer ({len(t_tok)} tokens) is not the student's "
                f"({len(tok)}): the teacher scores the student's token ids, so they must be its own. Logit "
                "distillation across tokenizers is method: kd with kd.source: teacher (aligned by characters); "
                "method: sft learns from the text alone")
        trainer = DistillationTrainer(teacher_model=load_teacher(teacher, "sdpa", "cuda" if use_cuda else "cpu"),
                                      **common)
    else:
        trainer = served_trainer_class()(scorer=scorer, kd=kd, **common)
    trainer.remove_callback(PrinterCallback)
    t0 = time.time()
    out = trainer.train()
    seconds = time.time() - t0
    # the prompt and answer tokens the trainer counted (TRL logs them as `num_tokens`)
    n_tokens = next((float(h["num_tokens"]) for h in reversed(trainer.state.log_history) if "num_tokens" in h), 0.0)
    model = trainer.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if peft_config is not None:
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    shutil.rmtree(Path(out_dir) / "_trainer", ignore_errors=True)
    counts = {"prompts": len(prompts), "teacher": "local" if teacher is not None else "served",
              "max_new_tokens": on_policy["max_new_tokens"], "temperature": on_policy["temperature"]}
    if scorer is not None:
        counts.update(scoring_calls_made=scorer.made, scoring_calls_cached=scorer.cached,
                      scoring_via="prompt_logprobs" if scorer.prompt_logprobs else "echo", top_logprobs=scorer.top)
    return SFTResult(parameters=sum(p.numel() for p in model.parameters()), trainable_parameters=trainable,
                     steps=out.global_step, seconds=round(seconds, 2),
                     tokens_per_second=round(n_tokens / max(seconds, 1e-9), 1),
                     final_loss=_Progress.loss, kd=counts,
                     template_system_prompt={"injected": injected, "replaced_by": own_prompt} if injected else None)


def check_teacher(recipe) -> None:
    """Refuse, before any training, a teacher that can neither run here nor score text on a server."""
    from stillhouse.teachers import parse_spec

    backend, _ = parse_spec(recipe.teacher.spec)
    if backend == "hf":
        from stillhouse.train import local_teacher

        local_teacher(recipe)
    elif backend != "openai":
        raise StillhouseError(f"train.method on_policy: teacher.spec {recipe.teacher.spec!r} is neither a local model "
                              "(hf:PATH) nor a server that scores text (openai:MODEL with teacher.options.base_url: "
                              "stillhouse serve, vLLM)")


def on_policy_arguments(recipe, run, student, out_dir) -> dict:
    """Everything `on_policy` is called with for `student` in the train stage (but callbacks): the curated rows'
    prompts, the teacher (local, or served through the run's ledger) and the recipe's settings; weights to `out_dir`."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from stillhouse.calls import Ledger, teacher_ref
    from stillhouse.models import resolve_model
    from stillhouse.teachers import parse_spec
    from stillhouse.train import local_teacher

    t = recipe.train_for(student)
    base = resolve_model(student.base)
    teacher = scorer = None
    if parse_spec(recipe.teacher.spec)[0] == "hf":
        teacher = local_teacher(recipe)
    else:
        scorer = ServedScorer(teacher_ref(recipe), Ledger(run.ledger), AutoTokenizer.from_pretrained(base),
                              top=t.on_policy.top_logprobs, prompt_logprobs=t.on_policy.prompt_logprobs)
    return dict(rows=pq.read_table(run.curated, columns=["messages"]).to_pylist(), base=base,
                out_dir=out_dir, epochs=t.epochs, learning_rate=t.learning_rate,
                batch_size=t.batch_size, seed=t.seed, warmup_ratio=t.warmup_ratio, device=t.device,
                lora=t.lora.model_dump() if t.lora else None,
                identity=student.identity.model_dump() if student.identity else None,
                kd={"loss": t.kd.loss, "beta": t.kd.beta}, on_policy=t.on_policy.model_dump(), teacher=teacher,
                scorer=scorer)
