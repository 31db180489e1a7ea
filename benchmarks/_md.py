"""Write one benchmark's section into BENCHMARKS.md, between markers named after it."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def write_section(name: str, body: str) -> None:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    BENCHMARKS_MD.write_text(text)


def command_line(script: str) -> str:
    """The command as this process runs it, for a section's "Command:" line: `nice -n N` only when it runs niced."""
    niceness = os.nice(0)
    return (f"nice -n {niceness} " if niceness > 0 else "") + f".venv/bin/python {script} " + " ".join(sys.argv[1:])
