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
    done = {r.data.tags["trial_key"] for r in runs if "test_uar" in r.data.metrics and "trial_key" in r.data.tags}
    return done, runs


@pytest.mark.slow
@pytest.mark.parametrize("space, stage", [(SPACE, "search"), (POOLED_SPACE, "cv")], ids=["search", "cv"])
def test_driver_sigkill_then_resume_trains_nothing_twice(tmp_path: Path, space: str, stage: str) -> None:
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

    second = _driver(tmp_path, space_file)
    try:
        assert second.wait(timeout=600) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        _kill_group(second)
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
