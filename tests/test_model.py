"""model/: the six architectures, the encoder, Algorithm 1, parameter counts, loss and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import (
    ARCHITECTURES,
    ModelConfig,
    MultiTaskLoss,
    VideoMAEEncoder,
    build_model,
    classification_metrics,
    count_parameters,
    decoder_config,
    encoder_config,
    normalize_video,
)
from model.decoder import CrossAttention, ViTDecoder

T, S, K = 4, 32, 5


def tiny_config(**kw) -> ModelConfig:
    dec = decoder_config("official", embed_dim=16, head_dim=8, depth=2)
    base = dict(encoder="tiny", img_size=S, num_frames=T, decoder=dec, num_classes=K)
    return ModelConfig(**{**base, **kw})


def fake_batch(B: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "label": torch.randint(0, K, (B,), generator=g),
        "boxes": torch.rand(B, T, 4, generator=g),
        "landmarks": torch.rand(B, T, 5, 2, generator=g),
        "valid": torch.ones(B, T, dtype=torch.bool),
    }


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_backward_shapes_and_frozen_encoder(arch: str) -> None:
    torch.manual_seed(0)
    net = build_model(arch, tiny_config())
    net.train()
    out = net(torch.randn(2, 3, T, S, S))
    assert out.logits.shape == (2, K)
    if arch == "stl":
        assert out.boxes is None and out.landmarks is None
    else:
        assert out.boxes.shape == (2, T, 4) and out.landmarks.shape == (2, T, 5, 2)
    losses = MultiTaskLoss()(out, fake_batch())
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert all(p.grad is None for p in net.encoder.parameters()), "frozen encoder received gradients"
    assert not net.encoder.training, "a frozen encoder must stay in eval mode"
    grads = [p.grad for p in net.trainable_parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unfrozen_encoder_gets_gradients() -> None:
    net = build_model("cascaded_vit", tiny_config(freeze_encoder=False))
    MultiTaskLoss()(net(torch.randn(2, 3, T, S, S)), fake_batch())["loss"].backward()
    assert all(p.grad is not None for p in net.encoder.parameters())


def test_architectures_list_is_the_papers_six() -> None:
    assert ARCHITECTURES == ("stl", "nonshared_mlp", "nonshared_vit", "shared_mlp", "shared_vit", "cascaded_vit")
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("cascaded_mlp", tiny_config())


def _logits_after_perturbing(arch: str, decoder: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = build_model(arch, tiny_config()).eval()
    x = torch.randn(2, 3, T, S, S)
    before = net(x).logits
    with torch.no_grad():
        for p in net.decoders[decoder].parameters():
            p.add_(torch.randn_like(p))
    return before, net(x).logits


def test_cascade_routes_box_decoder_into_expression() -> None:
    before, after = _logits_after_perturbing("cascaded_vit", "box")
    assert not torch.allclose(before, after), "eq. 5-6: the expression decoder's query comes from the box decoder"


def test_nonshared_decoders_are_independent() -> None:
    before, after = _logits_after_perturbing("nonshared_vit", "box")
    torch.testing.assert_close(before, after)


def test_shared_decoder_feeds_every_task() -> None:
    before, after = _logits_after_perturbing("shared_vit", "shared")
    assert not torch.allclose(before, after)


def _reference_decoder(dec: ViTDecoder, y: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 written out with an explicit softmax(QK^T/sqrt(d))V."""
    kv = dec.kv_norm(f)
    for blk in dec.blocks:
        a = blk.attn
        B, N, _ = y.shape
        q = a.q(blk.norm1(y)).view(B, N, a.num_heads, a.head_dim).transpose(1, 2)
        k, v = a.kv(kv).view(B, -1, 2, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) / math.sqrt(a.head_dim)).softmax(-1)
        z = a.proj((att @ v).transpose(1, 2).reshape(B, N, -1)) + y
        m = blk.mlp
        y = F.gelu(m.fc2(F.gelu(m.fc1(blk.norm2(z))))) + z
    return y


def test_vit_decoder_matches_algorithm_1() -> None:
    torch.manual_seed(0)
    dec = ViTDecoder(decoder_config("official", embed_dim=24, head_dim=10, depth=3)).eval()
    y, f = torch.randn(2, 7, 24), torch.randn(2, 9, 24)
    torch.testing.assert_close(dec(y, f), _reference_decoder(dec, y, f), atol=1e-5, rtol=1e-5)


def _attention_and_grads(attn: CrossAttention, x: torch.Tensor, ctx: torch.Tensor, reference: bool
                         ) -> list[torch.Tensor]:
    """Output and input/weight gradients of ``attn``, or of softmax(q k^T / sqrt(d)) v on its weights."""
    attn.zero_grad()
    x, ctx = x.detach().clone().requires_grad_(), ctx.detach().clone().requires_grad_()
    if reference:
        B, N, _ = x.shape
        h, d = attn.num_heads, attn.head_dim
        q = attn.q(x).view(B, N, h, d).transpose(1, 2)
        k, v = attn.kv(ctx).view(B, -1, 2, h, d).permute(2, 0, 3, 1, 4)
        z = (q @ k.transpose(-2, -1) / math.sqrt(d)).softmax(-1) @ v
        out = attn.proj(z.transpose(1, 2).reshape(B, N, h * d))
    else:
        out = attn(x, ctx)
    out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
    return [out.detach(), x.grad, ctx.grad] + [p.grad.clone() for p in attn.parameters()]


@pytest.mark.parametrize("fused", [True, False])
def test_cross_attention_is_softmax_attention_forward_and_backward(fused: bool) -> None:
    torch.manual_seed(0)
    attn = CrossAttention(decoder_config("official", embed_dim=24, num_heads=3, head_dim=10, attn_drop=0.3)).eval()
    attn.fused_attn = fused  # the SDPA path and the eager path of benchmarks/decoder_step.py
    x, ctx = torch.randn(2, 7, 24), torch.randn(2, 11, 24)
    ours, ref = _attention_and_grads(attn, x, ctx, False), _attention_and_grads(attn, x, ctx, True)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_dropout_acts_in_training_only(fused: bool) -> None:
    torch.manual_seed(0)
    attn = CrossAttention(decoder_config("official", embed_dim=24, num_heads=3, head_dim=10, attn_drop=0.3))
    attn.fused_attn = fused
    x, ctx = torch.randn(2, 7, 24), torch.randn(2, 11, 24)
    train_a, train_b = attn.train()(x, ctx), attn(x, ctx)
    eval_a, eval_b = attn.eval()(x, ctx), attn(x, ctx)
    assert torch.equal(eval_a, eval_b), "eval mode must be deterministic"
    assert not torch.allclose(train_a, eval_a) and not torch.allclose(train_a, train_b)


def _largest_allocation(step) -> int:
    """Bytes of the largest single CPU allocation made by ``step()`` (PyTorch's profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_decoder_step_never_materialises_the_attention_matrix(bf16: bool) -> None:
    """Without attention dropout, SDPA's fused CPU kernel (float32 and bf16) holds no (B, h, N, N)
    block in a training step; the eager one does."""
    torch.manual_seed(0)
    n, heads = 4096, 2  # one (h, N, N) float32 block: 128 MiB, far above anything else in the step
    dec = ViTDecoder(decoder_config("official", embed_dim=16, num_heads=heads, head_dim=8, depth=1, attn_drop=0.0))
    y, f = torch.randn(1, n, 16), torch.randn(1, n, 16)
    full = heads * n * n * 4  # one layer's float32 scores for the batch

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = dec(y, f)
        out.float().square().mean().backward()

    assert _largest_allocation(step) < full // 4
    q, k, v = (torch.randn(1, heads, n, 8, requires_grad=True) for _ in range(3))
    eager = _largest_allocation(lambda: (F.softmax(q @ k.transpose(-1, -2), -1) @ v).sum().backward())
    assert eager >= full  # the probe does see an N x N block


def test_decoder_trains_under_cpu_bf16_autocast() -> None:
    torch.manual_seed(0)
    dec = ViTDecoder(decoder_config("official", embed_dim=24, head_dim=10, depth=2, attn_drop=0.0, drop_rate=0.0))
    y, f = torch.randn(2, 7, 24), torch.randn(2, 9, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(y, f)
    ref = dec(y, f)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.03
    out.float().square().mean().backward()
    grads = [p.grad for p in dec.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)


def test_official_parameter_counts_match_authors_notebook() -> None:
    # Printed in the authors' executed notebook (official_spec.md 1 and 4.3).
    net = build_model("cascaded_vit", ModelConfig(encoder="tiny", encoder_overrides={"embed_dim": 1024},
                                                  decoder="official", num_classes=7, head_order="pool_norm"))
    assert count_parameters(net.decoders["expr"]) == 3_159_296
    assert count_parameters(net, trainable_only=True) == 9_800_935


def test_vit_large_encoder_parameter_count() -> None:
    with torch.device("meta"):
        enc = VideoMAEEncoder(encoder_config("vit_large"))
    assert count_parameters(enc) == 303_858_688
    assert enc.cfg.num_tokens == 1568


def test_encoder_layouts_and_position_switch() -> None:
    torch.manual_seed(0)
    cfg = encoder_config("tiny", img_size=S, num_frames=T)
    enc = VideoMAEEncoder(cfg).eval()
    x = torch.randn(2, 3, T, S, S)
    tokens = enc(x)
    assert tokens.shape == (2, cfg.num_tokens, cfg.embed_dim)
    torch.testing.assert_close(enc(x.permute(0, 2, 3, 4, 1), layout="BTHWC"), tokens)
    no_pos = VideoMAEEncoder(encoder_config(cfg, use_pos_embed=False)).eval()
    no_pos.load_state_dict(enc.state_dict())
    assert not torch.allclose(no_pos(x), tokens)
    assert "pos_embed" not in enc.state_dict(), "the sinusoid table is a non-persistent buffer"
    with pytest.raises(ValueError, match="expects clips"):
        enc(torch.randn(1, 3, T, S + 16, S))


def test_normalize_video_layout_and_values() -> None:
    video = torch.full((1, T, S, S, 3), 255, dtype=torch.uint8)
    x = normalize_video(video)
    assert x.shape == (1, 3, T, S, S)
    assert x[0, 0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229)


def test_feature_path_equals_end_to_end_for_frozen_encoder() -> None:
    net = build_model("shared_vit", tiny_config()).eval()
    x = torch.randn(2, 3, T, S, S)
    torch.testing.assert_close(net.forward_tokens(net.encode(x)).logits, net(x).logits)


def test_loss_masks_invalid_frames() -> None:
    net = build_model("cascaded_vit", tiny_config()).eval()
    out = net(torch.randn(2, 3, T, S, S))
    batch = fake_batch()
    masked = dict(batch, valid=torch.tensor([[True] * T, [False] * T]))
    corrupted = dict(masked, boxes=batch["boxes"].clone())
    corrupted["boxes"][1] += 100.0  # garbage on frames without a face must not matter
    loss = MultiTaskLoss()
    assert loss(out, masked)["loss_box"].item() == pytest.approx(loss(out, corrupted)["loss_box"].item())
    none_valid = dict(batch, valid=torch.zeros(2, T, dtype=torch.bool))
    assert loss(out, none_valid)["loss_box"].item() == 0.0
    full = loss(out, batch)
    expected = 0.5 * full["loss_box"] + 0.5 * full["loss_landmark"] + 1.5 * full["loss_expr"]
    torch.testing.assert_close(full["loss"], expected)


def test_uar_war_against_hand_computed_confusion() -> None:
    # truth: class 0 x4, class 1 x2, class 2 x2; class 2 is never predicted.
    y_true = [0, 0, 0, 0, 1, 1, 2, 2]
    y_pred = [0, 0, 0, 1, 1, 1, 0, 1]
    m = classification_metrics(y_true, y_pred, num_classes=3)
    np.testing.assert_array_equal(m["confusion"], [[3, 1, 0], [0, 2, 0], [1, 1, 0]])
    assert m["war"] == pytest.approx(5 / 8)
    assert m["uar"] == pytest.approx((3 / 4 + 1.0 + 0.0) / 3)
    assert m["per_class_recall"] == pytest.approx([0.75, 1.0, 0.0])


def test_uar_ignores_classes_without_samples() -> None:
    m = classification_metrics([0, 0, 1], [0, 1, 1], num_classes=4)
    assert m["uar"] == pytest.approx((0.5 + 1.0) / 2)
    assert np.isnan(m["per_class_recall"][3])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 5], [0, 1], num_classes=4)


def test_build_model_loads_encoder_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)
    source = VideoMAEEncoder(encoder_config("tiny", img_size=S, num_frames=T))
    path = tmp_path / "videomae_tiny.pth"
    torch.save({"model": {f"encoder.{k}": v for k, v in source.state_dict().items()}}, path)
    net = build_model("cascaded_vit", tiny_config(encoder_checkpoint=str(path)))
    for key, value in source.state_dict().items():
        torch.testing.assert_close(net.encoder.state_dict()[key], value)
    assert all(not p.requires_grad for p in net.encoder.parameters())


# The paper's wiring (section 4.3, Table 1), written out independently of model/architectures.py:
# decoder -> its query source; every decoder's K/V is the shared projection "proj".
PAPER_ROUTING = {
    "stl": ({}, {"expr": "tokens"}),
    "nonshared_mlp": ({"box": "proj", "landmark": "proj", "expr": "proj"}, {t: t for t in ("box", "landmark", "expr")}),
    "nonshared_vit": ({"box": "proj", "landmark": "proj", "expr": "proj"}, {t: t for t in ("box", "landmark", "expr")}),
    "shared_mlp": ({"shared": "proj", "box": "shared", "landmark": "shared", "expr": "shared"},
                   {t: t for t in ("box", "landmark", "expr")}),
    "shared_vit": ({"shared": "proj", "box": "shared", "landmark": "shared", "expr": "shared"},
                   {t: t for t in ("box", "landmark", "expr")}),
    "cascaded_vit": ({"box": "proj", "landmark": "box", "expr": "landmark"}, {t: t for t in ("box", "landmark", "expr")}),
}


@pytest.mark.parametrize("arch", list(PAPER_ROUTING))
def test_every_stage_reads_the_query_and_key_value_source_of_the_paper(arch: str) -> None:
    net = build_model(arch, tiny_config()).eval()
    stages, heads = PAPER_ROUTING[arch]
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, tuple] = {}

    def keep(name: str):
        def hook(module, args, output):
            inputs[name], outputs[name] = args, output
        return hook

    net.encoder.register_forward_hook(keep("tokens"))
    if net.proj is not None:
        net.proj.register_forward_hook(keep("proj"))
    for name, decoder in net.decoders.items():
        decoder.register_forward_hook(keep(name))
    for task, head in net.heads.items():
        head.register_forward_hook(keep(f"head:{task}"))
    with torch.no_grad():
        net(torch.randn(2, 3, T, S, S))
    assert set(net.decoders) == set(stages)
    for name, source in stages.items():
        query, key_value = inputs[name][:2]
        assert query is outputs[source], f"{arch}: decoder {name!r} must take its query from {source!r}"
        assert key_value is outputs["proj"], f"{arch}: decoder {name!r} must attend to the projected tokens"
    assert set(net.heads) == set(heads)
    for task, source in heads.items():
        assert inputs[f"head:{task}"][0] is outputs[source], f"{arch}: the {task} head must read {source!r}"
