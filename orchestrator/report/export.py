"""``mtcae table``: build every table from the MLflow runs, write the files, log them to the sweep's run."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

import vocab
from orchestrator.report.figures import FIGURE_FORMATS, plot_results
from orchestrator.report.render import to_latex, to_markdown
from orchestrator.report.results import (
    aggregate,
    experiment_ids,
    load_runs,
    open_store,
    stage_filter,
)
from orchestrator.report.tables import (
    Table,
    compare_archs,
    comparison_tables,
    recall_tables,
    table1,
)
from orchestrator.tracking import make_client, search_all

logger = logging.getLogger(__name__)



FORMATS = ("md", "csv", "latex", *FIGURE_FORMATS)


ARTIFACT_DIR = "tables"


@dataclass
class TableReport:
    """What :func:`make_tables` produced."""

    markdown: str
    tables: list[Table]
    aggregate: pd.DataFrame
    runs: pd.DataFrame
    files: list[Path]
    parent_run_id: str | None


def parse_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """``"md,csv"`` / ``["latex"]`` / ``"all"`` -> a tuple of known formats.

    Raises:
        ValueError: an unknown format name.
    """
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen: list[str] = []
    for item in (i.strip().lower() for i in items if i.strip()):
        names = FORMATS if item == "all" else ("latex",) if item == "tex" else (item,)
        for name in names:
            if name not in FORMATS:
                known = ", ".join((*FORMATS, "all"))
                raise ValueError(f"--format: unknown format {item!r}; expected one of {known}")
            if name not in chosen:
                chosen.append(name)
    return tuple(chosen)


def write_exports(
    tables: Sequence[Table],
    agg: pd.DataFrame,
    runs: pd.DataFrame,
    export_dir: Path,
    formats: Sequence[str],
) -> list[Path]:
    """Write each table as ``<name>.md`` / ``.csv`` / ``.tex``, plus ``results.png`` / ``.pdf`` / ``.svg``,
    ``aggregate.csv`` and ``runs.csv`` (with csv). Returns the written paths."""
    export_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        outputs = {"md": (".md", to_markdown), "latex": (".tex", to_latex)}
        for fmt, (suffix, render) in outputs.items():
            if fmt in formats:
                path = export_dir / f"{table.name}{suffix}"
                path.write_text(render(table), encoding="utf-8")
                written.append(path)
        if "csv" in formats:
            written.append(export_dir / f"{table.name}.csv")
            table.data.to_csv(written[-1], index=False)
    if "csv" in formats:
        agg.to_csv(export_dir / "aggregate.csv", index=False)
        runs.to_csv(export_dir / "runs.csv", index=False)
        written += [export_dir / "aggregate.csv", export_dir / "runs.csv"]
    figures = [f for f in FIGURE_FORMATS if f in formats]
    if figures and len(agg):
        written += plot_results(agg, runs, export_dir / "results.png", figures)
    return written


def find_parent_run(
    tracking_uri: str, sweep: str, experiment: str | Sequence[str] | None = None
) -> str | None:
    """The sweep's parent run (tagged ``stage=sweep`` and ``sweep=<sweep>``), oldest first; None
    when there is none."""
    client = open_store(tracking_uri)
    experiments = experiment_ids(client, experiment)
    if not experiments:
        return None
    runs = search_all(client, list(experiments), stage_filter(vocab.STAGE_SWEEP, sweep))
    if len(runs) > 1:
        logger.warning("%d parent runs tagged sweep=%s; using the oldest", len(runs), sweep)
    runs.sort(key=lambda r: (r.info.start_time, r.info.run_id))
    return runs[0].info.run_id if runs else None


def log_to_parent(tracking_uri: str, run_id: str, files: Sequence[Path]) -> None:
    """Attach exported files to a run under ``tables/``."""
    client = make_client(tracking_uri)
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path=ARTIFACT_DIR)


def build_tables(
    runs: pd.DataFrame, agg: pd.DataFrame, compare: tuple[str, str] | None = None
) -> list[Table]:
    """Table 1, Tables 2-4, per-class recall and (optionally) the paired comparison."""
    tables = [table1(agg), *comparison_tables(agg, runs), *recall_tables(agg, runs)]
    if compare is not None:
        tables.append(compare_archs(runs, agg, *compare))
    return tables


def _single_sweep(runs: pd.DataFrame) -> str | None:
    names = {s for s in runs.get("sweep", pd.Series([], dtype=object)).dropna() if s}
    return names.pop() if len(names) == 1 else None


def make_tables(
    tracking_uri: str,
    experiment: str | Sequence[str] | None = None,
    sweep: str | None = None,
    stage: str | None = "auto",
    export_dir: Path | None = None,
    formats: str | Sequence[str] = ("md",),
    compare: tuple[str, str] | None = None,
    n_folds: int | None = None,
    log_artifacts: bool = True,
) -> TableReport:
    """Load runs, build every table, write the exports and log them to the sweep's parent run.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name(s); None = all.
        sweep: restrict to one sweep; also names the parent run to attach files to (default: the
            runs' only sweep, if they share one).
        stage: see :func:`load_runs` (default ``auto``: cv runs if any, else every trial run).
        export_dir: folder for the files; None writes nothing to disk except a temporary copy
            for artifact logging.
        formats: subset of ``md, csv, latex, png, pdf, svg`` (or ``all``).
        compare: two architectures for the paired comparison.
        n_folds: expected folds per group (default: the runs' ``n_folds`` param, else 5).
        log_artifacts: attach the files to the sweep's parent run when one exists.

    Raises:
        LookupError: no trial runs match.
    """
    runs = load_runs(tracking_uri, experiment, sweep, stage)
    if runs.empty:
        raise LookupError(
            f"no trial runs in {tracking_uri} (experiment={experiment or 'all'}, "
            f"sweep={sweep or 'any'}, stage={stage or 'any'})"
        )
    agg = aggregate(runs, n_folds)
    tables = build_tables(runs, agg, compare)
    sweep_name = sweep or _single_sweep(runs)
    header = (f"{len(runs)} runs, {agg['dataset'].nunique()} dataset(s), "
              f"{agg['arch'].nunique()} architecture(s); sweep={sweep_name or 'all'}")
    markdown = "\n".join([f"_{header}_", ""] + [to_markdown(t) for t in tables])
    parent = _parent_for(tracking_uri, experiment, sweep_name, log_artifacts)
    chosen = parse_formats(formats)
    files = _write_and_log(tracking_uri, tables, agg, runs, export_dir, chosen, parent)
    return TableReport(markdown, tables, agg, runs, files, parent)


def _parent_for(tracking_uri: str, experiment, sweep: str | None, wanted: bool) -> str | None:
    if not wanted or not sweep:
        return None
    parent = find_parent_run(tracking_uri, sweep, experiment)
    if parent is None:
        logger.info("no parent run tagged stage=sweep, sweep=%s: files are not logged to MLflow",
                    sweep)
    return parent


def _write_and_log(tracking_uri, tables, agg, runs, export_dir, formats, parent) -> list[Path]:
    if export_dir is not None:
        files = write_exports(tables, agg, runs, Path(export_dir), formats)
        if parent:
            log_to_parent(tracking_uri, parent, files)
        return files
    if parent:
        with tempfile.TemporaryDirectory(prefix="mtcae_tables_") as tmp:
            written = write_exports(tables, agg, runs, Path(tmp), formats)
            log_to_parent(tracking_uri, parent, written)
    return []
