"""The report's charts: matplotlib (Agg) figures drawn to PNG, one function per chart.

Every chart is drawn at twice the size it is shown (`SCALE`), so it stays sharp on a
high-density screen, and is returned with its display size so the page can lay it out
before the image is decoded. The functions take plain numbers already picked out of the
run's files; what they mean is said by the section that shows them.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

# One colour family per role; several models of a role take its shades in turn.
ROLE_COLORS = {"teacher": ["#f2994a"], "student": ["#2f80ed", "#56ccf2", "#1b4f9c"], "base": ["#9aa5b1", "#6b7785"],
               "control": ["#9b51e0", "#bb6bd9"]}
ROLE_ORDER = {"teacher": 0, "student": 1, "control": 2, "base": 3}
OTHER_COLOR = "#555555"
SCALE = 2  # image pixels per CSS pixel
WIDTH_IN = 11.0  # at 100 CSS px an inch: 1100 CSS px, the page's content width
INK, MUTED, GRID = "#1f2933", "#616e7c", "#e4e7eb"
WIN, TIE, LOSS = "#27ae60", "#c1c7cd", "#eb5757"

RC = {"font.size": 10, "axes.edgecolor": MUTED, "axes.labelcolor": INK, "xtick.color": MUTED, "ytick.color": INK,
      "axes.spines.top": False, "axes.spines.right": False, "axes.titlesize": 11, "axes.titleweight": "bold",
      "axes.titlelocation": "left", "legend.frameon": False, "svg.fonttype": "none", "hatch.linewidth": 0.8}


@dataclass
class Chart:
    """A PNG and the size (CSS pixels) it is shown at."""

    png: bytes
    width: int
    height: int


def model_colors(models: list[dict]) -> dict[str, str]:
    """A colour per model name: its role's colour, shades in turn for several models of one role."""
    seen: dict[str, int] = {}
    out = {}
    for m in models:
        role = m.get("role")
        shades = ROLE_COLORS.get(role, [OTHER_COLOR])
        out[m["name"]] = shades[seen.get(role, 0) % len(shades)]
        seen[role] = seen.get(role, 0) + 1
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _styled(draw):
    """Run a chart function under the report's matplotlib style (rcParams apply when artists are made and drawn)."""
    import functools

    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with _plt().rc_context(RC):
            return draw(*args, **kwargs)

    return wrapper


def _figure(height_in: float, ncols: int = 1, width_in: float = WIDTH_IN, **kw):
    return _plt().subplots(1, ncols, figsize=(width_in, height_in), dpi=100 * SCALE, **kw)


def _done(fig) -> Chart:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    plt.close(fig)
    png = buf.getvalue()
    from PIL import Image

    w, h = Image.open(io.BytesIO(png)).size
    return Chart(png, round(w / SCALE), round(h / SCALE))


def _style(ax, grid_axis: str = "x") -> None:
    ax.grid(axis=grid_axis, color=GRID, linewidth=0.8)
    ax.set_axisbelow(True)
    ax.tick_params(length=0)


def _lighten(color: str, amount: float) -> tuple:
    from matplotlib.colors import to_rgb

    r, g, b = to_rgb(color)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _label(s) -> str:
    """Text from the run's data, shown literally: `$` would otherwise start matplotlib's mathtext."""
    return str(s).replace("$", r"\$")


def _err(v: float, ci) -> tuple[float, float] | None:
    if ci is None:
        return None
    lo, hi = ci
    return max(0.0, v - lo), max(0.0, hi - v)


# The relative-quality chart's measures: key, legend label, how the bar is filled.
MEASURES = (("verifiable", "verifiable: accuracy ÷ teacher's accuracy", "solid"),
            ("judged", "judged: (win + ½ tie) ÷ 50% parity, vs the teacher", "hatch"),
            ("score", "judged: relative score (Vicuna: Σ scores ÷ teacher's Σ)", "open"))


@_styled
def relative_quality(rows: list[dict]) -> Chart:
    """Horizontal grouped bars, teacher = 100%: for each model its verifiable share of the teacher's accuracy and,
    where a judge ran, its judged standing against the teacher, each with its confidence interval.

    `rows`: {"label", "color", "verifiable" | "judged" | "score": (value, (lo, hi) | None) | None}, values as
    fractions of the teacher (1.0 = the teacher); a row's "verifiable_note", when set, is written in place of its
    verifiable bar (a share too noisy to draw as a number: `sections.share_kept_caveat`)."""
    from matplotlib.patches import Patch

    shown = [(k, label, style) for k, label, style in MEASURES if any(r.get(k) for r in rows)] or [MEASURES[0]]
    k = max(1, len(shown))
    bar = 0.78 / k
    fig, ax = _figure(0.9 + len(rows) * (0.22 + 0.3 * k))
    _style(ax)
    top = 100.0
    for i, r in enumerate(rows):
        for j, (key, _, style) in enumerate(shown):
            y = i + (j - (k - 1) / 2) * bar
            got = r.get(key)
            if key == "verifiable" and r.get("verifiable_note"):
                ax.text(2, y, _label(r["verifiable_note"]), va="center", ha="left", color=MUTED, fontsize=9,
                        style="italic")
                continue
            if not got or got[0] is None:
                ax.text(2, y, "n/a", va="center", ha="left", color=MUTED, fontsize=9)
                continue
            v, ci = 100 * got[0], None if got[1] is None else (100 * got[1][0], 100 * got[1][1])
            c = r["color"]
            if style == "solid":
                kw = {"color": c}
            elif style == "hatch":
                kw = {"color": _lighten(c, 0.65), "edgecolor": c, "hatch": "////", "linewidth": 0}
            else:
                kw = {"color": "white", "edgecolor": c, "linewidth": 1.4}
            ax.barh(y, v, bar * 0.92, **kw)
            err = _err(v, ci)
            if err is not None:
                ax.errorbar(v, y, xerr=[[err[0]], [err[1]]], fmt="none", ecolor=INK, elinewidth=1.1, capsize=3)
            end = max(v, ci[1] if ci else v)
            top = max(top, end)
            text = f"{v:.0f}%" + (f"  ({ci[0]:.0f}–{ci[1]:.0f})" if ci else "")
            ax.text(end + 1.2, y, text, va="center", ha="left", color=INK, fontsize=9)
    ax.axvline(100, color=ROLE_COLORS["teacher"][0], linestyle="--", linewidth=1.6, zorder=3)
    ax.text(100, -0.62, " teacher = 100%", color="#b9651f", fontsize=9, va="bottom", ha="left", fontweight="bold")
    ax.set_yticks(range(len(rows)), [_label(r["label"]) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.75)
    ax.set_xlim(0, top * 1.18 + 8)
    ax.set_xlabel("% of the teacher (teacher = 100%)")
    handles = []
    for _, label, style in shown:
        if style == "solid":
            handles.append(Patch(color=MUTED, label=label))
        elif style == "hatch":
            handles.append(Patch(facecolor=_lighten(MUTED, 0.65), edgecolor=MUTED, hatch="////", label=label))
        else:
            handles.append(Patch(facecolor="white", edgecolor=MUTED, linewidth=1.4, label=label))
    # the legend's top a fixed 36 points below the axes (under the tick labels and the x label), whatever the
    # figure's height: a fraction of the axes put it on the x label when the chart had few bars
    from matplotlib.transforms import offset_copy

    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0),
              bbox_transform=offset_copy(ax.transAxes, fig=fig, y=-36, units="points"),
              ncol=len(handles), fontsize=9, handlelength=2.2)
    fig.tight_layout()
    return _done(fig)


@_styled
def per_task(models: list[dict], families: list[str], colors: dict[str, str]) -> Chart:
    """Grouped bars: accuracy per task family for every model, with confidence intervals where known."""
    fig, ax = _figure(3.9)
    _style(ax, "y")
    n = max(1, len(models))
    width = 0.82 / n
    for k, m in enumerate(models):
        xs = [i + (k - (n - 1) / 2) * width for i in range(len(families))]
        by = m.get("accuracy_by_family") or {}
        cis = m.get("accuracy_by_family_ci") or {}
        vals = [100 * (by.get(f) or 0.0) for f in families]
        ax.bar(xs, vals, width * 0.92, color=colors[m["name"]], label=_label(m["label"]))
        lo = [max(0.0, v - 100 * cis[f][0]) if f in cis and cis[f] else 0.0 for v, f in zip(vals, families)]
        hi = [max(0.0, 100 * cis[f][1] - v) if f in cis and cis[f] else 0.0 for v, f in zip(vals, families)]
        if any(lo) or any(hi):
            ax.errorbar(xs, vals, yerr=[lo, hi], fmt="none", ecolor=INK, elinewidth=0.9, capsize=2, alpha=0.8)
    ax.set_xticks(range(len(families)), [_label(f) for f in families])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_xlim(-0.5, len(families) - 0.5)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(n, 6), fontsize=9)
    fig.tight_layout()
    return _done(fig)


def _scatter(ax, points: list[dict], xlabel: str, log: bool) -> None:
    _style(ax, "both")
    for p in points:
        ax.scatter([p["x"]], [100 * p["y"]], s=70, color=p["color"], zorder=3, edgecolor="white", linewidth=0.8)
        if p.get("ci"):
            lo, hi = p["ci"]
            ax.errorbar([p["x"]], [100 * p["y"]], yerr=[[max(0, 100 * (p["y"] - lo))], [max(0, 100 * (hi - p["y"]))]],
                        fmt="none", ecolor=p["color"], elinewidth=1.1, capsize=3, zorder=2)
        ax.annotate(_label(p["label"]), (p["x"], 100 * p["y"]), xytext=(7, 5), textcoords="offset points", fontsize=9,
                    color=INK)
    if log:
        ax.set_xscale("log")
    ax.axhline(100, color=ROLE_COLORS["teacher"][0], linestyle="--", linewidth=1.2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("share of the teacher kept (%)")
    ys = [100 * p["y"] for p in points] + [100 * p["ci"][1] for p in points if p.get("ci")]
    ax.set_ylim(0, max(110, max(ys, default=100) + 8))
    xs = [p["x"] for p in points]
    if xs and log:
        ax.set_xlim(min(xs) / 2.2, max(xs) * 3.5)
    elif xs:
        ax.set_xlim(0, max(xs) * 1.35 or 1)


@_styled
def cost_quality(by_size: list[dict], by_train: list[dict]) -> Chart:
    """Share of the teacher kept against parameters (every model), and against training time (each student).

    Each point: {"x", "y" (share kept, 1.0 = teacher), "ci", "label", "color"}."""
    panels = [(by_size, "parameters (log scale)", True)]
    if by_train:
        panels.append((by_train, "training time (s)", False))
    fig, axes = _figure(3.6, ncols=len(panels))
    axes = axes if len(panels) > 1 else [axes]
    for ax, (points, xlabel, log) in zip(axes, panels):
        _scatter(ax, points, xlabel, log)
    fig.tight_layout()
    return _done(fig)


@_styled
def judge_outcomes(rows: list[dict]) -> Chart:
    """Stacked horizontal bars: the share of comparisons each model won, tied and lost against the teacher.

    `rows`: {"label", "win", "tie", "loss"} (fractions)."""
    fig, ax = _figure(0.9 + 0.42 * len(rows))
    _style(ax)
    for i, r in enumerate(rows):
        left = 0.0
        for key, color, name in (("win", WIN, "win"), ("tie", TIE, "tie"), ("loss", LOSS, "loss")):
            v = 100 * (r.get(key) or 0.0)
            ax.barh(i, v, 0.62, left=left, color=color, label=name if i == 0 else None)
            if v >= 6:
                ax.text(left + v / 2, i, f"{name} {v:.0f}%", ha="center", va="center", fontsize=9,
                        color="white" if key != "tie" else INK, fontweight="bold")
            left += v
    ax.axvline(50, color=INK, linestyle=":", linewidth=1)
    ax.set_yticks(range(len(rows)), [_label(r["label"]) for r in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the judged comparisons with the teacher (both answer orders)")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=3, fontsize=9)
    fig.tight_layout()
    return _done(fig)


@_styled
def funnel(steps: list[tuple[str, int, int, int]], width_in: float = WIDTH_IN / 2) -> Chart:
    """The data funnel: (label, rows after the step, rows it dropped, rows it added) for generation and each filter."""
    fig, ax = _figure(0.75 + 0.34 * len(steps), width_in=width_in)
    _style(ax)
    top = max((n + d for _, n, d, _ in steps), default=1) or 1
    for i, (label, n, dropped, added) in enumerate(steps):
        ax.barh(i, n, 0.66, color=ROLE_COLORS["student"][0] if i else ROLE_COLORS["teacher"][0])
        if dropped:
            ax.barh(i, dropped, 0.66, left=n, color=_lighten(LOSS, 0.55))
        note = f"{n:,}" + (f"  (−{dropped:,})" if dropped else "") + (f"  (+{added:,})" if added else "")
        ax.text(n + dropped + top * 0.01, i, note, va="center", fontsize=9, color=INK)
    ax.set_yticks(range(len(steps)), [_label(s[0]) for s in steps])
    ax.set_ylim(len(steps) - 0.5, -0.5)
    ax.set_xlim(0, top * 1.32)
    ax.set_xlabel("samples")
    fig.tight_layout()
    return _done(fig)


@_styled
def timings(stages: list[tuple[str, float]], width_in: float = WIDTH_IN / 2) -> Chart:
    """Wall time of each stage, in the order the stages ran."""
    fig, ax = _figure(0.75 + 0.34 * len(stages), width_in=width_in)
    _style(ax)
    top = max((s for _, s in stages), default=1.0) or 1.0
    total = sum(s for _, s in stages) or 1.0
    for i, (name, s) in enumerate(stages):
        ax.barh(i, s, 0.64, color="#3d5a80")
        ax.text(s + top * 0.01, i, f"{s:,.1f} s  ({100 * s / total:.0f}%)", va="center", fontsize=9, color=INK)
    ax.set_yticks(range(len(stages)), [_label(n) for n, _ in stages])
    ax.set_ylim(len(stages) - 0.5, -0.5)
    ax.set_xlim(0, top * 1.38)
    ax.set_xlabel("wall time (s)")
    fig.tight_layout()
    return _done(fig)
