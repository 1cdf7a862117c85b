"""A cache that cannot go stale: content-keyed clips and features, a fixed root, checked files.

Everything runs the real path: generated videos preprocessed by ``run_preprocess``, token files
built by a real (tiny) frozen encoder inside a real :class:`Trial`, files damaged on disk.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from videos import write_gradient_video

import vocab
from orchestrator import features as feat
from orchestrator.cli import main
from orchestrator.data.cache import (
    CacheFileError,
    CacheSettingsError,
    CacheWriteError,
    ClipDataset,
    load_manifest,
)
from orchestrator.data.preprocess import run_preprocess
from orchestrator.data.settings import PreprocessSettings
from orchestrator.trial import data as td
from orchestrator.trial.config import TrialConfig
from orchestrator.trial.loop import Trial

SMALL = PreprocessSettings(size=64, keep_faceless=True)
DATASET = vocab.DATASETS[0]
TINY = dict(dataset=DATASET, encoder="tiny", decoder="official", decoder_dim=16, decoder_head_dim=8,
            decoder_depth=1, batch_size=4, epochs=1, feature_cache="on")


@pytest.fixture(autouse=True)
def no_ambient_tracking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def videos(root: Path, frames: int = 30) -> list[Path]:
    """Three face-free clips of three actors (kept as ``partial`` with ``keep_faceless``)."""
    return [write_gradient_video(root / f"Actor_0{a}" / f"02-01-0{e}-01-01-01-0{a}.mp4", num_frames=frames)
            for a, e in ((1, 1), (2, 3), (3, 4))]


def preprocess(root: Path, out: Path, **kwargs) -> None:
    summary = run_preprocess(DATASET, root, out, SMALL, workers=0, progress=False, **kwargs)
    assert summary.usable == 3


def trial(cache: Path) -> Trial:
    """A trial on the cache's three clips (one per split): building it builds the token cache."""
    ids = load_manifest(cache)["clip_id"].tolist()
    data = td.trial_data_from_splits(cache, {"train": ids[:1], "val": ids[1:2], "test": ids[2:]}, DATASET)
    return Trial(TrialConfig.from_flat({**TINY, "cache_dir": str(cache)}), data)


def encoded_now(caplog: pytest.LogCaptureFixture) -> str:
    (line,) = [r.getMessage() for r in caplog.records if "clips encoded now" in r.getMessage()]
    caplog.clear()
    return line.rpartition(": ")[2]


def token_files(cache: Path) -> list[Path]:
    (store,) = (cache / feat.FEATURES_DIRNAME).iterdir()
    return sorted(store.glob("*.npy"))


def test_overwrite_with_changed_videos_re_encodes_every_clip(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    videos(tmp_path / "data")
    preprocess(tmp_path / "data", tmp_path / "cache")
    trial(tmp_path / "cache")
    assert encoded_now(caplog) == "3 clips encoded now, 0 reused"
    trial(tmp_path / "cache")
    assert encoded_now(caplog) == "0 clips encoded now, 3 reused"  # same videos: tokens are reused

    before = load_manifest(tmp_path / "cache").set_index("clip_id")["content_hash"]
    videos(tmp_path / "data", frames=45)  # the same names, other videos
    preprocess(tmp_path / "data", tmp_path / "cache", overwrite=True)
    after = load_manifest(tmp_path / "cache").set_index("clip_id")["content_hash"]
    assert (before != after).all() and after.str.len().eq(16).all()
    trial(tmp_path / "cache")
    assert any("3 clip(s) changed since their tokens were stored" in r.getMessage() for r in caplog.records)
    assert encoded_now(caplog) == "3 clips encoded now, 0 reused"
    assert len(token_files(tmp_path / "cache")) == 3


def test_a_video_replaced_without_overwrite_is_redone_and_re_encoded(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    first = videos(tmp_path / "data")[0]
    preprocess(tmp_path / "data", tmp_path / "cache")
    trial(tmp_path / "cache")
    caplog.clear()
    write_gradient_video(first, num_frames=50)
    summary = run_preprocess(DATASET, tmp_path / "data", tmp_path / "cache", SMALL, workers=0, progress=False)
    assert (summary.processed, summary.skipped) == (1, 2)
    trial(tmp_path / "cache")
    assert encoded_now(caplog) == "1 clips encoded now, 2 reused"


def test_a_touched_video_with_the_same_bytes_is_not_redone(tmp_path: Path) -> None:
    first = videos(tmp_path / "data")[0]
    preprocess(tmp_path / "data", tmp_path / "cache")
    os.utime(first, ns=(1, 1))  # stat differs, content does not
    summary = run_preprocess(DATASET, tmp_path / "data", tmp_path / "cache", SMALL, workers=0, progress=False)
    assert (summary.processed, summary.skipped) == (0, 3)
    rows = load_manifest(tmp_path / "cache").set_index("clip")
    assert rows.at[first.relative_to(tmp_path / "data").as_posix(), "source_stat"].endswith(":1")
    summary = run_preprocess(DATASET, tmp_path / "data", tmp_path / "cache", SMALL, workers=0, progress=False)
    assert summary.processed == 0


def test_another_root_on_an_existing_cache_is_refused_naming_both(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    videos(tmp_path / "a")
    preprocess(tmp_path / "a", tmp_path / "cache")
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # same clips, same settings, another root
    with pytest.raises(CacheSettingsError) as info:
        run_preprocess(DATASET, tmp_path / "b", tmp_path / "cache", SMALL, workers=0, progress=False)
    message = str(info.value)
    assert str(tmp_path / "a") in message and str(tmp_path / "b") in message and "--overwrite" in message
    (tmp_path / "link").symlink_to(tmp_path / "a")  # the same root by another name is the same root
    run_preprocess(DATASET, tmp_path / "link", tmp_path / "cache", SMALL, workers=0, progress=False)
    args = ["preprocess", "--dataset", DATASET, "--workers", "0", "--no-progress", "--size", "64",
            "--keep-faceless", "--out", str(tmp_path / "cache"), "--root", str(tmp_path / "b")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "b") in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--overwrite"]) == 0


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_token_file_is_named_and_rebuilt(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    videos(tmp_path / "data")
    preprocess(tmp_path / "data", tmp_path / "cache")
    store = trial(tmp_path / "cache").source.store
    damaged = token_files(tmp_path / "cache")[1]
    flip_byte(damaged, damaged.stat().st_size // 2)  # inside the tokens: np.load would not notice
    clip_id = damaged.stem
    fresh = feat.FeatureStore.open(tmp_path / "cache", store.spec)
    with pytest.raises(feat.FeatureFileError, match=f"{damaged}.*CRC-32.*delete it"):
        fresh.read([clip_id])
    caplog.set_level(logging.INFO)
    trial(tmp_path / "cache")  # a trial's build checks every file once and re-encodes the bad one
    assert encoded_now(caplog) == "1 clips encoded now, 2 reused"
    assert feat.FeatureStore.open(tmp_path / "cache", store.spec).read([clip_id]).shape[0] == 1


def test_a_truncated_token_file_is_named(tmp_path: Path) -> None:
    videos(tmp_path / "data")
    preprocess(tmp_path / "data", tmp_path / "cache")
    store = trial(tmp_path / "cache").source.store
    damaged = token_files(tmp_path / "cache")[0]
    damaged.write_bytes(damaged.read_bytes()[:1000])
    assert feat.FeatureStore.open(tmp_path / "cache", store.spec).missing([damaged.stem]) == [damaged.stem]
    with pytest.raises(feat.FeatureFileError, match=f"{damaged} is truncated"):
        feat.FeatureStore.open(tmp_path / "cache", store.spec).read([damaged.stem])


@pytest.mark.parametrize("damage", ["truncated", "crc"])
def test_a_damaged_clip_file_is_named_where_training_reads_it(tmp_path: Path, damage: str) -> None:
    videos(tmp_path / "data")
    preprocess(tmp_path / "data", tmp_path / "cache")
    manifest = load_manifest(tmp_path / "cache")
    path = tmp_path / "cache" / manifest["cache_file"][0]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        flip_byte(path, path.stat().st_size // 3)  # inside the frames: the zip CRC breaks
    expected = f"cache file {path} is truncated or corrupt.*mtcae preprocess --out"
    with pytest.raises(CacheFileError, match=expected):
        ClipDataset(tmp_path / "cache")[0]
    data = td.trial_data_from_splits(tmp_path / "cache", {s: manifest["clip_id"].tolist()[1:]
                                                          for s in ("train", "val", "test")})
    data.files[manifest["clip_id"][0]] = path
    with pytest.raises(CacheFileError, match=expected):
        data.load_frames(manifest["clip_id"][0])
    path.unlink()  # the fix the message gives: delete it and re-run preprocess
    summary = run_preprocess(DATASET, tmp_path / "data", tmp_path / "cache", SMALL, workers=0, progress=False)
    assert summary.processed == 1 and ClipDataset(tmp_path / "cache")[0]["video"].shape == (16, 64, 64, 3)


def test_an_output_location_that_cannot_be_written_is_one_sentence(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    videos(tmp_path / "data")
    (tmp_path / "file").write_text("a regular file, not a folder\n")
    out = tmp_path / "file" / "cache"  # fails for root too, unlike a chmod
    with pytest.raises(CacheWriteError, match=f"cannot create the cache directory {out}: Not a directory"):
        run_preprocess(DATASET, tmp_path / "data", out, SMALL, workers=0, progress=False)
    args = ["preprocess", "--dataset", DATASET, "--workers", "0", "--no-progress", "--size", "64",
            "--root", str(tmp_path / "data"), "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mtcae preprocess: cannot create the cache directory {out}: Not a directory"


def test_a_journal_that_cannot_be_written_mid_run_is_one_sentence(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    first = videos(tmp_path / "data")[0]
    preprocess(tmp_path / "data", tmp_path / "cache")
    write_gradient_video(first, num_frames=50)  # work for the next run
    (tmp_path / "cache" / "journal").write_text("a file where the journal folder goes\n")
    args = ["preprocess", "--dataset", DATASET, "--workers", "0", "--no-progress", "--size", "64",
            "--keep-faceless", "--root", str(tmp_path / "data"), "--out", str(tmp_path / "cache")]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mtcae preprocess: cannot append to the preprocessing journal {tmp_path / 'cache'}/journal/")
    assert len(err.splitlines()) == 1


def test_an_empty_root_and_an_unwritable_demo_folder_are_one_sentence(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["preprocess", "--dataset", DATASET, "--root", str(tmp_path / "empty"),
                 "--out", str(tmp_path / "cache"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mtcae preprocess: no {DATASET} clips found under {tmp_path / 'empty'}")
    (tmp_path / "file").write_text("a regular file\n")
    assert main(["demo-data", "--out", str(tmp_path / "file" / "demo"), "--actors", "1",
                 "--clips-per-class", "1", "--size", "32", "--frames", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mtcae demo-data: cannot write the demo dataset at {tmp_path / 'file' / 'demo'}: Not a directory"


def test_a_read_only_cache_is_one_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes through a chmod; the regular-file test covers root")
    videos(tmp_path / "data")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache").chmod(0o500)
    try:
        args = ["preprocess", "--dataset", DATASET, "--workers", "0", "--no-progress", "--size", "64",
                "--root", str(tmp_path / "data"), "--out", str(tmp_path / "cache")]
        assert main(args) == 2
    finally:
        (tmp_path / "cache").chmod(0o700)
    err = capsys.readouterr().err
    assert "cannot write the cache settings" in err and "Permission denied" in err and "Traceback" not in err


def test_token_file_trailer_survives_memory_mapping(tmp_path: Path) -> None:
    """The trailer follows the .npy data, so np.load (and its mmap) read the tokens unchanged."""
    spec = feat.FeatureSpec(encoder_weights="w", encoder_config={}, settings_hash="s")
    store = feat.FeatureStore(tmp_path, spec, content={"c": "0123456789abcdef"})
    tokens = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float16)
    assert store.write("c", tokens)
    assert np.array_equal(np.load(store.path("c"), mmap_mode="r"), tokens)
    other = feat.FeatureStore(tmp_path, spec, content={"c": "fedcba9876543210"})
    assert other.missing(["c"]) == ["c"]  # another clip content: stale
    with pytest.raises(feat.FeatureFileError, match="stale"):
        other.read(["c"])


SPACE = f"""\
datasets: [{DATASET}]
archs: [{vocab.ARCHITECTURES[0]}]
n_folds: 2
fixed: {{encoder: tiny, epochs: 1, batch_size: 4}}
preprocess: {{size: 64, workers: 0}}
"""


def test_a_sweep_over_an_empty_dataset_folder_or_unwritable_caches_says_so(tmp_path: Path) -> None:
    from orchestrator.sweep.caches import build_caches
    from orchestrator.sweep.errors import SweepError
    from orchestrator.sweep.space_file import load_search_space

    (tmp_path / "space.yaml").write_text(SPACE)
    space = load_search_space(tmp_path / "space.yaml")
    (tmp_path / "data" / DATASET).mkdir(parents=True)  # there, but no clip in it
    with pytest.raises(SweepError, match=f"cannot build the '{DATASET}' cache from --data-root: no {DATASET} clips"):
        build_caches(space, tmp_path / "cache", tmp_path / "data")
    videos(tmp_path / "data" / DATASET)
    (tmp_path / "file").write_text("not a folder\n")
    with pytest.raises(SweepError, match="cannot create the cache directory .*Not a directory"):
        build_caches(space, tmp_path / "file", tmp_path / "data")
