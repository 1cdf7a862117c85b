"""Read side of the preprocessing cache: manifest, settings and a torch ``Dataset`` of clips.

The trainable never decodes raw video: it reads ``<cache>/clips/<clip_id>.npz`` files written by
``orchestrator.preprocess`` (layout in ``docs/design.md``).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from orchestrator.preprocess import (MANIFEST_FILE, USABLE_STATUSES, load_settings,
                                     read_manifest_csv)

__all__ = ["ClipDataset", "load_manifest", "load_settings", "cache_class_names"]

NPZ_KEYS = ("frames", "boxes", "landmarks", "valid", "label", "subject")


def load_manifest(cache_dir: str | os.PathLike[str], usable_only: bool = True) -> pd.DataFrame:
    """The cache's manifest (columns as in ``docs/design.md``), sorted by ``clip_id``.

    Args:
        cache_dir: Cache directory written by ``mtcae preprocess``.
        usable_only: Keep only clips with a cache file and status ``ok`` or ``partial``.

    Raises:
        FileNotFoundError: No manifest in ``cache_dir``.
    """
    path = Path(cache_dir) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}; run `mtcae preprocess --out {cache_dir}`")
    frame = read_manifest_csv(path)
    if usable_only:
        frame = frame[frame["status"].isin(USABLE_STATUSES) & (frame["cache_file"] != "")]
    return frame.sort_values("clip_id").reset_index(drop=True)


def cache_class_names(cache_dir: str | os.PathLike[str]) -> list[str]:
    """Class names of the cache's label protocol, index = label id."""
    return list(load_settings(cache_dir)["class_names"])


class ClipDataset(Dataset):
    """Clips of a preprocessing cache.

    Each item is a dict: ``video`` uint8 (T, S, S, 3), ``boxes`` float32 (T, 4), ``landmarks``
    float32 (T, 5, 2), ``valid`` bool (T,), ``label`` int64 (), ``clip_id`` str. Normalisation to
    float happens on the device (``model.encoder.normalize_video``), not here.

    Args:
        cache_dir: Cache directory.
        clip_ids: Clips to serve (e.g. one fold's ``train``); default all usable clips.
    """

    def __init__(self, cache_dir: str | os.PathLike[str],
                 clip_ids: list[str] | None = None) -> None:
        self.cache_dir = Path(cache_dir)
        manifest = load_manifest(cache_dir, usable_only=True)
        files = dict(zip(manifest["clip_id"], manifest["cache_file"]))
        self.clip_ids = list(manifest["clip_id"]) if clip_ids is None else list(clip_ids)
        unknown = [c for c in self.clip_ids if c not in files]
        if unknown:
            raise KeyError(f"{len(unknown)} clip id(s) are not usable clips of the cache "
                           f"{cache_dir}, e.g. {unknown[:3]}")
        self.files = [self.cache_dir / files[c] for c in self.clip_ids]

    def __len__(self) -> int:
        return len(self.clip_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arrays = _load_npz(self.files[index])
        return {
            "video": torch.from_numpy(arrays["frames"]),        # (T, S, S, 3) uint8
            "boxes": torch.from_numpy(arrays["boxes"]),         # (T, 4)
            "landmarks": torch.from_numpy(arrays["landmarks"]),  # (T, 5, 2)
            "valid": torch.from_numpy(arrays["valid"]),          # (T,)
            "label": torch.tensor(int(arrays["label"]), dtype=torch.int64),
            "clip_id": self.clip_ids[index],
        }

    @property
    def labels(self) -> list[int]:
        """Label of every clip, from the manifest (no file reads)."""
        manifest = load_manifest(self.cache_dir).set_index("clip_id")
        return [int(manifest.at[c, "label"]) for c in self.clip_ids]


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path) as npz:
            arrays = {key: npz[key] for key in NPZ_KEYS}
    except FileNotFoundError as error:
        raise FileNotFoundError(f"cache file {path} is missing; re-run `mtcae preprocess`") \
            from error
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"cache file {path} is unreadable or lacks keys {NPZ_KEYS}: {error}") \
            from error
    return arrays
