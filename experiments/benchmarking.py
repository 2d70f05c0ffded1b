"""Shared plumbing of the speed benchmarks: one fresh interpreter per measured case (so peak RSS is
its own) and a markdown report that carries the command reproducing it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def measure_each(script: str, cases: list[str], steps: int) -> list[dict]:
    """Run `python <script> --one <case> --steps <steps>` per case; each prints its result as a JSON line."""
    rows = []
    for case in cases:
        result = subprocess.run([sys.executable, script, "--one", case, "--steps", str(steps)],
                                check=True, capture_output=True, text=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows


def write_report(path: str | Path, title: str, command: str, body: str) -> str:
    """Write `# title`, the command and the body to `path`; returns the text."""
    text = f"# {title}\n\nCommand: `{command}`\n\n{body}\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    return text
