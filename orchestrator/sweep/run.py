"""Sweeps: Ray Tune + Optuna over dataset x architecture x fold, resumable, tracked in MLflow.

A sweep runs a search space (:mod:`orchestrator.sweep.space`); :mod:`orchestrator.sweep.stages`
says which stages its protocol runs (``docs/design.md``, "Protocol"):

**Search** (only when the space searches something), every study in **one** Tune run so that a free
slot always takes the next pending configuration of any study. With **nested selection** (the
default) there is one Optuna study per (dataset, arch, outer fold): it trains only on that fold's
training subjects (its validation slice is carved from them), scores a configuration by its
validation ``metric``, and its best trial *is* the fold's result (tagged ``selected`` in MLflow);
nothing is trained twice. With **pooled selection** there is one study per (dataset, arch), scored
by the mean validation metric over ``search.folds``, and the chosen configuration is then tested
on every fold in stage cv (optimistic; the tables say so). The searcher
(:class:`orchestrator.sweep.searcher.StudySearcher`) asks each study's TPE sampler for a
configuration, hands it out as one Tune trial per fold of its study and tells the study the result.
Failed configurations are ``FAIL`` (one that completes on a re-run is added to its study as a
``COMPLETE`` trial with ``retry_of``); ASHA-stopped ones ``PRUNED`` (ASHA keeps one bracket per study).
The studies live in an SQLite ``optuna.db`` in the sweep folder, seeded per study from the base seed.

**CV**: one Tune run over the grid dataset x arch x fold with a fixed configuration (nothing
searched) or each group's pooled choice; every fold gets the same budget.

Fault tolerance: a stable sweep name (the file stem by default); Tune storage that may be local, NFS
or ``s3://``; per-epoch checkpoints (``num_to_keep=1``) and ``FailureConfig`` retries from them;
re-running the same command, or ``mtcae sweep --resume NAME``, restores unfinished Tune runs with
``Tuner.restore(..., resume_errored=True)``; a trial whose MLflow run already holds its test metrics
is never trained again (MLflow, not Tune's snapshot, is the record of what finished), and a
configuration a dead driver had sampled is taken up again, never failed. ``state.json`` records
what each study chose. MLflow gets one experiment, a parent run for the sweep, a nested run per
group, and every trial's run nested under its group; runs are found by their ``trial_key`` tag.

Layout under the output folder (``--out``, default ``./mtcae_runs``)::

    cache/<dataset>/              preprocessing caches (``--cache``)
    ray_results/<sweep>/          Tune runs: search/, cv/  (``--storage``)
    sweeps/<sweep>/state.json     what each study chose, whether the results are complete
    sweeps/<sweep>/space.yaml     the search space the sweep started with
    sweeps/<sweep>/folds/         the folds every trial reads (one JSON file per dataset)
    sweeps/<sweep>/optuna.db      the Optuna studies
    mlflow.db, mlartifacts/       the embedded MLflow store (``--tracking-uri`` for a server)
    tables/<sweep>/               result tables (``orchestrator.pipeline``, ``mtcae table``)
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from orchestrator.sweep.caches import build_caches, check_folds, preflight, sweep_folds
from orchestrator.sweep.cluster import init_ray, is_local, pending_trials
from orchestrator.sweep.errors import SweepError, SweepInterrupted
from orchestrator.sweep.lock import sweep_lock
from orchestrator.sweep.parents import (
    Parents,
    close_parent_runs,
    close_trial_runs,
    create_parent_runs,
    log_folds,
    start_parent_runs,
)
from orchestrator.sweep.result import SweepResult
from orchestrator.sweep.space import SweepSpace, find_search_space
from orchestrator.sweep.space_file import load_search_space
from orchestrator.sweep.stages import make_run, run_stages, sweep_stages
from orchestrator.sweep.state import SweepState, join_storage, space_hash

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("mtcae_runs")


def _absolute_uri(uri: str) -> str:
    """Make a relative ``sqlite:///`` path absolute (trials run in their own working folders)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


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
    stages: Sequence[str] | None = None,
    reuse_actors: bool = False,
    check_caches: bool = True,
    progress_interval_s: float = 30.0,
    force_unlock: bool = False,
) -> SweepResult:
    """Run (or continue) a sweep: the stages its protocol needs (:func:`~orchestrator.sweep.stages.sweep_stages`).

    Re-running with the same name continues where the previous run stopped: a finished search and
    a finished CV stage are skipped, unfinished Tune runs are restored (errored trials are retried
    from their last checkpoint), trials MLflow holds a result for are not trained again.

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
        trainable: The trial function (default ``orchestrator.trial.entrypoints.train_trial``).
        address: Ray cluster address (``auto`` on a cluster node); default ``$RAY_ADDRESS`` or a
            local Ray instance.
        num_cpus: CPUs of a local Ray instance (default: all).
        gpus_per_trial: Override ``resources.gpu`` (fractions share a GPU).
        stages: Stages to run now (``search``, ``cv``); the default runs every stage of the plan.
        reuse_actors: Reuse trial actors (cheaper on CPU; keep False for GPU trials).
        check_caches: Run the pre-flight checks (caches, encoders, folds) before scheduling.
        progress_interval_s: Seconds between progress views while nothing finishes.
        force_unlock: Take the sweep's driver lock even though another driver holds it (a warning
            says both may now be running; :mod:`orchestrator.sweep.lock`).

    Returns:
        The :class:`SweepResult`; ``complete`` is False when trials failed for good.

    Raises:
        SweepError: Bad arguments, a missing cache, a changed search space under an existing name,
            or a search group in which no configuration completed.
        orchestrator.sweep.lock.SweepLockedError: Another driver runs this sweep (named in the message).
        orchestrator.sweep.space.SearchSpaceError: A malformed search space.
    """
    out = Path(out).expanduser().resolve()
    space, name = _resolve_space(space, name, out, resume)
    sweep_dir = out / "sweeps" / name
    with sweep_lock(sweep_dir, force_unlock=force_unlock):  # one driver per sweep
        state = _open_state(sweep_dir, space, name, resume)
        settings = _settings(state, out, storage, cache, tracking_uri, experiment, name)
        state.settings = settings
        data_root = _path_or_none(data_root)
        if check_caches:
            preflight(space, Path(settings["cache"]), data_root)
        parents = create_parent_runs(settings["tracking_uri"], settings["experiment"], name, space)
        start_parent_runs(settings["tracking_uri"], parents, space, state)
        state.save()
        logger.info("sweep %s: Tune storage %s, MLflow %s (experiment %r)", name,
                    join_storage(settings["storage"], name), settings["tracking_uri"], settings["experiment"])
        # Checkpointing every short epoch with num_to_keep=1 forces frequent experiment snapshots; Tune
        # warns about each, harmlessly (it only matters for huge experiments).
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no Tune boxes: progress.py draws the view
        logging.getLogger("ray.tune.tune").setLevel(logging.WARNING)  # no "wrote ... to <path>" per run
        stop = _Stop(lambda status: _close_runs(settings["tracking_uri"], parents, name, status))
        mode = None
        try:
            with stop.on_sigterm():
                mode = init_ray(address, num_cpus)
                stop.install()  # again: ray.init puts its own SIGTERM handler (a stack dump, then abort)
                result = _run(space, name, settings, sweep_dir, state, parents, trainable, gpus_per_trial,
                              mode, reuse_actors, progress_interval_s, data_root, check_caches, stages)
        except BaseException as err:  # no run stays RUNNING after a stop or a failure
            stopped = isinstance(err, (KeyboardInterrupt, SweepInterrupted))
            stop.join()
            _close_runs(settings["tracking_uri"], parents, name, "KILLED" if stopped else "FAILED")
            if stop.signum is not None and stopped:
                raise SweepInterrupted(
                    f"sweep {name!r} was stopped by {signal.Signals(stop.signum).name}; its MLflow runs are "
                    f"marked KILLED; re-run the same command, or `mtcae sweep --resume {name}`, to continue: "
                    "finished trials are not trained again", stop.signum) from None
            if isinstance(err, KeyboardInterrupt):
                raise SweepInterrupted(f"sweep {name!r} was interrupted; its MLflow runs are marked KILLED; "
                                       "re-run the same command to continue") from None
            raise
        else:  # Tune has returned: a trial run still RUNNING lost its worker after its last retry
            close_trial_runs(settings["tracking_uri"], parents.experiment_id, name, "FAILED")
        finally:
            if mode not in (None, "existing"):
                import ray

                ray.shutdown()
        return result


def _run(space: SweepSpace, name: str, settings: dict[str, str], sweep_dir: Path, state: SweepState,
         parents: Parents, trainable: Callable[[dict], Any] | str | None, gpus_per_trial: float | None,
         mode: str, reuse_actors: bool, progress_interval_s: float, data_root: Path | None,
         check_caches: bool, stages: Sequence[str] | None) -> SweepResult:
    """Caches, folds, then the stages of the plan (Ray is up, the parent runs exist)."""
    if data_root is not None:
        build_caches(space, Path(settings["cache"]), data_root)
        if check_caches:
            check_folds(space, Path(settings["cache"]))
    folds_files = sweep_folds(space, Path(settings["cache"]), sweep_dir) if check_caches else {}
    log_folds(settings["tracking_uri"], parents, folds_files, space)
    run = make_run(space, name, settings, sweep_dir, state, parents, trainable, gpus_per_trial,
                   local=is_local(mode), reuse_actors=reuse_actors,
                   progress_interval_s=progress_interval_s, folds_files=folds_files)
    with pending_trials(run.resources):
        return run_stages(run, parents, stages or sweep_stages(space))


def _close_runs(tracking_uri: str, parents: Parents, sweep: str, status: str) -> None:
    close_trial_runs(tracking_uri, parents.experiment_id, sweep, status)
    close_parent_runs(tracking_uri, parents, status)


class _Stop:
    """SIGTERM (``ray job stop``, a batch scheduler, ``kill``) stops the sweep the way Ctrl+C does.

    On the signal, a thread marks the sweep's RUNNING MLflow runs KILLED at once (``ray job stop``
    sends SIGKILL 3 s later, ``RAY_JOB_STOP_WAIT_TIME_S``), and the driver takes the SIGINT path:
    Tune's handler ends the Tune run after saving its state, or, outside a Tune run, a
    KeyboardInterrupt. A second SIGTERM interrupts at once.
    """

    def __init__(self, close: Callable[[str], None]) -> None:
        self.signum: int | None = None
        self._installed = False
        self._close = close
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def on_sigterm(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.getsignal(signal.SIGTERM)
        self.install()
        try:
            yield
        finally:
            if self._installed:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def install(self) -> None:
        """(Re)install the handler; only in the main thread (elsewhere signals cannot be caught)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        first = self.signum is None
        self.signum = signum
        logger.warning("%s received: stopping the sweep (its MLflow runs are marked KILLED now)",
                       signal.Signals(signum).name)
        if first:
            self._thread = threading.Thread(target=self._close_quietly, name="sweep-stop", daemon=True)
            self._thread.start()
        interrupt = signal.getsignal(signal.SIGINT)
        if not first or not callable(interrupt) or interrupt is signal.default_int_handler:
            raise KeyboardInterrupt
        interrupt(signal.SIGINT, frame)  # Tune's handler: end the run gracefully

    def _close_quietly(self) -> None:
        try:
            self._close("KILLED")
        except Exception:  # noqa: BLE001 - the driver closes them again once Tune has returned
            logger.exception("could not mark the sweep's runs KILLED yet")

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(timeout=30)


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
