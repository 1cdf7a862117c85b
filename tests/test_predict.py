"""``mtcae predict`` (orchestrator/predict.py): real decoding, real MTCNN, a tiny model, real tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from videos import face_frames, make_text_file, write_frames, write_gradient_video

import vocab
from model import ModelConfig, build_model
from orchestrator.cli import main
from orchestrator.data.preprocess import run_preprocess
from orchestrator.data.settings import PreprocessSettings
from orchestrator.predict import (
    POINTS,
    PredictError,
    clip_columns,
    frame_columns,
    predict_videos,
)
from orchestrator.tracking import ensure_experiment, get_or_create_run
from orchestrator.trial.packaging import MODEL_NAME, log_model, save_model
from orchestrator.trial.predictor import Predictor, predictor_from_trial

SIZE = 112  # MTCNN finds the demo face at this size (tests/test_preprocess.py)
CLASSES = ("calm", "happy", "sad")


@pytest.fixture(autouse=True)
def no_ambient_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def make_predictor(arch: str = vocab.CASCADED_VIT) -> Predictor:
    torch.manual_seed(0)
    net = build_model(arch, ModelConfig(encoder="tiny", decoder="official", num_classes=len(CLASSES),
                                        img_size=SIZE))
    return predictor_from_trial(net, {}, CLASSES, PreprocessSettings(size=SIZE), None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow model folder, as ``mlflow artifacts download`` leaves it."""
    path = tmp_path_factory.mktemp("model") / "model"
    save_model(str(path), predictor=make_predictor())
    return path


@pytest.fixture
def videos(face_video: Path, tmp_path: Path) -> Path:
    """A folder with a face clip (112 px, 24 frames), a face-free clip and a text file named .mp4."""
    root = tmp_path / "videos"
    (root / "actor").mkdir(parents=True)
    shutil.copy(face_video, root / "actor" / "face.mp4")
    write_gradient_video(root / "gradient.mp4", num_frames=30, width=64, height=48)
    make_text_file(root / "broken.mp4")
    return root


@pytest.mark.slow
def test_predict_writes_frame_and_clip_tables_and_overlays(videos: Path, model_dir: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["predict", str(videos), "--model", str(model_dir), "--out", str(out), "--overlay",
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    frames, clips = pd.read_csv(out / "frames.csv"), pd.read_csv(out / "clips.csv")
    assert list(frames.columns) == frame_columns() and list(clips.columns) == clip_columns(CLASSES)
    by_clip = clips.set_index("clip")
    assert by_clip.loc["actor/face.mp4", "status"] == "ok" and by_clip.loc["actor/face.mp4", "faces_found"] == 16
    assert by_clip.loc["gradient.mp4", "status"] == "no_face"
    assert by_clip.loc["broken.mp4", "status"] == "failed"
    assert "cannot open as a video" in by_clip.loc["broken.mp4", "reason"]
    probs = clips[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs[clips["status"] != "failed"].sum(axis=1), 1.0, atol=1e-5)
    assert set(clips["label"].dropna()) <= set(CLASSES)
    assert frames.groupby("clip").size().to_dict() == {"actor/face.mp4": 16, "gradient.mp4": 16}
    face = frames[frames["clip"] == "actor/face.mp4"]
    assert face["face_found"].all() and list(face["frame"]) == list(range(16))
    assert list(face["frame_index"]) == list(range(16))  # stride floor(24 / 16) = 1 from frame 0
    assert frames.loc[frames["clip"] == "gradient.mp4", "box_x1"].isna().all()
    err = capsys.readouterr().err
    assert "failed: broken.mp4" in err and "no_face: gradient.mp4" in err
    import decord

    for name, (w, h) in {"actor_face": (SIZE, SIZE), "gradient": (64, 48)}.items():
        reader = decord.VideoReader(str(out / "overlays" / f"{name}.mp4"))
        assert len(reader) == 16 and reader[0].shape == (h, w, 3)
    assert not (out / "overlays" / "broken.mp4").exists()


@pytest.mark.slow
def test_frame_boxes_are_the_preprocessing_labels(face_video: Path, model_dir: Path, tmp_path: Path) -> None:
    """Same decoding and MTCNN as ``mtcae preprocess``: the boxes and points it caches, in pixels."""
    run_preprocess(vocab.RAVDESS, face_video.parents[1], tmp_path / "cache", PreprocessSettings(size=SIZE),
                   workers=0, progress=False)
    (npz_file,) = (tmp_path / "cache" / "clips").glob("*.npz")
    with np.load(npz_file) as npz:
        boxes, points = npz["boxes"], npz["landmarks"]
    predict_videos(face_video, str(model_dir), tmp_path / "out", progress=False, device="cpu")
    frames = pd.read_csv(tmp_path / "out" / "frames.csv")
    corners = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1) * SIZE
    np.testing.assert_allclose(frames[["box_x1", "box_y1", "box_x2", "box_y2"]].to_numpy(), corners, atol=1e-3)
    cols = [f"{p}_{a}" for p in POINTS for a in ("x", "y")]
    np.testing.assert_allclose(frames[cols].to_numpy(), points.reshape(16, 10) * SIZE, atol=1e-3)


@pytest.mark.slow
def test_parquet_and_a_logged_model_uri(face_video: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = get_or_create_run(uri, ensure_experiment(uri, "mtcae"), "predict-test", "predict-test", {})
    log_model(make_predictor(vocab.STL), uri, run_id)
    report = predict_videos(face_video, f"runs:/{run_id}/{MODEL_NAME}", tmp_path / "out", fmt="parquet",
                            tracking_uri=uri, progress=False, device="cpu")
    frames = pd.read_parquet(tmp_path / "out" / "frames.parquet")
    clips = pd.read_parquet(tmp_path / "out" / "clips.parquet")
    assert len(frames) == 16 and frames["pred_box_x1"].isna().all()  # STL predicts no boxes
    assert clips["status"].tolist() == ["ok"] and report.labels[0][1] in CLASSES


@pytest.mark.slow
def test_real_clips_get_tables_and_a_watchable_overlay(real_videos: Path, model_dir: Path, tmp_path: Path) -> None:
    flv = sorted((real_videos / "crema-d").glob("*.flv"))[0]
    mp4 = sorted((real_videos / "talking-heads").glob("*.mp4"))[0]
    source = tmp_path / "real"
    source.mkdir()
    for video in (flv, mp4):
        (source / video.name).symlink_to(video)
    out = tmp_path / "out"
    assert main(["predict", str(source), "--model", str(model_dir), "--out", str(out), "--overlay",
                 "--no-progress", "--device", "cpu"]) == 0
    frames, clips = pd.read_csv(out / "frames.csv"), pd.read_csv(out / "clips.csv")
    assert sorted(clips["clip"]) == sorted([flv.name, mp4.name]) and set(clips["status"]) == {"ok"}
    assert frames.groupby("clip").size().tolist() == [16, 16]
    assert frames["face_found"].mean() > 0.9
    import decord

    for video in (flv, mp4):
        source_w, source_h = decord.VideoReader(str(video))[0].shape[1::-1]
        rows = frames[(frames["clip"] == video.name) & frames["face_found"]]
        assert (rows["box_x1"] >= 0).all() and (rows["box_x2"] <= source_w).all()
        assert (rows["box_y2"] <= source_h).all() and (rows["box_x2"] - rows["box_x1"] > 0.05 * source_w).all()
        overlay = decord.VideoReader(str(out / "overlays" / f"{video.stem}.mp4"))
        assert len(overlay) == 16
        h, w = overlay[0].shape[:2]
        assert abs(w / h - source_w / source_h) < 0.02  # back at the source's aspect ratio


def test_user_errors_are_one_sentence_and_exit_2(model_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    video = write_frames(tmp_path / "v.mp4", face_frames(num_frames=16, size=64))
    cases = [
        (["predict", str(tmp_path / "nothing"), "--model", str(model_dir)], "nothing: no such file or folder"),
        (["predict", str(tmp_path / "empty_dir"), "--model", str(model_dir)], "no video files found"),
        (["predict", str(video), "--model", str(tmp_path / "no_model")], "no such folder, and not an MLflow URI"),
        (["predict", str(video), "--model", str(tmp_path)], "not an mtcae model"),
    ]
    (tmp_path / "empty_dir").mkdir()
    for argv, message in cases:
        assert main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_find_videos_refuses_a_folder_without_videos(tmp_path: Path) -> None:
    from orchestrator.predict import find_videos

    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PredictError, match="no video files found"):
        find_videos(tmp_path)
