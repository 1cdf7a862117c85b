"""Dataset adapters: naming conventions, fixed class orders, selection, bad-name reporting."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from orchestrator.data.datasets import (
    CREMA_D_EMOTIONS,
    DATASETS,
    MEAD_EMOTIONS,
    MEAD_PUBLIC_ACTORS,
    PAPER_MEAD_CLIPS,
    RAVDESS_EMOTIONS_7,
    RAVDESS_EMOTIONS_8,
    ClipRecord,
    DatasetLayoutError,
    SkipClip,
    class_counts,
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


def mead_release(root: Path, actors: tuple[str, ...] = MEAD_PUBLIC_ACTORS) -> None:
    """MEAD's front view as released: 30 clips per emotion and level, 40 neutral at level 1."""
    for actor in actors:
        for emotion in MEAD_EMOTIONS:
            for level in (1,) if emotion == "neutral" else (1, 2, 3):
                folder = root / actor / "video" / "front" / emotion / f"level_{level}"
                folder.mkdir(parents=True)
                for clip in range(1, 41 if emotion == "neutral" else 31):
                    (folder / f"{clip:03d}.mp4").touch()


def test_mead_authors_layouts(tmp_path: Path) -> None:
    touch(tmp_path,
          "MEAD/angry/M003_angry_level_1_001.mp4",     # Tool.rename's output
          "MEAD/neutral/W009_neutral_level_1_040.mp4",
          "MEAD/sad/M005_sad_3_012.mp4",                # a bare level number
          "MEAD_RAW/W011/fear/level_2/007.mp4",          # Tool.rename's input
          "MEAD/angry/notes_angry.mp4")                 # no level, no clip: a bad name
    mead = get_dataset("mead", selection="all")
    got = {(r.subject, r.label_name, mead.parse_name(r.path).level) for r in mead.scan(tmp_path)}
    assert got == {("M003", "angry", 1), ("W009", "neutral", 1), ("M005", "sad", 3),
                   ("W011", "fear", 2)}
    with pytest.raises(SkipClip):  # the authors' copies hold one view, taken to be front
        get_dataset("mead", view="left_30").parse("MEAD/angry/M003_angry_level_1_001.mp4")


def test_mead_actor_and_level_filters(tmp_path: Path) -> None:
    mead_release(tmp_path, ("M003", "W009"))
    full = get_dataset("mead", selection="all").scan(tmp_path)
    assert len(full) == 2 * 670  # 7 emotions x 3 levels x 30 + 40 neutral per actor
    level3 = get_dataset("mead", selection="all", levels=(3,), actors=("W009",)).scan(tmp_path)
    assert {r.subject for r in level3} == {"W009"}
    counts = class_counts(level3, MEAD_EMOTIONS)
    assert counts["neutral"] == 40  # neutral exists at level 1 only: not filtered by level
    assert all(counts[e] == 30 for e in MEAD_EMOTIONS if e != "neutral")
    assert all(r.path.split("/")[4] == "level_3" for r in level3 if r.label_name != "neutral")


def test_mead_clip_cap_spreads_over_actors_and_levels(tmp_path: Path) -> None:
    mead_release(tmp_path, ("M003", "M005", "W009"))
    mead = get_dataset("mead", selection="all", clips_per_class=20)
    records = mead.scan(tmp_path)
    assert set(class_counts(records, MEAD_EMOTIONS).values()) == {20}
    angry = [mead.parse_name(r.path) for r in records if r.label_name == "angry"]
    per_group = Counter((n.actor, n.level) for n in angry)
    assert sorted(per_group.values()) == [2] * 7 + [3] * 2  # 20 over 9 (actor, level) groups
    assert {n.clip for n in angry} == {"001", "002", "003"}  # lowest clip numbers first
    neutral = Counter(r.subject for r in records if r.label_name == "neutral")
    assert sorted(neutral.values()) == [6, 7, 7]


def test_mead_paper_selection_reproduces_the_paper_counts(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    mead_release(tmp_path)
    with caplog.at_level(logging.INFO, logger="orchestrator.data.datasets"):
        records = DATASETS["mead"].scan(tmp_path)  # the default is the paper preset
    counts = class_counts(records, MEAD_EMOTIONS)
    assert counts == PAPER_MEAD_CLIPS and counts["neutral"] == 380 and counts["angry"] == 884
    assert len(records) == 6568
    assert "from 47 actors (the paper: 48)" in caplog.text
    assert "neutral 380" in caplog.text  # the scan log prints the per-class counts
    per_actor = Counter((r.subject, r.label_name) for r in records)
    assert {per_actor[a, "sad"] for a in MEAD_PUBLIC_ACTORS} == {18, 19}
    assert {per_actor[a, "neutral"] for a in MEAD_PUBLIC_ACTORS} == {8, 9}
    assert len(get_dataset("mead", selection="all").scan(tmp_path)) == 47 * 670


def test_mead_option_errors() -> None:
    with pytest.raises(ValueError, match="view must be one of"):
        get_dataset("mead", view="back")
    with pytest.raises(ValueError, match="levels must be"):
        get_dataset("mead", levels=(4,))
    with pytest.raises(ValueError, match="selection='all'"):
        get_dataset("mead", clips_per_class=10)
    with pytest.raises(ValueError, match="selection must be"):
        get_dataset("mead", selection="balanced")


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


def test_folder_links_are_walked_once_and_loops_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "ravdess"
    touch(root, ravdess_name(2, 1, 3), ravdess_name(2, 1, 4))
    actor = root / "Actor_01"
    (actor / "loop").symlink_to(root, target_is_directory=True)  # Actor_01/loop -> the root: a loop
    (root / "Actor_01_again").symlink_to(actor, target_is_directory=True)  # a second link to one folder
    with caplog.at_level(logging.WARNING, logger="orchestrator.data.datasets"):
        paths = [r.path for r in DATASETS["ravdess"].scan(root)]
    assert paths == [ravdess_name(2, 1, 3), ravdess_name(2, 1, 4)]
    skipped = [r.getMessage() for r in caplog.records if "already walked" in r.getMessage()]
    assert len(skipped) == 2


def test_clip_ids_are_unique_and_do_not_depend_on_the_other_clips() -> None:
    from orchestrator.data.cache import make_clip_ids
    from orchestrator.data.datasets import ClipRecord

    names = ["Actor_01/café.mp4", "Actor_01/cafè.mp4", "Actor_01/x.mp4", "Actor_01/x.flv", "Actor_01/plain.mp4"]
    records = [ClipRecord(n, 0, "neutral", "01") for n in names]
    ids = make_clip_ids(records)
    assert len(set(ids)) == len(ids) and ids[-1] == "Actor_01__plain"
    alone = {n: make_clip_ids([r])[0] for n, r in zip(names, records)}
    assert alone["Actor_01/café.mp4"] == ids[0], "a lossy name carries its path's hash whatever else exists"
    assert make_clip_ids(records[::-1]) == ids[::-1]
    with pytest.raises(ValueError, match="listed twice"):
        make_clip_ids(records + records[:1])
