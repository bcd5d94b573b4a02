"""Rewrite the README's transformer table from ``results/transformer_bench.json``.

    python -m benchmarks.transformer_table          # rewrite README.md in place
    python -m benchmarks.transformer_table --check  # exit 1 if README.md is stale

The table sits between ``<!-- transformer-table:start -->`` and
``<!-- transformer-table:end -->``; ``tests/test_transformer_bench.py`` checks that the
README holds exactly what this makes from the committed results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .transformer_bench import RESULTS, results_table

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- transformer-table:start -->", "<!-- transformer-table:end -->"


def region(result: dict) -> str:
    """What goes between the markers (the markers excluded)."""
    return "\n" + result["config"] + "\n\n" + results_table(result) + "\n"


def rewrite(text: str, result: dict) -> str:
    """``text`` with its marked region replaced; an error if the markers are missing."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"README.md needs one {START} line before one {END} line")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return head + START + region(result) + END + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.transformer_table")
    p.add_argument("--results", default=str(RESULTS / "transformer_bench.json"))
    p.add_argument("--check", action="store_true")
    args = p.parse_args(argv)
    result = json.loads(Path(args.results).read_text())
    text = README.read_text()
    new = rewrite(text, result)
    if args.check:
        if new != text:
            print("README.md's transformer table is stale: run python -m benchmarks.transformer_table")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
