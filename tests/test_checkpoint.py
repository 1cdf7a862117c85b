"""Checkpoint loading: round trips through every foreign layout, and loud failures.

Foreign checkpoints are generated from a randomly initialised tiny encoder by converters written
here, independently of model/checkpoint.py, from the key tables in official_spec.md 7.2 / 8.2 / 8.3.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.checkpoint import (
    CheckpointMismatchError,
    CheckpointReadError,
    IncompatibleCheckpointError,
    checkpoint_filter_fn,
    detect_format,
    load_encoder_checkpoint,
)
from model.encoder import VideoMAEEncoder, encoder_config

Sd = dict[str, torch.Tensor]


class NotATensor:
    """A custom class: pickling an instance must be refused by weights_only=True."""


def make_encoder(seed: int | None = 0, **overrides: object) -> VideoMAEEncoder:
    """Tiny encoder (8 tokens); with a seed, every weight (biases, norms too) is random."""
    enc = VideoMAEEncoder(encoder_config("tiny", img_size=32, num_frames=4, **overrides)).eval()
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in enc.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return enc


def clip(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 4, 32, 32, generator=torch.Generator().manual_seed(seed))


# ---- test-side converters: encoder keys -> foreign layouts ----------------------------------------


def to_videomae_finetune(sd: Sd) -> Sd:
    """Original fine-tuned VideoMAE: same keys plus a mean-pool head."""
    c = sd["patch_embed.proj.weight"].shape[0]
    return {**sd, "fc_norm.weight": torch.ones(c), "fc_norm.bias": torch.zeros(c),
            "head.weight": torch.randn(7, c), "head.bias": torch.zeros(7)}


def to_videomae_pretrain(sd: Sd) -> Sd:
    """MAE pre-training model: ``encoder.`` prefix, plus decoder, projection and mask token."""
    c, d = sd["patch_embed.proj.weight"].shape[0], 16
    out = {f"encoder.{k}": v for k, v in sd.items()}
    out.update({
        "encoder_to_decoder.weight": torch.randn(d, c), "mask_token": torch.zeros(1, 1, d),
        "decoder.blocks.0.norm1.weight": torch.ones(d), "decoder.blocks.0.attn.qkv.weight": torch.randn(3 * d, d),
        "decoder.blocks.0.attn.q_bias": torch.zeros(d), "decoder.norm.weight": torch.ones(d),
        "decoder.head.weight": torch.randn(1536, d),
    })
    return out


HF_LAYER = {"norm1.": "layernorm_before.", "attn.q_bias": "attention.attention.q_bias",
            "attn.v_bias": "attention.attention.v_bias", "attn.proj.": "attention.output.dense.",
            "norm2.": "layernorm_after.", "mlp.fc1.": "intermediate.dense.", "mlp.fc2.": "output.dense."}


def to_huggingface(sd: Sd, prefix: str = "videomae.", classifier: bool = True, key_bias: bool = False) -> Sd:
    """transformers VideoMAE* layout with split query/key/value (official_spec.md 8.3)."""
    out: Sd = {}
    for key, value in sd.items():
        if key.startswith("patch_embed.proj."):
            out[prefix + "embeddings.patch_embeddings.projection." + key.split(".")[-1]] = value
        elif key.startswith("norm."):
            out[prefix + "layernorm." + key.split(".")[-1]] = value
        else:
            i, rest = re.match(r"blocks\.(\d+)\.(.+)", key).groups()
            layer = f"{prefix}encoder.layer.{i}."
            if rest == "attn.qkv.weight":
                q, k, v = value.chunk(3)
                names = ("query", "key", "value")
                out.update({layer + f"attention.attention.{n}.weight": t for n, t in zip(names, (q, k, v))})
                if key_bias:
                    out[layer + "attention.attention.key.bias"] = torch.zeros(q.shape[0])
                continue
            old = next(o for o in HF_LAYER if rest.startswith(o))
            out[layer + HF_LAYER[old] + rest[len(old):]] = value
    if classifier:
        c = sd["patch_embed.proj.weight"].shape[0]
        out.update({"fc_norm.weight": torch.ones(c), "fc_norm.bias": torch.zeros(c),
                    "classifier.weight": torch.randn(7, c), "classifier.bias": torch.zeros(7)})
    return out


def to_timm(sd: Sd) -> Sd:
    """timm layout: one 3C qkv bias with a zero key third instead of q_bias/v_bias."""
    out: Sd = {}
    for key, value in sd.items():
        if key.endswith("attn.q_bias"):
            stem = key.removesuffix("q_bias")
            out[stem + "qkv.bias"] = torch.cat([value, torch.zeros_like(value), sd[stem + "v_bias"]])
        elif not key.endswith("attn.v_bias"):
            out[key] = value
    return out


def to_lgi_former(sd: Sd) -> Sd:
    """MAE-DFER LGI-Former keys (official_spec.md 7.2), built on the tiny widths."""
    c = sd["patch_embed.proj.weight"].shape[0]
    out = {"patch_embed.proj.weight": sd["patch_embed.proj.weight"], "lg_region_tokens": torch.zeros(8, c)}
    for name in ("first_attn", "second_attn", "third_attn"):
        out[f"blocks.0.{name}.q.weight"] = torch.randn(c, c)
        out[f"blocks.0.{name}.kv.weight"] = torch.randn(2 * c, c)
    return out


def assert_same_weights(a: VideoMAEEncoder, b: VideoMAEEncoder) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def assert_round_trip(source: VideoMAEEncoder, path: Path, fmt: str, **overrides: object) -> None:
    fresh = make_encoder(seed=None, **overrides)
    report = load_encoder_checkpoint(fresh, path)
    assert report.source_format == fmt
    assert report.num_loaded == len(source.state_dict())
    assert_same_weights(source, fresh)
    with torch.no_grad():
        assert torch.equal(source(clip()), fresh(clip()))


# ---- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize("container", ["model", "module"])
def test_original_pth_with_namespace_round_trip(tmp_path: Path, container: str) -> None:
    src = make_encoder()
    ckpt = {container: to_videomae_finetune(src.state_dict()), "epoch": 49, "optimizer": {"lr": 1e-3},
            "args": argparse.Namespace(model="vit_large_patch16_224", lg_region_size=(2, 5, 10), nb_classes=7)}
    torch.save(ckpt, tmp_path / "checkpoint-49.pth")
    assert_round_trip(src, tmp_path / "checkpoint-49.pth", "videomae")
    report = load_encoder_checkpoint(make_encoder(seed=None), tmp_path / "checkpoint-49.pth")
    dropped = sorted(k for keys in report.ignored.values() for k in keys)
    assert dropped == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]


def test_ddp_and_backbone_prefixes_are_stripped(tmp_path: Path) -> None:
    src = make_encoder()
    torch.save({f"module.backbone.{k}": v for k, v in src.state_dict().items()}, tmp_path / "ddp.pt")
    assert_round_trip(src, tmp_path / "ddp.pt", "videomae")


def test_pretrain_into_model_with_final_norm(tmp_path: Path) -> None:
    src = make_encoder(final_norm=True)
    torch.save({"model": to_videomae_pretrain(src.state_dict())}, tmp_path / "pretrain.pth")
    assert_round_trip(src, tmp_path / "pretrain.pth", "videomae_pretrain", final_norm=True)


def test_pretrain_final_norm_dropped_for_mean_pool_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = make_encoder(final_norm=True)
    torch.save({"model": to_videomae_pretrain(src.state_dict())}, tmp_path / "pretrain.pth")
    fresh = make_encoder(seed=None)
    with caplog.at_level(logging.INFO, logger="model.checkpoint"):
        report = load_encoder_checkpoint(fresh, tmp_path / "pretrain.pth")
    norm_reason = next(r for r, keys in report.ignored.items() if "norm.weight" in keys)
    assert "final_norm=False" in norm_reason
    assert any("norm.weight" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    dropped = {k for keys in report.ignored.values() for k in keys}
    assert {"mask_token", "encoder_to_decoder.weight", "decoder.head.weight"} <= dropped
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, src.state_dict()[key]), key


@pytest.mark.parametrize("prefix", ["videomae.", ""], ids=["for_classification", "bare_model"])
def test_huggingface_bin_round_trip(tmp_path: Path, prefix: str) -> None:
    src = make_encoder()
    torch.save(to_huggingface(src.state_dict(), prefix=prefix, classifier=bool(prefix)), tmp_path / "pytorch_model.bin")
    assert_round_trip(src, tmp_path / "pytorch_model.bin", "huggingface")


def test_huggingface_pretraining_with_layernorm_and_zero_key_bias(tmp_path: Path) -> None:
    src = make_encoder(final_norm=True)
    sd = to_huggingface(src.state_dict(), classifier=False, key_bias=True)
    sd.update({"encoder_to_decoder.weight": torch.randn(16, 32), "mask_token": torch.zeros(1, 1, 16),
               "decoder.decoder_layers.0.attention.attention.query.weight": torch.randn(16, 16),
               "decoder.norm.weight": torch.ones(16), "decoder.head.weight": torch.randn(1536, 16)})
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert_round_trip(src, tmp_path / "pytorch_model.bin", "huggingface", final_norm=True)


@pytest.mark.parametrize("layout", ["videomae", "huggingface"])
def test_safetensors_round_trip(tmp_path: Path, layout: str) -> None:
    src = make_encoder()
    sd = to_videomae_finetune(src.state_dict()) if layout == "videomae" else to_huggingface(src.state_dict())
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    assert_round_trip(src, tmp_path / "model.safetensors", layout)


def test_timm_qkv_bias_is_split(tmp_path: Path) -> None:
    src = make_encoder()
    torch.save({"state_dict": to_timm(src.state_dict())}, tmp_path / "timm.pth")
    assert_round_trip(src, tmp_path / "timm.pth", "timm")


def test_sinusoid_pos_embed_in_checkpoint_is_accepted(tmp_path: Path) -> None:
    src = make_encoder()
    torch.save({**src.state_dict(), "pos_embed": src.pos_embed.clone()}, tmp_path / "pos.pth")
    assert_round_trip(src, tmp_path / "pos.pth", "videomae")


# ---- the pure filter --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("convert", "fmt"),
    [(to_videomae_finetune, "videomae"), (to_videomae_pretrain, "videomae_pretrain"), (to_huggingface, "huggingface"),
     (to_timm, "timm"), (to_lgi_former, "lgi_former")],
)
def test_detect_format(convert, fmt: str) -> None:
    assert detect_format(convert(make_encoder().state_dict())) == fmt


def test_detect_format_rejects_unknown_layout() -> None:
    with pytest.raises(IncompatibleCheckpointError, match="unrecognised.*conv1.weight"):
        detect_format({"conv1.weight": torch.zeros(1)})


def test_filter_is_pure_and_returns_encoder_keys() -> None:
    model = make_encoder()
    foreign = to_huggingface(model.state_dict())
    before = {k: v.clone() for k, v in foreign.items()}
    out = checkpoint_filter_fn(foreign, make_encoder(seed=None))
    assert out.keys() == model.state_dict().keys()
    assert foreign.keys() == before.keys() and all(torch.equal(foreign[k], before[k]) for k in before)


# ---- failures ----------------------------------------------------------------------------------------


def test_missing_block_key_is_named(tmp_path: Path) -> None:
    sd = make_encoder().state_dict()
    del sd["blocks.1.attn.q_bias"]
    torch.save({"model": sd}, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError, match=r"1 missing: blocks\.1\.attn\.q_bias") as info:
        load_encoder_checkpoint(make_encoder(seed=None), tmp_path / "broken.pth")
    assert "broken.pth" in str(info.value)


def test_unknown_extra_key_is_named(tmp_path: Path) -> None:
    sd = to_videomae_finetune(make_encoder().state_dict())
    sd["cls_token"] = torch.zeros(1, 1, 32)
    torch.save({"model": sd}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match="1 unexpected: cls_token"):
        load_encoder_checkpoint(make_encoder(seed=None), tmp_path / "extra.pth")


def test_non_strict_load_reports_instead_of_raising(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = make_encoder()
    sd = src.state_dict()
    del sd["blocks.0.mlp.fc1.bias"]
    sd["cls_token"] = torch.zeros(1, 1, 32)
    torch.save(sd, tmp_path / "partial.pth")
    fresh = make_encoder(seed=None)
    with caplog.at_level(logging.WARNING, logger="model.checkpoint"):
        report = load_encoder_checkpoint(fresh, tmp_path / "partial.pth", strict=False)
    assert (report.missing_keys, report.unexpected_keys) == (["blocks.0.mlp.fc1.bias"], ["cls_token"])
    assert report.num_loaded == len(src.state_dict()) - 1
    assert torch.equal(fresh.blocks[1].mlp.fc1.weight, src.blocks[1].mlp.fc1.weight)
    assert any("cls_token" in r.getMessage() for r in caplog.records)


def test_model_norm_missing_from_checkpoint_is_an_error(tmp_path: Path) -> None:
    torch.save({"model": to_videomae_finetune(make_encoder().state_dict())}, tmp_path / "ft.pth")
    with pytest.raises(CheckpointMismatchError, match=r"norm\.bias, norm\.weight.*final_norm=False"):
        load_encoder_checkpoint(make_encoder(seed=None, final_norm=True), tmp_path / "ft.pth")


def test_deeper_model_lists_missing_blocks_compactly(tmp_path: Path) -> None:
    torch.save(make_encoder().state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_checkpoint(make_encoder(seed=None, depth=6), tmp_path / "shallow.pth")
    message = str(info.value)
    assert "52 missing" in message  # 4 blocks x 13 tensors
    assert "blocks.{2..5}.attn.qkv.weight" in message
    assert "encoder_config('tiny')" in message


def test_shape_mismatch_names_key_shapes_and_preset() -> None:
    sd = make_encoder().state_dict()
    with pytest.raises(CheckpointMismatchError) as info:
        checkpoint_filter_fn(sd, make_encoder(seed=None, embed_dim=64, num_heads=4))
    message = str(info.value)
    assert "patch_embed.proj.weight: checkpoint (32, 3, 2, 16, 16) vs model (64, 3, 2, 16, 16)" in message
    assert "encoder_config('tiny')" in message


def test_lgi_former_is_refused(tmp_path: Path) -> None:
    sd = {f"encoder.{k}": v for k, v in to_lgi_former(make_encoder().state_dict()).items()}
    with pytest.raises(IncompatibleCheckpointError, match="LGI-Former.*MAE-DFER"):
        checkpoint_filter_fn(sd, make_encoder(seed=None))
    torch.save({"model": sd, "args": argparse.Namespace(attn_type="local_global")}, tmp_path / "maedfer.pth")
    with pytest.raises(ValueError, match="maedfer.pth.*LGI-Former"):
        load_encoder_checkpoint(make_encoder(seed=None), tmp_path / "maedfer.pth")


@pytest.mark.parametrize("which", ["hf_key_bias", "timm_qkv_bias"])
def test_nonzero_key_bias_is_refused(which: str) -> None:
    sd = make_encoder().state_dict()
    if which == "hf_key_bias":
        sd = to_huggingface(sd, key_bias=True)
        sd["videomae.encoder.layer.1.attention.attention.key.bias"] += 0.5
        key = "videomae.encoder.layer.1.attention.attention.key.bias"
    else:
        sd = to_timm(sd)
        sd["blocks.1.attn.qkv.bias"][40] = 0.5  # inside the key third [32, 64)
        key = "blocks.1.attn.qkv.bias"
    with pytest.raises(IncompatibleCheckpointError, match=re.escape(key)):
        checkpoint_filter_fn(sd, make_encoder(seed=None))


def test_learned_pos_embed_is_refused() -> None:
    model = make_encoder()
    sd = {**model.state_dict(), "pos_embed": torch.randn_like(model.pos_embed)}
    with pytest.raises(IncompatibleCheckpointError, match="pos_embed.*sinusoid"):
        checkpoint_filter_fn(sd, make_encoder(seed=None))


def test_pickled_custom_class_is_refused_by_weights_only(tmp_path: Path) -> None:
    torch.save({"model": make_encoder().state_dict(), "extra": NotATensor()}, tmp_path / "unsafe.pth")
    with pytest.raises(CheckpointReadError, match=r"unsafe\.pth.*weights_only.*NotATensor"):
        load_encoder_checkpoint(make_encoder(seed=None), tmp_path / "unsafe.pth")


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors", "empty.bin"])
def test_garbage_file_names_the_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"this is not a checkpoint\x00\x01" * 8)
    with pytest.raises(CheckpointReadError, match=re.escape(str(path))):
        load_encoder_checkpoint(make_encoder(seed=None), path)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [([torch.zeros(2)], "holds a list"), ({"epoch": 3, "args": argparse.Namespace()}, "not a state dict"),
     ({"model": {}}, "no tensors")],
)
def test_pickle_without_state_dict_is_refused(tmp_path: Path, payload: object, expected: str) -> None:
    torch.save(payload, tmp_path / "odd.pth")
    with pytest.raises(CheckpointReadError, match=rf"odd\.pth.*{expected}"):
        load_encoder_checkpoint(make_encoder(seed=None), tmp_path / "odd.pth")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_encoder_checkpoint(make_encoder(seed=None), tmp_path / "nowhere.pth")
