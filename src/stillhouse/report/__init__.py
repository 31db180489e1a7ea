"""Report: one self-contained HTML page from the run directory's files alone."""

from __future__ import annotations

import base64
import html
import io
import json

from stillhouse.rundir import RunDir, atomic_write_text
from stillhouse.stages import Stage, StageResult

# One colour family per role; several models of a role take its shades in turn.
ROLE_COLORS = {"teacher": ["#f2994a"], "student": ["#2f80ed", "#56ccf2", "#1b4f9c"], "base": ["#9aa5b1", "#6b7785"],
               "control": ["#9b51e0", "#bb6bd9"]}
ROLE_ORDER = {"base": 0, "control": 1, "student": 2, "teacher": 3}


def model_colors(models: list[dict]) -> dict[str, str]:
    seen: dict[str, int] = {}
    out = {}
    for m in models:
        shades = ROLE_COLORS.get(m["role"], ["#555555"])
        out[m["name"]] = shades[seen.get(m["role"], 0) % len(shades)]
        seen[m["role"]] = seen.get(m["role"], 0) + 1
    return out


def bar_chart_png(models: list[dict], families: list[str]) -> bytes:
    """Grouped bars: accuracy per task family for each model (any number, coloured by role), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted(models, key=lambda m: ROLE_ORDER.get(m["role"], 1))
    colors = model_colors(models)
    fams = list(families)
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    for k, m in enumerate(models):
        xs = [i + (k - (len(models) - 1) / 2) * width for i in range(len(fams))]
        ax.bar(xs, [100 * m["accuracy_by_family"].get(f, 0.0) for f in fams], width, label=f"{m['name']} ({m['role']})"
               if m["name"] != m["role"] else m["name"], color=colors[m["name"]])
    ax.set_xticks(range(len(fams)), fams)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(models), 5), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _data_story(run: RunDir) -> str:
    """Samples generated, dropped or rewritten by each curation filter, kept; a warning for a contaminated benchmark."""
    cur = run.manifest("curate")
    if not cur:
        return ""
    e = html.escape
    c = cur["counts"]
    def why(f: dict) -> str:
        parts = [f"{k}: {v}" for k, v in {**f.get("drop_reasons", {}), **f.get("change_reasons", {})}.items()]
        if f.get("added"):
            parts.append(f"added: {f['added']}")
        return ", ".join(parts)

    rows = "".join(
        f"<tr><td>{e(f['filter'])}</td><td>{f['in']:,}</td><td>{f['dropped']:,}</td><td>{f['changed']:,}</td>"
        f"<td>{f['kept']:,}</td><td>{e(why(f))}</td></tr>" for f in c["filters"])
    warn = ""
    if c.get("contaminated_eval_items"):
        sets = ", ".join(f"{e(k)}: {v}" for k, v in c.get("contaminated_sets", {}).items())
        warn = (f'<p class="warn" id="contamination">Warning: {c["contaminated_eval_items"]} evaluation item(s) also '
                f"appear in the generated data ({sets}; n-gram overlap). The samples were dropped, but a benchmark "
                "whose items were in the teacher's prompt set measures less than it seems.</p>")
    return f"""<h2>Data: generated, curated, kept</h2>
<p>{c['generated']:,} samples generated, {c['kept']:,} kept for training ({c['dropped']:,} dropped).
Dataset card: <code>data/README.md</code>.</p>{warn}
<table id="filters"><tr><th>filter</th><th>in</th><th>dropped</th><th>rewritten</th><th>kept</th><th>reasons</th></tr>
{rows}</table>"""


def _identity_section(models: list[dict]) -> str:
    """Who each model says it is, when asked: the teacher's identity, its own, another vendor's, or none."""
    rows = []
    for m in models:
        for where, c in (m.get("identity_claims") or {}).items():
            rows.append(f"<tr><td>{html.escape(m['name'])}</td><td>{where.replace('_', ' ')}</td><td>{c['items']}</td>"
                        f"<td>{_pct(c['reference'])}</td><td>{_pct(c['own'])}</td><td>{_pct(c['other'])}</td>"
                        f"<td>{_pct(c['none'])}</td></tr>")
    if not rows:
        return ""
    return f"""<h2>Identity: who the models say they are</h2>
<p>Identity questions (the benchmark's, and new phrasings never trained on), each answer classified by the
identity it claims. A student distilled without scrubbing answers as its teacher.</p>
<table id="identity"><tr><th>model</th><th>questions</th><th>n</th><th>claims the teacher's</th><th>its own</th>
<th>another vendor's</th><th>none</th></tr>{''.join(rows)}</table>"""


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _params(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def render(recipe, run: RunDir) -> str:
    """The report page, from the run directory's files alone."""
    res = json.loads(run.results.read_text())
    gen = run.manifest("generate") or {}
    train = run.manifest("train") or {}
    timings = run.timings()
    models, fams = res["models"], res["families"]
    teacher = next((m for m in models if m["role"] == "teacher"), None)
    students = [m for m in models if m["role"] == "student"]
    bases = [m for m in models if m["role"] == "base"]
    png = base64.b64encode(bar_chart_png(models, fams)).decode()
    e = html.escape
    shown = sorted(models, key=lambda m: ROLE_ORDER.get(m["role"], 1))
    head = "".join(f"<th>{e(m['name'])}</th>" for m in shown)
    rows = "".join(f"<tr><td>{e(f)}</td>" + "".join(f"<td>{_pct(m['accuracy_by_family'].get(f))}</td>" for m in shown)
                   + "</tr>" for f in fams)
    root = str(run.root.resolve())
    model_rows = "".join(
        f"<tr><td>{e(m['name'])}</td><td>{e(m['role'])}</td>"
        f"<td><code>{e(m['spec'].replace(root + '/', ''))}</code></td>"
        f"<td>{_params(m.get('parameters'))}</td><td>{_pct(m['accuracy'])}</td><td>{_pct(m.get('share_kept'))}</td></tr>"
        for m in shown)
    stage_rows = "".join(f"<tr><td>{e(s)}</td><td>{t:.1f} s</td></tr>" for s, t in timings.items())
    gc, tc = gen.get("counts", {}), train.get("counts", {})
    data_story = _data_story(run)
    identity_section = _identity_section(shown)
    cards = []
    if teacher:
        cards.append(f'<div class="card" id="teacher-acc">teacher accuracy<b>{_pct(teacher["accuracy"])}</b></div>')
    for k, m in enumerate(students):
        sid = "" if k else ' id="student-acc"'
        kid = "" if k else ' id="share-kept"'
        label = "student" if m["name"] == "student" else e(m["name"])
        cards.append(f'<div class="card"{sid}>{label} accuracy<b>{_pct(m["accuracy"])}</b></div>')
        cards.append(f'<div class="card"{kid}>share of teacher kept{"" if m["name"] == "student" else " by " + label}'
                     f'<b>{_pct(m.get("share_kept"))}</b></div>')
    for k, m in enumerate(bases):
        cards.append(f'<div class="card"{"" if k else " id=base-acc"}>{e(m["name"])} before distillation'
                     f'<b>{_pct(m["accuracy"])}</b></div>')
    if students and teacher:
        sp, tp = students[0].get("parameters"), teacher.get("parameters")
        ratio = f" ({sp / tp:.2f}x)" if sp and tp else ""
        cards.append(f'<div class="card" id="params">parameters<b>{_params(sp)} / {_params(tp)}</b>'
                     f'{e(students[0]["name"])} / teacher{ratio}</div>')
    student_names = ", ".join(f"<code>{e(m['name'])}</code>" for m in students)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stillhouse report: {e(recipe.name)}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 960px; margin: 2em auto; color: #222; padding: 0 1em; }}
.headline {{ display: flex; gap: 1em; flex-wrap: wrap; }}
.card {{ border: 1px solid #ddd; border-radius: 8px; padding: .6em 1em; min-width: 9em; }}
.card b {{ display: block; font-size: 1.6em; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border-bottom: 1px solid #eee; padding: .3em .9em; text-align: left; }}
code {{ background: #f5f5f5; padding: 0 .3em; }}
.warn {{ background: #fff4e5; border-left: 4px solid #f2994a; padding: .4em .8em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>stillhouse report: {e(recipe.name)}</h1>
<p>Teacher <code>{e(recipe.teacher.spec)}</code> distilled into {'the student' if len(students) == 1 else f'{len(students)} students'} ({student_names}),
evaluated on <code>{e(res['benchmark'])}</code> ({res['items']} held-out items, {e(res.get('verifier', 'exact match'))}).</p>
<div class="headline">{''.join(cards)}</div>
<h2>Accuracy per task family</h2>
<img id="chart" alt="held-out accuracy per task family for every model in the run" src="data:image/png;base64,{png}">
<table><tr><th>family</th>{head}</tr>{rows}</table>
<h2>Models</h2>
<table id="models"><tr><th>model</th><th>role</th><th>spec</th><th>parameters</th><th>accuracy</th><th>share of teacher</th></tr>
{model_rows}</table>
{data_story}
{identity_section}
<h2>Data and training</h2>
<table>
<tr><td>teacher samples generated</td><td>{gc.get('samples', 'n/a')}</td></tr>
<tr><td>truncated answers</td><td>{gc.get('truncated', 'n/a')}</td></tr>
<tr><td>teacher tokens (prompt + completion)</td><td>{gc.get('prompt_tokens', 0) + gc.get('completion_tokens', 0):,}</td></tr>
<tr><td>teacher cost</td><td>${gc.get('cost_usd', 0):.4f}</td></tr>
<tr><td>training steps</td><td>{tc.get('steps', 'n/a')}</td></tr>
<tr><td>final training loss</td><td>{'n/a' if tc.get('final_loss') is None else f"{tc['final_loss']:.4f}"}</td></tr>
</table>
<h2>Stage timings</h2>
<table><tr><th>stage</th><th>wall time</th></tr>{stage_rows}</table>
</body></html>
"""


class ReportStage(Stage):
    name = "report"
    summary = "Write report.html from the run directory's files."
    reads = ("results",)
    writes = ("report",)
    always = True

    def config(self, recipe) -> dict:
        return {}

    def execute(self, recipe, run: RunDir) -> StageResult:
        atomic_write_text(run.report, render(recipe, run))
        return StageResult({"report": run.report})

    def run(self, recipe, run: RunDir, force: bool = False, **flags) -> dict | None:
        # The page also shows every stage's timing, which changes whenever any stage runs: always redraw it.
        return super().run(recipe, run, force=True, **flags)


STAGE = ReportStage
