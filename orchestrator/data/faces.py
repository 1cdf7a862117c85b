"""Face labels: facenet-pytorch MTCNN over the sampled frames, one face per frame.

The paper's multi-task labels (section 4.2, Fig. 3) come from running MTCNN over every sampled
frame. Detection runs on batches of equal-sized frames; per frame the face with the largest
``area * probability`` is kept; box ``[x, y, w, h]`` and the 5 points (left eye, right eye, nose,
left mouth, right mouth) are clipped to the frame and normalised by ``size``; frames without a face
take the nearest valid frame's labels and are flagged invalid so the loss can mask them.

facenet-pytorch and torch are imported inside the functions that need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.data.settings import PreprocessSettings


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


class FaceDetector:
    """facenet-pytorch MTCNN run on batches of equal-sized frames.

    Args:
        settings: Detection settings (min face size, thresholds, pyramid factor).
        device: ``cpu`` or ``cuda[:n]``.
        channels_last: Hold the three networks' weights in channels-last (NHWC) layout. Their
            convolutions then run, and hand on, NHWC activations, for which PyTorch's CPU
            max-pooling and oneDNN convolutions are vectorised across channels: on a 2-core AVX-512
            CPU MTCNN over 64 frames took 1.10 s instead of 1.65 s, with boxes equal to 1e-4 px
            (only the summation order changes). ``False`` is facenet-pytorch as shipped.
    """

    def __init__(self, settings: PreprocessSettings, device: str = "cpu", channels_last: bool = True) -> None:
        from facenet_pytorch import MTCNN

        self.device = device
        self.mtcnn = MTCNN(keep_all=True, device=device, min_face_size=settings.min_face_size,
                           thresholds=list(settings.thresholds), factor=settings.factor)
        if channels_last:
            import torch

            self.mtcnn.to(memory_format=torch.channels_last)

    def detect(self, frames: np.ndarray, chunk: int = 512) -> list[tuple[Any, Any, Any]]:
        """Raw detections per frame: ``(boxes (k,4) x1y1x2y2, probs (k,), points (k,5,2))`` or
        ``(None, None, None)`` when no face was found."""
        import torch

        results = []
        for start in range(0, len(frames), chunk):
            # (T, H, W, 3) as MTCNN expects, but a view of planar (T, 3, H, W) memory: the per-box
            # crops of stages 2 and 3 are then resampled by the planar kernel, not a 3-channel NHWC
            # one (0.85 s instead of 0.94 s per 64 frames on top of channels_last).
            batch = torch.from_numpy(np.ascontiguousarray(frames[start:start + chunk]))
            batch = batch.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
            boxes, probs, points = self.mtcnn.detect(batch, landmarks=True)
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

