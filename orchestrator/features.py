"""The frozen-encoder feature cache: pay for the encoder once per clip, not once per epoch per trial.

A frozen encoder maps a clip to the same tokens in every epoch of every trial, fold and
architecture of a sweep, so the tokens are computed once (batched, under ``no_grad``, in the
trial's device precision) and stored next to the preprocessing cache::

    <cache>/features/<key>/meta.json          what the key stands for (human-readable)
    <cache>/features/<key>/<clip_id>.npy      fp16 tokens (N, C), memory-mappable, + a trailer

``key`` hashes everything the tokens depend on: the encoder's weights and config, the
preprocessing settings hash, the input normalisation, the compute precision and the storage
dtype. A change to any of them gets a fresh folder; stale folders are never read. Each file also
ends in a trailer (after the ``.npy`` data, which NumPy ignores) holding the clip's content hash
(the manifest's ``content_hash``: the source video's bytes) and a CRC-32 of the file. A file whose
content hash differs from the manifest's (the video was re-encoded, ``mtcae preprocess
--overwrite``) is stale: it is re-encoded, and logged. The CRC is checked once per file when a
store first uses it (:meth:`FeatureStore.build`, :meth:`FeatureStore.read`), not per read; a
corrupt file is re-encoded by ``build`` and refused by ``read``, naming the file.

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
import io
import json
import logging
import os
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from model.encoder import IMAGENET_MEAN, IMAGENET_STD, normalize_video
from orchestrator.hashing import stable_hash

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the content-hash + CRC trailer
FEATURES_DIRNAME = "features"
META_FILENAME = "meta.json"
STORE_DTYPE = np.float16  # 3.2 MB per clip at ViT-L (1568 x 1024 x 2 bytes)
_DTYPE_NAMES = {None: "fp32", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

FramesLoader = Callable[[str], np.ndarray]  # clip_id -> uint8 frames (T, S, S, 3)

_MAGIC = b"MTCAEFT2"
_TRAILER = len(_MAGIC) + 64 + 8  # magic, content hash (space-padded ASCII), CRC-32 (8 hex digits)


class FeatureFileError(ValueError):
    """A stored token file is truncated, corrupt or stale; names the file and how to rebuild it."""


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
        content: clip id -> content hash of the clip the tokens must come from (the manifest's
            ``content_hash``); a clip not in it must have an empty one.
    """

    def __init__(self, root: Path, spec: FeatureSpec, content: Mapping[str, str] | None = None) -> None:
        self.root, self.spec = Path(root), spec
        self.content = dict(content or {})
        self._verified: set[str] = set()  # clips whose file passed the CRC check in this store
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
        """The store for ``spec`` under a preprocessing cache, checked against its manifest."""
        from orchestrator.data.cache import load_manifest

        try:
            manifest = load_manifest(cache_dir, usable_only=False)
            content = dict(zip(manifest["clip_id"], manifest["content_hash"]))
        except FileNotFoundError:
            content = {}
        return cls(Path(cache_dir) / FEATURES_DIRNAME / spec.key, spec, content)

    def path(self, clip_id: str) -> Path:
        """File holding one clip's tokens."""
        return self.root / f"{clip_id}.npy"

    def problem(self, clip_id: str, verify: bool = True) -> str | None:
        """None when the clip's file can be used, else what is wrong with it (``missing``, stale,
        truncated, corrupt). ``verify`` checks the CRC (once per file and store)."""
        if clip_id in self._verified:
            return None
        try:
            with open(self.path(clip_id), "rb") as handle:
                if not verify:
                    handle.seek(max(0, os.fstat(handle.fileno()).st_size - _TRAILER))
                data = handle.read()
        except FileNotFoundError:
            return "missing"
        problem = _check(data, self.content.get(clip_id, ""), verify)
        if problem is None and verify:
            self._verified.add(clip_id)
        return problem

    def missing(self, clip_ids: Sequence[str]) -> list[str]:
        """Clip ids without a usable token file (absent or stale), in the given order; no CRC."""
        return [c for c in clip_ids if self.problem(c, verify=False) is not None]

    def write(self, clip_id: str, tokens: np.ndarray) -> bool:
        """Store one clip's tokens (N, C) as fp16, atomically, replacing a stale or corrupt file.

        Returns:
            False when another writer published a good file for the same clip first (kept).

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
            handle.write(_with_trailer(array, self.content.get(clip_id, "")))
            handle.flush()
            os.fsync(handle.fileno())
        self._verified.discard(clip_id)
        if self.problem(clip_id) not in (None, "missing"):
            os.replace(tmp, self.path(clip_id))  # over a stale or corrupt file: last finisher wins
            published = True
        else:
            published = _publish(tmp, self.path(clip_id))
        if published:
            self._verified.add(clip_id)  # written and synced by us just now
        return published

    def read(self, clip_ids: Sequence[str]) -> np.ndarray:
        """Tokens of several clips, stacked: (B, N, C) fp16.

        Raises:
            FileNotFoundError: A clip has no stored tokens (build them first).
            FeatureFileError: A clip's file is stale, truncated or corrupt (named, with how to
                rebuild it).
            ValueError: A stored file has another shape or dtype than the first one read.
        """
        for clip_id in clip_ids:
            problem = self.problem(clip_id)
            if problem == "missing":
                raise FileNotFoundError(f"no stored tokens for clip {clip_id!r} ({self.path(clip_id)}); "
                                        f"build the feature cache first")
            if problem is not None:
                raise FeatureFileError(
                    f"feature file {self.path(clip_id)} is {problem}; delete it (or the folder {self.root}) "
                    f"and run the trial again: its tokens are re-encoded")
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
        """Compute and store the tokens of every clip that has no usable file yet.

        Every existing file is checked once (content hash and CRC): a stale one (its clip's video
        changed) is re-encoded and logged, a corrupt one re-encoded with a warning naming it.

        Args:
            encode: uint8 frames (B, T, S, S, 3) -> tokens (B, N, C); see :func:`encoder_fn`.
            load_frames: clip id -> uint8 frames (T, S, S, 3).
            clip_ids: Clips that must be present afterwards.
            batch_size: Clips per encoder call.
            progress: Show a tqdm bar.

        Returns:
            How many clips this call stored (others may have been stored concurrently).
        """
        todo = self._todo(clip_ids)
        if not todo:
            return 0
        logger.info("feature cache %s: encoding %d of %d clips", self.root, len(todo), len(clip_ids))
        written = 0
        for batch in _progress(_chunks(todo, batch_size), len(todo), batch_size, progress):
            batch = [c for c in batch if self.problem(c) is not None]  # another builder may have stored some
            if not batch:
                continue
            frames = torch.from_numpy(np.stack([load_frames(c) for c in batch]))  # (B, T, S, S, 3)
            tokens = encode(frames).float().cpu().numpy()  # (B, N, C)
            written += sum(self.write(c, t) for c, t in zip(batch, tokens))
        return written

    def _todo(self, clip_ids: Sequence[str]) -> list[str]:
        """Clips to encode, logging the stale and corrupt files among them."""
        problems = {c: self.problem(c) for c in clip_ids}
        stale = [c for c, p in problems.items() if p and p.startswith("stale")]
        corrupt = [c for c, p in problems.items() if p and p != "missing" and c not in stale]
        if stale:
            logger.info("feature cache %s: %d clip(s) changed since their tokens were stored "
                        "(e.g. %s): re-encoding them", self.root, len(stale), self.path(stale[0]).name)
        for clip_id in corrupt:
            logger.warning("feature file %s is %s: re-encoding it", self.path(clip_id), problems[clip_id])
        return [c for c, p in problems.items() if p is not None]


def _with_trailer(array: np.ndarray, content: str) -> bytes:
    """``.npy`` bytes of ``array`` followed by the trailer (magic, content hash, CRC-32)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    body = buffer.getvalue() + _MAGIC + content.encode().ljust(64)
    return body + f"{zlib.crc32(body):08x}".encode()


def _check(data: bytes, content: str, verify: bool) -> str | None:
    """What is wrong with a token file's bytes (its trailer only when not ``verify``), or None."""
    if len(data) < _TRAILER or data[-_TRAILER:-72] != _MAGIC:
        return "truncated or not a token file of this format (no trailer)"
    stored = data[-72:-8].decode(errors="replace").strip()
    if stored != content:
        return f"stale (tokens of clip content {stored or '?'}, the cache's clip is {content or '?'})"
    if verify and f"{zlib.crc32(data[:-8]):08x}".encode() != data[-8:]:
        return "corrupt (CRC-32 mismatch)"
    return None


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
