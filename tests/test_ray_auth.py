"""Ray token authentication as cluster.yaml sets it up, on a real two-node cluster on loopback.

cluster.yaml writes the token with ``openssl rand -hex 32`` into the shared secrets folder and starts
every node with ``RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=<that file>``; jobs are submitted with the
same two variables (README, "Cluster"). This test does exactly that with a head and one worker
(:class:`benchmarks.local_cluster.LocalRayCluster`) and checks that the token is what lets a client
in: ``ray job submit`` with it runs on both nodes; without it, or with another token, the job server
and the GCS refuse, and a node started with another token cannot join. It stops only the processes it
started.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from test_multinode import REPO, require_job_server

from benchmarks.local_cluster import LocalRayCluster

pytestmark = pytest.mark.slow

_NODES = "import ray, json; ray.init(log_to_driver=False); print('ALIVE', sum(n['Alive'] for n in ray.nodes()))"


def _write_token(path: Path) -> None:
    """The token as cluster.yaml's initialization_commands write it (``openssl rand -hex 32``, 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        token = subprocess.run(["openssl", "rand", "-hex", "32"], capture_output=True, text=True,
                               check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        token = secrets.token_hex(32) + "\n"  # the same format: 64 hex digits and a newline
    path.write_text(token)
    path.chmod(0o600)


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory):
    """Head (0 CPUs, dashboard) + one 2-CPU worker, both with token auth; killed by PID at the end."""
    require_job_server()
    root = tmp_path_factory.mktemp("ray_auth")
    token = root / "secrets" / "ray_auth_token"
    _write_token(token)
    home = root / "home"  # no ~/.ray/auth_token of whoever runs the tests
    home.mkdir()
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token), "HOME": str(home),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    local = LocalRayCluster(root / "ray", env=env, dashboard=True)
    try:
        local.start_head()
        local.add_worker(2, "127.0.0.2")
        local.wait_for_nodes()
        yield local, root
    finally:
        local.stop()


def _client_env(cluster: LocalRayCluster, root: Path, **auth: str) -> dict[str, str]:
    env = {k: v for k, v in cluster.node_env().items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
    env["HOME"] = str(root / "home")
    return {**env, **auth}


def _submit(cluster: LocalRayCluster, env: dict[str, str], submission_id: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", cluster.dashboard_url,
           "--submission-id", submission_id, "--", sys.executable, "-c", _NODES]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180, cwd=REPO)


def test_a_job_submitted_with_the_clusters_token_runs_on_every_node(token_cluster) -> None:
    cluster, root = token_cluster
    env = _client_env(cluster, root, RAY_AUTH_MODE="token",
                      RAY_AUTH_TOKEN_PATH=str(root / "secrets" / "ray_auth_token"))
    done = _submit(cluster, env, "auth-ok")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ALIVE 2" in done.stdout, done.stdout[-3000:]


@pytest.mark.parametrize("who", ["no token", "another token"])
def test_clients_without_the_token_are_refused(token_cluster, who: str) -> None:
    cluster, root = token_cluster
    if who == "no token":
        env = _client_env(cluster, root)
    else:
        other = root / "other_token"
        _write_token(other)
        env = _client_env(cluster, root, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(other))
    refused = _submit(cluster, env, f"auth-refused-{who.replace(' ', '-')}")
    assert refused.returncode != 0 and "ALIVE" not in refused.stdout, refused.stdout[-2000:]
    assert "AuthenticationError" in refused.stderr, refused.stderr[-2000:]  # refused for the token
    direct = subprocess.run([sys.executable, "-c", _NODES.replace("ray.init(", f"ray.init(address={cluster.address!r}, ")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert direct.returncode != 0 and "ALIVE" not in direct.stdout, direct.stdout[-1500:]
    assert "AuthenticationError" in direct.stderr, direct.stderr[-1500:]


def test_a_node_with_another_token_cannot_join(token_cluster) -> None:
    """``ray start --address=<head>`` with a token other than the cluster's gives up; the cluster keeps 2 nodes."""
    cluster, root = token_cluster
    other = root / "intruder_token"
    _write_token(other)
    intruder = LocalRayCluster(root / "intruder", env={**cluster.env, "RAY_AUTH_TOKEN_PATH": str(other)})
    intruder.port = cluster.port  # `ray start --address=<the real head>`
    try:
        node = intruder.add_worker(1, "127.0.0.3")
        try:
            rc = node.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            rc = None
        log = node.log_file.read_text()
        assert rc not in (None, 0), log[-3000:]  # `ray start --block` gave up instead of joining
        assert "AuthenticationError" in log or "authentication token" in log.lower(), log[-3000:]
        assert cluster.alive_nodes() == 2  # the head and its own worker only
    finally:
        intruder.stop()
