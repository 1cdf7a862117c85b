"""Sweep benchmarks: per-trial scheduling overhead and the smoke sweep's wall time.

1. **Per-trial overhead** of Ray Tune on a trivial trainable (one report, no work), with a fresh
   actor per trial (the sweep's default: a clean process, and a clean CUDA context on GPUs) and
   with actor reuse, interleaved (fresh, reuse, fresh, reuse), best round of each. The overhead is
   the wall time of a Tuner of ``n`` trials per trial slot, ``wall * slots / n`` (the Tuner's fixed
   start-up included, which understates the gain of reuse); the marginal cost per trial,
   ``(wall_n - wall_small) * slots / (n - n_small)``, is recorded too (with reuse it is below the
   noise of a shared machine and may come out slightly negative). ``ratio`` = overhead without
   reuse / overhead with reuse: what a sweep of many short CPU trials gains from ``reuse_actors``.
   Target 2.0.
2. **Smoke sweep wall time**: ``search_spaces/smoke.yaml`` through :func:`orchestrator.sweep.run.run_sweep`
   on a local Ray instance (nested selection: 2 architectures x 2 outer folds x 2 configurations,
   8 trials in one Tune run). Quick mode
   runs the sweep machinery with a trivial trainable; the full run uses the real trainable on the
   demo data, the way ``mtcae demo`` does (data generation and preprocessing timed separately).
   ``ratio`` = budget / wall time, target 1.0 (budget: 3 minutes quick, 10 minutes full).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import vocab
from benchmarks.common import Result, make_result

log = logging.getLogger(__name__)

SLOTS = 2  # concurrent trials (one CPU each) on the 2-core reference machine
OVERHEAD_TARGET = 2.0
QUICK_BUDGET_S = 180.0
FULL_BUDGET_S = 600.0


def trivial_trial(config: dict) -> None:
    """A Tune function trainable that does no work: one report."""
    from ray import tune

    tune.report({"score": float(config["i"])})


def smoke_trial(config: dict) -> None:
    """A trivial trainable honouring the sweep's trial contract (epochs, val metric, test metric)."""
    from ray import tune

    for epoch in range(int(config["epochs"])):
        metrics = {"epoch": epoch, "val_uar": 0.5 + 0.01 * epoch}
        if epoch == config["epochs"] - 1:
            metrics["test_uar"] = metrics["test_war"] = 0.5
        tune.report(metrics)


def tuner_wall(n_trials: int, reuse_actors: bool, storage: Path) -> float:
    """Seconds for a Tuner to run ``n_trials`` trivial trials on ``SLOTS`` one-CPU slots."""
    from ray import tune

    tuner = tune.Tuner(
        tune.with_resources(trivial_trial, {"cpu": 1}),
        param_space={"i": tune.grid_search(list(range(n_trials)))},
        tune_config=tune.TuneConfig(reuse_actors=reuse_actors, max_concurrent_trials=SLOTS),
        run_config=tune.RunConfig(storage_path=str(storage), name=f"overhead-{reuse_actors}-{n_trials}",
                                  verbose=0),
    )
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    if results.errors:
        raise RuntimeError(f"trivial trials failed: {results.errors[0]}")
    return wall


def measure_overhead(n_trials: int, n_small: int, rounds: int, storage: Path) -> dict[str, Any]:
    """Per-trial overhead with and without actor reuse, interleaved; best round of each side."""
    slot: dict[bool, list[float]] = {False: [], True: []}
    marginal: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for reuse in (False, True):
            big = tuner_wall(n_trials, reuse, storage)
            small = tuner_wall(n_small, reuse, storage)
            slot[reuse].append(big * SLOTS / n_trials)
            marginal[reuse].append((big - small) * SLOTS / (n_trials - n_small))
            log.info("reuse_actors=%s: %.2f s per trial slot, marginal %.2f s (wall %.1f s for %d "
                     "trials, %.1f s for %d)", reuse, slot[reuse][-1], marginal[reuse][-1], big,
                     n_trials, small, n_small)
    return {"fresh_s": min(slot[False]), "reuse_s": min(slot[True]),
            "fresh_marginal_s": min(marginal[False]), "reuse_marginal_s": min(marginal[True]),
            "fresh_samples_s": slot[False], "reuse_samples_s": slot[True]}


def overhead_result(quick: bool, storage: Path, sizes: tuple[int, int, int] | None = None) -> Result:
    """The per-trial overhead record; ``sizes`` = (trials, small trials, rounds) overrides the mode."""
    # quick: one round (the reuse gain is ~5x against a target of 2), to keep --quick under 10 minutes
    n_trials, n_small, rounds = sizes or ((10, 2, 1) if quick else (32, 4, 3))
    raw = measure_overhead(n_trials, n_small, rounds, storage)
    return make_result(
        "sweep_trial_overhead_reuse", raw["fresh_s"] / raw["reuse_s"], OVERHEAD_TARGET,
        overhead_fresh_actor_s=raw["fresh_s"], overhead_reused_actor_s=raw["reuse_s"],
        marginal_fresh_actor_s=raw["fresh_marginal_s"], marginal_reused_actor_s=raw["reuse_marginal_s"],
        samples_fresh_s=raw["fresh_samples_s"], samples_reused_s=raw["reuse_samples_s"],
        trials=n_trials, trials_small=n_small, slots=SLOTS,
    )


def smoke_result(quick: bool, root: Path) -> Result:
    """The smoke sweep's wall time (quick: sweep machinery only; full: the real demo path)."""
    from orchestrator.sweep.caches import build_caches
    from orchestrator.sweep.run import run_sweep
    from orchestrator.sweep.searcher import sweep_studies
    from orchestrator.sweep.space import find_search_space
    from orchestrator.sweep.space_file import load_search_space
    from orchestrator.sweep.stages import sweep_stages

    space = load_search_space(find_search_space("smoke"))
    cache = root / "cache"
    raw: dict[str, Any] = {}
    kwargs: dict[str, Any] = {"out": root, "progress_interval_s": 60.0}
    if quick:
        kwargs["trainable"] = smoke_trial  # reads no cache: the pre-flight's cache checks are off
        kwargs["check_caches"] = False
        raw["trainable"] = "trivial (benchmarks.sweep.smoke_trial)"
    else:
        raw["trainable"] = "orchestrator.trial.entrypoints.train_trial"
        raw["demo_data_s"] = _timed(_demo_data, root / "data" / vocab.DEMO)
        raw["preprocess_s"] = _timed(build_caches, space, cache, root / "data")
    wall = _timed(_complete_sweep, run_sweep, space, kwargs)
    budget = QUICK_BUDGET_S if quick else FULL_BUDGET_S
    trials = sum(s.num_trials for s in sweep_studies(space))
    if vocab.STAGE_CV in sweep_stages(space):
        trials += len(space.groups()) * len(space.folds)
    return make_result("sweep_smoke_wall", budget / wall, 1.0, wall_s=wall, budget_s=budget,
                       trials=trials, **raw)


def _timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _complete_sweep(run_sweep: Any, space: Any, kwargs: dict[str, Any]) -> None:
    if not run_sweep(space, **kwargs).complete:
        raise RuntimeError("the smoke sweep did not complete")


def _demo_data(target: Path) -> None:
    from orchestrator.data import demo as demo_data

    demo_data.generate_demo_dataset(target)


def run(quick: bool, sizes: tuple[int, int, int] | None = None, smoke: bool = True) -> list[Result]:
    """Both sweep benchmarks on a local Ray instance with ``SLOTS`` CPUs.

    Args:
        quick: Few-minute settings for a 2-core CPU.
        sizes: Override the overhead measurement's (trials, small trials, rounds), for tests.
        smoke: Also time the smoke sweep.
    """
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=SLOTS, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="mtcae_bench_sweep_") as tmp:
            root = Path(tmp)
            results = [overhead_result(quick, root / "overhead", sizes)]
            if smoke:
                results.append(smoke_result(quick, root / "smoke"))
            return results
    finally:
        if started:
            ray.shutdown()
