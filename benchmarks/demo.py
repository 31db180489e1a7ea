"""Wall time per stage of the demo and the share of Atlas the student keeps, scaled to the reference machine.

    .venv/bin/python benchmarks/demo.py [--runs 1] [--modes served,in-process] [--dtype float32] [--speed-factor X]

Runs `stillhouse demo --force` in a fresh run directory (the same code path as `make demo`:
Atlas behind `stillhouse serve`), and `--in-process` (Atlas loaded by the `hf` backend) side by
side, then writes the figures into BENCHMARKS.md. The demo's time budget (300 s) is set on a
slow 2-core machine without native bf16; `../shared/tools/machine-speed` says how this machine
compares with it (or pass --speed-factor), and the table gives each total scaled to that
machine. `--dtype float32` (the default) computes as that machine would, so the scaling holds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def speed_factor() -> float | None:
    """This machine's speed against the reference machine, from the shared machine-speed tool where present."""
    tool = ROOT.parent / "shared" / "tools" / "machine-speed"
    if not tool.exists():
        return None
    out = subprocess.run([str(tool), sys.executable], capture_output=True, text=True, cwd=ROOT).stdout
    m = re.search(r"about ([0-9.]+)x the reference machine", out)
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--modes", default="served,in-process")
    ap.add_argument("--dtype", default="float32", help="STILLHOUSE_DTYPE for the run ('auto' leaves it to the machine)")
    ap.add_argument("--speed-factor", type=float, default=None)
    args = ap.parse_args()
    factor = args.speed_factor or speed_factor()
    env = {**os.environ}
    if args.dtype != "auto":
        env["STILLHOUSE_DTYPE"] = args.dtype
    rows = []
    for i, mode in [(i, m) for i in range(args.runs) for m in args.modes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "stillhouse.cli", "demo", "--out", tmp, "--force",
                            *(["--in-process"] if mode == "in-process" else [])], check=True, env=env)
            wall = time.time() - t0
            stages = {m["stage"]: m for m in (json.loads(p.read_text()) for p in (Path(tmp) / "stages").glob("*.json"))}
            res = json.loads((Path(tmp) / "eval" / "results.json").read_text())
            audit = Path(tmp) / "audit" / "summary.json"
            audit = json.loads(audit.read_text()) if audit.is_file() else None
        models = {m["name"]: m for m in res["models"]}
        rows.append({"mode": mode, "wall": wall, "stages": {s: m["seconds"] for s, m in stages.items()}, "models": models,
                     "train": stages["train"]["counts"], "judge": res.get("judge"), "audit": audit})
        print(json.dumps(rows[-1]["stages"]), f"share kept {models['student']['share_kept']:.3f}", flush=True)
    names = ["generate", "curate", "train", "audit", "evaluate", "report"]
    scale = f"{factor:.2f}x" if factor else "unknown"
    lines = [
        "## Demo: wall time per stage and share kept",
        "",
        f"Command: `.venv/bin/python benchmarks/demo.py --runs {args.runs} --modes {args.modes} --dtype {args.dtype}` "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, torch threads {__import__('torch').get_num_threads()}; "
        f"`../shared/tools/machine-speed`: this machine is **{scale}** the reference machine, so 300 s there is "
        f"{f'{300 / factor:.0f} s' if factor else 'unknown'} here).",
        "",
        "`served` is `make demo`: Atlas behind `stillhouse serve --watermark` in its own process, generation "
        "through the `openai` backend over HTTP. `in-process` is `stillhouse demo --in-process`: the `hf` backend. "
        f"Compute dtype: {args.dtype} (the reference machine has no native bf16).",
        "",
        "| run | teacher | " + " | ".join(f"{n} s" for n in names) + " | total s | total on the reference machine "
        "(x factor) | teacher acc | base acc | student acc | share kept | train tok/s |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(rows, 1):
        s, m = r["stages"], r["models"]
        ref = f"{r['wall'] * factor:.0f}" if factor else "n/a"
        lines.append(f"| {i} | {r['mode']} | " + " | ".join(f"{s.get(n, 0):.1f}" for n in names) + f" | {r['wall']:.1f} | "
                     f"{ref} | {m['teacher']['accuracy']:.1%} | {m['base']['accuracy']:.1%} | "
                     f"{m['student']['accuracy']:.1%} | {m['student']['share_kept']:.1%} | "
                     f"{r['train']['tokens_per_second']:,.0f} |")
    m0 = rows[0]["models"]
    lines += ["", f"Per family, run 1 ({rows[0]['mode']}; base / student / teacher):", "",
              "| family | base | student | teacher |", "| --- | --- | --- | --- |"]
    lines += [f"| {f} | {m0['base']['accuracy_by_family'][f]:.1%} | {m0['student']['accuracy_by_family'][f]:.1%} | "
              f"{m0['teacher']['accuracy_by_family'][f]:.1%} |" for f in m0["teacher"]["accuracy_by_family"]]
    pt, ps = m0["teacher"]["parameters"], m0["student"]["parameters"]
    lines += ["", f"Parameters: teacher {pt:,}, student {ps:,} ({ps / pt:.2f}x)."]
    j = rows[0]["judge"]
    if j:
        lines += ["", f"Judge, run 1 ({j['spec']}): swap consistency {j['swap_consistency']:.1%} "
                      f"({'trusted' if j['trustworthy'] else 'flagged'} at {j['threshold']:.0%}), first-position share "
                      f"{j['first_position_share']:.2f}, {j['unreadable_verdicts']} unreadable verdicts, right on "
                      f"{j['accuracy_on_verifiable']:.0%} of {j['verifiable_pairs']} pairs the verifier can check."]
    a = rows[0]["audit"]
    if a:
        lines += ["", "Audit, run 1 (p-values; verdict by Holm at alpha " + f"{a['alpha']:g}):", "",
                  "| suspect | identity | watermark black-box | white-box | verdict | attribution |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for x in a["suspects"]:
            pv = x.get("p_values", {})
            att = x.get("attribution") or {}
            lines.append(f"| {x['suspect']} | " + " | ".join(f"{pv[k]:.2g}" if k in pv else "n/a" for k in
                         ("identity", "watermark", "watermark_whitebox")) + f" | {x['verdict']} | "
                         + ", ".join(f"{k} {v:.1%}" for k, v in att.items()) + " |")
    write_section("demo", "\n".join(lines))


if __name__ == "__main__":
    main()
