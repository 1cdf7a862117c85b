"""``python -m benchmarks [--quick] [--only NAME ...] [--out DIR]``: run the benchmarks, write the report."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from benchmarks import BENCHMARKS, DEFAULT_OUT, any_errors, run_all, summary_lines


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m benchmarks`` (``mtcae bench`` mirrors them)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run the benchmarks, each a ratio against a baseline measured in the same run, and "
        "write report.json + report.md.")
    parser.add_argument("--quick", action="store_true",
                        help="few-minute settings for a 2-core CPU (the full run is for a GPU machine)")
    parser.add_argument("--only", nargs="+", metavar="NAME",
                        help=f"run only these benchmarks ({', '.join(BENCHMARKS)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="directory for report.json and report.md (default: benchmarks/)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the results of the existing report.json that this run does not measure")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the benchmarks, print one line per result; 1 if any benchmark errored."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    report = run_all(quick=args.quick, only=args.only, out_dir=args.out, merge=args.merge)
    print("\n".join(summary_lines(report)))
    return 1 if any_errors(report) else 0


if __name__ == "__main__":
    sys.exit(main())
