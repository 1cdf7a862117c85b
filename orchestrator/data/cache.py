"""The preprocessing cache on disk: its layout, settings document, manifest and a torch ``Dataset``.

``orchestrator.data.preprocess`` writes a cache through the functions here; training reads
``<cache>/clips/<clip_id>.npz`` through :class:`ClipDataset` and never decodes raw video (layout in
``docs/design.md``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from orchestrator.data.datasets import ClipRecord, DatasetAdapter
from orchestrator.data.settings import PreprocessSettings
from orchestrator.hashing import stable_hash

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


SETTINGS_FILE = "settings.json"


MANIFEST_FILE = "manifest.csv"


JOURNAL_FILE = "manifest.journal.jsonl"


CLIPS_DIR = "clips"


MANIFEST_COLUMNS = ("clip", "clip_id", "status", "reason", "label", "label_name", "subject",
                    "valid_frames", "padded", "cache_file")


USABLE_STATUSES = ("ok", "partial")


FORMAT_VERSION = 1  # bump when the npz content changes for the same settings


class CacheSettingsError(ValueError):
    """``--out`` holds a cache built with different settings (or an unrecognised cache)."""


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez`` to a temporary file in the same directory, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def settings_document(adapter: DatasetAdapter, settings: PreprocessSettings) -> dict[str, Any]:
    """The hashed content of ``settings.json``: preprocessing + dataset/label settings."""
    doc = {**adapter.settings(), **settings.to_dict(), "format_version": FORMAT_VERSION}
    return {**doc, "settings_hash": stable_hash(doc, 16)}


def load_settings(cache_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``settings.json`` of a cache.

    Raises:
        FileNotFoundError: No cache there.
    """
    path = Path(cache_dir) / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no preprocessing cache at {cache_dir} (missing {SETTINGS_FILE}); "
                                f"run `mtcae preprocess --out {cache_dir} ...` first")
    return json.loads(path.read_text())


def prepare_cache(out: Path, document: dict[str, Any], overwrite: bool = False) -> None:
    """Create ``out`` for this settings document, or check that the existing cache matches.

    Raises:
        CacheSettingsError: The existing cache has other settings (and not ``overwrite``).
    """
    out.mkdir(parents=True, exist_ok=True)
    settings_path = out / SETTINGS_FILE
    ours = [out / SETTINGS_FILE, out / MANIFEST_FILE, out / JOURNAL_FILE, out / CLIPS_DIR]
    if overwrite:
        for path in ours:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    elif settings_path.is_file():
        old = json.loads(settings_path.read_text())
        if old.get("settings_hash") != document["settings_hash"]:
            raise CacheSettingsError(_mismatch_message(out, old, document))
    elif any(p.exists() for p in ours[1:]):
        raise CacheSettingsError(f"{out} holds a manifest or clips/ but no {SETTINGS_FILE}; "
                                 f"use another --out, or --overwrite to rebuild it")
    if not settings_path.is_file():
        _write_text_atomic(settings_path, json.dumps(document, indent=2, sort_keys=True) + "\n")
    (out / CLIPS_DIR).mkdir(exist_ok=True)


def _mismatch_message(out: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted((set(old) | set(new)) - {"settings_hash"})
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return (f"cache {out} was built with different preprocessing settings "
            f"({'; '.join(diffs) or 'format changed'}); refusing to mix outputs. Use a new --out, "
            f"or --overwrite to delete its clips and rebuild.")


def read_rows(out: Path) -> dict[str, dict]:
    """Manifest rows by clip path: ``manifest.csv`` plus any journal left by an interrupted run."""
    rows: dict[str, dict] = {}
    manifest = out / MANIFEST_FILE
    if manifest.is_file():
        for row in read_manifest_csv(manifest).to_dict("records"):
            rows[row["clip"]] = row
    journal = out / JOURNAL_FILE
    if journal.is_file():
        for line in journal.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line
                row = json.loads(line)
                rows[row["clip"]] = row
    return rows


def read_manifest_csv(path: Path) -> pd.DataFrame:
    """``manifest.csv`` with the documented dtypes."""
    frame = pd.read_csv(path, dtype={"clip": str, "clip_id": str, "status": str, "reason": str,
                                     "label_name": str, "subject": str, "cache_file": str},
                        keep_default_na=False)
    frame["label"] = frame["label"].astype(np.int64)
    frame["valid_frames"] = frame["valid_frames"].astype(np.int64)
    frame["padded"] = frame["padded"].map(lambda v: str(v).lower() == "true").astype(bool)
    return frame


def write_manifest(out: Path, rows: Iterable[dict]) -> None:
    """Rewrite ``manifest.csv`` atomically (sorted by clip) and drop the journal."""
    frame = pd.DataFrame(list(rows), columns=list(MANIFEST_COLUMNS)).sort_values("clip")
    _write_text_atomic(out / MANIFEST_FILE, frame.to_csv(index=False))
    (out / JOURNAL_FILE).unlink(missing_ok=True)


def make_clip_ids(records: Sequence[ClipRecord]) -> list[str]:
    """Filesystem-safe ids, unique by construction: the relative path without extension, ``/`` -> ``__``.

    Where that is not a faithful name of the path (characters replaced, e.g. non-ASCII letters, or
    another clip with the same name but another extension), a hash of the exact path is appended,
    so an id never depends on which other clips exist in which order.

    Raises:
        ValueError: Two records with the same path (naming it).
    """
    paths = [str(r.path) for r in records]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise ValueError(f"clip path(s) listed twice: {duplicates[:5]}")
    stems = [Path(p).with_suffix("").as_posix().replace("/", "__") for p in paths]
    safe = [re.sub(r"[^A-Za-z0-9_.\-]", "_", stem) for stem in stems]
    shared = {s for s in safe if safe.count(s) > 1}
    return [s if s == stem and s not in shared else f"{s}-{stable_hash(path, 8)}"
            for path, stem, s in zip(paths, stems, safe)]
