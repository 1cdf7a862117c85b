"""Real kills: a sweep driver SIGKILLed mid-search (nested) and mid-cv (pooled), then resumed.

The driver is a real process (``python -m sweep_driver``, a plain ``run_sweep`` call) with its own
local Ray instance; the fake trainable of ``test_sweep`` SIGKILLs it from inside a chosen trial
(``crash.json`` with ``action: kill``). Everything the killed driver started lives in its process
group, which the test kills too (as the machine's init would reap an orphaned Ray), then a second
driver resumes the sweep. The promises: no (config, fold) whose result reached MLflow trains again,
no Optuna study gains a trial, every run ends FINISHED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_sweep import POOLED_SPACE, SPACE, _calls, _setup

from orchestrator.tracking import flat_metrics, mlflow_metric

TESTS_DIR = Path(__file__).resolve().parent


def _driver(root: Path, space_file: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)]),
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen([sys.executable, "-m", "sweep_driver", str(space_file), str(root / "out")],
                            cwd=root, env=env, start_new_session=True,
                            stdout=open(root / "driver.log", "ab"), stderr=subprocess.STDOUT)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what the killed driver left behind (its Ray instance), and wait until it is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def _results(uri: str) -> tuple[set[str], list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id], max_results=1000)]
    done = {r.data.tags["trial_key"] for r in runs if "test_uar" in flat_metrics(r.data.metrics) and "trial_key" in r.data.tags}
    return done, runs


@pytest.mark.slow
@pytest.mark.parametrize("space, stage, damage", [
    (SPACE, "search", None), (POOLED_SPACE, "cv", None),
    (SPACE, "search", "experiment_state-*.json"), (SPACE, "search", "searcher-state-*.pkl"),
], ids=["search", "cv", "search-empty-experiment-state", "search-empty-searcher-state"])
def test_driver_sigkill_then_resume_trains_nothing_twice(tmp_path: Path, space: str, stage: str,
                                                         damage: str | None) -> None:
    """``damage``: a file of Tune's newest snapshot that the kill left empty, as a SIGKILL during
    Tune's upload (a plain copy) leaves it; the resume must neither abort nor sample more."""
    import optuna

    crash = {"stage": stage, "arch": "cascaded_vit", "fold": 1, "epoch": 1, "once": True, "action": "kill"}
    space_file, channel = _setup(tmp_path, crash, space)
    first = _driver(tmp_path, space_file)
    (channel / "driver.pid").write_text(str(first.pid))
    try:
        assert first.wait(timeout=600) == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        _kill_group(first)
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    recorded, _ = _results(uri)
    before = len(_calls(channel))
    assert recorded, "some trials finished before the kill"
    if damage:
        damaged = max((tmp_path / "out" / "ray_results" / "fake").glob(f"*/{damage}"))
        damaged.write_bytes(b"")

    second = _driver(tmp_path, space_file)
    try:
        assert second.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        _kill_group(second)
    if damage:
        log = (tmp_path / "driver.log").read_text()
        assert f"{damaged.name} is empty" in log, "the driver names the damaged file"
        assert "Failed to restore the run state" not in log, "Tune never tries the damaged snapshot"
    after = _calls(channel)[before:]
    assert not recorded & {c["trial_key"] for c in after}, "a trial whose result reached MLflow trained again"
    done, runs = _results(uri)
    trial_runs = [r for r in runs if r.data.tags.get("stage") in ("search", "cv")]
    assert len(trial_runs) == (8 if stage == "search" else 12)
    assert len({r.data.tags["trial_key"] for r in trial_runs}) == len(trial_runs)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags.get("trial_key"), r.info.status) for r in runs]
    storage = f"sqlite:///{tmp_path / 'out' / 'sweeps' / 'fake' / 'optuna.db'}"
    for name in optuna.get_all_study_names(storage):  # 2 configurations each, none FAILed by the kill
        states = [t.state.name for t in optuna.load_study(study_name=name, storage=storage).trials]
        assert states == ["COMPLETE", "COMPLETE"], (name, states)
    state = json.loads((tmp_path / "out" / "sweeps" / "fake" / "state.json").read_text())
    assert state["complete"] is True


@pytest.mark.slow
def test_a_second_driver_on_the_same_sweep_exits_at_once_naming_the_first(tmp_path: Path) -> None:
    crash = {"stage": "search", "arch": "stl", "fold": 0, "epoch": 0, "once": True, "action": "pause"}
    space_file, channel = _setup(tmp_path, crash)
    first = _driver(tmp_path, space_file)
    try:
        lock = tmp_path / "out" / "sweeps" / "fake" / "driver.lock"
        deadline = time.monotonic() + 120
        while not (channel / "calls.jsonl").exists() and time.monotonic() < deadline:  # first is training
            time.sleep(0.5)
        assert lock.exists()
        second = subprocess.run([sys.executable, "-m", "orchestrator.cli", "sweep", str(space_file), "--out",
                                 str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONPATH": str(TESTS_DIR.parent)})
        assert second.returncode == 2
        assert str(first.pid) in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None, "the first driver is not disturbed"
    finally:
        _kill_group(first)


@pytest.mark.slow
def test_a_worker_sigkilled_mid_trial_is_retried_and_the_sweep_completes(tmp_path: Path) -> None:
    """The real trainable (tiny cache, tiny model); its worker process dies by SIGKILL mid-trial,
    as Ray's out-of-memory killer would do it: a retryable trial failure, never a driver error."""
    from cache_fixture import write_tiny_cache
    from mlflow import MlflowClient
    from test_nested_real import SPACE as REAL_SPACE

    cache = write_tiny_cache(tmp_path / "out" / "cache" / "demo")
    (cache.root / "die_once").write_text("1")
    space_file = tmp_path / "real.yaml"
    space_file.write_text(REAL_SPACE.replace("max_failures: 0", "max_failures: 2").replace(
        "epochs: 2", "epochs: 4"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)]),
           "RAY_AUTH_MODE": "disabled"}
    env.pop("MLFLOW_TRACKING_URI", None)
    driver = subprocess.Popen([sys.executable, "-c", "import sys, sweep_driver; from orchestrator.sweep.run "
                               "import run_sweep; r = run_sweep(sys.argv[1], out=sys.argv[2], address='local', "
                               "num_cpus=2, trainable='sweep_driver:dying_train_trial'); sys.exit(0 if r.complete else 1)",
                               str(space_file), str(tmp_path / "out")], cwd=tmp_path, env=env,
                              start_new_session=True, stdout=open(tmp_path / "driver.log", "ab"),
                              stderr=subprocess.STDOUT)
    try:
        assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        _kill_group(driver)
    died = (cache.root / "died").read_text()
    client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    trials = [r for r in runs if r.data.tags.get("stage") == "search"]
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in runs)
    attempts = (cache.root / "attempts.txt").read_text().split()
    assert attempts.count(died) == 2, "the trial died after epoch 1 and was tried again"
    assert all(attempts.count(k) == 1 for k in set(attempts) - {died})
    killed = next(r for r in trials if r.data.tags["trial_key"] == died)
    assert "test_uar" in flat_metrics(killed.data.metrics)  # the retry finished it, in the same run
    steps = [m.step for m in client.get_metric_history(killed.info.run_id, mlflow_metric("val_uar"))]
    assert sorted(steps) == list(range(4)), "a resumed trial logs each epoch once"
