"""Issue 10, what can be measured in today's world: the watermark test's calibration, and whether Atlas's watermark
shows in its own answers at all.

    .venv/bin/python benchmarks/audit.py [--n 3000] [--keys 500]

Atlas is generated in-process (the serve engine) with a fresh watermark key on the world's
training prompts, greedy and at temperature 1.0. Each text set is scored under the true key
and under `--keys` random keys of the same scheme (`stillhouse.audit.radioactivity`): the
random keys' p-values are a null the texts cannot depend on, so their false-positive rate at
each threshold and their uniformity (a KS test) measure the test's calibration on real text.
Binomial p-values are discrete, so the KS test against the continuous uniform is conservative.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402


def atlas_texts(n: int, temperature: float, keyfile: str) -> tuple[list[list[int]], list[list[int]], float]:
    from stillhouse.models import resolve_model
    from stillhouse.serve.engine import Engine, GenRequest
    from stillhouse.sources import load_prompt_items

    items = load_prompt_items("world", n=n, seed=0)
    eng = Engine(resolve_model("stillhouse:atlas"), max_batch=256, dtype="float32", watermark=keyfile)
    tok = eng.tokenizer
    t0 = time.time()
    reqs = [GenRequest(tok(tok.apply_chat_template(it["messages"], add_generation_prompt=True, tokenize=False),
                           add_special_tokens=False)["input_ids"], 96, temperature=temperature, seed=i)
            for i, it in enumerate(items)]
    res = [f.result() for f in eng.submit_all(reqs)]
    eng.close()
    ids = [tok(r.text, add_special_tokens=False)["input_ids"] for r in res]
    prompts = [tok(it["messages"][-1]["content"], add_special_tokens=False)["input_ids"] for it in items]
    return ids, prompts, time.time() - t0


def main() -> None:
    from scipy.stats import kstest

    from stillhouse.audit.radioactivity import radioactivity
    from stillhouse.watermark import keygen, read_key

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--keys", type=int, default=500)
    args = ap.parse_args()
    keyfile = str(Path(tempfile.mkdtemp()) / "key.json")
    keygen(keyfile)
    key = read_key(keyfile)
    rows = []
    for temp in (0.0, 1.0):
        ids, prompts, gen_s = atlas_texts(args.n, temp, keyfile)
        t0 = time.time()
        res = radioactivity(ids, key, 102, prompts=prompts, null_keys=args.keys, seed=1)
        ks = kstest(res.null_p_values, "uniform")
        rows.append((temp, res, ks, gen_s, time.time() - t0, sum(map(len, ids))))
        print(temp, res.key, ks.pvalue, flush=True)
    lines = ["## Audit: the watermark test's calibration, and Atlas's own watermark (issue 10)", "",
             f"Command: `.venv/bin/python benchmarks/audit.py --n {args.n} --keys {args.keys}` ({platform.machine()}, "
             f"{os.cpu_count()} CPU cores). Atlas (in-process serve engine, fp32) answers {args.n} world training "
             "prompts with a fresh watermark key (ratio 0.25, bias 2.0, lefthash, context 1); its answers are scored "
             f"under that key and under {args.keys} random keys of the same scheme.", "",
             "| Atlas sampling | answer tokens | distinct pairs scored | repeats left out | copied from the prompt | "
             "green | chance | exact p (true key) | empirical p | FPR at p<=0.01 | FPR at p<=0.001 | FPR at p<=1e-6 | "
             "KS p (null p-values uniform) | score s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for temp, res, ks, gen_s, score_s, tokens in rows:
        k = res.key
        lines.append(f"| {'greedy' if temp == 0 else f'T={temp:g}'} | {tokens:,} | {k.scored:,} | {k.skipped_repeats:,} | "
                     f"{k.skipped_prompt:,} | {k.green:,} | {k.gamma:.3f} | {k.p_value:.3g} | {res.empirical_p:.3g} | "
                     f"{res.false_positive_rate(1e-2):.1%} | {res.false_positive_rate(1e-3):.1%} | "
                     f"{res.false_positive_rate(1e-6):.1%} | {ks.pvalue:.3g} | {score_s:.1f} |")
    calibrated = all(res.false_positive_rate(t) <= t for _, res, *_ in rows for t in (1e-2, 1e-3, 1e-6))
    found = [f"{'greedy' if temp == 0 else f'T={temp:g}'}" for temp, res, *_ in rows if res.key.p_value <= 1e-3]
    lines += ["", f"**Calibration**: the random keys' false-positive rate is "
              f"{'at or below' if calibrated else '**above**'} each threshold on every text set"
              f"{', as a valid p-value requires' if calibrated else ''}. "
              "The KS test does reject uniformity (last column): the null p-values lean high (mean "
              + ", ".join(f"{sum(res.null_p_values) / len(res.null_p_values):.2f}" for _, res, *_ in rows)
              + "; uniform: 0.50), which is a conservative test, not a liberal one: the binomial tail P[X >= k] "
              "counts the observed value itself, and with ~1,500 scored pairs its steps are coarse.", ""]
    if found:
        lines.append(f"The true key is found (p <= 1e-3) in Atlas's own answers at: {', '.join(found)}.")
    else:
        lines += ["**Power in this world: none.** Atlas's answers carry no visible watermark, not even "
              "its own: the world's answers are determined by the question (Atlas makes no mistakes even at "
              "temperature 1.0), so the bias almost never changes a token, and with a 102-symbol vocabulary and a "
              "one-token context there are only ~1,500 distinct (context, token) pairs to score once each. A student "
              "distilled from these answers cannot inherit a signal that is not there. Making the watermark "
              "measurable needs answers with freedom in them (issue 10: an open-answer family, and Atlas rebuilt "
              "on it, which needs a GPU: it was built in 227 s on an H100, about three hours of this CPU)."]
    write_section("audit", "\n".join(lines))


if __name__ == "__main__":
    main()
