"""Duplicates and contamination: exact and near-duplicate samples, novelty of prompts, overlap with evaluations.

Every filter here keeps the first of a group of duplicates, in row order, so curation is
deterministic and an earlier (often seed or cheaper) sample wins.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from typing import Literal

from datasketch import MinHashLSH
from pydantic import Field

from stillhouse.curate import CurateContext, Filter, FilterOptions, FilterResult, answer_text, prompt_text
from stillhouse.novelty import NoveltyFilter, TokenizerName, lsh_params, minhasher


def normalise(text: str) -> str:
    """Unicode NFKC, case-folded, whitespace collapsed: what two copies of one text still share."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _field(row: dict, on: str) -> str:
    prompt = prompt_text(row)
    if on == "prompt":
        return prompt
    answer = answer_text(row) or ""
    return answer if on == "answer" else prompt + "\x00" + answer


class ExactDedupOptions(FilterOptions):
    on: Literal["prompt+answer", "prompt", "answer"] = Field(
        "prompt+answer", description="which text two rows must share, after normalisation, to be duplicates")


class ExactDedup(Filter):
    """Drop a row whose normalised text (prompt and answer by default) equals an earlier row's."""

    name = "exact_dedup"
    Options = ExactDedupOptions

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        seen: set[str] = set()
        res = FilterResult(kept=[])
        for row in rows:
            key = "\x00".join(normalise(part) for part in _field(row, self.options.on).split("\x00"))
            if key in seen:
                res.dropped.append((row, f"exact duplicate ({self.options.on})"))
            else:
                seen.add(key)
                res.kept.append(row)
        return res


class NearDedupOptions(FilterOptions):
    threshold: float = Field(0.8, gt=0, le=1, description="drop a row whose shingle Jaccard with a kept one is >= this")
    shingles: Literal["char", "word"] = Field("char", description="character or word n-grams of the normalised text")
    size: int | None = Field(None, ge=1, description="n of the n-grams (default: 5 characters, 3 words)")
    num_perm: int = Field(128, ge=16, le=4096, description="MinHash permutations")
    recall: float = Field(0.99, gt=0, lt=1, description="the chance that a pair exactly at the threshold is found")
    on: Literal["prompt", "prompt+answer"] = "prompt"


class NearDedup(Filter):
    """Drop a row whose prompt is a near-duplicate of a kept one: MinHash LSH (datasketch) finds candidates,
    the exact Jaccard of their shingle sets confirms them."""

    name = "near_dedup"
    Options = NearDedupOptions

    def shingle(self, text: str) -> frozenset[bytes]:
        o = self.options
        text = normalise(text)
        if o.shingles == "word":
            units, n, sep = text.split(), o.size or 3, " "
        else:
            units, n, sep = list(text), o.size or 5, ""
        if len(units) <= n:  # shorter than one shingle: the whole text is its only shingle
            return frozenset([sep.join(units).encode()]) if units else frozenset()
        return frozenset(sep.join(units[i:i + n]).encode() for i in range(len(units) - n + 1))

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        o = self.options
        params = lsh_params(o.threshold, o.num_perm, o.recall)
        lsh = MinHashLSH(num_perm=o.num_perm, params=params)
        minhash = minhasher(o.num_perm)
        kept_sets: list[frozenset[bytes]] = []
        res = FilterResult(kept=[], report={"lsh_bands_rows": list(params), "candidates_checked": 0})
        for row in rows:
            sh = self.shingle(_field(row, o.on))
            if not sh:  # nothing to compare: an empty prompt is left to the empty filter
                res.kept.append(row)
                continue
            mh = minhash(sh)
            dup = None
            for k in lsh.query(mh):
                res.report["candidates_checked"] += 1
                other = kept_sets[k]
                if len(sh & other) / len(sh | other) >= o.threshold:
                    dup = k
                    break
            if dup is not None:
                res.dropped.append((row, f"near duplicate (Jaccard >= {o.threshold} with a kept {o.on})"))
                continue
            lsh.insert(len(kept_sets), mh, check_duplication=False)
            kept_sets.append(sh)
            res.kept.append(row)
        return res


class NoveltyOptions(FilterOptions):
    threshold: float = Field(0.7, gt=0, le=1, description="drop a prompt whose ROUGE-L with a kept one exceeds this")
    num_perm: int = Field(384, ge=16, le=4096, description="MinHash permutations of the candidate index")
    recall: float = Field(0.999, gt=0, lt=1, description="the chance that a pair exactly at the threshold is checked")
    tokenizer: TokenizerName = Field("rouge", description="rouge (rouge-score's, ASCII only, as Alpaca) or unicode")


class Novelty(Filter):
    """Self-instruct's novelty filter on prompts: drop a row whose prompt's ROUGE-L F-measure with an earlier
    kept prompt exceeds the threshold (see stillhouse.novelty)."""

    name = "novelty"
    Options = NoveltyOptions

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        o = self.options
        index = NoveltyFilter(o.threshold, o.num_perm, o.recall, o.tokenizer)
        res = FilterResult(kept=[])
        for row in rows:
            if index.add(prompt_text(row)):
                res.kept.append(row)
            else:
                res.dropped.append((row, f"not novel (ROUGE-L > {o.threshold} with a kept prompt)"))
        res.report["rouge_l_scored"] = index.scored
        return res


# Letters and digits in runs, each CJK character alone: Chinese and Japanese have no spaces between words, and a
# character n-gram there plays the part of a word n-gram.
_WORD = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff\uac00-\ud7af]|[^\W_]+")


def words(text: str) -> tuple[str, ...]:
    """The words decontamination compares: NFKC, case-folded, punctuation dropped."""
    return tuple(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


class DecontaminateOptions(FilterOptions):
    n: int = Field(8, ge=1, description="word n-gram length (8 as open-r1)")
    include_answer: bool = Field(False, description="also look for the evaluation prompts' n-grams in the answer")
    short: Literal["exact", "contains", "ignore"] = Field(
        "exact", description="an evaluation prompt of fewer than n words has no n-gram: 'exact' drops a sample whose "
                             "prompt is the same word sequence, 'contains' one that contains it, 'ignore' neither")

class Decontaminate(Filter):
    """Drop a sample that shares a word n-gram with any evaluation prompt in `ctx.eval_prompts`, and report which
    evaluation items were hit, per set, so a contaminated benchmark can be warned about.

    Evaluation prompts shorter than n words (the demo world's are all short) have no n-gram;
    by default such a prompt contaminates a sample whose whole prompt is the same word
    sequence (`short: exact`), since any shorter n would match common phrases everywhere.
    """

    name = "decontaminate"
    Options = DecontaminateOptions

    def apply(self, rows: list[dict], ctx: CurateContext) -> FilterResult:
        n, short = self.options.n, self.options.short
        grams: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
        shorts: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
        for name, prompts in ctx.eval_prompts.items():
            for i, p in enumerate(prompts):
                w = words(p)
                if len(w) >= n:
                    for j in range(len(w) - n + 1):
                        grams[w[j:j + n]].append((name, i))
                elif w and short != "ignore":
                    shorts[w].append((name, i))
        short_lengths = sorted({len(s) for s in shorts})
        hits: dict[str, set[int]] = defaultdict(set)
        res = FilterResult(kept=[])
        for row in rows:
            found: set[tuple[str, int]] = set()
            texts = [prompt_text(row)] + ([answer_text(row) or ""] if self.options.include_answer else [])
            for k, text in enumerate(texts):
                w = words(text)
                for j in range(len(w) - n + 1):
                    found.update(grams.get(w[j:j + n], ()))
                if short == "exact" and k == 0:
                    found.update(shorts.get(w, ()))
                elif short == "contains":
                    for L in short_lengths:
                        for j in range(len(w) - L + 1):
                            found.update(shorts.get(w[j:j + L], ()))
            if found:
                for name, i in found:
                    hits[name].add(i)
                sets = ", ".join(sorted({name for name, _ in found}))
                res.dropped.append((row, f"contaminated ({sets})"))
            else:
                res.kept.append(row)
        res.report["contamination"] = {
            name: {"items": len(prompts), "items_hit": len(hits.get(name, ())),
                   "hit_indices": sorted(hits.get(name, ()))}
            for name, prompts in ctx.eval_prompts.items()}
        return res
