"""Tune's experiment-state upload racing its own state save: recognised, and kept out of the log.

The Tune controller saves its state into the driver's staging folder (``driver_artifacts``) and a
background thread uploads that folder to the Tune storage with ``pyarrow.fs.copy_files``. A save can
start while the previous upload still runs (a forced snapshot saves *before* it waits for that
upload; every stop ends with one). Searchers are saved atomically: a temporary
``.<uuid4>-tmp-<name>`` file, then ``os.replace``. When the upload has listed the temporary file and
the save renames it before the upload opens it, that upload fails with ``FileNotFoundError`` and Ray
logs the traceback (``ray.train._internal.syncer`` or ``ray.tune.execution.experiment_state``).

Nothing is lost: the renamed file holds the same state and the next upload carries it, and Tune's
last snapshot (``checkpoint(force=True, wait=True)`` when a run ends or is stopped) waits for its
upload with no save after it. So this failure, and only this one, is logged at DEBUG, in one line.
Any other upload failure, including a missing file that is not one of Tune's temporary files, is
logged by Ray exactly as before (reproduced for real in ``tests/test_tune_sync.py``).
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

#: Ray's loggers that report a failed upload of the staging folder.
SYNC_LOGGERS = ("ray.train._internal.syncer", "ray.tune.execution.experiment_state")

# The temporary names of Tune's atomic saves (ray.tune.utils.util._atomic_save, Searcher.save_to_dir).
_VANISHED_TEMP = re.compile(
    r"FileNotFoundError: .*?['\"]?(?P<path>[^'\"\s]*[/\\]\.[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}-tmp-[^'\"\s]+)"
)


def vanished_temp_file(record: logging.LogRecord) -> str | None:
    """The temporary file whose disappearance failed an upload, if that is what ``record`` reports."""
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        if not isinstance(error, FileNotFoundError):
            return None
        text = f"FileNotFoundError: {error}"
    elif "FileNotFoundError" not in text:
        return None
    lines = [line for line in text.splitlines() if line.strip()]
    match = _VANISHED_TEMP.search(lines[-1]) if lines else None  # the exception itself, not a frame
    return match.group("path") if match else None


class VanishedTempFileFilter(logging.Filter):
    """Turns Ray's report of the save/upload race into one DEBUG line; passes everything else."""

    def filter(self, record: logging.LogRecord) -> bool:
        path = vanished_temp_file(record)
        if path is None:
            return True
        logger.debug("Tune's state upload overlapped a state save (temporary file %s was renamed "
                     "meanwhile); the next upload carries the saved state", path)
        return False


_FILTER = VanishedTempFileFilter()


def install() -> None:
    """Put the filter on Ray's upload loggers (idempotent; in the process that runs ``Tuner.fit``)."""
    for name in SYNC_LOGGERS:
        target = logging.getLogger(name)
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
