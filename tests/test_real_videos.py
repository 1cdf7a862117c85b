"""Real footage from ``../shared/data/real_videos`` (skipped when that folder is absent)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.data.cache import load_manifest
from orchestrator.data.datasets import CREMA_D_EMOTIONS, DATASETS, ClipRecord
from orchestrator.data.faces import get_detector
from orchestrator.data.preprocess import process_clips, run_preprocess
from orchestrator.data.settings import PreprocessSettings
from orchestrator.data.video import read_clip

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """MTCNN runs fastest single-threaded (as the pipeline runs it); restore afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
        assert frames_ok(tmp_path / cache_file)
        assert np.all(boxes >= 0) and np.all(boxes[:, 0] + boxes[:, 2] <= 1 + 1e-6)
        assert np.all(boxes[:, 1] + boxes[:, 3] <= 1 + 1e-6)
        assert np.all(boxes[valid, 2] > 0.05)  # a face, not a speck
        assert np.all((points >= 0) & (points <= 1))


def frames_ok(path: Path) -> bool:
    with np.load(path) as npz:
        return npz["frames"].shape == (16, 224, 224, 3) and npz["frames"].dtype == np.uint8


@pytest.mark.parametrize("size", [224, 320])
def test_crowd_gives_one_face_per_frame_and_flags_misses(real_videos: Path, tmp_path: Path,
                                                         size: int) -> None:
    """Several small faces: the largest area * probability is chosen, one per frame; frames
    without a detectable face are flagged invalid instead of failing the clip."""
    settings = PreprocessSettings(size=size)
    raw = get_detector(settings, "cpu").detect(read_clip(real_videos / "crowd" / "video.mp4",
                                                         settings).frames)
    counts = [0 if boxes is None else len(boxes) for boxes, _, _ in raw]
    if size == 224:
        assert min(counts) == 0  # squashed to 224 px, some frames have no detectable face
    else:
        assert max(counts) >= 2  # at 320 px several faces are found in some frames
    record = ClipRecord("video.mp4", 0, "crowd", "crowd")
    (row,) = process_clips([record], ["crowd"], str(real_videos / "crowd"), str(tmp_path),
                           settings, "cpu")
    assert row["status"] == ("ok" if min(counts) else "partial")
    with np.load(tmp_path / row["cache_file"]) as npz:
        boxes, valid, frames = npz["boxes"], npz["valid"], npz["frames"]
    assert boxes.shape == (16, 4) and frames.shape == (16, size, size, 3)  # one face per frame
    assert valid.tolist() == [c > 0 for c in counts]
    assert row["valid_frames"] == sum(c > 0 for c in counts)
    for i, (b, p, _) in enumerate(raw):
        if b is not None:  # the chosen face is the largest area * probability
            score = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) * p
            x1, y1 = np.clip(b[int(np.argmax(score)), :2], 0, size)
            np.testing.assert_allclose(boxes[i, :2], [x1 / size, y1 / size], atol=1e-5)
