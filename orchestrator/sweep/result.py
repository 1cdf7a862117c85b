"""What a sweep produced and where it lives, as the CLI prints it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vocab


@dataclass
class SweepResult:
    """What a sweep produced and where it lives.

    Attributes:
        name: Sweep name.
        sweep_dir: Folder with ``state.json``, ``space.yaml`` and ``optuna.db``.
        storage: Tune storage of this sweep (``<storage>/<name>``).
        tracking_uri: MLflow tracking URI.
        experiment: MLflow experiment name.
        experiment_id: Its id.
        sweep_run_id: The sweep's parent run.
        selection: ``nested`` or ``pooled`` for a searched space, None when nothing is searched.
        chosen: Study name -> ``{"params", "score", "completed"}`` (with nested selection also the
            chosen trial's ``run_id``, ``fold`` and test metrics).
        cv_rows: One dict per (dataset, arch, fold) result: status, test_uar, test_war, ...
        complete: Whether every stage finished without failed trials.
        tables_dir: Where the tables were written, if they were.
        tables_markdown: The tables as Markdown, if they were written.
    """

    name: str
    sweep_dir: Path
    storage: str
    tracking_uri: str
    experiment: str
    experiment_id: str
    sweep_run_id: str
    selection: str | None = None
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)
    cv_rows: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    tables_dir: Path | None = None
    tables_markdown: str = ""

    def summary(self) -> str:
        """Human-readable: per-group final CV means, then where everything lives."""
        lines = [f"sweep {self.name}: {'complete' if self.complete else 'INCOMPLETE'}"]
        for key, choice in self.chosen.items():
            if choice.get("params") is None:
                lines.append(f"  {key}: no configuration finished")
            elif "fold" in choice:
                lines.append(f"  chosen for {key}: {choice['params']} (validation {choice['score']:.4f} "
                             f"on a slice of the fold's training subjects, {choice['completed']} configurations)")
            else:
                lines.append(f"  chosen for {key}: {choice['params']} (mean {choice['score']:.4f} over "
                             f"search folds, {choice['completed']} configurations completed)")
        if self.selection == vocab.SELECTION_POOLED:
            lines.append("  selection on pooled folds (optimistic): the choice saw other folds' test subjects")
        lines.extend(cv_means(self.cv_rows))
        lines.append(f"Tune results:      {self.storage}")
        lines.append(f"sweep state:       {self.sweep_dir}")
        lines.append(f"MLflow:            {self.tracking_uri}  experiment {self.experiment!r} "
                     f"(id {self.experiment_id}), sweep run {self.sweep_run_id}")
        lines.append(f"open the MLflow UI: {mlflow_ui_command(self.tracking_uri)}")
        if self.tables_dir:
            lines.append(f"tables:            {self.tables_dir}")
        return "\n".join(lines)


def fold_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``cv_test_uar_mean`` / ``_std`` (and WAR) over the done folds of one group's rows."""
    import statistics

    out = {}
    for metric in ("test_uar", "test_war"):
        values = [r[metric] for r in rows if r["status"] == "done" and isinstance(r.get(metric), (int, float))]
        if values:
            out[f"cv_{metric}_mean"] = statistics.fmean(values)
        if len(values) > 1:
            out[f"cv_{metric}_std"] = statistics.stdev(values)
    return out


def cv_means(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["arch"]), []).append(row)
    lines = []
    for (dataset, arch), members in groups.items():
        parts = []
        for metric in ("test_uar", "test_war"):
            values = [r[metric] for r in members if isinstance(r.get(metric), (int, float))]
            if values:
                parts.append(f"{metric} {sum(values) / len(values):.4f}")
        done = sum(r["status"] == "done" for r in members)
        lines.append(f"  {dataset}/{arch}: {', '.join(parts) or 'no test metrics'} "
                     f"({done}/{len(members)} folds done)")
    return lines


def mlflow_ui_command(tracking_uri: str) -> str:
    """The command that opens the MLflow UI on a tracking URI."""
    if tracking_uri.startswith(("http://", "https://")):
        return (f"open {tracking_uri} (from a laptop: ray attach cluster.yaml -p 5000, then "
                "http://localhost:5000)")
    return f"mlflow ui --backend-store-uri {tracking_uri}  (then http://127.0.0.1:5000)"


def cv_rows(results: Any) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        row = {"dataset": config.get("dataset"), "arch": config.get("arch"), "fold": config.get("fold"),
               "status": "failed" if result.error else "done", "path": result.path}
        for key in ("test_uar", "test_war", "test_accuracy", "epoch"):
            if isinstance(metrics.get(key), (int, float)):
                row[key] = metrics[key]
        rows.append(row)
    return sorted(rows, key=lambda r: (str(r["dataset"]), str(r["arch"]), int(r["fold"] or 0)))


def rows_by_group(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["arch"]), []).append(row)
    return groups
