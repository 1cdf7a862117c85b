"""A trial's data: its fold's clips and targets, and the batch sources the training loop reads.

Data flows one way: the preprocessing cache (``mtcae preprocess``) and the feature cache
(``orchestrator.features``) -> this module -> ``orchestrator.trial.loop``. Two sources yield the same
batch dicts (targets + ``inputs``): :class:`TokenSource` (cached encoder tokens, frozen encoder) and
:class:`VideoSource` (uint8 frames, end to end).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator import features as feat
from orchestrator.trial.config import TrialConfig

logger = logging.getLogger(__name__)

FOLD_SEED = 0  # folds must not move when the training seed does: every trial sees the same split


@dataclass
class Targets:
    """Per-clip supervision of one split, stacked in clip order (loaded once, small)."""

    clip_ids: list[str]
    boxes: torch.Tensor  # (M, T, 4)
    landmarks: torch.Tensor  # (M, T, 5, 2)
    valid: torch.Tensor  # (M, T) bool
    label: torch.Tensor  # (M,)

    def batch(self, index: Sequence[int]) -> dict[str, Any]:
        """Targets of the clips at ``index``."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return {"boxes": self.boxes[idx], "landmarks": self.landmarks[idx], "valid": self.valid[idx],
                "label": self.label[idx], "clip_id": [self.clip_ids[i] for i in index]}


@dataclass
class TrialData:
    """The fold's clip lists and what the model needs to know about the cache.

    Attributes:
        cache_dir: Preprocessing cache.
        class_names: Class names, index = label.
        settings_hash: The cache's preprocessing settings hash (part of the feature-cache key).
        num_frames: Frames per clip T.
        img_size: Frame side S.
        files: clip id -> npz path.
        splits: ``train``/``val``/``test`` -> :class:`Targets`.
    """

    cache_dir: Path
    class_names: tuple[str, ...]
    settings_hash: str
    num_frames: int
    img_size: int
    files: dict[str, Path]
    splits: dict[str, Targets]

    def load_frames(self, clip_id: str) -> np.ndarray:
        """uint8 frames (T, S, S, 3) of one clip.

        Raises:
            orchestrator.data.cache.CacheFileError: The clip's file is missing or corrupt (named).
        """
        from orchestrator.data.cache import read_npz

        return read_npz(self.files[clip_id], ("frames",))["frames"]


def load_trial_data(cfg: TrialConfig) -> TrialData:
    """Read the manifest, make the folds and load the targets of ``cfg.fold``'s three splits.

    Raises:
        ValueError: ``cache_dir`` unset, or the fold has an empty split.
        FileNotFoundError: The cache lacks settings.json, manifest.csv or a clip file.
    """
    from orchestrator.data.cache import load_manifest
    from orchestrator.data.folds import make_folds, read_folds

    if not cfg.cache_dir:
        raise ValueError("trial config cache_dir is empty; point it at a `mtcae preprocess` output")
    manifest = load_manifest(cfg.cache_dir)
    if cfg.folds_file:
        folds = read_folds(cfg.folds_file, manifest)
        if len(folds) != cfg.n_folds:
            raise ValueError(f"{cfg.folds_file} holds {len(folds)} folds, the trial config n_folds={cfg.n_folds}")
    else:
        folds = make_folds(manifest, n_folds=cfg.n_folds, seed=FOLD_SEED)
    fold = folds[cfg.fold]
    data = trial_data_from_splits(cfg.cache_dir, {n: getattr(fold, n) for n in ("train", "val", "test")},
                                  cfg.dataset)
    logger.info("fold %d/%d of %s: %d train, %d val, %d test clips, %d classes", cfg.fold, cfg.n_folds,
                cfg.cache_dir, *(len(data.splits[n].clip_ids) for n in ("train", "val", "test")),
                len(data.class_names))
    return data


def trial_data_from_splits(cache_dir: Path | str, splits: Mapping[str, Sequence[str]], dataset: str = "") -> TrialData:
    """:class:`TrialData` for explicit ``train``/``val``/``test`` clip lists of a cache.

    Raises:
        ValueError: A split is missing or empty.
        KeyError: A clip id is not a usable clip of the cache.
    """
    from orchestrator.data.cache import load_manifest, load_settings, read_npz

    cache_dir = Path(cache_dir)
    settings = load_settings(cache_dir)
    manifest = load_manifest(cache_dir)
    files = {c: cache_dir / f for c, f in zip(manifest["clip_id"], manifest["cache_file"])}
    targets = {}
    for name in ("train", "val", "test"):
        ids = list(splits.get(name, ()))
        if not ids:
            raise ValueError(f"no {name} clips for {cache_dir} (every split needs at least one)")
        unknown = [c for c in ids if c not in files]
        if unknown:
            raise KeyError(f"{len(unknown)} {name} clip(s) are not usable clips of {cache_dir}, e.g. {unknown[:3]}")
        targets[name] = _load_targets(ids, files)
    T, S = read_npz(files[targets["train"].clip_ids[0]], ("frames",))["frames"].shape[:2]
    names = _class_names(settings, manifest, dataset)
    return TrialData(cache_dir, names, str(settings.get("settings_hash", "")), int(T), int(S), files, targets)


def _load_targets(clip_ids: list[str], files: Mapping[str, Path]) -> Targets:
    """Boxes, landmarks, validity and labels of ``clip_ids`` (npz members are read lazily: no frames)."""
    from orchestrator.data.cache import read_npz

    parts: dict[str, list[np.ndarray]] = {"boxes": [], "landmarks": [], "valid": [], "label": []}
    for clip_id in clip_ids:
        arrays = read_npz(files[clip_id], tuple(parts))
        for key in parts:
            parts[key].append(arrays[key])
    stacked = {k: torch.from_numpy(np.stack(v)) for k, v in parts.items()}
    return Targets(clip_ids, stacked["boxes"].float(), stacked["landmarks"].float(),
                   stacked["valid"].bool(), stacked["label"].long())


def _class_names(settings: Mapping[str, Any], manifest: Any, dataset: str) -> tuple[str, ...]:
    """Class names from settings.json, else the dataset adapter, else the manifest's label names."""
    if settings.get("class_names"):
        return tuple(str(n) for n in settings["class_names"])
    from orchestrator.data.datasets import DATASETS

    if dataset in DATASETS:
        return tuple(DATASETS[dataset].class_names)
    pairs = dict(zip(manifest["label"].astype(int), manifest["label_name"].astype(str)))
    return tuple(pairs.get(k, f"class{k}") for k in range(max(pairs) + 1))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's training batches: a permutation drawn from ``(seed, epoch)`` only, so the order
    is the same in an uninterrupted and a resumed run. The last batch may be smaller."""
    generator = torch.Generator().manual_seed(derive_seed(seed, epoch, 1))
    order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def eval_batches(n: int, batch_size: int) -> list[list[int]]:
    """Consecutive index batches over ``n`` clips, in order (evaluation needs no shuffle)."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def derive_seed(*parts: int) -> int:
    """A 32-bit seed derived from integer parts (``numpy.random.SeedSequence``), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class TokenSource:
    """Batches of cached encoder tokens (fp16, memory-mapped) with their targets."""

    kind = "tokens"

    def __init__(self, store: feat.FeatureStore) -> None:
        self.store = store

    def __call__(self, targets: Targets, batches: Sequence[Sequence[int]]) -> Iterator[dict[str, Any]]:
        """Yield one batch dict (``inputs`` (B, N, C) + targets) per index list."""
        for index in batches:
            batch = targets.batch(index)
            batch["inputs"] = torch.from_numpy(self.store.read(batch["clip_id"]))  # (B, N, C)
            yield batch


class VideoSource:
    """Batches of uint8 frames from the preprocessing cache (the end-to-end path).

    Reads through ``orchestrator.data.ClipDataset``; the dataset's own targets are used, which are
    the same arrays :class:`Targets` holds.
    """

    kind = "video"

    def __init__(self, data: TrialData, num_workers: int = 0) -> None:
        self.data, self.num_workers = data, num_workers

    def __call__(self, targets: Targets, batches: Sequence[Sequence[int]]) -> Iterator[dict[str, Any]]:
        """Yield one batch dict (``inputs`` (B, T, S, S, 3) uint8 + targets) per index list."""
        from orchestrator.data.cache import ClipDataset

        dataset = ClipDataset(self.data.cache_dir, targets.clip_ids)
        # A private generator: a DataLoader iterator otherwise draws its base seed from the global
        # RNG, which would shift this path's dropout stream away from the cached path's.
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(b) for b in batches],
                                             num_workers=self.num_workers, generator=torch.Generator())
        for batch in loader:
            batch["inputs"] = batch.pop("video")  # (B, T, S, S, 3)
            yield batch
