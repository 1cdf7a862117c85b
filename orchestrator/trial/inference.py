"""A trained model applied to videos: the preprocessing's decoding and MTCNN, then the network.

Every video goes through exactly what ``mtcae preprocess`` does to a training clip, with the
settings the model's training cache was made with: :func:`orchestrator.data.video.read_clip`
samples and resizes the frames, :class:`orchestrator.data.faces.FaceDetector` runs MTCNN batched
over the frames of several clips and :func:`orchestrator.data.faces.select_faces` keeps one face
per frame. The network then gives the clip's class probabilities and its own per-frame boxes and
landmarks. A preprocessed clip (a cache's ``clips/<id>.npz``) is taken as it is, frames and MTCNN
labels included.

Coordinates are pixels of the source video (``x1, y1, x2, y2``; 5 points left eye, right eye,
nose, left and right mouth corner), mapped back through the cache's ``squash`` or ``letterbox``
resize; frames where MTCNN found no face have NaN there. A clip that cannot be read is one
``failed`` result with the reason; a clip without any face is still predicted, with status
``no_face`` (the model never saw such a clip in training).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from orchestrator.data.faces import FaceLabels, get_detector, select_faces
from orchestrator.data.settings import PreprocessSettings
from orchestrator.data.video import ClipError, read_clip, short_error
from orchestrator.trial.predictor import Predictor

logger = logging.getLogger(__name__)

STATUS_OK, STATUS_NO_FACE, STATUS_FAILED = "ok", "no_face", "failed"
CACHE_CLIP_SUFFIX = ".npz"


@dataclass(frozen=True)
class FrameGeometry:
    """How a source frame of ``width`` x ``height`` became the model's ``size`` x ``size`` frame."""

    width: int
    height: int
    size: int
    resize: str = "squash"

    def to_source(self, points: np.ndarray) -> np.ndarray:
        """Points (..., 2) normalised by ``size`` -> source pixels (x, y)."""
        points = np.asarray(points, np.float64)
        if self.resize == "squash":
            return points * np.array([self.width, self.height])
        scale = self.size / max(self.width, self.height)
        inner = np.array([max(1, round(self.width * scale)), max(1, round(self.height * scale))])
        offset = (self.size - inner) // 2  # read_clip centres the scaled frame on a black square
        return (points * self.size - offset) / scale


@dataclass
class ClipResult:
    """One clip's predictions.

    Attributes:
        clip: The clip's name (the path as given, or the request's ``clip``).
        status: ``ok``, ``no_face`` (predicted, but MTCNN found no face in any frame) or ``failed``.
        reason: Why it failed, or remarks (frames without a face, padding, truncation).
        class_names: Class names, index = class.
        probabilities: (K,) class probabilities (None when failed).
        frame_index: (T,) source frame index of each sampled frame.
        face_found: (T,) MTCNN found a face in that frame.
        face_boxes: (T, 4) MTCNN ``x1, y1, x2, y2`` in source pixels (NaN without a face).
        face_landmarks: (T, 5, 2) MTCNN points in source pixels (NaN without a face).
        pred_boxes: (T, 4) the model's boxes, ``x1, y1, x2, y2`` source pixels (None for ``stl``).
        pred_landmarks: (T, 5, 2) the model's points in source pixels (None for ``stl``).
        frames: (T, S, S, 3) the model's input frames (only when asked for: overlays).
        geometry: Source frame size and resize.
        fps: The source's frame rate (None when unknown).
    """

    clip: str
    status: str
    reason: str = ""
    class_names: tuple[str, ...] = ()
    probabilities: np.ndarray | None = None
    frame_index: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    face_found: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    face_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    face_landmarks: np.ndarray = field(default_factory=lambda: np.zeros((0, 5, 2)))
    pred_boxes: np.ndarray | None = None
    pred_landmarks: np.ndarray | None = None
    frames: np.ndarray | None = None
    geometry: FrameGeometry | None = None
    fps: float | None = None

    @property
    def label(self) -> str | None:
        """The most probable class (None when failed)."""
        if self.probabilities is None:
            return None
        return self.class_names[int(np.argmax(self.probabilities))]


@dataclass
class _Decoded:
    """A clip ready for the network: frames and MTCNN labels (normalised by S)."""

    clip: str
    frames: np.ndarray  # (T, S, S, 3) uint8
    indices: np.ndarray  # (T,)
    notes: list[str]
    geometry: FrameGeometry
    fps: float | None
    labels: FaceLabels | None = None


def predict_clips(predictor: Predictor, clips: Iterable[tuple[str, Path]], batch_size: int = 4,
                  device: str = "auto", keep_frames: bool = False) -> Iterator[ClipResult]:
    """Predict every clip, ``batch_size`` clips per MTCNN call and network forward.

    Args:
        predictor: The model.
        clips: ``(name, path)`` of each clip: a video file or a cache's ``.npz`` clip.
        batch_size: Clips decoded, detected and predicted together.
        device: MTCNN device (``auto``, ``cpu``, ``cuda``); the network runs where ``predictor`` is.
        keep_frames: Keep the model's input frames in the results (for overlays).

    Yields:
        One :class:`ClipResult` per clip, in order; a bad clip is a ``failed`` result, never an error.
    """
    batch: list[tuple[str, Path]] = []
    for item in clips:
        batch.append(item)
        if len(batch) == batch_size:
            yield from _predict_batch(predictor, batch, device, keep_frames)
            batch = []
    if batch:
        yield from _predict_batch(predictor, batch, device, keep_frames)


def _predict_batch(predictor: Predictor, batch: Sequence[tuple[str, Path]], device: str,
                   keep_frames: bool) -> list[ClipResult]:
    settings = predictor.preprocess
    results: dict[int, ClipResult] = {}
    decoded: dict[int, _Decoded] = {}
    for i, (name, path) in enumerate(batch):
        try:
            decoded[i] = _decode(name, Path(path), settings)
        except ClipError as error:
            results[i] = ClipResult(name, STATUS_FAILED, str(error), predictor.class_names)
        except Exception as error:  # anything else is still one clip's problem
            results[i] = ClipResult(name, STATUS_FAILED, f"unexpected error while decoding: "
                                    f"{short_error(error)}", predictor.class_names)
    _detect([d for d in decoded.values() if d.labels is None], settings, device)
    if decoded:
        frames = torch.from_numpy(np.stack([d.frames for d in decoded.values()]))  # (B, T, S, S, 3)
        out = predictor(frames)
        for row, (i, clip) in enumerate(decoded.items()):
            results[i] = _result(predictor, clip, out, row, keep_frames)
    return [results[i] for i in range(len(batch))]


def _decode(name: str, path: Path, settings: PreprocessSettings) -> _Decoded:
    """Frames of a video (read_clip) or of a cache clip, with the clip's frame geometry."""
    if path.suffix == CACHE_CLIP_SUFFIX:
        return _cache_clip(name, path, settings)
    clip = read_clip(path, settings)
    width, height, fps = _source_format(path, settings.size)
    geometry = FrameGeometry(width, height, settings.size, settings.resize)
    return _Decoded(name, clip.frames, clip.indices, list(clip.notes), geometry, fps)


def _cache_clip(name: str, path: Path, settings: PreprocessSettings) -> _Decoded:
    """A preprocessed clip: its frames and MTCNN labels as the cache stores them."""
    if not path.is_file():
        raise ClipError("file not found (missing or a broken link)")
    try:
        with np.load(path) as npz:
            frames, boxes, points, valid = (npz[k] for k in ("frames", "boxes", "landmarks", "valid"))
    except Exception as error:
        raise ClipError(f"not a preprocessed clip (.npz with frames, boxes, landmarks, valid): "
                        f"{short_error(error)}") from error
    t, s = settings.num_frames, settings.size
    if frames.shape != (t, s, s, 3):
        raise ClipError(f"clip frames are {frames.shape}, the model takes ({t}, {s}, {s}, 3)")
    geometry = FrameGeometry(s, s, s, "squash")
    labels = FaceLabels(boxes.astype(np.float32), points.astype(np.float32), valid.astype(bool))
    return _Decoded(name, frames, np.arange(t), [], geometry, None, labels)


def _source_format(path: Path, size: int) -> tuple[int, int, float | None]:
    """Width, height and frame rate the container declares (PyAV header; ``size`` when unknown)."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return (int(stream.codec_context.width), int(stream.codec_context.height),
                    float(rate) if rate else None)
    except Exception:  # read_clip decoded it: the geometry is only for drawing and coordinates
        return size, size, None


def _detect(clips: Sequence[_Decoded], settings: PreprocessSettings, device: str) -> None:
    """MTCNN over the frames of all clips in one call (clip by clip if that fails)."""
    if not clips:
        return
    detector = get_detector(settings, device)
    t = settings.num_frames
    try:
        flat = detector.detect(np.concatenate([c.frames for c in clips]))
        per_clip = [flat[i * t:(i + 1) * t] for i in range(len(clips))]
    except Exception as error:
        logger.warning("batched face detection failed (%s); retrying clip by clip", short_error(error))
        per_clip = []
        for clip in clips:
            try:
                per_clip.append(detector.detect(clip.frames))
            except Exception as err:
                clip.notes.append(f"face detection failed: {short_error(err)}")
                per_clip.append([(None, None, None)] * t)
    for clip, detections in zip(clips, per_clip):
        clip.labels = select_faces(detections, settings.size)


def _result(predictor: Predictor, clip: _Decoded, out: dict[str, torch.Tensor | None], row: int,
            keep_frames: bool) -> ClipResult:
    labels, geometry, t = clip.labels, clip.geometry, len(clip.frames)
    found = labels.valid.copy()
    corners = np.concatenate([labels.boxes[:, :2], labels.boxes[:, :2] + labels.boxes[:, 2:]], axis=1)
    face_boxes = geometry.to_source(corners.reshape(t, 2, 2)).reshape(t, 4)
    face_points = geometry.to_source(labels.landmarks)
    face_boxes[~found], face_points[~found] = np.nan, np.nan
    notes = list(clip.notes)
    status = STATUS_OK
    if not found.any():
        status = STATUS_NO_FACE
        notes.insert(0, f"no face detected in any of the {t} sampled frames (prediction unreliable)")
    elif not found.all():
        notes.insert(0, f"no face in {t - int(found.sum())} of {t} frames")
    pred_boxes = pred_points = None
    if out["boxes"] is not None:
        xywh = out["boxes"][row].float().cpu().numpy()  # (T, 4)
        pred = np.stack([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # (T, 2, 2)
        pred_boxes = geometry.to_source(pred).reshape(t, 4)
        pred_points = geometry.to_source(out["landmarks"][row].float().cpu().numpy())
    probs = out["probabilities"][row].float().cpu().numpy()
    return ClipResult(clip.clip, status, "; ".join(notes), predictor.class_names, probs,
                      np.asarray(clip.indices, np.int64), found, face_boxes, face_points,
                      pred_boxes, pred_points, clip.frames if keep_frames else None, geometry, clip.fps)
