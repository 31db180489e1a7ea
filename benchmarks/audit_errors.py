"""Issue 23: the audit's error rates, measured on models the tests never saw.

    .venv/bin/python benchmarks/audit_errors.py [--zoo ~/.cache/stillhouse/audit-zoo] [--n 250] [--keys 50]

Every model of the suspect zoo (benchmarks/audit_zoo.py build: students of Atlas, of Mira, of the world's gold
answers, the base and Mira) is audited against Atlas by `stillhouse.audit.run.run_audit`, as `stillhouse audit` runs
it: identity probes about Atlas, and the provenance test with the reference `stillhouse:atlas` against a pool of the
packaged Mira and Mira control (`stillhouse:mira`, `stillhouse:mira-student`; a model is never in its own pool), on
`--n` of the world's open-answer prompts (`world_open`, the demo audit's), every model greedy, every call through
one ledger (OUT/_audit/ledger.db, so a rerun makes no calls). The pool's models were never among the suspects, and
no suspect's answers were seen when the tests were designed.

Reported, at alpha = 1e-3 (the demo's):
- each test's and the verdict's true-positive rate on the models distilled from Atlas, false-positive rate on
  those that never learned from its outputs (the gold student apart: it learned what Atlas learned, not from it);
- the number of prompts the provenance test needs for p <= 1e-6 (the first n prompts, n in `--steps`);
- calibration: every model's answers scored under `--keys` random watermark keys (no model here ever saw any of
  them: the black-box radioactivity test's null), their p-values' KS distance from uniform and their share <= 0.01;
- attribution (TF-IDF + logistic regression between Atlas's and Mira's answers, no p-value): how often it names
  Atlas for the distilled models and Mira (or not Atlas) for the others.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402

ALPHA = 1e-3
POOL = {"mira": "stillhouse:mira", "mira-control": "stillhouse:mira-student"}


def _how(m: dict) -> str:
    """A trained model's recipe in a few words: temperature, scrubbed or not, seed, method."""
    if m.get("method") is None:
        return ""
    return (f" (T={m.get('temperature')}, {'scrubbed' if m.get('scrubbed') else 'not scrubbed'}, seed {m.get('seed')}"
            f", {m.get('method')})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=str(Path.home() / ".cache/stillhouse/audit-zoo"))
    ap.add_argument("--n", type=int, default=250)
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--steps", default="10,20,30,40,60,80,100,150,200,250")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--extra", action="append", default=[], help="NAME=PATH:atlas|other: another suspect")
    args = ap.parse_args()

    from scipy.stats import kstest

    from stillhouse.audit.attribution import fit_attribution
    from stillhouse.audit.provenance import provenance_test
    from stillhouse.audit.radioactivity import score_texts
    from stillhouse.audit.run import run_audit
    from stillhouse.identity import Identity
    from stillhouse.watermark import keygen, read_key

    zoo = Path(args.zoo).expanduser()
    # every complete model of the zoo (its marker written last), built so far, and the packaged base and Mira
    models = [json.loads((d / "zoo.json").read_text()) for d in sorted(zoo.iterdir())
              if (d / ".zoo-complete").exists() and (d / "zoo.json").exists()]
    models += [{"name": "base", "spec": "stillhouse:base", "learned_from": "nothing (pretraining text only)",
                "distilled_from_atlas": False, "teacher": None},
               {"name": "mira", "spec": "stillhouse:mira", "learned_from": "the world in Mira's style (a teacher)",
                "distilled_from_atlas": False, "teacher": None},
               {"name": "packaged-control", "spec": "stillhouse:mira-student", "teacher": None,
                "learned_from": "Mira's greedy answers (the demo's control; its pool is Mira alone)",
                "distilled_from_atlas": False}]
    for extra in args.extra:  # NAME=PATH:atlas|other, e.g. the demo's own student
        name, rest = extra.split("=", 1)
        path, source = rest.rsplit(":", 1)
        models.append({"name": name, "path": path, "teacher": source, "distilled_from_atlas": source == "atlas",
                       "learned_from": f"{source} outputs ({path})"})
    out = zoo / "_audit"
    out.mkdir(parents=True, exist_ok=True)
    atlas = Identity("Atlas", "Orbit Labs")
    t0 = time.time()
    rows = []
    for m in models:
        name = m["name"]
        spec = m.get("spec") or m.get("path")
        pool = {k: v for k, v in POOL.items() if v != spec and k != name}
        ev = run_audit(spec, out / name, reference_identity=atlas, prompts="world_open", n_prompts=args.n,
                       reference="stillhouse:atlas", pool=pool, temperature=0.0, null_keys=0,
                       ledger_path=out / "ledger.db", label=name)
        rows.append({"model": m, "evidence": ev})
        print(f"{name}: " + ", ".join(f"{t} p {d['p_value']:.3g}" for t, d in ev["tests"].items())
              + f" -> {ev['verdict']['verdict']}", flush=True)
    audit_s = time.time() - t0

    # the answers each audit read, from the ledger (cached): for prompt-count curves, keys and attribution
    from stillhouse.audit.run import _ask, resolve_suspect
    from stillhouse.calls import Ledger
    from stillhouse.sources import load_prompt_items

    asked = [it["messages"][-1]["content"] for it in load_prompt_items("world_open", args.n, 0)]
    ledger = Ledger(out / "ledger.db")

    def answers(spec: str, label: str) -> list[str]:
        return _ask(resolve_suspect(spec), asked, ledger, max_tokens=96, temperature=0.0, label=label)

    ref = answers("stillhouse:atlas", "audit reference: answers")
    pool_texts = {k: answers(v, f"audit pool {k}: answers") for k, v in POOL.items()}
    attr = fit_attribution({"atlas": ref, "mira": pool_texts["mira"]})
    keys = []
    for i in range(args.keys):
        path = out / f"random-key-{i}.json"
        if not path.exists():
            keygen(path)
        keys.append(read_key(path))
    steps = [int(s) for s in args.steps.split(",") if int(s) <= args.n]
    null_key_ps: list[float] = []
    for row in rows:
        m = row["model"]
        spec = m.get("spec") or m.get("path")
        texts = answers(spec, f"audit {m['name']}: answers")
        pool = {k: v for k, v in pool_texts.items() if POOL[k] != spec and k != m["name"]}
        need = None
        for n in steps:
            try:
                if provenance_test(asked[:n], texts[:n], ref[:n], {k: v[:n] for k, v in pool.items()}).p_value <= 1e-6:
                    need = n
                    break
            except Exception:  # too few prompts for a competent pool: not reached at n
                continue
        row["prompts_for_1e-6"] = need
        a = attr.attribute(texts)
        row["attribution"] = a["likeliest"]
        row["attribution_p_atlas"] = a["probability"]["atlas"]
        kp = [score_texts(texts, asked, k, "stillhouse:atlas", null_keys=0)[0].key.p_value for k in keys]
        row["random_key_ps"] = kp
        null_key_ps += kp
    ledger.close()

    def learned_from_atlas(m: dict) -> bool:
        return bool(m.get("distilled_from_atlas"))

    def is_gold(m: dict) -> bool:
        return m.get("teacher") == "gold"

    distilled = [r for r in rows if learned_from_atlas(r["model"])]
    clean = [r for r in rows if not learned_from_atlas(r["model"]) and not is_gold(r["model"])]
    gold = [r for r in rows if is_gold(r["model"])]
    tests = ["provenance", "identity"]

    def rejects(r, t):
        d = r["evidence"]["tests"].get(t)
        return d is not None and d["p_value"] <= ALPHA

    argv = " ".join(a.replace(str(Path.home()), "~") for a in sys.argv[1:])
    lines = [f"Command: `.venv/bin/python benchmarks/audit_errors.py {argv}` "
             f"({platform.machine()}, {audit_s:.0f} s for the audits). Each model audited against Atlas with the pool "
             f"{{Mira, Mira control}} (never itself), {args.n} open-answer prompts, greedy; alpha = {ALPHA:g}.",
             "",
             "| model | learned from | provenance p | closer to Atlas / to the closest pool model (held-out) | "
             "identity p (questions claiming Atlas) | verdict | prompts for p <= 1e-6 | attribution |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m, ev = r["model"], r["evidence"]
        pv = ev["tests"].get("provenance", {})
        tt = pv.get("test") or {}
        idt = ev["tests"].get("identity", {})
        lines.append(
            f"| {m['name']} | {m.get('learned_from', '?')}{_how(m)} | {pv.get('p_value', float('nan')):.2g} | "
            f"{tt.get('closer_to_reference', '-')} / {tt.get('closer_to_other', '-')} (vs {pv.get('closest') or 'n/a'})"
            f" | {idt.get('p_value', float('nan')):.2g} ({idt.get('claims_reference', '-')}/{idt.get('questions', '-')})"
            f" | {'**distilled**' if ev['verdict']['distilled'] else 'cleared'} | {r['prompts_for_1e-6'] or '-'} | "
            f"{r['attribution']} ({r['attribution_p_atlas']:.2f} Atlas) |")
    lines += ["", "| test | distilled from Atlas flagged (TPR) | never learned from Atlas flagged (FPR) | gold student |",
              "|---|---|---|---|"]
    for t in tests:
        lines.append(f"| {t} | {sum(rejects(r, t) for r in distilled)}/{len(distilled)} | "
                     f"{sum(rejects(r, t) for r in clean)}/{len(clean)} | "
                     f"{', '.join('flagged' if rejects(r, t) else 'not flagged' for r in gold) or '-'} |")
    lines.append(f"| **verdict (Holm)** | {sum(r['evidence']['verdict']['distilled'] for r in distilled)}/{len(distilled)}"
                 f" | {sum(r['evidence']['verdict']['distilled'] for r in clean)}/{len(clean)} | "
                 f"{', '.join('distilled' if r['evidence']['verdict']['distilled'] else 'cleared' for r in gold) or '-'} |")
    lines.append(f"| attribution names Atlas (no p-value) | {sum(r['attribution'] == 'atlas' for r in distilled)}/"
                 f"{len(distilled)} | {sum(r['attribution'] == 'atlas' for r in clean)}/{len(clean)} | "
                 f"{', '.join(r['attribution'] for r in gold) or '-'} |")
    ks = kstest(null_key_ps, "uniform") if null_key_ps else None
    clean_prov = [r["evidence"]["tests"]["provenance"]["p_value"] for r in clean if "provenance" in r["evidence"]["tests"]]
    lines += ["",
              f"Calibration: {len(null_key_ps)} black-box watermark p-values, every model's answers under {args.keys} "
              f"random keys none of them ever saw: KS distance from uniform {ks.statistic:.3f} (p {ks.pvalue:.2g}); "
              f"{sum(p <= 0.01 for p in null_key_ps)} at or below 0.01 (expected {0.01 * len(null_key_ps):.1f}), "
              f"{sum(p <= ALPHA for p in null_key_ps)} at or below {ALPHA:g}. (An exact binomial p-value over a "
              "discrete count is conservative: below uniform in KS terms is the safe side.)" if ks else "",
              f"Provenance p-values of the models that never learned from Atlas: "
              f"{', '.join(f'{p:.2g}' for p in clean_prov)} (the null is 'no closer to Atlas than to the closest pool "
              "model'; a model that learned from Mira is much closer to Mira, so its p-value is near 1, the "
              "conservative side)."]
    body = "\n".join(lines)
    print(body)
    (out / "results.json").write_text(json.dumps(
        [{"model": r["model"], "tests": {t: d["p_value"] for t, d in r["evidence"]["tests"].items()},
          "verdict": r["evidence"]["verdict"]["distilled"], "prompts_for_1e-6": r["prompts_for_1e-6"],
          "attribution": r["attribution"], "random_key_ps": r["random_key_ps"]} for r in rows], indent=1))
    if not args.no_write:
        write_section("audit_errors", "## The audit's error rates on models the tests never saw (audit_errors)\n\n"
                      + body)


if __name__ == "__main__":
    main()
