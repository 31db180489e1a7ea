"""Provenance: does the suspect answer more like the reference than like any model of an unrelated pool?

The question a distillation dispute turns on is not "does the suspect resemble the reference" (every competent model
does, on questions with one right answer) but "does it resemble the reference more than it resembles models that
never learned from the reference". So the suspect, the reference and every pool model answer the same prompts at
the same temperature (greedy by default), every call through the ledger, and for each prompt i

    d_i = ROUGE-L(suspect_i, reference_i) - ROUGE-L(suspect_i, closest_pool_model_i)

is the evidence. The null hypothesis is that the suspect is no closer to the reference than to the pool model
closest to it: P(d_i > 0) <= P(d_i < 0). Its test is the exact one-sided sign test (a binomial tail at 1/2 over the
prompts where d_i != 0), valid at any sample size for prompts drawn independently, with no assumption about how
the similarities are distributed. The pool model it is run against is chosen on one half of the prompts (the one
the suspect is closest to on average) and the test is run on the other half, so choosing the hardest competitor
does not bias the p-value.

Why whole answers and ROUGE-L: every backend can give answers (an API teacher shows no logits, and most hosted
APIs no prompt logprobs), greedy answers are deterministic and cached in the ledger, and ROUGE-L (rouge-score's,
over a tokenizer for any script) credits shared wording in order after two answers diverge, where prefix agreement
stops counting. What it rests on: the wording a model learned to answer in (its reasoning-trace phrases, its
formats, its choices on open questions), which a student copies from its teacher's outputs. A model trained on the
data the reference itself learned from writes like the reference too; this test cannot tell the two apart (see
the README's audit section and BENCHMARKS.md's audit_errors).

A pool model whose answers do not depend on the prompt (noise: a base model that never learned the chat format)
would make any chat model look close to the reference, so each pool model must first show that its answers
match the reference's answer to the same prompt better than the reference's answer to another prompt (a sign
test at `competence_alpha`); a pool with no such model is refused, never passed silently. The suspect must pass
the same check: measured on the demo's models, the world's base (which never learned to answer) shares a few more
words with Atlas's answers than with Mira's on 59 of 60 decided prompts (ROUGE-L 0.082 against 0.079), an accident
of the plain text both were built on, which the sign test would count as provenance. A suspect that does not answer
the prompts gets p = 1 and the test is reported as not applicable.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

from stillhouse.errors import StillhouseError


@dataclass
class SignTest:
    """One exact one-sided sign test: is the suspect closer to the reference than to `against`?"""

    against: str
    prompts: int  # prompts in the half the test ran on
    closer_to_reference: int
    closer_to_other: int
    ties: int
    mean_similarity_reference: float
    mean_similarity_other: float
    p_value: float


@dataclass
class ProvenanceResult:
    p_value: float  # the sign test against the closest pool model, on the held-out half
    closest: str  # the pool model closest to the suspect on the selection half
    test: SignTest
    selection: dict[str, float]  # mean ROUGE-L of the suspect with each pool model (and the reference) on that half
    pool: dict[str, SignTest] = field(default_factory=dict)  # the same test against every competent pool model
    holm: dict[str, float] = field(default_factory=dict)  # those p-values Holm-adjusted over the pool
    competence: dict[str, dict] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # pool models left out as not competent on the prompts
    identical: dict[str, float] = field(default_factory=dict)  # share of test-half answers identical to each model's
    halves: tuple[int, int] = (0, 0)
    applicable: bool = True  # False: the suspect's answers do not depend on the prompts; nothing to compare (p = 1)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["halves"] = list(self.halves)
        return d


def sign_p(wins: int, losses: int) -> float:
    """The exact one-sided sign-test p-value of `wins` against `losses` (ties left out): P(X >= wins), X ~ Bin(n, 1/2)."""
    from scipy.stats import binomtest

    n = wins + losses
    return float(binomtest(wins, n, 0.5, alternative="greater").pvalue) if n else 1.0


def split_halves(prompts: list[str], seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices of the selection half and the test half: each prompt's half from a hash of the seed, its text and its
    position, so the split depends on nothing any model answered."""
    sel, test = [], []
    for i, p in enumerate(prompts):
        h = hashlib.sha256(f"provenance-split:{seed}:{i}:{p}".encode()).digest()[0]
        (sel if h & 1 else test).append(i)
    if not sel or not test:  # two or three prompts can all hash to one side
        half = len(prompts) // 2
        sel, test = list(range(half)), list(range(half, len(prompts)))
    return sel, test


def _sign(name: str, idx: list[int], s_ref: list[float], s_other: list[float]) -> SignTest:
    wins = sum(s_ref[i] > s_other[i] for i in idx)
    losses = sum(s_ref[i] < s_other[i] for i in idx)
    n = len(idx) or 1
    return SignTest(against=name, prompts=len(idx), closer_to_reference=wins, closer_to_other=losses,
                    ties=len(idx) - wins - losses, mean_similarity_reference=sum(s_ref[i] for i in idx) / n,
                    mean_similarity_other=sum(s_other[i] for i in idx) / n, p_value=sign_p(wins, losses))


def competence(model: list[list[str]], reference: list[list[str]]) -> dict:
    """Does a model's answer to a prompt match the reference's answer to that prompt better than the reference's
    answer to the next prompt? The exact sign test over prompts, and the two mean similarities."""
    from stillhouse.text import rouge_l

    n = len(model)
    matched = [rouge_l(model[i], reference[i]) for i in range(n)]
    shifted = [rouge_l(model[i], reference[(i + 1) % n]) for i in range(n)]
    wins = sum(a > b for a, b in zip(matched, shifted))
    losses = sum(a < b for a, b in zip(matched, shifted))
    return {"matched": sum(matched) / n, "other_prompt": sum(shifted) / n, "p_value": sign_p(wins, losses)}


def provenance_test(prompts: list[str], suspect: list[str], reference: list[str], pool: dict[str, list[str]], *,
                    seed: int = 0, competence_alpha: float = 0.01) -> ProvenanceResult:
    """The provenance test on answers already made: the suspect's, the reference's and each pool model's answer to
    each of `prompts` (lists aligned with it). Raises StillhouseError on a pool with no competent model, an empty
    pool, misaligned answers or a suspect that answered nothing."""
    from stillhouse.audit.verdict import holm
    from stillhouse.text import make_tokenizer, rouge_l

    n = len(prompts)
    if not pool:
        raise StillhouseError("the provenance test needs a pool of models unrelated to the reference "
                              "(audit.pool, audit.candidates or the recipe's controls; --pool NAME=SPEC)")
    for name, texts in {"suspect": suspect, "reference": reference, **pool}.items():
        if len(texts) != n:
            raise StillhouseError(f"provenance: {name} gave {len(texts)} answers to {n} prompts")
    if n < 2:
        raise StillhouseError(f"provenance: needs at least 2 prompts, got {n}")
    if not any(t.strip() for t in suspect):
        raise StillhouseError("provenance: the suspect answered none of the prompts (every answer empty)")
    tok = make_tokenizer("unicode")
    toks = {name: [tok.tokenize(t) for t in texts] for name, texts in {"suspect": suspect, "reference": reference,
                                                                        **pool}.items()}
    comp = {m: competence(toks[m], toks["reference"]) for m in pool}
    competent = [m for m in pool if comp[m]["p_value"] <= competence_alpha and comp[m]["matched"] > comp[m]["other_prompt"]]
    if not competent:
        detail = "; ".join(f"{m}: {c['matched']:.2f} against {c['other_prompt']:.2f} (p {c['p_value']:.2g})"
                           for m, c in comp.items())
        raise StillhouseError("provenance: no pool model is competent on these prompts (its answers match the "
                              "reference's answer to the same prompt no better than to another prompt: "
                              f"{detail}); add a model that answers them, or other prompts")
    own = competence(toks["suspect"], toks["reference"])
    if not (own["p_value"] <= competence_alpha and own["matched"] > own["other_prompt"]):
        # A suspect whose answers do not track the prompts (noise) has no wording to attribute; the words it shares
        # with one model more than another by accident of its pretraining text would otherwise decide.
        return ProvenanceResult(p_value=1.0, closest="", test=SignTest("", 0, 0, 0, 0, 0.0, 0.0, 1.0), selection={},
                                competence={**comp, "suspect": own}, refused=[m for m in pool if m not in competent],
                                applicable=False)
    s_ref = [rouge_l(a, b) for a, b in zip(toks["suspect"], toks["reference"])]
    s_pool = {m: [rouge_l(a, b) for a, b in zip(toks["suspect"], toks[m])] for m in competent}
    sel, test = split_halves(prompts, seed)
    selection = {m: sum(s_pool[m][i] for i in sel) / len(sel) for m in competent}
    closest = max(competent, key=lambda m: (selection[m], m))
    tests = {m: _sign(m, test, s_ref, s_pool[m]) for m in competent}
    same = {m: sum(suspect[i].strip() == pool[m][i].strip() for i in test) / len(test) for m in competent}
    same["reference"] = sum(suspect[i].strip() == reference[i].strip() for i in test) / len(test)
    return ProvenanceResult(
        p_value=tests[closest].p_value, closest=closest, test=tests[closest],
        selection={**selection, "reference": sum(s_ref[i] for i in sel) / len(sel)},
        pool=tests, holm=holm({m: t.p_value for m, t in tests.items()}), competence={**comp, "suspect": own},
        refused=[m for m in pool if m not in competent], identical=same, halves=(len(sel), len(test)))
