"""`stillhouse audit`: put a suspect through the tests that apply, and give one verdict with its error rate.

The suspect is a model (a local directory, any backend spec, an OpenAI-compatible endpoint) or a
file of its texts. Every question put to a model goes through the ledger in the audit's
directory, so an interrupted audit resumes and a repeated one makes no calls.

- provenance (`provenance.py`): when the reference model and a pool of unrelated models are given, whether the
  suspect's answers to `prompts` are closer to the reference's than to the closest pool model's (an exact sign
  test on a held-out half of the prompts). It convicts what identity scrubbing hides: a student's wording;
- identity: the probe suite (`probes.py`) about the reference's identity, each question plain, in role-play and
  behind an injection, counted once per question (its wrappers are near-copies, not independent trials). With a
  pool, the same questions put to the pool's models give the null rate (Fisher's exact test); without one the
  rate is the stated bound `identity_null_rate`, printed beside the p-value;
- watermark: radioactivity of the suspect's texts under the reference's key (`radioactivity.py`),
  its texts being its answers to `prompts`, or the file's texts; white-box too for a local suspect;
- attribution (no p-value; reported beside the verdict): when candidate teachers are given,
  which one the suspect's answers read like (`attribution.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from stillhouse.errors import StillhouseError


def resolve_suspect(spec, base_url: str | None = None):
    """A ModelRef for a model spec (a ModelRef passes through), or the rows of a texts file (`.jsonl`)."""
    from stillhouse.audit.radioactivity import read_texts
    from stillhouse.calls import ModelRef
    from stillhouse.teachers import parse_spec

    if isinstance(spec, ModelRef):
        return spec
    spec = str(spec)
    p = Path(spec)
    if spec.endswith(".jsonl"):
        return read_texts(p)
    if p.is_dir() or spec.endswith(".gguf") or spec.startswith("stillhouse:"):  # a local model, or a packaged one
        return ModelRef(f"hf:{spec}")
    try:
        backend, _ = parse_spec(spec)
    except (StillhouseError, ValueError) as e:
        raise StillhouseError(f"{spec!r} is neither a model directory, a texts file (.jsonl) nor a model spec "
                              f"(BACKEND:MODEL): {e}") from None
    opts = {"base_url": base_url, "api_key_required": False} if backend == "openai" and base_url else {}
    return ModelRef(spec, opts)


def _ask(ref, prompts: list[str], ledger, *, max_tokens: int, temperature: float, label: str, seed: int = 0) -> list[str]:
    from stillhouse.calls import call_models
    from stillhouse.teachers import Request

    reqs = [Request(messages=({"role": "user", "content": p},), max_tokens=max_tokens, temperature=temperature,
                    seed=seed) for p in prompts]
    batch = call_models(ref, reqs, ledger, stage="audit", label=label)
    batch.raise_if_incomplete("audit", ledger.path, ref.max_cost_usd)
    return [batch.completion(i).text for i in range(len(reqs))]


def _identity_of(target) -> tuple[str, str]:
    """What a suspect, reference or pool model is, for telling two of them apart: a local model by its resolved
    directory, a texts file by its path, anything else by its spec."""
    import os

    from stillhouse.calls import ModelRef

    if isinstance(target, ModelRef):
        spec = target.spec
        if spec.startswith("hf:"):
            from stillhouse.models import resolve_model

            try:
                return "model", os.path.realpath(resolve_model(spec.removeprefix("hf:")))
            except StillhouseError:
                return "spec", spec
        return "spec", spec
    return "file", os.path.realpath(str(target))


def check_pool(pool: dict, suspect, reference) -> None:
    """A pool member that is the suspect or the reference makes the provenance test meaningless: refuse it."""
    if not pool:
        return
    from stillhouse.calls import ModelRef

    def ident(x):
        if isinstance(x, (ModelRef, str, Path)):
            return _identity_of(x if isinstance(x, ModelRef) or str(x).endswith(".jsonl") else resolve_suspect(x))
        return None

    s, r = ident(suspect), ident(reference) if reference is not None else None
    for name, spec in pool.items():
        p = ident(spec)
        if p is not None and p == s:
            raise StillhouseError(f"pool model {name!r} is the suspect itself; the pool must hold models unrelated "
                                  "to the reference, other than the suspect")
        if r is not None and p == r:
            raise StillhouseError(f"pool model {name!r} is the reference itself; the pool must hold models unrelated "
                                  "to the reference")


def run_audit(suspect, out_dir: str | Path, *, reference_identity=None, suspect_identity=None,
              watermark_key: str | Path | None = None, tokenizer: str | None = None, prompts: str | None = None,
              n_prompts: int = 200, candidates: dict | None = None, reference=None, pool: dict | None = None,
              base_url: str | None = None, identity_null_rate: float = 0.01, alpha: float = 1e-3,
              null_keys: int = 200, max_tokens: int = 96, temperature: float = 0.0, seed: int = 0,
              ledger_path: str | Path | None = None, label: str = "suspect", min_entropy: float | None = 0.1,
              whitebox: bool = True) -> dict:
    """Run the tests that apply to `suspect` (a spec, a ModelRef or a texts file); write and return
    `OUT_DIR/evidence.json`. Calls go through `ledger_path` (default: OUT_DIR/ledger.db).

    `reference` (the reference model: a spec, a ModelRef or a texts file of its answers) and `pool` ({name: model})
    turn on the provenance test; the pool's models also give the identity test its null rate. Every model answers
    `prompts` at `temperature` (greedy by default), the same answers every test reads.

    With the watermark key: when `tokenizer` is the reference model itself (weights and all), tokens it predicted
    with less than `min_entropy` nats are left out of the black-box count (None: keep every token); when the suspect
    is a local model and `whitebox`, its own next-token distributions along its answers are scored too."""
    from stillhouse.audit.probes import by_question, identity_p, probe_suite, rates_of
    from stillhouse.audit.verdict import verdict
    from stillhouse.calls import Ledger
    from stillhouse.identity import classify_all
    from stillhouse.rundir import atomic_write_text
    from stillhouse.sources import load_prompt_items

    if not 0 < identity_null_rate < 1:
        raise StillhouseError(f"identity_null_rate must lie in (0, 1), not {identity_null_rate}")
    pool = dict(pool or {})
    if reference_identity is None and watermark_key is None and not candidates and not (reference and pool):
        raise StillhouseError("nothing to test: give the reference's identity, its watermark key, candidates, or "
                              "the reference model and a pool")
    if reference is not None and not pool:
        raise StillhouseError("the provenance test needs a pool of models unrelated to the reference beside the "
                              "reference model (--pool NAME=SPEC)")
    if watermark_key is not None and tokenizer is None:
        raise StillhouseError("the watermark test needs the reference's tokenizer (--tokenizer MODEL)")
    target = resolve_suspect(suspect, base_url)
    is_model = not isinstance(target, list)
    check_pool(pool, target if is_model else suspect, reference)
    needs_prompts = watermark_key is not None or bool(candidates) or reference is not None
    if needs_prompts and is_model and not prompts:
        raise StillhouseError("the watermark, provenance and attribution tests put prompts to the suspect: give "
                              "--prompts (a prompt source or file)")
    if reference is not None and not is_model and any(r.get("prompt") is None for r in target):
        raise StillhouseError(f"{suspect}: the provenance test asks the reference and the pool the suspect's prompts, "
                              "but some of its rows carry no \"prompt\"")
    pool_refs = {name: resolve_suspect(spec, None) for name, spec in pool.items()}
    ref_target = resolve_suspect(reference, None) if reference is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(ledger_path or out / "ledger.db")
    evidence: dict = {"suspect": getattr(suspect, "spec", str(suspect)), "tests": {}, "reported": {}}
    p_values: dict[str, float] = {}
    try:
        if reference_identity is not None and is_model:
            probes = probe_suite(reference_identity, wrappers=("plain", "roleplay", "injection"))
            asked_probes = [p["prompt"] for p in probes]
            answers = _ask(target, asked_probes, ledger, max_tokens=max_tokens, temperature=0.0,
                           label=f"audit {label}: identity probes")
            claims = classify_all(answers, suspect_identity, reference_identity)
            rates = rates_of(claims, own_declared=suspect_identity is not None)
            units = by_question(probes, claims)
            null_units: list[bool] = []
            for name, ref in pool_refs.items():
                if isinstance(ref, list):
                    continue  # a texts file cannot be asked
                pa = _ask(ref, asked_probes, ledger, max_tokens=max_tokens, temperature=0.0,
                          label=f"audit pool {name}: identity probes")
                null_units += by_question(probes, classify_all(pa, None, reference_identity))
            p, null = identity_p(units, null_units or None, identity_null_rate)
            p_values["identity"] = p
            evidence["tests"]["identity"] = {
                "p_value": p, "claims_reference": sum(units), "questions": len(units), "probes": len(answers),
                "claims_reference_answers": rates["reference"]["count"], "null": null,
                "null_rate": (sum(null_units) / len(null_units)) if null_units else identity_null_rate,
                "null_measured": bool(null_units), "rates": rates,
                "reference": {"name": reference_identity.name, "maker": reference_identity.maker},
                "answers": [{**pr, "answer": a, "claims": c} for pr, a, c in zip(probes, answers, claims)]}
        elif reference_identity is not None:
            evidence["reported"]["identity"] = "not run: the suspect is a file of texts, not a model to ask"
        texts, asked = None, None
        if needs_prompts:
            if is_model:
                asked = [it["messages"][-1]["content"] for it in load_prompt_items(prompts, n_prompts, seed)]
                texts = _ask(target, asked, ledger, max_tokens=max_tokens, temperature=temperature,
                             label=f"audit {label}: answers", seed=seed)
            else:
                from stillhouse.audit.radioactivity import texts_and_prompts

                texts, asked = texts_and_prompts(target)
            if reference is not None and not any(t.strip() for t in texts):
                raise StillhouseError(f"the suspect {evidence['suspect']!r} answered none of the "
                                      f"{len(texts)} prompts (every answer empty): no wording to compare")

        def answers_of(name: str, ref) -> list[str]:
            if isinstance(ref, list):  # a texts file: its answers to the same prompts, matched by prompt
                by_prompt = {r.get("prompt"): r["text"] for r in ref}
                missing = [q for q in asked if q not in by_prompt]
                if missing:
                    raise StillhouseError(f"{name}: its texts file has no answer to {len(missing)} of the suspect's "
                                          f"prompts (first: {missing[0]!r})")
                return [by_prompt[q] for q in asked]
            return _ask(ref, asked, ledger, max_tokens=max_tokens, temperature=temperature,
                        label=f"audit {name}: answers", seed=seed)

        if pool and reference is None:
            evidence["reported"]["provenance"] = "not run: no reference model to compare the pool with"
        if pool and reference is not None:
            from stillhouse.audit.provenance import provenance_test

            ref_texts = answers_of("reference", ref_target)
            pool_texts = {name: answers_of(f"pool {name}", ref) for name, ref in pool_refs.items()}
            res = provenance_test(asked, texts, ref_texts, pool_texts, seed=seed)
            p_values["provenance"] = res.p_value
            evidence["tests"]["provenance"] = {"temperature": temperature if is_model else None, **res.as_dict()}
        if watermark_key is not None:
            from stillhouse.audit.radioactivity import check_rows, score_texts
            from stillhouse.watermark import read_key

            key = read_key(watermark_key)
            if not is_model:
                check_rows(key, target, suspect)
            from stillhouse.models import has_weights

            floor = min_entropy if min_entropy is not None and has_weights(tokenizer) else None
            res, _ = score_texts(texts, asked, key, tokenizer, null_keys=null_keys, seed=seed, min_entropy=floor)
            p_values["watermark"] = res.key.p_value
            evidence["tests"]["watermark"] = {"p_value": res.key.p_value, "texts": len(texts), "min_entropy": floor,
                                              "temperature": temperature if is_model else None, **res.as_dict()}
            local = is_model and target.spec.startswith("hf:")
            if whitebox and local and key["seeding_scheme"] == "lefthash":
                from dataclasses import asdict

                from stillhouse.audit.radioactivity import whitebox as score_whitebox

                wb = score_whitebox(target.spec.removeprefix("hf:"), key, tokenizer, asked, texts,
                                    null_keys=null_keys, seed=seed)
                p_values["watermark_whitebox"] = wb.p_value
                evidence["tests"]["watermark_whitebox"] = asdict(wb)
        if candidates:
            from stillhouse.audit.attribution import fit_attribution

            by_source = {}
            for name, spec in candidates.items():
                c = resolve_suspect(spec, None)
                if isinstance(c, list):
                    by_source[name] = [r["text"] for r in c]
                else:
                    if asked is None or None in asked:
                        raise StillhouseError(f"candidate {name!r} is a model, but the suspect's texts carry no "
                                              "prompts to ask it; give the candidate as a texts file")
                    by_source[name] = answers_of(f"candidate {name}", c)
            model = fit_attribution(by_source)
            evidence["reported"]["attribution"] = {**model.attribute(texts), "samples": model.samples}
    finally:
        ledger.close()
    evidence["verdict"] = verdict(p_values, alpha) if p_values else None
    atomic_write_text(out / "evidence.json", json.dumps(evidence, indent=2, ensure_ascii=False) + "\n")
    return evidence
