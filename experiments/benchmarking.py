"""Shared plumbing of the speed benchmarks: one fresh interpreter per measured case (so peak RSS is
its own) and a markdown report that carries the command reproducing it."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
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


def show_and_save(text: str, out: str | Path | None) -> None:
    """Print a result and, when `out` is given, write it there (making its folder)."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


def benchmark_arguments(doc: str, steps: int, out: str) -> argparse.ArgumentParser:
    """--steps, --out and the hidden --one (one case, in its own interpreter) of every benchmark."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--out", default=out)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    return parser


def run_benchmark(script: str, args: argparse.Namespace, measure: Callable[[str, int], dict], cases: list[str],
                  title: str, render: Callable[[list[dict]], str]) -> None:
    """With --one, measure that case and print it as JSON; else measure every case in its own
    interpreter and write the report."""
    if args.one:
        print(json.dumps(measure(args.one, args.steps)))
        return
    rows = measure_each(script, cases, args.steps)
    command = f"python experiments/{Path(script).name} --steps {args.steps}"
    print(write_report(args.out, title, command, render(rows)))
