"""A full-page screenshot of the report in headless Chromium, saved beside it.

Chromium's command line takes a screenshot of the window only, so the page is measured
first: a copy of it, with a line of script added, is loaded at the screenshot's width and
its height read back from `--dump-dom`; the page itself is then shot in a window that tall.
The report itself carries no script. No Chromium, or one that fails, is a `ScreenshotError`
that the report stage logs and goes on without.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from stillhouse.errors import StillhouseError

MAX_HEIGHT = 16000  # a taller window than this is refused by Chromium's compositor on some machines
_MEASURE = ("<script>addEventListener('load', () => document.body.setAttribute('data-page-height', "
            "Math.ceil(document.documentElement.scrollHeight)))</script>")


class ScreenshotError(StillhouseError):
    pass


def find_browser() -> str | None:
    """A Chromium (or Chrome) executable: $STILLHOUSE_CHROMIUM, else the first on PATH."""
    env = os.environ.get("STILLHOUSE_CHROMIUM")
    if env:
        return env if Path(env).is_file() else shutil.which(env)
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def browser_flags(profile: str | Path, width: int, height: int) -> list[str]:
    """Headless flags for an offline, unattended, repeatable render at one CSS pixel per screen pixel."""
    return ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
            "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-quic", "--mute-audio", f"--user-data-dir={profile}", f"--window-size={width},{height}"]


def dump_dom(browser: str, html_path: Path, profile: str | Path, width: int = 1280, timeout: float = 120) -> str:
    """The page's DOM after load (its scripts run), as Chromium serialises it."""
    url = Path(html_path).resolve().as_uri()
    out = subprocess.run([browser, *browser_flags(profile, width, 900), "--dump-dom", url], capture_output=True,
                         text=True, timeout=timeout)
    if out.returncode != 0 or "<html" not in out.stdout:
        raise ScreenshotError(f"{browser} could not load {html_path} (exit {out.returncode}): {out.stderr[-500:]}")
    return out.stdout


def page_height(browser: str, html_path: Path, width: int = 1280, timeout: float = 120) -> int:
    """The height in CSS pixels of `html_path` laid out `width` pixels wide."""
    with tempfile.TemporaryDirectory(prefix="stillhouse-shot-") as tmp:
        probe = Path(tmp) / "measure.html"
        text = Path(html_path).read_text()
        cut = text.rfind("</body>")
        probe.write_text(text[:cut] + _MEASURE + text[cut:] if cut >= 0 else text + _MEASURE)
        dom = dump_dom(browser, probe, Path(tmp) / "profile", width, timeout)
    found = re.search(r'data-page-height="(\d+)"', dom)
    if not found:
        raise ScreenshotError(f"could not measure the page's height in {browser}")
    return int(found.group(1))


def screenshot(html_path: str | Path, png_path: str | Path, width: int = 1280, browser: str | None = None,
               timeout: float = 120) -> Path:
    """Save a full-page PNG of `html_path`, `width` pixels wide, at `png_path`; ScreenshotError if it cannot."""
    browser = browser or find_browser()
    if browser is None:
        raise ScreenshotError("no Chromium found (install Debian's chromium, `make browser`, or set "
                              "STILLHOUSE_CHROMIUM)")
    html_path, png_path = Path(html_path), Path(png_path)
    try:
        height = min(MAX_HEIGHT, page_height(browser, html_path, width, timeout))
        tmp_png = png_path.with_name(f".{png_path.name}.tmp{os.getpid()}.png")
        with tempfile.TemporaryDirectory(prefix="stillhouse-shot-") as profile:
            out = subprocess.run([browser, *browser_flags(profile, width, height), f"--screenshot={tmp_png}",
                                  html_path.resolve().as_uri()], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as e:
        raise ScreenshotError(f"{browser} failed: {e}") from None
    if out.returncode != 0 or not tmp_png.is_file():
        tmp_png.unlink(missing_ok=True)
        raise ScreenshotError(f"{browser} wrote no screenshot (exit {out.returncode}): {out.stderr[-500:]}")
    os.replace(tmp_png, png_path)
    return png_path
