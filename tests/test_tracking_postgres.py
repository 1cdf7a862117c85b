"""The cluster's tracking path on a real PostgreSQL server (127.0.0.1, started here, stopped by PID).

* Direct: ``orchestrator.tracking`` on ``postgresql://`` -- several trial loggers writing at once
  (the many-writers case SQLite on NFS cannot take), read back by ``report.results.load_runs``.
* Served: ``cluster/mlflow_server.sh`` -- the script cluster.yaml runs on the head -- starts
  ``mlflow server`` on that PostgreSQL with basic auth and proxied artifacts; a client without
  credentials is refused, the trial logger with them logs over HTTP, ``load_runs`` reads it back,
  the artifacts land in the destination folder, and ``stop`` ends the server's whole process group.
* Head init: cluster.yaml's wait-then-createdb command (basic auth's database), run twice.

PostgreSQL comes from ``tests/setup_postgres.sh`` (which ``.ci/run`` runs). Without it these tests
skip with the reason, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests
import yaml
from mlflow import MlflowClient
from ray.autoscaler._private.command_runner import _with_interactive

import vocab
from orchestrator.report.results import load_runs
from orchestrator.tracking import (
    TrialLogger,
    ensure_experiment,
    mlflow_metric,
)

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "mtcae-test-pw"
CLASSES = ["angry", "happy", "sad"]
STARTUP_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _postgres_bindir() -> Path | None:
    """Where initdb/postgres are: PATH, else the newest /usr/lib/postgresql/<major>/bin (Debian)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    majors = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return majors[-1].parent if majors else None


def _missing(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI runs tests/setup_postgres.sh first; it must have failed)")
    pytest.skip(f"{reason}: run `bash tests/setup_postgres.sh` as root, or install PostgreSQL")


def _server_user() -> str | None:
    """PostgreSQL refuses to run as root: as root, run it as the `postgres` user the package creates."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        _missing("running as root and there is no `postgres` user to run PostgreSQL as")


def _wait_until_accepting(url: str, proc: subprocess.Popen, log: Path) -> None:
    import psycopg

    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            psycopg.connect(f"{url}/postgres", connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not start (rc {proc.poll()}):\n{log.read_text()}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def postgres() -> Iterator[SimpleNamespace]:
    """A PostgreSQL server on 127.0.0.1:<free port>, password auth; stopped by its PID afterwards."""
    bindir = _postgres_bindir()
    if bindir is None:
        _missing("no PostgreSQL server binaries (initdb) found")
    user = _server_user()
    # Not under pytest's tmp folder: its parents are mode 700, closed to the `postgres` user.
    root = Path(tempfile.mkdtemp(prefix="mtcae-pg-"))
    proc = None
    try:
        (root / "pw").write_text(PASSWORD)
        if user:
            for path in (root, root / "pw"):
                shutil.chown(path, user)
        subprocess.run([bindir / "initdb", "-D", root / "data", "-U", "postgres", "--auth=scram-sha-256",
                        f"--pwfile={root / 'pw'}", "-E", "UTF8", "--locale=C"], user=user, cwd=root, check=True,
                       capture_output=True)
        port = _free_port()
        log = root / "postgres.log"
        with open(log, "w") as out:
            proc = subprocess.Popen([bindir / "postgres", "-D", root / "data", "-h", "127.0.0.1", "-p", str(port),
                                     "-k", root], user=user, cwd=root, stdout=out, stderr=subprocess.STDOUT)
        url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}"
        _wait_until_accepting(url, proc, log)
        yield SimpleNamespace(url=url, database=lambda name: _create_database(url, name))
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # PostgreSQL's "fast" shutdown
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def _create_database(url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(f"{url}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{url}/{name}"


def _tags(fold: int) -> dict[str, object]:
    return {"dataset": vocab.DEMO, "arch": vocab.ARCHITECTURES[0], "fold": fold, "sweep": "s1",
            "stage": vocab.STAGE_CV, "config_hash": "abc"}


def _log_trial(uri: str, fold: int) -> str:
    """One trial as the trainable logs it: 3 epochs, then test metrics and artifacts."""
    key = f"s1/cv/{vocab.DEMO}/abc/f{fold}"
    with TrialLogger(uri, "exp", key, f"run-f{fold}", _tags(fold), {"lr": 0.001, "fold": fold}) as tracker:
        for epoch in range(3):
            tracker.log_epoch({"val_uar": 0.1 * epoch + fold, "train_loss": 1.0 / (epoch + 1)}, epoch)
        tracker.log_final({"test_uar": 0.5 + fold / 10, "test_war": 0.6, "test_accuracy": 0.6, "best_epoch": 2},
                          [0, 1, 2, 1], [0, 1, 1, 1], CLASSES, ["a", "b", "c", "d"])
        return tracker.run_id


def _check_four_trials(uri: str, run_ids: list[str]) -> None:
    runs = load_runs(uri, "exp", sweep="s1")
    assert sorted(runs["fold"]) == [0, 1, 2, 3]
    assert set(runs["status"]) == {"FINISHED"} and set(runs["run_id"]) == set(run_ids)
    assert {int(f): round(u, 6) for f, u in zip(runs["fold"], runs["test_uar"])} == \
        {0: 0.5, 1: 0.6, 2: 0.7, 3: 0.8}
    client = MlflowClient(uri)
    for run_id in run_ids:
        assert [m.step for m in client.get_metric_history(run_id, mlflow_metric("val_uar"))] == [0, 1, 2]
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert artifacts == {"confusion_matrix.png", "per_class_recall.csv", "predictions.csv"}


@pytest.mark.slow
def test_trials_write_postgres_at_once_and_load_runs_reads_them(postgres: SimpleNamespace, tmp_path: Path) -> None:
    uri = postgres.database("mtcae_direct")
    ensure_experiment(uri, "exp", artifact_location=(tmp_path / "artifacts").as_uri())
    with ThreadPoolExecutor(4) as pool:
        run_ids = list(pool.map(lambda fold: _log_trial(uri, fold), range(4)))
    _check_four_trials(uri, run_ids)
    assert len(list((tmp_path / "artifacts").rglob("predictions.csv"))) == 4


@pytest.fixture
def mlflow_server(postgres: SimpleNamespace, tmp_path: Path) -> Iterator[SimpleNamespace]:
    """cluster/mlflow_server.sh on the test PostgreSQL, basic auth on, on 127.0.0.1; stopped after."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "mlflow_admin_password").write_text("admin-pw-for-tests\n")
    (secrets / "mlflow_flask_secret_key").write_text("flask-key-for-tests\n")
    port = _free_port()
    env = os.environ | {
        "MTCAE_SHARED": str(tmp_path / "shared"), "MTCAE_SECRETS": str(secrets),
        "MLFLOW_BACKEND_STORE_URI": postgres.database("mtcae_served"),
        "MLFLOW_AUTH_DATABASE_URI": postgres.database("mtcae_served_auth"),
        "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts"),
        "MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_WORKERS": "2",
        "MLFLOW_RUN_DIR": str(tmp_path / "run"),
    }
    script = ["bash", str(ROOT / "cluster" / "mlflow_server.sh")]
    started = subprocess.run([*script, "start"], env=env, capture_output=True, text=True, timeout=300)
    pidfile = tmp_path / "run" / "server.pid"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}", pid=int(pidfile.read_text()), tmp=tmp_path,
                              stop=lambda: subprocess.run([*script, "stop"], env=env, capture_output=True,
                                                          text=True, timeout=120))
    finally:
        if pidfile.exists():
            subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=120)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_cluster_server_on_postgres_requires_login_and_serves_trials(mlflow_server: SimpleNamespace,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server = mlflow_server
    search = f"{server.url}/api/2.0/mlflow/experiments/search?max_results=5"
    assert requests.get(search, timeout=30).status_code == 401
    assert requests.get(search, auth=("admin", "wrong"), timeout=30).status_code == 401
    assert requests.get(search, auth=("admin", "admin-pw-for-tests"), timeout=30).status_code == 200

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")  # what ~/.mlflow/credentials gives a node
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "admin-pw-for-tests")
    ensure_experiment(server.url, "exp")
    with ThreadPoolExecutor(4) as pool:
        run_ids = list(pool.map(lambda fold: _log_trial(server.url, fold), range(4)))
    _check_four_trials(server.url, run_ids)
    assert len(list((server.tmp / "artifacts").rglob("predictions.csv"))) == 4, "artifacts not proxied"

    stopped = server.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert not _group_alive(server.pid), "a process of the server's group outlived `stop`"


@pytest.mark.slow
def test_head_creates_the_login_database_once(postgres: SimpleNamespace, tmp_path: Path) -> None:
    """cluster.yaml's wait-then-createdb command on the head host, run twice (every `ray up` does).

    A stand-in `docker exec mtcae-postgres CMD` runs CMD here with the PostgreSQL client pointed
    (PGHOST/PGPORT/PGPASSWORD) at the test server, where the role `mlflow` and its database exist
    as the postgres:16 container's first boot leaves them.
    """
    import psycopg

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    (command,) = [c for c in config["initialization_commands"] if "createdb" in c]
    with psycopg.connect(f"{postgres.url}/postgres", autocommit=True) as conn:
        conn.execute("CREATE ROLE mlflow LOGIN CREATEDB PASSWORD 'mlflow-pw'")
        conn.execute("CREATE DATABASE mlflow OWNER mlflow")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/bin/bash\n[ "$1" = exec ] || exit 1\nshift\n'
                                    'while [[ $1 == -* ]]; do shift; done\nshift\nexec "$@"\n')
    (bin_dir / "docker").chmod(0o755)
    port = postgres.url.rsplit(":", 1)[1]
    (tmp_path / ".bashrc").write_text(f"export PATH={bin_dir}:{_postgres_bindir()}:$PATH "
                                      f"PGHOST=127.0.0.1 PGPORT={port} PGPASSWORD=mlflow-pw\n")
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    for _ in range(2):
        done = subprocess.run(["bash", "-c", " ".join(_with_interactive(command))], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stdout + done.stderr
    with psycopg.connect(f"{postgres.url}/postgres") as conn:
        owners = conn.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'mlflow_auth'")
        assert [row[0] for row in owners] == ["mlflow"]
