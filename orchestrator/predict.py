"""``mtcae predict``: a trained model applied to videos, as per-frame and per-clip tables.

In the manner of py-feat's and OpenFace's video tools: videos in, tables out. Each video is one
clip, decoded and labelled by MTCNN exactly as ``mtcae preprocess`` does with the model's training
settings (:mod:`orchestrator.trial.inference`), then run through the model. Written under ``out``::

    frames.csv|parquet   one row per sampled frame: clip, frame (0..T-1), frame_index (in the
                         source), face_found, MTCNN box_x1 box_y1 box_x2 box_y2 and 5 landmarks
                         (<point>_x, <point>_y), the model's pred_box_* and pred_<point>_*, all in
                         source pixels (empty where no face was found)
    clips.csv|parquet    one row per clip: clip, status (ok | no_face | failed), reason, label,
                         prob_<class> per class, faces_found, frames
    overlays/<clip>.mp4  (--overlay) the sampled frames with the MTCNN box and points (green), the
                         model's box and points (orange) and the predicted label

A file that cannot be read is a ``failed`` row of the clip table with the reason, and a clip without
any face is predicted but flagged ``no_face``; neither stops the run.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.faces import resolve_device
from orchestrator.tracking import no_download_bar
from orchestrator.trial.inference import (
    STATUS_FAILED,
    STATUS_OK,
    ClipResult,
    predict_clips,
)
from orchestrator.trial.packaging import (
    load_package,
    probability_column,
    use_tracking_uri,
)
from orchestrator.trial.predictor import EncoderMismatchError, Predictor

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".avi", ".flv", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv")
FORMATS = ("csv", "parquet")
POINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # MTCNN's order
OVERLAY_DIR = "overlays"
OVERLAY_MAX_SIDE = 640
_FACE_COLOUR, _MODEL_COLOUR = (40, 220, 60), (255, 150, 0)


class PredictError(ValueError):
    """A user-facing problem with the inputs or the model (one sentence naming it)."""


@dataclass
class PredictReport:
    """What a run wrote.

    Attributes:
        clips: Clips processed.
        files: The tables and overlays written.
        problems: ``(clip, status, reason)`` of every clip that failed or had no face.
        labels: ``(clip, label)`` of every predicted clip.
    """

    clips: int = 0
    files: list[Path] = field(default_factory=list)
    problems: list[tuple[str, str, str]] = field(default_factory=list)
    labels: list[tuple[str, str]] = field(default_factory=list)


# ---------------------------------------------------------------- inputs and model


def find_videos(source: Path) -> list[Path]:
    """``source`` itself, or every video file below a folder (sorted).

    Raises:
        PredictError: ``source`` does not exist, or a folder holds no video.
    """
    if source.is_file():
        return [source]
    if not source.exists():
        raise PredictError(f"{source}: no such file or folder (expected a video or a folder of videos)")
    found = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    if not found:
        raise PredictError(f"{source}: no video files found (looked for {', '.join(VIDEO_SUFFIXES)})")
    return found


def load_model(model: str, tracking_uri: str | None = None,
               encoder_checkpoint: Path | str | None = None) -> Predictor:
    """The model at a local path (an MLflow model folder) or an MLflow URI (``runs:/``, ``models:/``).

    Raises:
        PredictError: The model cannot be found or read, or its encoder checkpoint differs.
    """
    try:
        if Path(model).exists():
            return load_package(model, encoder_checkpoint)
        if ":/" not in model:
            raise PredictError(f"--model {model}: no such folder, and not an MLflow URI (runs:/<run_id>/model, "
                               "models:/<model_id> or models:/<name>/<version>)")
        return _download(model, tracking_uri, encoder_checkpoint)
    except (FileNotFoundError, EncoderMismatchError) as error:
        raise PredictError(f"--model {model}: {error}") from None


def _download(uri: str, tracking_uri: str | None, encoder_checkpoint: Path | str | None) -> Predictor:
    import mlflow
    from mlflow.exceptions import MlflowException


    store = tracking_uri or mlflow.get_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="mtcae_model_") as tmp, use_tracking_uri(store), no_download_bar():
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
        except (MlflowException, OSError) as error:
            message = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            raise PredictError(f"--model {uri}: cannot be loaded from {store} ({message})") from None
        return load_package(local, encoder_checkpoint)


# ---------------------------------------------------------------- the run


def predict_videos(source: Path | str, model: str, out: Path | str, fmt: str = "csv", overlay: bool = False,
                   tracking_uri: str | None = None, batch_size: int = 4, device: str = "auto",
                   progress: bool = True, encoder_checkpoint: Path | str | None = None) -> PredictReport:
    """Predict every video of ``source`` and write the tables (and overlays) under ``out``.

    Args:
        source: A video file or a folder searched recursively for videos.
        model: Local MLflow model folder, ``runs:/<run_id>/model`` or ``models:/...``.
        out: Output folder.
        fmt: ``csv`` or ``parquet``.
        overlay: Also write one overlay MP4 per clip.
        tracking_uri: Where ``runs:/`` and ``models:/`` URIs are resolved.
        batch_size: Clips per MTCNN call and network forward.
        device: Where MTCNN and the network run (``auto``: CUDA when available).
        progress: A progress bar over the clips.
        encoder_checkpoint: Where the model's referenced encoder checkpoint is, if not where it was.

    Raises:
        PredictError: No videos, an unknown format, or a model that cannot be loaded.
    """
    if fmt not in FORMATS:
        raise PredictError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    source, out = Path(source), Path(out)
    videos = find_videos(source)
    predictor = load_model(model, tracking_uri, encoder_checkpoint).to(resolve_device(device))
    root = source if source.is_dir() else source.parent
    names = [str(v.relative_to(root)) for v in videos]
    out.mkdir(parents=True, exist_ok=True)
    report, frames, clips = PredictReport(), [], []
    results = predict_clips(predictor, zip(names, videos), batch_size=batch_size, device=device,
                            keep_frames=overlay)
    for result in _bar(results, len(videos), progress):
        report.clips += 1
        frames += frame_rows(result)
        clips.append(clip_row(result, predictor.class_names))
        if result.status != STATUS_OK:
            report.problems.append((result.clip, result.status, result.reason))
        if result.status != STATUS_FAILED:
            report.labels.append((result.clip, result.label))
            if overlay:
                report.files.append(write_overlay(result, out / OVERLAY_DIR / f"{_slug(result.clip)}.mp4"))
    report.files[:0] = [_write_table(frames, out / "frames", fmt, frame_columns()),
                        _write_table(clips, out / "clips", fmt, clip_columns(predictor.class_names))]
    return report


def _bar(results: Iterator[ClipResult], total: int, enabled: bool) -> Iterator[ClipResult]:
    if not enabled:
        return results
    from tqdm import tqdm

    return tqdm(results, total=total, desc="predicting", unit="clip")


def _slug(clip: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(Path(clip).with_suffix("")))


# ---------------------------------------------------------------- tables


def frame_columns() -> list[str]:
    """Columns of the frame table."""
    box = ["box_x1", "box_y1", "box_x2", "box_y2"]
    points = [f"{p}_{axis}" for p in POINTS for axis in ("x", "y")]
    return ["clip", "frame", "frame_index", "face_found", *box, *points,
            *(f"pred_{c}" for c in box + points)]


def clip_columns(class_names: Sequence[str]) -> list[str]:
    """Columns of the clip table."""
    return ["clip", "status", "reason", "label", *(probability_column(c) for c in class_names),
            "faces_found", "frames"]


def frame_rows(result: ClipResult) -> list[dict[str, Any]]:
    """One row per sampled frame (none for a failed clip)."""
    rows = []
    for t, index in enumerate(result.frame_index):
        values = [*result.face_boxes[t], *result.face_landmarks[t].reshape(-1)]
        predicted = ([np.nan] * 14 if result.pred_boxes is None
                     else [*result.pred_boxes[t], *result.pred_landmarks[t].reshape(-1)])
        rows.append(dict(zip(frame_columns(), [result.clip, t, int(index), bool(result.face_found[t]),
                                               *values, *predicted])))
    return rows


def clip_row(result: ClipResult, class_names: Sequence[str]) -> dict[str, Any]:
    """The clip's row: status, label and one probability per class."""
    probs = result.probabilities
    row = {"clip": result.clip, "status": result.status, "reason": result.reason, "label": result.label}
    row |= {probability_column(c): (np.nan if probs is None else float(probs[k])) for k, c in enumerate(class_names)}
    return row | {"faces_found": int(result.face_found.sum()), "frames": len(result.frame_index)}


def _write_table(rows: list[dict[str, Any]], stem: Path, fmt: str, columns: list[str]) -> Path:
    import pandas as pd

    table = pd.DataFrame(rows, columns=columns)
    path = stem.with_suffix(f".{fmt}")
    if fmt == "parquet":
        table.to_parquet(path, index=False)
    else:
        table.to_csv(path, index=False)
    return path


# ---------------------------------------------------------------- overlay


def write_overlay(result: ClipResult, path: Path) -> Path:
    """The sampled frames at the source's aspect ratio with boxes, points and the label drawn."""
    from orchestrator.data.demo import write_video

    path.parent.mkdir(parents=True, exist_ok=True)
    frames = overlay_frames(result)
    step = float(np.median(np.diff(result.frame_index))) if len(result.frame_index) > 1 else 1.0
    fps = max(1, round((result.fps or 25.0) / max(step, 1.0)))
    write_video(path, frames, fps=fps)
    return path


def overlay_frames(result: ClipResult) -> np.ndarray:
    """uint8 (T, H, W, 3) frames to watch: the model's inputs back at the source's aspect ratio."""
    from PIL import Image, ImageDraw, ImageFont

    g = result.geometry
    scale = min(1.0, OVERLAY_MAX_SIDE / max(g.width, g.height)) if max(g.width, g.height) > g.size else 1.0
    width, height = (max(2, round(d * scale) // 2 * 2) for d in (g.width, g.height))
    crop = _inner_box(g)
    label = f"{result.label} {float(np.max(result.probabilities)):.0%}"
    font = ImageFont.load_default(size=max(10, height // 28))
    out = []
    for t, frame in enumerate(result.frames):
        image = Image.fromarray(frame).crop(crop).resize((width, height), Image.BILINEAR)
        draw = ImageDraw.Draw(image)
        factor = (width / g.width, height / g.height)
        if result.face_found[t]:
            _draw_face(draw, result.face_boxes[t], result.face_landmarks[t], factor, _FACE_COLOUR)
        if result.pred_boxes is not None:
            _draw_face(draw, result.pred_boxes[t], result.pred_landmarks[t], factor, _MODEL_COLOUR)
        text = f"{label}  frame {int(result.frame_index[t])}"
        left, top, right, bottom = draw.textbbox((4, 2), text, font=font)
        draw.rectangle((0, 0, right + 4, bottom + 3), fill=(0, 0, 0))
        draw.text((4, 2), text, fill=(255, 255, 255), font=font)
        out.append(np.asarray(image))
    return np.stack(out)


def _inner_box(g: Any) -> tuple[int, int, int, int]:
    """The part of the model's frame that shows the source (all of it, unless letterboxed)."""
    if g.resize == "squash":
        return 0, 0, g.size, g.size
    scale = g.size / max(g.width, g.height)
    w, h = max(1, round(g.width * scale)), max(1, round(g.height * scale))
    x0, y0 = (g.size - w) // 2, (g.size - h) // 2
    return x0, y0, x0 + w, y0 + h


def _draw_face(draw: Any, box: np.ndarray, points: np.ndarray, factor: tuple[float, float],
               colour: tuple[int, int, int]) -> None:
    fx, fy = factor
    x1, y1, x2, y2 = box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy
    draw.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=colour, width=2)
    for x, y in points:
        draw.ellipse((x * fx - 2, y * fy - 2, x * fx + 2, y * fy + 2), fill=colour)
