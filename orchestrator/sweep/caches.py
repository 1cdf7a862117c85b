"""The preprocessing caches a sweep trains on: pre-flight checks before scheduling, and building them.

:func:`preflight` checks everything a sweep can know before it schedules a trial (caches exist or
can be built, every encoder fits the frames, folds can be made from each dataset's subjects, a
cache has usable clips) and reports every problem at once; :func:`build_caches` preprocesses raw
videos into the caches.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import pandas as pd

from model.encoders import resolve_encoder_config
from orchestrator.data import preprocess
from orchestrator.data.cache import (
    MANIFEST_FILE,
    SETTINGS_FILE,
    CacheSettingsError,
    CacheWriteError,
    load_manifest,
    load_settings,
)
from orchestrator.data.datasets import DatasetLayoutError
from orchestrator.data.folds import load_split_file, make_folds, read_folds, write_folds
from orchestrator.data.settings import PreprocessSettings
from orchestrator.sweep.errors import SweepError
from orchestrator.sweep.space import SweepSpace
from orchestrator.trial.config import TrialConfig
from orchestrator.trial.data import FOLD_SEED

logger = logging.getLogger(__name__)


def preflight(space: SweepSpace, cache_root: Path, data_root: Path | None) -> None:
    """Fail before anything is scheduled when a trial of ``space`` could not run, naming every reason.

    With ``data_root`` the caches are built later: their folds are checked once they exist
    (:func:`check_folds`, called again by the sweep after :func:`build_caches`).

    Raises:
        SweepError: One line per problem, each naming the dataset and what to do.
    """
    problems = (cache_problems(space, cache_root, data_root) + encoder_problems(space, cache_root, data_root)
                + checkpoint_problems(space))
    if data_root is None:
        problems += fold_problems(space, cache_root)
    _raise(problems)


def check_folds(space: SweepSpace, cache_root: Path) -> None:
    """:func:`fold_problems` as an error (after the caches were built).

    Raises:
        SweepError: One line per dataset whose folds cannot be made.
    """
    _raise(fold_problems(space, cache_root))


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise SweepError(problems[0])
    if problems:
        raise SweepError(f"the sweep cannot start ({len(problems)} problems):\n" +
                         "\n".join(f"  - {p}" for p in problems))


def cache_problems(space: SweepSpace, cache_root: Path, data_root: Path | None) -> list[str]:
    """A dataset without a preprocessing cache and without raw videos to build one from."""
    problems = []
    for dataset in space.datasets:
        target = cache_root / dataset
        if data_root is not None:
            if not (data_root / dataset).is_dir():
                problems.append(f"raw videos for dataset {dataset!r} not found at {data_root / dataset} "
                                "(--data-root must hold one folder per dataset)")
        elif not (target / MANIFEST_FILE).is_file():
            problems.append(
                f"no preprocessing cache for dataset {dataset!r} at {target} ({MANIFEST_FILE} missing); "
                f"pass --data-root DIR with the raw videos under DIR/{dataset}, or run "
                f"`mtcae preprocess --dataset {dataset} --root RAW --out {target}` first")
    return problems


def encoder_problems(space: SweepSpace, cache_root: Path, data_root: Path | None) -> list[str]:
    """An encoder of the space that cannot take a dataset's frames.

    The frame size and count come from the space's ``preprocess`` when the caches are built now
    (``data_root``), else from each existing cache. An LGI-Former's regions must tile its token
    grid (2x5x10 needs 160 px), and every encoder needs frames divisible by its patches.
    """
    defaults, problems = PreprocessSettings(), []
    for dataset in space.datasets:
        if data_root is not None:
            size, frames = space.preprocess.get("size", defaults.size), defaults.num_frames
        elif (cache_root / dataset / SETTINGS_FILE).is_file():
            settings = load_settings(cache_root / dataset)
            size, frames = settings["size"], settings["num_frames"]
        else:
            continue
        for encoder in _encoders(space):
            try:
                resolve_encoder_config(encoder, img_size=size, num_frames=frames)
            except ValueError as err:
                problems.append(f"encoder {encoder!r} does not fit dataset {dataset!r} at {frames} frames "
                                f"of {size} px: {err} (set preprocess.size in the space, and use a "
                                f"--cache root built at that size)")
    return problems


def fold_problems(space: SweepSpace, cache_root: Path) -> list[str]:
    """A cache with no usable clip, too few subjects (or classes) for the space's folds, or a split
    file that does not fit it."""
    problems = []
    for dataset in space.datasets:
        target = cache_root / dataset
        if not (target / MANIFEST_FILE).is_file():
            continue
        manifest = load_manifest(target)
        if manifest.empty:
            problems.append(f"the cache of dataset {dataset!r} at {target} has no usable clip (every clip "
                            f"failed; the reasons are in {target / MANIFEST_FILE})")
            continue
        missing = _classes_without_clips(target, manifest)
        if missing:
            problems.append(f"the cache of dataset {dataset!r} at {target} has no usable clip of class(es) "
                            f"{missing}: UAR over its classes is undefined (see {target / MANIFEST_FILE})")
        if space.split_file:
            try:
                load_split_file(space.split_file, manifest)
            except (OSError, ValueError) as err:
                problems.append(f"the split file {space.split_file} does not fit dataset {dataset!r} "
                                f"({target}): {err}")
            continue
        try:
            make_folds(manifest, n_folds=space.n_folds, seed=FOLD_SEED)
        except ValueError as err:
            subjects = manifest["subject"].nunique()
            problems.append(f"dataset {dataset!r} ({subjects} subjects with usable clips in {target}) cannot "
                            f"be split into n_folds={space.n_folds} subject-independent folds: {err}")
    return problems


def sweep_folds(space: SweepSpace, cache_root: Path, sweep_dir: Path) -> dict[str, str]:
    """The folds of every dataset as data: ``<sweep_dir>/folds/<dataset>.json``, written once.

    They come from the space's ``split_file`` or are computed (subject-independent, stratified,
    seed 0); every trial reads its fold from the file. A resumed sweep keeps the file it started
    with, and refuses to go on when the cache no longer fits it.

    Returns:
        Dataset -> absolute path of its folds file.

    Raises:
        SweepError: The split file or the stored folds do not fit the cache, naming the file.
    """
    files = {}
    for dataset in space.datasets:
        target, manifest = sweep_dir / "folds" / f"{dataset}.json", load_manifest(cache_root / dataset)
        try:
            if target.is_file():
                read_folds(target, manifest)
            elif space.split_file:
                write_folds(target, load_split_file(space.split_file, manifest), dataset, space.split_file)
            else:
                folds = make_folds(manifest, n_folds=space.n_folds, seed=FOLD_SEED)
                write_folds(target, folds, dataset, f"computed (n_folds={space.n_folds}, seed={FOLD_SEED})")
        except (OSError, ValueError) as err:
            raise SweepError(f"folds of dataset {dataset!r}: {err}") from err
        files[dataset] = str(target.resolve())
    return files


def checkpoint_problems(space: SweepSpace) -> list[str]:
    """An encoder checkpoint the space names that is not a readable file (read in full by each trial)."""
    path = space.fixed.get("encoder_checkpoint")
    if not path:
        return []
    file = Path(str(path)).expanduser()
    if not file.is_file():
        return [f"fixed.encoder_checkpoint: no file at {file} (a local checkpoint file; nothing is downloaded)"]
    if not os.access(file, os.R_OK):
        return [f"fixed.encoder_checkpoint: {file} is not readable"]
    return []


def _classes_without_clips(cache: Path, manifest: pd.DataFrame) -> list[str]:
    """Class names of the cache's protocol that no usable clip has."""
    if not (cache / SETTINGS_FILE).is_file():
        return []
    names = load_settings(cache).get("class_names", [])
    present = set(manifest["label"].astype(int))
    return [name for label, name in enumerate(names) if label not in present]


def _encoders(space: SweepSpace) -> list[str]:
    """Every encoder preset a trial of ``space`` may use (fixed or searched)."""
    names = [str(space.fixed.get("encoder", TrialConfig.model_fields["encoder"].default))]
    for param in space.search.params if space.search else ():
        if param.name == "encoder":
            names += [str(v) for v in param.values]
    return names


def build_caches(space: SweepSpace, cache_root: Path, data_root: Path) -> None:
    """Preprocess ``<data_root>/<dataset>`` into ``<cache_root>/<dataset>`` for every dataset.

    Clips already cached with the same settings are skipped, so this is cheap on a re-run; with Ray
    initialised the clips are processed as Ray tasks across the cluster.

    Raises:
        SweepError: The cache holds other settings, or no clip of a dataset is usable.
    """
    known = {f.name for f in dataclasses.fields(PreprocessSettings)}
    settings = PreprocessSettings(**{k: v for k, v in space.preprocess.items() if k in known})
    for dataset in space.datasets:
        target = cache_root / dataset
        logger.info("preprocessing %s from %s into %s", dataset, data_root / dataset, target)
        try:
            summary = preprocess.run_preprocess(dataset, data_root / dataset, target, settings,
                                                workers=space.preprocess.get("workers"))
        except CacheSettingsError as err:
            raise SweepError(f"{err} (use another --cache, or delete {target} to rebuild it)") from err
        except (DatasetLayoutError, FileNotFoundError, CacheWriteError) as err:
            raise SweepError(f"cannot build the {dataset!r} cache from --data-root: {err}") from err
        logger.info("%s", summary.format())
        if summary.usable == 0:
            raise SweepError(f"no usable clip of dataset {dataset!r} in {target}; see its manifest.csv")
