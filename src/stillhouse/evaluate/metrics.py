"""The evaluate stage's statistics: pass@k, and bootstrap intervals over benchmark items.

Every interval in `eval/results.json` is a seeded percentile bootstrap over the benchmark's
items: one matrix of resampled item indices per run, drawn within each task family, shared
by every statistic and every model. Sharing it makes comparisons paired (a model's share of
the teacher's score is resampled on the same items for both), and drawing within families
keeps each family's size fixed, so the headline (the mean over families) is defined in every
resample.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of one item with `c` of `n` sampled answers right (Chen et al. 2021, "Evaluating Large
    Language Models Trained on Code"): the chance that at least one of `k` answers drawn without replacement from
    the `n` is right, 1 - C(n-c, k) / C(n, k). Exact integer arithmetic (`math.comb`), so no overflow or
    cancellation for any n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(samples: int) -> list[int]:
    """The k reported for `samples` answers per item: 1, 10 and 100 where there are that many (Chen et al.'s), and
    `samples` itself."""
    return sorted({k for k in (1, 10, 100) if k <= samples} | {samples})


class Bootstrap:
    """A seeded, stratified percentile bootstrap over items.

    Written by hand rather than with `scipy.stats.bootstrap` because every statistic of a run must see the *same*
    resamples (paired comparisons across models and between a model and the teacher) drawn *within strata* (task
    families), neither of which scipy offers; what remains is a few lines of numpy. The percentile method, not BCa:
    BCa's acceleration is undefined when every item agrees (an accuracy of 0 or 1, common on small benchmarks),
    where the percentile interval is simply the point.

    `strata[i]` is item i's family; `idx` is a `(resamples, n)` matrix of item indices, column i always drawn from
    item i's stratum.
    """

    def __init__(self, strata: Sequence[str], resamples: int = 1000, confidence: float = 0.95, seed: int = 0):
        self.confidence, self.resamples = confidence, resamples
        rng = np.random.default_rng(seed)
        labels = np.asarray(strata, dtype=object)
        self.groups: dict[str, np.ndarray] = {s: np.flatnonzero(labels == s) for s in dict.fromkeys(strata)}
        self.idx = np.empty((resamples, len(labels)), dtype=np.int64)
        for pos in self.groups.values():
            self.idx[:, pos] = rng.choice(pos, size=(resamples, len(pos)))

    def interval(self, replicates: np.ndarray) -> list[float] | None:
        """The percentile interval of a statistic's replicates; resamples where it is undefined (NaN: a zero
        denominator) are left out, and None when it is undefined in all of them."""
        r = np.asarray(replicates, dtype=float)
        r = r[np.isfinite(r)]
        if r.size == 0:
            return None
        alpha = (1 - self.confidence) / 2
        lo, hi = np.quantile(r, [alpha, 1 - alpha])
        return [float(lo), float(hi)]

    # -- replicates: one value per resample ------------------------------------------------------------------------
    def family_means(self, x: Sequence[float]) -> dict[str, np.ndarray]:
        """Per family, each resample's mean of `x` over that family's items."""
        r = np.asarray(x, dtype=float)[self.idx]
        return {f: r[:, pos].mean(axis=1) for f, pos in self.groups.items()}

    def macro_mean(self, x: Sequence[float]) -> np.ndarray:
        """Each resample's mean over families of the family means of `x` (the stage's headline accuracy)."""
        return np.mean(list(self.family_means(x).values()), axis=0)

    def ratio(self, num: Sequence[float], den: Sequence[float]) -> np.ndarray:
        """Each resample's sum of `num` over its sum of `den` (NaN where that is 0): a share over a subset of items
        (`den` the subset's 0/1 mask), or a ratio of two totals (the Vicuna relative score)."""
        n = np.asarray(num, dtype=float)[self.idx].sum(axis=1)
        d = np.asarray(den, dtype=float)[self.idx].sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d > 0, n / np.where(d > 0, d, 1), np.nan)


def divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`a / b` elementwise, NaN where `b` is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), np.nan)


def share(num: Sequence[float], den: Sequence[float]) -> float | None:
    """sum(num) / sum(den), None when the denominator is 0."""
    d = float(np.sum(den))
    return float(np.sum(num)) / d if d else None
