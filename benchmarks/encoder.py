"""Encoder inference for the feature cache: clips/s of each encoder family, against an eager baseline.

System: the encoder as the feature cache runs it (eval mode, ``torch.inference_mode``, every
attention through ``F.scaled_dot_product_attention``): VideoMAE ViTs and MAE-DFER's LGI-Former.
Baseline: the same weights with explicit ``softmax(Q K^T / sqrt(d)) V`` attention under
``torch.no_grad`` (VideoMAE: block by block; LGI-Former: the same module with SDPA swapped for the
textbook formula). Also reported: the analytic FLOPs per clip (``model.encoders.any_encoder_flops``),
their ratio to VideoMAE ViT-L at 16 x 224 px (the paper's encoder), and the achieved FLOP/s as a
fraction of the dense matmul peak measured in the same run. The target recorded is 1.0 (the real
encoder must not be slower than the textbook one).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    PeakMemory,
    Result,
    default_device,
    dtype_name,
    make_result,
    matmul_peak_flops,
    summarize_times,
    time_interleaved,
)
from model.encoder import EncoderConfig, VideoMAEEncoder
from model.encoders import any_encoder_flops, build_encoder, resolve_encoder_config

log = logging.getLogger(__name__)

TARGET_SPEEDUP = 1.0
VIT_LARGE_FLOPS = any_encoder_flops(resolve_encoder_config("vit_large"))  # the paper's encoder, 16 x 224 px


@dataclass(frozen=True)
class EncoderSetting:
    """One encoder configuration.

    Attributes:
        encoder: Preset name (``vocab.ENCODER_PRESETS``) or a config.
        batch_size: Clips per forward.
        rounds: Timed forwards per side (alternated).
        precision: ``fp32`` or ``bf16`` (autocast) on the system side; the baseline is fp32.
    """

    encoder: str | EncoderConfig = "vit_small"
    batch_size: int = 1
    rounds: int = 2
    precision: str = "fp32"

    @property
    def label(self) -> str:
        """Short name used in result names."""
        name = self.encoder if isinstance(self.encoder, str) else "custom"
        return f"{name}/b{self.batch_size}/{self.precision}"

    def encoder_cfg(self) -> EncoderConfig:
        """The resolved encoder config (either family)."""
        return resolve_encoder_config(self.encoder)


def _eager_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One timm ``Block`` with VideoMAE q/v biases, written out (no drop-path/layer-scale: eval)."""
    attn = blk.attn
    B, N, C = x.shape
    h, d = attn.num_heads, attn.head_dim
    a = blk.norm1(x)
    bias = None
    if attn.q_bias is not None:
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias))
    q, k, v = F.linear(a, attn.qkv.weight, bias).view(B, N, 3, h, d).permute(2, 0, 3, 1, 4)  # (B, h, N, d)
    probs = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d), dim=-1)  # (B, h, N, N)
    z = torch.matmul(probs, v).transpose(1, 2).reshape(B, N, h * d)  # (B, N, C)
    x = x + attn.proj(z)
    m = blk.mlp
    return x + m.fc2(F.gelu(m.fc1(blk.norm2(x))))


def baseline_encode(encoder: VideoMAEEncoder, video: torch.Tensor) -> torch.Tensor:
    """``encoder(video)`` (B, 3, T, H, W) -> (B, N, C), the straightforward eager way."""
    x = encoder.patch_embed(video)  # (B, N, C)
    if encoder.cfg.use_pos_embed:
        x = x + encoder.pos_embed
    for blk in encoder.blocks:
        x = _eager_block(blk, x)
    return encoder.norm(x)


@contextmanager
def textbook_attention() -> Iterator[None]:
    """Within the block, ``F.scaled_dot_product_attention`` is the explicit formula (the baseline)."""
    fused = F.scaled_dot_product_attention

    def explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
        assert attn_mask is None and dropout_p == 0.0 and not is_causal, "inference only"
        scores = torch.matmul(q, k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)  # (B, h, N, M)
        return torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, h, N, d)

    F.scaled_dot_product_attention = explicit
    try:
        yield
    finally:
        F.scaled_dot_product_attention = fused


def run_setting(setting: EncoderSetting, device: torch.device, peak_size: int | None = None
                ) -> list[Result]:
    """Clips/s of the real encoder over the eager baseline, same weights and clip."""
    cfg = setting.encoder_cfg()
    torch.manual_seed(0)
    encoder = build_encoder(cfg).freeze().to(device)
    video = torch.randn(setting.batch_size, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size,
                        device=device)
    autocast = setting.precision == "bf16"
    peak_dtype = torch.bfloat16 if autocast else torch.float32

    def system() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            encoder(video)

    def baseline() -> None:
        with torch.no_grad():
            if isinstance(encoder, VideoMAEEncoder):
                baseline_encode(encoder, video)
            else:
                with textbook_attention():
                    encoder(video)

    peak = matmul_peak_flops(device, peak_dtype, peak_size)
    mem = {}
    for side, fn in (("system", system), ("baseline", baseline)):
        with PeakMemory(device) as probe:  # doubles as the warm-up call
            fn()
        mem[side] = probe.peak_bytes
    times = time_interleaved({"system": system, "baseline": baseline}, device, setting.rounds)
    peak = max(peak, matmul_peak_flops(device, peak_dtype, peak_size))
    stats = {side: summarize_times(t) for side, t in times.items()}
    per_clip = any_encoder_flops(cfg)
    flops = per_clip * setting.batch_size
    sides = {
        side: {**stats[side], "clips_per_s": setting.batch_size / stats[side]["best_s"],
               "flop_per_s": flops / stats[side]["best_s"], "peak_memory_bytes": mem[side]}
        for side in stats
    }
    fraction = sides["system"]["flop_per_s"] / peak
    return [make_result(
        f"encoder/{setting.label}", stats["baseline"]["best_s"] / stats["system"]["best_s"], TARGET_SPEEDUP,
        summary=f"{sides['system']['clips_per_s']:.3g} vs {sides['baseline']['clips_per_s']:.3g} clips/s, "
                f"{fraction:.0%} of matmul peak; {per_clip / 1e9:.3g} GFLOPs/clip = "
                f"{per_clip / VIT_LARGE_FLOPS:.3f}x ViT-L",
        setting={**asdict(replace(setting, encoder=setting.label.split("/")[0])), "num_tokens": cfg.num_tokens,
                 "device": str(device)},
        forward_flops=flops, flops_per_clip=per_clip, flops_ratio_to_vit_large=per_clip / VIT_LARGE_FLOPS,
        fraction_of_peak=fraction, matmul_peak_flop_per_s=peak,
        achieved_flop_per_s=sides["system"]["flop_per_s"], peak_dtype=dtype_name(peak_dtype),
        **sides,
    )]


def quick_settings() -> list[EncoderSetting]:
    """One clip through ViT-S, ViT-B and the LGI-Former base on CPU, one timed forward per side."""
    return [EncoderSetting("vit_small", rounds=1), EncoderSetting("vit_base", rounds=1),
            EncoderSetting("lgi_former_base", rounds=1)]


def full_settings(device: torch.device) -> list[EncoderSetting]:
    """CPU: ViT-S, ViT-B, LGI-Former base; GPU: also ViT-L, at a cache-building batch size, in bf16 too."""
    if device.type != "cuda":
        return [EncoderSetting(name, rounds=3) for name in ("vit_small", "vit_base", "lgi_former_base")]
    return [EncoderSetting(name, batch_size=8, rounds=5, precision=p)
            for name in ("vit_small", "vit_base", "vit_large", "lgi_former_base") for p in ("fp32", "bf16")]


def run(quick: bool, device: torch.device | None = None, settings: list[EncoderSetting] | None = None,
        peak_size: int | None = None) -> list[Result]:
    """Run the encoder-inference benchmark (``settings`` overrides what is measured, for tests)."""
    device = device or default_device()
    settings = settings if settings is not None else (quick_settings() if quick else full_settings(device))
    results: list[Result] = []
    for setting in settings:
        log.info("encoder %s", setting.label)
        results += run_setting(setting, device, peak_size)
    return results
