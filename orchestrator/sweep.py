"""Sweeps: Ray Tune + Optuna over dataset x architecture x fold, resumable, tracked in MLflow.

A sweep runs a search space (:mod:`orchestrator.search_space`) in two stages:

**Stage A, search** (only when the space searches something). One Optuna study per (dataset, arch)
group, never one study across groups: TPE must not mix datasets, and Optuna cannot search inside a
grid. Each group runs its own Tuner, one group after another, so an optional ASHA scheduler only
ever compares trials of one group. A configuration's score is its **mean validation metric over the
search folds** (``search.folds``), never a test metric: the searcher
(:class:`orchestrator.searcher.FoldCVSearcher`) asks Optuna for a configuration, hands it out as one
ordinary Tune trial per search fold (the trainable trains one fold per call, so folds of one
configuration run in parallel and each is checkpointed and retried on its own), and tells Optuna the
mean of the folds' best validation values once every fold has finished. A fold that failed for good
fails the configuration (Optuna ``FAIL``); a fold stopped early by ASHA prunes it (``PRUNED``, so
TPE does not take a truncated value for a final one). The study lives in an SQLite ``optuna.db`` in
the sweep folder (``study_name = f"{dataset}__{arch}"``) with a sampler seed derived from the base
seed and the group key.

**Stage B, cv**: one Tuner over the grid dataset x arch x fold with each group's chosen configuration
(or the fixed one when nothing is searched), default ``BasicVariantGenerator``, no scheduler: every
fold gets the same budget.

Fault tolerance: a stable sweep name (the file stem by default); Tune storage that may be local, NFS
or ``s3://``; per-epoch checkpoints (``num_to_keep=1``) and ``FailureConfig`` retries from them;
re-running the same command, or ``mtcae sweep --resume NAME``, restores unfinished Tuners with
``Tuner.restore(..., resume_errored=True)``, and ``state.json`` in the sweep folder records finished
stages so they are never re-run. MLflow gets one experiment, a parent run for the sweep, a nested
run per group, and every trial's run nested under its group; runs are found by their ``trial_key``
tag, so a resumed trial continues its run instead of creating another.

Layout under the output folder (``--out``, default ``./mtcae_runs``)::

    cache/<dataset>/              preprocessing caches (``--cache``)
    ray_results/<sweep>/          Tune experiments: search-<dataset>-<arch>/, cv/  (``--storage``)
    sweeps/<sweep>/state.json     finished stages, chosen configurations
    sweeps/<sweep>/space.yaml     the search space the sweep started with
    sweeps/<sweep>/optuna.db      the Optuna studies
    mlflow.db, mlartifacts/       the embedded MLflow store (``--tracking-uri`` for a server)
    tables/<sweep>/               result tables, when orchestrator.tables is available
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.cell import (
    FINAL_MARKER,
    STAGE_CV,
    STAGE_SEARCH,
    CellContext,
    group_key,
    run_cell,
    short_hash,
)
from orchestrator.progress import SweepProgress
from orchestrator.search_space import (
    SweepSpace,
    find_search_space,
    load_search_space,
)
from orchestrator.searcher import FoldCVSearcher, best_configuration, group_seed, open_study
from orchestrator.sweep_errors import SweepError, SweepInterrupted

# Names other modules, tests and benchmarks import from here (several moved to their own modules;
# re-exported so ``orchestrator.sweep.X`` keeps working, old pickled Tune state included).
__all__ = [
    "DEFAULT_OUT", "DEFAULT_TRAINABLE", "FINAL_MARKER", "STAGE_CV", "STAGE_SEARCH",
    "CellContext", "FoldCVSearcher", "SweepError", "SweepInterrupted", "SweepProgress",
    "SweepResult", "SweepState", "best_configuration", "build_caches", "check_caches_exist",
    "create_parent_runs", "group_key", "group_seed", "init_ray", "mlflow_ui_command",
    "open_study", "run_cell", "run_demo", "run_sweep", "space_hash", "trial_resources",
]

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("mtcae_runs")
DEFAULT_TRAINABLE = "orchestrator.trainable:train_trial"
_STATE_VERSION = 1


# --------------------------------------------------------------------------------------------
# Sweep state


@dataclass
class SweepState:
    """``state.json`` of a sweep: which stages finished and what they chose.

    Attributes:
        path: The JSON file.
        space_hash: Hash of the validated search space the sweep started with.
        settings: Storage, tracking URI, experiment and cache the sweep runs with.
        groups: Group key -> ``{"done", "params", "score", "completed"}`` of stage A.
        cv_done: Whether stage B finished without errors.
    """

    path: Path
    space_hash: str
    settings: dict[str, str] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    cv_done: bool = False

    @classmethod
    def load(cls, path: Path) -> SweepState | None:
        """Read the state, or None when the sweep never started."""
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(path, raw["space_hash"], raw.get("settings", {}), raw.get("groups", {}),
                   bool(raw.get("cv_done", False)))

    def save(self) -> None:
        """Write atomically (tmp + rename)."""
        body = {"version": _STATE_VERSION, "space_hash": self.space_hash, "settings": self.settings,
                "groups": self.groups, "cv_done": self.cv_done}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.path)


def space_hash(space: SweepSpace) -> str:
    """Hash of what a search space means (comments and layout do not count)."""
    fields = dataclasses.asdict(space)
    for volatile in ("path", "name", "description", "resources", "max_failures"):
        fields.pop(volatile)
    return short_hash(fields, 16)


# --------------------------------------------------------------------------------------------
# Results


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
        chosen: Group key -> ``{"params", "score", "completed"}`` (searched groups only).
        cv_rows: One dict per final-CV trial: dataset, arch, fold, status, test_uar, test_war, ...
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
    chosen: dict[str, dict[str, Any]] = field(default_factory=dict)
    cv_rows: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    tables_dir: Path | None = None
    tables_markdown: str = ""

    def summary(self) -> str:
        """Human-readable: per-group final CV means, then where everything lives."""
        lines = [f"sweep {self.name}: {'complete' if self.complete else 'INCOMPLETE'}"]
        for key, choice in self.chosen.items():
            lines.append(f"  chosen for {key}: {choice['params']} (mean {choice['score']:.4f} over "
                         f"search folds, {choice['completed']} configurations completed)")
        lines.extend(_cv_means(self.cv_rows))
        lines.append(f"Tune results:      {self.storage}")
        lines.append(f"sweep state:       {self.sweep_dir}")
        lines.append(f"MLflow:            {self.tracking_uri}  experiment {self.experiment!r} "
                     f"(id {self.experiment_id}), sweep run {self.sweep_run_id}")
        lines.append(f"open the MLflow UI: {mlflow_ui_command(self.tracking_uri)}")
        if self.tables_dir:
            lines.append(f"tables:            {self.tables_dir}")
        return "\n".join(lines)


def _cv_means(rows: Sequence[Mapping[str, Any]]) -> list[str]:
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


# --------------------------------------------------------------------------------------------
# Environment: Ray, resources, storage, MLflow parents, caches


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to a cluster (``address``, else ``$RAY_ADDRESS``) or start a local Ray instance.

    Args:
        address: ``auto`` or ``host:port`` of a cluster; ``local`` forces a new local instance.
        num_cpus: CPUs of a local instance (default: all).

    Returns:
        ``"existing"`` when Ray was already initialised (the caller leaves it running),
        ``"cluster"`` or ``"local"`` when this call connected or started it (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address)
        return "cluster"
    # Ray 2.60 turns token auth on for local instances; a single-machine sweep needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local" if address else None, num_cpus=num_cpus, include_dashboard=False)
    return "local"


def trial_resources(space: SweepSpace, gpus_per_trial: float | None, local: bool) -> dict[str, float]:
    """CPU/GPU request of one trial.

    ``gpu: auto`` asks for one GPU when the cluster has GPUs now or its launcher config offers GPU
    workers (an autoscaling cluster starts without any); ``gpus_per_trial`` overrides the space. On
    a local Ray instance the CPU request is capped at the machine's CPUs so trials can start at all.
    """
    import ray

    available = ray.cluster_resources()
    gpu = space.resources.gpu if gpus_per_trial is None else gpus_per_trial
    if gpu == "auto":
        gpu = 1.0 if available.get("GPU", 0) > 0 or _autoscaler_offers_gpus() else 0.0
        if not gpu and not local:
            logger.warning("the cluster has no GPUs now and its autoscaler offers none: trials run "
                           "on CPUs (pass --gpus-per-trial 1 to wait for GPU workers)")
    cpu = space.resources.cpu
    if local and available.get("CPU", 0) > 0:
        cpu = min(cpu, float(available["CPU"]))
    return {"cpu": cpu, "gpu": float(gpu)}


def _autoscaler_offers_gpus(config: Path = Path("~/ray_bootstrap_config.yaml")) -> bool:
    """Whether the cluster launcher's config on this head node has a node type with GPUs.

    An autoscaling cluster starts with no GPU workers; the launcher writes its config (node types
    with their resources filled in) to ``~/ray_bootstrap_config.yaml`` on the head.
    """
    import yaml

    path = config.expanduser()
    if not path.is_file():
        return False
    try:
        types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types", {})
    except (OSError, yaml.YAMLError):
        return False
    return any((t.get("resources") or {}).get("GPU", 0) > 0 for t in types.values())


def _join_storage(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _absolute_uri(uri: str) -> str:
    """Make a relative ``sqlite:///`` path absolute (trials run in their own working folders)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


@dataclass(frozen=True)
class _Parents:
    experiment_id: str
    sweep_run: str
    group_runs: dict[str, str]


def create_parent_runs(tracking_uri: str, experiment: str, sweep: str, space: SweepSpace) -> _Parents:
    """The experiment, the sweep's parent run and one nested run per group (all idempotent)."""
    from orchestrator import tracking

    experiment_id = tracking.ensure_experiment(tracking_uri, experiment)
    sweep_run = tracking.get_or_create_run(
        tracking_uri, experiment_id, key=f"{sweep}/sweep", run_name=sweep,
        tags={"stage": "sweep", "sweep": sweep, "space": space.path.name},
    )
    groups = {}
    for dataset, arch in space.groups():
        groups[group_key(dataset, arch)] = tracking.get_or_create_run(
            tracking_uri, experiment_id, key=f"{sweep}/group/{dataset}/{arch}",
            run_name=f"{dataset}-{arch}", parent_run_id=sweep_run,
            tags={"stage": "group", "sweep": sweep, "dataset": dataset, "arch": arch},
        )
    return _Parents(experiment_id, sweep_run, groups)


def _log_to_run(tracking_uri: str, run_id: str, params: Mapping[str, Any] = (),
                metrics: Mapping[str, float] = (), status: str | None = None) -> None:
    """Log params (skipping ones already set), metrics and a status on a parent run."""
    from mlflow.entities import Metric, Param

    from orchestrator import tracking

    client = tracking.make_client(tracking_uri)
    run = client.get_run(run_id)
    new = [Param(str(k), str(v)[:6000]) for k, v in dict(params).items() if str(k) not in run.data.params]
    now = int(time.time() * 1000)
    values = [Metric(str(k), float(v), now, 0) for k, v in dict(metrics).items()]
    if new or values:
        client.log_batch(run_id, params=new, metrics=values)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    elif status:
        client.set_terminated(run_id, status=status)


def check_caches_exist(space: SweepSpace, cache_root: Path, data_root: Path | None) -> None:
    """Fail early when a dataset has no preprocessing cache and no raw videos to build one from.

    Raises:
        SweepError: Naming the dataset, the expected cache folder and how to create it.
    """
    for dataset in space.datasets:
        target = cache_root / dataset
        if data_root is not None:
            if not (data_root / dataset).is_dir():
                raise SweepError(f"raw videos for dataset {dataset!r} not found at {data_root / dataset} "
                                 "(--data-root must hold one folder per dataset)")
        elif not (target / "manifest.csv").is_file():
            raise SweepError(
                f"no preprocessing cache for dataset {dataset!r} at {target} (manifest.csv missing); "
                f"pass --data-root DIR with the raw videos under DIR/{dataset}, or run "
                f"`mtcae preprocess --dataset {dataset} --root RAW --out {target}` first"
            )


def build_caches(space: SweepSpace, cache_root: Path, data_root: Path) -> None:
    """Preprocess ``<data_root>/<dataset>`` into ``<cache_root>/<dataset>`` for every dataset.

    Clips already cached with the same settings are skipped, so this is cheap on a re-run; with Ray
    initialised the clips are processed as Ray tasks across the cluster.

    Raises:
        SweepError: The cache holds other settings, or no clip of a dataset is usable.
    """
    from orchestrator import preprocess

    known = {f.name for f in dataclasses.fields(preprocess.PreprocessSettings)}
    settings = preprocess.PreprocessSettings(**{k: v for k, v in space.preprocess.items() if k in known})
    for dataset in space.datasets:
        target = cache_root / dataset
        logger.info("preprocessing %s from %s into %s", dataset, data_root / dataset, target)
        try:
            summary = preprocess.run_preprocess(dataset, data_root / dataset, target, settings,
                                                workers=space.preprocess.get("workers"))
        except preprocess.CacheSettingsError as err:
            raise SweepError(f"{err} (use another --cache, or delete {target} to rebuild it)") from err
        logger.info("%s", summary.format())
        if summary.usable == 0:
            raise SweepError(f"no usable clip of dataset {dataset!r} in {target}; see its manifest.csv")


# --------------------------------------------------------------------------------------------
# Stages


@dataclass
class _Run:
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
            storage_path=_join_storage(self.storage, self.name),
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


def _run_search_group(run: _Run, dataset: str, arch: str) -> dict[str, Any]:
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
    trainable = run.trainable(STAGE_SEARCH, {})
    name = f"search-{dataset}-{arch}"

    def make_tuner() -> Any:
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=space.metric, mode=space.mode, search_alg=searcher, scheduler=scheduler,
                num_samples=search.num_samples * len(search.folds),
                max_concurrent_trials=search.max_concurrent, reuse_actors=run.reuse_actors,
            ),
            run_config=run.run_config(name, STAGE_SEARCH, len(search.folds)),
        )

    logger.info("[%s] stage search, group %s: %d configurations x %d folds", run.name, key,
                search.num_samples, len(search.folds))
    _fit(_join_storage(run.storage, run.name, name), trainable, make_tuner,
         search.num_samples * len(search.folds), run.name)
    params, score, completed = best_configuration(storage_url, key, space.mode)
    return {"done": True, "params": params, "score": score, "completed": completed}


def _run_cv(run: _Run, chosen: Mapping[str, Mapping[str, Any]]) -> Any:
    """Stage B: the grid dataset x arch x fold with the chosen configurations.

    When the stage finished before, its results are read back without running anything.
    """
    space = run.space
    trainable = run.trainable(STAGE_CV, chosen)
    path = _join_storage(run.storage, run.name, "cv")
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
            run_config=run.run_config("cv", STAGE_CV),
        )

    logger.info("[%s] stage cv: %d datasets x %d archs x %d folds", run.name, len(space.datasets),
                len(space.archs), len(space.folds))
    expected = len(space.datasets) * len(space.archs) * len(space.folds)
    return _fit(path, trainable, make_tuner, expected, run.name)


def _cv_rows(results: Any) -> list[dict[str, Any]]:
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


# --------------------------------------------------------------------------------------------
# Entry points


def run_sweep(
    space: SweepSpace | str | Path | None = None,
    *,
    out: Path | str = DEFAULT_OUT,
    name: str | None = None,
    resume: bool = False,
    storage: str | None = None,
    cache: Path | str | None = None,
    data_root: Path | str | None = None,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    trainable: Callable[[dict], Any] | str | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    gpus_per_trial: float | None = None,
    stages: Sequence[str] = (STAGE_SEARCH, STAGE_CV),
    reuse_actors: bool = False,
    check_caches: bool = True,
    write_tables: bool = True,
    progress_interval_s: float = 30.0,
) -> SweepResult:
    """Run (or continue) a sweep: stage A per-group search, stage B final CV, then the tables.

    Re-running with the same name continues where the previous run stopped: finished groups and a
    finished CV stage are skipped, unfinished Tune experiments are restored (errored trials are
    retried from their last checkpoint), MLflow runs are reused.

    Args:
        space: A :class:`SweepSpace`, a YAML path or a shipped space name (``smoke``); may be None
            with ``resume`` (the sweep's saved ``space.yaml`` is used).
        out: Output folder; caches, Tune results, sweep state, MLflow store and tables go under it.
        name: Sweep name (default: the space file stem).
        resume: Require an existing sweep of this name (``mtcae sweep --resume NAME``).
        storage: Tune storage root: local path, NFS path or ``s3://bucket/prefix``
            (default ``<out>/ray_results``).
        cache: Root of the per-dataset preprocessing caches (default ``<out>/cache``).
        data_root: Raw videos, one folder per dataset; caches are (re)built from them when given.
        tracking_uri: MLflow URI (default ``$MLFLOW_TRACKING_URI`` or ``sqlite:///<out>/mlflow.db``).
        experiment: MLflow experiment (default: the sweep name).
        trainable: The trial function (default ``orchestrator.trainable.train_trial``).
        address: Ray cluster address (``auto`` on a cluster node); default ``$RAY_ADDRESS`` or a
            local Ray instance.
        num_cpus: CPUs of a local Ray instance (default: all).
        gpus_per_trial: Override ``resources.gpu`` (fractions share a GPU).
        stages: Stages to run now (``search``, ``cv``); the default runs both.
        reuse_actors: Reuse trial actors (cheaper on CPU; keep False for GPU trials).
        check_caches: Fail early when a dataset has no preprocessing cache.
        write_tables: Write the result tables at the end when ``orchestrator.tables`` exists.
        progress_interval_s: Seconds between progress views while nothing finishes.

    Returns:
        The :class:`SweepResult`; ``complete`` is False when trials failed for good.

    Raises:
        SweepError: Bad arguments, a missing cache, a changed search space under an existing name,
            or a search group in which no configuration completed.
        orchestrator.search_space.SearchSpaceError: A malformed search space.
    """
    out = Path(out).expanduser().resolve()
    space, name = _resolve_space(space, name, out, resume)
    sweep_dir = out / "sweeps" / name
    state = _open_state(sweep_dir, space, name, resume)
    settings = _settings(state, out, storage, cache, tracking_uri, experiment, name)
    state.settings = settings
    data_root = _path_or_none(data_root)
    if check_caches:
        check_caches_exist(space, Path(settings["cache"]), data_root)
    parents = create_parent_runs(settings["tracking_uri"], settings["experiment"], name, space)
    _start_parent_runs(settings["tracking_uri"], parents, space, state)
    state.save()
    logger.info("sweep %s: Tune storage %s, MLflow %s (experiment %r)", name,
                _join_storage(settings["storage"], name), settings["tracking_uri"], settings["experiment"])
    # Checkpointing every short epoch with num_to_keep=1 forces frequent experiment snapshots; Tune
    # warns about each, harmlessly (it only matters for huge experiments).
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    mode = init_ray(address, num_cpus)
    try:
        if data_root is not None:
            build_caches(space, Path(settings["cache"]), data_root)
        run = _make_run(space, name, settings, sweep_dir, state, parents, trainable, gpus_per_trial,
                        local=_is_local(mode), reuse_actors=reuse_actors,
                        progress_interval_s=progress_interval_s)
        result = _run_stages(run, parents, stages)
    finally:
        if mode != "existing":
            import ray

            ray.shutdown()
    if result.complete and write_tables:
        _write_tables(result, out)
    return result


def _is_local(mode: str) -> bool:
    """Whether trials run on this machine only (a local instance, or an existing one without nodes
    elsewhere)."""
    if mode != "existing":
        return mode == "local"
    import ray

    if Path("~/ray_bootstrap_config.yaml").expanduser().exists():  # a launcher cluster's head
        return False
    return len({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}) <= 1


def _resolve_space(
    space: SweepSpace | str | Path | None, name: str | None, out: Path, resume: bool
) -> tuple[SweepSpace, str]:
    if space is None:
        if not (resume and name):
            raise SweepError("give a search space file, or --resume NAME to continue a sweep")
        saved = out / "sweeps" / name / "space.yaml"
        if not saved.is_file():
            raise SweepError(f"no sweep named {name!r} under {out / 'sweeps'} to resume")
        return load_search_space(saved), name
    if not isinstance(space, SweepSpace):
        space = load_search_space(find_search_space(space))
    name = name or space.name
    if not name or "/" in name or name.startswith("."):
        raise SweepError(f"invalid sweep name {name!r}: use letters, digits, '-', '_' or '.'")
    return space, name


def _open_state(sweep_dir: Path, space: SweepSpace, name: str, resume: bool) -> SweepState:
    """Load the sweep's state (checking the space did not change) or start a new one."""
    digest = space_hash(space)
    state = SweepState.load(sweep_dir / "state.json")
    if state is None:
        if resume:
            raise SweepError(f"no sweep named {name!r} in {sweep_dir.parent} to resume")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(space.path, sweep_dir / "space.yaml")
        return SweepState(sweep_dir / "state.json", digest)
    if state.space_hash != digest:
        raise SweepError(
            f"sweep {name!r} was started with a different search space ({sweep_dir / 'space.yaml'}); "
            f"a running sweep's space cannot change: pass --name NEW to start another sweep"
        )
    logger.info("continuing sweep %s (%s)", name, sweep_dir)
    return state


def _settings(state: SweepState, out: Path, storage: str | None, cache: Path | str | None,
              tracking_uri: str | None, experiment: str | None, name: str) -> dict[str, str]:
    """Explicit arguments win; a resumed sweep keeps what it started with; then the defaults."""
    from orchestrator import tracking

    old = state.settings
    if storage and "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    if tracking_uri is None and "tracking_uri" in old and not os.environ.get("MLFLOW_TRACKING_URI"):
        tracking_uri = old["tracking_uri"]
    return {
        "storage": storage or old.get("storage") or str(out / "ray_results"),
        "cache": str(Path(cache).expanduser().resolve()) if cache else old.get("cache") or str(out / "cache"),
        "tracking_uri": _absolute_uri(tracking.resolve_tracking_uri(tracking_uri, out)),
        "experiment": experiment or old.get("experiment") or name,
    }


def _path_or_none(path: Path | str | None) -> Path | None:
    return Path(path).expanduser().resolve() if path is not None else None


def _start_parent_runs(tracking_uri: str, parents: _Parents, space: SweepSpace, state: SweepState) -> None:
    params = {"space": space.path.name, "datasets": ",".join(space.datasets),
              "archs": ",".join(space.archs), "n_folds": space.n_folds,
              "folds": ",".join(map(str, space.folds)), "metric": space.metric,
              "searched": ",".join(p.name for p in (space.search.params if space.search else ()))}
    params.update({f"fixed.{k}": v for k, v in space.fixed.items()})
    status = None if state.cv_done else "RUNNING"
    _log_to_run(tracking_uri, parents.sweep_run, params, status=status)
    for run_id in parents.group_runs.values():
        _log_to_run(tracking_uri, run_id, status=status)


def _make_run(space: SweepSpace, name: str, settings: Mapping[str, str], sweep_dir: Path,
              state: SweepState, parents: _Parents, trainable: Callable | str | None,
              gpus_per_trial: float | None, local: bool, reuse_actors: bool,
              progress_interval_s: float) -> _Run:
    context = CellContext(
        trainable=trainable or DEFAULT_TRAINABLE, stage=STAGE_SEARCH, sweep=name,
        n_folds=space.n_folds, cache_root=settings["cache"], fixed=dict(space.fixed), chosen={},
        tracking_uri=settings["tracking_uri"], experiment=settings["experiment"],
        group_runs=dict(parents.group_runs),
    )
    resources = trial_resources(space, gpus_per_trial, local)
    logger.info("[%s] each trial requests %s", name, resources)
    return _Run(space, name, settings["storage"], sweep_dir, state, context, resources,
                reuse_actors, progress_interval_s)


def _run_stages(run: _Run, parents: _Parents, stages: Sequence[str]) -> SweepResult:
    unknown = set(stages) - {STAGE_SEARCH, STAGE_CV}
    if unknown:
        raise SweepError(f"unknown stage(s) {sorted(unknown)}; expected search and/or cv")
    tracking_uri = run.context.tracking_uri
    result = SweepResult(run.name, run.sweep_dir, _join_storage(run.storage, run.name), tracking_uri,
                         run.context.experiment, parents.experiment_id, parents.sweep_run)
    chosen = _search_stage(run, parents) if STAGE_SEARCH in stages else _chosen_so_far(run)
    result.chosen = {k: v for k, v in run.state.groups.items() if v.get("done")}
    if STAGE_CV not in stages:
        return result
    if chosen is None:
        raise SweepError("stage cv needs every group's search to be finished; run stage search first")
    grid = _run_cv(run, chosen)
    result.cv_rows = _cv_rows(grid)
    failed = [r for r in result.cv_rows if r["status"] == "failed"]
    run.state.cv_done = not failed
    run.state.save()
    _finish_parent_runs(run, parents, result)
    result.complete = run.state.cv_done
    if failed:
        logger.error("[%s] %d final-CV trials failed; re-run the same command (or mtcae sweep "
                     "--resume %s) to retry them from their last checkpoints", run.name, len(failed),
                     run.name)
    return result


def _search_stage(run: _Run, parents: _Parents) -> dict[str, dict[str, Any]]:
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
            _record_choice(run, parents.group_runs[key], run.state.groups[key])
        else:
            logger.info("[%s] search for %s already finished; not re-running it", run.name, key)
        chosen[key] = dict(run.state.groups[key]["params"])
    return chosen


def _chosen_so_far(run: _Run) -> dict[str, dict[str, Any]] | None:
    if run.space.search is None:
        return {group_key(d, a): {} for d, a in run.space.groups()}
    groups = run.state.groups
    if not all(groups.get(group_key(d, a), {}).get("done") for d, a in run.space.groups()):
        return None
    return {k: dict(v["params"]) for k, v in groups.items()}


def _record_choice(run: _Run, run_id: str, choice: Mapping[str, Any]) -> None:
    params = {f"chosen.{k}": v for k, v in choice["params"].items()}
    metrics = {f"search_best_{run.space.metric}": choice["score"],
               "search_configs_completed": choice["completed"]}
    _log_to_run(run.context.tracking_uri, run_id, params, metrics)
    logger.info("[%s] chose %s (mean %s %.4f over search folds)", run.name, dict(choice["params"]),
                run.space.metric, choice["score"])


def _finish_parent_runs(run: _Run, parents: _Parents, result: SweepResult) -> None:
    """Log per-group CV means on the group runs and close the parent runs when CV is complete."""
    uri = run.context.tracking_uri
    for (dataset, arch), rows in _rows_by_group(result.cv_rows).items():
        metrics = {}
        for metric in ("test_uar", "test_war"):
            values = [r[metric] for r in rows if isinstance(r.get(metric), (int, float))]
            if values:
                metrics[f"cv_{metric}_mean"] = sum(values) / len(values)
        ok = all(r["status"] == "done" for r in rows)
        _log_to_run(uri, parents.group_runs[group_key(dataset, arch)], metrics=metrics,
                    status="FINISHED" if ok else "FAILED")
    _log_to_run(uri, parents.sweep_run, status="FINISHED" if run.state.cv_done else "FAILED")


def _rows_by_group(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["arch"]), []).append(row)
    return groups


def _write_tables(result: SweepResult, out: Path) -> None:
    """Write the sweep's tables with :mod:`orchestrator.tables` (when that module exists)."""
    try:
        tables = importlib.import_module("orchestrator.tables")
    except ImportError:
        logger.info("orchestrator.tables is not available; skipping the tables")
        return
    target = out / "tables" / result.name
    report = tables.make_tables(result.tracking_uri, result.experiment, sweep=result.name,
                                stage=STAGE_CV, export_dir=target, formats="all")
    result.tables_dir, result.tables_markdown = target, report.markdown


def run_demo(out: Path | str = DEFAULT_OUT, num_cpus: int | None = None,
             trainable: Callable[[dict], Any] | str | None = None) -> SweepResult:
    """The embedded default: demo data -> preprocess -> ``smoke.yaml`` sweep -> tables, locally.

    Args:
        out: Output folder (demo videos in ``<out>/data/demo``, everything else as in
            :func:`run_sweep`).
        num_cpus: CPUs of the local Ray instance (default: all).
        trainable: The trial function (default ``orchestrator.trainable.train_trial``).
    """
    from orchestrator import demo_data

    out = Path(out).expanduser().resolve()
    raw = out / "data" / "demo"
    if not raw.is_dir():
        logger.info("writing the synthetic demo dataset to %s", raw)
        partial = raw.with_name(raw.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        demo_data.generate_demo_dataset(partial)
        partial.rename(raw)  # a dataset that exists is complete
    return run_sweep(find_search_space("smoke"), out=out, data_root=out / "data",
                     num_cpus=num_cpus, trainable=trainable, address="local")
