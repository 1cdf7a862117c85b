"""The ``mtcae`` command: one subcommand per pipeline stage.

Each subcommand only parses its arguments and calls one function of its stage module; the stage
modules are imported lazily so ``mtcae --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]

_EPILOG = """\
pipeline:  demo-data -> preprocess -> train / sweep -> table
quick start (one CPU machine, a few minutes):  mtcae demo
"""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one subparser per stage."""
    parser = argparse.ArgumentParser(
        prog="mtcae",
        description="MTCAE-DFER: multi-task cascaded autoencoders for dynamic facial expression "
        "recognition, with Ray Tune + Optuna sweeps and MLflow tracking.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def subcommand(add: Callable[[argparse._SubParsersAction], None]):
    """Register a function that adds one subparser (and sets its ``handler``)."""
    _SUBCOMMANDS.append(add)
    return add


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mtcae`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Handler = args.handler
    return int(handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
