"""The preprocessing caches a sweep trains on: check they exist, or build them from raw videos."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from model.encoders import resolve_encoder_config
from orchestrator.data import preprocess
from orchestrator.data.cache import (
    MANIFEST_FILE,
    SETTINGS_FILE,
    CacheSettingsError,
    load_settings,
)
from orchestrator.data.settings import PreprocessSettings
from orchestrator.sweep.errors import SweepError
from orchestrator.sweep.space import SweepSpace
from orchestrator.trial.config import TrialConfig

logger = logging.getLogger(__name__)


def check_caches_exist(space: SweepSpace, cache_root: Path, data_root: Path | None) -> None:
    """Fail early when a dataset has no preprocessing cache and no raw videos to build one from.

    Raises:
        SweepError: Naming the dataset, the expected cache folder and how to create it.
    """
    for dataset in space.datasets:
        target = cache_root / dataset
        if data_root is not None:
            if not (data_root / dataset).is_dir():
                raise SweepError(f"raw videos for dataset {dataset!r} not found at {data_root / dataset} "
                                 "(--data-root must hold one folder per dataset)")
        elif not (target / MANIFEST_FILE).is_file():
            raise SweepError(
                f"no preprocessing cache for dataset {dataset!r} at {target} (manifest.csv missing); "
                f"pass --data-root DIR with the raw videos under DIR/{dataset}, or run "
                f"`mtcae preprocess --dataset {dataset} --root RAW --out {target}` first"
            )


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
        logger.info("%s", summary.format())
        if summary.usable == 0:
            raise SweepError(f"no usable clip of dataset {dataset!r} in {target}; see its manifest.csv")


def check_encoders_fit(space: SweepSpace, cache_root: Path, data_root: Path | None) -> None:
    """Fail before scheduling when an encoder of the space cannot take a dataset's frames.

    The frame size and count come from the space's ``preprocess`` when the caches are built now
    (``data_root``), else from each existing cache. An LGI-Former's regions must tile its token
    grid (2x5x10 needs 160 px), and every encoder needs frames divisible by its patches.

    Raises:
        SweepError: Naming the encoder, the dataset and the frame geometry, with what fits.
    """
    defaults = PreprocessSettings()
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
                raise SweepError(f"encoder {encoder!r} does not fit dataset {dataset!r} at {frames} frames "
                                 f"of {size} px: {err} (set preprocess.size in the space, and use a "
                                 f"--cache root built at that size)") from err


def _encoders(space: SweepSpace) -> list[str]:
    """Every encoder preset a trial of ``space`` may use (fixed or searched)."""
    names = [str(space.fixed.get("encoder", TrialConfig.model_fields["encoder"].default))]
    for param in space.search.params if space.search else ():
        if param.name == "encoder":
            names += [str(v) for v in param.values]
    return names
