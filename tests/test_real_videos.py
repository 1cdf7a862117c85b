"""Real footage from ``../shared/data/real_videos`` (skipped when that folder is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from orchestrator.data import load_manifest
from orchestrator.datasets import CREMA_D_EMOTIONS, DATASETS, ClipRecord
from orchestrator.preprocess import (PreprocessSettings, get_detector, process_clips, read_clip,
                                     run_preprocess)

pytestmark = pytest.mark.slow


def test_crema_d_names_give_six_labels_for_actor_1001(real_videos: Path) -> None:
    records = DATASETS["crema-d"].scan(real_videos / "crema-d", strict=True)
    assert len(records) == 6
    assert {r.subject for r in records} == {"1001"}
    assert sorted(r.label for r in records) == list(range(6))
    assert all(CREMA_D_EMOTIONS[r.label] == Path(r.path).stem.split("_")[2] for r in records)


def test_crema_d_faces_are_found_inside_the_frame(real_videos: Path, tmp_path: Path) -> None:
    summary = run_preprocess("crema-d", real_videos / "crema-d", tmp_path, PreprocessSettings(),
                             workers=0, progress=False)
    assert summary.usable == 6
    manifest = load_manifest(tmp_path)
    assert manifest["valid_frames"].sum() >= 0.9 * 6 * 16
    for cache_file in manifest["cache_file"]:
        with np.load(tmp_path / cache_file) as npz:
            boxes, points, valid = npz["boxes"], npz["landmarks"], npz["valid"]
        assert npz_frames_ok(tmp_path / cache_file)
        assert np.all(boxes >= 0) and np.all(boxes[:, 0] + boxes[:, 2] <= 1 + 1e-6)
        assert np.all(boxes[:, 1] + boxes[:, 3] <= 1 + 1e-6)
        assert np.all(boxes[valid, 2] > 0.05)  # a face, not a speck
        assert np.all((points >= 0) & (points <= 1))


def npz_frames_ok(path: Path) -> bool:
    with np.load(path) as npz:
        return npz["frames"].shape == (16, 224, 224, 3) and npz["frames"].dtype == np.uint8


def test_crowd_gives_one_face_per_frame_and_flags_misses(real_videos: Path,
                                                         tmp_path: Path) -> None:
    settings = PreprocessSettings()
    raw = get_detector(settings, "cpu").detect(read_clip(real_videos / "crowd" / "video.mp4",
                                                         settings).frames)
    counts = [0 if boxes is None else len(boxes) for boxes, _, _ in raw]
    assert max(counts) >= 2  # several faces are detected in some frames ...
    record = ClipRecord("video.mp4", 0, "crowd", "crowd")
    (row,) = process_clips([record], ["crowd"], str(real_videos / "crowd"), str(tmp_path),
                           settings, "cpu")
    assert row["status"] in ("ok", "partial")  # ... and frames without a face do not fail it
    with np.load(tmp_path / row["cache_file"]) as npz:
        boxes, valid = npz["boxes"], npz["valid"]
    assert boxes.shape == (16, 4) and npz_frames_ok(tmp_path / row["cache_file"])  # one per frame
    assert valid.tolist() == [c > 0 for c in counts]
    assert row["valid_frames"] == sum(c > 0 for c in counts)
    for i, (b, p, _) in enumerate(raw):
        if b is not None:  # the chosen face is the largest area * probability
            score = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) * p
            x1, y1 = np.clip(b[int(np.argmax(score)), :2], 0, 224)
            np.testing.assert_allclose(boxes[i, :2], [x1 / 224, y1 / 224], atol=1e-5)
