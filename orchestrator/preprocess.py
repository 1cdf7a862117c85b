"""Raw videos -> training cache: 16 sampled frames per clip plus MTCNN face boxes and landmarks.

The paper's multi-task labels (section 4.2, Fig. 3) do not ship with any dataset; they come from
running MTCNN over every sampled frame. Per clip this module

1. reads only the ``num_frames`` frames it needs with decord ``get_batch`` (``official`` sampling:
   stride ``floor(T/16)`` from frame 0 as the authors' ``Preprocessing_Video.py``; ``uniform``:
   centres of 16 equal segments; clips shorter than 16 frames are padded by repeating frames),
2. resizes them to ``size`` x ``size`` (``squash`` the whole frame as the authors did, or
   ``letterbox`` keeping the aspect ratio),
3. runs facenet-pytorch MTCNN on all frames of one or several clips in a single batched call and
   keeps, per frame, the face with the largest ``area * probability``; box ``[x, y, w, h]`` and the
   5 points (left eye, right eye, nose, left mouth, right mouth) are clipped to the frame and
   normalised by ``size``; frames without a face take the nearest valid frame's labels and are
   flagged invalid so the loss can mask them,
4. writes ``clips/<clip_id>.npz`` atomically and a manifest row (see ``docs/design.md``).

Robustness: every clip's failure (missing, empty, unreadable, non-video, truncated, corrupt) is
caught and recorded with a reason; the run goes on. Rows are appended to a journal file as clips
complete and the manifest is rewritten atomically every few seconds, so an interrupted run loses
nothing and a re-run skips finished clips. The settings (including the dataset's label protocol)
are hashed into ``settings.json``; a cache built with other settings is refused (use another
``--out`` or ``--overwrite``), never mixed.

Heavy dependencies (decord, facenet-pytorch, torch, PIL) are imported inside the functions that
need them, so ``orchestrator.data`` can import the cache constants from here cheaply.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from orchestrator.datasets import ClipRecord, DatasetAdapter, get_dataset

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
MANIFEST_FILE = "manifest.csv"
JOURNAL_FILE = "manifest.journal.jsonl"
CLIPS_DIR = "clips"
MANIFEST_COLUMNS = ("clip", "clip_id", "status", "reason", "label", "label_name", "subject",
                    "valid_frames", "padded", "cache_file")
USABLE_STATUSES = ("ok", "partial")
SAMPLING_MODES = ("official", "uniform")
RESIZE_MODES = ("squash", "letterbox")
FORMAT_VERSION = 1  # bump when the npz content changes for the same settings

_MANIFEST_FLUSH_S = 5.0


class ClipError(Exception):
    """A clip cannot be used; ``str(error)`` is the reason recorded in the manifest."""


class CacheSettingsError(ValueError):
    """``--out`` holds a cache built with different settings (or an unrecognised cache)."""


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes the cache content; hashed into ``settings.json``.

    Attributes:
        num_frames: Frames per clip (paper: 16).
        size: Output frame side in pixels (paper: 224); boxes/landmarks are divided by it.
        sampling: ``official`` (stride floor(T/16) from frame 0, authors' code) or ``uniform``.
        resize: ``squash`` (whole frame to size x size, authors' code) or ``letterbox``.
        min_face_size: MTCNN smallest face in output pixels (facenet-pytorch default 20).
        thresholds: MTCNN P/R/O-net thresholds (facenet-pytorch defaults).
        factor: MTCNN pyramid scale factor (facenet-pytorch default).
        keep_faceless: Keep clips with no face in any frame (all frames invalid) instead of
            recording them as failed.
    """

    num_frames: int = 16
    size: int = 224
    sampling: str = "official"
    resize: str = "squash"
    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709
    keep_faceless: bool = False

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        if self.num_frames < 1 or self.size < 16:
            raise ValueError(f"need num_frames >= 1 and size >= 16, got {self.num_frames}, "
                             f"{self.size}")
        if len(self.thresholds) != 3:
            raise ValueError(f"thresholds needs 3 values (P, R, O-net), got {self.thresholds}")
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields."""
        d = dataclasses.asdict(self)
        d["thresholds"] = list(self.thresholds)
        return d


@dataclass
class DecodedClip:
    """Sampled, resized frames of one clip.

    Attributes:
        frames: uint8 (T, S, S, 3).
        padded: The source had fewer than T frames.
        notes: Human-readable remarks for the manifest's ``reason`` column.
    """

    frames: np.ndarray
    padded: bool
    notes: list[str] = field(default_factory=list)


@dataclass
class FaceLabels:
    """Per-frame multi-task labels, normalised by the frame size.

    Attributes:
        boxes: float32 (T, 4) ``[x, y, w, h]``.
        landmarks: float32 (T, 5, 2).
        valid: bool (T,): a face was detected in that frame.
    """

    boxes: np.ndarray
    landmarks: np.ndarray
    valid: np.ndarray


@dataclass
class PreprocessSummary:
    """What a run produced (the CLI prints :meth:`format`)."""

    out: Path
    total: int
    processed: int
    skipped: int
    counts: dict[str, int]
    elapsed_s: float
    failures: list[tuple[str, str]]

    @property
    def usable(self) -> int:
        """Clips that training can use (``ok`` + ``partial``)."""
        return sum(self.counts.get(s, 0) for s in USABLE_STATUSES)

    @property
    def clips_per_s(self) -> float:
        """Throughput over the clips processed in this run."""
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def format(self) -> str:
        """Multi-line human summary."""
        lines = [f"cache {self.out}: {self.total} clips, {self.usable} usable "
                 f"(ok {self.counts.get('ok', 0)}, partial {self.counts.get('partial', 0)}, "
                 f"failed {self.counts.get('failed', 0)}); processed {self.processed} now "
                 f"({self.clips_per_s:.2f} clips/s), {self.skipped} already done"]
        lines += [f"  failed: {clip}: {reason}" for clip, reason in self.failures[:20]]
        if len(self.failures) > 20:
            lines.append(f"  ... and {len(self.failures) - 20} more failures (see manifest)")
        lines.append(f"manifest: {self.out / MANIFEST_FILE}")
        return "\n".join(lines)


# ---------------------------------------------------------------- sampling and resizing


def sample_indices(num_source: int, num_frames: int = 16,
                   mode: str = "official") -> tuple[np.ndarray, bool]:
    """Source frame indices to read, and whether the clip had to be padded.

    ``official``: ``0, s, 2s, ...`` with ``s = floor(T / num_frames)`` (the authors' stride, tail
    dropped). ``uniform``: the centre frame of each of ``num_frames`` equal segments. A source with
    fewer than ``num_frames`` frames is padded by repeating frames in order (each about
    ``num_frames / T`` times), in either mode.

    Raises:
        ValueError: ``num_source < 1`` or unknown mode.
    """
    if num_source < 1:
        raise ValueError(f"need at least one source frame, got {num_source}")
    if mode not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {mode!r}")
    steps = np.arange(num_frames)
    if num_source < num_frames:
        return (steps * num_source) // num_frames, True
    if mode == "official":
        indices = steps * (num_source // num_frames)
    else:
        segment = num_source / num_frames
        indices = np.floor(segment * steps + segment / 2).astype(np.int64)
    return np.minimum(indices, num_source - 1), False


def resize_frames(frames: np.ndarray, size: int, mode: str = "squash") -> np.ndarray:
    """Resize uint8 (N, H, W, 3) frames to (N, size, size, 3) with PIL bilinear (antialiased).

    ``squash`` stretches the whole frame (the authors' ``tf.image.resize``); ``letterbox`` keeps
    the aspect ratio and pads with black, centred. (:func:`read_clip` lets the decoder scale
    instead; this is for frames already in memory, e.g. the benchmark's baseline.)
    """
    from PIL import Image

    h, w = frames.shape[1:3]
    scale = size / max(h, w)
    inner = (size, size) if mode == "squash" else (max(1, round(w * scale)),
                                                   max(1, round(h * scale)))
    out = np.zeros((len(frames), size, size, 3), np.uint8)
    x0, y0 = (size - inner[0]) // 2, (size - inner[1]) // 2
    for i, frame in enumerate(frames):
        resized = Image.fromarray(frame).resize(inner, Image.BILINEAR)
        out[i, y0:y0 + inner[1], x0:x0 + inner[0]] = np.asarray(resized)
    return out


# ---------------------------------------------------------------- decoding


def read_clip(path: str | os.PathLike[str], settings: PreprocessSettings) -> DecodedClip:
    """Decode only the sampled frames of one video, already resized by the decoder.

    decord's scaler resizes inside the decoder (ffmpeg ``scale``), so full-resolution RGB frames
    are never materialised: ``squash`` scales to size x size directly, ``letterbox`` scales to the
    aspect-preserving inner size and pads. Frame counts of some containers (FLV) are estimates:
    when reading fails, the readable prefix is found and the indices are re-sampled within it
    (noted in :attr:`DecodedClip.notes`).

    Raises:
        ClipError: The file is missing, empty, unreadable, not a video, or no frame decodes.
    """
    video = _Video(Path(path), settings.size, settings.size)
    _check_file(video.path)
    if settings.resize == "letterbox":
        video = _letterbox_video(video)
    reader = video.reader()
    num_source = len(reader)
    if num_source < 1:
        raise ClipError("the video stream has no frames")
    notes: list[str] = []
    indices, padded = sample_indices(num_source, settings.num_frames, settings.sampling)
    try:
        frames = _pad_square(_as_rgb(reader.get_batch(indices.tolist()).asnumpy()), settings.size)
    except Exception:  # decord's scaler fails for some output widths (e.g. 48): decode unscaled
        frames, indices, padded = _read_unscaled(video.path, num_source, indices, padded,
                                                 settings, notes)
    if padded:
        notes.append(f"padded: {min(num_source, int(indices.max()) + 1)} source frames "
                     f"< {settings.num_frames}")
    return DecodedClip(frames, padded, notes)


def _read_unscaled(path: Path, num_source: int, indices: np.ndarray, padded: bool,
                   settings: PreprocessSettings,
                   notes: list[str]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Second attempt without decoder scaling (PIL resize), then the damaged-stream fallback."""
    native = _Video(path, -1, -1)
    try:
        frames = _as_rgb(native.reader().get_batch(indices.tolist()).asnumpy())
    except Exception as error:  # decord raises DECORDError/RuntimeError for bad streams
        frames, indices, padded = _read_damaged(native, num_source, settings, error, notes)
    return resize_frames(frames, settings.size, settings.resize), indices, padded


@dataclass(frozen=True)
class _Video:
    """A video file and the frame size its decoder scales to."""

    path: Path
    width: int
    height: int

    def reader(self) -> Any:
        """A fresh decord reader (one decoding thread: parallelism is across clips)."""
        import decord

        try:
            return decord.VideoReader(str(self.path), num_threads=1, width=self.width,
                                      height=self.height)
        except Exception as error:
            raise ClipError(f"cannot open as a video: not a video file, or a truncated/corrupt "
                            f"container ({_short(error)})") from error


def _letterbox_video(video: _Video) -> _Video:
    """The same video scaled to the aspect-preserving inner size (source size from frame 0)."""
    try:
        h, w = _Video(video.path, -1, -1).reader().get_batch([0]).shape[1:3]
    except ClipError:
        raise
    except Exception as error:
        raise ClipError(f"no frame could be decoded ({_short(error)})") from error
    scale = video.width / max(h, w)
    return _Video(video.path, max(1, round(w * scale)), max(1, round(h * scale)))


def _pad_square(frames: np.ndarray, size: int) -> np.ndarray:
    """Centre (N, h, w, 3) frames on a black (N, size, size, 3) canvas (no-op when square)."""
    n, h, w = frames.shape[:3]
    if (h, w) == (size, size):
        return frames
    out = np.zeros((n, size, size, 3), np.uint8)
    y0, x0 = (size - h) // 2, (size - w) // 2
    out[:, y0:y0 + h, x0:x0 + w] = frames
    return out


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ClipError("file not found (missing or a broken link)")
    if not path.is_file():
        raise ClipError("not a regular file")
    if path.stat().st_size == 0:
        raise ClipError("empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ClipError("permission denied")


def _read_frame(video: _Video, index: int) -> np.ndarray | None:
    """One frame with a fresh reader (a reader is unreliable after an error), or ``None``."""
    try:
        return _as_rgb(video.reader().get_batch([index]).asnumpy())[0]
    except Exception:
        return None


def _probe(video: _Video, index: int) -> bool:
    return _read_frame(video, index) is not None


def _read_damaged(video: _Video, num_source: int, settings: PreprocessSettings,
                  error: Exception, notes: list[str]) -> tuple[np.ndarray, np.ndarray, bool]:
    """Fallback after a failed batch read: the frame count was an estimate (FLV) or the stream is
    damaged. Re-sample within the readable prefix; if that batch fails too, read the frames one by
    one and replace unreadable ones by the nearest readable one.

    Raises:
        ClipError: No frame decodes.
    """
    readable = _readable_prefix(video, num_source)
    if readable == 0:
        raise ClipError(f"no frame could be decoded (corrupt or truncated stream: "
                        f"{_short(error)})") from error
    if readable < num_source:
        notes.append(f"{readable} of {num_source} frames decodable ({_short(error)})")
    indices, padded = sample_indices(readable, settings.num_frames, settings.sampling)
    try:
        return _as_rgb(video.reader().get_batch(indices.tolist()).asnumpy()), indices, padded
    except Exception:
        pass
    read = {int(i): _read_frame(video, int(i)) for i in np.unique(indices)}
    good = np.array([i for i, f in read.items() if f is not None])
    if len(good) == 0:
        raise ClipError(f"no frame could be decoded (corrupt stream: {_short(error)})") from error
    nearest = [int(good[np.argmin(np.abs(good - i))]) for i in indices]
    missing = int(sum(n != i for n, i in zip(nearest, indices)))
    if missing:
        notes.append(f"{missing} sampled frame(s) unreadable, replaced by the nearest readable one")
    return np.stack([read[i] for i in nearest]), indices, padded


def _readable_prefix(video: _Video, num_source: int) -> int:
    """Number of leading frames that decode (binary search with fresh readers)."""
    if not _probe(video, 0):
        return 0
    lo, hi = 0, num_source - 1  # frame lo reads; frames after hi are unknown or bad
    if _probe(video, hi):
        return num_source
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _probe(video, mid) else (lo, mid)
    return lo + 1


def _as_rgb(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 from gray (N, H, W), (N, H, W, 1) or RGBA input."""
    if frames.ndim == 3:
        frames = frames[..., None]
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    return np.ascontiguousarray(frames[..., :3], dtype=np.uint8)


def _short(error: BaseException) -> str:
    text = " ".join(str(error).split())
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", text)  # decord's "[time] file.cc:line: " prefixes
    return f"{type(error).__name__}: {text[:200]}"


# ---------------------------------------------------------------- face detection


class FaceDetector:
    """facenet-pytorch MTCNN run on batches of equal-sized frames."""

    def __init__(self, settings: PreprocessSettings, device: str = "cpu") -> None:
        from facenet_pytorch import MTCNN

        self.device = device
        self.mtcnn = MTCNN(keep_all=True, device=device, min_face_size=settings.min_face_size,
                           thresholds=list(settings.thresholds), factor=settings.factor)

    def detect(self, frames: np.ndarray, chunk: int = 512) -> list[tuple[Any, Any, Any]]:
        """Raw detections per frame: ``(boxes (k,4) x1y1x2y2, probs (k,), points (k,5,2))`` or
        ``(None, None, None)`` when no face was found."""
        results = []
        for start in range(0, len(frames), chunk):
            boxes, probs, points = self.mtcnn.detect(frames[start:start + chunk], landmarks=True)
            results.extend((b, None if b is None else np.asarray(p, np.float32), q)
                           for b, p, q in zip(boxes, probs, points))
        return results


_DETECTORS: dict[tuple[Any, ...], FaceDetector] = {}


def get_detector(settings: PreprocessSettings, device: str = "auto") -> FaceDetector:
    """One detector per (process, settings, device), created on first use."""
    device = resolve_device(device)
    key = (settings.min_face_size, settings.thresholds, settings.factor, device)
    if key not in _DETECTORS:
        _DETECTORS[key] = FaceDetector(settings, device)
    return _DETECTORS[key]


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def select_faces(detections: Sequence[tuple[Any, Any, Any]], size: int) -> FaceLabels:
    """Per frame, the face with the largest ``area * probability``, as normalised labels.

    Boxes (MTCNN x1, y1, x2, y2) are clipped to the frame and converted to ``[x, y, w, h]``; points
    are clipped too; all are divided by ``size``. Frames without a face (or whose clipped box is
    empty) are filled from the nearest valid frame (earlier on ties) and marked invalid.
    """
    t = len(detections)
    boxes, points = np.zeros((t, 4), np.float32), np.zeros((t, 5, 2), np.float32)
    valid = np.zeros(t, bool)
    for i, (b, p, q) in enumerate(detections):
        if b is None or len(b) == 0:
            continue
        b = np.clip(np.asarray(b, np.float32), 0, size)
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        best = int(np.argmax(area * np.asarray(p, np.float32)))
        x1, y1, x2, y2 = b[best]
        if x2 - x1 <= 0 or y2 - y1 <= 0:
            continue
        boxes[i] = (x1, y1, x2 - x1, y2 - y1)
        points[i] = np.clip(np.asarray(q[best], np.float32), 0, size)
        valid[i] = True
    _fill_from_nearest(boxes, points, valid)
    return FaceLabels(boxes / size, points / size, valid)


def _fill_from_nearest(boxes: np.ndarray, points: np.ndarray, valid: np.ndarray) -> None:
    good = np.flatnonzero(valid)
    if len(good) == 0:
        return
    for i in np.flatnonzero(~valid):
        source = good[np.argmin(np.abs(good - i))]  # argmin takes the earlier frame on ties
        boxes[i], points[i] = boxes[source], points[source]


# ---------------------------------------------------------------- one batch of clips (worker)


def process_clips(records: Sequence[ClipRecord], clip_ids: Sequence[str], root: str,
                  out: str, settings: PreprocessSettings, device: str = "auto") -> list[dict]:
    """Decode, detect and write a batch of clips; returns one manifest row per clip.

    Runs in a worker process (or Ray task). Frames of all clips that decode are sent to MTCNN in
    one batched call. Never raises for a bad clip: the row records the reason.
    """
    rows, decoded = [], []
    for record, clip_id in zip(records, clip_ids):
        try:
            decoded.append((record, clip_id, read_clip(Path(root) / record.path, settings)))
        except ClipError as error:
            rows.append(_row(record, clip_id, "failed", str(error)))
        except Exception as error:  # anything else is still one clip's problem
            rows.append(_row(record, clip_id, "failed", f"unexpected error while decoding: "
                                                        f"{_short(error)}"))
    for (record, clip_id, clip), detections in zip(decoded, _detect_all(decoded, settings, device)):
        try:
            rows.append(_finish_clip(record, clip_id, clip, detections, Path(out), settings))
        except Exception as error:  # e.g. a full cache disk: recorded (--retry-failed redoes it)
            rows.append(_row(record, clip_id, "failed", f"could not label or write the clip: "
                                                        f"{_short(error)}"))
    return rows


def _detect_all(decoded: list[tuple[ClipRecord, str, DecodedClip]], settings: PreprocessSettings,
                device: str) -> list[list | str]:
    """Per clip: its frames' detections, or an error string."""
    if not decoded:
        return []
    detector = get_detector(settings, device)
    t = settings.num_frames
    try:
        flat = detector.detect(np.concatenate([c.frames for _, _, c in decoded]))
        return [flat[i * t:(i + 1) * t] for i in range(len(decoded))]
    except Exception as error:
        log.warning("batched face detection failed (%s); retrying clip by clip", _short(error))
    results: list[list | str] = []
    for _, _, clip in decoded:
        try:
            results.append(detector.detect(clip.frames))
        except Exception as error:
            results.append(f"face detection failed: {_short(error)}")
    return results


def _finish_clip(record: ClipRecord, clip_id: str, clip: DecodedClip, detections: list | str,
                 out: Path, settings: PreprocessSettings) -> dict:
    if isinstance(detections, str):
        return _row(record, clip_id, "failed", detections)
    labels = select_faces(detections, settings.size)
    n_valid = int(labels.valid.sum())
    notes = list(clip.notes)
    if n_valid == 0 and not settings.keep_faceless:
        notes.insert(0, f"no face detected in any of the {settings.num_frames} sampled frames")
        return _row(record, clip_id, "failed", "; ".join(notes), padded=clip.padded)
    if n_valid < settings.num_frames:
        notes.insert(0, f"no face in {settings.num_frames - n_valid} of {settings.num_frames} "
                        f"frames (filled from the nearest face, marked invalid)")
    cache_file = f"{CLIPS_DIR}/{clip_id}.npz"
    write_npz(out / cache_file, frames=clip.frames, boxes=labels.boxes,
              landmarks=labels.landmarks, valid=labels.valid,
              label=np.array(record.label, np.int64), subject=np.array(record.subject))
    status = "ok" if n_valid == settings.num_frames else "partial"
    return _row(record, clip_id, status, "; ".join(notes), n_valid, clip.padded, cache_file)


def _row(record: ClipRecord, clip_id: str, status: str, reason: str, valid_frames: int = 0,
         padded: bool = False, cache_file: str = "") -> dict:
    return {"clip": record.path, "clip_id": clip_id, "status": status, "reason": reason,
            "label": record.label, "label_name": record.label_name, "subject": record.subject,
            "valid_frames": valid_frames, "padded": padded, "cache_file": cache_file}


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


# ---------------------------------------------------------------- the cache directory


def settings_document(adapter: DatasetAdapter, settings: PreprocessSettings) -> dict[str, Any]:
    """The hashed content of ``settings.json``: preprocessing + dataset/label settings."""
    doc = {**adapter.settings(), **settings.to_dict(), "format_version": FORMAT_VERSION}
    encoded = json.dumps(doc, sort_keys=True).encode()
    return {**doc, "settings_hash": hashlib.sha256(encoded).hexdigest()[:16]}


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


def _is_done(row: dict, out: Path, retry_failed: bool) -> bool:
    if row.get("status") in USABLE_STATUSES:
        return bool(row.get("cache_file")) and (out / row["cache_file"]).is_file()
    return row.get("status") == "failed" and not retry_failed


def make_clip_ids(records: Sequence[ClipRecord]) -> list[str]:
    """Filesystem-safe unique ids: the relative path without extension, ``/`` -> ``__``."""
    ids, seen = [], set()
    for record in records:
        path = Path(record.path)
        base = re.sub(r"[^A-Za-z0-9_.\-]", "_", path.with_suffix("").as_posix().replace("/", "__"))
        clip_id = base if base not in seen else f"{base}_{path.suffix.lstrip('.')}"
        while clip_id in seen:
            clip_id += "_"
        seen.add(clip_id)
        ids.append(clip_id)
    return ids


# ---------------------------------------------------------------- the run


def run_preprocess(dataset: str | DatasetAdapter, root: str | os.PathLike[str],
                   out: str | os.PathLike[str], settings: PreprocessSettings | None = None, *,
                   workers: int | None = None, device: str = "auto", use_ray: bool | None = None,
                   overwrite: bool = False, retry_failed: bool = False, clips_per_task: int = 4,
                   limit: int | None = None, progress: bool = True) -> PreprocessSummary:
    """Preprocess every clip of a dataset into the cache at ``out`` (resumable).

    Args:
        dataset: Dataset name (see ``orchestrator.datasets.DATASETS``) or adapter.
        root: Dataset root.
        out: Cache directory.
        settings: Preprocessing settings (defaults: the paper's 16 x 224 official sampling).
        workers: Worker processes; 0 runs in this process; default ``min(4, cpu count)``.
        device: MTCNN device (``auto``, ``cpu``, ``cuda``, ``cuda:1``...).
        use_ray: Run Ray tasks; default: when a Ray cluster is already initialised here.
        overwrite: Delete an existing cache at ``out`` first.
        retry_failed: Re-process clips recorded as failed (they are skipped by default).
        clips_per_task: Clips per worker task (their frames share one MTCNN call).
        limit: Only the first ``limit`` clips (by path), for smoke tests.
        progress: Show a tqdm bar.

    Raises:
        CacheSettingsError: ``out`` holds a cache built with other settings.
        FileNotFoundError, DatasetLayoutError: The root has no clips of this dataset.
    """
    adapter = get_dataset(dataset) if isinstance(dataset, str) else dataset
    settings = settings or PreprocessSettings()
    out = Path(out)
    records = adapter.scan(root)[:limit] if limit else adapter.scan(root)
    prepare_cache(out, settings_document(adapter, settings), overwrite)
    rows = read_rows(out)
    todo = [(r, i) for r, i in zip(records, make_clip_ids(records))
            if r.path not in rows or not _is_done(rows[r.path], out, retry_failed)]
    skipped = len(records) - len(todo)
    log.info("%d clips to process, %d already done in %s", len(todo), skipped, out)
    start = time.perf_counter()
    journal = _Journal(out, rows)
    try:
        ray = _want_ray(use_ray)
        workers = min(4, os.cpu_count() or 1) if workers is None and not ray else workers
        per_task = balanced_task_size(len(todo), clips_per_task, workers or 1)
        runner = _run_ray if ray else _run_local
        runner([list(c) for c in _chunks(todo, per_task)], str(Path(root)), out, settings,
               device, workers, journal, progress)
    finally:
        journal.flush()
    return _summary(out, rows, len(todo), skipped, time.perf_counter() - start)


def _summary(out: Path, rows: dict[str, dict], processed: int, skipped: int,
             elapsed: float) -> PreprocessSummary:
    counts = Counter(r["status"] for r in rows.values())
    failures = sorted((r["clip"], r["reason"]) for r in rows.values() if r["status"] == "failed")
    return PreprocessSummary(out, len(rows), processed, skipped, dict(counts), elapsed, failures)


def balanced_task_size(num_clips: int, clips_per_task: int, workers: int) -> int:
    """Clips per task: at most ``clips_per_task``, fewer when that would leave workers idle."""
    return max(1, min(clips_per_task, -(-num_clips // max(1, workers))))


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    size = max(1, size)
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _Journal:
    """Collects finished rows: appended to the journal at once, manifest rewritten every few s."""

    def __init__(self, out: Path, rows: dict[str, dict]) -> None:
        self.out, self.rows, self.last_flush = out, rows, time.monotonic()

    def add(self, new_rows: list[dict]) -> None:
        with open(self.out / JOURNAL_FILE, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in new_rows)
        for row in new_rows:
            self.rows[row["clip"]] = row
        if time.monotonic() - self.last_flush > _MANIFEST_FLUSH_S:
            self.flush()

    def flush(self) -> None:
        write_manifest(self.out, self.rows.values())
        self.last_flush = time.monotonic()


Task = list[tuple[ClipRecord, str]]


def _call(task: Task, root: str, out: Path, settings: PreprocessSettings,
          device: str) -> list[dict]:
    return process_clips([r for r, _ in task], [i for _, i in task], root, str(out), settings,
                         device)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, unit="clip", desc="preprocess", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


def _run_local(tasks: list[Task], root: str, out: Path, settings: PreprocessSettings,
               device: str, workers: int | None, journal: _Journal, progress: bool) -> None:
    workers = workers or 0
    bar = _progress(sum(len(t) for t in tasks), progress)
    done = _make_reporter(journal, bar)
    try:
        if workers <= 0:
            with _torch_threads(1):
                for task in tasks:
                    done(_call(task, root, out, settings, device))
        else:
            crashed = _run_pool(tasks, root, out, settings, device, workers, done)
            _run_isolated(crashed, root, out, settings, device, done)
    finally:
        bar.close()


def _make_reporter(journal: _Journal, bar: Any) -> Callable[[list[dict]], None]:
    def done(rows: list[dict]) -> None:
        journal.add(rows)
        bar.update(len(rows))
        bar.set_postfix(failed=sum(r["status"] == "failed" for r in journal.rows.values()),
                        refresh=False)
    return done


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """MTCNN is many small ops: one intra-op thread is fastest on a busy CPU (measured 3x on a
    shared 2-core machine); parallelism comes from worker processes instead."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A spawn-context process pool whose workers split the CPU threads evenly (also used by the
    benchmark to time warm workers)."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    return ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(threads,),
                               mp_context=multiprocessing.get_context("spawn"))


def _run_pool(tasks: list[Task], root: str, out: Path, settings: PreprocessSettings, device: str,
              workers: int, done: Callable[[list[dict]], None]) -> list[Task]:
    """Run tasks on a spawn process pool; returns the tasks lost to a crashed worker."""
    crashed: list[Task] = []
    with worker_pool(workers) as pool:
        futures: dict[Future, Task] = {pool.submit(_call, t, root, out, settings, device): t
                                       for t in tasks}
        try:
            pending = set(futures)
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    try:
                        done(future.result())
                    except BrokenProcessPool:
                        crashed.append(futures[future])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return crashed


def _run_isolated(tasks: list[Task], root: str, out: Path, settings: PreprocessSettings,
                  device: str, done: Callable[[list[dict]], None]) -> None:
    """Clips whose worker crashed (e.g. a decoder segfault): one at a time, one fresh process
    each time a crash happens, so the culprit is identified and recorded."""
    clips = [item for task in tasks for item in task]
    if clips:
        log.warning("a worker process crashed; re-running %d clip(s) one by one", len(clips))
    pool = None
    try:
        for record, clip_id in clips:
            pool = pool or worker_pool(1)
            try:
                done(pool.submit(_call, [(record, clip_id)], root, out, settings, device).result())
            except BrokenProcessPool:
                pool = None
                done([_row(record, clip_id, "failed",
                           "the decoder crashed the worker process (corrupt video?)")])
    finally:
        if pool is not None:
            pool.shutdown()


def _want_ray(use_ray: bool | None) -> bool:
    if use_ray is not None:
        return use_ray
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _run_ray(tasks: list[Task], root: str, out: Path, settings: PreprocessSettings, device: str,
             workers: int | None, journal: _Journal, progress: bool) -> None:
    """Ray tasks (``root`` and ``out`` must be on storage every node sees)."""
    import ray

    if not ray.is_initialized():
        ray.init()
    use_gpu = resolve_device(device).startswith("cuda")
    remote = ray.remote(num_cpus=1, num_gpus=0.25 if use_gpu else 0)(_call)
    limit = workers or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    bar = _progress(sum(len(t) for t in tasks), progress)
    done = _make_reporter(journal, bar)
    queue, running = list(reversed(tasks)), {}
    try:
        while queue or running:
            while queue and len(running) < limit:
                task = queue.pop()
                running[remote.remote(task, root, out, settings, device)] = task
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                task = running.pop(ref)
                try:
                    done(ray.get(ref))
                except ray.exceptions.RayError as error:
                    done([_row(r, i, "failed", f"ray task failed: {_short(error)}")
                          for r, i in task])
    finally:
        bar.close()
