"""The preprocessing cache on disk: its layout, settings document, manifest and a torch ``Dataset``.

``orchestrator.data.preprocess`` writes a cache through the functions here; training reads
``<cache>/clips/<clip_id>.npz`` through :class:`ClipDataset` and never decodes raw video (layout in
``docs/design.md``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
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
    return read_npz(path, NPZ_KEYS)


class CacheFileError(ValueError):
    """A clip's cache file is missing, truncated, CRC-broken or lacks arrays; names the file."""


def read_npz(path: str | os.PathLike[str], keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of a clip's ``.npz`` (each member's zip CRC is checked as it is read).

    Raises:
        CacheFileError: The file is missing or unreadable, naming it and how to redo the clip.
    """
    path = Path(path)
    try:
        with np.load(path) as npz:
            return {key: npz[key] for key in keys}
    except FileNotFoundError as error:
        raise CacheFileError(f"cache file {path} is missing; {_redo(path)}") from error
    except KeyError as error:
        raise CacheFileError(f"cache file {path} lacks the array {error}; {_redo(path)}") from error
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise CacheFileError(f"cache file {path} is truncated or corrupt ({error}); {_redo(path)}") \
            from error


def _redo(path: Path) -> str:
    cache = path.parent.parent
    return f"delete it and re-run `mtcae preprocess --out {cache}` (with the same settings) to redo that clip"


SETTINGS_FILE = "settings.json"


MANIFEST_FILE = "manifest.csv"


JOURNAL_FILE = "manifest.journal.jsonl"  # the parent's journal before per-process journals


JOURNAL_DIR = "journal"  # <host>-<pid>.jsonl per writer: appends from several nodes never interleave


CLIPS_DIR = "clips"


MANIFEST_COLUMNS = ("clip", "clip_id", "status", "reason", "label", "label_name", "subject",
                    "valid_frames", "padded", "cache_file", "content_hash", "source_stat")

# Columns a cache written before they existed lacks; read as "" (unknown).
_LATER_COLUMNS = ("content_hash", "source_stat")


USABLE_STATUSES = ("ok", "partial")


ROOT_KEY = "root"  # in settings.json, not in the settings hash


FORMAT_VERSION = 1  # bump when the npz content changes for the same settings


class CacheSettingsError(ValueError):
    """``--out`` holds a cache built with different settings (or an unrecognised cache)."""


class CacheWriteError(OSError):
    """The cache cannot be written (read-only, full, or not a directory): names the path and the
    operation."""


@contextlib.contextmanager
def writing(operation: str, path: Path) -> Iterator[None]:
    """Turn an ``OSError`` of the block into a :class:`CacheWriteError` naming ``operation`` and
    ``path`` (``CacheWriteError`` passes through)."""
    try:
        yield
    except CacheWriteError:
        raise
    except OSError as error:
        raise CacheWriteError(f"cannot {operation} {path}: {error.strerror or error}") from error


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


def prepare_cache(out: Path, document: dict[str, Any], overwrite: bool = False,
                  root: str | os.PathLike[str] | None = None) -> None:
    """Create ``out`` for this settings document, or check that the existing cache matches.

    Args:
        out: The cache directory.
        document: :func:`settings_document` of the run.
        overwrite: Delete the cache's settings, manifest, journal and clips first.
        root: The dataset root the clips come from; recorded in ``settings.json`` (outside the
            settings hash: moving a dataset keeps its feature caches) and checked like a setting.

    Raises:
        CacheSettingsError: The existing cache has other settings or another root (and not
            ``overwrite``).
    """
    with writing("create the cache directory", out):
        out.mkdir(parents=True, exist_ok=True)
    settings_path = out / SETTINGS_FILE
    ours = [out / SETTINGS_FILE, out / MANIFEST_FILE, out / JOURNAL_FILE, out / JOURNAL_DIR,
            out / CLIPS_DIR]
    root = str(Path(root).expanduser().resolve()) if root is not None else None
    if overwrite:
        for path in ours:
            with writing("delete (--overwrite)", path):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    elif settings_path.is_file():
        old = json.loads(settings_path.read_text())
        if old.get("settings_hash") != document["settings_hash"]:
            raise CacheSettingsError(_mismatch_message(out, old, document))
        if root is not None and old.get(ROOT_KEY, root) != root:
            raise CacheSettingsError(
                f"cache {out} was built from --root {old[ROOT_KEY]}, not {root}; refusing to mix "
                f"clips of two roots. Use a new --out for {root}, or --overwrite to rebuild {out} "
                f"from it.")
    elif any(p.exists() for p in ours[1:]):
        raise CacheSettingsError(f"{out} holds a manifest or clips/ but no {SETTINGS_FILE}; "
                                 f"use another --out, or --overwrite to rebuild it")
    recorded = json.loads(settings_path.read_text()) if settings_path.is_file() else None
    if recorded is None or (root is not None and ROOT_KEY not in recorded):
        doc = {**(recorded or document), **({ROOT_KEY: root} if root is not None else {})}
        with writing("write the cache settings", settings_path):
            _write_text_atomic(settings_path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with writing("create the clips directory", out / CLIPS_DIR):
        (out / CLIPS_DIR).mkdir(exist_ok=True)


def _mismatch_message(out: Path, old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted((set(old) | set(new)) - {"settings_hash", ROOT_KEY})
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return (f"cache {out} was built with different preprocessing settings "
            f"({'; '.join(diffs) or 'format changed'}); refusing to mix outputs. Use a new --out, "
            f"or --overwrite to delete its clips and rebuild.")


def read_rows(out: Path) -> dict[str, dict]:
    """Manifest rows by clip path: ``manifest.csv``, then the journals a running or killed run
    left, oldest row first (a torn last line, as a kill leaves it, is skipped)."""
    rows: dict[str, dict] = {}
    manifest = out / MANIFEST_FILE
    if manifest.is_file():
        for row in read_manifest_csv(manifest).to_dict("records"):
            rows[row["clip"]] = row
    journaled = []
    for path in _journal_files(out):
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                journaled.append(json.loads(line))
    for row in sorted(journaled, key=lambda r: r.get("t", 0.0)):
        rows[row["clip"]] = row
    return rows


def _journal_files(out: Path) -> list[Path]:
    legacy = [out / JOURNAL_FILE] if (out / JOURNAL_FILE).is_file() else []
    return legacy + sorted((out / JOURNAL_DIR).glob("*.jsonl"))


def append_journal(out: Path, rows: Iterable[dict]) -> None:
    """Append finished rows (stamped with the time) to this process's journal, one ``write``.

    Raises:
        CacheWriteError: The journal cannot be written.
    """
    path = out / JOURNAL_DIR / f"{socket.gethostname()}-{os.getpid()}.jsonl"
    text = "".join(json.dumps({**row, "t": time.time()}, default=str) + "\n" for row in rows)
    with writing("append to the preprocessing journal", path):
        path.parent.mkdir(exist_ok=True)
        with open(path, "a") as f:
            f.write(text)


def fold_journals(out: Path) -> dict[str, dict]:
    """:func:`read_rows`, with any journal folded into ``manifest.csv`` and removed (only while no
    worker writes to the cache: at the start of a run)."""
    rows = read_rows(out)
    if _journal_files(out):
        write_manifest(out, rows.values())
    return rows


def read_manifest_csv(path: Path) -> pd.DataFrame:
    """``manifest.csv`` with the documented dtypes."""
    text = {c: str for c in ("clip", "clip_id", "status", "reason", "label_name", "subject",
                             "cache_file", *_LATER_COLUMNS)}
    frame = pd.read_csv(path, dtype=text, keep_default_na=False)
    for column in _LATER_COLUMNS:
        if column not in frame:
            frame[column] = ""
    frame["label"] = frame["label"].astype(np.int64)
    frame["valid_frames"] = frame["valid_frames"].astype(np.int64)
    frame["padded"] = frame["padded"].map(lambda v: str(v).lower() == "true").astype(bool)
    return frame


def write_manifest(out: Path, rows: Iterable[dict], drop_journals: bool = True) -> None:
    """Rewrite ``manifest.csv`` atomically (sorted by clip); then remove the journals, unless
    workers may still append to them (``drop_journals=False``, during a run).

    Raises:
        CacheWriteError: The manifest cannot be written.
    """
    frame = pd.DataFrame(list(rows), columns=list(MANIFEST_COLUMNS)).sort_values("clip")
    with writing("write the manifest", out / MANIFEST_FILE):
        _write_text_atomic(out / MANIFEST_FILE, frame.to_csv(index=False))
        if drop_journals:
            (out / JOURNAL_FILE).unlink(missing_ok=True)
            shutil.rmtree(out / JOURNAL_DIR, ignore_errors=True)


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


def source_identity(path: str | os.PathLike[str]) -> tuple[str, str]:
    """``(content_hash, source_stat)`` of a source video: the SHA-256 of its bytes (16 hex digits,
    read in 1 MiB blocks) and ``"<size>:<mtime_ns>"``; ``("", "")`` when it cannot be read.

    The content hash keys the clip's cache entry and its encoder features (a re-encoded video gets
    new features); the stat is the cheap check a resumed run uses to notice a changed file.
    """
    digest = hashlib.sha256()
    try:
        stat = os.stat(path)
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError:
        return "", ""
    return digest.hexdigest()[:16], source_stat(stat)


def source_stat(stat: os.stat_result) -> str:
    """``"<size>:<mtime_ns>"`` of a file's stat."""
    return f"{stat.st_size}:{stat.st_mtime_ns}"
