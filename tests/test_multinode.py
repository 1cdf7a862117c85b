"""A smoke sweep on a real multi-node Ray cluster, submitted with ``ray job submit``, losing a node.

The cluster (:class:`benchmarks.local_cluster.LocalRayCluster`) is a head with 0 CPUs and its
dashboard on 127.0.0.1 and two 2-CPU worker nodes on 127.0.0.2 and 127.0.0.3, each its own ``ray
start --block`` process with its own temp dir; the test stops exactly those processes (never ``ray
stop``). The sweep is ``tests/test_sweep.py``'s space (nested selection, 2 archs x 2 outer folds x 2
configurations) with its fake trainable, submitted as the README's cluster section says. Search trial
(cascaded_vit, fold 1) SIGKILLs its own raylet in epoch 1 (the worker node dies as a lost machine
would); Tune restores it from its checkpoint on the other node.

Needs ``ray[default]`` (the dashboard and the job server); skipped without it, except under ``CI``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_sweep import TESTS_DIR, _calls, _setup

from benchmarks.local_cluster import LocalRayCluster

REPO = TESTS_DIR.parent
WORKER_IPS = ("127.0.0.2", "127.0.0.3")
DASHBOARD_DEPS = ("aiohttp_cors", "opencensus", "prometheus_client", "colorful")

pytestmark = pytest.mark.slow


def _dashboard_missing() -> list[str]:
    return [m for m in DASHBOARD_DEPS if not _importable(m)]


def require_job_server() -> None:
    """Skip without ``ray[default]`` (the dashboard's job server), except under ``CI``: fail there."""
    missing = _dashboard_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"ray[default] is needed for `ray job submit` (missing {missing})")
        pytest.skip(f"ray[default] is not installed (missing {missing})")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # already imported without a spec (colorful replaces its own module object)
        return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (0 CPUs, dashboard) + two 2-CPU workers on loopback; every process killed at the end."""
    require_job_server()
    root = tmp_path_factory.mktemp("multinode")
    bin_dir = str(Path(sys.executable).parent)  # `mtcae` and `ray` of this environment
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS_DIR), str(REPO), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")])}
    env.pop("RAY_ADDRESS", None)
    local = LocalRayCluster(root / "ray", env=env, dashboard=True)
    try:
        local.start_head()
        for ip in WORKER_IPS:
            local.add_worker(2, ip)
        local.wait_for_nodes()
        yield local, root
    finally:
        local.stop()


def _submit(cluster: LocalRayCluster, submission_id: str, *sweep_args: str) -> subprocess.CompletedProcess:
    """``ray job submit`` as the README's cluster section writes it."""
    runtime_env = {"env_vars": {"MTCAE_TEST_SUBMISSION": submission_id}}
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", cluster.dashboard_url,
           "--submission-id", submission_id, "--runtime-env-json", json.dumps(runtime_env),
           "--", "mtcae", "sweep", *sweep_args]
    return subprocess.run(cmd, capture_output=True, text=True, env=cluster.node_env(), timeout=240)


def _search_runs(out: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


def test_a_sweep_survives_a_lost_worker_node_and_resume_trains_nothing(cluster) -> None:
    local, root = cluster
    crash = {"stage": "search", "arch": "cascaded_vit", "fold": 1, "epoch": 1, "once": True,
             "action": "kill_raylet"}
    space_file, channel = _setup(root, crash)
    out = root / "out"
    raylets = {node.raylet_pid(): node for node in local.nodes[1:]}
    args = (str(space_file), "--out", str(out), "--trainable", "test_sweep:fake_trial")

    job = _submit(local, "smoke-1", *args)
    logs = job.stdout + job.stderr
    assert job.returncode == 0, logs[-4000:]

    killed = json.loads((channel / "killed-raylet.json").read_text())
    assert killed["pid"] in raylets  # the trial killed a worker node's raylet: that node is gone
    lost = raylets[killed["pid"]]
    calls = _calls(channel)
    retried = [c for c in calls if c["trial_key"] == killed["trial_key"]]
    assert [c["start"] for c in retried] == [0, 1]  # restored from its epoch-0 checkpoint
    assert retried[1]["ppid"] != killed["pid"]  # on the other node

    runs = _search_runs(out)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    search = [r for r in runs if r.data.tags.get("stage") == "search"]
    cells = [(r.data.tags["arch"], r.data.tags["config_hash"], r.data.tags["fold"]) for r in search]
    assert len(cells) == len(set(cells)) == 8  # every (config, fold) exactly once
    assert all(r.info.status == "FINISHED" for r in search)
    survivor = next(ip for ip in WORKER_IPS if ip != lost.ip)
    for run in search:  # from MLflow back to Ray
        tags = run.data.tags
        assert tags["ray_trial_id"] and tags["ray_node_ip"] in WORKER_IPS
        assert Path(tags["ray_checkpoint_uri"]).is_relative_to(out / "ray_results")
        if tags["trial_key"] == killed["trial_key"]:
            assert tags["ray_node_ip"] == survivor
    assert "epoch 3/3" in logs and "╭" not in logs  # one line per trial epoch, no Tune boxes

    before = len(calls)
    resumed = _submit(local, "smoke-2", "--resume", "fake", "--out", str(out),
                      "--trainable", "test_sweep:fake_trial")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert len(_calls(channel)) == before  # nothing trained again
