"""The MLflow parent runs of a sweep: one for the sweep, one nested run per (dataset, arch) group."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vocab
from orchestrator import tracking
from orchestrator.sweep.cell import group_key
from orchestrator.sweep.space import SweepSpace
from orchestrator.sweep.state import SweepState

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parents:
    experiment_id: str
    sweep_run: str
    group_runs: dict[str, str]


def create_parent_runs(tracking_uri: str, experiment: str, sweep: str, space: SweepSpace) -> Parents:
    """The experiment, the sweep's parent run and one nested run per group (all idempotent)."""
    experiment_id = tracking.ensure_experiment(tracking_uri, experiment)
    describe_experiment(tracking_uri, experiment_id, space)
    sweep_run = tracking.get_or_create_run(
        tracking_uri, experiment_id, key=f"{sweep}/sweep", run_name=sweep,
        tags={"stage": vocab.STAGE_SWEEP, "sweep": sweep, "space": space.path.name},
    )
    groups = {}
    for dataset, arch in space.groups():
        groups[group_key(dataset, arch)] = tracking.get_or_create_run(
            tracking_uri, experiment_id, key=f"{sweep}/group/{dataset}/{arch}",
            run_name=f"{dataset}-{arch}", parent_run_id=sweep_run,
            tags={"stage": vocab.STAGE_GROUP, "sweep": sweep, "dataset": dataset, "arch": arch},
        )
    return Parents(experiment_id, sweep_run, groups)


EXPERIMENT_KIND = "custom_model_development"  # what the MLflow UI opens on: training runs, not traces


def describe_experiment(tracking_uri: str, experiment_id: str, space: SweepSpace) -> None:
    """The experiment's description (the space's, with its grid and protocol) and kind."""
    client = tracking.make_client(tracking_uri)
    selection = space.selection if space.search is not None else "fixed configuration"
    note = (f"{space.description or space.name}\n\nSearch space `{space.path.name}`: datasets "
            f"{', '.join(space.datasets)}; architectures {', '.join(space.archs)}; {space.n_folds} "
            f"subject-independent folds; selection {selection} on `{space.metric}`.")
    client.set_experiment_tag(experiment_id, "mlflow.note.content", note)
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)


def log_to_run(tracking_uri: str, run_id: str, params: Mapping[str, Any] = (),
                metrics: Mapping[str, float] = (), status: str | None = None) -> None:
    """Log params (skipping ones already set), metrics and a status on a parent run."""
    from mlflow.entities import Metric, Param

    client = tracking.make_client(tracking_uri)
    run = client.get_run(run_id)
    new = [Param(str(k), str(v)[:6000]) for k, v in dict(params).items() if str(k) not in run.data.params]
    now = int(time.time() * 1000)
    values = [Metric(tracking.mlflow_metric(str(k)), float(v), now, 0) for k, v in dict(metrics).items()]
    if new or values:
        client.log_batch(run_id, params=new, metrics=values)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    elif status:
        client.set_terminated(run_id, status=status)


def start_parent_runs(tracking_uri: str, parents: Parents, space: SweepSpace, state: SweepState) -> None:
    params = {"space": space.path.name, "datasets": ",".join(space.datasets),
              "archs": ",".join(space.archs), "n_folds": space.n_folds,
              "folds": ",".join(map(str, space.folds)), "metric": space.metric,
              "selection": space.selection if space.search is not None else "none (fixed configuration)",
              "searched": ",".join(p.name for p in (space.search.params if space.search else ()))}
    params.update({f"fixed.{k}": v for k, v in space.fixed.items()})
    status = None if state.complete else "RUNNING"
    log_to_run(tracking_uri, parents.sweep_run, params, status=status)
    client = tracking.make_client(tracking_uri)
    saved = state.path.parent / "space.yaml"
    if saved.is_file() and not client.list_artifacts(parents.sweep_run, "space"):
        client.log_artifact(parents.sweep_run, str(saved), artifact_path="space")
    for run_id in parents.group_runs.values():
        log_to_run(tracking_uri, run_id, status=status)


def close_parent_runs(tracking_uri: str, parents: Parents, status: str) -> None:
    """End the sweep's and every group's parent run with ``status`` (``FAILED`` or ``KILLED``).

    A resumed sweep sets them ``RUNNING`` again (:func:`start_parent_runs`).
    """
    for run_id in (parents.sweep_run, *parents.group_runs.values()):
        log_to_run(tracking_uri, run_id, status=status)


def log_folds(tracking_uri: str, parents: Parents, folds_files: Mapping[str, str], space: SweepSpace) -> None:
    """Log every dataset's folds file to the sweep run and to each of its groups' runs (``folds/``)."""
    client = tracking.make_client(tracking_uri)
    for dataset, path in folds_files.items():
        client.log_artifact(parents.sweep_run, path, artifact_path="folds")
        for arch in space.archs:
            client.log_artifact(parents.group_runs[group_key(dataset, arch)], path, artifact_path="folds")


def close_trial_runs(tracking_uri: str, experiment_id: str, sweep: str, status: str) -> int:
    """End every trial run of ``sweep`` still ``RUNNING`` with ``status``; how many there were.

    Called once Tune has returned, when no trial of the sweep can still be running: a run left
    ``RUNNING`` then belongs to a worker that died (SIGKILL, OOM) after its last retry, or to a stop.
    A resumed trial reopens its own run (runs are found by their ``trial_key``).
    """
    client = tracking.make_client(tracking_uri)
    stale = client.search_runs(
        [experiment_id], filter_string=f"tags.{tracking.TAG_SWEEP} = '{sweep}' and attributes.status = 'RUNNING'",
        max_results=10_000)
    trials = [r for r in stale if r.data.tags.get(tracking.TAG_STAGE) in vocab.STAGES]
    for run in trials:
        client.set_terminated(run.info.run_id, status=status)
    if trials:
        logger.warning("[%s] %d trial run(s) were still RUNNING in MLflow with no live trial; marked %s",
                       sweep, len(trials), status)
    return len(trials)


def log_fold_confusion(client: Any, group_run: str, run_ids: list[str], title: str) -> None:
    """The group's confusion matrix summed over its folds' results, as counts and row-normalised
    (``confusion_counts.png``, ``confusion_normalised.png``) on its group run."""
    counts, names = tracking.fold_confusion(client, run_ids)
    if not names:
        return
    with tempfile.TemporaryDirectory(prefix="mtcae_confusion_") as tmp:
        caption = f"{title}, {len(run_ids)} folds"
        for annotate, name in (("counts", "confusion_counts.png"), ("rates", "confusion_normalised.png")):
            path = Path(tmp) / name
            tracking.save_confusion_png(counts, names, path, title=f"{caption}: {annotate}", annotate=annotate)
            client.log_artifact(group_run, str(path))
