"""Tune's state upload racing its own atomic save (orchestrator.sweep.tune_sync), reproduced for real.

A thread saves state with Ray's own ``_atomic_save`` into a staging folder while Ray's own
``_FilesystemSyncer`` uploads that folder again and again (pyarrow ``copy_files``), exactly the two
sides of the race in a Tune driver. Without the filter Ray logs the traceback; with it, one DEBUG
line; other upload failures are still logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ray.train._internal.storage import _FilesystemSyncer
from ray.tune.utils.util import _atomic_save

from orchestrator.sweep import tune_sync


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[dict[str, _Records]]:
    """Handlers on Ray's upload loggers and on tune_sync's own; the filter removed before and after."""
    names = (*tune_sync.SYNC_LOGGERS, tune_sync.__name__)
    handlers = {name: _Records() for name in names}
    levels = {}
    for name, handler in handlers.items():
        target = logging.getLogger(name)
        levels[name] = target.level
        target.setLevel(logging.DEBUG)
        target.addHandler(handler)
        target.filters = [f for f in target.filters if not isinstance(f, tune_sync.VanishedTempFileFilter)]
    yield handlers
    for name, handler in handlers.items():
        target = logging.getLogger(name)
        target.removeHandler(handler)
        target.setLevel(levels[name])
        target.filters = [f for f in target.filters if not isinstance(f, tune_sync.VanishedTempFileFilter)]


def _race(tmp_path: Path, done: Callable[[], bool], limit_s: float = 60.0) -> None:
    """Save atomically and upload the same folder at once until ``done()`` (or the limit)."""
    staging, storage = tmp_path / "driver_artifacts", tmp_path / "storage"
    staging.mkdir(parents=True)
    storage.mkdir(parents=True)
    stop = threading.Event()
    state = {"searcher": "x" * 200_000}

    def save() -> None:
        while not stop.is_set():
            _atomic_save(state, str(staging), "search_gen_state-s.json", "tmp-search_gen_state-s.json")

    saver = threading.Thread(target=save, daemon=True)
    saver.start()
    syncer = _FilesystemSyncer(storage_filesystem=None, sync_period=0)
    deadline = time.monotonic() + limit_s
    try:
        while not done() and time.monotonic() < deadline:
            syncer.sync_up(str(staging), str(storage))  # waits for the last upload, logs its failure
    finally:
        stop.set()
        saver.join()
        _wait_as_tune(syncer)


def _wait_as_tune(syncer: _FilesystemSyncer) -> None:
    """Wait for the last upload as Tune's experiment state does: a failure is logged, not raised."""
    try:
        syncer.wait()
    except Exception:
        logging.getLogger("ray.tune.execution.experiment_state").error(
            "Saving experiment state to storage failed with exception: ", exc_info=True)


def _ray_reports(handlers: dict[str, _Records]) -> list[logging.LogRecord]:
    return [r for name in tune_sync.SYNC_LOGGERS for r in handlers[name].records if r.levelno >= logging.WARNING]


def test_the_race_is_logged_by_ray_without_the_filter_and_one_debug_line_with_it(
    tmp_path: Path, captured: dict[str, _Records]
) -> None:
    _race(tmp_path / "a", lambda: bool(_ray_reports(captured)))
    reports = _ray_reports(captured)
    assert reports, "the race did not happen in 60 s: this test shows nothing"
    shown = logging.Formatter().format(reports[0])  # what the job log shows, traceback included
    assert "Traceback" in shown and "-tmp-search_gen_state" in shown
    assert tune_sync.vanished_temp_file(reports[0]).endswith("-tmp-search_gen_state-s.json")

    for name in tune_sync.SYNC_LOGGERS:  # what the unfiltered run logged, its last wait included
        captured[name].records.clear()
    tune_sync.install()
    tune_sync.install()  # idempotent
    assert sum(isinstance(f, tune_sync.VanishedTempFileFilter)
               for f in logging.getLogger(tune_sync.SYNC_LOGGERS[0]).filters) == 1
    own = captured[tune_sync.__name__].records
    _race(tmp_path / "b", lambda: bool(own))
    assert own, "the race did not happen in 60 s with the filter"
    assert "-tmp-search_gen_state-s.json" in own[0].getMessage() and own[0].levelno == logging.DEBUG
    assert not _ray_reports(captured), [logging.Formatter().format(r) for r in _ray_reports(captured)]


def _real_error(path: Path) -> FileNotFoundError:
    """The error pyarrow raises for a file that is not there (Ray's copy of the staging folder)."""
    import pyarrow.fs

    try:
        pyarrow.fs.LocalFileSystem().open_input_stream(str(path))
    except FileNotFoundError as err:
        return err
    raise AssertionError(f"{path} exists")


def test_other_upload_failures_are_still_logged(tmp_path: Path, captured: dict[str, _Records]) -> None:
    tune_sync.install()
    state_logger = logging.getLogger("ray.tune.execution.experiment_state")
    temp = tmp_path / ".0c4a5f2e-6c36-4bd1-9d1b-2f7f8c2a9e11-tmp-searcher-state-s.pkl"
    for error, kept in ((_real_error(temp), False), (_real_error(tmp_path / "experiment_state-s.json"), True),
                        (PermissionError(f"[Errno 13] Permission denied: '{temp}'"), True)):
        try:
            raise error
        except OSError:
            state_logger.error("Saving experiment state to storage failed with exception: ", exc_info=True)
    kept_records = captured["ray.tune.execution.experiment_state"].records
    assert [type(r.exc_info[1]) for r in kept_records] == [FileNotFoundError, PermissionError]
    assert "experiment_state-s.json" in str(kept_records[0].exc_info[1])
    assert len(captured[tune_sync.__name__].records) == 1
