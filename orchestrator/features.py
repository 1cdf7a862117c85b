"""The frozen-encoder feature cache: pay for the encoder once per clip, not once per epoch per trial.

A frozen encoder maps a clip to the same tokens in every epoch of every trial, fold and
architecture of a sweep, so the tokens are computed once (batched, under ``no_grad``, in the
trial's device precision) and stored next to the preprocessing cache::

    <cache>/features/<key>/meta.json          what the key stands for (human-readable)
    <cache>/features/<key>/<clip_id>.npy      fp16 tokens (N, C), memory-mappable

``key`` hashes everything the tokens depend on: the encoder's weights and config, the
preprocessing settings hash, the input normalisation, the compute precision and the storage
dtype. A change to any of them gets a fresh folder; stale folders are never read.

Concurrency: several workers (processes, nodes on a shared filesystem) may build the same cache at
once. Each file is written to a private temporary name and published with ``os.link`` (atomic,
fails if the name exists), so the first finisher wins, later finishers discard their copy, and no
reader ever sees a torn file. Builders re-check what is missing before every batch, so concurrent
builders mostly split the work instead of repeating it. No lock is needed (``flock`` is unreliable
on network filesystems anyway).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.encoder import IMAGENET_MEAN, IMAGENET_STD, normalize_video
from orchestrator.hashing import stable_hash

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FEATURES_DIRNAME = "features"
META_FILENAME = "meta.json"
STORE_DTYPE = np.float16  # 3.2 MB per clip at ViT-L (1568 x 1024 x 2 bytes)
_DTYPE_NAMES = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

FramesLoader = Callable[[str], np.ndarray]  # clip_id -> uint8 frames (T, S, S, 3)


def dtype_name(amp_dtype: torch.dtype | None) -> str:
    """``fp32`` (no autocast), ``bf16`` or ``fp16``: the compute-precision part of the key."""
    return _DTYPE_NAMES[amp_dtype]


def weights_fingerprint(module: nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes), in key order.

    Hashing ViT-L's 1.2 GB of weights takes about a second, once per trial; it is what makes a
    randomly initialised encoder (seeded) and a pretrained one land in different caches.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@dataclass(frozen=True)
class FeatureSpec:
    """Everything the stored tokens depend on; its :attr:`key` names the cache folder.

    Attributes:
        encoder_weights: :func:`weights_fingerprint` of the encoder.
        encoder_config: The encoder config as a dict.
        settings_hash: ``settings_hash`` of the preprocessing cache (frame size, detector, ...).
        mean: Normalisation mean per channel.
        std: Normalisation std per channel.
        compute_dtype: ``fp32``, ``bf16`` or ``fp16``: the autocast precision tokens are computed in.
    """

    encoder_weights: str
    encoder_config: dict
    settings_hash: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    compute_dtype: str = "fp32"

    @property
    def key(self) -> str:
        """16 hex digits identifying the token set."""
        payload = {**asdict(self), "format": FORMAT_VERSION, "store_dtype": np.dtype(STORE_DTYPE).name}
        return stable_hash(payload, 16)

    @classmethod
    def for_encoder(
        cls,
        encoder: nn.Module,
        settings_hash: str,
        amp_dtype: torch.dtype | None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> FeatureSpec:
        """The spec of a ``model.encoder.VideoMAEEncoder`` (it must have a ``cfg`` dataclass)."""
        return cls(weights_fingerprint(encoder), asdict(encoder.cfg), settings_hash, tuple(mean),
                   tuple(std), dtype_name(amp_dtype))


def _publish(tmp: Path, final: Path) -> bool:
    """Move a finished temporary file to its final name; False if another writer got there first."""
    try:
        os.link(tmp, final)  # atomic and exclusive: the first finisher wins
    except FileExistsError:
        return False
    except OSError:  # filesystems without hard links: atomic replace (last finisher wins)
        os.replace(tmp, final)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return True


class FeatureStore:
    """One token set: a folder of ``<clip_id>.npy`` fp16 arrays of shape (N, C).

    Args:
        root: The folder (``<cache>/features/<key>``); created if missing.
        spec: What the tokens depend on; written to ``meta.json`` on first use.
    """

    def __init__(self, root: Path, spec: FeatureSpec) -> None:
        self.root, self.spec = Path(root), spec
        self.root.mkdir(parents=True, exist_ok=True)
        meta = self.root / META_FILENAME
        if not meta.exists():
            text = json.dumps({**asdict(spec), "key": spec.key, "format": FORMAT_VERSION,
                               "store_dtype": np.dtype(STORE_DTYPE).name}, indent=2, default=list)
            tmp = self.root / f".{META_FILENAME}.{uuid.uuid4().hex}"
            tmp.write_text(text)
            _publish(tmp, meta)

    @classmethod
    def open(cls, cache_dir: Path, spec: FeatureSpec) -> FeatureStore:
        """The store for ``spec`` under a preprocessing cache."""
        return cls(Path(cache_dir) / FEATURES_DIRNAME / spec.key, spec)

    def path(self, clip_id: str) -> Path:
        """File holding one clip's tokens."""
        return self.root / f"{clip_id}.npy"

    def missing(self, clip_ids: Sequence[str]) -> list[str]:
        """Clip ids without a stored token file, in the given order."""
        return [c for c in clip_ids if not self.path(c).exists()]

    def write(self, clip_id: str, tokens: np.ndarray) -> bool:
        """Store one clip's tokens (N, C) as fp16, atomically.

        Returns:
            False when another writer published the same clip first (its file is kept).

        Raises:
            ValueError: The tokens overflow fp16 (inf/nan after conversion).
        """
        with np.errstate(over="ignore"):
            array = np.ascontiguousarray(tokens, dtype=STORE_DTYPE)
        if not np.isfinite(array).all():
            raise ValueError(f"tokens of clip {clip_id!r} are not finite in {np.dtype(STORE_DTYPE).name} "
                             f"(max |x| = {float(np.abs(tokens).max()):.3g}); cannot cache them")
        tmp = self.root / f".{clip_id}.{os.getpid()}.{uuid.uuid4().hex}.npy"
        with open(tmp, "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        return _publish(tmp, self.path(clip_id))

    def read(self, clip_ids: Sequence[str]) -> np.ndarray:
        """Tokens of several clips, stacked: (B, N, C) fp16.

        Raises:
            FileNotFoundError: A clip has no stored tokens (build them first).
            ValueError: A stored file has another shape or dtype than the first one read.
        """
        arrays = [np.load(self.path(c), mmap_mode="r") for c in clip_ids]
        first = arrays[0]
        for clip_id, array in zip(clip_ids, arrays):
            if array.shape != first.shape or array.dtype != STORE_DTYPE:
                raise ValueError(f"{self.path(clip_id)} holds {array.dtype} {array.shape}, expected "
                                 f"{np.dtype(STORE_DTYPE).name} {first.shape}")
        return np.stack(arrays)  # (B, N, C)

    def build(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        load_frames: FramesLoader,
        clip_ids: Sequence[str],
        batch_size: int = 16,
        progress: bool = False,
    ) -> int:
        """Compute and store the tokens of every clip that has none yet.

        Args:
            encode: uint8 frames (B, T, S, S, 3) -> tokens (B, N, C); see :func:`encoder_fn`.
            load_frames: clip id -> uint8 frames (T, S, S, 3).
            clip_ids: Clips that must be present afterwards.
            batch_size: Clips per encoder call.
            progress: Show a tqdm bar.

        Returns:
            How many clips this call stored (others may have been stored concurrently).
        """
        todo = self.missing(clip_ids)
        if not todo:
            return 0
        logger.info("feature cache %s: encoding %d of %d clips", self.root, len(todo), len(clip_ids))
        written = 0
        for batch in _progress(_chunks(todo, batch_size), len(todo), batch_size, progress):
            batch = self.missing(batch)  # another builder may have stored some meanwhile
            if not batch:
                continue
            frames = torch.from_numpy(np.stack([load_frames(c) for c in batch]))  # (B, T, S, S, 3)
            tokens = encode(frames).float().cpu().numpy()  # (B, N, C)
            written += sum(self.write(c, t) for c, t in zip(batch, tokens))
        return written


def encoder_fn(
    model: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 frames -> tokens with ``model.encode``, under ``no_grad`` and the trial's autocast.

    The same normalisation and precision as the end-to-end training path, so both paths see the
    same tokens (up to the fp16 storage rounding).
    """

    @torch.no_grad()
    def encode(frames: torch.Tensor) -> torch.Tensor:
        video = normalize_video(frames.to(device, non_blocking=True), mean, std)  # (B, 3, T, S, S)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            return model.encode(video)  # (B, N, C)

    return encode


def _chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


def _progress(batches: Iterator[list[str]], total: int, batch_size: int, enabled: bool) -> Iterator[list[str]]:
    if not enabled:
        yield from batches
        return
    from tqdm import tqdm

    with tqdm(total=total, desc="encoding clips", unit="clip") as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))
