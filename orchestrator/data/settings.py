"""Preprocessing settings: everything that changes a cache's content (a leaf: imports nothing of ours).

Video decoding (:mod:`orchestrator.data.video`), face labelling (:mod:`orchestrator.data.faces`) and
the run loop (:mod:`orchestrator.data.preprocess`) all read these settings; none of them owns them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SAMPLING_MODES = ("official", "uniform")
RESIZE_MODES = ("squash", "letterbox")


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
