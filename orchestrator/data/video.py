"""Decoding: which frames of a clip to read, reading only those with decord, and resizing them.

``official`` sampling takes stride ``floor(T/16)`` from frame 0 as the authors'
``Preprocessing_Video.py``; ``uniform`` takes the centres of 16 equal segments; clips shorter than
16 frames are padded by repeating frames. Frames are resized to ``size`` x ``size`` inside the
decoder (``squash`` the whole frame as the authors did, or ``letterbox`` keeping the aspect ratio).
Damaged streams and containers with estimated frame counts (FLV) fall back to the readable prefix
and, frame by frame, to the nearest readable frame. A clip that cannot be used raises
:class:`ClipError` with the reason the manifest records.

**Truncated media.** decord counts the frames it can index, so a cut-off file looks like a short
clip (the first 40 kB of a 65-frame CREMA-D FLV read as 4 frames). The frame count the container
declares (the stream's frame count, else its duration times the frame rate, read by PyAV from the
header) is compared with the frames that decode. A shortfall of more than
:data:`TRUNCATION_TOLERANCE` of the declared frames (and more than
:data:`TRUNCATION_MIN_FRAMES`; duration-based counts are off by a frame or two) marks the clip
``truncated: k of N frames decodable``: :class:`DecodedClip` carries the flag and the note, and
preprocessing records the clip as ``partial``. A truncated clip fails instead (:class:`ClipError`
with the same reason) when fewer frames decode than the clip samples (``num_frames``: its frames
would be repeats) or less than :data:`MIN_DECODABLE_FRACTION` of the declared frames (it is no
longer the labelled clip).

decord, PyAV and PIL are imported inside the functions that need them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.settings import SAMPLING_MODES, PreprocessSettings

# A clip is truncated when more than this fraction of its declared frames does not decode ...
TRUNCATION_TOLERANCE = 0.1
# ... and more than this many frames (FLV durations run a frame or two past the last frame).
TRUNCATION_MIN_FRAMES = 2
# A truncated clip with less than this fraction of its declared frames decodable fails.
MIN_DECODABLE_FRACTION = 0.5


class ClipError(Exception):
    """A clip cannot be used; ``str(error)`` is the reason recorded in the manifest."""


@dataclass
class DecodedClip:
    """Sampled, resized frames of one clip.

    Attributes:
        frames: uint8 (T, S, S, 3).
        padded: The source had fewer than T frames.
        notes: Human-readable remarks for the manifest's ``reason`` column.
        truncated: The container declares many more frames than decode (its note comes first).
        decodable_frames: Frames that decode (the readable prefix).
        declared_frames: Frames the container declares, None when it declares none.
        indices: The source frame index of each of the T frames (None when not read by
            :func:`read_clip`).
    """

    frames: np.ndarray
    padded: bool
    notes: list[str] = field(default_factory=list)
    truncated: bool = False
    decodable_frames: int = 0
    declared_frames: int | None = None
    indices: np.ndarray | None = None


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
        ClipError: The file is missing, empty, unreadable, not a video, no frame decodes, or it is
            truncated below the thresholds of the module docstring.
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
    decodable = num_source
    try:
        frames = _pad_square(_as_rgb(reader.get_batch(indices.tolist()).asnumpy()), settings.size)
    except Exception:  # decord's scaler fails for some output widths (e.g. 48): decode unscaled
        frames, indices, padded, decodable = _read_unscaled(video.path, num_source, indices,
                                                            padded, settings, notes)
    declared = declared_frames(video.path)
    truncated = check_truncation(decodable, declared, settings.num_frames)
    if truncated:
        notes.insert(0, truncated)
    if padded:
        notes.append(f"padded: {min(num_source, int(indices.max()) + 1)} source frames "
                     f"< {settings.num_frames}")
    return DecodedClip(frames, padded, notes, bool(truncated), decodable, declared,
                       np.asarray(indices, np.int64))


def _read_unscaled(path: Path, num_source: int, indices: np.ndarray, padded: bool,
                   settings: PreprocessSettings,
                   notes: list[str]) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """Second attempt without decoder scaling (PIL resize), then the damaged-stream fallback.

    Returns:
        Frames, the indices read, whether they are padded, and the number of decodable frames.
    """
    native = _Video(path, -1, -1)
    decodable = num_source
    try:
        frames = _as_rgb(native.reader().get_batch(indices.tolist()).asnumpy())
    except Exception as error:  # decord raises DECORDError/RuntimeError for bad streams
        frames, indices, padded, decodable = _read_damaged(native, num_source, settings, error,
                                                           notes)
    return resize_frames(frames, settings.size, settings.resize), indices, padded, decodable


# ---------------------------------------------------------------- truncation


def declared_frames(path: str | os.PathLike[str]) -> int | None:
    """Frames the container's header declares for its first video stream (PyAV, no decoding).

    The stream's frame count when the container stores one (MP4, AVI), else the stream's or the
    container's duration times the frame rate (FLV, Matroska, WebM); None when PyAV cannot open
    the file or it declares neither.
    """
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            rate = stream.average_rate or stream.guessed_rate
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = container.duration / av.time_base if container.duration else 0.0
    except Exception:  # unreadable headers: decord's own errors describe the file better
        return None
    return round(seconds * float(rate)) if rate and seconds > 0 else None


def check_truncation(decodable: int, declared: int | None, num_frames: int) -> str:
    """The ``truncated: k of N frames decodable`` note, or ``""`` for an intact clip.

    Raises:
        ClipError: Truncated, and fewer than ``num_frames`` or than
            :data:`MIN_DECODABLE_FRACTION` of the declared frames decode.
    """
    if declared is None:
        return ""
    missing = declared - decodable
    if missing <= max(TRUNCATION_MIN_FRAMES, TRUNCATION_TOLERANCE * declared):
        return ""
    note = f"truncated: {decodable} of {declared} frames decodable"
    if decodable < num_frames:
        raise ClipError(f"{note} (fewer than the {num_frames} frames a clip samples)")
    if decodable < MIN_DECODABLE_FRACTION * declared:
        raise ClipError(f"{note} (less than {MIN_DECODABLE_FRACTION:.0%} of the clip)")
    return note


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
                            f"container ({short_error(error)})") from error


def _letterbox_video(video: _Video) -> _Video:
    """The same video scaled to the aspect-preserving inner size (source size from frame 0)."""
    try:
        h, w = _Video(video.path, -1, -1).reader().get_batch([0]).shape[1:3]
    except ClipError:
        raise
    except Exception as error:
        raise ClipError(f"no frame could be decoded ({short_error(error)})") from error
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
                  error: Exception, notes: list[str]) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """Fallback after a failed batch read: the frame count was an estimate (FLV) or the stream is
    damaged. Re-sample within the readable prefix; if that batch fails too, read the frames one by
    one and replace unreadable ones by the nearest readable one.

    Returns:
        Frames, the indices read, whether they are padded, and the readable prefix's length.

    Raises:
        ClipError: No frame decodes.
    """
    readable = _readable_prefix(video, num_source)
    if readable == 0:
        raise ClipError(f"no frame could be decoded (corrupt or truncated stream: "
                        f"{short_error(error)})") from error
    if readable < num_source:
        notes.append(f"{readable} of {num_source} frames decodable ({short_error(error)})")
    indices, padded = sample_indices(readable, settings.num_frames, settings.sampling)
    try:
        return (_as_rgb(video.reader().get_batch(indices.tolist()).asnumpy()), indices, padded,
                readable)
    except Exception:
        pass
    read = {int(i): _read_frame(video, int(i)) for i in np.unique(indices)}
    good = np.array([i for i, f in read.items() if f is not None])
    if len(good) == 0:
        raise ClipError(f"no frame could be decoded (corrupt stream: "
                        f"{short_error(error)})") from error
    nearest = [int(good[np.argmin(np.abs(good - i))]) for i in indices]
    missing = int(sum(n != i for n, i in zip(nearest, indices)))
    if missing:
        notes.append(f"{missing} sampled frame(s) unreadable, replaced by the nearest readable one")
    return np.stack([read[i] for i in nearest]), indices, padded, readable


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


def short_error(error: BaseException) -> str:
    """``Type: message`` on one line, without decord's log prefixes, at most 200 characters."""
    text = " ".join(str(error).split())
    text = re.sub(r"\[[\d:]+\] \S+:\d+: ", "", text)  # decord's "[time] file.cc:line: " prefixes
    return f"{type(error).__name__}: {text[:200]}"

