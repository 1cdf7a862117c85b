"""Tune's experiment snapshots in storage: restore from the newest whole one, set damaged ones aside.

Each Tune session (a driver's run of one stage) snapshots its experiment into storage as one set of
files named by the session's start time ``S``: ``experiment_state-S.json`` (trials),
``search_gen_state-S.json`` and ``searcher-state-S.pkl`` (the searcher; ``basic-variant-state-S.json``
for a grid), ``callback-states-S.pkl``
(callbacks, when any has state), beside ``tuner.pkl``. Tune's upload is a plain copy, so a driver
killed mid-upload leaves some of them empty or cut short, or missing. Tune then takes the newest file
of each kind on its own, fails to parse one, logs a traceback and starts the experiment over from
nothing, or mixes one session's trials with another's searcher.

:func:`usable_snapshot` checks the sets before a restore: it keeps the newest session whose every
file reads back, moves every file of a newer session into ``unreadable/`` (kept, for whoever wants
to look), and says with one warning per file what was set aside. When no session is whole, the
stage starts a new Tune run: the Optuna storage and MLflow, not Tune's snapshot, hold what finished
(see :class:`~orchestrator.sweep.searcher.StudySearcher`), so nothing recorded trains again.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs

logger = logging.getLogger(__name__)

TUNER_FILE = "tuner.pkl"
SET_ASIDE = "unreadable"


def _read_json(data: bytes) -> None:
    json.loads(data)


def _read_pickle(data: bytes) -> None:
    import ray.cloudpickle

    ray.cloudpickle.loads(data)  # as Tune loads them


# File name pattern of each kind of snapshot file (``{}``: the session) -> how it reads back.
KINDS: dict[str, Callable[[bytes], None]] = {
    "experiment_state-{}.json": _read_json,
    "search_gen_state-{}.json": _read_pickle,  # a cloudpickle, whatever its suffix says
    "basic-variant-state-{}.json": _read_pickle,  # the grid of stage cv; a cloudpickle too
    "searcher-state-{}.pkl": _read_pickle,
    "callback-states-{}.pkl": _read_pickle,
}


@dataclass
class Snapshot:
    """What :func:`usable_snapshot` found in one Tune experiment folder.

    Attributes:
        session: The newest session whose files all read back (None: none does).
        set_aside: Files moved into ``unreadable/``, each with why.
    """

    session: str | None
    set_aside: list[tuple[str, str]] = field(default_factory=list)


def _problem(fs: pyarrow.fs.FileSystem, path: str, read: Callable[[bytes], None]) -> str | None:
    """Why ``path`` does not read back, or None when it does."""
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.readall()
    except OSError as error:
        return f"cannot be read: {error}"
    if not data:
        return "is empty"
    try:
        read(data)
    except Exception as error:  # noqa: BLE001  (any decoding error: the file is cut short or garbled)
        return f"does not decode ({type(error).__name__}: {error}; {len(data)} bytes)"
    return None


def _drop_staged_copies(experiment_name: str, names: list[str]) -> None:
    """Delete this Ray session's staged copies of the files set aside.

    A driver stopped on a running cluster (``ray job stop``) leaves Tune's staging folder behind in
    the cluster's session, with the snapshot it was uploading whole there; the resumed run stages
    into the same folder and Tune reads its searcher state from it, newest first, so a set-aside
    session would come back through it and meet the older session's trials. The staged copies are
    only copies: storage keeps the set-aside files in ``unreadable/``.
    """
    import ray

    if not names or not ray.is_initialized():
        return
    from ray.train.constants import _get_ray_train_session_dir

    # Tune's own (private) helper for where it stages; the layout is <timestamp>/<name>/driver_artifacts.
    for staging in Path(_get_ray_train_session_dir()).glob(f"*/{experiment_name}/driver_artifacts"):
        for name in names:
            (staging / name).unlink(missing_ok=True)


def usable_snapshot(experiment: str) -> Snapshot:
    """Keep the newest whole snapshot of the Tune experiment at ``experiment``; set the rest aside.

    A session is whole when it has a file of every kind that any session has, and each reads back.
    Every file of a session newer than the one kept (or of every session, when none is whole, and
    then ``tuner.pkl`` too) moves to ``<experiment>/unreadable/``, so Tune's restore picks the kept
    set or :func:`can_restore` says no.

    Args:
        experiment: The experiment folder (local path or a ``pyarrow`` URI such as ``s3://...``).

    Returns:
        The session kept and what was set aside.
    """
    from ray.train._internal.storage import get_fs_and_path

    fs, root = get_fs_and_path(experiment)  # the path resolved as Tune resolves it (Tuner.can_restore)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    names = {info.base_name for info in infos if info.type == pyarrow.fs.FileType.File}
    sessions: dict[str, dict[str, str]] = {}  # session -> kind -> file name
    for kind in KINDS:
        prefix, suffix = kind.split("{}")
        for name in fnmatch.filter(names, kind.format("*")):
            sessions.setdefault(name[len(prefix):len(name) - len(suffix)], {})[kind] = name
    kinds = {kind for files in sessions.values() for kind in files}
    problems: dict[str, str] = {}
    kept = None
    if TUNER_FILE in names and (problem := _problem(fs, f"{root}/{TUNER_FILE}", _read_pickle)):
        problems[TUNER_FILE] = problem  # Tune cannot restore without it: no session is of use
    else:
        for session in sorted(sessions, reverse=True):
            files = sessions[session]
            for kind in sorted(kinds - set(files)):
                problems[kind.format(session)] = "is missing"
            for kind, name in files.items():
                if problem := _problem(fs, f"{root}/{name}", KINDS[kind]):
                    problems[name] = problem
            if not any(kind.format(session) in problems for kind in kinds):
                kept = session
                break
    aside = sorted(name for s, files in sessions.items() if kept is None or s > kept for name in files.values())
    if kept is None and TUNER_FILE in names:
        aside.append(TUNER_FILE)  # nothing to restore: the stage starts a new Tune run
    snapshot = Snapshot(kept)
    if not aside and not problems:
        return snapshot
    fs.create_dir(f"{root}/{SET_ASIDE}", recursive=True)
    for name in aside:
        fs.move(f"{root}/{name}", f"{root}/{SET_ASIDE}/{name}")
    _drop_staged_copies(root.rstrip("/").rsplit("/", 1)[-1], aside)
    for name in sorted(set(aside) | set(problems)):
        why = problems.get(name, "has no whole snapshot beside it" if name == TUNER_FILE
                           else "belongs to a snapshot that is not whole")
        snapshot.set_aside.append((name, why))
        logger.warning("Tune snapshot file %s/%s %s (a driver stopped while saving it?)%s", experiment, name,
                       why, f"; moved to {SET_ASIDE}/" if name in aside else "")
    if kept:
        logger.warning("resuming Tune experiment %s from its snapshot of %s instead; trials whose result "
                       "MLflow holds are not trained again", experiment, kept)
    else:
        logger.warning("no whole Tune snapshot left in %s: its stage starts a new Tune run, taking what "
                       "finished from the Optuna storage and MLflow (nothing recorded trains again)", experiment)
    return snapshot
