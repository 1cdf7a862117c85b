"""LGI-Former: MAE-DFER's key layout, strict loading and loud failures, the block equations, geometry.

The key table, the checkpoint layouts and the reference equations are written here from MAE-DFER's
``modeling_finetune.py`` / ``modeling_pretrain.py`` (official_spec.md 7.1-7.2), independently of
model/lgi_former.py and model/checkpoint.py.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from model import ARCHITECTURES, ModelConfig, build_model
from model.checkpoint import (
    CheckpointMismatchError,
    IncompatibleCheckpointError,
    checkpoint_filter_fn,
    detect_format,
    load_encoder_checkpoint,
)
from model.encoder import (
    VideoMAEEncoder,
    count_parameters,
    encoder_config,
    encoder_flops,
)
from model.lgi_former import (
    LGIFormerEncoder,
    LocalGlobalBlock,
    lgi_former_config,
    lgi_former_flops,
)
from vocab import STL

Sd = dict[str, torch.Tensor]
S, T = 32, 4  # tiny clips: a (2, 2, 2) token grid, 2 regions of 2x1x2 tokens


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight random (biases, norms and region tokens too), so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)
    return module


def make_encoder(seed: int | None = 0, **overrides: object) -> LGIFormerEncoder:
    enc = LGIFormerEncoder(lgi_former_config("lgi_former_tiny", **overrides)).eval()
    return randomise(enc, seed) if seed is not None else enc


def clip(seed: int = 1, frames: int = T, size: int = S) -> torch.Tensor:
    return torch.randn(2, 3, frames, size, size, generator=torch.Generator().manual_seed(seed))


# ---- MAE-DFER's key layout (official_spec.md 7.2) ---------------------------------------------------


def attention_shapes(name: str, c: int) -> dict[str, tuple[int, ...]]:
    """GeneralAttention: bias-free q and kv Linears, q_bias and v_bias, proj with bias."""
    return {f"{name}.q.weight": (c, c), f"{name}.kv.weight": (2 * c, c), f"{name}.q_bias": (c,),
            f"{name}.v_bias": (c,), f"{name}.proj.weight": (c, c), f"{name}.proj.bias": (c,)}


def maedfer_encoder_shapes(c: int, depth: int, regions: int, final_norm: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape of MAE-DFER's LGI-Former encoder (first 'self', third 'cross', mlp_ratio 4)."""
    shapes = {"patch_embed.proj.weight": (c, 3, 2, 16, 16), "patch_embed.proj.bias": (c,),
              "lg_region_tokens": (regions, c)}
    norms = ("first_attn_norm0", "second_attn_norm0", "third_attn_norm0", "third_attn_norm1", "norm2")
    for i in range(depth):
        block = {f"{n}.{p}": (c,) for n in norms for p in ("weight", "bias")}
        for name in ("first_attn", "second_attn", "third_attn"):
            block.update(attention_shapes(name, c))
        block.update({"mlp.fc1.weight": (4 * c, c), "mlp.fc1.bias": (4 * c,), "mlp.fc2.weight": (c, 4 * c),
                      "mlp.fc2.bias": (c,)})
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    if final_norm:
        shapes.update({"norm.weight": (c,), "norm.bias": (c,)})
    return shapes


def to_maedfer_pretrain(sd: Sd, decoder_dim: int = 16) -> Sd:
    """``PretrainVisionTransformer``: ``encoder.`` prefix, plus its ViT decoder, projection and mask token."""
    c, d = sd["patch_embed.proj.weight"].shape[0], decoder_dim
    out = {f"encoder.{k}": v for k, v in sd.items()}
    decoder = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.q_bias": (d,),
               "attn.v_bias": (d,), "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "norm2.weight": (d,),
               "norm2.bias": (d,), "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,), "mlp.fc2.weight": (d, 4 * d),
               "mlp.fc2.bias": (d,)}
    out.update({f"decoder.blocks.0.{k}": torch.randn(shape) for k, shape in decoder.items()})
    out.update({"decoder.norm.weight": torch.ones(d), "decoder.norm.bias": torch.zeros(d),
                "decoder.head.weight": torch.randn(1536, d), "decoder.head.bias": torch.zeros(1536),
                "encoder_to_decoder.weight": torch.randn(d, c), "mask_token": torch.zeros(1, 1, d)})
    return out


def to_maedfer_finetune(sd: Sd, num_classes: int) -> Sd:
    """Fine-tuned ``VisionTransformer`` (mean pooling): no prefix, ``fc_norm`` and a class head."""
    c = sd["patch_embed.proj.weight"].shape[0]
    return {**sd, "fc_norm.weight": torch.ones(c), "fc_norm.bias": torch.zeros(c),
            "head.weight": torch.randn(num_classes, c), "head.bias": torch.zeros(num_classes)}


def save_maedfer(sd: Sd, path: Path) -> Path:
    """As MAE-DFER's ``utils.save_model``: the state dict under ``model`` beside its training state."""
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 49, "scaler": {"scale": 1.0},
                "args": argparse.Namespace(attn_type="local_global", lg_region_size=[2, 5, 10], depth=16)}, path)
    return path


def assert_loaded(source: LGIFormerEncoder, fresh: LGIFormerEncoder) -> None:
    assert source.state_dict().keys() == fresh.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(source(clip()), fresh(clip()))


def test_module_names_are_maedfer_parameter_names() -> None:
    tiny = make_encoder(seed=None)
    assert {k: tuple(v.shape) for k, v in tiny.state_dict().items()} == maedfer_encoder_shapes(32, 2, 2, False)
    with torch.device("meta"):
        base = LGIFormerEncoder(lgi_former_config("lgi_former_base", final_norm=True))
    assert {k: tuple(v.shape) for k, v in base.state_dict().items()} == maedfer_encoder_shapes(512, 16, 8, True)
    # The pre-training log's n_parameters 92,760,192 minus its decoder side (4 ViT blocks of 384,
    # norm, 1536-way head, encoder_to_decoder, mask_token: 7,885,440).
    assert count_parameters(base) == 92_760_192 - 7_885_440


# ---- loading ----------------------------------------------------------------------------------------


def test_pretrain_checkpoint_round_trip(tmp_path: Path) -> None:
    src = make_encoder(final_norm=True)
    path = save_maedfer(to_maedfer_pretrain(src.state_dict()), tmp_path / "checkpoint-49.pth")
    fresh = make_encoder(seed=None, final_norm=True)
    report = load_encoder_checkpoint(fresh, path)
    assert report.source_format == "lgi_former_pretrain"
    assert report.num_loaded == len(src.state_dict())
    dropped = {key for keys in report.ignored.values() for key in keys}
    decoder_side = {"mask_token", "encoder_to_decoder.weight", "decoder.head.weight",
                    "decoder.blocks.0.attn.qkv.weight"}
    assert decoder_side <= dropped
    assert_loaded(src, fresh)


def test_pretrain_final_norm_dropped_for_model_without_it(tmp_path: Path) -> None:
    src = make_encoder(final_norm=True)
    path = save_maedfer(to_maedfer_pretrain(src.state_dict()), tmp_path / "checkpoint-49.pth")
    fresh = make_encoder(seed=None)
    report = load_encoder_checkpoint(fresh, path)
    assert any("final_norm=False" in reason and keys == ["norm.weight", "norm.bias"]
               for reason, keys in report.ignored.items())
    assert torch.equal(fresh.lg_region_tokens, src.lg_region_tokens)


@pytest.mark.parametrize("num_classes", [7, 11])  # DFEW / FERV39k, MAFW
def test_finetuned_checkpoint_round_trip_drops_head(tmp_path: Path, num_classes: int) -> None:
    src = make_encoder()
    path = save_maedfer(to_maedfer_finetune(src.state_dict(), num_classes), tmp_path / "dfew_fold1.pth")
    fresh = make_encoder(seed=None)
    report = load_encoder_checkpoint(fresh, path)
    assert report.source_format == "lgi_former"
    dropped = {key for keys in report.ignored.values() for key in keys}
    assert dropped == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert_loaded(src, fresh)


def test_filter_is_pure_and_detects_both_layouts() -> None:
    sd = to_maedfer_pretrain(make_encoder().state_dict())
    before = dict(sd)
    out = checkpoint_filter_fn(sd, make_encoder(seed=None))
    assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)
    assert set(out) == set(make_encoder(seed=None).state_dict())
    assert detect_format(sd) == "lgi_former_pretrain"
    assert detect_format(to_maedfer_finetune(make_encoder().state_dict(), 7)) == "lgi_former"


def test_missing_key_is_named(tmp_path: Path) -> None:
    sd = to_maedfer_pretrain(make_encoder().state_dict())
    del sd["encoder.blocks.1.third_attn.kv.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"ckpt\.pth.*1 missing: blocks\.1\.third_attn\.kv\.weight"):
        load_encoder_checkpoint(make_encoder(seed=None), save_maedfer(sd, tmp_path / "ckpt.pth"))


def test_unexpected_key_is_named(tmp_path: Path) -> None:
    sd = to_maedfer_finetune(make_encoder().state_dict(), 7)
    sd["blocks.0.fourth_attn.q.weight"] = torch.zeros(32, 32)
    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected: blocks\.0\.fourth_attn\.q\.weight"):
        load_encoder_checkpoint(make_encoder(seed=None), save_maedfer(sd, tmp_path / "ckpt.pth"))


def test_misshaped_key_names_shapes_and_region_count(tmp_path: Path) -> None:
    sd = to_maedfer_pretrain(make_encoder().state_dict())
    sd["encoder.lg_region_tokens"] = torch.zeros(8, 32)
    with pytest.raises(CheckpointMismatchError) as info:
        load_encoder_checkpoint(make_encoder(seed=None), save_maedfer(sd, tmp_path / "ckpt.pth"))
    message = str(info.value)
    assert "lg_region_tokens: checkpoint (8, 32) vs model (2, 32)" in message
    assert "8 regions" in message and "lgi_former_config('lgi_former_tiny')" in message


def test_unreleased_block_variant_is_explained(tmp_path: Path) -> None:
    sd = to_maedfer_finetune(make_encoder().state_dict(), 7)
    sd.update({"blocks.0.first_attn_norm1.weight": torch.ones(32), "blocks.0.first_attn_norm1.bias": torch.zeros(32)})
    with pytest.raises(CheckpointMismatchError, match=r"first_attn_norm1.*lg_first_attn_type='cross'"):
        load_encoder_checkpoint(make_encoder(seed=None), save_maedfer(sd, tmp_path / "ckpt.pth"))


def test_each_family_refuses_the_other(tmp_path: Path) -> None:
    vit = VideoMAEEncoder(encoder_config("tiny", img_size=S, num_frames=T))
    torch.save({"model": vit.state_dict()}, tmp_path / "videomae.pth")
    with pytest.raises(IncompatibleCheckpointError, match=r"videomae\.pth.*plain VideoMAE ViT.*LGIFormerEncoder"):
        load_encoder_checkpoint(make_encoder(seed=None), tmp_path / "videomae.pth")
    path = save_maedfer(to_maedfer_pretrain(make_encoder().state_dict()), tmp_path / "maedfer.pth")
    with pytest.raises(IncompatibleCheckpointError, match=r"maedfer\.pth.*LGI-Former.*LGIFormerEncoder"):
        load_encoder_checkpoint(vit, path)


# ---- the block against an explicit reference of its equations ---------------------------------------


def ref_layer_norm(p: Sd, name: str, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * p[f"{name}.weight"] + p[f"{name}.bias"]


def ref_attention(p: Sd, name: str, x: torch.Tensor, context: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head; q = x Wq + bq, k = c Wk (no key bias), v = c Wv + bv."""
    w_k, w_v = p[f"{name}.kv.weight"].chunk(2)
    q = (x @ p[f"{name}.q.weight"].T + p[f"{name}.q_bias"]).unflatten(-1, (heads, -1))  # (..., n, h, d)
    k = (context @ w_k.T).unflatten(-1, (heads, -1))  # (..., m, h, d)
    v = (context @ w_v.T + p[f"{name}.v_bias"]).unflatten(-1, (heads, -1))
    scores = torch.einsum("...nhd,...mhd->...hnm", q, k) / math.sqrt(q.shape[-1])
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("...hnm,...mhd->...nhd", weights, v).flatten(-2)
    return out @ p[f"{name}.proj.weight"].T + p[f"{name}.proj.bias"]


def ref_mlp(p: Sd, x: torch.Tensor) -> torch.Tensor:
    h = x @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))  # exact GELU
    return h @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]


def ref_block(p: Sd, messengers: torch.Tensor, local: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One LGBlock on messengers (B, R, C) and local tokens (B, R, S, C)."""
    B, R, S, C = local.shape
    # 1. inside each region, its messenger and its S local tokens attend to one another
    z = torch.cat([messengers[:, :, None], local], dim=2)
    h = ref_layer_norm(p, "first_attn_norm0", z)
    z = z + ref_attention(p, "first_attn", h, h, heads)
    messengers, local = z[:, :, 0], z[:, :, 1:]
    # 2. the R messengers of a clip attend to one another
    h = ref_layer_norm(p, "second_attn_norm0", messengers)
    messengers = messengers + ref_attention(p, "second_attn", h, h, heads)
    # 3. every local token of the clip attends to all (updated) messengers
    flat = local.reshape(B, R * S, C)
    context = ref_layer_norm(p, "third_attn_norm1", messengers)
    flat = flat + ref_attention(p, "third_attn", ref_layer_norm(p, "third_attn_norm0", flat), context, heads)
    # 4. MLP on every token
    z = torch.cat([messengers[:, :, None], flat.reshape(B, R, S, C)], dim=2)
    z = z + ref_mlp(p, ref_layer_norm(p, "norm2", z))
    return z[:, :, 0], z[:, :, 1:]


def test_block_matches_reference_forward_and_backward() -> None:
    heads = 4
    block = randomise(LocalGlobalBlock(16, heads, norm_layer=lambda d: torch.nn.LayerNorm(d, eps=1e-6)).double())
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 1 + 5, 16, generator=gen, dtype=torch.float64, requires_grad=True)  # B=2, R=3, S=5
    upstream = torch.randn(2, 3, 6, 16, generator=gen, dtype=torch.float64)
    params = dict(block.named_parameters())

    out = block(x)
    grads = torch.autograd.grad(out, [x, *params.values()], upstream)
    msg, local = ref_block(params, x[:, :, 0], x[:, :, 1:], heads)
    ref = torch.cat([msg[:, :, None], local], dim=2)
    ref_grads = torch.autograd.grad(ref, [x, *params.values()], upstream)

    torch.testing.assert_close(out, ref)
    for name, g, r in zip(["input", *params], grads, ref_grads):
        torch.testing.assert_close(g, r, msg=lambda m, name=name: f"gradient of {name}: {m}")


def ref_encoder(enc: LGIFormerEncoder, video: torch.Tensor) -> torch.Tensor:
    """The whole encoder from explicit indexing: (t, h, w) token -> (region, slot) and back."""
    p = {k: v for k, v in enc.state_dict().items()}
    cfg = enc.cfg
    x = torch.nn.functional.conv3d(video, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=(2, 16, 16))
    x = x.flatten(2).transpose(1, 2)  # (B, N, C), raster (t, h, w)
    n, c = x.shape[1], x.shape[2]
    pos = torch.arange(n, dtype=torch.float64)[:, None] / 10000 ** (2 * (torch.arange(c, dtype=torch.float64) // 2) / c)
    x = x + torch.where(torch.arange(c) % 2 == 0, torch.sin(pos), torch.cos(pos)).float().to(x.dtype)
    (gt, gh, gw), (rt, rh, rw) = cfg.grid, cfg.region_size
    nh, nw = gh // rh, gw // rw
    local = x.new_zeros(x.shape[0], cfg.num_regions, rt * rh * rw, c)
    where = {}
    for t in range(gt):
        for h in range(gh):
            for w in range(gw):
                region = ((t // rt) * nh + h // rh) * nw + w // rw
                slot = ((t % rt) * rh + h % rh) * rw + w % rw
                where[(t * gh + h) * gw + w] = (region, slot)
    for token, (region, slot) in where.items():
        local[:, region, slot] = x[:, token]
    messengers = p["lg_region_tokens"].expand(x.shape[0], -1, -1)
    for i in range(cfg.depth):
        block = {k.removeprefix(f"blocks.{i}."): v for k, v in p.items() if k.startswith(f"blocks.{i}.")}
        messengers, local = ref_block(block, messengers, local, cfg.num_heads)
    return torch.stack([local[:, region, slot] for _, (region, slot) in sorted(where.items())], dim=1)


def test_encoder_matches_reference_on_many_regions() -> None:
    # (4, 4, 4) grid, region 2x1x2 -> (2, 4, 2) = 16 regions: region order (nt, nh, nw) is exercised.
    enc = make_encoder(num_frames=8, img_size=64).double()
    video = clip(frames=8, size=64).double()
    with torch.no_grad():
        torch.testing.assert_close(enc(video), ref_encoder(enc, video))


# ---- geometry, interface --------------------------------------------------------------------------------


def test_tiny_output_shape_and_layouts() -> None:
    enc = make_encoder()
    video = clip()
    with torch.no_grad():
        tokens = enc(video)
        assert tokens.shape == (2, enc.cfg.num_tokens, 32) == (2, 8, 32)
        torch.testing.assert_close(enc(video.permute(0, 2, 3, 4, 1), layout="BTHWC"), tokens)
        local, regions = enc.forward_regions(video)
    assert torch.equal(local, tokens) and regions.shape == (2, 2, 32)
    with pytest.raises(ValueError, match=r"\(C, T, H, W\) = \(3, 4, 32, 32\)"):
        enc(clip(size=64))


def test_base_geometry_is_maedfer() -> None:
    cfg = lgi_former_config("lgi_former_base")
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.img_size, cfg.num_frames) == (512, 16, 8, 160, 16)
    assert cfg.grid == (8, 10, 10) and cfg.num_tokens == 800
    assert cfg.region_grid == (4, 2, 1) and cfg.num_regions == 8 and cfg.tokens_per_region == 100
    with torch.device("meta"):
        enc = LGIFormerEncoder(cfg)
        out = enc(torch.empty(1, 3, 16, 160, 160))
    assert out.shape == (1, 800, 512)


def test_region_size_must_divide_the_grid() -> None:
    with pytest.raises(ValueError, match=r"region_size \(2, 5, 10\).*grid \(8, 14, 14\).*160 px"):
        lgi_former_config("lgi_former_base", img_size=224)
    assert lgi_former_config("lgi_former_tiny", num_frames=16, img_size=64).num_regions == 32  # the demo cache


def test_flops_ratio_to_vit_base_matches_maedfer() -> None:
    # MAE-DFER reports 50G (LGI-Former) against 81G (VideoMAE ViT-B), both at 16x160x160.
    lgi = lgi_former_flops(lgi_former_config("lgi_former_base"))
    ratio = lgi / encoder_flops(encoder_config("vit_base", img_size=160))
    assert ratio == pytest.approx(50 / 81, abs=0.02)


def test_frozen_encoder_stays_in_eval_and_gets_no_gradients() -> None:
    enc = make_encoder(drop_path_rate=0.5).freeze()
    enc.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    torch.testing.assert_close(enc(clip()), enc(clip()))


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    plain, ckpt = make_encoder(), make_encoder(grad_checkpointing=True)
    grads = []
    for enc in (plain, ckpt):
        enc(clip()).square().sum().backward()
        grads.append([p.grad for p in enc.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_runs_on_the_lgi_former(arch: str) -> None:
    cfg = ModelConfig(encoder="lgi_former_tiny", num_frames=16, img_size=32, num_classes=5, decoder="official",
                      freeze_encoder=False)
    net = build_model(arch, cfg)
    assert isinstance(net.encoder, LGIFormerEncoder) and net.encoder.cfg.num_tokens == 8 * 2 * 2
    out = net(torch.randn(2, 3, 16, 32, 32))
    assert out.logits.shape == (2, 5)
    if arch != STL:
        assert out.boxes.shape == (2, 16, 4) and out.landmarks.shape == (2, 16, 5, 2)
    out.logits.sum().backward()
    assert net.encoder.lg_region_tokens.grad is not None, "the encoder is part of the graph"
