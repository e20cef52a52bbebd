"""Run the reliability suite at a chosen size and print its figures as one table.

Usage, from the repository root::

    python -m tests.reliability.report --trials 500            # 15 to 30 minutes on 2 cores
    python -m tests.reliability.report --from-json figures.json  # print a table from an earlier run

The suite (``pytest tests/reliability --trials N --reliability-stats PATH``) writes what each
scenario found; this prints, per scenario: trials, checkpoints saved, checkpoints lost (reported
saved or uploaded, then not resumable), bad ``latest`` pointers (local link or remote ``.symlink``
naming something missing, damaged or older than reported), hangs, and the slowest detection of a
failed upload. The exit status is non-zero when pytest failed or any lost, bad or hung count is not
zero.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["main", "table"]

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ("scenario", "trials", "checkpoints saved", "checkpoints lost", "bad latest pointers", "hangs",
           "max time to detect a failed upload")


def table(figures: dict[str, dict]) -> str:
    """The figures as a Markdown table, one line per scenario and a total.

    Example:
        >>> print(table({"kill": {"trials": 2, "saved": 9, "lost": 0, "bad_pointers": 0, "hangs": 0,
        ...                       "detect_seconds": None}}).splitlines()[2])
        | kill | 2 | 9 | 0 | 0 | 0 | - |
    """
    rows = []
    totals = [0, 0, 0, 0, 0]
    for name, figure in figures.items():
        counts = [figure["trials"], figure["saved"], figure["lost"], figure["bad_pointers"], figure["hangs"]]
        totals = [a + b for a, b in zip(totals, counts)]
        detect = figure.get("detect_seconds")
        rows.append([name, *map(str, counts), "-" if detect is None else f"{detect:.1f} s"])
    detects = [f["detect_seconds"] for f in figures.values() if f.get("detect_seconds") is not None]
    rows.append(["**total**", *map(str, totals), f"{max(detects):.1f} s" if detects else "-"])
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def main(argv: list[str] | None = None) -> int:
    """Run the suite (or read ``--from-json``), print the table, return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=500, help="kill trials in total (default 500)")
    parser.add_argument("--from-json", type=Path, help="print the table of an earlier run's figures instead")
    parser.add_argument("--json", type=Path, help="also keep the figures in this file")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, e.g. -k kill")
    args = parser.parse_args(argv)
    status = 0
    if args.from_json is not None:
        figures = json.loads(args.from_json.read_text())
    else:
        with tempfile.TemporaryDirectory() as scratch:
            stats = args.json or Path(scratch) / "figures.json"
            command = [sys.executable, "-m", "pytest", str(ROOT / "tests" / "reliability"), "-q", "-p",
                       "no:cacheprovider", f"--trials={args.trials}", f"--reliability-stats={stats}", *args.pytest_args]
            status = subprocess.run(command, cwd=ROOT, timeout=6 * 3600).returncode
            figures = json.loads(stats.read_text()) if stats.exists() else {}
    print(table(figures))
    broken = sum(f["lost"] + f["bad_pointers"] + f["hangs"] for f in figures.values())
    for name, figure in figures.items():
        for problem in figure.get("problems", [])[:5]:
            print(f"{name}: {problem}", file=sys.stderr)
    return status or int(broken > 0)


if __name__ == "__main__":
    sys.exit(main())
