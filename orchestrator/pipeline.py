"""The whole chain in one call: a sweep followed by its tables, and the embedded demo.

This module sits above both ``orchestrator.sweep`` and ``orchestrator.report``: the sweep never
imports the report stage; the result tables are written here, after the sweep returns.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vocab
from orchestrator.data import demo as demo_data
from orchestrator.report.export import make_tables
from orchestrator.sweep.result import SweepResult
from orchestrator.sweep.run import DEFAULT_OUT, run_sweep
from orchestrator.sweep.space import SweepSpace, find_search_space

logger = logging.getLogger(__name__)



def sweep_and_tables(space: SweepSpace | str | Path | None, *, out: Path | str = DEFAULT_OUT,
                     write_tables: bool = True, **sweep_args: Any) -> SweepResult:
    """:func:`orchestrator.sweep.run.run_sweep`, then the result tables once the sweep is complete.

    Args:
        space: As for ``run_sweep``.
        out: Output folder; the tables go to ``<out>/tables/<sweep>``.
        write_tables: Write the tables (``mtcae sweep --no-tables`` turns it off).
        **sweep_args: Passed on to ``run_sweep``.
    """
    out = Path(out).expanduser().resolve()
    result = run_sweep(space, out=out, **sweep_args)
    if result.complete and write_tables:
        _write_tables(result, out)
    return result


def _write_tables(result: SweepResult, out: Path) -> None:
    """Write the sweep's tables under ``<out>/tables/<sweep>`` and keep their Markdown on ``result``."""
    target = out / "tables" / result.name
    report = make_tables(result.tracking_uri, result.experiment, sweep=result.name,
                                stage="auto", export_dir=target, formats="all")
    result.tables_dir, result.tables_markdown = target, report.markdown


def run_demo(out: Path | str = DEFAULT_OUT, num_cpus: int | None = None,
             trainable: Callable[[dict], Any] | str | None = None) -> SweepResult:
    """The embedded default: demo data -> preprocess -> ``smoke.yaml`` sweep -> tables, locally.

    Args:
        out: Output folder (demo videos in ``<out>/data/demo``, everything else as in
            :func:`run_sweep`).
        num_cpus: CPUs of the local Ray instance (default: all).
        trainable: The trial function (default ``orchestrator.trial.entrypoints.train_trial``).
    """
    out = Path(out).expanduser().resolve()
    raw = out / "data" / vocab.DEMO
    if not raw.is_dir():
        logger.info("writing the synthetic demo dataset to %s", raw)
        partial = raw.with_name(raw.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        demo_data.generate_demo_dataset(partial)
        partial.rename(raw)  # a dataset that exists is complete
    return sweep_and_tables(find_search_space("smoke"), out=out, data_root=out / "data",
                     num_cpus=num_cpus, trainable=trainable, address="local")
