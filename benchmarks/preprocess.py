"""Preprocessing throughput: clips/s of ``orchestrator.data.preprocess`` against the authors' approach.

Clips: synthetic demo clips (``orchestrator.data.demo``) encoded like RAVDESS, the paper's main
dataset: H.264, 1280x720, 30 fps, 100 frames (RAVDESS speech clips are 1280x720, ~3.5 s).

Baseline (the authors' ``Preprocessing_Video.py`` plus per-frame MTCNN): decode **every** frame
with decord, resize **every** frame to 224 x 224, take the 16 official-stride frames, run facenet-pytorch's
MTCNN as shipped **one frame at a time**, select faces and write the npz exactly as the pipeline does.

System: ``orchestrator.data.preprocess.process_clips`` (decord ``get_batch`` of the 16 sampled frames
only, resize of those 16, one batched MTCNN call over the frames of ``clips_per_task`` clips, the
networks in channels-last layout: see ``orchestrator.data.faces.FaceDetector``).

Two results against the same baseline timings (one process, one torch thread: MTCNN's many
small ops run fastest single-threaded, so this is the baseline's best setting on a CPU). The
sides alternate (``time_interleaved``) and each uses its fastest round:

* ``preprocess/one_process``: the system in this process, also one thread: what reading less and
  batching buy per process.
* ``preprocess/pool``: the system as ``mtcae preprocess`` runs it, on its default worker processes
  (``min(4, cpus)``), warm (workers started and MTCNN loaded before timing, as in a long run). The
  ratio includes that parallelism, which is part of the pipeline; ``workers`` is recorded.

Both sides compute the same kind of labels; the baseline resizes with PIL and the system inside
the decoder, so boxes differ by a few pixels (``max_box_difference``, normalised, is recorded).

Target: 4x (issue 3).
"""

from __future__ import annotations

import logging
import os
import tempfile
from concurrent.futures import wait
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vocab
from benchmarks.common import (
    Result,
    default_device,
    make_result,
    summarize_times,
    time_interleaved,
)
from orchestrator.data.cache import CLIPS_DIR, make_clip_ids, write_npz
from orchestrator.data.datasets import ClipRecord, get_dataset
from orchestrator.data.demo import (
    actor_style,
    background,
    class_motion,
    clip_name,
    face_patch,
)
from orchestrator.data.faces import FaceDetector, select_faces
from orchestrator.data.preprocess import balanced_task_size, process_clips, worker_pool
from orchestrator.data.settings import PreprocessSettings
from orchestrator.data.video import resize_frames, sample_indices

log = logging.getLogger(__name__)

TARGET_SPEEDUP = 4.0
WIDTH, HEIGHT, FRAMES, FPS = 1280, 720, 100, 30
CLIPS_PER_TASK = 4


def run(quick: bool) -> list[Result]:
    """Both results (see the module docstring); ``quick`` uses 4 clips and 2 rounds."""
    num_clips, rounds = (4, 2) if quick else (16, 3)
    device = default_device()
    cpus = os.cpu_count() or 1
    workers = min(4, cpus)
    settings = PreprocessSettings()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # both sides in this process: MTCNN's small ops run best on one
    try:
        with tempfile.TemporaryDirectory(prefix="mtcae_bench_pre_") as tmp:
            root, out = Path(tmp) / "data", Path(tmp) / "out"
            records = write_clips(root, num_clips)
            ids = make_clip_ids(records)
            diff = _box_difference(records, ids, root, out, settings, str(device))
            times = _measure(records, ids, root, out, settings, str(device), rounds, workers)
    finally:
        torch.set_num_threads(before)
    common = {"device": str(device), "max_box_difference": diff, "cpu_count": cpus}
    return [
        _result("preprocess/one_process", times["baseline"], times["one_process"], num_clips,
                workers=0, threads_per_process=1, **common),
        _result("preprocess/pool", times["baseline"], times["pool"], num_clips, workers=workers,
                threads_per_process=max(1, cpus // workers), **common),
    ]


# ---------------------------------------------------------------- clips


def write_clips(root: Path, num_clips: int) -> list[ClipRecord]:
    """RAVDESS-like demo clips (rendered small, upscaled by the encoder's scaler)."""
    for i in range(num_clips):
        actor, label = 1 + i % 2, i % 7
        rng = np.random.default_rng([actor, label, i])
        style = actor_style(actor)
        frames = _render(style, class_motion(label, FRAMES, rng), rng)
        _encode(root / f"Actor_{actor:02d}" / clip_name(label, i // 7, actor), frames)
    return get_dataset(vocab.RAVDESS).scan(root)


def _render(style: Any, motion: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    from orchestrator.data.demo import render_clip

    w, h = WIDTH // 4, HEIGHT // 4
    return render_clip(style, motion, w, h, rng, face_patch(style), background(style, w, h))


def _encode(path: Path, frames: np.ndarray) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast"}
        for frame in frames:
            big = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
                WIDTH, HEIGHT, format="yuv420p", interpolation="BILINEAR")
            container.mux(stream.encode(big))
        container.mux(stream.encode())


# ---------------------------------------------------------------- the two sides


def naive_clip(record: ClipRecord, clip_id: str, root: Path, out: Path,
               settings: PreprocessSettings, device: str) -> np.ndarray:
    """The authors' approach for one clip; returns the normalised boxes (T, 4)."""
    import decord

    reader = decord.VideoReader(str(root / record.path), num_threads=1)
    every = reader.get_batch(list(range(len(reader)))).asnumpy()         # decode every frame
    resized = resize_frames(every, settings.size, settings.resize)       # resize every frame
    indices, _ = sample_indices(len(resized), settings.num_frames, settings.sampling)
    frames = resized[indices]
    detector = _plain_detector(settings, device)
    detections = [detector.detect(frame[None])[0] for frame in frames]  # one frame at a time
    labels = select_faces(detections, settings.size)
    write_npz(out / CLIPS_DIR / f"{clip_id}.npz", frames=frames, boxes=labels.boxes,
              landmarks=labels.landmarks, valid=labels.valid,
              label=np.array(record.label, np.int64), subject=np.array(record.subject))
    return labels.boxes


_PLAIN: dict[tuple[Any, ...], FaceDetector] = {}


def _plain_detector(settings: PreprocessSettings, device: str) -> FaceDetector:
    """facenet-pytorch's MTCNN as shipped (NCHW weights), created once per process."""
    key = (settings.min_face_size, settings.thresholds, settings.factor, device)
    if key not in _PLAIN:
        _PLAIN[key] = FaceDetector(settings, device, channels_last=False)
    return _PLAIN[key]


def _pipeline(records: list[ClipRecord], ids: list[str], root: Path, out: Path,
              settings: PreprocessSettings, device: str) -> list[dict]:
    rows = []
    for start in range(0, len(records), CLIPS_PER_TASK):
        rows += process_clips(records[start:start + CLIPS_PER_TASK],
                              ids[start:start + CLIPS_PER_TASK], str(root), str(out), settings,
                              device)
    return rows


def _naive(records: list[ClipRecord], ids: list[str], root: Path, out: Path,
           settings: PreprocessSettings, device: str) -> list[np.ndarray]:
    return [naive_clip(r, i, root, out, settings, device) for r, i in zip(records, ids)]


def _box_difference(records: list[ClipRecord], ids: list[str], root: Path, out: Path,
                    settings: PreprocessSettings, device: str) -> float:
    """Largest normalised box difference between the two sides on one clip (a sanity check: they
    must find the same face); also warms up the detector."""
    naive = _naive(records[:1], ids[:1], root, out / "naive", settings, device)
    _pipeline(records[:1], ids[:1], root, out / "system", settings, device)
    system = np.load(out / "system" / CLIPS_DIR / f"{ids[0]}.npz")["boxes"]
    return float(np.abs(naive[0] - system).max())


def _measure(records: list[ClipRecord], ids: list[str], root: Path, out: Path,
             settings: PreprocessSettings, device: str, rounds: int,
             workers: int) -> dict[str, list[float]]:
    """Interleaved timings of the baseline, the system in this process and the warm pool."""
    per_task = balanced_task_size(len(records), CLIPS_PER_TASK, workers)
    tasks = [(records[s:s + per_task], ids[s:s + per_task])
             for s in range(0, len(records), per_task)]
    with worker_pool(workers) as pool:
        warm = [pool.submit(process_clips, records[:1], ["warm"], str(root), str(out / "warm"),
                            settings, device) for _ in range(workers)]
        wait(warm)

        def pooled() -> None:
            for future in [pool.submit(process_clips, r, i, str(root), str(out), settings, device)
                           for r, i in tasks]:
                future.result()

        return time_interleaved({
            "baseline": lambda: _naive(records, ids, root, out, settings, device),
            "one_process": lambda: _pipeline(records, ids, root, out, settings, device),
            "pool": pooled,
        }, torch.device(device), rounds)


def _result(name: str, baseline: list[float], system: list[float], num_clips: int,
            **extra: Any) -> Result:
    base, ours = summarize_times(baseline), summarize_times(system)
    return make_result(
        name, base["best_s"] / ours["best_s"], TARGET_SPEEDUP,
        baseline_clips_per_s=num_clips / base["best_s"], clips_per_s=num_clips / ours["best_s"],
        clips=num_clips, video=f"h264 {WIDTH}x{HEIGHT} {FRAMES} frames",
        baseline_s=base, system_s=ours, **extra)


def main() -> None:
    """``python -m benchmarks.preprocess [--quick]``: print the results."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 clips, 2 rounds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    for result in run(args.quick):
        print(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
