"""The ``mtcae`` command: one subcommand per pipeline stage.

Each subcommand only parses its arguments and calls one function of its stage module; the stage
modules are imported lazily so ``mtcae --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

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


_TABLE_EPILOG = """\
what it prints and writes:
  Table 1   six structure strategies x datasets: test UAR/WAR mean +- std over folds, folds done,
            the paper's value and the difference (best values in bold)
  Table 2-4 per dataset: the paper's literature rows ("reported") with the measured rows, ranked
  recall   per-class test recall per architecture
  compare  (--compare A B) paired t-test / Wilcoxon of A vs B over the folds both completed
  A missing or failed fold is listed under the table, never averaged away. Files go to
  --export-dir (default <out>/tables/<sweep|all>) and, when the sweep has a parent run
  (tags stage=sweep, sweep=<name>), to that run's MLflow artifacts under tables/.

examples:
  mtcae table                                   # embedded store ./mtcae_runs/mlflow.db
  mtcae table --sweep paper --format all        # md + csv + LaTeX + PNG
  mtcae table --compare cascaded_vit nonshared_vit
  mtcae table --tracking-uri http://head:5000 --experiment mtcae --stage cv
"""


@subcommand
def _add_table(sub: argparse._SubParsersAction) -> None:
    """``mtcae table``: result tables and figures from the MLflow runs."""
    p = sub.add_parser(
        "table",
        help="result tables (paper Table 1-4 shape), per-class recall, paired comparison",
        description="Aggregate trial runs from MLflow over folds and print/export tables next to "
        "the paper's reported numbers.",
        epilog=_TABLE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("mtcae_runs"),
                   help="project output folder holding the embedded store mlflow.db (default: %(default)s)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///<out>/mlflow.db)")
    p.add_argument("--experiment", action="append", default=None, metavar="NAME",
                   help="MLflow experiment name (repeatable; default: every experiment)")
    p.add_argument("--sweep", default=None, help="only runs tagged sweep=NAME; also selects the "
                   "parent run the files are attached to")
    p.add_argument("--stage", default="auto", choices=["auto", "cv", "search", "any"],
                   help="which trial runs: cv (final cross-validation), search (HPO), any, or auto = "
                   "cv if present else any (default: %(default)s)")
    p.add_argument("--n-folds", type=int, default=None,
                   help="expected folds per dataset/arch (default: the runs' n_folds param, else 5)")
    p.add_argument("--export-dir", type=Path, default=None,
                   help="folder for the exported files (default: <out>/tables/<sweep or all>)")
    p.add_argument("--format", default="md",
                   help="comma-separated subset of md,csv,latex,png, or all (default: %(default)s; "
                   "markdown is always printed)")
    p.add_argument("--compare", nargs=2, metavar=("ARCH_A", "ARCH_B"), default=None,
                   help="paired comparison of two architectures across folds")
    p.add_argument("--no-log-artifacts", action="store_true",
                   help="do not attach the files to the sweep's parent MLflow run")
    p.set_defaults(handler=_run_table)


def _run_table(args: argparse.Namespace) -> int:
    from orchestrator.tables import make_tables
    from orchestrator.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, args.out)
    export_dir = args.export_dir or args.out / "tables" / (args.sweep or "all")
    try:
        report = make_tables(
            uri,
            experiment=args.experiment,
            sweep=args.sweep,
            stage=None if args.stage == "any" else args.stage,
            export_dir=export_dir,
            formats=args.format,
            compare=tuple(args.compare) if args.compare else None,
            n_folds=args.n_folds,
            log_artifacts=not args.no_log_artifacts,
        )
    except (FileNotFoundError, LookupError, ValueError) as err:
        print(f"mtcae table: {err}", file=sys.stderr)
        return 2
    print(report.markdown)
    print(f"wrote {len(report.files)} file(s) to {export_dir}"
          + (f"; logged to parent run {report.parent_run_id}" if report.parent_run_id else ""))
    return 0


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
