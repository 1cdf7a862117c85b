"""Clean ends: a real ``mtcae sweep`` process stopped by SIGTERM (what ``ray job stop`` sends).

The driver is a subprocess with its own local Ray instance (2 CPUs) and MLflow SQLite store; the
fake trainable (:func:`test_sweep.fake_trial`) sends the signal from inside a chosen trial, so the
stop lands mid-search deterministically. Every process the sweep started is in the subprocess's
session and is killed by PID when the test ends, whatever its outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep import TESTS_DIR, _calls, _finished_keys, _setup

from benchmarks.local_cluster import session_pids

REPO = TESTS_DIR.parent


def sweep_env() -> dict[str, str]:
    """The driver's environment: this checkout and the tests (the fake trainable) importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), str(REPO), env.get("PYTHONPATH")]))
    env["RAY_AUTH_MODE"] = "disabled"
    return env


@pytest.fixture
def processes():
    """Start driver processes in their own sessions; SIGKILL what is left of them at the end."""
    started: list[subprocess.Popen] = []

    def start(args: list[str], log: Path) -> subprocess.Popen:
        with open(log, "w") as handle:
            proc = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=sweep_env(),
                                    cwd=log.parent, start_new_session=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        for pid in session_pids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)


def _mtcae_sweep(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "sweep", *args, "--num-cpus", "2", "--no-tables",
            "--trainable", "test_sweep:fake_trial"]


def _runs_by_status(uri: str) -> dict[str, list]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    by_status: dict[str, list] = {}
    for run in runs:
        by_status.setdefault(run.info.status, []).append(run)
    return by_status


@pytest.mark.slow
def test_sigterm_marks_runs_killed_exits_cleanly_and_resume_retrains_nothing(processes, tmp_path: Path) -> None:
    # SIGTERM to the driver while search trial (cascaded_vit, fold 1) is in epoch 1.
    crash = {"stage": "search", "arch": "cascaded_vit", "fold": 1, "epoch": 1, "once": True,
             "action": "interrupt", "signal": "SIGTERM"}
    space_file, channel = _setup(tmp_path, crash)
    out = tmp_path / "out"
    driver = processes(_mtcae_sweep(str(space_file), "--out", str(out)), tmp_path / "first.log")
    (channel / "driver.pid").write_text(str(driver.pid))
    rc = driver.wait(timeout=300)
    log = (tmp_path / "first.log").read_text()
    assert rc == 128 + signal.SIGTERM, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "stopped by SIGTERM" in log and "--resume fake" in log

    uri = f"sqlite:///{out / 'mlflow.db'}"
    status = _runs_by_status(uri)
    assert "RUNNING" not in status, [r.data.tags.get("trial_key") for r in status["RUNNING"]]
    interrupted = (channel / "crashed-search-cascaded_vit-1").read_text()
    killed = {r.data.tags.get("trial_key") for r in status.get("KILLED", [])}
    assert interrupted in killed
    assert {r.data.tags["stage"] for r in status["KILLED"]} >= {"sweep", "group"}
    finished_before = _finished_keys(uri)
    before = len(_calls(channel))

    resumed = processes(_mtcae_sweep("--resume", "fake", "--out", str(out)), tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    after = _calls(channel)[before:]
    assert not finished_before & {c["trial_key"] for c in after}  # recorded trials did not train again
    status = _runs_by_status(uri)
    assert set(status) == {"FINISHED"}
    assert json.loads((out / "sweeps" / "fake" / "state.json").read_text())["complete"] is True
