"""Generated test videos (PyAV) and broken files for the preprocessing tests.

Imported by ``tests/conftest.py`` so the fixtures are visible to every test module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from orchestrator.data.demo import (
    actor_style,
    background,
    class_motion,
    face_patch,
    render_clip,
    write_video,
)

REAL_VIDEOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_videos"


def gradient_frames(num_frames: int = 30, width: int = 64, height: int = 48) -> np.ndarray:
    """uint8 (T, H, W, 3) frames without faces: a moving colour gradient, frame index encoded in
    the green channel (``frame[..., 1] ~ 8 * index``) so tests can tell which frame was read."""
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for i in range(num_frames):
        frames[i, ..., 0] = (xx * 255 // max(1, width - 1) + 3 * i) % 256
        frames[i, ..., 1] = (8 * i) % 256
        frames[i, ..., 2] = yy * 255 // max(1, height - 1)
    return frames


def face_frames(num_frames: int = 24, size: int = 112, label: int = 0, actor: int = 2,
                seed: int = 0) -> np.ndarray:
    """uint8 (T, S, S, 3) frames of the demo's astronaut face (MTCNN finds it)."""
    style = actor_style(actor, seed)
    rng = np.random.default_rng([seed, actor, label])
    return render_clip(style, class_motion(label, num_frames, rng), size, size, rng,
                       face_patch(style), background(style, size, size))


def write_frames(path: Path, frames: np.ndarray, codec: str = "libx264",
                 pix_fmt: str = "yuv420p", fps: int = 25) -> Path:
    """Write frames to ``path`` (parents created); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, frames, fps=fps, codec=codec, pix_fmt=pix_fmt)
    return path


def write_gradient_video(path: Path, num_frames: int = 30, width: int = 64, height: int = 48,
                         **kwargs: str) -> Path:
    """A small face-free video (see :func:`gradient_frames`)."""
    return write_frames(path, gradient_frames(num_frames, width, height), **kwargs)


def make_zero_byte(path: Path) -> Path:
    """An empty file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def make_text_file(path: Path) -> Path:
    """A text file with a video extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("this is not a video\n" * 20)
    return path


def make_truncated(path: Path) -> Path:
    """An mp4 cut in half: the index (moov atom, written at the end) is lost."""
    write_gradient_video(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncate_at_frame(path: Path, frame: int) -> Path:
    """Cut a written video just before its ``frame``-th video packet, as an interrupted download
    or copy leaves it: a streamable container (FLV, Matroska) still opens and its header still
    declares every frame."""
    import av

    with av.open(str(path)) as container:
        positions = [packet.pos for packet in container.demux(video=0) if packet.size]
    path.write_bytes(path.read_bytes()[:positions[frame]])
    return path


def make_corrupt(path: Path) -> Path:
    """An mp4 whose middle bytes are overwritten with noise (the container still opens)."""
    write_gradient_video(path, num_frames=40)
    data = bytearray(path.read_bytes())
    start = len(data) // 3
    data[start:start + 400] = np.random.default_rng(0).integers(0, 256, 400, np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def make_broken_link(path: Path) -> Path:
    """A symlink to nowhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(path.parent / "does-not-exist.mp4", path)
    return path


@pytest.fixture
def video_factory(tmp_path: Path) -> Callable[..., Path]:
    """``make(name, **kwargs)`` writes a gradient video under ``tmp_path``."""
    def make(name: str, **kwargs: object) -> Path:
        return write_gradient_video(tmp_path / name, **kwargs)  # type: ignore[arg-type]
    return make


@pytest.fixture(scope="session")
def face_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 24-frame 112 px demo-face video in RAVDESS layout: ``<root>/Actor_02/<name>.mp4``."""
    root = tmp_path_factory.mktemp("face_video")
    return write_frames(root / "Actor_02" / "02-01-01-01-01-01-02.mp4", face_frames())


@pytest.fixture
def real_videos() -> Path:
    """``../shared/data/real_videos`` beside the checkout; skips when absent (a user's clone)."""
    if not REAL_VIDEOS.is_dir():
        pytest.skip(f"real test videos not found at {REAL_VIDEOS} (only present on the project's "
                    f"shared workspace)")
    return REAL_VIDEOS
