"""A small synthetic dataset in the RAVDESS layout, so the whole pipeline runs without RAVDESS.

Every clip shows the face of ``skimage.data.astronaut()`` (a real photo shipped inside
scikit-image, so nothing is downloaded) composited on a background. Classes differ by a
**class-dependent head motion** over time (nod, drift, shake, tilt, approach/recede, brightness
flash), so the 7 classes are learnable from 16 sampled frames; synthetic "actors" differ by crop,
scale, mirror, colour cast and background, and every clip by amplitude, phase and sensor noise.
It is for smoke tests and demos of the pipeline, not a facial-expression benchmark.

Files: ``<out>/Actor_XX/02-01-EE-II-SS-RR-AA.mp4`` (video-only, speech, RAVDESS emotion codes of
the 7-class protocol: 01 neutral, 03 happy, 04 sad, 05 angry, 06 fearful, 07 disgust,
08 surprised), plus ``<out>/README.txt``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.data.datasets import RAVDESS_EMOTIONS_7

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# 7-class label id -> RAVDESS emotion code (calm, 02, is not generated).
EMOTION_CODES = ("01", "03", "04", "05", "06", "07", "08")
# Face crop in astronaut() (512 x 512): MTCNN finds the face at x 181-268, y 62-172.
_FACE_CENTRE = (224.0, 120.0)
_CROP_HALF = 112.0
_NOISE_BANK: dict[tuple[int, int], torch.Tensor] = {}

README = """\
Synthetic demo dataset written by `mtcae demo-data` (orchestrator/demo_data.py).

NOT real emotion data: every clip is the face of skimage.data.astronaut() moving in a
class-dependent way (nod, drift, shake, tilt, approach/recede, brightness flash) on a
per-actor background. It exists so that `mtcae preprocess --dataset demo` and training run end
to end without RAVDESS on disk. Layout and names follow RAVDESS (Actor_XX/02-01-EE-II-SS-RR-AA.mp4).
"""


@dataclass(frozen=True)
class ActorStyle:
    """Per-actor appearance.

    Attributes:
        crop_offset: Shift of the face crop in the source photo (pixels).
        crop_scale: Crop size factor (how much hair/shoulder is visible).
        place: Face centre on the canvas, fraction of the frame from the centre.
        display: Displayed patch size, fraction of the frame's short side.
        mirror: Flip the face horizontally.
        colour: Per-channel gain of the face.
        background: Two RGB colours of the background gradient (0-255).
        texture: Spatial frequency of the background pattern.
    """

    crop_offset: tuple[float, float]
    crop_scale: float
    place: tuple[float, float]
    display: float
    mirror: bool
    colour: tuple[float, float, float]
    background: tuple[tuple[float, ...], tuple[float, ...]]
    texture: float


def actor_style(actor: int, seed: int = 0) -> ActorStyle:
    """Deterministic appearance of one synthetic actor."""
    rng = np.random.default_rng([seed, actor, 1])
    return ActorStyle(
        crop_offset=tuple(rng.uniform(-14, 14, 2)),
        crop_scale=float(rng.uniform(0.9, 1.12)),
        place=tuple(rng.uniform(-0.06, 0.06, 2)),
        display=float(rng.uniform(0.66, 0.8)),
        mirror=bool(actor % 2),
        colour=tuple(rng.uniform(0.95, 1.05, 3)),
        # Muted backgrounds: saturated random colours dominated a random encoder's tokens, and a
        # classifier trained on 8 actors learned them instead of the motion (demo below chance).
        background=(tuple(rng.uniform(90, 166, 3)), tuple(rng.uniform(90, 166, 3))),
        texture=float(rng.uniform(2, 7)),
    )


def class_motion(label: int, num_frames: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-frame motion of one clip of class ``label`` (7-class ids).

    Returns arrays of length ``num_frames``: ``dx``, ``dy`` (fraction of the frame), ``scale``
    (factor), ``angle`` (degrees), ``gain`` (brightness factor).
    """
    t = np.linspace(0.0, 1.0, num_frames)
    amp, phase = rng.uniform(0.8, 1.2), rng.uniform(0.0, 0.15)
    zero, one = np.zeros_like(t), np.ones_like(t)
    motion = {"dx": zero, "dy": zero, "scale": one, "angle": zero, "gain": one}

    def wave(cycles: float) -> np.ndarray:
        return np.sin(2 * np.pi * (cycles * t + phase))

    # Amplitudes and speeds are large on purpose: at 64 px a frozen random-init encoder sees 4 x 4
    # patches of 16 px, and a head moving a few pixels barely changes its pooled tokens.
    if label == 1:    # happy: nodding
        motion |= {"dy": 0.14 * amp * wave(4.0)}
    elif label == 2:  # sad: sinking and darkening
        motion |= {"dy": 0.26 * amp * t, "gain": 1 - 0.7 * amp * t}
    elif label == 3:  # angry: fast head shake
        motion |= {"dx": 0.14 * amp * wave(6.0)}
    elif label == 4:  # fearful: receding to the left
        motion |= {"scale": np.exp(-0.7 * amp * t), "dx": -0.2 * amp * t}
    elif label == 5:  # disgust: head tilting back and forth
        motion |= {"angle": 30 * amp * wave(3.0)}
    elif label == 6:  # surprised: approaching with a brightness flash
        motion |= {"scale": np.exp(0.6 * amp * t), "gain": 1 + 0.8 * amp * np.sin(np.pi * t)}
    jitter = rng.normal(0, 0.006, (2, num_frames))
    return motion | {"dx": motion["dx"] + jitter[0], "dy": motion["dy"] + jitter[1]}


def face_patch(style: ActorStyle) -> np.ndarray:
    """float32 (4, P, P) RGBA patch: the face crop with a soft elliptical alpha."""
    from skimage import data
    from skimage.transform import resize

    photo = data.astronaut().astype(np.float32)
    half = _CROP_HALF * style.crop_scale
    cx, cy = _FACE_CENTRE[0] + style.crop_offset[0], _FACE_CENTRE[1] + style.crop_offset[1]
    y0, x0 = int(max(0, cy - half)), int(max(0, cx - half))
    crop = photo[y0:int(cy + half), x0:int(cx + half)]
    crop = resize(crop, (192, 192), anti_aliasing=True, preserve_range=True)
    if style.mirror:
        crop = crop[:, ::-1]
    crop = crop * np.asarray(style.colour, np.float32)
    yy, xx = np.mgrid[-1:1:192j, -1:1:192j]
    radius = np.sqrt((xx / 0.78) ** 2 + ((yy - 0.05) / 0.98) ** 2)
    alpha = np.clip((1.0 - radius) / 0.12, 0.0, 1.0)
    return np.concatenate([crop.transpose(2, 0, 1), alpha[None]]).astype(np.float32)


def background(style: ActorStyle, width: int, height: int) -> np.ndarray:
    """float32 (3, H, W) static background: a gradient with a soft stripe pattern."""
    yy, xx = np.mgrid[0:1:complex(height), 0:1:complex(width)]
    mix = (0.6 * xx + 0.4 * yy)[None]
    low, high = (np.asarray(c, np.float32)[:, None, None] for c in style.background)
    stripes = 18 * np.sin(2 * np.pi * style.texture * (xx + 0.5 * yy))[None]
    return np.clip(low * (1 - mix) + high * mix + stripes, 0, 255).astype(np.float32)


def render_clip(style: ActorStyle, motion: dict[str, np.ndarray], width: int, height: int,
                rng: np.random.Generator, patch: np.ndarray | None = None,
                backdrop: np.ndarray | None = None) -> np.ndarray:
    """uint8 (T, H, W, 3) frames of one clip (``patch``/``backdrop``: precomputed
    :func:`face_patch` and :func:`background` of the actor)."""
    import torch
    import torch.nn.functional as F

    t = len(motion["dx"])
    patch = face_patch(style) if patch is None else patch
    backdrop = background(style, width, height) if backdrop is None else backdrop
    patch = torch.from_numpy(patch)[None].expand(t, -1, -1, -1)                # (T, 4, P, P)
    half_px = 0.5 * style.display * min(width, height) * torch.from_numpy(motion["scale"]).float()
    cx = (style.place[0] + torch.from_numpy(motion["dx"]).float()) * width
    cy = (style.place[1] + torch.from_numpy(motion["dy"]).float()) * height
    angle = torch.deg2rad(torch.from_numpy(motion["angle"]).float())
    cos, sin = torch.cos(angle), torch.sin(angle)
    # output (normalised canvas) -> patch (normalised) coordinates: R(-a) (p - c) / half
    theta = torch.stack([
        torch.stack([cos * width / 2, sin * height / 2, -(cos * cx + sin * cy)], -1),
        torch.stack([-sin * width / 2, cos * height / 2, sin * cx - cos * cy], -1),
    ], 1) / half_px[:, None, None]                                             # (T, 2, 3)
    grid = F.affine_grid(theta, [t, 4, height, width], align_corners=False)
    warped = F.grid_sample(patch, grid, mode="bilinear", align_corners=False)  # (T, 4, H, W)
    gain = torch.from_numpy(motion["gain"]).float()[:, None, None, None]
    base = torch.from_numpy(backdrop)
    canvas = warped[:, :3].mul_(gain).sub_(base).mul_(warped[:, 3:]).add_(base)  # alpha blend
    noise = _NOISE_BANK.get((height, width))
    if noise is None:  # a fixed bank of sensor-noise frames, drawn from per clip: cheap
        bank_rng = np.random.default_rng([height, width])
        noise = torch.from_numpy(bank_rng.standard_normal((16, 3, height, width), np.float32) * 2)
        _NOISE_BANK[(height, width)] = noise
    canvas += noise[torch.from_numpy(rng.integers(0, len(noise), t))]
    return canvas.add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def write_video(path: str | os.PathLike[str], frames: np.ndarray, fps: int = 30,
                codec: str = "libx264", pix_fmt: str = "yuv420p") -> None:
    """Write uint8 (T, H, W, 3) RGB frames with PyAV (container from the file extension).

    Falls back to ``mpeg4`` when this PyAV build lacks ``libx264``.
    """
    import av

    if codec == "libx264" and "libx264" not in av.codecs_available:
        codec = "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        if codec == "libx264":
            stream.options = {"preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def clip_name(label: int, index: int, actor: int) -> str:
    """RAVDESS file name of the ``index``-th clip of a class (unique per actor and class).

    Neutral has only normal intensity in RAVDESS (intensity 01); other classes alternate 01/02.
    """
    if label == 0:
        intensity, statement, repetition = 1, 1 + index % 2, 1 + index // 2
    else:
        intensity, statement, repetition = 1 + index % 2, 1 + (index // 2) % 2, 1 + index // 4
    return (f"02-01-{EMOTION_CODES[label]}-{intensity:02d}-{statement:02d}-{repetition:02d}-"
            f"{actor:02d}.mp4")


def generate_demo_dataset(out: str | os.PathLike[str], actors: int = 20, clips_per_class: int = 1,
                          size: int | tuple[int, int] = 224, num_frames: int = 40,
                          seed: int = 0, fps: int = 30) -> list[Path]:
    """Write the demo dataset; returns the video paths. Existing files are overwritten.

    Args:
        out: Dataset root to create.
        actors: Number of synthetic actors (subjects); at least 5 for 5-fold CV.
        clips_per_class: Clips per actor and class.
        size: Frame side in pixels, or ``(width, height)``; even numbers (yuv420p).
        num_frames: Frames per video.
        seed: Randomness of actors and clips.
        fps: Frame rate written in the container.

    Raises:
        ValueError: Bad sizes or counts.
    """
    width, height = (size, size) if isinstance(size, int) else size
    if width % 2 or height % 2 or min(width, height) < 32:
        raise ValueError(f"demo frame size must be even and >= 32, got {width}x{height}")
    if actors < 1 or actors > 99 or clips_per_class < 1 or num_frames < 1:
        raise ValueError(f"need 1 <= actors <= 99, clips_per_class >= 1, num_frames >= 1; got "
                         f"{actors}, {clips_per_class}, {num_frames}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "README.txt").write_text(README)
    paths = []
    for actor in range(1, actors + 1):
        style = actor_style(actor, seed)
        patch, backdrop = face_patch(style), background(style, width, height)
        folder = out / f"Actor_{actor:02d}"
        folder.mkdir(exist_ok=True)
        for label in range(len(RAVDESS_EMOTIONS_7)):
            for index in range(clips_per_class):
                rng = np.random.default_rng([seed, actor, label, index])
                motion = class_motion(label, num_frames, rng)
                frames = render_clip(style, motion, width, height, rng, patch, backdrop)
                paths.append(folder / clip_name(label, index, actor))
                write_video(paths[-1], frames, fps)
    log.info("wrote %d demo clips (%d actors x %d classes x %d) to %s", len(paths), actors,
             len(RAVDESS_EMOTIONS_7), clips_per_class, out)
    return paths

