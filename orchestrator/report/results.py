"""Trial results from MLflow as pandas frames: one row per fold run, and the per-group summary.

:func:`load_runs` reads the trial runs of one or more experiments (MLflow -> one row per
dataset/arch/configuration/fold, the latest attempt of each); :func:`aggregate` summarises each
(dataset, arch) group (mean ± std over done folds, folds present vs expected, the configuration
chosen on validation); :func:`chosen_runs` keeps the fold runs of the chosen configurations.
:mod:`orchestrator.report.tables` turns these frames into the paper's tables and figure.

Conventions:

* Trial runs log UAR/WAR/accuracy/recall as fractions in [0, 1] (``model.metrics``); summaries
  scale them to percent (:data:`SCALE`), like the paper.
* ``±`` is the sample standard deviation over folds (ddof=1); a single fold has no std.
* A fold counts as done when its run is ``FINISHED`` and has ``test_war``. Missing folds (no run),
  failed folds (``FAILED``/``KILLED``/finished without test metrics) and running folds are counted
  next to every mean: they are never silently averaged away.
* When a (dataset, arch) group holds several configurations (``config_hash``), the one with the
  most done folds, then the best mean of its own selection metric at its selected epoch
  (``best_<select_metric>``, the quantity that chose its tested weights and its Optuna score; the
  last epoch's value for runs that predate it), is reported: the choice never looks at test metrics.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

import vocab
from orchestrator.report import paper
from orchestrator.tracking import (
    PARENT_RUN_TAG,
    RECALL_PREFIX,
    TAG_ARCH,
    TAG_CONFIG_HASH,
    TAG_DATASET,
    TAG_FOLD,
    TAG_SELECTED,
    TAG_SELECTION,
    TAG_STAGE,
    TAG_SWEEP,
    TAG_TRIAL_KEY,
    flat_metrics,
    make_client,
    search_all,
    sqlite_path,
)

logger = logging.getLogger(__name__)

SCALE = 100.0  # fractions -> percent
DEFAULT_N_FOLDS = 5  # paper: 5-fold cross-validation; used when runs carry no n_folds param
DONE, FAILED, RUNNING = "done", "failed", "running"
RUN_KEY = ["dataset", "arch", "config_hash", "fold"]


def _all_experiments(client) -> list:
    experiments, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        experiments.extend(page)
        token = page.token
        if not token:
            return experiments


def experiment_ids(client, experiment: str | Sequence[str] | None) -> dict[str, str]:
    """Experiment id -> name for the requested names (all active experiments when None)."""
    if experiment is None:
        return {e.experiment_id: e.name for e in _all_experiments(client)}
    names = [experiment] if isinstance(experiment, str) else list(experiment)
    out = {}
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            known = sorted(e.name for e in _all_experiments(client))
            raise ValueError(f"MLflow experiment {name!r} not found; known: {known}")
        out[exp.experiment_id] = name
    return out


def stage_filter(stage: str | None, sweep: str | None) -> str:
    """An MLflow filter string on the ``stage`` and ``sweep`` tags (None: any); quotes are refused."""
    clauses = []
    for tag, value in ((TAG_STAGE, stage), (TAG_SWEEP, sweep)):
        if value is None:
            continue
        if "'" in value:
            raise ValueError(f"{tag} value must not contain quotes, got {value!r}")
        clauses.append(f"tags.{tag} = '{value}'")
    return " and ".join(clauses)


def _run_row(run, experiment_name: str) -> dict:
    tags, info = run.data.tags, run.info
    row = {
        "run_id": info.run_id,
        "run_name": info.run_name,
        "experiment": experiment_name,
        "status": info.status,
        "dataset": paper.canonical_dataset(tags.get(TAG_DATASET, "")),
        "arch": tags.get(TAG_ARCH, ""),
        "fold": tags.get(TAG_FOLD),
        "sweep": tags.get(TAG_SWEEP, ""),
        "stage": tags.get(TAG_STAGE, ""),
        "config_hash": tags.get(TAG_CONFIG_HASH, ""),
        "trial_key": tags.get(TAG_TRIAL_KEY, ""),
        "selected": tags.get(TAG_SELECTED, ""),
        "selection": tags.get(TAG_SELECTION, ""),
        "parent_run_id": tags.get(PARENT_RUN_TAG, ""),
        "start_time": info.start_time,
        "end_time": info.end_time,
    }
    row.update(flat_metrics(run.data.metrics))
    row.update({f"param.{k}": v for k, v in run.data.params.items()})
    return row


def open_store(tracking_uri: str):
    """An MLflow client for ``tracking_uri``; a SQLite store that does not exist is an error, not created."""
    db = sqlite_path(tracking_uri)
    if db is not None and not db.exists():
        raise FileNotFoundError(
            f"no MLflow store at {db}; run a sweep or `mtcae demo` first, or pass --tracking-uri / "
            f"--out pointing at the folder that holds mlflow.db"
        )
    return make_client(tracking_uri)


def load_runs(
    tracking_uri: str,
    experiment: str | Sequence[str] | None = None,
    sweep: str | None = None,
    stage: str | None = vocab.STAGE_CV,
) -> pd.DataFrame:
    """Trial runs as a DataFrame, one row per (dataset, arch, config_hash, fold).

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name(s); None reads every active experiment.
        sweep: keep only runs tagged ``sweep=<sweep>``.
        stage: ``"cv"`` (default), ``"search"``, ``None`` for any trial stage, or ``"auto"``: the
            trials nested selection chose for their folds (:func:`nested_results`) when there are
            any, else ``cv`` runs when there are any, else all trial runs.

    Returns:
        Columns ``run_id, run_name, experiment, status, dataset, arch, fold (Int64), sweep, stage,
        config_hash, trial_key, parent_run_id, start_time, end_time``, one column per metric
        (``test_uar``, ``test_recall_<class>`` ...) and ``param.<name>`` per param. Sweep parent
        runs (``stage=sweep``, or any run without a ``fold`` tag, such as per-group parents) and
        runs without ``dataset``/``arch`` tags are left out. When one
        fold was logged twice, the finished run with test metrics (then the newest) is kept.

    Raises:
        FileNotFoundError: a ``sqlite:///`` URI whose database file does not exist.
        ValueError: an unknown experiment name.
    """
    client = open_store(tracking_uri)
    experiments = experiment_ids(client, experiment)
    if stage == "auto":
        frame = load_runs(tracking_uri, experiment, sweep, vocab.STAGE_SEARCH) if experiments else pd.DataFrame()
        frame = nested_results(frame)
        if len(frame):
            return frame
        frame = load_runs(tracking_uri, experiment, sweep, vocab.STAGE_CV) if experiments else pd.DataFrame()
        if len(frame):
            return frame
        logger.info("no runs tagged stage=cv or selected; using every trial run (search stage included)")
        stage = None
    runs = []
    if experiments:
        runs = search_all(client, list(experiments), stage_filter(stage, sweep))
    rows = [_run_row(r, experiments[r.info.experiment_id]) for r in runs]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["run_id", "status", "stage", *RUN_KEY])
    frame["fold"] = pd.to_numeric(frame["fold"], errors="coerce").astype("Int64")
    # Parent runs (the sweep's, stage=sweep; per-group ones) carry no fold: they are not trials.
    frame = frame[(frame["stage"] != vocab.STAGE_SWEEP) & frame["fold"].notna()]
    unlabeled = (frame["dataset"] == "") | (frame["arch"] == "")
    if unlabeled.any():
        logger.warning("ignoring %d run(s) without dataset/arch tags", int(unlabeled.sum()))
    return _deduplicate(frame[~unlabeled].copy()).reset_index(drop=True)


NESTED_CONFIG = "per-fold (nested)"  # the config_hash of a group's nested results: one choice per fold


def nested_results(runs: pd.DataFrame) -> pd.DataFrame:
    """The search runs nested selection chose (tag ``selected=true``), one per outer fold.

    Their ``config_hash`` becomes :data:`NESTED_CONFIG` (each fold has its own chosen
    configuration; the trained one stays in ``trained_config_hash``), so :func:`aggregate` sees one
    result per fold of each group.
    """
    if runs.empty or "selected" not in runs:
        return runs.iloc[0:0]
    chosen = runs[runs["selected"] == "true"].copy()
    chosen["trained_config_hash"] = chosen["config_hash"]
    chosen["config_hash"] = NESTED_CONFIG
    return chosen.reset_index(drop=True)


def protocol(runs: pd.DataFrame) -> str:
    """How the runs' configurations were chosen: ``nested``, ``pooled`` or ``fixed`` (nothing searched).

    Runs without a ``selection`` tag (logged before it existed, or by ``mtcae train``) count as fixed.
    """
    values = set(runs["selection"].dropna()) - {""} if "selection" in runs else set()
    if vocab.SELECTION_POOLED in values:
        return vocab.SELECTION_POOLED
    if vocab.SELECTION_NESTED in values:
        return vocab.SELECTION_NESTED
    return "fixed"


def _deduplicate(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep one run per (dataset, arch, config, fold): finished with test metrics, then newest."""
    has_test = frame["test_war"].notna() if "test_war" in frame else False
    frame = frame.assign(_ok=(frame["status"] == "FINISHED") & has_test)
    frame = frame.sort_values(["_ok", "start_time"], ascending=[False, False], kind="stable")
    deduped = frame.drop_duplicates(RUN_KEY, keep="first")
    if len(deduped) < len(frame):
        logger.warning("%d duplicate fold run(s) ignored", len(frame) - len(deduped))
    return deduped.drop(columns="_ok").sort_values(RUN_KEY, kind="stable")


def fold_state(runs: pd.DataFrame) -> pd.Series:
    """``done`` | ``failed`` | ``running`` for each run row."""
    has_test = runs["test_war"].notna() if "test_war" in runs else pd.Series(False, runs.index)
    finished = runs["status"] == "FINISHED"
    running = runs["status"].isin(["RUNNING", "SCHEDULED"])
    state = np.where(finished & has_test, DONE, np.where(running, RUNNING, FAILED))
    return pd.Series(state, index=runs.index)


def _expected_folds(group: pd.DataFrame, n_folds: int | None) -> int:
    if n_folds is not None:
        return n_folds
    if "param.n_folds" in group:
        values = pd.to_numeric(group["param.n_folds"], errors="coerce").dropna()
        if len(values):
            return int(values.max())
    return DEFAULT_N_FOLDS


def _folds_text(folds: Iterable[int]) -> str:
    return ",".join(str(int(f)) for f in sorted(folds))


def _summarise_config(group: pd.DataFrame, n_folds: int | None) -> dict:
    """Fold bookkeeping and mean/std of the test metrics for one configuration."""
    state = fold_state(group)
    done = group[state == DONE]
    expected = _expected_folds(group, n_folds)
    present = set(group["fold"].dropna().astype(int))
    out = {
        "folds_expected": expected,
        "folds_done": len(done),
        "folds_missing": _folds_text(set(range(expected)) - present),
        "folds_failed": _folds_text(group.loc[state == FAILED, "fold"].dropna()),
        "folds_running": _folds_text(group.loc[state == RUNNING, "fold"].dropna()),
        "select_score": _selection_score(done),
    }
    for metric in ("uar", "war", "accuracy"):
        column = f"test_{metric}"
        values = done[column] * SCALE if column in done else pd.Series([], dtype=float)
        out[f"{metric}_mean"] = values.mean() if len(values) else np.nan
        out[f"{metric}_std"] = values.std(ddof=1) if len(values) > 1 else np.nan
    return out


def aggregate(runs: pd.DataFrame, n_folds: int | None = None) -> pd.DataFrame:
    """Mean ± std over folds per (dataset, arch), with the chosen configuration.

    Args:
        runs: from :func:`load_runs`.
        n_folds: expected folds per group; default: the runs' ``n_folds`` param, else 5.

    Returns:
        One row per (dataset, arch): ``config_hash``, ``protocol`` (:func:`protocol`), ``n_configs``,
        ``n_classes`` (per-class recalls logged; chance UAR is 100 / n_classes), ``folds_expected``,
        ``folds_done``, ``folds_missing``/``folds_failed``/``folds_running`` (comma-separated fold
        indices), ``uar_mean``, ``uar_std``, ``war_mean``, ``war_std``, ``accuracy_mean``,
        ``accuracy_std`` (percent), ``complete`` (all expected folds done).
    """
    columns = ["dataset", "arch", "config_hash", "n_configs", "folds_expected", "folds_done"]
    if runs.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for (dataset, arch), group in runs.groupby(["dataset", "arch"], sort=False):
        configs = {
            h: _summarise_config(g, n_folds) for h, g in group.groupby("config_hash", sort=False)
        }
        best = max(configs, key=lambda h: _selection_key(configs[h]))
        classes = [c for c in group.columns if c.startswith(RECALL_PREFIX) and group[c].notna().any()]
        rows.append({"dataset": dataset, "arch": arch, "config_hash": best, "protocol": protocol(group),
                     "n_configs": len(configs), "n_classes": len(classes) or np.nan, **configs[best]})
    agg = pd.DataFrame(rows)
    agg["complete"] = agg["folds_done"] >= agg["folds_expected"]
    return _sort_groups(agg).drop(columns="select_score")


def select_metric(runs: pd.DataFrame) -> str:
    """The selection metric the runs were trained with (their ``select_metric`` param).

    Runs logged before the param existed were chosen on validation UAR, which stays their metric.
    """
    column = runs.get("param.select_metric")
    values = column.dropna() if column is not None else pd.Series([], dtype=object)
    return str(values.iloc[0]) if len(values) else "val_uar"


def _selection_score(done: pd.DataFrame) -> float:
    """Mean over done folds of ``best_<select_metric>`` (higher is better; a loss is negated)."""
    metric = select_metric(done)
    sign = 1.0 if vocab.SELECTION_METRICS.get(metric, "max") == "max" else -1.0
    for column in (f"best_{metric}", metric):
        if column in done and done[column].notna().any():
            return sign * float(done[column].mean())
    return np.nan


def _selection_key(summary: dict) -> tuple[int, float]:
    score = summary["select_score"]
    return summary["folds_done"], -math.inf if pd.isna(score) else float(score)


def dataset_rank(dataset: str) -> tuple[int, str]:
    """Sort key: the paper's dataset order, unknown datasets after it by name."""
    order = list(paper.DATASETS)
    return (order.index(dataset), dataset) if dataset in order else (len(order), dataset)


def arch_rank(arch: str) -> tuple[int, str]:
    """Sort key: the paper's architecture order (Table 1), unknown ones after it by name."""
    order = paper.ARCH_ORDER
    return (order.index(arch), arch) if arch in order else (len(order), arch)


def _sort_groups(frame: pd.DataFrame) -> pd.DataFrame:
    order = sorted(range(len(frame)), key=lambda i: (dataset_rank(frame["dataset"].iat[i]),
                                                     arch_rank(frame["arch"].iat[i])))
    return frame.iloc[order].reset_index(drop=True)


def chosen_runs(runs: pd.DataFrame, agg: pd.DataFrame) -> pd.DataFrame:
    """The done fold runs of each group's chosen configuration."""
    chosen = agg[["dataset", "arch", "config_hash"]]
    merged = runs.merge(chosen, on=["dataset", "arch", "config_hash"], how="inner")
    return merged[fold_state(merged) == DONE].reset_index(drop=True)
