"""Curation at scale: the novelty filter and near-dedup on 100K synthetic instructions, against all-pairs.

Instructions are made procedurally: ~40 task openers x phrases drawn from ~200 nouns and
~80 adjectives, joined by connectors, with optional politeness prefixes and suffixes; a
quarter of them are light edits of an earlier one (a synonym, a word dropped, added or
swapped, a new prefix or suffix), as a teacher asked for "more tasks" repeats itself. So
some near-duplicates are paraphrases and some are accidents of the shared frames.

The baselines are the plain all-pairs loops (Alpaca's ROUGE-L filter; exact Jaccard
against every kept prompt for near-dedup), one core, run on subsets they can finish. Their
time is fitted as a power of n over the subset sizes and extrapolated to the full size.

    .venv/bin/python benchmarks/curation.py                     # 100K, subsets 1K,2K,4K (~6 min, 2 cores)
    .venv/bin/python benchmarks/curation.py --n 20000 --subsets 500,1000 --no-write
"""

from __future__ import annotations

import argparse
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402

from stillhouse.curate import CurateContext  # noqa: E402
from stillhouse.curate.dedup import NearDedup  # noqa: E402
from stillhouse.novelty import NoveltyFilter, novelty_filter_quadratic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

NOUNS = """cat dog river mountain city ocean forest robot computer garden kitchen library school hospital market bridge
castle island desert village train airport museum theater stadium factory farm harbor volcano glacier planet star
galaxy telescope microscope battery engine bicycle camera guitar piano violin painting sculpture poem novel recipe
bread coffee tea chocolate apple orange banana tomato potato rice pasta pizza soup salad cheese honey wine water
storm rain snow wind sunlight moon eclipse earthquake flood drought fire smoke cloud rainbow thunder lightning
elephant tiger lion whale dolphin shark eagle owl parrot penguin butterfly bee ant spider snake frog turtle rabbit
horse cow sheep goat pig chicken duck fox wolf bear deer monkey gorilla kangaroo koala panda zebra giraffe camel
algorithm database network server browser password keyboard screen printer router satellite rocket drone app
startup company budget invoice contract meeting interview resume salary tax loan mortgage insurance pension
election parliament president constitution law court judge lawyer police prison army navy treaty border passport
vaccine virus bacteria gene protein cell brain heart lung kidney muscle bone blood sleep dream memory emotion
teacher student doctor pilot chef farmer artist scientist engineer soldier sailor poet king queen child parent""".split()
ADJS = """small large ancient modern quiet noisy bright dark cold warm wet dry fast slow cheap expensive simple complex
strange familiar lonely crowded happy sad angry calm brave shy clever lazy busy empty hidden broken golden silver
wooden frozen burning floating sleeping flying rural urban coastal tropical arctic digital electric organic
curious elegant fragile heavy invisible loyal mysterious nervous patient proud rare rusty secret tiny wild young""".split()
OPENERS = ["Write a poem about the", "Explain why the", "Describe the", "Give three reasons to buy the",
           "Summarize the history of the", "Compare the", "Tell a story about the", "List facts about the",
           "Draw a picture of the", "What is the", "How does the", "Design a logo for the", "Plan a party for the",
           "Write an ad for the", "Translate into French: the", "Invent a name for the", "Review the",
           "Predict the future of the", "Write a haiku on the", "Teach a child about the", "Why is the",
           "Create a riddle about the", "Argue against the", "Interview the", "Sketch a plan to fix the",
           "Write a tweet praising the", "Name a song about the", "Debate the merits of the", "Pitch a film about the",
           "Give advice to the", "Rank these:", "Find a metaphor for the", "Estimate the cost of the",
           "Write a limerick about the", "Propose a law about the", "Critique the", "Imagine the",
           "Write instructions for the", "Classify the", "Caption a photo of the"]
CONNECTORS = ["and the", "near the", "with a", "for the", "without the", "inside a", "versus the", "or a",
              "under the", "beside a", "after the", "like a", "from the", "against a", "during the"]
PREFIXES = [""] * 8 + ["Please ", "Can you ", "Hey, ", "Quickly, "]
SUFFIXES = [""] * 14 + [" Keep it brief.", " Be creative.", " Use simple words.", " Explain why."]
SYNONYMS = {"write": "compose", "give": "provide", "explain": "clarify", "describe": "portray", "list": "enumerate",
            "create": "design", "plan": "schedule", "compare": "contrast", "invent": "coin", "review": "assess",
            "imagine": "picture", "why": "how come", "reasons": "arguments", "facts": "details"}


def _phrase(rng: random.Random) -> str:
    k = rng.randrange(4)
    if k == 0:
        return rng.choice(NOUNS)
    if k == 1:
        return f"{rng.choice(ADJS)} {rng.choice(NOUNS)}"
    if k == 2:
        return f"{rng.choice(NOUNS)} {rng.choice(NOUNS)}"
    return f"{rng.choice(ADJS)} {rng.choice(ADJS)} {rng.choice(NOUNS)}"


def _fresh(rng: random.Random) -> str:
    body = rng.choice(OPENERS) + " " + _phrase(rng)
    for _ in range(rng.choice((1, 1, 2))):
        body += f" {rng.choice(CONNECTORS)} {_phrase(rng)}"
    prefix = rng.choice(PREFIXES)
    body = (body[0].lower() + body[1:] if prefix else body) + rng.choice(".?.")
    return prefix + body + rng.choice(SUFFIXES)


def _paraphrase(text: str, rng: random.Random) -> str:
    words = text.split()
    for _ in range(rng.randint(1, 2)):
        i, op = rng.randrange(len(words)), rng.randrange(5)
        key = words[i].lower().strip(".,?:'")
        if op == 0 and key in SYNONYMS:
            words[i] = words[i].lower().replace(key, SYNONYMS[key])
        elif op == 1 and len(words) > 6:
            del words[i]
        elif op == 2:
            words.insert(i, rng.choice(["really", "very", "also", "just", "some", "the", "quite"]))
        elif op == 3:
            words[i] = rng.choice(NOUNS + ADJS)
        else:
            words = rng.choice(PREFIXES).split() + words + rng.choice(SUFFIXES).split()
    return " ".join(words)


def instructions(n: int, seed: int = 0, paraphrase_share: float = 0.25) -> list[str]:
    """`n` synthetic instructions, deterministic in `seed`; `paraphrase_share` of them edit an earlier one."""
    rng = random.Random(seed)
    out: list[str] = []
    for _ in range(n):
        out.append(_paraphrase(rng.choice(out), rng) if out and rng.random() < paraphrase_share else _fresh(rng))
    return out


def near_dedup_quadratic(texts: list[str], nd: NearDedup) -> list[bool]:
    """near_dedup's decisions by exact Jaccard against every kept prompt."""
    kept: list[frozenset] = []
    out = []
    t = nd.options.threshold
    for text in texts:
        sh = nd.shingle(text)
        n = len(sh)
        dup = bool(sh) and any((i := len(sh & k)) / (n + len(k) - i) >= t for k in kept)
        if not dup and sh:
            kept.append(sh)
        out.append(not dup)
    return out


def fit_power(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """(exponent, coefficient) of seconds = c * n ** exponent, least squares in log-log."""
    xs, ys = [math.log(n) for n in sizes], [math.log(s) for s in seconds]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    k = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return k, math.exp(my - k * mx)


def speed_factor() -> tuple[str, str]:
    """(this machine against the reference machine, the tool's output), from ../shared/tools/machine-speed."""
    tool = ROOT.parent / "shared" / "tools" / "machine-speed"
    if not tool.exists():
        return "unknown", ""
    out = subprocess.run([str(tool), sys.executable], capture_output=True, text=True, cwd=ROOT).stdout
    m = re.search(r"about ([0-9.]+)x the reference machine", out)
    return (f"{m.group(1)}x" if m else "unknown"), out.strip()


def duration(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds < 3600 else f"{seconds / 3600:.1f} hours"


def timed(fn, repeat: int = 1):
    """fn's result and its least CPU time over `repeat` runs.

    CPU time, not wall time: others' work shares this machine's two cores and its load changes
    during a run, which would leak into the fitted growth; every timed loop here is one thread.
    """
    best = math.inf
    for _ in range(repeat):
        t = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t)
    return out, best


def compare_table(table: list[dict], p: str) -> list[str]:
    """The subset rows of one comparison (`p`: "" for the novelty filter, "nd_" for near-dedup) as a table."""
    return ["| instructions | all-pairs CPU s | ours CPU s | speed-up | kept (all-pairs) | kept (ours) | "
            "decisions that differ |", "| --- | --- | --- | --- | --- | --- | --- |"] + [
        f"| {r['n']:,} | {r[p + 'quad']:.1f} | {r[p + 'ours']:.2f} | {r[p + 'quad'] / r[p + 'ours']:.0f}x | "
        f"{r[p + 'kept_quad']:,} | {r[p + 'kept']:,} | {r[p + 'differ']} |" for r in table]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--subsets", default="1000,2000,4000", help="sizes the all-pairs baselines run on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-write", action="store_true", help="print, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    sizes = [int(s) for s in args.subsets.split(",")]
    wall0, cpu0 = time.perf_counter(), time.process_time()
    factor_before, _ = speed_factor()  # before and after: the load from others' work changes during the run
    texts = instructions(args.n, args.seed)
    rows = [{"messages": [{"role": "user", "content": t}]} for t in texts]

    def ours_novelty(k):
        f = NoveltyFilter()
        return [f.add(t) for t in texts[:k]], f

    (keep_full, index), t_full = timed(lambda: ours_novelty(args.n))
    print(f"novelty, ours, {args.n:,}: {t_full:.1f} CPU s, kept {sum(keep_full):,}, ROUGE-L scored {index.scored:,}",
          flush=True)
    nd = NearDedup()
    res, t_nd_full = timed(lambda: nd.apply(rows, CurateContext()))
    nd_full = len(res.kept)
    print(f"near_dedup, ours, {args.n:,}: {t_nd_full:.1f} CPU s, kept {nd_full:,}", flush=True)

    table = []
    for k in sizes:
        (ours, _), t_ours = timed(lambda: ours_novelty(k), repeat=3)
        quad, t_quad = timed(lambda: novelty_filter_quadratic(texts[:k]))
        nd_ours_res, t_nd = timed(lambda: nd.apply(rows[:k], CurateContext()), repeat=3)
        nd_kept = {id(r) for r in nd_ours_res.kept}
        nd_ours = [id(r) in nd_kept for r in rows[:k]]
        nd_quad, t_nd_quad = timed(lambda: near_dedup_quadratic(texts[:k], nd))
        table.append({"n": k, "ours": t_ours, "quad": t_quad, "kept": sum(ours), "kept_quad": sum(quad),
                      "differ": sum(a != b for a, b in zip(ours, quad)),
                      "prefix_differ": sum(a != b for a, b in zip(keep_full[:k], quad)),
                      "nd_ours": t_nd, "nd_quad": t_nd_quad, "nd_kept": sum(nd_ours), "nd_kept_quad": sum(nd_quad),
                      "nd_differ": sum(a != b for a, b in zip(nd_ours, nd_quad))})
        print(table[-1], flush=True)

    k_rl, c_rl = fit_power(sizes, [r["quad"] for r in table])
    k_nd, c_nd = fit_power(sizes, [r["nd_quad"] for r in table])
    quad_full, nd_quad_full = c_rl * args.n ** k_rl, c_nd * args.n ** k_nd
    factor, speed_out = speed_factor()
    top = table[-1]
    quad_n2, nd_quad_n2 = top["quad"] * (args.n / top["n"]) ** 2, top["nd_quad"] * (args.n / top["n"]) ** 2
    command = "`.venv/bin/python benchmarks/curation.py" + (f" --n {args.n}" if args.n != 100_000 else "") + \
              (f" --subsets {args.subsets}" if args.subsets != "1000,2000,4000" else "") + "`"
    body = [
        "## Curation: novelty filter and near-dedup at 100K instructions", "",
        f"Command: {command} (x86_64, 2 CPU cores shared with other work, one process; times are CPU seconds "
        f"of the timed loop, best of 3 for ours on the subsets, so others' load does not bend the fit). "
        f"Machine speed (`../shared/tools/machine-speed`): **{factor_before}** the reference machine before the run, "
        f"**{factor}** after it (others' work shares the cores).", "",
        f"{args.n:,} synthetic instructions (`instructions()` in the script: ~40 task openers x phrases of "
        f"{len(NOUNS)} nouns and {len(ADJS)} adjectives, a quarter of them light edits of an earlier one).", "",
        "**Novelty filter** (self-instruct / Alpaca: drop an instruction whose ROUGE-L F with a kept one exceeds 0.7; "
        "rouge-score's tokenizer and LCS for both). Ours: MinHash LSH (datasketch, 384 permutations in 96 bands of 4, "
        "tagged unigram shingles) finds candidates, rouge-score confirms them. Baseline: every new instruction "
        "against every kept one, stopping at the first over the threshold.", "",
    ] + compare_table(table, "")
    body += [f"| {args.n:,} | ~{quad_full:,.0f} (extrapolated, n^{k_rl:.2f}) | {t_full:.1f} | "
             f"**~{quad_full / t_full:,.0f}x** | - | {sum(keep_full):,} ({1 - sum(keep_full) / args.n:.1%} dropped) | - |",
             "",
             f"All-pairs time grows as n^{k_rl:.2f} over the subsets (fitted in log-log); at {args.n:,} that is about "
             f"{duration(quad_full)} of CPU on this machine, against {t_full:.1f} s (at exactly n^2 from the "
             f"{top['n']:,} run: {duration(quad_n2)}, {quad_n2 / t_full:,.0f}x). Ours scored "
             f"{index.scored:,} ROUGE-L pairs at {args.n:,}; the all-pairs loop scores every kept instruction for "
             f"each new one, about {args.n * sum(keep_full) / 2:.1e} pairs. The first "
             f"{sizes[-1]:,} decisions of the full run differ from the all-pairs filter's in "
             f"{table[-1]['prefix_differ']} places.", "",
             "**Near-dedup** (`near_dedup` filter defaults: character 5-gram shingles of the normalised prompt, "
             "Jaccard >= 0.8, 128 permutations, bands for recall 0.99 at the threshold, candidates confirmed by exact "
             "Jaccard). Baseline: exact Jaccard against every kept prompt.", "",
             ] + compare_table(table, "nd_")
    body += [f"| {args.n:,} | ~{nd_quad_full:,.0f} (extrapolated, n^{k_nd:.2f}) | {t_nd_full:.1f} | "
             f"**~{nd_quad_full / t_nd_full:,.0f}x** | - | {nd_full:,} ({1 - nd_full / args.n:.1%} dropped) | - |",
             "",
             f"At exactly n^2 from the {top['n']:,} run the all-pairs Jaccard loop would take "
             f"{duration(nd_quad_n2)} at {args.n:,}, {nd_quad_n2 / t_nd_full:,.0f}x ours"
             + (" (over these sizes it grows faster than n^2: its kept sets outgrow the CPU caches)."
                if k_nd > 2.1 else ".")]
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    body += ["", f"This run: {wall / 60:.1f} min wall, {cpu / 60:.1f} min of this process's CPU (the two "
                 "machine-speed runs are separate processes, not counted); the rest is mostly time other work held "
                 "the cores."]
    if speed_out:
        body += ["", "machine-speed output (after the run):", "", "```", speed_out, "```"]
    text = "\n".join(body)
    print(text)
    if not args.no_write:
        write_section("curation", text)


if __name__ == "__main__":
    main()
