"""A real ``mtcae preprocess`` killed mid-run with real signals: no worker outlives it, nothing
finished is lost or recomputed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from videos import write_gradient_video

import vocab
from orchestrator.data.cache import CLIPS_DIR, read_rows
from orchestrator.data.preprocess import run_preprocess
from orchestrator.data.settings import PreprocessSettings

ROOT = Path(__file__).resolve().parents[1]
DATASET = vocab.DATASETS[0]
CLIPS = 24
WAIT_S = 120  # generous bounds on waits for an event, not timings: spawn workers import torch


def dataset(root: Path) -> None:
    """``CLIPS`` face-free clips over 8 actors and 3 classes."""
    for i in range(CLIPS):
        actor, emotion, take = i % 8 + 1, (1, 3, 4)[i // 8], 1 + i // 8
        write_gradient_video(root / f"Actor_{actor:02d}" / f"02-01-0{emotion}-01-01-0{take}-{actor:02d}.mp4")


def start(data: Path, out: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "orchestrator.cli", "preprocess", "--dataset", DATASET, "--root", str(data),
            "--out", str(out), "--workers", "2", "--clips-per-task", "2", "--size", "64", "--keep-faceless",
            "--no-progress"]
    return subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), int(fields[19])


def children(pid: int) -> dict[int, int]:
    """pid -> start time of every live child of ``pid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        stat = proc_stat(int(entry.name)) if entry.name.isdigit() else None
        if stat and stat[1] == pid and stat[0] != "Z":
            found[int(entry.name)] = stat[2]
    return found


def running(pid: int, start: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == start


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.02)


def kill_mid_run(tmp_path: Path, sig: signal.Signals) -> tuple[subprocess.Popen, dict[int, int]]:
    """Start a run, wait for its first finished clip, send ``sig``; returns the process and the
    children it had just before."""
    dataset(tmp_path / "data")
    proc = start(tmp_path / "data", tmp_path / "cache")
    try:
        wait_for(lambda: read_rows(tmp_path / "cache") or proc.poll() is not None, "a finished clip")
        workers = children(proc.pid)
        proc.send_signal(sig)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc, workers


@pytest.mark.slow
def test_sigkill_leaves_no_worker_and_the_resume_recomputes_no_finished_clip(tmp_path: Path) -> None:
    proc, workers = kill_mid_run(tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert len(workers) >= 2, "the pool's workers were running"
    wait_for(lambda: not any(running(p, s) for p, s in workers.items()), f"workers {sorted(workers)} to die")

    finished = read_rows(tmp_path / "cache")  # what the journals hold: every clip finished before the kill
    assert 0 < len(finished) < CLIPS, "killed mid-run"
    files = {row["clip"]: tmp_path / "cache" / row["cache_file"] for row in finished.values()}
    assert all(f.is_file() and f.parent.name == CLIPS_DIR for f in files.values())
    stamps = {clip: f.stat().st_mtime_ns for clip, f in files.items()}

    summary = run_preprocess(DATASET, tmp_path / "data", tmp_path / "cache", PreprocessSettings(size=64, keep_faceless=True),
                             workers=0, progress=False)
    assert (summary.skipped, summary.processed, summary.total) == (len(finished), CLIPS - len(finished), CLIPS)
    assert {clip: f.stat().st_mtime_ns for clip, f in files.items()} == stamps  # not one redone
    assert not (tmp_path / "cache" / "journal").exists()  # folded into manifest.csv


@pytest.mark.slow
def test_sigterm_stops_the_workers_and_keeps_every_finished_clip(tmp_path: Path) -> None:
    proc, workers = kill_mid_run(tmp_path, signal.SIGTERM)
    assert proc.returncode == 130, proc.stderr.read()
    err = proc.stderr.read()
    assert "mtcae preprocess: stopped; every finished clip is kept" in err and "Traceback" not in err
    wait_for(lambda: not any(running(p, s) for p, s in workers.items()), f"workers {sorted(workers)} to stop")
    finished = read_rows(tmp_path / "cache")
    summary = run_preprocess(DATASET, tmp_path / "data", tmp_path / "cache", PreprocessSettings(size=64, keep_faceless=True),
                             workers=0, progress=False)
    assert summary.skipped == len(finished) and summary.total == CLIPS
