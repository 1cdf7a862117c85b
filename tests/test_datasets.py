"""Dataset adapters: naming conventions, fixed class orders, selection, bad-name reporting."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from orchestrator.data.datasets import (
    CREMA_D_EMOTIONS,
    DATASETS,
    MEAD_EMOTIONS,
    RAVDESS_EMOTIONS_7,
    RAVDESS_EMOTIONS_8,
    ClipRecord,
    DatasetLayoutError,
    get_dataset,
    records_to_frame,
)


def touch(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def ravdess_name(modality: int, vocal: int, emotion: int, intensity: int = 1, statement: int = 1,
                 repetition: int = 1, actor: int = 1) -> str:
    return (f"Actor_{actor:02d}/{modality:02d}-{vocal:02d}-{emotion:02d}-{intensity:02d}-"
            f"{statement:02d}-{repetition:02d}-{actor:02d}.mp4")


def full_ravdess_speech(root: Path) -> None:
    """Every RAVDESS speech file name, in all three modalities (24 actors x 60 x 3)."""
    for actor in range(1, 25):
        for modality in (1, 2, 3):
            for emotion in range(1, 9):
                intensities = (1,) if emotion == 1 else (1, 2)
                for intensity in intensities:
                    for statement in (1, 2):
                        for repetition in (1, 2):
                            touch(root, ravdess_name(modality, 1, emotion, intensity, statement,
                                                     repetition, actor))


def test_class_orders_are_fixed_constants() -> None:
    assert DATASETS["ravdess"].class_names == ("neutral", "happy", "sad", "angry", "fearful",
                                               "disgust", "surprised")
    assert get_dataset("ravdess", num_classes=8).class_names == RAVDESS_EMOTIONS_8
    assert DATASETS["crema-d"].class_names == ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
    assert DATASETS["mead"].class_names == ("angry", "contempt", "disgusted", "fear", "happy",
                                            "neutral", "sad", "surprised")
    assert DATASETS["demo"].class_names == RAVDESS_EMOTIONS_7
    assert set(DATASETS) == {"ravdess", "crema-d", "mead", "demo"}


def test_ravdess_full_speech_corpus_gives_1440_clips_288_neutral(tmp_path: Path) -> None:
    full_ravdess_speech(tmp_path)
    records = DATASETS["ravdess"].scan(tmp_path)
    assert len(records) == 1440  # one modality per recording, audio-only ignored
    frame = records_to_frame(records)
    assert (frame["label_name"] == "neutral").sum() == 288  # 24 actors x (4 neutral + 8 calm)
    assert frame.groupby("label").size().tolist() == [288] + [192] * 6
    assert all(Path(r.path).name.startswith("02-") for r in records)  # video-only preferred
    assert frame["subject"].nunique() == 24


@pytest.mark.parametrize("code, label7, label8", [(1, 0, 0), (2, 0, 1), (3, 1, 2), (4, 2, 3),
                                                  (5, 3, 4), (6, 4, 5), (7, 5, 6), (8, 6, 7)])
def test_ravdess_label_mapping(code: int, label7: int, label8: int) -> None:
    name = ravdess_name(2, 1, code, actor=7)
    seven = DATASETS["ravdess"].parse(name)
    eight = get_dataset("ravdess", num_classes=8).parse(name)
    assert (seven.label, seven.subject) == (label7, "07")
    assert seven.label_name == RAVDESS_EMOTIONS_7[label7]
    assert (eight.label, eight.label_name) == (label8, RAVDESS_EMOTIONS_8[code - 1])


def test_ravdess_selection_and_tolerated_suffix(tmp_path: Path) -> None:
    touch(tmp_path,
          ravdess_name(1, 1, 3),                        # AV twin of the next one: dropped
          ravdess_name(2, 1, 3),
          ravdess_name(1, 1, 4),                        # only the AV copy exists: kept
          ravdess_name(3, 1, 5),                        # audio-only: ignored
          ravdess_name(2, 2, 5),                        # song: skipped by default
          "Actor_02/02-01-06-01-01-01-02_1.mp4")        # suffix seen in the wild
    paths = [r.path for r in DATASETS["ravdess"].scan(tmp_path)]
    assert paths == [ravdess_name(1, 1, 4), ravdess_name(2, 1, 3),
                     "Actor_02/02-01-06-01-01-01-02_1.mp4"]
    with_song = get_dataset("ravdess", vocal_channels=("01", "02")).scan(tmp_path)
    assert ravdess_name(2, 2, 5) in [r.path for r in with_song]


def test_bad_names_are_listed_in_one_warning(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    touch(tmp_path, ravdess_name(2, 1, 3), "Actor_01/holiday.mp4", "Actor_01/02-01-99-01-01-01.mp4",
          "Actor_01/notes.txt")
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.datasets"):
        records = DATASETS["ravdess"].scan(tmp_path)
    assert len(records) == 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "2 video file(s)" in text and "holiday.mp4" in text and "02-01-99-01-01-01.mp4" in text
    assert "notes.txt" not in text  # not a video extension: not a bad name
    with pytest.raises(DatasetLayoutError, match="holiday.mp4"):
        DATASETS["ravdess"].scan(tmp_path, strict=True)


def test_no_parsable_clip_is_a_clear_error(tmp_path: Path) -> None:
    touch(tmp_path, "a/b.mp4")
    with pytest.raises(DatasetLayoutError, match="do not fit the crema-d naming"):
        DATASETS["crema-d"].scan(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        DATASETS["crema-d"].scan(tmp_path / "missing")
    (tmp_path / "a/b.mp4").unlink()
    with pytest.raises(DatasetLayoutError, match="no crema-d clips"):
        DATASETS["crema-d"].scan(tmp_path)


def test_crema_d(tmp_path: Path) -> None:
    touch(tmp_path, "VideoFlash/1001_DFA_ANG_XX.flv", "VideoFlash/1001_IEO_HAP_HI.flv",
          "VideoFlash/1091_TSI_SAD_LO.mp4", "VideoFlash/1002_DFA_XXX_XX.flv")
    records = DATASETS["crema-d"].scan(tmp_path)
    assert [(r.label_name, r.label, r.subject) for r in records] == [
        ("ANG", 0, "1001"), ("HAP", 3, "1001"), ("SAD", 5, "1091")]
    assert [CREMA_D_EMOTIONS.index(r.label_name) for r in records] == [r.label for r in records]


def test_mead_nested_and_flat_layouts(tmp_path: Path) -> None:
    touch(tmp_path,
          "M003/video/front/angry/level_1/001.mp4",
          "M003/video/left_30/angry/level_1/001.mp4",   # other view: skipped
          "W009/video/front/contempt/level_3/012.mp4",
          "M003/audio/angry/level_1/001.m4a",            # audio: not a video
          "flat/M005_front_surprised_level2_007.mp4",
          "flat/W011_front_disgusted_level_1_003.mp4",
          "flat/W011_down_happy_level_1_003.mp4")        # other view: skipped
    records = DATASETS["mead"].scan(tmp_path)
    got = {(r.subject, r.label_name, r.label) for r in records}
    assert got == {("M003", "angry", 0), ("W009", "contempt", 1), ("M005", "surprised", 7),
                   ("W011", "disgusted", 2)}
    assert all(MEAD_EMOTIONS[r.label] == r.label_name for r in records)
    left = get_dataset("mead", view="left_30").scan(tmp_path)
    assert [r.path for r in left] == ["M003/video/left_30/angry/level_1/001.mp4"]


def test_get_dataset_errors() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'affectnet'"):
        get_dataset("affectnet")
    with pytest.raises(ValueError, match="no option"):
        get_dataset("crema-d", view="front")
    with pytest.raises(ValueError, match="7 or 8"):
        get_dataset("ravdess", num_classes=6)


def test_settings_change_with_protocol() -> None:
    seven, eight = DATASETS["ravdess"].settings(), get_dataset("ravdess", num_classes=8).settings()
    assert seven["label_protocol"] == "7class" and eight["label_protocol"] == "8class"
    assert seven != eight
    assert DATASETS["demo"].settings()["dataset"] == "demo"


def test_records_to_frame_columns() -> None:
    frame = records_to_frame([ClipRecord("a.mp4", 1, "x", "01")])
    assert list(frame.columns) == ["path", "label", "label_name", "subject"]
