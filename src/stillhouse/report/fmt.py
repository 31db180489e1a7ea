"""Formatting for the report: numbers as the page shows them, and the small HTML pieces every section uses.

Anything that comes from the run's files goes through `e` (html.escape) or one of the number
formatters, which answer "n/a" for a missing or non-numeric value instead of failing.
"""

from __future__ import annotations

import base64
import html
import math

from stillhouse.report.charts import Chart


def e(x) -> str:
    return html.escape(str(x))


def num(x) -> float | None:
    """`x` as a finite float, or None (missing, a string, a bool, NaN)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def interval(x) -> tuple[float, float] | None:
    """A [lo, hi] pair of numbers, or None."""
    if isinstance(x, (list, tuple)) and len(x) == 2 and num(x[0]) is not None and num(x[1]) is not None:
        return float(x[0]), float(x[1])
    return None


def pct(x, digits: int = 1) -> str:
    v = num(x)
    return "n/a" if v is None else f"{100 * v:.{digits}f}%"


def ci_span(ci, digits: int = 1) -> str:
    c = interval(ci)
    return "" if c is None else f' <span class="ci">{100 * c[0]:.{digits}f}–{100 * c[1]:.{digits}f}</span>'


def pct_ci(x, ci, digits: int = 1, ci_digits: int | None = None) -> str:
    return pct(x, digits) + ("" if num(x) is None else ci_span(ci, digits if ci_digits is None else ci_digits))


def count(x) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else ("n/a" if x is None else e(x))


def params(n) -> str:
    v = num(n)
    if v is None:
        return "n/a"
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if v >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


def usd(x) -> str:
    v = num(x)
    if v is None:
        return "n/a"
    return f"${v:,.2f}" if v >= 1 or v == 0 else f"${v:.4f}"


def duration(s, short: bool = False) -> str:
    v = num(s)
    if v is None:
        return "n/a"
    if v < 90:
        return f"{v:.1f} s"
    if v < 5400:
        return f"{int(v // 60)}m {int(v % 60):02d}s" if short else f"{int(v // 60)} min {int(v % 60):02d} s"
    h, m = int(v // 3600), int(v % 3600 // 60)
    return f"{h}h {m:02d}m" if short else f"{h} h {m:02d} min"


def p_value(x) -> str:
    v = num(x)
    if v is None:
        return "n/a"
    if v == 0:
        return "< 1e-300"
    return f"{v:.3g}" if v >= 1e-3 else f"{v:.2e}"


def td(x, cls: str = "n") -> str:
    """A table cell holding already-safe HTML (numbers right-aligned by default)."""
    return f'<td class="{cls}">{x}</td>' if cls else f"<td>{x}</td>"


def table(head: list[str] | None, rows: list[str], tid: str | None = None, numeric_from: int = 1,
          compact: bool = False, text_cols: tuple[int, ...] = ()) -> str:
    """A table: `head` plain texts (escaped; columns from `numeric_from` on, but for `text_cols`, are numbers and
    right-aligned), `rows` safe HTML; `compact`: as wide as its content rather than the section."""
    thead = ""
    if head:
        ths = "".join(f'<th class="n">{e(h)}</th>' if i >= numeric_from and i not in text_cols else f"<th>{e(h)}</th>"
                      for i, h in enumerate(head))
        thead = f"<thead><tr>{ths}</tr></thead>"
    attrs = (f' id="{tid}"' if tid else "") + (' class="compact"' if compact else "")
    return f'<div class="scroll"><table{attrs}>{thead}<tbody>{"".join(rows)}</tbody></table></div>'


def img(chart: Chart, cid: str, alt: str) -> str:
    data = base64.b64encode(chart.png).decode()
    return (f'<img class="chart" id="{cid}" alt="{e(alt)}" width="{chart.width}" height="{chart.height}" '
            f'src="data:image/png;base64,{data}">')


def section(sid: str, title: str, body: str, lead: str = "") -> str:
    lead_html = f'<p class="lead">{lead}</p>' if lead else ""
    return f'<section id="{sid}"><h2>{e(title)}</h2>{lead_html}{body}</section>'


