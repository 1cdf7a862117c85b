"""orchestrator/features.py: keys, atomic first-writer-wins files, concurrent builders, encoder path."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

from model import ModelConfig, build_model, normalize_video
from orchestrator import features as feat

N, C = 6, 4


def _spec(**kw) -> feat.FeatureSpec:
    base = dict(encoder_weights="w0", encoder_config={"embed_dim": C}, settings_hash="s0")
    return feat.FeatureSpec(**{**base, **kw})


def _fake_frames(clip_id: str) -> np.ndarray:
    value = sum(map(ord, clip_id)) % 200
    return np.full((2, 4, 4, 3), value, dtype=np.uint8)  # (T, S, S, 3)


def _fake_encode(frames: torch.Tensor) -> torch.Tensor:
    means = frames.float().mean(dim=(1, 2, 3, 4))  # (B,)
    return means[:, None, None] + torch.arange(N * C, dtype=torch.float32).view(1, N, C) / 7  # (B, N, C)


def test_key_depends_on_everything_the_tokens_depend_on() -> None:
    base = _spec()
    assert _spec().key == base.key, "the key must be deterministic"
    variants = [_spec(encoder_weights="w1"), _spec(encoder_config={"embed_dim": 8}), _spec(settings_hash="s1"),
                _spec(std=(0.225, 0.225, 0.225)), _spec(compute_dtype="bf16")]
    assert len({v.key for v in variants} | {base.key}) == len(variants) + 1


def test_weights_fingerprint_tracks_weights() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    first = feat.weights_fingerprint(a)
    assert feat.weights_fingerprint(a) == first
    with torch.no_grad():
        a.weight[0, 0] += 1e-3
    assert feat.weights_fingerprint(a) != first


def test_write_read_roundtrip_is_fp16_and_memory_mappable(tmp_path: Path) -> None:
    store = feat.FeatureStore.open(tmp_path, _spec())
    tokens = np.random.default_rng(0).normal(size=(N, C)).astype(np.float32)
    assert store.write("a", tokens) is True
    on_disk = np.load(store.path("a"), mmap_mode="r")
    assert isinstance(on_disk, np.memmap) and on_disk.dtype == np.float16 and on_disk.shape == (N, C)
    np.testing.assert_allclose(store.read(["a", "a"])[1], tokens, atol=2e-3)
    assert (store.root / feat.META_FILENAME).exists()
    assert store.root == tmp_path / feat.FEATURES_DIRNAME / _spec().key


def test_first_writer_wins_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    store = feat.FeatureStore.open(tmp_path, _spec())
    assert store.write("a", np.zeros((N, C)))
    assert store.write("a", np.ones((N, C))) is False
    assert float(store.read(["a"]).max()) == 0.0, "a later writer replaced the published file"
    assert sorted(p.name for p in store.root.iterdir()) == ["a.npy", feat.META_FILENAME]


def test_write_refuses_tokens_that_overflow_fp16(tmp_path: Path) -> None:
    store = feat.FeatureStore.open(tmp_path, _spec())
    with pytest.raises(ValueError, match="not finite"):
        store.write("big", np.full((N, C), 1e6))
    assert store.missing(["big"]) == ["big"]


def test_read_of_a_missing_clip_fails_loudly(tmp_path: Path) -> None:
    store = feat.FeatureStore.open(tmp_path, _spec())
    with pytest.raises(FileNotFoundError):
        store.read(["nope"])


def test_build_encodes_only_missing_clips(tmp_path: Path) -> None:
    store = feat.FeatureStore.open(tmp_path, _spec())
    calls: list[int] = []

    def encode(frames: torch.Tensor) -> torch.Tensor:
        calls.append(frames.shape[0])
        return _fake_encode(frames)

    clips = [f"c{i}" for i in range(5)]
    assert store.build(encode, _fake_frames, clips[:2], batch_size=2) == 2
    assert store.build(encode, _fake_frames, clips, batch_size=2) == 3
    assert calls == [2, 2, 1]
    assert store.build(encode, _fake_frames, clips, batch_size=2) == 0
    expected = _fake_encode(torch.from_numpy(np.stack([_fake_frames(c) for c in clips]))).numpy()
    np.testing.assert_allclose(store.read(clips), expected, rtol=1e-3)


def _build_worker(root: str, clips: list[str], start: multiprocessing.synchronize.Event) -> int:
    start.wait()
    store = feat.FeatureStore.open(Path(root), _spec())
    return store.build(_fake_encode, _fake_frames, clips, batch_size=1)


@pytest.mark.slow
def test_concurrent_builders_produce_one_complete_cache(tmp_path: Path) -> None:
    clips = [f"clip{i:03d}" for i in range(40)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager, ctx.Pool(2) as pool:
        start = manager.Event()
        jobs = [pool.apply_async(_build_worker, (str(tmp_path), clips, start)) for _ in range(2)]
        start.set()
        written = [job.get(timeout=120) for job in jobs]
    assert sum(written) == len(clips), "every clip must be published exactly once"
    store = feat.FeatureStore.open(tmp_path, _spec())
    assert store.missing(clips) == []
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")], "temporary files left behind"
    expected = _fake_encode(torch.from_numpy(np.stack([_fake_frames(c) for c in clips]))).numpy()
    np.testing.assert_allclose(store.read(clips), expected, rtol=1e-3)


def test_encoder_fn_matches_model_encode() -> None:
    torch.manual_seed(0)
    net = build_model("cascaded_vit", ModelConfig(encoder="tiny", decoder="official", num_frames=4,
                                                  img_size=32, num_classes=3))
    frames = torch.randint(0, 255, (2, 4, 32, 32, 3), dtype=torch.uint8)
    tokens = feat.encoder_fn(net, torch.device("cpu"), None)(frames)
    with torch.no_grad():
        expected = net.encode(normalize_video(frames))
    assert tokens.shape == (2, 2 * 2 * 2, 32)
    torch.testing.assert_close(tokens, expected)


def test_spec_for_encoder_changes_with_seeded_init() -> None:
    def spec(seed: int) -> feat.FeatureSpec:
        torch.manual_seed(seed)
        net = build_model("stl", ModelConfig(encoder="tiny", num_frames=4, img_size=32, num_classes=3))
        return feat.FeatureSpec.for_encoder(net.encoder, "s0", None)

    assert spec(0).key == spec(0).key
    assert spec(0).key != spec(1).key
