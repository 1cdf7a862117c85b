"""cluster.yaml passes the Ray cluster launcher's own validation, offline, and its head boots.

The check is what ``ray up`` does before it talks to the cloud: the JSON schema shipped with Ray
(``ray/autoscaler/ray-schema.json``) over the raw file, then ``prepare_config`` (merging the AWS
provider defaults) and ``validate_config`` (the schema again plus Ray's cross-field checks, e.g.
``head_node_type`` must name a node type). No AWS call is made.

The head's start commands then run exactly as Ray runs them on a Docker cluster -- wrapped by
Ray's own functions (``with_envs``, ``_with_environment_variables``, ``_docker_expand_user``,
``_with_interactive``, ``with_docker_exec``, then ``_with_interactive`` again for the SSH hop), in
``bash`` as sshd would -- with harmless stand-ins on PATH for ``docker`` (``exec`` runs the command
here), ``ray``, ``mlflow`` (records its arguments, answers ``/health`` on loopback) and ``hostname``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.command_runner import (
    DockerCommandRunner,
    _with_environment_variables,
    _with_interactive,
)
from ray.autoscaler._private.docker import with_docker_exec
from ray.autoscaler._private.util import (
    prepare_config,
    validate_config,
    with_envs,
    with_head_node_ip,
)

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = ROOT / "cluster.yaml"
SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"


def validate_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Raise like ``ray up`` would on a bad config; return the prepared config."""
    jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).validate(config)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_validates_offline(config: dict[str, Any]) -> None:
    prepared = validate_cluster_config(config)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["head"]["resources"] == {"CPU": 0}


def test_one_ray_version_for_the_image_the_cluster_extra_and_this_venv(config: dict[str, Any]) -> None:
    cluster_extra = re.search(r"^cluster = \[(.*)\]$", (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    (pinned,) = re.findall(r'"ray(?:\[[a-z,]+\])?==([0-9.]+)"', cluster_extra)
    assert config["docker"]["image"] == f"rayproject/ray:{pinned}-py311-gpu"
    assert ray.__version__ == pinned, "the tests run a different Ray than the cluster"
    assert '"boto3' in cluster_extra, "`ray up` on a laptop needs boto3"


def test_nodes_install_the_readme_torch_pin_and_the_cluster_extra(config: dict[str, Any]) -> None:
    readme_pin = re.search(r"pip install (torch==\S+ torchvision==\S+)", (ROOT / "README.md").read_text()).group(1)
    setup = config["setup_commands"]
    assert any(readme_pin in c and "--cache-dir /mnt/efs/" in c for c in setup), "torch unpinned or uncached"
    assert any('-e "/home/ray/mtcae[cluster]"' in c for c in setup)
    assert any("ln -sf /mnt/efs/mtcae/secrets/mlflow_credentials ~/.mlflow/credentials" in c for c in setup)
    assert config["file_mounts"]["/home/ray/mtcae"] == "."
    assert any("/mnt/efs" in option for option in config["docker"]["run_options"])


def test_one_instance_profile_that_the_header_says_may_pass_itself(config: dict[str, Any]) -> None:
    types = config["available_node_types"]
    head, worker = (types[t]["node_config"]["IamInstanceProfile"] for t in ("head", "gpu_worker"))
    assert head == worker == {"Name": "mtcae-ray"}
    header = CLUSTER_YAML.read_text().split("cluster_name:")[0]
    assert "iam:PassRole" in header and "arn:aws:iam::ACCOUNT:role/mtcae-ray" in header
    assert "iam:PassRole" in (ROOT / "README.md").read_text()


def test_tracking_server_is_postgres_with_auth_and_ray_uses_tokens(config: dict[str, Any]) -> None:
    text = CLUSTER_YAML.read_text()
    assert "pkill" not in text and "sqlite" not in text.lower().split("cluster_name:")[1]
    head_init = " ".join(config["initialization_commands"])
    assert "postgres:16" in head_init and "listen_addresses=127.0.0.1" in head_init
    worker_init = " ".join(config["available_node_types"]["gpu_worker"]["initialization_commands"])
    assert "postgres" not in worker_init and "mount -t nfs4" in worker_init
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[commands])
        assert "RAY_AUTH_MODE=token" in start and "RAY_AUTH_TOKEN_PATH=" in start, commands
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["available_node_types"]["gpu_worker"].update(
        min_worker=c["available_node_types"]["gpu_worker"].pop("min_workers")), "min_worker"),
    (lambda c: c.update(setup_command=c.pop("setup_commands")), "setup_command"),
    (lambda c: c["available_node_types"]["head"].update(resources={"CPU": 0.5}), "0.5"),
    (lambda c: c["docker"].update(imgae=c["docker"].pop("image")), "imgae"),
])
def test_schema_rejects_typos(config: dict[str, Any], mutate, message: str) -> None:
    broken = copy.deepcopy(config)
    mutate(broken)
    with pytest.raises(jsonschema.ValidationError, match=message):
        validate_cluster_config(broken)


def test_cross_field_check_rejects_unknown_head_type(config: dict[str, Any]) -> None:
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "headx"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_cluster_config(broken)


# --------------------------------------------------------------------------------------------
# The head's start commands under Ray's own command wrapping

STANDINS = {
    # `docker exec [-it] [-e K=V] NAME CMD...`: the "container" is this machine.
    "docker": """\
        #!/bin/bash
        echo "docker $*" >> "$STANDIN_DIR/calls.log"
        [ "$1" = exec ] || exit 0
        shift
        while [[ $1 == -* ]]; do [[ $1 == -e ]] && shift; shift; done
        shift
        exec "$@"
        """,
    "ray": """\
        #!/bin/bash
        echo "ray $* | RAY_AUTH_MODE=$RAY_AUTH_MODE RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH\
 MLFLOW_TRACKING_URI=$MLFLOW_TRACKING_URI RAY_OVERRIDE_RESOURCES=$RAY_OVERRIDE_RESOURCES" >> "$STANDIN_DIR/calls.log"
        """,
    "hostname": """\
        #!/bin/bash
        if [ "$1" = -I ]; then echo "127.0.0.1 "; else echo head-node; fi
        """,
    "mlflow": f"""\
        #!{sys.executable}
        import http.server, json, os, sys
        args = sys.argv[1:]
        keys = ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_AUTH_CONFIG_PATH",
                "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
        with open(os.path.join(os.environ["STANDIN_DIR"], "calls.log"), "a") as log:
            log.write("mlflow " + json.dumps({{"args": args, "pid": os.getpid(),
                                              "env": {{k: os.environ.get(k) for k in keys}}}}) + "\\n")

        class Health(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_):
                pass

        address = (args[args.index("--host") + 1], int(args[args.index("--port") + 1]))
        http.server.HTTPServer(address, Health).serve_forever()
        """,
}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head_node(tmp_path: Path) -> SimpleNamespace:
    """A stand-in head: its home (repository mounted at ~/mtcae), EFS folder with secrets, stand-ins."""
    home, shared, bin_dir = tmp_path / "home", tmp_path / "efs" / "mtcae", tmp_path / "bin"
    for folder in (home, shared / "secrets", bin_dir):
        folder.mkdir(parents=True)
    (home / "mtcae").symlink_to(ROOT)
    for name in ("postgres_password", "mlflow_admin_password", "mlflow_flask_secret_key", "ray_auth_token"):
        (shared / "secrets" / name).write_text(f"{name}-value\n")
    for name, body in STANDINS.items():
        (bin_dir / name).write_text(textwrap.dedent(body))
        (bin_dir / name).chmod(0o755 | stat.S_IXUSR)
    port = _free_port()
    # The image's ~/.bashrc is where a node's PATH comes from (Ray sources it in every command).
    (home / ".bashrc").write_text(
        f"export PATH={bin_dir}:{Path(sys.executable).parent}:$PATH STANDIN_DIR={tmp_path}\n"
        f"export MTCAE_SHARED={shared} MLFLOW_RUN_DIR={tmp_path / 'run'} MLFLOW_PORT={port}\n")
    env = {"HOME": str(home), "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    return SimpleNamespace(root=tmp_path, home=home, shared=shared, port=port, env=env,
                           pidfile=tmp_path / "run" / "server.pid")


def _as_ray_runs_it(command: str, home: Path, head_ip: str | None = None) -> str:
    """``command`` wrapped as Ray runs a start command on a Docker cluster, host side.

    Head (``head_ip`` None): as ``ray up`` does; worker: as the autoscaler does (``RAY_HEAD_IP``).
    """
    if head_ip is None:
        (command,) = with_envs([command], {"RAY_enable_autoscaler_v2": "1", "RAY_CLOUD_INSTANCE_ID": "i-0head",
                                           "RAY_NODE_TYPE_NAME": "head"})
    else:
        (command,) = with_head_node_ip([command], head_ip)
    command = _with_environment_variables(command, {"RAY_USAGE_STATS_ENABLED": 0,
                                                    "RAY_OVERRIDE_RESOURCES": {"CPU": 0}})
    command = DockerCommandRunner._docker_expand_user(SimpleNamespace(home_dir=str(home)), command, any_char=True)
    in_container = with_docker_exec([" ".join(_with_interactive(command))], container_name="mtcae",
                                    docker_cmd="docker", with_interactive=True)[0]
    return " ".join(_with_interactive(in_container))  # SSHCommandRunner's argv, joined as sshd does


def _boot_head(config: dict[str, Any], node: SimpleNamespace) -> list[str]:
    for command in config["head_start_ray_commands"]:
        done = subprocess.run(["bash", "-c", _as_ray_runs_it(command, node.home)], env=node.env, cwd=node.home,
                              capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    lines = (node.root / "calls.log").read_text().splitlines()
    entered = [line for line in lines if line.startswith("docker exec -it mtcae /bin/bash -c ")]
    assert len(entered) % len(config["head_start_ray_commands"]) == 0, "a command did not enter the container"
    return [line for line in lines if not line.startswith("docker ")]


def _server_pid(node: SimpleNamespace) -> int:
    return int(node.pidfile.read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()


@pytest.mark.slow
def test_head_start_commands_boot_under_rays_wrapping_and_reboot(config: dict[str, Any],
                                                                 head_node: SimpleNamespace) -> None:
    node = head_node
    try:
        calls = _boot_head(config, node)
        first = _server_pid(node)
        assert _alive(first)
        assert [c.split()[:2] for c in calls] == [["ray", "stop"], ["mlflow", '{"args":'], ["ray", "start"]]
        server = json.loads(calls[1][len("mlflow "):])
        args = server["args"]
        assert args[0] == "server" and "--serve-artifacts" in args
        assert args[args.index("--app-name") + 1] == "basic-auth"
        assert args[args.index("--host") + 1] == "127.0.0.1"  # `hostname -I`'s first: the private address
        assert server["pid"] == first, "the pidfile holds the server's own pid (its process group)"
        env = server["env"]
        assert env["MLFLOW_BACKEND_STORE_URI"] == \
            "postgresql://mlflow:postgres_password-value@127.0.0.1:5432/mlflow"
        assert env["MLFLOW_ARTIFACTS_DESTINATION"] == f"{node.shared}/mlflow/artifacts"
        assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "mlflow_admin_password-value"
        assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "mlflow_flask_secret_key-value"
        auth = Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
        assert "database_uri = postgresql://mlflow:postgres_password-value@127.0.0.1:5432/mlflow_auth" in auth
        assert not any("secret" in a or "password" in a for a in args), "a secret on the command line"
        ray_start = calls[2]
        assert "--head" in ray_start and "RAY_AUTH_MODE=token" in ray_start
        assert f"RAY_AUTH_TOKEN_PATH={node.shared}/secrets/ray_auth_token" in ray_start
        assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in ray_start
        assert 'RAY_OVERRIDE_RESOURCES={"CPU":0}' in ray_start

        calls = _boot_head(config, node)  # a second `ray up`: the old server is stopped by its pidfile
        second = _server_pid(node)
        assert second != first and _alive(second) and not _alive(first)
        assert len([c for c in calls if c.startswith("mlflow ")]) == 2
    finally:
        if node.pidfile.exists():
            pid = _server_pid(node)
            if _alive(pid):
                os.killpg(pid, signal.SIGTERM)


def test_start_refuses_without_its_secrets(head_node: SimpleNamespace) -> None:
    node = head_node
    (node.shared / "secrets" / "postgres_password").unlink()
    env = node.env | {"MTCAE_SHARED": str(node.shared), "MLFLOW_RUN_DIR": str(node.root / "run")}
    done = subprocess.run(["bash", str(ROOT / "cluster" / "mlflow_server.sh"), "start"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert f"missing secret {node.shared}/secrets/postgres_password" in done.stderr
    assert not node.pidfile.exists()


def test_the_wrapping_reproduces_the_old_self_killing_line(head_node: SimpleNamespace) -> None:
    """Control: the previous `pkill -f "<pattern>" || true; ...` line kills its own shell here (rc 143).

    The pattern is unique to this test (its tmp path), so it can match nothing but this test's shells.
    """
    node = head_node
    pattern = f"mlflow server {node.root.name}"
    old_line = f'pkill -f "{pattern}" || true; echo reached > {node.root}/reached'
    done = subprocess.run(["bash", "-c", _as_ray_runs_it(old_line, node.home)], env=node.env, cwd=node.home,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 128 + signal.SIGTERM
    assert not (node.root / "reached").exists()


def test_worker_start_commands_join_the_head_with_the_token(config: dict[str, Any],
                                                            head_node: SimpleNamespace) -> None:
    node = head_node
    for command in config["worker_start_ray_commands"]:
        done = subprocess.run(["bash", "-c", _as_ray_runs_it(command, node.home, head_ip="10.0.0.5")],
                              env=node.env, cwd=node.home, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stderr}"
    stop, start = [c for c in (node.root / "calls.log").read_text().splitlines() if c.startswith("ray ")]
    assert stop.startswith("ray stop")
    assert start.startswith("ray start --address=10.0.0.5:6379 ") and "RAY_AUTH_MODE=token" in start
    assert f"RAY_AUTH_TOKEN_PATH={node.shared}/secrets/ray_auth_token" in start


def test_first_boot_secrets_are_private_stable_and_read_by_mlflow(config: dict[str, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's secrets command, its EFS path pointed at tmp_path, run twice as Ray runs host commands."""
    (command,) = [c for c in config["initialization_commands"] if "openssl rand" in c]
    command = command.replace("/mnt/efs", str(tmp_path / "efs"))
    (tmp_path / "efs" / "mtcae").mkdir(parents=True)
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    secrets = tmp_path / "efs" / "mtcae" / "secrets"
    contents = []
    for _ in range(2):  # every `ray up` runs it again: nothing may change
        done = subprocess.run(["bash", "-c", " ".join(_with_interactive(command))], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        contents.append({p.name: p.read_text() for p in secrets.iterdir()})
    assert contents[0] == contents[1]
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for name in ("postgres_password", "mlflow_admin_password", "mlflow_flask_secret_key", "ray_auth_token"):
        assert re.fullmatch(r"[0-9a-f]{64}\n", contents[0][name]), name
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600
    assert len({contents[0][n] for n in contents[0]}) == len(contents[0]), "two secrets are equal"

    from mlflow.utils.credentials import read_mlflow_creds

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").symlink_to(secrets / "mlflow_credentials")  # as setup_commands do
    creds = read_mlflow_creds()
    assert (creds.username, creds.password) == ("admin", contents[0]["mlflow_admin_password"].strip())
