"""Preprocessing: sampling, resizing, face selection, bad input, manifest, resume, invalidation."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader
from videos import (
    face_frames,
    make_broken_link,
    make_corrupt,
    make_text_file,
    make_truncated,
    make_zero_byte,
    truncate_at_frame,
    write_frames,
    write_gradient_video,
)

from orchestrator.cli import main
from orchestrator.data import preprocess as pp
from orchestrator.data.cache import (
    JOURNAL_FILE,
    MANIFEST_COLUMNS,
    CacheSettingsError,
    ClipDataset,
    cache_class_names,
    load_manifest,
)
from orchestrator.data.faces import FaceDetector, select_faces
from orchestrator.data.preprocess import run_preprocess
from orchestrator.data.settings import PreprocessSettings
from orchestrator.data.video import (
    ClipError,
    check_truncation,
    read_clip,
    resize_frames,
    sample_indices,
)

SMALL = PreprocessSettings(size=64, keep_faceless=True)


def run(root: Path, out: Path, settings: PreprocessSettings = SMALL,
        **kwargs) -> pp.PreprocessSummary:
    kwargs.setdefault("workers", 0)
    return run_preprocess("ravdess", root, out, settings, progress=False, **kwargs)


def manifest_rows(out: Path) -> dict[str, dict]:
    return {r["clip"]: r for r in load_manifest(out, usable_only=False).to_dict("records")}


def gradient_root(root: Path, count: int = 4) -> list[Path]:
    return [write_gradient_video(root / f"Actor_{a:02d}" / f"02-01-0{e}-01-01-01-{a:02d}.mp4")
            for a, e in zip(range(1, count + 1), (1, 3, 4, 5, 6, 7, 8, 1))]


# ---------------------------------------------------------------- sampling and resizing


def test_official_sampling_is_the_authors_stride() -> None:
    idx, padded = sample_indices(100, 16, "official")
    assert idx.tolist() == list(range(0, 96, 6)) and not padded  # floor(100/16) = 6, tail dropped
    assert sample_indices(16, 16, "official")[0].tolist() == list(range(16))
    assert sample_indices(35, 16, "official")[0].tolist() == list(range(0, 32, 2))


def test_uniform_sampling_is_centred() -> None:
    idx, padded = sample_indices(160, 16, "uniform")
    assert idx.tolist() == list(range(5, 160, 10)) and not padded
    idx = sample_indices(37, 16, "uniform")[0]
    assert idx.min() >= 1 and idx.max() == 35 and np.all(np.diff(idx) >= 2)


@pytest.mark.parametrize("mode", ["official", "uniform"])
def test_short_clips_are_padded_by_repeating_frames(mode: str) -> None:
    idx, padded = sample_indices(5, 16, mode)
    assert padded and len(idx) == 16
    assert sorted(set(idx.tolist())) == [0, 1, 2, 3, 4] and np.all(np.diff(idx) >= 0)
    assert sample_indices(1, 16, mode)[0].tolist() == [0] * 16
    with pytest.raises(ValueError, match="at least one source frame"):
        sample_indices(0, 16, mode)


def test_squash_and_letterbox() -> None:
    wide = np.zeros((1, 40, 80, 3), np.uint8)
    wide[..., :40, 0] = 255  # left half red
    squash = resize_frames(wide, 32, "squash")
    assert squash.shape == (1, 32, 32, 3)
    assert squash[0, :, :14, 0].min() > 200 and squash[0, :, 18:, 0].max() < 50
    box = resize_frames(np.full((1, 40, 80, 3), 200, np.uint8), 32, "letterbox")
    assert box[0, :8].max() == 0 and box[0, 24:].max() == 0  # black bars above and below
    assert box[0, 9:23].min() > 190
    tall = resize_frames(np.full((1, 80, 40, 3), 200, np.uint8), 32, "letterbox")
    assert tall[0, :, :8].max() == 0 and tall[0, :, 24:].max() == 0 and tall[0, :, 9:23].min() > 190


def test_read_clip_reads_the_sampled_frames(video_factory) -> None:
    path = video_factory("a.mp4", num_frames=30)
    uniform = [0, 2, 4, 6, 8, 10, 12, 14, 15, 17, 19, 21, 23, 25, 27, 29]
    for mode, expected in (("official", list(range(16))), ("uniform", uniform)):
        clip = read_clip(path, PreprocessSettings(size=32, sampling=mode))
        green = clip.frames[:, 16, 16, 1].astype(int)  # the writer puts 8 * frame index there
        assert clip.frames.shape == (16, 32, 32, 3) and clip.frames.dtype == np.uint8
        assert np.abs(green - 8 * np.array(expected)).max() <= 6
        assert not clip.padded and clip.notes == []


def test_read_clip_falls_back_when_the_decoder_scaler_fails(video_factory) -> None:
    """decord's scaler rejects some output widths (48 from 64x48 here): decode unscaled, resize."""
    clip = read_clip(video_factory("a.mp4", num_frames=20), PreprocessSettings(size=48))
    assert clip.frames.shape == (16, 48, 48, 3) and clip.notes == []
    green = clip.frames[:, 24, 24, 1].astype(int)
    assert np.abs(green - 8 * np.arange(16)).max() <= 6


def test_read_clip_pads_short_gray_and_odd_videos(video_factory) -> None:
    short = read_clip(video_factory("short.mp4", num_frames=10), SMALL)
    assert short.padded and short.frames.shape == (16, 64, 64, 3)
    assert any("padded: 10 source frames" in n for n in short.notes)
    gray = read_clip(video_factory("gray.mkv", codec="libx264", pix_fmt="gray"), SMALL)
    assert gray.frames.shape == (16, 64, 64, 3)
    assert np.array_equal(gray.frames[..., 0], gray.frames[..., 1])  # gray decoded to RGB
    odd = read_clip(video_factory("odd.mkv", width=63, height=47, codec="mpeg4"),
                    PreprocessSettings(size=64, resize="letterbox"))
    assert odd.frames.shape == (16, 64, 64, 3)
    assert odd.frames[:, :8].max() < 20  # letterbox bars of the 63x47 frame


# ---------------------------------------------------------------- truncated media


def test_truncation_thresholds() -> None:
    assert check_truncation(65, 65, 16) == "" and check_truncation(10, None, 16) == ""
    assert check_truncation(65, 67, 16) == ""  # FLV durations run a frame or two past the end
    assert check_truncation(59, 65, 16) == ""  # within 10% of the declared frames
    assert check_truncation(40, 65, 16) == "truncated: 40 of 65 frames decodable"
    with pytest.raises(ClipError, match=r"^truncated: 30 of 65 frames decodable \(less than 50%"):
        check_truncation(30, 65, 16)
    with pytest.raises(ClipError, match=r"^truncated: 12 of 20 frames decodable \(fewer than the"):
        check_truncation(12, 20, 16)


@pytest.mark.parametrize("ext", [".flv", ".mkv"])
def test_read_clip_flags_truncated_containers(tmp_path: Path, ext: str) -> None:
    intact = read_clip(write_gradient_video(tmp_path / f"intact{ext}", num_frames=65), SMALL)
    assert not intact.truncated and intact.notes == [] and intact.decodable_frames == 65
    short = read_clip(write_gradient_video(tmp_path / f"short{ext}", num_frames=10), SMALL)
    assert short.padded and not short.truncated  # a short clip is not a truncated one
    cut = read_clip(truncate_at_frame(write_gradient_video(tmp_path / f"cut{ext}", num_frames=65),
                                      45), SMALL)
    assert cut.truncated and cut.declared_frames in (65, 67) and 38 <= cut.decodable_frames <= 45
    assert cut.notes[0] == (f"truncated: {cut.decodable_frames} of {cut.declared_frames} frames "
                            f"decodable")
    stub = truncate_at_frame(write_gradient_video(tmp_path / f"stub{ext}", num_frames=65), 8)
    with pytest.raises(ClipError, match=r"^truncated: \d of 6[57] frames decodable \(fewer than"):
        read_clip(stub, SMALL)


def test_first_40_kb_of_a_real_crema_d_clip_is_truncated(real_videos: Path,
                                                         tmp_path: Path) -> None:
    """The issue's case: 4 frames decode and were padded to 16 and marked ok."""
    source = real_videos / "crema-d" / "1001_DFA_FEA_XX.flv"
    cut = tmp_path / source.name
    cut.write_bytes(source.read_bytes()[:40_000])
    with pytest.raises(ClipError, match=r"^truncated: 4 of 65 frames decodable"):
        read_clip(cut, SMALL)
    assert not read_clip(source, SMALL).truncated


# ---------------------------------------------------------------- face selection


def test_select_faces_picks_largest_times_probability_and_fills_gaps() -> None:
    big_unsure = [10, 10, 50, 50]     # area 1600, p 0.5 -> 800
    small_sure = [60, 60, 80, 80]     # area 400,  p 0.99 -> 396
    pts = np.arange(10, dtype=np.float32).reshape(1, 5, 2) + 20
    detections = [
        (None, None, None),
        (np.array([small_sure, big_unsure], np.float32), np.array([0.99, 0.5]),
         np.concatenate([pts + 40, pts])),
        (None, None, None),
        (np.array([[-10, 5, 30, 120]], np.float32), np.array([0.9]), pts),  # leaves the frame
        (None, None, None),
    ]
    labels = select_faces(detections, size=100)
    assert labels.valid.tolist() == [False, True, False, True, False]
    np.testing.assert_allclose(labels.boxes[1], [0.1, 0.1, 0.4, 0.4])           # big_unsure
    np.testing.assert_allclose(labels.landmarks[1], pts[0] / 100)
    np.testing.assert_allclose(labels.boxes[3], [0.0, 0.05, 0.3, 0.95])         # clipped
    np.testing.assert_allclose(labels.boxes[0], labels.boxes[1])                # nearest valid
    np.testing.assert_allclose(labels.boxes[2], labels.boxes[1])                # tie -> earlier
    np.testing.assert_allclose(labels.boxes[4], labels.boxes[3])
    assert labels.boxes.dtype == np.float32 and labels.landmarks.shape == (5, 5, 2)
    empty = select_faces([(None, None, None)] * 3, size=64)
    assert not empty.valid.any() and not empty.boxes.any()


def test_fast_detector_matches_mtcnn_as_shipped() -> None:
    """channels_last weights and planar input change the speed, not the detections."""
    frames = face_frames(num_frames=6, size=160)
    fast = FaceDetector(PreprocessSettings(), "cpu").detect(frames)
    plain = FaceDetector(PreprocessSettings(), "cpu", channels_last=False).detect(frames)
    assert next(FaceDetector(PreprocessSettings(), "cpu").mtcnn.pnet.parameters()).is_contiguous(
        memory_format=torch.channels_last)
    assert len(fast) == len(plain) == 6
    for (fb, fp, fq), (pb, pp_, pq) in zip(fast, plain):
        assert fb is not None and pb is not None and fb.shape == pb.shape
        np.testing.assert_allclose(np.asarray(fb, np.float32), np.asarray(pb, np.float32), atol=1e-2)
        np.testing.assert_allclose(np.asarray(fp, np.float32), np.asarray(pp_, np.float32), atol=1e-5)
        np.testing.assert_allclose(np.asarray(fq, np.float32), np.asarray(pq, np.float32), atol=1e-2)


# ---------------------------------------------------------------- runs on generated datasets


def test_faces_are_found_and_cached(face_video: Path, tmp_path: Path) -> None:
    root = face_video.parents[1]
    summary = run(root, tmp_path / "cache", PreprocessSettings(size=112))
    assert summary.counts == {"ok": 1} and summary.usable == 1
    (row,) = manifest_rows(tmp_path / "cache").values()
    assert row["valid_frames"] == 16 and row["status"] == "ok" and row["reason"] == ""
    with np.load(tmp_path / "cache" / row["cache_file"]) as npz:
        assert set(npz.files) == {"frames", "boxes", "landmarks", "valid", "label", "subject"}
        frames, boxes, points = npz["frames"], npz["boxes"], npz["landmarks"]
        assert frames.shape == (16, 112, 112, 3) and frames.dtype == np.uint8
        assert boxes.dtype == np.float32 and points.shape == (16, 5, 2)
        assert npz["valid"].all() and int(npz["label"]) == 0 and str(npz["subject"]) == "02"
    assert np.all(boxes >= 0) and np.all(boxes[:, 0] + boxes[:, 2] <= 1.0 + 1e-6)
    assert np.all((boxes[:, 2] > 0.15) & (boxes[:, 2] < 0.7))  # a face, not the whole frame
    inside = ((points[..., 0] >= boxes[:, None, 0]) & (points[..., 0] <= boxes[:, None, 0] +
                                                       boxes[:, None, 2]))
    assert inside.mean() > 0.95
    assert np.all(points[:, 0, 0] < points[:, 1, 0])  # left eye left of right eye
    assert np.all(points[:, 2, 1] < points[:, 3, 1])  # nose above the mouth


def test_partial_faces_are_filled_and_flagged(tmp_path: Path) -> None:
    frames = face_frames(num_frames=40)
    frames[20:] = 128  # the face leaves after frame 19
    write_frames(tmp_path / "data" / "Actor_02" / "02-01-03-01-01-01-02.mp4", frames)
    run(tmp_path / "data", tmp_path / "cache", PreprocessSettings(size=112))
    (row,) = manifest_rows(tmp_path / "cache").values()
    assert row["status"] == "partial" and row["valid_frames"] == 10  # frames 0, 2, ..., 18
    assert "no face in 6 of 16 frames" in row["reason"]
    item = ClipDataset(tmp_path / "cache")[0]
    assert item["valid"].tolist() == [True] * 10 + [False] * 6
    assert torch.equal(item["boxes"][10:], item["boxes"][9].expand(6, 4))


def test_truncated_clips_are_partial_or_failed_never_ok(tmp_path: Path) -> None:
    frames = face_frames(num_frames=65)
    actor = tmp_path / "data" / "Actor_02"
    write_frames(actor / "02-01-01-01-01-01-02.flv", frames)
    truncate_at_frame(write_frames(actor / "02-01-03-01-01-01-02.flv", frames), 45)
    truncate_at_frame(write_frames(actor / "02-01-04-01-01-01-02.flv", frames), 8)
    summary = run(tmp_path / "data", tmp_path / "cache", PreprocessSettings(size=112))
    rows = {r["label_name"]: r for r in manifest_rows(tmp_path / "cache").values()}
    assert rows["neutral"]["status"] == "ok" and rows["neutral"]["reason"] == ""
    assert rows["happy"]["status"] == "partial" and rows["happy"]["valid_frames"] == 16
    assert re.match(r"truncated: \d+ of 6[57] frames decodable$", rows["happy"]["reason"])
    assert rows["sad"]["status"] == "failed" and rows["sad"]["cache_file"] == ""
    assert re.match(r"truncated: \d of 6[57] frames decodable \(fewer than", rows["sad"]["reason"])
    assert summary.counts == {"ok": 1, "partial": 1, "failed": 1}
    assert summary.selected == {"neutral": 1, "happy": 1, "sad": 1, "angry": 0, "fearful": 0,
                                "disgust": 0, "surprised": 0}
    assert summary.usable_per_class["sad"] == 0 and summary.usable_per_class["happy"] == 1
    assert ("selected 3 clips, per class (usable): neutral 1 (1), happy 1 (1), sad 1 (0), angry 0 "
            "(0)") in summary.format()


def bad_root(root: Path) -> dict[str, str]:
    """A RAVDESS-layout root with every kind of bad input; name -> kind."""
    kinds = {
        "Actor_01/02-01-01-01-01-01-01.mp4": "good",
        "Actor_01/02-01-03-01-01-01-01.mp4": "zero",
        "Actor_01/02-01-04-01-01-01-01.mp4": "text",
        "Actor_02/02-01-05-01-01-01-02.mp4": "truncated",
        "Actor_02/02-01-06-01-01-01-02.mp4": "corrupt",
        "Actor_02/02-01-07-01-01-01-02.mp4": "broken-link",
        "Actor_03/02-01-08-01-01-01-03.mkv": "gray",
        "Actor_03/02-01-01-01-02-01-03.mkv": "odd-size",
        "Actor_03/02-01-03-01-02-01-03.mp4": "short",
    }
    makers = {
        "good": write_gradient_video, "zero": make_zero_byte, "text": make_text_file,
        "truncated": make_truncated, "corrupt": make_corrupt, "broken-link": make_broken_link,
        "gray": lambda p: write_gradient_video(p, pix_fmt="gray"),
        "odd-size": lambda p: write_gradient_video(p, width=63, height=47, codec="mpeg4"),
        "short": lambda p: write_gradient_video(p, num_frames=7),
    }
    for name, kind in kinds.items():
        makers[kind](root / name)
    return kinds


def test_bad_input_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    kinds = bad_root(tmp_path / "data")
    summary = run(tmp_path / "data", tmp_path / "cache")
    rows = {kinds[k]: r for k, r in manifest_rows(tmp_path / "cache").items()}
    assert set(rows) == set(kinds.values())
    assert "empty file (0 bytes)" in rows["zero"]["reason"]
    assert "cannot open as a video" in rows["text"]["reason"]
    assert "cannot open as a video" in rows["truncated"]["reason"]
    assert "file not found" in rows["broken-link"]["reason"]
    for kind in ("zero", "text", "truncated", "broken-link"):
        assert rows[kind]["status"] == "failed" and rows[kind]["cache_file"] == ""
    for kind in ("good", "gray", "odd-size", "short"):  # no face in gradients: kept faceless
        assert rows[kind]["status"] == "partial" and rows[kind]["valid_frames"] == 0
        assert (tmp_path / "cache" / rows[kind]["cache_file"]).is_file()
    assert rows["short"]["padded"] and "padded: 7 source frames" in rows["short"]["reason"]
    assert rows["corrupt"]["reason"]  # decodable prefix or failed, always with a reason
    assert summary.counts["failed"] >= 4 and summary.usable >= 4
    assert "empty file" in summary.format()


def test_a_bad_input_folder_with_one_good_clip_gives_each_its_own_status_and_reason(tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = write_frames(data / "Actor_01" / "02-01-01-01-01-01-01.mp4", face_frames())
    make_zero_byte(data / "Actor_01" / "02-01-03-01-01-01-01.mp4")
    make_text_file(data / "Actor_01" / "02-01-04-01-01-01-01.mp4")
    make_truncated(data / "Actor_02" / "02-01-05-01-01-01-02.mp4")
    make_corrupt(data / "Actor_02" / "02-01-06-01-01-01-02.mp4")
    write_gradient_video(data / "Actor_03" / "02-01-07-01-01-01-03.mp4")  # decodes, no face
    make_broken_link(data / "Actor_03" / "02-01-08-01-01-01-03.mp4")
    summary = run(data, tmp_path / "cache", PreprocessSettings(size=112))
    rows = manifest_rows(tmp_path / "cache")
    expected = {
        "Actor_01/02-01-03-01-01-01-01.mp4": r"empty file \(0 bytes\)$",
        "Actor_01/02-01-04-01-01-01-01.mp4": r"cannot open as a video: not a video file",
        "Actor_02/02-01-05-01-01-01-02.mp4": r"cannot open as a video: not a video file",
        # decord stops at the damage after a varying number of frames (threaded decoding)
        "Actor_02/02-01-06-01-01-01-02.mp4": r"truncated: \d+ of 40 frames decodable \(fewer than the 16"
                                             r"|no frame could be decoded \(corrupt",
        "Actor_03/02-01-07-01-01-01-03.mp4": r"no face detected in any of the 16 sampled frames$",
        "Actor_03/02-01-08-01-01-01-03.mp4": r"file not found",
    }
    good_row = rows.pop(good.relative_to(data).as_posix())
    assert (good_row["status"], good_row["reason"], good_row["valid_frames"]) == ("ok", "", 16)
    assert set(rows) == set(expected)
    for clip, reason in expected.items():
        assert rows[clip]["status"] == "failed" and rows[clip]["cache_file"] == "", clip
        assert re.match(reason, rows[clip]["reason"]), (clip, rows[clip]["reason"])
    assert summary.counts == {"ok": 1, "failed": 6}
    assert load_manifest(tmp_path / "cache")["clip_id"].tolist() == [good_row["clip_id"]]
    assert ClipDataset(tmp_path / "cache")[0]["valid"].all()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without permission")
def test_unreadable_file_is_recorded(tmp_path: Path) -> None:
    (path,) = gradient_root(tmp_path / "data", 1)
    path.chmod(0)
    run(tmp_path / "data", tmp_path / "cache")
    assert "permission denied" in next(iter(manifest_rows(tmp_path / "cache").values()))["reason"]


def test_faceless_clips_fail_by_default(tmp_path: Path) -> None:
    gradient_root(tmp_path / "data", 1)
    summary = run(tmp_path / "data", tmp_path / "cache", PreprocessSettings(size=64))
    (row,) = manifest_rows(tmp_path / "cache").values()
    assert row["status"] == "failed" and "no face detected in any of the 16" in row["reason"]
    assert summary.usable == 0 and load_manifest(tmp_path / "cache").empty


def test_manifest_and_dataset(tmp_path: Path) -> None:
    gradient_root(tmp_path / "data", 3)
    make_zero_byte(tmp_path / "data" / "Actor_04" / "02-01-05-01-01-01-04.mp4")
    run(tmp_path / "data", tmp_path / "cache")
    raw = pd.read_csv(tmp_path / "cache" / "manifest.csv")
    assert tuple(raw.columns) == MANIFEST_COLUMNS
    assert raw["clip"].tolist() == sorted(raw["clip"])
    full = load_manifest(tmp_path / "cache", usable_only=False)
    assert set(full["status"]) == {"partial", "failed"}
    assert full["valid_frames"].between(0, 16).all()
    assert full["subject"].tolist() == ["01", "02", "03", "04"]  # strings, leading zeros kept
    usable = load_manifest(tmp_path / "cache")
    assert len(usable) == 3 and usable["padded"].dtype == bool
    dataset = ClipDataset(tmp_path / "cache", usable["clip_id"].tolist()[:2])
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["video"].shape == (2, 16, 64, 64, 3) and batch["video"].dtype == torch.uint8
    assert batch["boxes"].shape == (2, 16, 4) and batch["landmarks"].shape == (2, 16, 5, 2)
    assert batch["valid"].dtype == torch.bool and batch["label"].tolist() == [0, 1]
    assert batch["clip_id"] == usable["clip_id"].tolist()[:2]
    assert cache_class_names(tmp_path / "cache")[:2] == ["neutral", "happy"]
    with pytest.raises(KeyError, match="not usable clips"):
        ClipDataset(tmp_path / "cache", ["Actor_04__02-01-05-01-01-01-04"])
    settings = json.loads((tmp_path / "cache" / "settings.json").read_text())
    assert settings["size"] == 64 and settings["dataset"] == "ravdess" and settings["settings_hash"]


def test_resume_after_interruption_loses_nothing(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    gradient_root(tmp_path / "data", 4)
    real, calls = pp.process_clips, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pp, "process_clips", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "data", tmp_path / "cache", clips_per_task=1)
    monkeypatch.setattr(pp, "process_clips", real)
    done = manifest_rows(tmp_path / "cache")
    assert len(done) == 2  # the manifest was written on the way out
    first = tmp_path / "cache" / next(iter(done.values()))["cache_file"]
    stamp = first.stat().st_mtime_ns
    summary = run(tmp_path / "data", tmp_path / "cache")
    assert (summary.processed, summary.skipped, summary.total) == (2, 2, 4)
    assert first.stat().st_mtime_ns == stamp  # finished clips are not redone


def test_resume_from_journal_after_a_hard_kill(tmp_path: Path) -> None:
    gradient_root(tmp_path / "data", 3)
    run(tmp_path / "data", tmp_path / "cache")
    rows = list(manifest_rows(tmp_path / "cache").values())
    (tmp_path / "cache" / "manifest.csv").unlink()  # killed before any manifest flush
    lines = [json.dumps({**r, "padded": bool(r["padded"])}) for r in rows]
    (tmp_path / "cache" / JOURNAL_FILE).write_text("\n".join(lines) + '\n{"clip": "torn')
    summary = run(tmp_path / "data", tmp_path / "cache")
    assert (summary.processed, summary.skipped) == (0, 3)
    assert len(manifest_rows(tmp_path / "cache")) == 3
    assert not (tmp_path / "cache" / JOURNAL_FILE).exists()


def test_failed_clips_are_kept_unless_retried_or_replaced(tmp_path: Path) -> None:
    path = make_zero_byte(tmp_path / "data" / "Actor_01" / "02-01-01-01-01-01-01.mp4")
    run(tmp_path / "data", tmp_path / "cache")
    assert run(tmp_path / "data", tmp_path / "cache").processed == 0
    assert run(tmp_path / "data", tmp_path / "cache", retry_failed=True).processed == 1
    write_gradient_video(path)  # the file is replaced: processed again without --retry-failed
    summary = run(tmp_path / "data", tmp_path / "cache")
    assert summary.processed == 1 and summary.counts == {"partial": 1}
    assert run(tmp_path / "data", tmp_path / "cache").processed == 0


def test_deleted_cache_file_is_redone(tmp_path: Path) -> None:
    gradient_root(tmp_path / "data", 2)
    run(tmp_path / "data", tmp_path / "cache")
    row = next(iter(manifest_rows(tmp_path / "cache").values()))
    (tmp_path / "cache" / row["cache_file"]).unlink()
    assert run(tmp_path / "data", tmp_path / "cache").processed == 1


def test_changed_settings_invalidate_instead_of_mixing(tmp_path: Path) -> None:
    gradient_root(tmp_path / "data", 2)
    run(tmp_path / "data", tmp_path / "cache")
    with pytest.raises(CacheSettingsError, match=r"size: 64 -> 48.*--overwrite"):
        run(tmp_path / "data", tmp_path / "cache", PreprocessSettings(size=48, keep_faceless=True))
    with pytest.raises(CacheSettingsError, match="sampling: 'official' -> 'uniform'"):
        run(tmp_path / "data", tmp_path / "cache",
            PreprocessSettings(size=64, keep_faceless=True, sampling="uniform"))
    with pytest.raises(CacheSettingsError, match="label_protocol: '7class' -> '8class'"):
        run_preprocess(pp.get_dataset("ravdess", num_classes=8), tmp_path / "data",
                       tmp_path / "cache", SMALL, workers=0, progress=False)
    summary = run(tmp_path / "data", tmp_path / "cache",
                  PreprocessSettings(size=48, keep_faceless=True), overwrite=True)
    assert summary.processed == 2
    item = ClipDataset(tmp_path / "cache")[0]
    assert item["video"].shape == (16, 48, 48, 3)
    assert json.loads((tmp_path / "cache" / "settings.json").read_text())["size"] == 48


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    gradient_root(tmp_path / "data", 1)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "manifest.csv").write_text("clip\n")
    with pytest.raises(CacheSettingsError, match="no settings.json"):
        run(tmp_path / "data", tmp_path / "cache")


def test_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_zero_byte(tmp_path / "bad" / "Actor_01" / "02-01-01-01-01-01-01.mp4")
    args = ["preprocess", "--dataset", "ravdess", "--workers", "0", "--no-progress", "--size", "64"]
    assert main(args + ["--root", str(tmp_path / "bad"), "--out", str(tmp_path / "c1")]) == 1
    assert "0 usable" in capsys.readouterr().out
    gradient_root(tmp_path / "good", 1)
    ok = args + ["--root", str(tmp_path / "good"), "--out", str(tmp_path / "c2"), "--keep-faceless"]
    assert main(ok) == 0
    assert "1 usable" in capsys.readouterr().out
    assert main(ok[:-1]) == 2  # keep_faceless changed under the same --out
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--root", str(tmp_path / "none"), "--out", str(tmp_path / "c3")]) == 2


@pytest.mark.slow
def test_process_pool_matches_in_process_run(tmp_path: Path) -> None:
    kinds = bad_root(tmp_path / "data")
    pooled = run(tmp_path / "data", tmp_path / "pool", workers=2, clips_per_task=2)
    inline = run(tmp_path / "data", tmp_path / "inline")
    assert pooled.total == inline.total == len(kinds)
    statuses = {k: r["status"] for k, r in manifest_rows(tmp_path / "pool").items()}
    expected = {k: r["status"] for k, r in manifest_rows(tmp_path / "inline").items()}
    corrupt = "Actor_02/02-01-06-01-01-01-02.mp4"  # decord's damage handling is not deterministic
    statuses.pop(corrupt), expected.pop(corrupt)
    assert statuses == expected


@pytest.mark.slow
def test_ray_tasks_when_ray_is_initialised(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    gradient_root(tmp_path / "data", 2)
    make_text_file(tmp_path / "data" / "Actor_05" / "02-01-05-01-01-01-05.mp4")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_preprocess("ravdess", tmp_path / "data", tmp_path / "cache", SMALL,
                                 progress=False)
    finally:
        ray.shutdown()
    assert summary.counts == {"partial": 2, "failed": 1}
    assert len(load_manifest(tmp_path / "cache")) == 2


def test_preprocessing_tasks_ask_for_a_gpu_share_whenever_the_cluster_has_gpus() -> None:
    from orchestrator.data.preprocess import GPU_SHARE, ray_task_options

    head_without_gpu = {"CPU": 0.0}  # what the driver sees of itself does not matter, the cluster does
    assert ray_task_options("auto", {**head_without_gpu, "GPU": 4.0})["num_gpus"] == GPU_SHARE
    assert ray_task_options("auto", {"CPU": 16.0})["num_gpus"] == 0
    assert ray_task_options("cpu", {"CPU": 16.0, "GPU": 4.0})["num_gpus"] == 0
    assert ray_task_options("cuda:0", {"CPU": 16.0})["num_gpus"] == GPU_SHARE
    assert ray_task_options("auto", {"GPU": 1.0})["scheduling_strategy"] == "SPREAD"


@pytest.mark.slow
def test_preprocessing_as_ray_tasks_on_a_cluster_that_advertises_a_gpu(tmp_path: Path) -> None:
    """A real local Ray that advertises one GPU (torch here has no CUDA): every task asks for a GPU
    share, Ray schedules them, and each resolves its device on its own node (CPU here)."""
    import ray

    from orchestrator.data.demo import generate_demo_dataset
    from orchestrator.data.preprocess import run_preprocess
    from orchestrator.data.settings import PreprocessSettings

    generate_demo_dataset(tmp_path / "demo", actors=2, size=96, num_frames=20)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_preprocess("demo", tmp_path / "demo", tmp_path / "cache", PreprocessSettings(size=64),
                                 use_ray=True, progress=False)
    finally:
        ray.shutdown()
    assert summary.processed == 14 and summary.usable == 14 and not summary.failures
