"""A sweep's stages as Ray Tune runs: the search over every study at once, and the cross-validation.

What runs depends on the space (``docs/design.md``, "Protocol"):

* **searched, nested selection** (the default): one Tune run holds every study (one per dataset x
  arch x outer fold); each study's chosen trial *is* that fold's result, tagged ``selected`` in
  MLflow. Nothing is trained twice and there is no cv stage.
* **searched, pooled selection**: one Tune run holds every group's study (scored over the search
  folds), then the cv stage tests each group's choice on every fold (optimistic, labelled so).
* **nothing searched**: the cv stage alone, one trial per (dataset, arch, fold).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

import vocab
from orchestrator import tracking
from orchestrator.sweep import tune_state, tune_sync
from orchestrator.sweep.cell import FINAL_MARKER, CellContext, group_key, run_cell
from orchestrator.sweep.cluster import trial_resources
from orchestrator.sweep.errors import SweepError, SweepInterrupted
from orchestrator.sweep.links import RunLinks
from orchestrator.sweep.parents import Parents, log_fold_confusion, log_to_run
from orchestrator.sweep.progress import SweepProgress
from orchestrator.sweep.result import SweepResult, cv_rows, fold_means, rows_by_group
from orchestrator.sweep.searcher import (
    PerStudyScheduler,
    Study,
    StudySearcher,
    best_configuration,
    record_retried,
    sweep_studies,
    unfinished_studies,
)
from orchestrator.sweep.space import SweepSpace
from orchestrator.sweep.state import SweepState, join_storage
from orchestrator.sweep.study_plots import log_study_plots

logger = logging.getLogger(__name__)


@dataclass
class SweepRun:
    """Everything the stages share."""

    space: SweepSpace
    name: str
    storage: str
    sweep_dir: Path
    state: SweepState
    context: CellContext
    resources: dict[str, float]
    reuse_actors: bool
    progress_interval_s: float

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{(self.sweep_dir / 'optuna.db').resolve()}"

    def run_config(self, name: str, stage: str, folds_per_config: int = 1, total: int | None = None) -> Any:
        epochs = self.space.fixed.get("epochs")
        progress = SweepProgress(self.name, stage, self.space.metric, self.space.mode, folds_per_config,
                                 self.progress_interval_s, total=total, epochs=int(epochs) if epochs else None)
        context = dataclasses.replace(self.context, stage=stage)
        links = RunLinks(context.tracking_uri, context.experiment, lambda c: context.trial_config(c)["trial_key"])
        return tune.RunConfig(
            name=name,
            storage_path=join_storage(self.storage, self.name),
            failure_config=tune.FailureConfig(max_failures=self.space.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[progress, links],
            verbose=0,
        )

    def trainable(self, stage: str, chosen: Mapping[str, Mapping[str, Any]]) -> Any:
        context = dataclasses.replace(self.context, stage=stage, chosen=dict(chosen))
        return tune.with_resources(tune.with_parameters(run_cell, context=context), self.resources)


def _fit(path: str, trainable: Any, make_tuner: Callable[[], Any]) -> Any:
    """Restore the Tuner at ``path`` if it was started before (errored trials too), else start it."""
    tune_sync.install()  # Tune's upload racing its own save is not the user's problem (tune_sync)
    tune_state.usable_snapshot(path)  # a snapshot a killed driver left half uploaded is set aside
    if tune.Tuner.can_restore(path):
        logger.info("resuming Tune experiment %s", path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()
    return make_tuner().fit()


def _interrupted(run: SweepRun, what: str) -> SweepInterrupted:
    """The stop, with what actually finished: MLflow's record of trial results, not Tune's count."""
    client = tracking.make_client(run.context.tracking_uri)
    experiment = client.get_experiment_by_name(run.context.experiment)
    recorded = 0 if experiment is None else sum(
        tracking.has_result(r) for stage in vocab.STAGES
        for r in tracking.trial_runs(client, experiment.experiment_id, run.name, stage))
    return SweepInterrupted(
        f"sweep {run.name!r} was interrupted ({what}; {recorded} trial result(s) recorded in MLflow); "
        f"re-run the same command, or `mtcae sweep --resume {run.name}`, to continue: finished trials "
        "are not trained again")


# --------------------------------------------------------------------------------------- search


def _run_search(run: SweepRun, studies: Sequence[Study]) -> int:
    """Every study of the sweep in one Tune run, so no slot waits for another group's tail.

    Returns:
        How many trials failed for good (a re-run retries them from their last checkpoints).

    Raises:
        SweepInterrupted: Tune returned before every study finished (Ctrl+C / SIGINT).
    """
    space, search = run.space, run.space.search
    assert search is not None
    trainable = run.trainable(vocab.STAGE_SEARCH, {})
    context = dataclasses.replace(run.context, stage=vocab.STAGE_SEARCH)
    searcher = StudySearcher(
        studies, space.metric, space.mode, run.optuna_url,
        trial_key=lambda config: context.trial_config(config)["trial_key"],
        run_id=functools.partial(tracking.find_run_id, context.tracking_uri, context.experiment),
        max_per_study=search.max_concurrent,
        prune_without=FINAL_MARKER if search.scheduler else None,
    )
    scheduler = None
    if search.scheduler is not None:
        asha = search.scheduler
        epochs = int(space.fixed["epochs"])
        scheduler = PerStudyScheduler(lambda: tune.schedulers.ASHAScheduler(
            time_attr="epoch", max_t=epochs, grace_period=asha.grace_period,
            reduction_factor=asha.reduction_factor))
    total = sum(s.num_trials for s in studies)

    def make_tuner() -> Any:
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, search_alg=searcher, scheduler=scheduler,
                num_samples=total, max_concurrent_trials=space.resources.max_concurrent,
                reuse_actors=run.reuse_actors,
            ),
            run_config=run.run_config(vocab.STAGE_SEARCH, vocab.STAGE_SEARCH,
                                      max(len(s.folds) for s in studies), total=total),
        )

    logger.info("[%s] stage search: %d studies (%s selection), %d trials at most, in one Tune run",
                run.name, len(studies), space.selection, total)
    grid = _fit(join_storage(run.storage, run.name, vocab.STAGE_SEARCH), trainable, make_tuner)
    left = unfinished_studies(run.optuna_url, studies, space.mode)
    if left:
        raise _interrupted(run, f"{len(studies) - len(left)} of {len(studies)} studies finished")
    return grid.num_errors


def _search_stage(run: SweepRun, parents: Parents) -> None:
    """Run the search unless it finished before (without failed trials), then record each study's choice."""
    studies = sweep_studies(run.space)
    if run.state.search_done:
        logger.info("[%s] search already finished; not re-running it", run.name)
        return
    failed = _run_search(run, studies)
    record_retried(run.optuna_url, studies, run.space.mode, run.space.metric, functools.partial(
        tracking.recorded_result, run.context.tracking_uri, run.context.experiment))
    for study in studies:
        if run.space.selection == vocab.SELECTION_NESTED:
            run.state.studies[study.name] = _select_nested(run, parents, study)
        else:
            params, score, completed = best_configuration(run.optuna_url, study.name, run.space.mode)
            run.state.studies[study.name] = {"params": params, "score": score, "completed": completed}
            record_choice(run, parents.group_runs[study.group], run.state.studies[study.name])
    run.state.search_done = not failed
    run.state.save()
    log_study_plots(run.context.tracking_uri, parents.group_runs, run.optuna_url, studies, run.space.mode)
    if failed:
        logger.error("[%s] %d search trial(s) failed for good; re-run the same command (or mtcae sweep "
                     "--resume %s) to retry them from their last checkpoints", run.name, failed, run.name)


def _select_nested(run: SweepRun, parents: Parents, study: Study) -> dict[str, Any]:
    """The outer fold's result: its study's trial with the best validation score, read from MLflow.

    The chosen run is tagged ``selected=true`` (the others of its study ``false``); its test metrics
    are the fold's result. No trial is trained again. A study without a finished trial gives
    ``{"params": None}`` (that fold is missing from the results).
    """
    client = tracking.make_client(run.context.tracking_uri)
    runs = tracking.trial_runs(client, parents.experiment_id, run.name, vocab.STAGE_SEARCH,
                               dataset=study.dataset, arch=study.arch, fold=study.outer_fold)
    metric = run.space.metric
    done = sorted((r for r in runs if tracking.has_result(r)), key=lambda r: r.data.tags[tracking.TAG_TRIAL_KEY])
    if not done:
        logger.error("[%s] study %s: no trial finished; fold %s of %s/%s has no result", run.name,
                     study.name, study.outer_fold, study.dataset, study.arch)
        return {"params": None, "score": None, "completed": 0}
    best = max(done, key=lambda r: _selection_score(run.space, r))  # ties: the earliest configuration
    for r in runs:
        tracking.set_selected(client, r.info.run_id, r is best, vocab.SELECTION_NESTED)
    params = {k: _param_value(best.data.params.get(k)) for k in _searched_names(run.space, study)}
    params = {k: v for k, v in params.items() if v is not None}
    chosen = tracking.flat_metrics(best.data.metrics)
    choice = {"params": params, "score": chosen.get(f"best_{metric}"), "completed": len(done),
              "run_id": best.info.run_id, "trial_key": best.data.tags[tracking.TAG_TRIAL_KEY],
              "fold": study.outer_fold, "dataset": study.dataset, "arch": study.arch}
    choice.update({m: chosen[m] for m in ("test_uar", "test_war") if m in chosen})
    log_to_run(run.context.tracking_uri, parents.group_runs[study.group],
               params={f"fold{study.outer_fold}.{k}": v for k, v in params.items()},
               metrics={f"search_fold{study.outer_fold}_best_{metric}": choice["score"]})
    return choice


def _selection_score(space: SweepSpace, mlflow_run: Any) -> float:
    """A trial run's ``best_<metric>`` (else its last ``metric``), signed so that higher is better;
    -inf without one."""
    values = tracking.flat_metrics(mlflow_run.data.metrics)
    value = values.get(f"best_{space.metric}", values.get(space.metric, math.nan))
    return -math.inf if math.isnan(value) else (value if space.mode == "max" else -value)


def _searched_names(space: SweepSpace, study: Study) -> list[str]:
    return [p.name for p in space.group_params(study.dataset, study.arch)]


def _param_value(text: str | None) -> Any:
    """An MLflow param back to a number where it is one (params are stored as strings)."""
    if text is None:
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def record_choice(run: SweepRun, run_id: str, choice: Mapping[str, Any]) -> None:
    params = {f"chosen.{k}": v for k, v in choice["params"].items()}
    metrics = {f"search_best_{run.space.metric}": choice["score"],
               "search_configs_completed": choice["completed"]}
    log_to_run(run.context.tracking_uri, run_id, params, metrics)
    logger.info("[%s] chose %s (mean %s %.4f over search folds)", run.name, dict(choice["params"]),
                run.space.metric, choice["score"])


# ------------------------------------------------------------------------------------------- cv


def _run_cv(run: SweepRun, chosen: Mapping[str, Mapping[str, Any]]) -> Any:
    """The grid dataset x arch x fold with each group's configuration, in one Tune run.

    When the stage finished before, its results are read back without running anything (from a
    whole Tune snapshot; without one, the grid runs again and every trial reports its MLflow record).
    """
    space = run.space
    trainable = run.trainable(vocab.STAGE_CV, chosen)
    path = join_storage(run.storage, run.name, vocab.STAGE_CV)
    if run.state.complete and tune_state.usable_snapshot(path).session and tune.Tuner.can_restore(path):
        logger.info("[%s] stage cv already finished; reading its results", run.name)
        return tune.Tuner.restore(path, trainable=trainable).get_results()

    def make_tuner() -> Any:
        return tune.Tuner(
            trainable,
            param_space={
                "dataset": tune.grid_search(list(space.datasets)),
                "arch": tune.grid_search(list(space.archs)),
                "fold": tune.grid_search(list(space.folds)),
            },
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode,
                max_concurrent_trials=space.resources.max_concurrent,
                reuse_actors=run.reuse_actors,
            ),
            run_config=run.run_config(vocab.STAGE_CV, vocab.STAGE_CV, total=len(space.datasets)
                                      * len(space.archs) * len(space.folds)),
        )

    logger.info("[%s] stage cv: %d datasets x %d archs x %d folds", run.name, len(space.datasets),
                len(space.archs), len(space.folds))
    expected = len(space.datasets) * len(space.archs) * len(space.folds)
    grid = _fit(path, trainable, make_tuner)
    finished = grid.num_terminated + grid.num_errors
    if finished < expected:
        raise _interrupted(run, f"{finished} of {expected} cv trials finished")
    return grid


# ---------------------------------------------------------------------------------------- plan


def make_run(space: SweepSpace, name: str, settings: Mapping[str, str], sweep_dir: Path,
              state: SweepState, parents: Parents, trainable: Callable | str | None,
              gpus_per_trial: float | None, local: bool, reuse_actors: bool,
              progress_interval_s: float, folds_files: Mapping[str, str]) -> SweepRun:
    context = CellContext(
        trainable=trainable or DEFAULT_TRAINABLE, stage=vocab.STAGE_SEARCH, sweep=name,
        n_folds=space.n_folds, cache_root=settings["cache"], fixed=dict(space.fixed), chosen={},
        tracking_uri=settings["tracking_uri"], experiment=settings["experiment"],
        group_runs=dict(parents.group_runs), select_metric=space.metric, folds_files=dict(folds_files),
        selection=space.selection if space.search is not None else None,
    )
    resources = trial_resources(space, gpus_per_trial, local)
    logger.info("[%s] each trial requests %s", name, resources)
    return SweepRun(space, name, settings["storage"], sweep_dir, state, context, resources,
                reuse_actors, progress_interval_s)


def sweep_stages(space: SweepSpace) -> tuple[str, ...]:
    """The stages a space runs: search only (nested), search then cv (pooled), cv only (fixed)."""
    if space.search is None:
        return (vocab.STAGE_CV,)
    if space.selection == vocab.SELECTION_NESTED:
        return (vocab.STAGE_SEARCH,)
    return (vocab.STAGE_SEARCH, vocab.STAGE_CV)


def run_stages(run: SweepRun, parents: Parents, stages: Sequence[str]) -> SweepResult:
    """Run the requested stages of the space's plan (:func:`sweep_stages`); the sweep's result."""
    unknown = set(stages) - set(vocab.STAGES)
    if unknown:
        raise SweepError(f"unknown stage(s) {sorted(unknown)}; expected search and/or cv")
    plan = sweep_stages(run.space)
    if not set(stages) & set(plan):
        raise SweepError(f"this space runs only the stage(s) {', '.join(plan)} ({_plan_reason(run.space)}); "
                         f"asked for {', '.join(stages)}")
    result = SweepResult(run.name, run.sweep_dir, join_storage(run.storage, run.name),
                         run.context.tracking_uri, run.context.experiment, parents.experiment_id,
                         parents.sweep_run, selection=run.context.selection)
    if vocab.STAGE_SEARCH in plan and vocab.STAGE_SEARCH in stages:
        _search_stage(run, parents)
    result.chosen = dict(run.state.studies)
    if vocab.STAGE_SEARCH in plan and run.space.selection == vocab.SELECTION_NESTED:
        result.cv_rows = _nested_rows(run.state.studies, run.space)
        return _finish(run, parents, result)
    if vocab.STAGE_CV not in stages:
        return result
    missing = [s.name for s in sweep_studies(run.space) if run.state.studies.get(s.name, {}).get("params") is None]
    if missing:
        raise SweepError(f"stage cv needs every group's choice, and {', '.join(missing)} has none yet; run "
                         "stage search first")
    chosen = {key: dict(choice.get("params") or {}) for key, choice in run.state.studies.items()}
    result.cv_rows = cv_rows(_run_cv(run, chosen))
    return _finish(run, parents, result)


def _plan_reason(space: SweepSpace) -> str:
    if space.search is None:
        return "nothing is searched"
    if space.selection == vocab.SELECTION_NESTED:
        return "nested selection: the search's chosen trials are the results"
    return "pooled selection"


def _nested_rows(studies: Mapping[str, Mapping[str, Any]], space: SweepSpace) -> list[dict[str, Any]]:
    """One row per outer fold: its chosen trial's test metrics, or ``failed`` without one."""
    rows = []
    for study in sweep_studies(space):
        choice = studies.get(study.name, {})
        row = {"dataset": study.dataset, "arch": study.arch, "fold": study.outer_fold,
               "status": "done" if choice.get("run_id") else "failed"}
        row.update({k: choice[k] for k in ("test_uar", "test_war", "run_id") if k in choice})
        rows.append(row)
    return rows


def _finish(run: SweepRun, parents: Parents, result: SweepResult) -> SweepResult:
    if run.context.selection == vocab.SELECTION_POOLED:  # the tables label these results optimistic
        client = tracking.make_client(run.context.tracking_uri)
        for r in tracking.trial_runs(client, parents.experiment_id, run.name, vocab.STAGE_CV):
            client.set_tag(r.info.run_id, tracking.TAG_SELECTION, vocab.SELECTION_POOLED)
    failed = [r for r in result.cv_rows if r["status"] == "failed"]
    # A search trial that failed for good might still change its fold's choice once retried.
    searched = vocab.STAGE_SEARCH in sweep_stages(run.space)
    run.state.complete = not failed and (run.state.search_done or not searched)
    run.state.save()
    finish_parent_runs(run, parents, result)
    result.complete = run.state.complete
    if failed:
        logger.error("[%s] %d fold(s) have no result; re-run the same command (or mtcae sweep --resume "
                     "%s) to retry their trials from their last checkpoints", run.name, len(failed), run.name)
    return result


def finish_parent_runs(run: SweepRun, parents: Parents, result: SweepResult) -> None:
    """Log per-group fold means (and std) and the fold-aggregated confusion matrix on the group
    runs; close the parent runs."""
    uri = run.context.tracking_uri
    client = tracking.make_client(uri)
    protocol = run.context.selection or "fixed configuration"
    for (dataset, arch), rows in rows_by_group(result.cv_rows).items():
        metrics = fold_means(rows)
        ok = all(r["status"] == "done" for r in rows)
        group_run = parents.group_runs[group_key(dataset, arch)]
        if run.context.selection == vocab.SELECTION_NESTED:
            run_ids = [r["run_id"] for r in rows if r.get("run_id")]
        else:
            run_ids = [r.info.run_id for r in tracking.trial_runs(client, parents.experiment_id, run.name,
                                                                  vocab.STAGE_CV, dataset=dataset, arch=arch)
                       if tracking.has_result(r)]
        log_fold_confusion(client, group_run, run_ids, f"{dataset} / {arch} ({protocol})")
        if ok and run_ids:
            register_group_model(run, client, dataset, arch, run_ids)
        log_to_run(uri, group_run, metrics=metrics, status="FINISHED" if ok else "FAILED")
    log_to_run(uri, parents.sweep_run, status="FINISHED" if run.state.complete else "FAILED")


def register_group_model(run: SweepRun, client: Any, dataset: str, arch: str, run_ids: Sequence[str]) -> None:
    """Register the group's best result model (the fold result with the best validation score) as
    ``mtcae-<sweep>-<dataset>-<arch>`` with alias ``best``; a trainable that logs no model is skipped."""
    from orchestrator.trial.packaging import register_best_model

    metric = run.space.metric
    best = max((client.get_run(i) for i in run_ids), key=lambda r: _selection_score(run.space, r))
    try:
        version = register_best_model(run.context.tracking_uri, best.info.run_id, run.name, dataset, arch,
                                      int(best.data.tags["fold"]), metric,
                                      tracking.flat_metrics(best.data.metrics).get(f"best_{metric}"))
    except LookupError as err:
        logger.info("[%s] %s/%s: no model registered (%s)", run.name, dataset, arch, err)
        return
    logger.info("[%s] registered %s version %s (fold %s) as the best %s/%s model", run.name,
                version.name, version.version, best.data.tags["fold"], dataset, arch)


DEFAULT_TRAINABLE = "orchestrator.trial.entrypoints:train_trial"
