"""MLflow tracking: one run per trial, idempotent on the trial key, safe inside Ray workers.

Everything goes through an explicit :class:`mlflow.MlflowClient` (no fluent ``mlflow.start_run``
global state), because trials run inside long-lived Ray worker processes that may host several
trials one after another.

Store layout of the embedded default (no server needed)::

    <out_dir>/mlflow.db          # SQLite backend (runs, params, metrics, tags)
    <out_dir>/mlartifacts/<exp>/ # artifacts: confusion_matrix.png, per_class_recall.csv, ...

Browse it with ``mlflow ui --backend-store-uri sqlite:///<out_dir>/mlflow.db``. On a cluster, run
one ``mlflow server`` on the head and pass its URL (``--tracking-uri`` or ``MLFLOW_TRACKING_URI``):
direct SQLite from many processes costs ~0.7 s of store init per process and is unsafe across
nodes.

Idempotency contract (a resumed or re-run trial never duplicates anything):

* a run is identified by its ``trial_key`` tag inside an experiment (:func:`get_or_create_run`);
* params already present on the run are skipped (MLflow refuses to change a param value);
* a metric is written at step ``s`` only if the run holds no value for that key at a step ``>= s``
  (Ray re-reports the last epoch after a driver restore).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

DB_FILENAME = "mlflow.db"
ARTIFACTS_DIRNAME = "mlartifacts"

# Tags every trial run carries (docs/design.md, "MLflow").
TAG_DATASET = "dataset"
TAG_ARCH = "arch"
TAG_FOLD = "fold"
TAG_SWEEP = "sweep"
TAG_STAGE = "stage"
TAG_CONFIG_HASH = "config_hash"
TAG_TRIAL_KEY = "trial_key"
# Set by the sweep on search trials under nested selection: ``selected`` is "true" on the trial
# chosen for its outer fold (that fold's result) and "false" on the others; ``selection`` names
# the protocol (vocab.SELECTIONS).
TAG_SELECTED = "selected"
TAG_SELECTION = "selection"
RESULT_METRIC = "test_uar"  # logged at the natural end of a trial only: its run holds a result
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag; the UI shows children under it

RECALL_PREFIX = "test_recall_"

# Metric names as the trainable and Tune know them (``val_uar``) -> as MLflow shows them, in
# sections (``val/uar``), so the UI groups the charts: train/, val/ (best_* at the selected epoch:
# val/best_*), test/, time/, and on parent runs cv/ and search/. Names that fit no section pass
# unchanged; reading maps them back (:func:`flat_metrics`), so every reader keeps the flat names.
METRIC_SECTIONS: tuple[tuple[str, str], ...] = (
    ("best_val_", "val/best_"), ("train_", "train/"), ("val_", "val/"), ("test_", "test/"),
    ("cv_", "cv/"), ("search_", "search/"),
)
METRIC_NAMES: dict[str, str] = {"lr": "train/lr", "epoch_time_s": "time/epoch_s", "best_epoch": "val/best_epoch",
                                "epoch": "train/epoch"}

# MLflow's per-call limits (mlflow.utils.validation).
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAM_VALUE_LENGTH = 6000
_INIT_LOCK_SUFFIX = ".init.lock"
_RUNS_LOCK_SUFFIX = ".runs.lock"
_SQLITE_PREFIX = "sqlite:///"


# --------------------------------------------------------------------------------------------
# Tracking URI


def _rename(name: str, names: Mapping[str, str], prefixes: Sequence[tuple[str, str]]) -> str:
    if name in names:
        return names[name]
    for old, new in prefixes:
        if name.startswith(old):
            return new + name[len(old):]
    return name


_FLAT_NAMES = {v: k for k, v in METRIC_NAMES.items()}
_FLAT_SECTIONS = tuple((section, flat) for flat, section in METRIC_SECTIONS)


def mlflow_metric(name: str) -> str:
    """The MLflow key of a metric: ``val_uar`` -> ``val/uar``, ``lr`` -> ``train/lr``."""
    return _rename(name, METRIC_NAMES, METRIC_SECTIONS)


def flat_metric(key: str) -> str:
    """The inverse of :func:`mlflow_metric` (a key without a section is returned as it is)."""
    return _rename(key, _FLAT_NAMES, _FLAT_SECTIONS)


def flat_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics under the flat names the trainable reports (``val/uar`` -> ``val_uar``)."""
    return {flat_metric(k): v for k, v in metrics.items()}


def default_tracking_uri(out_dir: Path) -> str:
    """The embedded store of a project output folder: ``sqlite:///<abs out_dir>/mlflow.db``.

    Artifacts of experiments created through :func:`ensure_experiment` on this store go to
    ``<out_dir>/mlartifacts``. The folder is created if missing (SQLite does not create it).
    """
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"{_SQLITE_PREFIX}{out / DB_FILENAME}"


def resolve_tracking_uri(uri: str | None, out_dir: Path) -> str:
    """Pick the tracking URI: explicit ``uri`` > ``$MLFLOW_TRACKING_URI`` > the embedded default.

    Raises:
        ValueError: the chosen URI is MLflow's retired file store (``file:`` or a bare folder),
            which MLflow 3.17 refuses to open.
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if chosen is None:
        return default_tracking_uri(out_dir)
    is_path = "://" not in chosen and not chosen.startswith("databricks")
    if chosen.startswith("file:") or is_path:
        source = "--tracking-uri" if uri else "MLFLOW_TRACKING_URI"
        raise ValueError(
            f"{source}={chosen!r} is an MLflow file store, which MLflow 3 no longer opens; "
            f"use a database ('sqlite:////abs/path/mlflow.db') or a server ('http://host:5000')"
        )
    return chosen


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for any other backend)."""
    if not tracking_uri.startswith(_SQLITE_PREFIX):
        return None
    return Path(tracking_uri[len(_SQLITE_PREFIX) :].split("?", 1)[0]).absolute()


@contextlib.contextmanager
def _sqlite_lock(tracking_uri: str, suffix: str = _INIT_LOCK_SUFFIX) -> Iterator[None]:
    """Serialise a critical section across the processes sharing one SQLite store.

    MLflow creates and migrates a fresh SQLite database on first open; two processes doing that at
    once fail with "table experiments already exists". A file lock next to the database orders them.
    No-op for other backends.
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + suffix), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def make_client(tracking_uri: str):
    """An :class:`mlflow.MlflowClient` whose store is opened (and, for SQLite, created) safely."""
    from mlflow import MlflowClient

    with _sqlite_lock(tracking_uri):
        return MlflowClient(tracking_uri=tracking_uri)


def _as_client(client_or_uri: Any):
    return make_client(client_or_uri) if isinstance(client_or_uri, str) else client_or_uri


# --------------------------------------------------------------------------------------------
# Experiments and runs


def _default_artifact_location(tracking_uri: str, name: str) -> str | None:
    """``<db folder>/mlartifacts/<name>`` for a SQLite store; None (server default) otherwise."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "experiment"
    return (db.parent / ARTIFACTS_DIRNAME / slug).as_uri()


def ensure_experiment(client_or_uri: Any, name: str, artifact_location: str | None = None) -> str:
    """Return the id of experiment ``name``, creating it if needed.

    Idempotent and race-safe: when several processes create it at once, the losers read the
    winner's id. A deleted experiment of that name is restored (MLflow forbids reusing the name).

    Args:
        client_or_uri: an ``MlflowClient`` or a tracking URI.
        name: experiment name.
        artifact_location: where runs store artifacts; defaults to
            ``<db folder>/mlartifacts/<name>`` on a SQLite store and to the server's artifact
            root otherwise.
    """
    from mlflow.entities import LifecycleStage
    from mlflow.exceptions import MlflowException

    client = _as_client(client_or_uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == LifecycleStage.DELETED:
            logger.warning("restoring deleted MLflow experiment %r", name)
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    location = artifact_location or _default_artifact_location(client.tracking_uri, name)
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException as err:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        logger.debug("experiment %r created concurrently (%s)", name, err.error_code)
        return experiment.experiment_id


def _find_runs_by_key(client: Any, experiment_id: str, key: str) -> list[Any]:
    """Active runs of the experiment tagged ``trial_key = key``, oldest first."""
    runs = client.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.{TAG_TRIAL_KEY} = '{key}'",
        max_results=100,
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def search_all(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    """Every run of ``experiment_ids`` matching ``filter_string``, all result pages."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def trial_runs(client: Any, experiment_id: str, sweep: str, stage: str, **tags: Any) -> list[Any]:
    """Trial runs of a sweep's stage, optionally with more tags equal (``dataset=..., fold=...``)."""
    clauses = [f"tags.{TAG_SWEEP} = '{sweep}'", f"tags.{TAG_STAGE} = '{stage}'"]
    clauses += [f"tags.{k} = '{v}'" for k, v in tags.items() if v is not None]
    return search_all(client, [experiment_id], " and ".join(clauses))


def _runs_of_key(tracking_uri: str, experiment_name: str, key: str) -> tuple[Any, list[Any]]:
    """A client and the runs of an experiment (by name) tagged ``trial_key = key``, oldest first."""
    client = make_client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None or not key or "'" in key:
        return client, []
    return client, _find_runs_by_key(client, experiment.experiment_id, key)


def find_run_id(tracking_uri: str, experiment_name: str, key: str) -> str | None:
    """The id of the run tagged ``trial_key = key`` (the oldest), or None."""
    runs = _runs_of_key(tracking_uri, experiment_name, key)[1]
    return runs[0].info.run_id if runs else None


def has_result(run: Any) -> bool:
    """Whether a trial run finished with its test metrics (a trial that need never run again)."""
    return run.info.status == "FINISHED" and RESULT_METRIC in flat_metrics(run.data.metrics)


def set_selected(client: Any, run_id: str, selected: bool, selection: str) -> None:
    """Tag a search trial as its outer fold's result (or not)."""
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(TAG_SELECTED, str(selected).lower()),
                                   RunTag(TAG_SELECTION, selection)])


def recorded_result(tracking_uri: str, experiment_name: str, key: str) -> dict[str, float] | None:
    """The final metrics of the trial ``key`` when MLflow already holds its result, else None.

    MLflow is the record of what finished: a trial whose run logged its test metrics is never
    trained again, whatever a restored Tune snapshot says (a driver killed after the trial
    finished and before Tune saved its state). A run that logged its test metrics and then lost
    its worker before closing is closed ``FINISHED`` here.
    """
    client, runs = _runs_of_key(tracking_uri, experiment_name, key)
    for run in runs:
        metrics = flat_metrics(run.data.metrics)
        if RESULT_METRIC in metrics:
            if run.info.status != "FINISHED":
                client.set_terminated(run.info.run_id, status="FINISHED")
            return metrics
    return None


def get_or_create_run(
    tracking_uri: str,
    experiment_id: str,
    key: str,
    run_name: str,
    tags: Mapping[str, Any],
    parent_run_id: str | None = None,
) -> str:
    """Return the id of the run tagged ``trial_key=key``, creating it if there is none.

    Used for trial runs and for the sweep driver's parent runs alike. On a SQLite store the
    search-then-create step holds a file lock, so concurrent callers always share one run. On a
    server it searches again after creating: if a concurrent caller created a run for the same key,
    the oldest wins and the newer is deleted (best effort: two callers that each finish before
    seeing the other's run keep two runs; running the same trial twice at once is a sweep bug).

    Args:
        tracking_uri: MLflow tracking URI.
        experiment_id: from :func:`ensure_experiment`.
        key: stable identity of the trial, e.g.
            ``"<sweep>/<stage>/<dataset>/<arch>/<config_hash>/f<fold>"``.
        run_name: display name in the MLflow UI.
        tags: tags set on creation (values are stringified).
        parent_run_id: nest the run under this run (MLflow's ``mlflow.parentRunId`` tag).

    Raises:
        ValueError: ``key`` is empty or contains a quote (it is used inside a search filter).
    """
    if not key or "'" in key or '"' in key:
        raise ValueError(f"trial_key must be non-empty and free of quotes, got {key!r}")
    client = make_client(tracking_uri)
    all_tags = {str(k): str(v) for k, v in tags.items()}
    all_tags[TAG_TRIAL_KEY] = key
    if parent_run_id:
        all_tags[PARENT_RUN_TAG] = parent_run_id
    with _sqlite_lock(tracking_uri, _RUNS_LOCK_SUFFIX):
        existing = _find_runs_by_key(client, experiment_id, key)
        if existing:
            return existing[0].info.run_id
        run = client.create_run(experiment_id, tags=all_tags, run_name=run_name)
    winner = _find_runs_by_key(client, experiment_id, key)[0].info.run_id
    if winner != run.info.run_id:
        logger.info("run for trial_key %r created concurrently; using %s", key, winner)
        client.delete_run(run.info.run_id)
    return winner


def recall_metric_name(class_name: str) -> str:
    """``test_recall_<class_name>``, with characters MLflow rejects in metric names replaced."""
    return RECALL_PREFIX + re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(class_name))


# --------------------------------------------------------------------------------------------
# Trial logger


class TrialLogger:
    """Logs one trial to its own MLflow run; safe to construct again on resume.

    Example::

        tl = TrialLogger(uri, "mtcae", trial_key, "ravdess-cascaded_vit-f0", tags, flat_config,
                         parent_run_id=parent)
        for epoch in range(start, epochs):
            tl.log_epoch({"train_loss": ..., "val_uar": ...}, epoch)
        tl.log_final({"test_uar": ..., "best_epoch": 12}, y_true, y_pred, class_names, clip_ids)
        tl.finish()

    Args:
        tracking_uri: MLflow tracking URI (see :func:`resolve_tracking_uri`).
        experiment_name: created if missing.
        trial_key: identity of the trial; the same key always maps to the same run.
        run_name: display name.
        tags: run tags (``dataset``, ``arch``, ``fold``, ``sweep``, ``stage``, ``config_hash``).
        params: the flat configuration, logged as params (values already on the run are kept).
        parent_run_id: nest under this run.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        trial_key: str,
        run_name: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any],
        parent_run_id: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self._client = make_client(tracking_uri)
        self.experiment_id = ensure_experiment(self._client, experiment_name)
        self.run_id = get_or_create_run(
            tracking_uri, self.experiment_id, trial_key, run_name, tags, parent_run_id
        )
        run = self._client.get_run(self.run_id)
        if run.info.status != "RUNNING":
            self._client.update_run(self.run_id, status="RUNNING")
        self._last_step = self._load_last_steps(run.data.metrics)
        self._log_params(params, run.data.params)

    def _load_last_steps(self, latest: Mapping[str, float]) -> dict[str, int]:
        """Highest step already stored per metric key (queried once, on resume)."""
        return {
            key: max(m.step for m in self._client.get_metric_history(self.run_id, key))
            for key in latest
        }

    def _log_params(self, params: Mapping[str, Any], existing: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        new = []
        for key, value in params.items():
            text = "None" if value is None else str(value)
            text = text[:_MAX_PARAM_VALUE_LENGTH]
            if key in existing:
                if existing[key] != text:
                    logger.warning(
                        "run %s: param %r stays %r (new value %r ignored; MLflow params are "
                        "immutable)", self.run_id, key, existing[key], text
                    )
                continue
            new.append(Param(str(key), text))
        for start in range(0, len(new), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[start : start + _MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> int:
        """Log ``metrics`` (flat names, stored in sections: :func:`mlflow_metric`) at ``step`` in one
        batch, skipping keys already logged at ``>= step``.

        Returns:
            The number of values written.
        """
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, int(step))
            for key, value in ((mlflow_metric(k), v) for k, v in metrics.items())
            if value is not None and self._last_step.get(key, -1) < step
        ]
        if len(batch) < sum(v is not None for v in metrics.values()):
            logger.debug("run %s: step %d already logged for some keys; skipped", self.run_id, step)
        step_size = _MAX_METRICS_PER_BATCH
        for start in range(0, len(batch), step_size):
            self._client.log_batch(self.run_id, metrics=batch[start : start + step_size])
        for metric in batch:
            self._last_step[metric.key] = int(step)
        return len(batch)

    def log_epoch(self, metrics: Mapping[str, float], epoch: int) -> int:
        """Log one epoch's metrics with ``step=epoch`` (a re-reported epoch is not duplicated)."""
        return self.log_metrics(metrics, epoch)

    def log_final(
        self,
        metrics: Mapping[str, float],
        y_true: Sequence[int] | np.ndarray,
        y_pred: Sequence[int] | np.ndarray,
        class_names: Sequence[str],
        clip_ids: Sequence[str],
    ) -> None:
        """Log the test results and the artifacts a researcher opens first.

        Metrics (step 0): ``metrics`` plus ``test_recall_<class>`` computed from the predictions
        (values given in ``metrics`` win). Artifacts: ``confusion_matrix.png``,
        ``per_class_recall.csv``, ``predictions.csv``.

        Raises:
            ValueError: the lengths of ``y_true``, ``y_pred`` and ``clip_ids`` differ, or a label is
                outside ``range(len(class_names))``.
        """
        from model.metrics import (
            classification_metrics,  # lazy: `mtcae table` need not import torch
        )

        true, pred = _check_predictions(y_true, y_pred, class_names, clip_ids)
        scores = classification_metrics(true, pred, len(class_names))
        confusion, recalls = scores["confusion"], np.asarray(scores["per_class_recall"])
        final = {recall_metric_name(n): r for n, r in zip(class_names, recalls) if not np.isnan(r)}
        final.update(metrics)
        self.log_metrics(final, 0)
        with tempfile.TemporaryDirectory(prefix="mtcae_artifacts_") as tmp:
            folder = Path(tmp)
            save_confusion_png(confusion, class_names, folder / "confusion_matrix.png")
            _write_recall_csv(confusion, recalls, class_names, folder / "per_class_recall.csv")
            _write_predictions_csv(true, pred, class_names, clip_ids, folder / "predictions.csv")
            self._client.log_artifacts(self.run_id, str(folder))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) run tags, e.g. a checkpoint URI."""
        from mlflow.entities import RunTag

        batch = [RunTag(str(k), str(v)) for k, v in tags.items()]
        self._client.log_batch(self.run_id, tags=batch)

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED``."""
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"status must be FINISHED, FAILED or KILLED, got {status!r}")
        self._client.set_terminated(self.run_id, status=status)

    def __enter__(self) -> TrialLogger:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: Any) -> None:
        self.finish("FAILED" if exc_type is not None else "FINISHED")


# --------------------------------------------------------------------------------------------
# Final artifacts


def _check_predictions(
    y_true: Sequence[int] | np.ndarray,
    y_pred: Sequence[int] | np.ndarray,
    class_names: Sequence[str],
    clip_ids: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:
    true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if not len(true) == len(pred) == len(clip_ids):
        raise ValueError(
            f"y_true, y_pred and clip_ids must have equal lengths, got "
            f"{len(true)}, {len(pred)}, {len(clip_ids)}"
        )
    k = len(class_names)
    for name, labels in (("y_true", true), ("y_pred", pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"{name} holds labels outside 0..{k - 1} ({k} class_names)")
    return true, pred


def save_confusion_png(confusion: np.ndarray, class_names: Sequence[str], path: Path,
                       title: str | None = None, annotate: str = "counts") -> None:
    """Write a confusion matrix as a PNG, coloured by row-normalised rates.

    Args:
        annotate: ``counts`` (clips per cell) or ``rates`` (row-normalised, each row sums to 1).

    Uses a bare Agg ``Figure`` (no pyplot), so it is safe in worker processes without a display.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(class_names)
    support = confusion.sum(axis=1, keepdims=True)
    rates = confusion / np.maximum(support, 1)
    fig = Figure(figsize=(1.0 + 0.7 * k, 1.0 + 0.6 * k), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            color = "white" if rates[i, j] > 0.5 else "black"
            text = str(confusion[i, j]) if annotate == "counts" else f"{rates[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_xticks(range(k), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path)


@contextlib.contextmanager
def no_download_bar() -> Iterator[None]:
    """MLflow's per-download progress bar off: a bar per small artifact only clutters a log (or our own bar)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def fold_confusion(client: Any, run_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """The confusion matrix summed over the ``predictions.csv`` of several trial runs (one per fold).

    Returns:
        (counts, class names in label order); runs without the artifact are skipped.
    """
    import pandas as pd
    from mlflow.exceptions import MlflowException

    frames = []
    with tempfile.TemporaryDirectory(prefix="mtcae_predictions_") as tmp, no_download_bar():
        for run_id in run_ids:
            try:
                path = client.download_artifacts(run_id, "predictions.csv", tmp)
            except (OSError, MlflowException) as err:
                logger.warning("run %s has no predictions.csv (%s); left out of the fold confusion", run_id, err)
                continue
            frames.append(pd.read_csv(path))
            Path(path).unlink()
    if not frames:
        return np.zeros((0, 0), dtype=int), []
    table = pd.concat(frames, ignore_index=True)
    names = dict(zip(table["label"], table["label_name"])) | dict(zip(table["pred"], table["pred_name"]))
    labels = sorted(names)
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), dtype=int)
    for true, pred in zip(table["label"], table["pred"]):
        counts[index[true], index[pred]] += 1
    return counts, [names[label] for label in labels]


def _write_recall_csv(confusion: np.ndarray, recalls: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "recall", "support", "correct"])
        for i, name in enumerate(class_names):
            recall = "" if np.isnan(recalls[i]) else f"{recalls[i]:.6f}"
            writer.writerow([name, recall, int(confusion[i].sum()), int(confusion[i, i])])


def _write_predictions_csv(
    true: np.ndarray,
    pred: np.ndarray,
    class_names: Sequence[str],
    clip_ids: Sequence[str],
    path: Path,
) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["clip_id", "label", "label_name", "pred", "pred_name", "correct"])
        for clip, t, p in zip(clip_ids, true, pred):
            writer.writerow([clip, int(t), class_names[t], int(p), class_names[p], int(t == p)])
