"""A real multi-node Ray cluster on one machine: a head and worker nodes started with ``ray start``.

Every node is its own ``ray start --block`` process in its own session (process group), with its own
``--temp-dir``, on its own loopback address (``127.0.0.1`` for the head, ``127.0.0.2``, ``127.0.0.3``
... for workers; Linux routes all of ``127.0.0.0/8`` to the loopback interface). The processes a
node started are found by their session id, so :meth:`LocalRayCluster.stop` ends exactly those (never
``ray stop``, which ends every Ray process of the machine) and :meth:`LocalRayCluster.kill_raylet`
kills one worker's raylet the way a lost machine would. Used by the ``sweep/slot_utilization``
benchmark and ``tests/test_multinode.py``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _ray_cli() -> str:
    """The ``ray`` script of this interpreter's environment."""
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def session_pids(sid: int) -> list[int]:
    """PIDs of the live processes of session ``sid`` (read from ``/proc``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) == sid:
                pids.append(int(entry.name))
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class Node:
    """One ``ray start --block`` process and what it started."""

    name: str
    ip: str
    cpus: int
    process: subprocess.Popen
    temp_dir: Path
    log_file: Path

    @property
    def sid(self) -> int:
        return self.process.pid  # start_new_session: the session id is the leader's pid

    def pids(self) -> list[int]:
        return session_pids(self.sid)

    def raylet_pid(self) -> int | None:
        """The node's raylet (the process whose death takes the node out of the cluster)."""
        for pid in self.pids():
            argv0 = _cmdline(pid).split(" ", 1)[0]
            if argv0.endswith("/raylet") or argv0 == "raylet":
                return pid
        return None


@dataclass
class LocalRayCluster:
    """A head (0 CPUs: it only schedules and runs drivers) and worker nodes, on loopback addresses.

    Attributes:
        root: Folder for the nodes' ``ray start`` logs (their temp dirs go under a short
            ``/tmp/mtcae_ray_*``, removed by :meth:`stop`).
        env: Extra environment of every node (``PYTHONPATH`` so workers import the trainables).
        dashboard: Start the head's dashboard (needed by ``ray job submit``; requires ``ray[default]``).
    """

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    dashboard: bool = False
    nodes: list[Node] = field(default_factory=list)
    port: int = 0
    dashboard_port: int = 0
    _temp_root: Path | None = None

    @property
    def address(self) -> str:
        """``ip:port`` of the head's GCS (``ray.init(address=...)``)."""
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """``http://127.0.0.1:<port>``: what ``ray job submit --address`` takes."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def node_env(self) -> dict[str, str]:
        return {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **self.env}

    def _start(self, name: str, ip: str, cpus: int, args: list[str]) -> Node:
        if self._temp_root is None:  # short: Ray's socket paths must fit in 107 bytes
            self._temp_root = Path(tempfile.mkdtemp(prefix="mtcae_ray_"))
        temp_dir = self._temp_root / name
        log_file = Path(self.root) / f"{name}.log"
        Path(self.root).mkdir(parents=True, exist_ok=True)
        temp_dir.mkdir(parents=True, exist_ok=True)
        cmd = [_ray_cli(), "start", "--block", f"--num-cpus={cpus}", f"--node-ip-address={ip}",
               f"--temp-dir={temp_dir}", "--disable-usage-stats", *args]
        with open(log_file, "w") as handle:
            process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.node_env(),
                                       start_new_session=True, cwd=self.root)
        node = Node(name, ip, cpus, process, temp_dir, log_file)
        self.nodes.append(node)
        return node

    def start_head(self, timeout_s: float = 120.0) -> Node:
        """Start the head (0 CPUs) and wait until its GCS (and dashboard) answer."""
        self.port = free_port()
        args = ["--head", f"--port={self.port}", f"--include-dashboard={str(self.dashboard).lower()}"]
        if self.dashboard:
            self.dashboard_port = free_port()
            args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        head = self._start("head", "127.0.0.1", 0, args)
        self._wait(lambda: self._head_ready(), timeout_s, head)
        return head

    def _head_ready(self) -> bool:
        if self.dashboard:
            request = urllib.request.Request(f"{self.dashboard_url}/api/version", headers=self._auth_headers())
            try:
                urllib.request.urlopen(request, timeout=2)
            except OSError:
                return False
            return True
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0 and "Ray runtime started" in (
                self.nodes[0].log_file.read_text())

    def _auth_headers(self) -> dict[str, str]:
        """The bearer token of a cluster started with token auth (``RAY_AUTH_TOKEN_PATH`` in ``env``)."""
        path = self.env.get("RAY_AUTH_TOKEN_PATH")
        if self.env.get("RAY_AUTH_MODE") != "token" or not path:
            return {}
        return {"Authorization": f"Bearer {Path(path).read_text().strip()}"}

    def add_worker(self, cpus: int, ip: str | None = None) -> Node:
        """Start a worker node with ``cpus`` logical CPUs (``127.0.0.<n+1>`` by default)."""
        ip = ip or f"127.0.0.{len(self.nodes) + 1}"
        return self._start(f"worker{len(self.nodes)}", ip, cpus, [f"--address={self.address}"])

    def wait_for_nodes(self, timeout_s: float = 120.0) -> None:
        """Wait until every started node is alive in the cluster (``ray list nodes`` through the GCS)."""
        self._wait(lambda: self.alive_nodes() >= len(self.nodes), timeout_s, self.nodes[-1])

    def alive_nodes(self) -> int:
        code = ("import ray, json; ray.init(address=%r, log_to_driver=False); "
                "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=self.node_env(), timeout=60)
        try:
            return int(json.loads(out.stdout.strip().splitlines()[-1]))
        except (ValueError, IndexError):
            return 0

    def _wait(self, ready, timeout_s: float, node: Node) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if node.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray node {node.name} did not start: {node.log_file.read_text()[-3000:]}")
            time.sleep(1.0)

    def kill_raylet(self, node: Node) -> int:
        """SIGKILL the node's raylet (its workers and trials die with it); returns the raylet's PID."""
        pid = node.raylet_pid()
        if pid is None:
            raise RuntimeError(f"no raylet process in node {node.name}'s session {node.sid}")
        os.kill(pid, signal.SIGKILL)
        log.info("killed raylet %d of %s (%s)", pid, node.name, node.ip)
        return pid

    def stop(self) -> None:
        """SIGKILL every process the nodes started (workers first), by session; nothing else."""
        for node in reversed(self.nodes):
            for pid in node.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                node.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("ray node %s (pid %d) did not exit", node.name, node.process.pid)
        self.nodes.clear()
        if self._temp_root is not None:
            shutil.rmtree(self._temp_root, ignore_errors=True)
            self._temp_root = None

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
