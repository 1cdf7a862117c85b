"""Sweep benchmarks: per-trial scheduling overhead, the smoke sweep's wall time, slot utilisation.

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
3. **Slot utilisation** (``sweep_slot_utilization``) on a real multi-node Ray cluster on this machine
   (:class:`benchmarks.local_cluster.LocalRayCluster`: a 0-CPU head and two 2-CPU workers on
   loopback addresses, 4 one-CPU trial slots): 4 architectures x 1 dataset, nested selection on one
   outer fold (4 studies, 8 configurations each quick, 12 full), a trivial trainable
   (:func:`sleep_trial`) that sleeps a configuration-dependent time (6-18 s quick, 8-24 s full:
   heterogeneous lengths are what leave slots idle at the end of a group) and logs its MLflow run
   like the real one. Trial actors are reused (``reuse_actors``) on both sides: starting a fresh
   worker process that imports torch and MLflow takes 10-20 s on the loaded 2-core reference
   machine, which would measure process start-up, not scheduling (on a GPU cluster it is seconds
   against trials of minutes). Utilisation = busy
   trial-seconds (measured inside the trainable) / (slots x wall), wall from the first trial's
   start to the last one's end (the sweep's fixed start-up is recorded apart). The design measured:
   every study in one Tune run. The baseline, measured in the same run on the same cluster: the
   previous design, one group after another (one ``run_sweep`` per group on a one-group space; its
   wall is the sum of the groups' spans, which leaves out its per-group start-up and so favours
   it). The sampled configurations, hence the trial lengths, are the same on both sides (studies
   are seeded per study). ``ratio`` = the one-run utilisation, target 0.9; the baseline's is
   recorded beside it.
"""

from __future__ import annotations

import json
import logging
import math
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
UTILIZATION_TARGET = 0.9
CLUSTER_WORKERS, CPUS_PER_WORKER = 2, 2  # 4 one-CPU trial slots on two worker nodes


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


def sleep_trial(config: dict) -> None:
    """A trainable that sleeps ``duration(lr)`` seconds over its epochs, logging like the real one.

    The duration grows with ``log10(lr)`` from ``sleep_min_s`` to ``sleep_max_s`` (read from the
    ``timing.json`` next to the cache); start and end times go to ``trials.jsonl`` there.
    """
    from ray import tune

    from orchestrator.tracking import TrialLogger

    start = time.time()
    channel = Path(config["cache_dir"])
    timing = json.loads((channel / "timing.json").read_text())
    frac = min(max((math.log10(config["lr"]) + 4.0) / 2.0, 0.0), 1.0)  # lr in [1e-4, 1e-2]
    duration = timing["sleep_min_s"] + frac * (timing["sleep_max_s"] - timing["sleep_min_s"])
    tags = {k: config[k] for k in ("dataset", "arch", "fold", "sweep", "stage")}
    tags["config_hash"] = config["trial_key"].rsplit("/", 2)[1]
    tracker = TrialLogger(config["tracking_uri"], config["experiment"], config["trial_key"],
                          config["trial_key"], tags, {"lr": config["lr"]},
                          parent_run_id=config["parent_run_id"])
    epochs = int(config["epochs"])
    for epoch in range(epochs):
        time.sleep(duration / epochs)
        metrics = {"epoch": epoch, "val_uar": 0.5 - abs(frac - 0.5) / 2, "train_loss": 1.0 / (epoch + 1)}
        metrics["best_val_uar"] = metrics["val_uar"]
        tracker.log_epoch({k: v for k, v in metrics.items() if k != "epoch"}, epoch)
        if epoch == epochs - 1:
            metrics.update(test_uar=0.5, test_war=0.5)
            tracker.log_metrics({"test_uar": 0.5, "test_war": 0.5}, 0)
        tune.report(metrics)
    tracker.finish()
    with open(channel / "trials.jsonl", "a") as handle:
        handle.write(json.dumps({"trial_key": config["trial_key"], "start": start, "end": time.time(),
                                 "sleep_s": duration}) + "\n")


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


# ------------------------------------------------------------------------------------ utilisation


def utilization_space(root: Path, name: str, archs: tuple[str, ...], num_samples: int, epochs: int) -> Path:
    """A nested-selection space over ``archs`` x the demo dataset, one outer fold, lr searched."""
    text = (f"description: slot utilisation benchmark ({name})\n"
            f"datasets: [{vocab.DEMO}]\narchs: [{', '.join(archs)}]\nn_folds: 2\nfolds: [0]\n"
            f"selection: nested\nfixed: {{encoder: tiny, epochs: {epochs}}}\n"
            f"search:\n  num_samples: {num_samples}\n  max_concurrent: {CLUSTER_WORKERS * CPUS_PER_WORKER}\n"
            "  params:\n    lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
            "resources: {cpu: 1, gpu: 0}\nfailure: {max_failures: 0}\n")
    path = root / f"{name}.yaml"
    path.write_text(text)
    return path


def _sweep_spans(root: Path, space: Path, address: str) -> dict[str, float]:
    """Run one sweep on the cluster; its busy trial-seconds, span and whole wall time."""
    from orchestrator.sweep.run import run_sweep

    channel = root / "cache" / vocab.DEMO
    before = len(_trial_times(channel))
    start = time.time()
    result = run_sweep(space, out=root, trainable=sleep_trial, address=address, check_caches=False,
                       progress_interval_s=60.0, reuse_actors=True)
    wall = time.time() - start
    if not result.complete:
        raise RuntimeError(f"sweep {space.stem} did not complete")
    trials = _trial_times(channel)[before:]
    return {"busy_s": sum(t["end"] - t["start"] for t in trials),
            "span_s": max(t["end"] for t in trials) - min(t["start"] for t in trials),
            "wall_s": wall, "trials": len(trials)}


def _trial_times(channel: Path) -> list[dict[str, float]]:
    path = channel / "trials.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def utilization_result(quick: bool, root: Path) -> Result:
    """Slot utilisation of one Tune run over every study vs one group after another, same cluster."""
    from benchmarks.local_cluster import LocalRayCluster

    num_samples, epochs, (low, high) = (8, 3, (6.0, 18.0)) if quick else (12, 4, (8.0, 24.0))
    archs = vocab.ARCHITECTURES[:4]
    slots = CLUSTER_WORKERS * CPUS_PER_WORKER
    channel = root / "cache" / vocab.DEMO
    channel.mkdir(parents=True)
    (channel / "timing.json").write_text(json.dumps({"sleep_min_s": low, "sleep_max_s": high}))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH")]))}
    with LocalRayCluster(root / "ray", env=env) as cluster:
        cluster.start_head()
        for _ in range(CLUSTER_WORKERS):
            cluster.add_worker(CPUS_PER_WORKER)
        cluster.wait_for_nodes()
        one_run = _sweep_spans(root, utilization_space(root, "one_run", archs, num_samples, epochs),
                               cluster.address)
        serial = [_sweep_spans(root, utilization_space(root, f"serial_{arch}", (arch,), num_samples, epochs),
                               cluster.address) for arch in archs]
    serial_busy, serial_span = sum(s["busy_s"] for s in serial), sum(s["span_s"] for s in serial)
    one = one_run["busy_s"] / (slots * one_run["span_s"])
    base = serial_busy / (slots * serial_span)
    return make_result(
        "sweep_slot_utilization", one, UTILIZATION_TARGET,
        summary=f"one Tune run {one:.2f} vs one group after another {base:.2f} on {slots} slots, "
                f"{CLUSTER_WORKERS} worker nodes",
        utilization_one_run=one, utilization_serial_groups=base, slots=slots, nodes=CLUSTER_WORKERS + 1,
        groups=len(archs), trials=one_run["trials"], trial_sleep_s=[low, high],
        busy_trial_s_one_run=one_run["busy_s"], span_s_one_run=one_run["span_s"],
        sweep_wall_s_one_run=one_run["wall_s"], busy_trial_s_serial=serial_busy,
        span_s_serial=serial_span, sweep_wall_s_serial=sum(s["wall_s"] for s in serial),
        span_s_serial_per_group=[s["span_s"] for s in serial],
    )


def run(quick: bool, sizes: tuple[int, int, int] | None = None, smoke: bool = True,
        overhead: bool = True, utilization: bool = True) -> list[Result]:
    """The sweep benchmarks: overhead and smoke on a local Ray instance with ``SLOTS`` CPUs, then slot
    utilisation on a local multi-node cluster.

    Args:
        quick: Few-minute settings for a 2-core CPU.
        sizes: Override the overhead measurement's (trials, small trials, rounds), for tests.
        smoke: Also time the smoke sweep.
        overhead: Measure the per-trial overhead.
        utilization: Measure slot utilisation (``MTCAE_BENCH_SWEEP=utilization`` runs only it).
    """
    only = os.environ.get("MTCAE_BENCH_SWEEP")
    if only:
        parts = set(only.split(","))
        overhead, smoke, utilization = "overhead" in parts, "smoke" in parts, "utilization" in parts
    results: list[Result] = []
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = (overhead or smoke) and not ray.is_initialized()
    if started:
        ray.init(num_cpus=SLOTS, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="mtcae_bench_sweep_") as tmp:
            root = Path(tmp)
            if overhead:
                results.append(overhead_result(quick, root / "overhead", sizes))
            if smoke:
                results.append(smoke_result(quick, root / "smoke"))
    finally:
        if started:
            ray.shutdown()
    if utilization:
        with tempfile.TemporaryDirectory(prefix="mtcae_bench_slots_") as tmp:
            results.append(utilization_result(quick, Path(tmp)))
    if only:  # say in the report that only part of the module ran
        results = [{**r, "run_with": f"MTCAE_BENCH_SWEEP={only}"} for r in results]
    return results
