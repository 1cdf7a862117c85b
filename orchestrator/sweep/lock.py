"""One driver per sweep: a lock held for the driver's lifetime in ``sweeps/<name>/driver.lock``.

Two drivers on one sweep each mark the other's live Optuna trials FAIL and log duplicate metric
steps, so a second driver must stop at once and say who holds the sweep. The lock is an OS lock
(``fcntl.flock``) on the lock file, so the kernel releases a dead holder's lock (a SIGKILL, a crash)
without anyone cleaning up. The file also names the holder (host, PID, process start, since when):
on shared storage where ``flock`` is not honoured across hosts, a holder on this host is checked by
PID liveness, and a holder on another host by its heartbeat (the holder touches the file every
``HEARTBEAT_S`` seconds; one silent for ``STALE_AFTER_S`` is gone). ``force_unlock`` takes the lock
whatever the file says, with a warning.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from orchestrator.sweep.errors import SweepError

logger = logging.getLogger(__name__)

LOCK_FILE = "driver.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0  # six missed heartbeats


class SweepLockedError(SweepError):
    """Another driver holds the sweep; the message names it and what to do."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a sweep's lock.

    Attributes:
        host: ``socket.gethostname()`` of the driver.
        pid: Its process id.
        pid_start: Its process start time (Linux ``/proc/<pid>/stat`` field 22; 0 elsewhere), so a
            recycled PID is not taken for the holder.
        since: When it took the lock (ISO 8601, UTC).
    """

    host: str
    pid: int
    pid_start: int
    since: str

    @classmethod
    def me(cls) -> LockHolder:
        """This process, now."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start(pid),
                   datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def describe(self) -> str:
        """``host <h>, PID <p>, since <t>``."""
        return f"host {self.host}, PID {self.pid}, since {self.since}"


def process_start(pid: int) -> int:
    """Start time of a process in clock ticks since boot (0 when unknown or not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[19])  # field 22; the name in () may hold spaces


def pid_alive(pid: int, start: int = 0) -> bool:
    """Whether ``pid`` runs on this host (and, when ``start`` is known, is the same process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    return not start or process_start(pid) in (0, start)


def read_holder(path: Path) -> LockHolder | None:
    """The holder a lock file names, or None (empty, released or unreadable file)."""
    try:
        return LockHolder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


@contextlib.contextmanager
def sweep_lock(sweep_dir: str | os.PathLike[str], force_unlock: bool = False) -> Iterator[LockHolder]:
    """Hold the sweep's driver lock for the ``with`` block.

    Args:
        sweep_dir: The sweep's folder (``<out>/sweeps/<name>``); created if missing.
        force_unlock: Take the lock even from a live holder (warned: both drivers then run).

    Yields:
        This driver's :class:`LockHolder`.

    Raises:
        SweepLockedError: Another live driver holds the sweep (host, PID and since when named).
        SweepError: The lock file cannot be created (read-only or missing storage).
    """
    path = Path(sweep_dir) / LOCK_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(path, force_unlock)
    except OSError as error:
        raise SweepError(f"cannot take the sweep's driver lock {path}: {error.strerror or error}") from error
    me = LockHolder.me()
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(fd, stop), daemon=True, name="sweep-lock")
    try:
        _write_holder(fd, me)
        beat.start()
        yield me
    finally:
        stop.set()
        if beat.is_alive():
            beat.join()
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # released: the file stays (removing it would race a new holder)
        os.close(fd)  # closing releases the flock


def _acquire(path: Path, force_unlock: bool) -> int:
    """An open, flocked descriptor of ``path``'s current inode, with no live holder named in it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            problem = _try_lock(fd, path)
        except BaseException:
            os.close(fd)
            raise
        if problem is None and _same_file(fd, path):
            return fd
        os.close(fd)
        if problem is None:  # the file was replaced between open and flock: lock the new one
            continue
        if not force_unlock:
            raise SweepLockedError(problem)
        logger.warning("--force-unlock: %s; taking the lock anyway. If that driver still runs, both "
                       "drivers now write to this sweep: stop one of them.", problem)
        return _replace_lock_file(path)


def _try_lock(fd: int, path: Path) -> str | None:
    """None when this process now holds the lock, else why not (naming the holder)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(path)
        who = holder.describe() if holder else "a process that has not written its name yet"
        return _held_message(path, who)
    holder = read_holder(path)
    if holder is None or (holder.host, holder.pid) == (socket.gethostname(), os.getpid()):
        return None
    if holder.host == socket.gethostname():
        if pid_alive(holder.pid, holder.pid_start):  # flock not honoured here, yet the holder lives
            return _held_message(path, holder.describe())
        logger.info("sweep lock %s: its holder (%s) is gone; taking it", path, holder.describe())
        return None
    silent = time.time() - os.fstat(fd).st_mtime
    if silent < STALE_AFTER_S:
        return _held_message(path, f"{holder.describe()} (heartbeat {silent:.0f} s ago)")
    logger.warning("sweep lock %s: holder %s sent no heartbeat for %.0f s; taking it as stale",
                   path, holder.describe(), silent)
    return None


def _held_message(path: Path, who: str) -> str:
    return (f"another driver is running this sweep ({who}; lock file {path}): wait for it to "
            f"finish or stop it, or, if it is gone and its lock was not released, re-run with "
            f"--force-unlock")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _replace_lock_file(path: Path) -> int:
    """A new lock file put over the old one (the old holder keeps a lock on an unlinked inode)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh inode: nobody else can hold it
    os.replace(tmp, path)
    return fd


def _write_holder(fd: int, holder: LockHolder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(asdict(holder)) + "\n").encode(), 0)
    os.fsync(fd)


def _heartbeat(fd: int, stop: threading.Event) -> None:
    """Touch the held lock file every ``HEARTBEAT_S`` seconds (its mtime is the heartbeat); by
    descriptor, so a file put over it by ``--force-unlock`` is not touched."""
    while not stop.wait(HEARTBEAT_S):
        with contextlib.suppress(OSError):
            os.utime(fd)
