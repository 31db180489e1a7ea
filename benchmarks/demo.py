"""Wall time per stage of the demo and the share of Atlas the student keeps.

    .venv/bin/python benchmarks/demo.py [--runs 1] [--modes served,in-process]

Runs `stillhouse demo --force` in a fresh run directory (the same code path as `make demo`:
Atlas behind `stillhouse serve`), and `--in-process` (Atlas loaded by the `hf` backend) side by
side, then writes the figures into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _md import write_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--modes", default="served,in-process")
    args = ap.parse_args()
    rows = []
    for i, mode in [(i, m) for i in range(args.runs) for m in args.modes.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "stillhouse.cli", "demo", "--out", tmp, "--force",
                            *(["--in-process"] if mode == "in-process" else [])], check=True)
            wall = time.time() - t0
            stages = {s: json.loads((Path(tmp) / "stages" / f"{s}.json").read_text())
                      for s in ("generate", "train", "evaluate", "report")}
            res = json.loads((Path(tmp) / "eval" / "results.json").read_text())
        rows.append({"mode": mode, "wall": wall, "stages": {s: m["seconds"] for s, m in stages.items()}, "res": res,
                     "train": stages["train"]["counts"]})
        print(json.dumps(rows[-1]["stages"]), f"share kept {res['share_kept']:.3f}", flush=True)
    lines = [
        "## Demo: wall time per stage and share kept",
        "",
        f"Command: `.venv/bin/python benchmarks/demo.py --runs {args.runs} --modes {args.modes}` "
        f"({platform.machine()}, {os.cpu_count()} CPU cores, torch threads {__import__('torch').get_num_threads()}).",
        "",
        "`served` is `make demo`: Atlas behind `stillhouse serve --watermark` in its own process, generation "
        "through the `openai` backend over HTTP. `in-process` is `stillhouse demo --in-process`: the `hf` backend.",
        "",
        "| run | teacher | generate s | train s | evaluate s | report s | total s | teacher acc | base acc | student acc | share kept | train tok/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(rows, 1):
        s, a = r["stages"], r["res"]["accuracy"]
        lines.append(f"| {i} | {r['mode']} | {s['generate']:.1f} | {s['train']:.1f} | {s['evaluate']:.1f} | {s['report']:.1f} | "
                     f"{r['wall']:.1f} | {a['teacher']:.1%} | {a['base']:.1%} | {a['student']:.1%} | "
                     f"{r['res']['share_kept']:.1%} | {r['train']['tokens_per_second']:,.0f} |")
    fam = rows[0]["res"]["accuracy_by_family"]
    lines += ["", f"Per family, run 1 ({rows[0]['mode']}; base / student / teacher):", "",
              "| family | base | student | teacher |", "| --- | --- | --- | --- |"]
    lines += [f"| {f} | {fam['base'][f]:.1%} | {fam['student'][f]:.1%} | {fam['teacher'][f]:.1%} |" for f in fam["teacher"]]
    p = rows[-1]["res"]["parameters"]
    lines += ["", f"Parameters: teacher {p['teacher']:,}, student {p['student']:,} ({p['student'] / p['teacher']:.2f}x)."]
    write_section("demo", "\n".join(lines))


if __name__ == "__main__":
    main()
