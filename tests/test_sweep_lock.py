"""orchestrator/sweep/lock.py: one driver per sweep, with real processes holding and dying."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.sweep.errors import SweepError
from orchestrator.sweep.lock import (
    LOCK_FILE,
    STALE_AFTER_S,
    SweepLockedError,
    process_start,
    sweep_lock,
)

ROOT = Path(__file__).resolve().parents[1]

# A driver stand-in: takes the lock, says so, then holds it until killed. A refused one prints the
# error's sentence and exits 2, as `mtcae sweep` does with any SweepError.
DRIVER = """
import sys, time
from orchestrator.sweep.lock import SweepLockedError, sweep_lock
try:
    with sweep_lock(sys.argv[1], force_unlock=len(sys.argv) > 2):
        print("locked", flush=True)
        time.sleep(600)
except SweepLockedError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


def start_driver(sweep_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(sweep_dir), *extra], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_locked(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline()
    assert line.strip() == "locked", proc.stderr.read()


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


@pytest.fixture
def first(tmp_path: Path):
    proc = start_driver(tmp_path / "sweep")
    wait_locked(proc)
    yield proc
    kill(proc)


def test_second_driver_exits_at_once_naming_the_first_then_takes_over_after_a_sigkill(
        tmp_path: Path, first: subprocess.Popen) -> None:
    second = start_driver(tmp_path / "sweep")
    _, err = second.communicate(timeout=60)  # at once: it does not wait for the first
    assert second.returncode == 2
    assert f"PID {first.pid}" in err and socket.gethostname() in err and "--force-unlock" in err
    assert "Traceback" not in err

    kill(first)  # no cleanup runs: the kernel drops the flock, the file still names the dead holder
    assert json.loads((tmp_path / "sweep" / LOCK_FILE).read_text())["pid"] == first.pid
    third = start_driver(tmp_path / "sweep")
    try:
        wait_locked(third)
        assert json.loads((tmp_path / "sweep" / LOCK_FILE).read_text())["pid"] == third.pid
    finally:
        kill(third)


def test_lock_is_held_in_process_and_released_on_exit(tmp_path: Path) -> None:
    with sweep_lock(tmp_path) as me:
        assert me.pid == os.getpid()
        with pytest.raises(SweepLockedError, match=f"PID {os.getpid()}"):
            with sweep_lock(tmp_path):
                pass
    assert issubclass(SweepLockedError, SweepError)
    with sweep_lock(tmp_path):  # released: a new holder gets it
        pass


def test_force_unlock_takes_a_live_lock_with_a_warning(tmp_path: Path, first: subprocess.Popen) -> None:
    forced = start_driver(tmp_path / "sweep", "force")
    try:
        wait_locked(forced)
        assert json.loads((tmp_path / "sweep" / LOCK_FILE).read_text())["pid"] == forced.pid
    finally:
        kill(forced)
    err = forced.stderr.read()
    assert f"PID {first.pid}" in err and "both drivers" in err


def write_holder(sweep_dir: Path, host: str, pid: int, pid_start: int = 0) -> Path:
    """A lock file as a driver on storage that does not honour flock would have left it."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    path = sweep_dir / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "pid_start": pid_start, "since": "then"}))
    return path


def test_without_flock_a_live_holder_on_this_host_is_honoured_and_a_dead_one_is_not(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        write_holder(tmp_path, socket.gethostname(), sleeper.pid, process_start(sleeper.pid))
        with pytest.raises(SweepLockedError, match=f"PID {sleeper.pid}"):
            with sweep_lock(tmp_path):
                pass
    finally:
        kill(sleeper)
    with sweep_lock(tmp_path) as me:  # the named holder is dead now
        assert me.pid == os.getpid()


def test_a_recycled_pid_is_not_taken_for_the_holder(tmp_path: Path) -> None:
    write_holder(tmp_path, socket.gethostname(), os.getppid(), pid_start=process_start(os.getppid()) + 1)
    with sweep_lock(tmp_path):
        pass


def test_a_holder_on_another_host_counts_until_its_heartbeat_is_stale(tmp_path: Path) -> None:
    path = write_holder(tmp_path, "some-other-node", 4242)
    with pytest.raises(SweepLockedError, match="some-other-node, PID 4242"):
        with sweep_lock(tmp_path):
            pass
    old = time.time() - STALE_AFTER_S - 60
    os.utime(path, (old, old))
    with sweep_lock(tmp_path) as me:
        assert json.loads(path.read_text())["pid"] == me.pid


def test_a_sweep_folder_that_cannot_be_written_is_one_sentence(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a regular file\n")
    with pytest.raises(SweepError, match=f"cannot take the sweep's driver lock {tmp_path}/file/s/{LOCK_FILE}"):
        with sweep_lock(tmp_path / "file" / "s"):
            pass


def test_mtcae_sweep_takes_force_unlock() -> None:
    from orchestrator.cli import build_parser

    assert build_parser().parse_args(["sweep", "smoke", "--force-unlock"]).force_unlock
    assert not build_parser().parse_args(["sweep", "smoke"]).force_unlock
