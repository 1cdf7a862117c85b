"""The two stages of a sweep as Ray Tune experiments: per-group search (stage A) and the final CV (stage B)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

import vocab
from orchestrator.sweep.cell import FINAL_MARKER, CellContext, group_key, run_cell
from orchestrator.sweep.cluster import trial_resources
from orchestrator.sweep.errors import SweepError, SweepInterrupted
from orchestrator.sweep.parents import Parents, log_to_run
from orchestrator.sweep.progress import SweepProgress
from orchestrator.sweep.result import SweepResult, cv_rows, rows_by_group
from orchestrator.sweep.searcher import FoldCVSearcher, best_configuration, group_seed
from orchestrator.sweep.space import SweepSpace
from orchestrator.sweep.state import SweepState, join_storage

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

    def run_config(self, name: str, stage: str, folds_per_config: int = 1) -> Any:
        progress = SweepProgress(self.name, stage, self.space.metric, self.space.mode,
                                 folds_per_config, self.progress_interval_s)
        return tune.RunConfig(
            name=name,
            storage_path=join_storage(self.storage, self.name),
            failure_config=tune.FailureConfig(max_failures=self.space.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[progress],
            verbose=0,
        )

    def trainable(self, stage: str, chosen: Mapping[str, Mapping[str, Any]]) -> Any:
        context = dataclasses.replace(self.context, stage=stage, chosen=dict(chosen))
        return tune.with_resources(tune.with_parameters(run_cell, context=context), self.resources)


def _fit(path: str, trainable: Any, make_tuner: Callable[[], Any], expected: int, sweep: str) -> Any:
    """Restore the Tuner at ``path`` if it was started before (errored trials too), else start it.

    Raises:
        SweepInterrupted: Tune stopped before all ``expected`` trials finished (Ctrl+C / SIGINT:
            Tune saves its state and returns early).
    """
    if tune.Tuner.can_restore(path):
        logger.info("resuming Tune experiment %s", path)
        grid = tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()
    else:
        grid = make_tuner().fit()
    finished = grid.num_terminated + grid.num_errors
    if finished < expected:
        raise SweepInterrupted(
            f"sweep {sweep!r} was interrupted ({finished} of {expected} trials of {path} finished); "
            f"re-run the same command, or `mtcae sweep --resume {sweep}`, to continue"
        )
    return grid


def _run_search_group(run: SweepRun, dataset: str, arch: str) -> dict[str, Any]:
    """Stage A of one group; returns ``{"params", "score", "completed"}``."""
    space, search = run.space, run.space.search
    assert search is not None
    key = group_key(dataset, arch)
    storage_url = f"sqlite:///{(run.sweep_dir / 'optuna.db').resolve()}"
    searcher = FoldCVSearcher(
        space.define_by_run(dataset, arch), search.folds, space.metric, space.mode,
        search.num_samples, storage_url, key, group_seed(search.seed, dataset, arch),
        prune_without=FINAL_MARKER if search.scheduler else None,
    )
    scheduler = None
    if search.scheduler is not None:
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="epoch", max_t=int(space.fixed["epochs"]),
            grace_period=search.scheduler.grace_period,
            reduction_factor=search.scheduler.reduction_factor,
        )
    trainable = run.trainable(vocab.STAGE_SEARCH, {})
    name = f"search-{dataset}-{arch}"

    def make_tuner() -> Any:
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, search_alg=searcher, scheduler=scheduler,
                num_samples=search.num_samples * len(search.folds),
                max_concurrent_trials=search.max_concurrent, reuse_actors=run.reuse_actors,
            ),
            run_config=run.run_config(name, vocab.STAGE_SEARCH, len(search.folds)),
        )

    logger.info("[%s] stage search, group %s: %d configurations x %d folds", run.name, key,
                search.num_samples, len(search.folds))
    _fit(join_storage(run.storage, run.name, name), trainable, make_tuner,
         search.num_samples * len(search.folds), run.name)
    params, score, completed = best_configuration(storage_url, key, space.mode)
    return {"done": True, "params": params, "score": score, "completed": completed}


def _run_cv(run: SweepRun, chosen: Mapping[str, Mapping[str, Any]]) -> Any:
    """Stage B: the grid dataset x arch x fold with the chosen configurations.

    When the stage finished before, its results are read back without running anything.
    """
    space = run.space
    trainable = run.trainable(vocab.STAGE_CV, chosen)
    path = join_storage(run.storage, run.name, vocab.STAGE_CV)
    if run.state.cv_done and tune.Tuner.can_restore(path):
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
            run_config=run.run_config(vocab.STAGE_CV, vocab.STAGE_CV),
        )

    logger.info("[%s] stage cv: %d datasets x %d archs x %d folds", run.name, len(space.datasets),
                len(space.archs), len(space.folds))
    expected = len(space.datasets) * len(space.archs) * len(space.folds)
    return _fit(path, trainable, make_tuner, expected, run.name)


def make_run(space: SweepSpace, name: str, settings: Mapping[str, str], sweep_dir: Path,
              state: SweepState, parents: Parents, trainable: Callable | str | None,
              gpus_per_trial: float | None, local: bool, reuse_actors: bool,
              progress_interval_s: float, folds_files: Mapping[str, str]) -> SweepRun:
    context = CellContext(
        trainable=trainable or DEFAULT_TRAINABLE, stage=vocab.STAGE_SEARCH, sweep=name,
        n_folds=space.n_folds, cache_root=settings["cache"], fixed=dict(space.fixed), chosen={},
        tracking_uri=settings["tracking_uri"], experiment=settings["experiment"],
        group_runs=dict(parents.group_runs), select_metric=space.metric, folds_files=dict(folds_files),
    )
    resources = trial_resources(space, gpus_per_trial, local)
    logger.info("[%s] each trial requests %s", name, resources)
    return SweepRun(space, name, settings["storage"], sweep_dir, state, context, resources,
                reuse_actors, progress_interval_s)


def run_stages(run: SweepRun, parents: Parents, stages: Sequence[str]) -> SweepResult:
    unknown = set(stages) - {vocab.STAGE_SEARCH, vocab.STAGE_CV}
    if unknown:
        raise SweepError(f"unknown stage(s) {sorted(unknown)}; expected search and/or cv")
    tracking_uri = run.context.tracking_uri
    result = SweepResult(run.name, run.sweep_dir, join_storage(run.storage, run.name), tracking_uri,
                         run.context.experiment, parents.experiment_id, parents.sweep_run)
    chosen = _search_stage(run, parents) if vocab.STAGE_SEARCH in stages else _chosen_so_far(run)
    result.chosen = {k: v for k, v in run.state.groups.items() if v.get("done")}
    if vocab.STAGE_CV not in stages:
        return result
    if chosen is None:
        raise SweepError("stage cv needs every group's search to be finished; run stage search first")
    grid = _run_cv(run, chosen)
    result.cv_rows = cv_rows(grid)
    failed = [r for r in result.cv_rows if r["status"] == "failed"]
    run.state.cv_done = not failed
    run.state.save()
    finish_parent_runs(run, parents, result)
    result.complete = run.state.cv_done
    if failed:
        logger.error("[%s] %d final-CV trials failed; re-run the same command (or mtcae sweep "
                     "--resume %s) to retry them from their last checkpoints", run.name, len(failed),
                     run.name)
    return result


def _search_stage(run: SweepRun, parents: Parents) -> dict[str, dict[str, Any]]:
    """Stage A for every group not finished yet; returns group key -> chosen searched values."""
    chosen: dict[str, dict[str, Any]] = {}
    for dataset, arch in run.space.groups():
        key = group_key(dataset, arch)
        if run.space.search is None:
            chosen[key] = {}
            continue
        if not run.state.groups.get(key, {}).get("done"):
            run.state.groups[key] = _run_search_group(run, dataset, arch)
            run.state.save()
            record_choice(run, parents.group_runs[key], run.state.groups[key])
        else:
            logger.info("[%s] search for %s already finished; not re-running it", run.name, key)
        chosen[key] = dict(run.state.groups[key]["params"])
    return chosen


def _chosen_so_far(run: SweepRun) -> dict[str, dict[str, Any]] | None:
    if run.space.search is None:
        return {group_key(d, a): {} for d, a in run.space.groups()}
    groups = run.state.groups
    if not all(groups.get(group_key(d, a), {}).get("done") for d, a in run.space.groups()):
        return None
    return {k: dict(v["params"]) for k, v in groups.items()}


def record_choice(run: SweepRun, run_id: str, choice: Mapping[str, Any]) -> None:
    params = {f"chosen.{k}": v for k, v in choice["params"].items()}
    metrics = {f"search_best_{run.space.metric}": choice["score"],
               "search_configs_completed": choice["completed"]}
    log_to_run(run.context.tracking_uri, run_id, params, metrics)
    logger.info("[%s] chose %s (mean %s %.4f over search folds)", run.name, dict(choice["params"]),
                run.space.metric, choice["score"])


def finish_parent_runs(run: SweepRun, parents: Parents, result: SweepResult) -> None:
    """Log per-group CV means on the group runs and close the parent runs when CV is complete."""
    uri = run.context.tracking_uri
    for (dataset, arch), rows in rows_by_group(result.cv_rows).items():
        metrics = {}
        for metric in ("test_uar", "test_war"):
            values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
            if values:
                metrics[f"cv_{metric}_mean"] = sum(values) / len(values)
        ok = all(r["status"] == "done" for r in rows)
        log_to_run(uri, parents.group_runs[group_key(dataset, arch)], metrics=metrics,
                    status="FINISHED" if ok else "FAILED")
    log_to_run(uri, parents.sweep_run, status="FINISHED" if run.state.cv_done else "FAILED")


DEFAULT_TRAINABLE = "orchestrator.trial.entrypoints:train_trial"
