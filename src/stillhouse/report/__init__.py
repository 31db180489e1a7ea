"""Report: one self-contained HTML page from the run directory's files alone."""

from __future__ import annotations

import base64
import html
import io
import json

from stillhouse.recipe import Recipe
from stillhouse.rundir import STAGES, RunDir, atomic_write_text

COLORS = {"base": "#9aa5b1", "student": "#2f80ed", "teacher": "#f2994a"}


def bar_chart_png(by_family: dict[str, dict[str, float]]) -> bytes:
    """Grouped bars: accuracy per task family for each model, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("base", "student", "teacher") if n in by_family]
    fams = list(by_family[names[-1]])
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(fams))]
        ax.bar(xs, [100 * by_family[name].get(f, 0.0) for f in fams], width, label=name, color=COLORS.get(name))
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(names), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _params(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def render(recipe: Recipe, run: RunDir) -> str:
    res = json.loads(run.results.read_text())
    gen = run.manifest("generate") or {}
    train = run.manifest("train") or {}
    timings = run.timings()
    acc, fam, params = res["accuracy"], res["accuracy_by_family"], res["parameters"]
    png = base64.b64encode(bar_chart_png(fam)).decode()
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(f)}</td>" + "".join(f"<td>{_pct(fam[m].get(f))}</td>" for m in ("base", "student", "teacher")) + "</tr>"
        for f in res["families"])
    stage_rows = "".join(f"<tr><td>{s}</td><td>{timings[s]:.1f} s</td></tr>" for s in STAGES if s in timings)
    gc, tc = gen.get("counts", {}), train.get("counts", {})
    ratio = params["student"] / params["teacher"] if params.get("teacher") else None
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stillhouse report: {e(recipe.name)}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 900px; margin: 2em auto; color: #222; }}
.headline {{ display: flex; gap: 1.5em; flex-wrap: wrap; }}
.card {{ border: 1px solid #ddd; border-radius: 8px; padding: .6em 1em; min-width: 9em; }}
.card b {{ display: block; font-size: 1.6em; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border-bottom: 1px solid #eee; padding: .3em .9em; text-align: left; }}
code {{ background: #f5f5f5; padding: 0 .3em; }}
</style></head><body>
<h1>stillhouse report: {e(recipe.name)}</h1>
<p>Teacher <code>{e(recipe.teacher.spec)}</code> distilled into base <code>{e(recipe.student.base)}</code>,
evaluated on <code>{e(res['benchmark'])}</code> ({res['items']} held-out items, exact match).</p>
<div class="headline">
<div class="card" id="teacher-acc">teacher accuracy<b>{_pct(acc['teacher'])}</b></div>
<div class="card" id="student-acc">student accuracy<b>{_pct(acc['student'])}</b></div>
<div class="card" id="share-kept">share of teacher kept<b>{_pct(res['share_kept'])}</b></div>
<div class="card" id="base-acc">base before distillation<b>{_pct(acc['base'])}</b></div>
<div class="card" id="params">parameters<b>{_params(params['student'])} / {_params(params.get('teacher'))}</b>
student / teacher{f' ({ratio:.2f}x)' if ratio else ''}</div>
</div>
<h2>Accuracy per task family</h2>
<img id="chart" alt="held-out accuracy per task family: base, student, teacher" src="data:image/png;base64,{png}">
<table><tr><th>family</th><th>base</th><th>student</th><th>teacher</th></tr>{rows}</table>
<h2>Data and training</h2>
<table>
<tr><td>teacher samples generated</td><td>{gc.get('samples', 'n/a')}</td></tr>
<tr><td>truncated answers</td><td>{gc.get('truncated', 'n/a')}</td></tr>
<tr><td>teacher tokens (prompt + completion)</td><td>{gc.get('prompt_tokens', 0) + gc.get('completion_tokens', 0):,}</td></tr>
<tr><td>training steps</td><td>{tc.get('steps', 'n/a')}</td></tr>
<tr><td>final training loss</td><td>{'n/a' if tc.get('final_loss') is None else f"{tc['final_loss']:.4f}"}</td></tr>
</table>
<h2>Stage timings</h2>
<table><tr><th>stage</th><th>wall time</th></tr>{stage_rows}</table>
</body></html>
"""


def report(recipe: Recipe, run: RunDir, force: bool = False) -> dict:
    """Run the report stage: `report.html` from the run directory's files."""
    ev = run.require("evaluate", "report")
    inputs = {"results": ev["outputs"]["results"]}
    started = run.begin("report")
    atomic_write_text(run.report, render(recipe, run))
    return run.finish("report", started, inputs, {}, {"report": run.report}, {})
