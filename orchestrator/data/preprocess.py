"""Raw videos -> training cache: 16 sampled frames per clip plus MTCNN face boxes and landmarks.

The paper's multi-task labels (section 4.2, Fig. 3) do not ship with any dataset; they come from
running MTCNN over every sampled frame. Per clip this module

1. reads only the ``num_frames`` frames it needs and resizes them to ``size`` x ``size``
   (:mod:`orchestrator.data.video`: ``official`` or ``uniform`` sampling, ``squash`` or ``letterbox``,
   fallbacks for damaged streams),
2. runs facenet-pytorch MTCNN on all frames of one or several clips in a single batched call and
   keeps one face per frame as normalised ``[x, y, w, h]`` boxes and 5 points, frames without a
   face filled from the nearest valid frame and flagged invalid (:mod:`orchestrator.data.faces`),
3. writes ``clips/<clip_id>.npz`` atomically and a manifest row (see ``docs/design.md``).

This module holds the run loop (in-process, a spawn process pool, or Ray tasks) behind
:func:`run_preprocess`; the cache layout lives in :mod:`orchestrator.data.cache`, the settings in
:mod:`orchestrator.data.settings`.

Robustness: every clip's failure (missing, empty, unreadable, non-video, truncated, corrupt) is
caught and recorded with a reason; the run goes on. Each worker appends a clip's row to its own
journal (``<out>/journal/<host>-<pid>.jsonl``) the moment the clip is finished and the manifest is
rewritten atomically every few seconds, so a killed run loses no finished clip and a re-run skips
them; a source file whose size or mtime changed since is processed again. Workers die with their
parent (``PR_SET_PDEATHSIG``; stopped on Ctrl-C and SIGTERM), so a killed run leaves no process
writing into the cache. The settings (including the dataset's label protocol)
are hashed into ``settings.json``; a cache built with other settings is refused (use another
``--out`` or ``--overwrite``), never mixed.

Heavy dependencies (decord, facenet-pytorch) are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.cache import (
    CLIPS_DIR,
    MANIFEST_FILE,
    USABLE_STATUSES,
    append_journal,
    fold_journals,
    make_clip_ids,
    prepare_cache,
    settings_document,
    source_identity,
    source_stat,
    write_manifest,
    write_npz,
)
from orchestrator.data.datasets import (
    ClipRecord,
    DatasetAdapter,
    class_counts,
    get_dataset,
)
from orchestrator.data.faces import get_detector, select_faces
from orchestrator.data.settings import PreprocessSettings
from orchestrator.data.video import (
    ClipError,
    DecodedClip,
    read_clip,
    short_error,
)

log = logging.getLogger(__name__)


_MANIFEST_FLUSH_S = 5.0


@dataclass
class PreprocessSummary:
    """What a run produced (the CLI prints :meth:`format`).

    Attributes:
        out: The cache directory.
        total: Clips in the manifest.
        processed: Clips processed in this run.
        skipped: Selected clips already done by an earlier run.
        counts: Manifest clips per status.
        elapsed_s: Wall time of this run.
        failures: ``(clip, reason)`` of every failed clip.
        selected: The adapter's selection (after ``limit``): clips per class, in class order.
        usable_per_class: Usable clips of the selection per class, in class order.
    """

    out: Path
    total: int
    processed: int
    skipped: int
    counts: dict[str, int]
    elapsed_s: float
    failures: list[tuple[str, str]]
    selected: dict[str, int] = field(default_factory=dict)
    usable_per_class: dict[str, int] = field(default_factory=dict)

    @property
    def usable(self) -> int:
        """Clips that training can use (``ok`` + ``partial``)."""
        return sum(self.counts.get(s, 0) for s in USABLE_STATUSES)

    @property
    def clips_per_s(self) -> float:
        """Throughput over the clips processed in this run."""
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def format(self) -> str:
        """Multi-line human summary."""
        lines = [f"cache {self.out}: {self.total} clips, {self.usable} usable "
                 f"(ok {self.counts.get('ok', 0)}, partial {self.counts.get('partial', 0)}, "
                 f"failed {self.counts.get('failed', 0)}); processed {self.processed} now "
                 f"({self.clips_per_s:.2f} clips/s), {self.skipped} already done"]
        if self.selected:
            per_class = ", ".join(f"{name} {n} ({self.usable_per_class.get(name, 0)})"
                                  for name, n in self.selected.items())
            lines.append(f"selected {sum(self.selected.values())} clips, per class (usable): "
                         f"{per_class}")
        lines += [f"  failed: {clip}: {reason}" for clip, reason in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more failures (see manifest)")
        lines.append(f"manifest: {self.out / MANIFEST_FILE}")
        return "\n".join(lines)


# ---------------------------------------------------------------- one batch of clips (worker)


def process_clips(records: Sequence[ClipRecord], clip_ids: Sequence[str], root: str,
                  out: str, settings: PreprocessSettings, device: str = "auto",
                  journal: bool = False) -> list[dict]:
    """Decode, detect and write a batch of clips; returns one manifest row per clip.

    Runs in a worker process (or Ray task). Frames of all clips that decode are sent to MTCNN in
    one batched call. Never raises for a bad clip: the row records the reason. Every row carries
    the source file's ``content_hash`` and ``source_stat`` (:func:`source_identity`).

    Args:
        journal: Append each row to this process's journal in ``out`` the moment its clip is
            finished, so a run killed before the batch returns still knows the clip is done.
    """
    rows, decoded = [], []
    identity = {clip_id: source_identity(Path(root) / r.path) for r, clip_id in zip(records, clip_ids)}

    def finished(row: dict) -> None:
        row["content_hash"], row["source_stat"] = identity[row["clip_id"]]
        rows.append(row)
        if journal:
            with contextlib.suppress(OSError):  # the parent journals the returned rows too
                append_journal(Path(out), [row])

    for record, clip_id in zip(records, clip_ids):
        try:
            decoded.append((record, clip_id, read_clip(Path(root) / record.path, settings)))
        except ClipError as error:
            finished(_row(record, clip_id, "failed", str(error)))
        except Exception as error:  # anything else is still one clip's problem
            finished(_row(record, clip_id, "failed", f"unexpected error while decoding: "
                                                     f"{short_error(error)}"))
    for (record, clip_id, clip), detections in zip(decoded, _detect_all(decoded, settings, device)):
        try:
            finished(_finish_clip(record, clip_id, clip, detections, Path(out), settings))
        except Exception as error:  # e.g. a full cache disk: recorded (--retry-failed redoes it)
            finished(_row(record, clip_id, "failed", f"could not label or write the clip: "
                                                     f"{short_error(error)}"))
    return rows


def _detect_all(decoded: list[tuple[ClipRecord, str, DecodedClip]], settings: PreprocessSettings,
                device: str) -> list[list | str]:
    """Per clip: its frames' detections, or an error string."""
    if not decoded:
        return []
    detector = get_detector(settings, device)
    t = settings.num_frames
    try:
        flat = detector.detect(np.concatenate([c.frames for _, _, c in decoded]))
        return [flat[i * t:(i + 1) * t] for i in range(len(decoded))]
    except Exception as error:
        log.warning("batched face detection failed (%s); retrying clip by clip", short_error(error))
    results: list[list | str] = []
    for _, _, clip in decoded:
        try:
            results.append(detector.detect(clip.frames))
        except Exception as error:
            results.append(f"face detection failed: {short_error(error)}")
    return results


def _finish_clip(record: ClipRecord, clip_id: str, clip: DecodedClip, detections: list | str,
                 out: Path, settings: PreprocessSettings) -> dict:
    if isinstance(detections, str):
        return _row(record, clip_id, "failed", detections)
    labels = select_faces(detections, settings.size)
    n_valid = int(labels.valid.sum())
    notes = list(clip.notes)
    first = int(clip.truncated)  # a truncation note stays first in the reason
    if n_valid == 0 and not settings.keep_faceless:
        notes.insert(first, f"no face detected in any of the {settings.num_frames} sampled frames")
        return _row(record, clip_id, "failed", "; ".join(notes), padded=clip.padded)
    if n_valid < settings.num_frames:
        notes.insert(first, f"no face in {settings.num_frames - n_valid} of {settings.num_frames} "
                            f"frames (filled from the nearest face, marked invalid)")
    cache_file = f"{CLIPS_DIR}/{clip_id}.npz"
    write_npz(out / cache_file, frames=clip.frames, boxes=labels.boxes,
              landmarks=labels.landmarks, valid=labels.valid,
              label=np.array(record.label, np.int64), subject=np.array(record.subject))
    status = "ok" if n_valid == settings.num_frames and not clip.truncated else "partial"
    return _row(record, clip_id, status, "; ".join(notes), n_valid, clip.padded, cache_file)


def _row(record: ClipRecord, clip_id: str, status: str, reason: str, valid_frames: int = 0,
         padded: bool = False, cache_file: str = "") -> dict:
    return {"clip": record.path, "clip_id": clip_id, "status": status, "reason": reason,
            "label": record.label, "label_name": record.label_name, "subject": record.subject,
            "valid_frames": valid_frames, "padded": padded, "cache_file": cache_file,
            "content_hash": "", "source_stat": ""}


# ---------------------------------------------------------------- the cache directory


def _todo(records: Sequence[ClipRecord], rows: dict[str, dict], root: Path, out: Path,
          retry_failed: bool) -> list[tuple[ClipRecord, str]]:
    """The clips to process now, with their ids: new ones, changed ones (logged) and unfinished ones.

    A source whose size or mtime moved is hashed again: same bytes (touched, copied) keep their
    row, with the new stat; other bytes are processed again.
    """
    moved = {r.path for r in records if r.path in rows and rows[r.path].get("source_stat")
             and rows[r.path]["source_stat"] != _stat_or_empty(root / r.path)}
    changed = set()
    for path in moved:
        content, stat = source_identity(root / path)
        if content and content == rows[path].get("content_hash"):
            rows[path] = {**rows[path], "source_stat": stat}
        else:
            changed.add(path)
    if changed:
        log.warning("%d clip(s) changed on disk since they were cached (e.g. %s): processing them "
                    "again", len(changed), min(changed))
    return [(r, i) for r, i in zip(records, make_clip_ids(records))
            if r.path not in rows or r.path in changed or not _is_done(rows[r.path], out, retry_failed)]


def _is_done(row: dict, out: Path, retry_failed: bool) -> bool:
    if row.get("status") in USABLE_STATUSES:
        return bool(row.get("cache_file")) and (out / row["cache_file"]).is_file()
    return row.get("status") == "failed" and not retry_failed


def _stat_or_empty(path: Path) -> str:
    try:
        return source_stat(os.stat(path))
    except OSError:
        return ""


# ---------------------------------------------------------------- the run


def run_preprocess(dataset: str | DatasetAdapter, root: str | os.PathLike[str],
                   out: str | os.PathLike[str], settings: PreprocessSettings | None = None, *,
                   workers: int | None = None, device: str = "auto", use_ray: bool | None = None,
                   overwrite: bool = False, retry_failed: bool = False, clips_per_task: int = 4,
                   limit: int | None = None, progress: bool = True) -> PreprocessSummary:
    """Preprocess every clip of a dataset into the cache at ``out`` (resumable).

    Args:
        dataset: Dataset name (see ``orchestrator.data.datasets.DATASETS``) or adapter.
        root: Dataset root.
        out: Cache directory.
        settings: Preprocessing settings (defaults: the paper's 16 x 224 official sampling).
        workers: Worker processes; 0 runs in this process; default ``min(4, cpu count)``.
        device: MTCNN device (``auto``, ``cpu``, ``cuda``, ``cuda:1``...).
        use_ray: Run Ray tasks; default: when a Ray cluster is already initialised here.
        overwrite: Delete an existing cache at ``out`` first.
        retry_failed: Re-process clips recorded as failed (they are skipped by default).
        clips_per_task: Clips per worker task (their frames share one MTCNN call).
        limit: Only the first ``limit`` clips (by path), for smoke tests.
        progress: Show a tqdm bar.

    Raises:
        CacheSettingsError: ``out`` holds a cache built with other settings or from another root.
        CacheWriteError: ``out`` cannot be written (the path and the operation named).
        FileNotFoundError, DatasetLayoutError: The root has no clips of this dataset.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the workers are stopped, finished clips are kept.
    """
    adapter = get_dataset(dataset) if isinstance(dataset, str) else dataset
    settings = settings or PreprocessSettings()
    out = Path(out)
    records = adapter.scan(root)[:limit] if limit else adapter.scan(root)
    prepare_cache(out, settings_document(adapter, settings), overwrite, root=root)
    rows = fold_journals(out)  # no worker of ours runs yet: a killed run's journals are folded in
    todo = _todo(records, rows, Path(root), out, retry_failed)
    skipped = len(records) - len(todo)
    log.info("%d clips to process, %d already done in %s", len(todo), skipped, out)
    start = time.perf_counter()
    journal = _Journal(out, rows)
    complete = False
    try:
        with _sigterm_as_interrupt():
            ray = _want_ray(use_ray)
            workers = min(4, os.cpu_count() or 1) if workers is None and not ray else workers
            per_task = balanced_task_size(len(todo), clips_per_task, workers or 1)
            runner = _run_ray if ray else _run_local
            runner([list(c) for c in _chunks(todo, per_task)], str(Path(root)), out, settings,
                   device, workers, journal, progress)
        complete = True
    finally:
        journal.flush(drop_journals=complete)  # after a stop, stray writers may still append
    summary = _summary(out, rows, len(todo), skipped, time.perf_counter() - start)
    summary.selected, summary.usable_per_class = _class_counts(adapter, records, rows)
    return summary


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, ``kill``) unwinds like Ctrl-C: workers are stopped and the
    manifest is written, instead of the process vanishing and leaving its pool behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _summary(out: Path, rows: dict[str, dict], processed: int, skipped: int,
             elapsed: float) -> PreprocessSummary:
    counts = Counter(r["status"] for r in rows.values())
    failures = sorted((r["clip"], r["reason"]) for r in rows.values() if r["status"] == "failed")
    return PreprocessSummary(out, len(rows), processed, skipped, dict(counts), elapsed, failures)


def _class_counts(adapter: DatasetAdapter, records: list[ClipRecord],
                  rows: dict[str, dict]) -> tuple[dict[str, int], dict[str, int]]:
    """Selected and usable clips per class name, in the adapter's class order."""
    usable = [r for r in records if rows.get(r.path, {}).get("status") in USABLE_STATUSES]
    return (class_counts(records, adapter.class_names),
            class_counts(usable, adapter.class_names))


def balanced_task_size(num_clips: int, clips_per_task: int, workers: int) -> int:
    """Clips per task: at most ``clips_per_task``, fewer when that would leave workers idle."""
    return max(1, min(clips_per_task, -(-num_clips // max(1, workers))))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    size = max(1, size)
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _Journal:
    """Collects finished rows: appended to the journal at once, manifest rewritten every few s."""

    def __init__(self, out: Path, rows: dict[str, dict]) -> None:
        self.out, self.rows, self.last_flush = out, rows, time.monotonic()

    def add(self, new_rows: list[dict]) -> None:
        append_journal(self.out, new_rows)  # workers journaled theirs already: a safety net
        for row in new_rows:
            self.rows[row["clip"]] = row
        if time.monotonic() - self.last_flush > _MANIFEST_FLUSH_S:
            self.flush(drop_journals=False)

    def flush(self, drop_journals: bool) -> None:
        write_manifest(self.out, self.rows.values(), drop_journals)
        self.last_flush = time.monotonic()


Task = list[tuple[ClipRecord, str]]


def _call(task: Task, root: str, out: Path, settings: PreprocessSettings,
          device: str) -> list[dict]:
    return process_clips([r for r, _ in task], [i for _, i in task], root, str(out), settings,
                         device, journal=True)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="clip", desc="preprocess", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


def _run_local(tasks: list[Task], root: str, out: Path, settings: PreprocessSettings,
               device: str, workers: int | None, journal: _Journal, progress: bool) -> None:
    workers = workers or 0
    bar = _progress(sum(len(t) for t in tasks), progress)
    done = _make_reporter(journal, bar)
    try:
        if workers <= 0:
            with _torch_threads(1):
                for task in tasks:
                    done(_call(task, root, out, settings, device))
        else:
            crashed = _run_pool(tasks, root, out, settings, device, workers, done)
            _run_isolated(crashed, root, out, settings, device, done)
    finally:
        bar.close()


def _make_reporter(journal: _Journal, bar: Any) -> Callable[[list[dict]], None]:
    def done(rows: list[dict]) -> None:
        journal.add(rows)
        bar.update(len(rows))
        bar.set_postfix(failed=sum(r["status"] == "failed" for r in journal.rows.values()),
                        refresh=False)
    return done


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """MTCNN is many small ops: one intra-op thread is fastest on a busy CPU (measured 3x on a
    shared 2-core machine); parallelism comes from worker processes instead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_worker(threads: int, parent: int) -> None:
    import torch

    _die_with_parent(parent)
    torch.set_num_threads(threads)


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this worker when its parent dies (Linux ``PR_SET_PDEATHSIG``), so a
    SIGKILLed run leaves no worker writing into the cache; exit now if the parent is gone already."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A spawn-context process pool whose workers split the CPU threads evenly and die with this
    process (also used by the benchmark to time warm workers)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(max_workers=workers, initializer=_init_worker,
                               initargs=(threads, os.getpid()),
                               mp_context=multiprocessing.get_context("spawn"))


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started and terminate the workers now (``shutdown`` alone would let
    each finish its batch). ``_processes`` is private; Python 3.14 adds ``terminate_workers``."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()


def _run_pool(tasks: list[Task], root: str, out: Path, settings: PreprocessSettings, device: str,
              workers: int, done: Callable[[list[dict]], None]) -> list[Task]:
    """Run tasks on a spawn process pool; returns the tasks lost to a crashed worker."""
    crashed: list[Task] = []
    with worker_pool(workers) as pool:
        futures: dict[Future, Task] = {pool.submit(_call, t, root, out, settings, device): t
                                       for t in tasks}
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    try:
                        done(future.result())
                    except BrokenProcessPool:
                        crashed.append(futures[future])
        except BaseException:
            _stop_workers(pool)
            raise
    return crashed


def _run_isolated(tasks: list[Task], root: str, out: Path, settings: PreprocessSettings,
                  device: str, done: Callable[[list[dict]], None]) -> None:
    """Clips whose worker crashed (e.g. a decoder segfault): one at a time, one fresh process
    each time a crash happens, so the culprit is identified and recorded."""
    clips = [item for task in tasks for item in task]
    if clips:
        log.warning("a worker process crashed; re-running %d clip(s) one by one", len(clips))
    pool = None
    try:
        for record, clip_id in clips:
            pool = pool or worker_pool(1)
            try:
                done(pool.submit(_call, [(record, clip_id)], root, out, settings, device).result())
            except BrokenProcessPool:
                pool = None
                done([_row(record, clip_id, "failed",
                           "the decoder crashed the worker process (corrupt video?)")])
    except BaseException:
        if pool is not None:
            _stop_workers(pool)
        raise
    if pool is not None:
        pool.shutdown()


def _want_ray(use_ray: bool | None) -> bool:
    if use_ray is not None:
        return use_ray
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


GPU_SHARE = 0.25  # four MTCNN tasks share one GPU (the detector is small; decoding needs the CPUs)


def ray_task_options(device: str, cluster: dict[str, float]) -> dict[str, object]:
    """Resources of one preprocessing task: a GPU share whenever the *cluster* has GPUs.

    The device is decided by the cluster, not by the driver: on a CPU-only head of a GPU cluster,
    ``auto`` still sends MTCNN to the GPU workers (each task resolves ``auto`` on its own node,
    where Ray has made its GPU share visible). ``cpu`` keeps every task off the GPUs. Tasks are
    spread over the nodes.
    """
    wants_gpu = device.startswith("cuda") or (device == "auto" and cluster.get("GPU", 0) > 0)
    return {"num_cpus": 1, "num_gpus": GPU_SHARE if wants_gpu else 0, "scheduling_strategy": "SPREAD"}


def _run_ray(tasks: list[Task], root: str, out: Path, settings: PreprocessSettings, device: str,
             workers: int | None, journal: _Journal, progress: bool) -> None:
    """Ray tasks (``root`` and ``out`` must be on storage every node sees)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    remote = ray.remote(**ray_task_options(device, ray.cluster_resources()))(_call)
    limit = workers or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    bar = _progress(sum(len(t) for t in tasks), progress)
    done = _make_reporter(journal, bar)
    queue, running = list(reversed(tasks)), {}
    try:
        while queue or running:
            while queue and len(running) < limit:
                task = queue.pop()
                running[remote.remote(task, root, out, settings, device)] = task
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                task = running.pop(ref)
                try:
                    done(ray.get(ref))
                except ray.exceptions.RayError as error:
                    done([_row(r, i, "failed", f"ray task failed: {short_error(error)}")
                          for r, i in task])
    except BaseException:
        for ref in running:  # stopped: no task keeps writing into the cache
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
