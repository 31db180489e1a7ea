"""Report: one self-contained HTML page from the run directory's files alone, and its screenshot.

`page.py` orders the sections, `sections.py` draws each from the run's files (results,
stage manifests, curation counts, audit evidence), `charts.py` draws the matplotlib charts
embedded in the page as PNGs, and `screenshot.py` saves `report.png`, the page at 1280 px
wide in headless Chromium, beside it when a Chromium is installed.
"""

from __future__ import annotations

from stillhouse.report.charts import ROLE_COLORS, ROLE_ORDER, model_colors
from stillhouse.report.page import render
from stillhouse.rundir import RunDir, atomic_write_text
from stillhouse.stages import Stage, StageResult

__all__ = ["ROLE_COLORS", "ROLE_ORDER", "ReportStage", "STAGE", "model_colors", "render", "save_screenshot"]

SCREENSHOT_WIDTH = 1280


def save_screenshot(run: RunDir, width: int = SCREENSHOT_WIDTH):
    """`report.png` beside `report.html`: the whole page `width` px wide; None, with a note, when it cannot be taken."""
    from stillhouse.report.screenshot import ScreenshotError, screenshot
    from stillhouse.ui import console

    png = run.root / "report.png"
    try:
        return screenshot(run.report, png, width=width)
    except ScreenshotError as e:
        png.unlink(missing_ok=True)  # an old screenshot would no longer show this page
        console.print(f"report: no screenshot ({e})")
        return None


class ReportStage(Stage):
    name = "report"
    summary = "Write report.html (and report.png, its screenshot, when Chromium is installed) from the run's files."
    reads = ("results",)
    writes = ("report",)
    after = ("audit",)  # the page draws the audit's evidence when the recipe audits
    always = True

    def config(self, recipe) -> dict:
        return {}

    def execute(self, recipe, run: RunDir) -> StageResult:
        atomic_write_text(run.report, render(run, recipe))
        shot = save_screenshot(run)
        return StageResult({"report": [run.report] + ([shot] if shot else [])},
                           {"screenshot": str(shot.relative_to(run.root)) if shot else None})

    def run(self, recipe, run: RunDir, force: bool = False, **flags) -> dict | None:
        # The page also shows every stage's timing, which changes whenever any stage runs: always redraw it.
        return super().run(recipe, run, force=True, **flags)


STAGE = ReportStage
