"""The page: the sections in reading order, one stylesheet, nothing fetched from anywhere."""

from __future__ import annotations

import html
from datetime import datetime, timezone

from stillhouse.report import sections as S
from stillhouse.report.audit import audit as audit_section
from stillhouse.report.runfiles import read_run
from stillhouse.rundir import RunDir

# Reading order: the result, the measure behind it, the detail, what it cost, how far to trust the judge, then the
# other stages' evidence and where the files are.
SECTIONS = (("relative-quality", "Relative quality", S.relative_quality), ("per-task", "Per task", S.per_task),
            ("cost-quality", "Cost", S.cost_quality), ("judge", "Judge", S.judge), ("identity", "Identity", S.identity),
            ("data", "Data", S.data_story), ("timings", "Timings", S.stage_timings), ("audit", "Audit", audit_section),
            ("links", "Files", S.links))

CSS = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --bg: #f5f7fa; --card: #ffffff; --accent: #2f80ed;
  --teacher: #f2994a; --ok: #1e8e4f; --ok-bg: #e8f6ee; --warn: #b7651b; --warn-bg: #fff4e5; --bad: #c0392b;
  --bad-bg: #fdecea; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 15px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans", sans-serif; }
.wrap, main { max-width: 1180px; margin: 0 auto; padding: 0 40px; }
header.top { background: #1f2933; color: #f5f7fa; padding: 28px 0 0; }
header.top .kicker { text-transform: uppercase; letter-spacing: .08em; font-size: 12px; color: #9aa5b1; }
header.top h1 { margin: 4px 0 6px; font-size: 30px; line-height: 1.2; }
header.top .subtitle { margin: 0 0 16px; color: #cbd2d9; max-width: 70em; }
header.top code { background: #323f4b; color: #f5f7fa; }
nav { display: flex; flex-wrap: wrap; gap: 4px 18px; border-top: 1px solid #323f4b; padding: 10px 0 12px; }
nav a { color: #9fc5ff; text-decoration: none; font-size: 14px; }
nav a:hover { text-decoration: underline; }
main { padding-top: 22px; padding-bottom: 40px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 20px 24px 22px;
  margin: 0 0 20px; }
section.headline { background: transparent; border: 0; padding: 0; }
h2 { margin: 0 0 10px; font-size: 21px; line-height: 1.3; }
h3 { margin: 18px 0 8px; font-size: 16px; }
p { margin: 6px 0 10px; }
.lead { color: var(--ink); max-width: 72em; }
.note, figcaption, .na { color: var(--muted); font-size: 13.5px; }
.na { font-style: italic; }
code { font: 13px/1.4 ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace; background: #f0f2f5;
  padding: 1px 5px; border-radius: 4px; overflow-wrap: anywhere; }
pre { background: #f0f2f5; padding: 10px 12px; border-radius: 6px; white-space: pre-wrap; font-size: 13px; }
a { color: #1b64c4; }
.cards { display: grid; grid-template-columns: 1.3fr 1fr 1fr 1fr 1fr 1.45fr; gap: 12px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px;
  display: flex; flex-direction: column; min-width: 0; }
.card .k { font-size: 12.5px; text-transform: uppercase; letter-spacing: .05em; color: var(--muted); }
.card b { font-size: 26px; line-height: 1.25; margin: 4px 0 4px; font-variant-numeric: tabular-nums;
  white-space: nowrap; }
.card.big { border-top: 4px solid var(--accent); }
.card.big b { font-size: 38px; color: #1b4f9c; }
.card .s { font-size: 13px; color: var(--muted); }
.card .list { margin-top: 6px; font-variant-numeric: tabular-nums; font-size: 14px; }
.card .row { display: flex; justify-content: space-between; gap: 10px; border-bottom: 1px dotted var(--line); }
.card .row span:first-child { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.card.na b { color: var(--muted); }
.card.warnc { border-top: 4px solid var(--bad); }
.card b.wtl { font-size: 21px; }
.wtl .w { color: var(--ok); } .wtl .t { color: var(--muted); } .wtl .l { color: var(--bad); }
.pill { display: inline-block; padding: 0 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.pill.ok { background: var(--ok-bg); color: var(--ok); } .pill.bad { background: var(--bad-bg); color: var(--bad); }
.pill.finding { background: var(--bad-bg); color: var(--bad); } .pill.plain { background: #f4f4f5; color: #3f3f46; }
.summary { background: var(--card); border: 1px solid var(--line); border-left: 4px solid var(--accent);
  border-radius: 8px; padding: 10px 16px; margin: 14px 0 20px; font-size: 16px; }
figure { margin: 6px 0 14px; }
img.chart { display: block; width: 100%; height: auto; }
figcaption { margin-top: 6px; max-width: 78em; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 6px; font-size: 14px;
  font-variant-numeric: tabular-nums; }
th, td { padding: 6px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { font-size: 12.5px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); font-weight: 600;
  border-bottom: 2px solid var(--line); }
th.n, td.n { text-align: right; } td.n { white-space: nowrap; }
td.c { text-align: center; }
td:first-child { white-space: nowrap; }
.scroll { overflow-x: auto; }
table.compact { width: auto; min-width: 45%; }
.sub { display: block; color: var(--muted); font-size: 12px; }
td.spec { min-width: 14em; } td.why { color: var(--muted); font-size: 13px; } td.stat { font-size: 13.5px; }
tr.total td { border-top: 2px solid var(--line); }
tbody tr:hover { background: #fafbfc; }
.ci { color: var(--muted); font-size: 12px; margin-left: 3px; }
.two { display: grid; grid-template-columns: 1fr 1fr; gap: 24px; align-items: start; }
.two.wide-left { grid-template-columns: 1.25fr 1fr; }
.banner { border-radius: 8px; padding: 10px 14px; margin: 8px 0 14px; border-left: 5px solid; }
.banner.warn { background: var(--warn-bg); border-color: var(--teacher); }
.banner.bad { background: var(--bad-bg); border-color: var(--bad); }
.banner.ok { background: var(--ok-bg); border-color: var(--ok); }
.banner.finding { background: var(--warn-bg); border-color: var(--bad); } .banner.plain { background: #f4f4f5; border-color: #a1a1aa; }
dl.stats { display: grid; grid-template-columns: repeat(4, 1fr); gap: 12px; margin: 6px 0 12px; }
dl.stats div { border: 1px solid var(--line); border-radius: 8px; padding: 8px 12px; }
dt { font-size: 12.5px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
dd { margin: 2px 0 0; font-size: 14px; }
ul.caveats { margin: 10px 0 4px; padding-left: 20px; color: var(--ink); font-size: 14px; }
ul.caveats li { margin: 3px 0; }
ul.links { columns: 2; padding-left: 20px; }
ul.links li { margin: 3px 0; }
details summary { cursor: pointer; color: var(--muted); font-size: 14px; margin-top: 10px; }
.evidence { border-top: 1px solid var(--line); padding-top: 4px; margin-top: 8px; }
.evidence:first-of-type { border-top: 0; }
a.file { font-size: 13px; font-weight: normal; margin-left: 8px; }
footer { color: var(--muted); font-size: 13px; text-align: center; padding: 6px 0 30px; }
@media (max-width: 1100px) { .cards { grid-template-columns: repeat(3, 1fr); } .two { grid-template-columns: 1fr; }
  dl.stats { grid-template-columns: repeat(2, 1fr); } }
"""


def render(run: RunDir, recipe=None) -> str:
    """The report page, from the run directory's files alone (`recipe`, when given, names the run and its teacher)."""
    from stillhouse import __version__

    r = read_run(run, recipe)
    drawn = [(sid, title, fn(r)) for sid, title, fn in SECTIONS]
    drawn = [(sid, title, body) for sid, title, body in drawn if body]
    nav = [(sid, title) for sid, title, _ in drawn]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>stillhouse report: {html.escape(r.name)}</title>
<style>{CSS}</style></head><body>
{S.header(r, nav)}
<main>
{S.headline(r)}
{''.join(body for _, _, body in drawn)}
</main>
<footer>Written by stillhouse {html.escape(__version__)} on {when} from the files in
<code>{html.escape(run.root.name)}/</code>; it reads nothing else and loads nothing from the network.</footer>
</body></html>
"""
