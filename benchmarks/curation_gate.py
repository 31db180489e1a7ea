"""Issue 9: does the verifier gate earn its keep, and what does an unscrubbed student say it is?

    STILLHOUSE_DTYPE=float32 .venv/bin/python benchmarks/curation_gate.py [--n 3000] [--out DIR] [--speed-factor X]

1. Atlas sampled at a high temperature (`--temperature`, default 1.5: at 1.0 Atlas made 0 mistakes in 3,000
   samples and 1 in 600, so there was nothing for a gate to catch; at 1.5 about 7% of its samples are wrong,
   at 2.0 about 60%) on the demo's world prompts; the
   generated data is made once (run `gate`) and shared with run `nogate` through a copy of the
   ledger (its generation makes 0 calls). `nogate` curates with the default filters, `gate` adds
   `verify: {verifier: exact}`. Both train for the same number of optimizer steps: `gate` keeps the
   demo's epochs E, `nogate` gets epochs = (ceil(E * ceil(n_gate / bs)) - 0.5) / ceil(n_nogate / bs), which
   the trainer's ceil(epochs * steps_per_epoch) turns into the same step count.
2. The demo recipe (greedy Atlas, scrubbed student "Nova, made by Northwind"), and the same run with
   curation that does not scrub identity (no identity filter, no student identity), sharing the demo
   run's ledger; evaluate's identity_claims (benchmark identity questions and `world_identity`
   probes) for both.

Writes the tables into BENCHMARKS.md (section `gate`) and every figure into OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402
from demo import speed_factor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "src" / "stillhouse" / "demo" / "recipe.yaml"


def recipe(name: str, out: Path, **changes):
    from stillhouse.recipe import parse_recipe

    doc = yaml.safe_load(DEMO.read_text())
    doc["name"], doc["run_dir"] = name, str(out / name)
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    return parse_recipe(yaml.safe_dump(doc, sort_keys=False), source=name)


def share_ledger(src: Path, dst: Path) -> None:
    """Start run `dst` with a copy of `src`'s ledger, so the calls `src` made are cache hits in `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm"):
        p = src / f"ledger.db{suffix}"
        if p.exists() and not (dst / p.name).exists():
            shutil.copy2(p, dst / p.name)


def run(r) -> dict:
    from stillhouse.stages import run_all

    t0 = time.time()
    run_all(r)
    out = collect(Path(r.run_dir), r.train.epochs)
    out["wall"] = round(time.time() - t0, 1)
    print(json.dumps({"run": r.name, "wall": out["wall"], "kept": out["curate"]["kept"],
                      "steps": out["train"]["steps"],
                      "acc": {k: round(m["accuracy"], 4) for k, m in out["models"].items()}}), flush=True)
    return out


def collect(root: Path, epochs: float) -> dict:
    """A finished run's figures, from its files."""
    stages = {p.stem: json.loads(p.read_text()) for p in (root / "stages").glob("*.json")}
    res = json.loads((root / "eval" / "results.json").read_text()) if (root / "eval" / "results.json").exists() \
        else {"models": []}
    return {"stage_seconds": {s: m.get("seconds") for s, m in stages.items()},
            "curate": stages["curate"]["counts"],
            "train": stages["train"]["counts"] if "train" in stages else {"samples": stages["curate"]["counts"]["kept"]},
            "models": {m["name"]: m for m in res["models"]}, "epochs": epochs}


def teacher_pass_rates(run_dir: Path) -> dict:
    """Per family: how many of the teacher's generated samples the exact verifier accepts (what the gate keeps)."""
    import pyarrow.parquet as pq

    from stillhouse.verify import get_verifier, verify_many

    rows = pq.read_table(run_dir / "data" / "generated.parquet").to_pylist()
    rows = [r for r in rows if r.get("reference_answer") is not None]
    ok = verify_many(get_verifier("exact", {}), [r["messages"][-1]["content"] for r in rows],
                     [r["reference_answer"] for r in rows])
    fams: dict[str, list[bool]] = {}
    for r, v in zip(rows, ok):
        fams.setdefault(r.get("family") or "all", []).append(v.ok)
    return {f: {"n": len(v), "passed": sum(v)} for f, v in fams.items()}


def gate_part(out: Path, temp: float, n: int, prompts: dict, summary: dict, summary_path: Path,
              seeds: tuple[int, ...] = (0,)) -> dict:
    """`gate` and `nogate` at one temperature, the same number of training steps, one shared generation."""
    demo_train = yaml.safe_load(DEMO.read_text())["train"]
    bs, epochs0 = demo_train["batch_size"], demo_train["epochs"]
    # an earlier run's directories where there is one (its finished stages are skipped, its ledger reused)
    names = tuple(summary.get("gates", {}).get(str(temp), {}).get("dirs") or (f"gate-{temp:g}", f"nogate-{temp:g}"))
    hot = {"teacher": {"spec": "hf:stillhouse:atlas", "options": {"batch_size": 256, "dtype": "float32"},
                       "terms": "apache-2.0", "identity": {"name": "Atlas", "maker": "Orbit Labs"}},
           "generation": {"temperature": temp, "max_tokens": 96}, "prompts": prompts}
    gate = run(recipe(names[0], out, **hot, curate={"verify": {"verifier": "exact"}}))
    target = math.ceil(math.ceil(gate["train"]["samples"] / bs) * epochs0)
    res = {"n": n, "temperature": temp, "gate": gate, "pass_rates": teacher_pass_rates(out / names[0]),
           "target_steps": target, "dirs": list(names)}
    summary.setdefault("gates", {})[str(temp)] = res
    summary_path.write_text(json.dumps(summary, indent=2))
    share_ledger(out / names[0], out / names[1])
    # what the default filters leave = what the gate was given
    n_nogate = next(s["in"] for s in gate["curate"]["filters"] if s["filter"].startswith("verify"))
    train = {**demo_train, "epochs": round((target - 0.5) / math.ceil(n_nogate / bs), 6)}
    nogate = run(recipe(names[1], out, **hot, train=train, curate={}))  # the default filters, as `gate`
    if nogate["train"]["samples"] != n_nogate:
        print(f"warning: nogate kept {nogate['train']['samples']} samples, not {n_nogate}; steps may differ")
    res["nogate"] = nogate
    summary_path.write_text(json.dumps(summary, indent=2))
    for seed in [x for x in seeds if x != demo_train.get("seed", 0)]:  # more training seeds, same generation
        runs = {}
        for label, name, extra in (("gate", names[0], {"curate": {"verify": {"verifier": "exact"}}, "train": demo_train}),
                                   ("nogate", names[1], {"curate": {}, "train": train})):
            share_ledger(out / names[0], out / f"{name}-s{seed}")
            runs[label] = run(recipe(f"{name}-s{seed}", out, **hot, **{**extra, "train": {**extra["train"], "seed": seed}}))
        res.setdefault("seeds", {})[str(seed)] = runs
        summary_path.write_text(json.dumps(summary, indent=2))
    return res


def pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000, help="world prompts (the demo's 3000)")
    ap.add_argument("--out", default="/tmp/stillhouse-curation-gate")
    ap.add_argument("--parts", default="gate,identity")
    ap.add_argument("--speed-factor", type=float, default=None)
    ap.add_argument("--seeds", default="0", help="training seeds for the identity part (0 is the demo's): 0,1,2")
    ap.add_argument("--temperature", default="1.5", help="Atlas's sampling temperature(s) for the gate part: 1.5 or 1.5,2.0")
    args = ap.parse_args()
    os.environ.setdefault("STILLHOUSE_DTYPE", "float32")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    parts = [p for p in args.parts.split(",") if p]  # --parts '' rewrites the section from OUT/summary.json
    factor = args.speed_factor or (speed_factor() if parts else summary.get("speed_factor"))
    summary["speed_factor"] = factor
    prompts = {"source": "world", "n": args.n, "seed": 0}
    if isinstance(summary.get("gate"), dict):  # a summary written before several temperatures were kept
        old = summary.pop("gate")
        summary.setdefault("gates", {})[str(old.get("temperature", 1.0))] = {**old, "dirs": ["gate", "nogate"]}
    if "gate" in parts:
        for temp in [float(t) for t in str(args.temperature).split(",")]:
            seeds = tuple(int(x) for x in args.seeds.split(",") if x)
            summary.setdefault("gates", {})[str(temp)] = gate_part(out, temp, args.n, prompts, summary, summary_path,
                                                                   seeds)

    if "identity" in parts:
        demo = run(recipe("demo", out, prompts=prompts))
        share_ledger(out / "demo", out / "unscrubbed")
        student = {"base": "stillhouse:base"}
        curate = {"filters": [{"name": "empty"}, {"name": "exact_dedup"}, {"name": "decontaminate"}]}
        unscrubbed = run(recipe("unscrubbed", out, prompts=prompts, student=student, curate=curate))
        summary["identity"] = {"n": args.n, "scrubbed": demo, "unscrubbed": unscrubbed}
        summary_path.write_text(json.dumps(summary, indent=2))
        # more training seeds on the same two curated sets: single runs differ by several points
        demo_train = yaml.safe_load(DEMO.read_text())["train"]
        for seed in [int(x) for x in args.seeds.split(",") if x and int(x) != demo_train.get("seed", 0)]:
            train = {**demo_train, "seed": seed}
            for name in ("demo", "unscrubbed"):
                share_ledger(out / "demo", out / f"{name}-s{seed}")
            summary["identity"].setdefault("seeds", {})[str(seed)] = {
                "scrubbed": run(recipe(f"demo-s{seed}", out, prompts=prompts, train=train)),
                "unscrubbed": run(recipe(f"unscrubbed-s{seed}", out, prompts=prompts, student=student,
                                         curate=curate, train=train))}
            summary_path.write_text(json.dumps(summary, indent=2))

    write(summary, args)


def write(summary: dict, args) -> None:
    import torch

    bs = yaml.safe_load(DEMO.read_text())["train"]["batch_size"]
    factor = summary.get("speed_factor")
    gates = dict(sorted(summary.get("gates", {}).items(), key=lambda kv: float(kv[0])))
    n = next((g["n"] for g in gates.values()), summary.get("identity", {}).get("n", args.n))
    temps = ",".join(f"{g['temperature']:g}" for g in gates.values())
    seeds = ",".join(["0", *sorted(summary.get("identity", {}).get("seeds", {}))])
    cmd = (f"`STILLHOUSE_DTYPE=float32 .venv/bin/python benchmarks/curation_gate.py --n {n}"
           + (f" --temperature {temps}" if temps else "") + (f" --seeds {seeds}" if seeds != "0" else "") + "`")
    train = yaml.safe_load(DEMO.read_text())["train"]
    lines = ["## Curation: the verifier gate, and identity scrubbing (issue 9)", "",
             f"Command: {cmd} ({platform.machine()}, {os.cpu_count()} CPU cores, torch threads "
             f"{torch.get_num_threads()}; `../shared/tools/machine-speed`: "
             f"**{f'{factor:.2f}x' if factor else 'unknown'}** the reference machine). Compute dtype float32. "
             f"{n} world prompts; student stillhouse:base, trained as the demo recipe ({json.dumps(train)}) except for "
             "epochs where said; evaluate: world benchmark, 40 items per family, identity probes `world_identity`.", ""]
    if gates:
        lines += [
            "### 1. The verifier gate on a sampled teacher",
            "",
            "Atlas made no mistakes to catch at temperature 1.0 (0 wrong of 3,000 samples in an earlier run, 1 of "
            "600 in a check), so it is sampled hotter here. At each temperature one generation is shared by both "
            "runs (the second starts from a copy of the first's ledger: 0 teacher calls). `no gate`: the default "
            "filters (empty, exact_dedup, decontaminate, identity). `gate`: the same plus "
            "`curate.verify: {verifier: exact}`. Steps matched: `gate` trains the demo's epochs; `no gate` gets "
            "epochs = (gate's steps - 0.5) / batches per epoch, which the trainer (max_steps = ceil(epochs x batches "
            "per epoch)) makes the same step count.",
            "",
        ]
        fams = sorted(next(iter(gates.values()))["pass_rates"])
        lines += ["Share of Atlas's samples whose `Answer:` line is wrong (what the gate exists to catch), per family:",
                  "", "| temperature | samples | wrong | " + " | ".join(fams) + " |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in fams) + " |"]
        for g in gates.values():
            pr = g["pass_rates"]
            n_all, wrong = sum(v["n"] for v in pr.values()), sum(v["n"] - v["passed"] for v in pr.values())
            lines.append(f"| {g['temperature']:g} | {n_all} | {wrong} ({wrong / n_all:.1%}) | "
                         + " | ".join(pct(1 - pr[f]["passed"] / pr[f]["n"]) for f in fams) + " |")
        lines += ["", "| temperature | run | samples kept | epochs | training steps | final loss | train s | "
                  + " | ".join(fams) + " | overall | share kept of Atlas |",
                  "| --- | --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in fams) + " | --- | --- |"]
        for g in gates.values():
            for label, r in (("no gate", g.get("nogate")), ("gate (exact)", g["gate"])):
                if r is None or "student" not in r["models"]:
                    lines.append(f"| {g['temperature']:g} | {label} | not run | | | | | "
                                 + " | ".join("" for _ in fams) + " | | |")
                    continue
                st = r["models"]["student"]
                lines.append(f"| {g['temperature']:g} | {label} | {r['curate']['kept']} | {r['epochs']:.4f} | "
                             f"{r['train']['steps']} | {r['train']['final_loss']:.3f} | "
                             f"{r['train']['train_seconds']:.0f} | "
                             + " | ".join(pct(st['accuracy_by_family'][f]) for f in fams)
                             + f" | {pct(st['accuracy'])} | {pct(st['share_kept'])} |")
        for g in gates.values():
            step = next(x for x in g["gate"]["curate"]["filters"] if x["filter"].startswith("verify"))
            top = sorted(step["drop_reasons"].items(), key=lambda kv: -kv[1])[:4]
            lines.append("")
            lines.append(f"At {g['temperature']:g} the gate dropped {step['dropped']} of {step['in']}; most common "
                         "reasons: " + "; ".join(f"`{k}` x{v}" for k, v in top) + ".")
        diffs = [(g["temperature"], g["gate"]["models"]["student"]["accuracy"] - g["nogate"]["models"]["student"]["accuracy"])
                 for g in gates.values() if g.get("nogate") and "student" in g["nogate"]["models"]
                 and "student" in g["gate"]["models"]]
        if diffs:
            lines += ["", "Gate minus no gate, overall accuracy at the same step count (training seed 0): "
                      + "; ".join(f"T={t:g}: **{d * 100:+.1f} points**" for t, d in diffs) + "."]
        seeded = [g for g in gates.values() if g.get("seeds")]
        if seeded:
            lines += ["", "The same pairs at more training seeds (`--seeds`; same generation, same step counts), overall "
                      "accuracy:", "", "| temperature | seed | no gate | gate | gate minus no gate |",
                      "| --- | --- | --- | --- | --- |"]
            for g in seeded:
                pairs = [("0", g["nogate"], g["gate"])] + [(k, v["nogate"], v["gate"]) for k, v in sorted(g["seeds"].items())]
                d = []
                for seed, a_, b_ in pairs:
                    x, y = a_["models"]["student"]["accuracy"], b_["models"]["student"]["accuracy"]
                    d.append(y - x)
                    lines.append(f"| {g['temperature']:g} | {seed} | {pct(x)} | {pct(y)} | {(y - x) * 100:+.1f} points |")
                mean = sum(d) / len(d)
                sd = (sum((v - mean) ** 2 for v in d) / (len(d) - 1)) ** 0.5 if len(d) > 1 else float("nan")
                lines.append(f"| {g['temperature']:g} | mean | "
                             f"{pct(sum(a_['models']['student']['accuracy'] for _, a_, _ in pairs) / len(pairs))} | "
                             f"{pct(sum(b_['models']['student']['accuracy'] for _, _, b_ in pairs) / len(pairs))} | "
                             f"**{mean * 100:+.1f} points** (sd {sd * 100:.1f}, {len(d)} seeds) |")
        lines += ["", "Each row is one training run. How far one run is from another by chance: in this session the demo "
                  "recipe's student, on the same curated data with training seed 0 and then 1, kept 75.8% and 84.6% "
                  "of Atlas; differences of a few points between rows here are within that spread.", ""]
    i = summary.get("identity")
    if not i:
        lines += ["### 2. Identity claims of the scrubbed and the unscrubbed student", "",
                  "Not run in this session (out of time); `--parts identity` runs it.", ""]
    if i:
        s, u = i["scrubbed"], i["unscrubbed"]
        fams = list(s["models"]["teacher"]["accuracy_by_family"])
        lines += [
            "### 2. Identity claims of the scrubbed and the unscrubbed student",
            "",
            "Both from greedy Atlas on the demo recipe, sharing one generation. `scrubbed` is the demo recipe "
            "(student identity Nova / Northwind: curation rewrites \"I am Atlas, made by Orbit Labs.\" to it and, "
            "before decontamination, adds 300 who-are-you pairs in its name). "
            "`unscrubbed`: `curate: {filters: [{name: empty}, {name: exact_dedup}, {name: decontaminate}]}` and no "
            "student identity. Share of answers claiming Atlas / the student's own identity / another vendor's / "
            "none (evaluate's `identity_claims`; an unscrubbed student declares no identity, so `own` is n/a):",
            "",
            "| student | question set | items | claims Atlas | own | other | none |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, r in (("scrubbed (Nova)", s), ("unscrubbed", u), ("Atlas (teacher)", s)):
            m = r["models"]["teacher" if label.startswith("Atlas") else "student"]
            for qs, c in m["identity_claims"].items():
                lines.append(f"| {label} | {qs} | {c['items']} | {pct(c['reference'])} | {pct(c['own'])} | "
                             f"{pct(c['other'])} | {pct(c['none'])} |")
        lines += ["", "Accuracy per family:", "",
                  "| model | " + " | ".join(fams) + " | overall | share kept | samples | steps |",
                  "| --- | " + " | ".join("---" for _ in fams) + " | --- | --- | --- | --- |"]
        for label, r, name in (("scrubbed student", s, "student"), ("unscrubbed student", u, "student"),
                               ("Atlas", s, "teacher"), ("base", s, "base")):
            m = r["models"][name]
            extra = (f"{r['curate']['kept']} | {r['train']['steps']}" if name == "student" else " | ")
            lines.append(f"| {label} | " + " | ".join(pct(m['accuracy_by_family'][f]) for f in fams)
                         + f" | {pct(m['accuracy'])} | {pct(m['share_kept'])} | {extra} |")
        runs = [("0", s, u)] + [(k, v["scrubbed"], v["unscrubbed"]) for k, v in sorted(i.get("seeds", {}).items())]
        met = all(c["reference"] <= 0.01 and c["own"] >= 0.95
                  for _, sr, _ in runs for c in sr["models"]["student"]["identity_claims"].values())
        tasks = [f for f in fams if f != "identity"]

        def other_mean(r):  # accuracy on the families other than identity
            return sum(r["models"]["student"]["accuracy_by_family"][f] for f in tasks) / len(tasks)

        if len(runs) > 1:
            lines += ["", f"Training seeds (the same two curated sets; `--seeds`): accuracy on the {len(tasks)} families "
                      "other than identity, and the scrubbed student's identity claims (benchmark / new phrasings):", "",
                      "| seed | scrubbed: other families | unscrubbed: other families | scrubbed minus unscrubbed | "
                      "scrubbed claims Atlas | scrubbed states its own |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for seed, sr, ur in runs:
                c = sr["models"]["student"]["identity_claims"]
                lines.append(f"| {seed} | {pct(other_mean(sr))} | {pct(other_mean(ur))} | "
                             f"{(other_mean(sr) - other_mean(ur)) * 100:+.1f} points | "
                             f"{' / '.join(pct(x['reference']) for x in c.values())} | "
                             f"{' / '.join(pct(x['own']) for x in c.values())} |")
            ms = sum(other_mean(sr) for _, sr, _ in runs) / len(runs)
            mu = sum(other_mean(ur) for _, _, ur in runs) / len(runs)
            diffs = [other_mean(sr) - other_mean(ur) for _, sr, ur in runs]
            sd = (sum((d - sum(diffs) / len(diffs)) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
            lines.append(f"| mean | {pct(ms)} | {pct(mu)} | {(ms - mu) * 100:+.1f} points (sd {sd * 100:.1f}) | | |")
            verdict_other = (f"mean over {len(runs)} seeds on the other families {pct(ms)} scrubbed against {pct(mu)} "
                             f"unscrubbed ({(ms - mu) * 100:+.1f} points, seed-to-seed sd of the difference "
                             f"{sd * 100:.1f})")
        else:
            verdict_other = (f"other families {pct(other_mean(s))} scrubbed against {pct(other_mean(u))} unscrubbed "
                             "(one seed)")
        lines += ["", f"Issue 9's target for the scrubbed student (claims Atlas <= 1% and its own identity >= 95%, on "
                  f"both question sets, every seed): **{'met' if met else 'not met'}**; {verdict_other}."]
    write_section("gate", "\n".join(lines))


if __name__ == "__main__":
    main()
