"""Self-instruct's novelty filter: keep an instruction only if it is not too close to one already kept.

Alpaca (and self-instruct before it) compares each new instruction with every kept one by
ROUGE-L and drops it when the best F-measure exceeds 0.7. That is quadratic: at 100K
instructions, billions of LCS tables. Here the kept instructions sit in a MinHash LSH index
(datasketch) and only its candidates are scored, with rouge-score's own ROUGE-L, so the
decision is the same one, made on far fewer pairs.

Why the index cannot miss a pair over the threshold (up to the LSH's stated recall): the
longest common subsequence of two token lists is made of tokens both contain, so their
multiset overlap is at least the LCS. With lengths a, b and ROUGE-L F = 2·LCS/(a+b), the
multiset Jaccard J = overlap/(a+b-overlap) is at least (F/2)/(1-F/2) = F/(2-F): 0.538 for
F = 0.7. The shingles are therefore the tokens themselves, each tagged with its occurrence
("the#0", "the#1"), whose set Jaccard is exactly the multiset Jaccard; and the LSH bands are
chosen so that a pair at J = F/(2-F) becomes a candidate with probability >= `recall`
(0.999 by default: 384 permutations in 96 bands of 4 find it with probability 0.9998).
Pairs further over the threshold have a higher J and are found more surely still. The
bound is tight and often reached in templated data (the same frame, different words), so
the recall is set for it, not for typical pairs: in a trial on 4,000 templated
instructions, 512 permutations in 102 bands of 5 (recall 0.991 at the bound) kept 2
instructions the quadratic filter dropped; 64, 96 or 128 bands of 4 agreed with it.

`novelty_filter_quadratic` is the plain all-pairs filter, as Alpaca runs it; the benchmark
and the tests compare the two.
"""

from __future__ import annotations

import zlib
from collections import Counter
from typing import Iterable

import numpy as np
from datasketch import MinHash, MinHashLSH

from stillhouse.text import TokenizerName, UnicodeTokenizer, make_tokenizer, rouge_l  # noqa: F401 (re-exported)


def min_jaccard(threshold: float) -> float:
    """The least multiset Jaccard of two token lists whose ROUGE-L F-measure is `threshold`: F/(2-F)."""
    return threshold / (2 - threshold)


def lsh_params(jaccard: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows): the most rows per band (fewest false candidates) that still make a pair of Jaccard
    `jaccard` a candidate with probability >= `recall`, using at most `num_perm` permutations."""
    best = None
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1 - (1 - jaccard ** r) ** b >= recall:
            best = (b, r)
    if best is None:
        raise ValueError(f"no LSH banding of {num_perm} permutations finds Jaccard {jaccard:.3f} with recall {recall}")
    return best


def candidate_probability(jaccard: float, params: tuple[int, int]) -> float:
    """The probability that LSH with `params` (bands, rows) makes a pair of this Jaccard a candidate."""
    b, r = params
    return 1 - (1 - jaccard ** r) ** b


def minhasher(num_perm: int, seed: int = 1):
    """A function from shingles (bytes) to a datasketch MinHash, all sharing one set of permutations."""
    # crc32 rather than datasketch's default SHA-1: deterministic and several times faster; and the permutations
    # made once rather than once per MinHash
    proto = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32)

    def make(shingles: Iterable[bytes]) -> MinHash:
        m = MinHash(num_perm=num_perm, seed=seed, hashfunc=zlib.crc32, permutations=proto.permutations,
                    scheme=proto.scheme)
        m.update_batch(shingles)
        return m

    return make


def _shingles(tokens: list[str]) -> list[bytes]:
    seen: Counter = Counter()
    out = []
    for t in tokens:
        out.append(f"{t}#{seen[t]}".encode())
        seen[t] += 1
    return out


class _Overlaps:
    """The kept instructions' shingles as integer ids in one flat array, for multiset overlaps with many at once.

    Written by hand: a query's LSH candidates number in the hundreds at 100K instructions, and
    intersecting that many Python sets (scattered in memory) cost more than everything else
    together; gathering their ids from one array and testing membership in numpy is ~10x faster.
    """

    def __init__(self) -> None:
        self.ids: dict[bytes, int] = {}
        self._flat = np.zeros(1024, np.int32)
        self._start = np.zeros(1024, np.int64)
        self._size = np.zeros(1024, np.int64)
        self._used, self._n = 0, 0
        self._member = np.zeros(1024, bool)

    def encode(self, shingles: list[bytes]) -> np.ndarray:
        ids = self.ids
        return np.fromiter((ids.setdefault(s, len(ids)) for s in shingles), np.int32, len(shingles))

    def add(self, ids: np.ndarray) -> None:
        if self._used + len(ids) > len(self._flat):
            self._flat = np.resize(self._flat, 2 * (self._used + len(ids)))
        if self._n == len(self._start):
            self._start, self._size = np.resize(self._start, 2 * self._n), np.resize(self._size, 2 * self._n)
        self._flat[self._used:self._used + len(ids)] = ids
        self._start[self._n], self._size[self._n] = self._used, len(ids)
        self._used += len(ids)
        self._n += 1

    def sizes(self, keys: np.ndarray) -> np.ndarray:
        return self._size[keys]

    def overlap(self, ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """How many of `ids` each kept entry in `keys` holds (every id of an entry is distinct)."""
        if len(self._member) < len(self.ids):
            self._member = np.zeros(2 * len(self.ids), bool)
        sizes = self._size[keys]
        ends = np.cumsum(sizes)
        firsts = ends - sizes
        # the positions of every candidate's ids in the flat array, candidate after candidate
        positions = np.arange(ends[-1]) + np.repeat(self._start[keys] - firsts, sizes)
        self._member[ids] = True
        hits = self._member[self._flat[positions]]
        self._member[ids] = False
        return np.add.reduceat(hits, firsts) if len(hits) else np.zeros(len(keys), np.int64)


class NoveltyFilter:
    """Instructions kept so far, indexed; `add` keeps a new one only if no kept one is within the threshold.

    An instruction is "not novel" when its ROUGE-L F-measure with some kept instruction is
    greater than `threshold` (Alpaca's rule). Empty instructions (no tokens) are always
    novel, as ROUGE-L scores them 0 against everything.
    """

    def __init__(self, threshold: float = 0.7, num_perm: int = 384, recall: float = 0.999,
                 tokenizer: TokenizerName = "rouge", seed: int = 1):
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], not {threshold}")
        self.threshold = threshold
        self.tokenizer = make_tokenizer(tokenizer)
        self.params = lsh_params(min_jaccard(threshold), num_perm, recall)
        self._minhash = minhasher(num_perm, seed)
        self._lsh = MinHashLSH(num_perm=num_perm, params=self.params)
        self._tokens: list[list[str]] = []
        self._overlaps = _Overlaps()
        self._exact: dict[tuple[str, ...], int] = {}
        self.scored = 0  # ROUGE-L computations made, for benchmarks

    def __len__(self) -> int:
        return len(self._tokens)

    def match(self, text: str) -> tuple[int, float] | None:
        """A kept instruction (its index in the order kept, its ROUGE-L) too close to `text`, or None if novel."""
        return self._match(self.tokenizer.tokenize(text))[0]

    def _match(self, tokens: list[str]) -> tuple[tuple[int, float] | None, tuple | None]:
        if not tokens:
            return None, None
        hit = self._exact.get(tuple(tokens))
        if hit is not None and self.threshold < 1:
            return (hit, 1.0), None
        shingles = _shingles(tokens)
        mh, ids = self._minhash(shingles), self._overlaps.encode(shingles)
        cands = self._lsh.query(mh)
        if cands:
            # The LCS is at most the multiset overlap (the tagged shingles both hold), so F <= 2 * overlap / (a + b)
            # rules out most candidates before rouge-score's LCS table in Python. The margin: rouge-score's float F
            # of a pair exactly at the threshold can come out just above it.
            keys = np.fromiter(cands, np.int64, len(cands))
            overlap = self._overlaps.overlap(ids, keys)
            bound = (self.threshold - 1e-9) * (len(tokens) + self._overlaps.sizes(keys))
            for k in keys[2 * overlap >= bound].tolist():
                self.scored += 1
                f = rouge_l(self._tokens[k], tokens)
                if f > self.threshold:
                    return (k, f), None
        return None, (mh, ids)

    def keep(self, text: str) -> int:
        """Add `text` to the kept instructions whatever its similarity (seed tasks); its index."""
        return self._keep(self.tokenizer.tokenize(text), None)

    def _keep(self, tokens: list[str], sketch: tuple | None) -> int:
        if tokens and sketch is None:
            shingles = _shingles(tokens)
            sketch = self._minhash(shingles), self._overlaps.encode(shingles)
        mh, ids = sketch or (None, np.zeros(0, np.int32))
        k = len(self._tokens)
        self._tokens.append(tokens)
        self._overlaps.add(ids)
        if tokens:
            self._exact.setdefault(tuple(tokens), k)
            self._lsh.insert(k, mh, check_duplication=False)
        return k

    def add(self, text: str) -> bool:
        """Keep `text` if it is novel; True if kept, False if a kept instruction is within the threshold."""
        tokens = self.tokenizer.tokenize(text)
        hit, sketch = self._match(tokens)
        if hit is not None:
            return False
        self._keep(tokens, sketch)
        return True


def novelty_filter(candidates: Iterable[str], kept: Iterable[str] = (), threshold: float = 0.7,
                   num_perm: int = 384, recall: float = 0.999, tokenizer: TokenizerName = "rouge") -> list[bool]:
    """For each candidate in order, whether it is kept: its ROUGE-L with every instruction in `kept` and every
    earlier kept candidate is at most `threshold`. Candidates found with MinHash LSH, confirmed with rouge-score."""
    f = NoveltyFilter(threshold, num_perm, recall, tokenizer)
    for text in kept:
        f.keep(text)
    return [f.add(c) for c in candidates]


def novelty_filter_quadratic(candidates: Iterable[str], kept: Iterable[str] = (), threshold: float = 0.7,
                             tokenizer: TokenizerName = "rouge") -> list[bool]:
    """The same decisions by comparing each candidate with every kept instruction (Alpaca's loop, on one core)."""
    tok = make_tokenizer(tokenizer)
    pool = [tok.tokenize(t) for t in kept]
    out = []
    for c in candidates:
        tokens = tok.tokenize(c)
        novel = all(rouge_l(p, tokens) <= threshold for p in pool)
        if novel:
            pool.append(tokens)
        out.append(novel)
    return out
