"""VideoMAE-style video ViT encoder (paper section 3.1, official_spec.md section 8.4).

A Conv3d tubelet embedding (2x16x16), the fixed sinusoid position table of VideoMAE (a
non-persistent buffer: it is never in a checkpoint), and timm ``Block``s whose attention carries
VideoMAE's ``q_bias``/``v_bias`` layout (no key bias), so original MCG-NJU / MAE-DFER state dicts
load without renaming and parameter counts match the authors' (303,858,688 for ViT-L).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

import vocab
from model.presets import resolve_preset

Layout = Literal["BCTHW", "BTHWC"]

# ImageNet statistics, as VideoMAE and MAE-DFER normalise (MAE-DFER kinetics.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official notebook copied a 0.225-for-all-channels std from a TF example (official_spec 3.4).
OFFICIAL_STD = (0.225, 0.225, 0.225)
# (mean, std) per name of ``vocab.NORMALIZATIONS``: imagenet, official.
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = dict(zip(
    vocab.NORMALIZATIONS, ((IMAGENET_MEAN, IMAGENET_STD), (IMAGENET_MEAN, OFFICIAL_STD)), strict=True))


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a VideoMAE ViT encoder.

    Attributes:
        embed_dim: Token width C.
        depth: Number of transformer blocks.
        num_heads: Attention heads per block.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        patch_size: Spatial patch size (16 in VideoMAE).
        tubelet_size: Temporal patch size (2 in VideoMAE).
        img_size: Input frame size in pixels (square).
        num_frames: Input frames T.
        in_chans: Input channels.
        use_pos_embed: Add the sinusoid position table. The official TF wiring most likely skipped
            it (official_spec.md 4.1); a sensible model keeps it.
        drop_path_rate: Stochastic depth (0 for a frozen encoder).
        norm_eps: LayerNorm epsilon (1e-6 in VideoMAE; HF configs say 1e-12, which is wrong here).
        final_norm: Apply a final LayerNorm (pre-train encoders have ``norm``; fine-tuned mean-pool
            models do not, and the official notebook drops ``fc_norm``).
        grad_checkpointing: Recompute blocks in backward (saves memory when fine-tuning).
    """

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 16
    tubelet_size: int = 2
    img_size: int = 224
    num_frames: int = 16
    in_chans: int = 3
    use_pos_embed: bool = True
    drop_path_rate: float = 0.0
    norm_eps: float = 1e-6
    final_norm: bool = False
    grad_checkpointing: bool = False

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (T', H', W') after the tubelet embedding."""
        side = self.img_size // self.patch_size
        return self.num_frames // self.tubelet_size, side, side

    @property
    def num_tokens(self) -> int:
        """N = T/2 * H/16 * W/16 (1568 for 16x224x224)."""
        t, h, w = self.grid
        return t * h * w


# One config per name of ``vocab.VIDEOMAE_PRESETS``, in its order.
ENCODER_PRESETS: dict[str, EncoderConfig] = dict(zip(vocab.VIDEOMAE_PRESETS, (
    EncoderConfig(embed_dim=32, depth=2, num_heads=2),  # tiny: for tests and the CPU smoke sweep
    EncoderConfig(embed_dim=384, depth=12, num_heads=6),  # vit_small
    EncoderConfig(embed_dim=768, depth=12, num_heads=12),  # vit_base
    # vit_large: VideoMAE ViT-L/16 as frozen by the official code (official_spec.md 1, 4.1).
    EncoderConfig(embed_dim=1024, depth=24, num_heads=16),
), strict=True))


def encoder_config(name: str | EncoderConfig, **overrides: object) -> EncoderConfig:
    """Resolve a preset name (or pass a config through) and apply field overrides.

    Raises:
        ValueError: Unknown preset name or unknown field.
    """
    return resolve_preset("encoder", name, ENCODER_PRESETS, **overrides)


def sinusoid_table(num_positions: int, dim: int) -> torch.Tensor:
    """VideoMAE's fixed 1D sinusoid position table, shape (1, N, C)."""
    position = torch.arange(num_positions, dtype=torch.float64)[:, None]
    exponent = 2 * (torch.arange(dim) // 2).to(torch.float64) / dim
    angles = position / torch.pow(10000.0, exponent)[None, :]  # (N, C)
    table = torch.empty_like(angles)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.to(torch.float32)[None]


class QVBiasAttention(Attention):
    """timm ``Attention`` with VideoMAE's bias layout: ``q_bias`` and ``v_bias``, no key bias.

    The key bias is identically zero in VideoMAE; keeping it out of the parameters makes state-dict
    keys and parameter counts identical to the original checkpoints.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kwargs: object) -> None:
        super().__init__(dim, num_heads=num_heads, qkv_bias=False, **kwargs)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(self.attn_dim))
            self.v_bias = nn.Parameter(torch.zeros(self.attn_dim))
        else:
            self.q_bias = self.v_bias = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Self-attention over tokens ``x`` (B, N, C) -> (B, N, C)."""
        B, N, _ = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d)
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.attn_drop.p if self.training else 0.0,
        )
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)  # (B, N, C)
        return self.proj_drop(self.proj(x))


class TubeletEmbed(nn.Module):
    """Conv3d patch embedding: (B, 3, T, H, W) -> (B, N, C) in (t, h, w) raster order."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a clip."""
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class ClipEncoder(nn.Module):
    """What every encoder family shares: freezing, and checking the clip it is given.

    Subclasses set ``self.cfg`` (with ``in_chans``, ``num_frames``, ``img_size``) and ``self.frozen``.
    """

    cfg: EncoderConfig
    frozen: bool = False

    def freeze(self, frozen: bool = True) -> ClipEncoder:
        """Freeze (the official code's choice) or unfreeze all weights; a frozen encoder stays in eval mode."""
        self.frozen = frozen
        self.requires_grad_(not frozen)
        if frozen:
            super().train(False)
        return self

    def train(self, mode: bool = True) -> ClipEncoder:
        """Switch mode, except that a frozen encoder never leaves eval mode (no dropout/drop-path)."""
        return super().train(mode and not self.frozen)

    def check_clip(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """The clip as (B, 3, T, H, W), validated against the config.

        Raises:
            ValueError: An unknown layout, or a clip whose channels, frames or size differ from the config's.
        """
        if layout == "BTHWC":
            x = x.permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W)
        elif layout != "BCTHW":
            raise ValueError(f"layout must be 'BCTHW' or 'BTHWC', got {layout!r}")
        _, C, T, H, W = x.shape
        expected = (self.cfg.in_chans, self.cfg.num_frames, self.cfg.img_size, self.cfg.img_size)
        if (C, T, H, W) != expected:
            raise ValueError(f"encoder expects clips of (C, T, H, W) = {expected}, got {(C, T, H, W)}")
        return x


class VideoMAEEncoder(ClipEncoder):
    """VideoMAE ViT encoder: clip -> (B, N, C) tokens (no pooling, no head)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = TubeletEmbed(cfg)
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_tokens, cfg.embed_dim), persistent=False)
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path=dpr[i],
                  norm_layer=norm, attn_layer=QVBiasAttention)
            for i in range(cfg.depth)
        )
        self.norm = norm(cfg.embed_dim) if cfg.final_norm else nn.Identity()
        self.frozen = False

    def forward(self, x: torch.Tensor, layout: Layout = "BCTHW") -> torch.Tensor:
        """Encode a normalised clip.

        Args:
            x: Float clip, (B, 3, T, H, W) for ``layout="BCTHW"`` or (B, T, H, W, 3) for ``"BTHWC"``.
            layout: Axis order of ``x``; made explicit because T and C can both be small.

        Returns:
            Tokens (B, N, C), N = T/2 * H/16 * W/16.
        """
        x = self.patch_embed(self.check_clip(x, layout))  # (B, N, C)
        if self.cfg.use_pos_embed:
            x = x + self.pos_embed.to(x.dtype)
        for blk in self.blocks:
            use_ckpt = self.cfg.grad_checkpointing and torch.is_grad_enabled() and not self.frozen
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        return self.norm(x)


def normalize_video(
    video: torch.Tensor,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 frames (B, T, H, W, 3) -> normalised float clip (B, 3, T, H, W)."""
    x = video.to(dtype).div_(255.0).permute(0, 4, 1, 2, 3)  # (B, 3, T, H, W)
    m = torch.tensor(mean, dtype=dtype, device=x.device).view(1, 3, 1, 1, 1)
    s = torch.tensor(std, dtype=dtype, device=x.device).view(1, 3, 1, 1, 1)
    return (x - m) / s


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (optionally only those with ``requires_grad``)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def encoder_flops(cfg: EncoderConfig) -> int:
    """Analytic forward FLOPs of one clip (2 per multiply-add; matmuls and attention only)."""
    n, c = cfg.num_tokens, cfg.embed_dim
    patch = 2 * n * c * cfg.in_chans * cfg.tubelet_size * cfg.patch_size**2
    hidden = int(c * cfg.mlp_ratio)
    per_block = 2 * n * c * 3 * c + 2 * 2 * n * n * c + 2 * n * c * c + 2 * 2 * n * c * hidden
    return patch + cfg.depth * per_block

