"""A tiny preprocessing cache written exactly to the contract of docs/design.md, for trainer tests.

Layout::

    <root>/settings.json        preprocessing settings + "settings_hash"
    <root>/manifest.csv         one row per clip (clip, clip_id, status, reason, label, label_name,
                                subject, valid_frames, padded, cache_file)
    <root>/clips/<clip_id>.npz  frames uint8 (T,S,S,3), boxes (T,4), landmarks (T,5,2), valid (T,),
                                label int64 (), subject str

Frames are class-dependent (a bright square whose colour channel and position depend on the
label, over noise), so an expression classifier on top of even a random frozen encoder can learn
them and its loss falls within a few epochs. No MTCNN, no video decoding.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MANIFEST_COLUMNS = ("clip", "clip_id", "status", "reason", "label", "label_name", "subject",
                    "valid_frames", "padded", "cache_file")


# The trial settings that train in seconds on a default tiny cache: 32 px x 16 frames -> 8 x 2 x 2 =
# 32 tokens; 6 subjects -> 3 folds of 2 test / 1 val / 3 train subjects.
TINY_TRIAL = dict(dataset="demo", encoder="tiny", decoder="official", decoder_dim=16, decoder_head_dim=8,
                  decoder_depth=1, batch_size=4, n_folds=3, epochs=2)


@dataclass(frozen=True)
class TinyCache:
    """What :func:`write_tiny_cache` wrote.

    Attributes:
        root: Cache directory.
        clip_ids: Usable clip ids, in manifest order.
        class_names: Class names, index = label.
        subjects: Subject ids.
        size: Frame side S.
        frames: Frames per clip T.
    """

    root: Path
    clip_ids: tuple[str, ...]
    class_names: tuple[str, ...]
    subjects: tuple[str, ...]
    size: int
    frames: int


def _frames(label: int, num_classes: int, size: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    video = rng.integers(0, 60, size=(frames, size, size, 3), dtype=np.uint8)
    side = size // 2
    offset = (label * (size - side)) // max(num_classes - 1, 1)
    video[:, offset : offset + side, offset : offset + side, label % 3] = 230
    return video  # (T, S, S, 3)


def _targets(frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    xy = rng.uniform(0.1, 0.4, size=2)
    wh = rng.uniform(0.3, 0.5, size=2)
    jitter = rng.normal(0.0, 0.01, size=(frames, 4))
    boxes = (np.concatenate([xy, wh])[None] + jitter).astype(np.float32)  # (T, 4)
    rel = rng.uniform(0.2, 0.8, size=(5, 2))
    landmarks = boxes[:, None, :2] + rel[None] * boxes[:, None, 2:]  # (T, 5, 2)
    return boxes, landmarks.astype(np.float32)


def write_tiny_cache(
    root: Path,
    num_classes: int = 3,
    num_subjects: int = 6,
    clips_per_cell: int = 2,
    size: int = 32,
    frames: int = 16,
    dataset: str = "demo",
    seed: int = 0,
    failed: int = 1,
) -> TinyCache:
    """Write a cache of ``num_subjects * num_classes * clips_per_cell`` usable clips (+ failed rows).

    Every third clip is ``partial`` (its last two frames invalid and padded), and ``failed`` extra
    rows have status ``failed`` and no file, as a real preprocessing run leaves them.
    """
    root = Path(root)
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    class_names = tuple(f"class{k}" for k in range(num_classes))
    subjects = tuple(f"{s + 1:02d}" for s in range(num_subjects))
    settings = {"dataset": dataset, "class_names": list(class_names), "num_frames": frames,
                "size": size, "detector": "synthetic", "seed": seed}
    text = json.dumps(settings, sort_keys=True)
    settings["settings_hash"] = hashlib.sha1(text.encode()).hexdigest()[:16]
    (root / "settings.json").write_text(json.dumps(settings, indent=2, sort_keys=True))
    rows, clip_ids = [], []
    for subject in subjects:
        for label in range(num_classes):
            for rep in range(clips_per_cell):
                clip_id = f"s{subject}_c{label}_r{rep}"
                partial = len(rows) % 3 == 2
                valid = np.ones(frames, dtype=bool)
                if partial:
                    valid[-2:] = False
                boxes, landmarks = _targets(frames, rng)
                boxes[~valid], landmarks[~valid] = 0.0, 0.0
                np.savez(root / "clips" / f"{clip_id}.npz",
                         frames=_frames(label, num_classes, size, frames, rng), boxes=boxes,
                         landmarks=landmarks, valid=valid, label=np.int64(label),
                         subject=np.array(subject))
                rows.append({"clip": f"Actor_{subject}/{clip_id}.mp4", "clip_id": clip_id,
                             "status": "partial" if partial else "ok", "reason": "",
                             "label": label, "label_name": class_names[label], "subject": subject,
                             "valid_frames": int(valid.sum()), "padded": partial,
                             "cache_file": f"clips/{clip_id}.npz"})
                clip_ids.append(clip_id)
    for i in range(failed):
        rows.append({"clip": f"Actor_{subjects[0]}/broken{i}.mp4", "clip_id": f"broken{i}",
                     "status": "failed", "reason": "no face detected", "label": 0,
                     "label_name": class_names[0], "subject": subjects[0], "valid_frames": 0,
                     "padded": False, "cache_file": ""})
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return TinyCache(root, tuple(clip_ids), class_names, subjects, size, frames)
