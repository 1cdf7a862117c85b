"""MAE-DFER's LGI-Former: a video ViT with local-global interaction blocks (Sun et al., ACM MM 2023).

The token grid (T', H', W') is cut into regions of ``region_size`` tokens; each region carries one
learned messenger ("region") token. A block is, in order (MAE-DFER ``LGBlock`` with its released
settings ``first_attn_type='self'``, ``third_attn_type='cross'``):

1. ``first_attn``: self-attention inside each region, over its messenger and its local tokens;
2. ``second_attn``: self-attention among the messenger tokens of a clip (inter-region);
3. ``third_attn``: every local token of the clip attends to all messenger tokens (global
   information injected back into the local tokens);
4. ``mlp`` on every token, messengers included.

Each of the three attentions has its own pre-norm (``*_attn_norm0``; the cross-attention's context
has ``third_attn_norm1``), separate ``q``/``kv`` projections without bias plus ``q_bias``/``v_bias``
(no key bias), and runs through ``F.scaled_dot_product_attention``. Module names are MAE-DFER's
parameter names, so its checkpoints load without renaming (see ``model.checkpoint``).

MAE-DFER's public model (:data:`LGI_FORMER_PRESETS` ``lgi_former_base``): 512-d, depth 16, 8 heads,
16 frames at 160 px, tubelet 2x16x16 -> an (8, 10, 10) grid of 800 tokens, region 2x5x10 -> 8
regions of 100 tokens, 84.9M parameters with the final norm (the pre-training log's 92,760,192
minus its 7,885,440 decoder-side parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from torch import nn
from torch.utils.checkpoint import checkpoint

import vocab
from model.encoder import (
    ClipEncoder,
    EncoderConfig,
    Layout,
    TubeletEmbed,
    sinusoid_table,
)
from model.presets import resolve_preset

Grid = tuple[int, int, int]


@dataclass(frozen=True)
class LGIFormerConfig(EncoderConfig):
    """Shape of an LGI-Former encoder (field names as :class:`~model.encoder.EncoderConfig`).

    Attributes:
        embed_dim: Token width C.
        depth: Number of local-global blocks.
        num_heads: Attention heads of every attention.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: Give every attention ``q_bias`` and ``v_bias`` (MAE-DFER: True).
        region_size: Region (t, h, w) in tokens; must divide :attr:`grid` (MAE-DFER: 2x5x10).
        patch_size: Spatial patch size.
        tubelet_size: Temporal patch size.
        img_size: Input frame size in pixels (square; MAE-DFER: 160).
        num_frames: Input frames T.
        in_chans: Input channels.
        use_pos_embed: Add the fixed sinusoid position table to the local tokens.
        drop_path_rate: Stochastic depth, linear over the blocks (0 for a frozen encoder).
        norm_eps: LayerNorm epsilon (1e-6 in MAE-DFER).
        final_norm: Apply a final LayerNorm to the output tokens (MAE-DFER's pre-training encoder
            has ``norm``; its fine-tuned models do not).
        grad_checkpointing: Recompute blocks in backward.
    """

    embed_dim: int = 512
    depth: int = 16
    num_heads: int = 8
    img_size: int = 160
    qkv_bias: bool = True
    region_size: Grid = (2, 5, 10)

    def __post_init__(self) -> None:
        object.__setattr__(self, "region_size", tuple(int(r) for r in self.region_size))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        region = self.region_size
        if len(region) != 3 or min(region) < 1 or any(g % r for g, r in zip(self.grid, region)):
            raise ValueError(
                f"region_size {self.region_size} must divide the token grid {self.grid} of {self.num_frames} frames "
                f"at {self.img_size} px (tubelet {self.tubelet_size}, patch {self.patch_size}); MAE-DFER's "
                "LGI-Former (region 2x5x10) expects 16 frames at 160 px"
            )

    @property
    def region_grid(self) -> Grid:
        """Regions along (T', H', W') ((4, 2, 1) for MAE-DFER)."""
        return tuple(g // r for g, r in zip(self.grid, self.region_size))  # type: ignore[return-value]

    @property
    def num_regions(self) -> int:
        """R regions, one messenger token each (8 for MAE-DFER)."""
        return math.prod(self.region_grid)

    @property
    def tokens_per_region(self) -> int:
        """S local tokens per region (100 for MAE-DFER)."""
        return math.prod(self.region_size)


# One config per name of ``vocab.LGI_FORMER_PRESETS``, in its order.
LGI_FORMER_PRESETS: dict[str, LGIFormerConfig] = dict(zip(vocab.LGI_FORMER_PRESETS, (
    # lgi_former_tiny: a few tokens for tests and the CPU smoke sweep: 4 frames at 32 px give a
    # (2, 2, 2) grid and 2 regions of 4 tokens; region 2x1x2 divides every grid with even sides.
    LGIFormerConfig(embed_dim=32, depth=2, num_heads=2, region_size=(2, 1, 2), img_size=32, num_frames=4),
    # lgi_former_base: MAE-DFER's released model, vit_base_dim512_no_depth_patch16_160 with --depth 16
    # and --lg_region_size 2 5 10 (scripts/voxceleb2/pretrain_..._102.sh, scripts/dfew/finetune_..._164.sh).
    LGIFormerConfig(),
), strict=True))


def lgi_former_config(name: str | LGIFormerConfig, **overrides: object) -> LGIFormerConfig:
    """Resolve a preset name (or pass a config through) and apply field overrides.

    Raises:
        ValueError: Unknown preset name or field, or a region size that does not divide the grid.
    """
    return resolve_preset("encoder", name, LGI_FORMER_PRESETS, **overrides)


def region_partition(x: torch.Tensor, grid: Grid, region: Grid) -> torch.Tensor:
    """Raster tokens (B, N, C) -> regions (B, R, S, C).

    Regions are ordered (nt, nh, nw) and tokens inside a region (t, h, w), as MAE-DFER's fine-tuning
    model (``'b (nt t nh h nw w) c -> b (nt nh nw) (t h w) c'``). Its pre-training encoder cuts rows of
    ``h * w`` raster tokens instead, the same partition when a region spans the grid's width (2x5x10
    on a 10-wide grid).
    """
    B, _, C = x.shape
    (T, H, W), (t, h, w) = grid, region
    x = x.view(B, T // t, t, H // h, h, W // w, w, C)
    x = x.permute(0, 1, 3, 5, 2, 4, 6, 7)  # (B, nt, nh, nw, t, h, w, C)
    return x.reshape(B, -1, t * h * w, C)  # (B, R, S, C)


def region_merge(x: torch.Tensor, grid: Grid, region: Grid) -> torch.Tensor:
    """Inverse of :func:`region_partition`: regions (B, R, S, C) -> raster tokens (B, N, C)."""
    B, _, _, C = x.shape
    (T, H, W), (t, h, w) = grid, region
    x = x.view(B, T // t, H // h, W // w, t, h, w, C)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7)  # (B, nt, t, nh, h, nw, w, C)
    return x.reshape(B, T * H * W, C)  # (B, N, C)


class ContextAttention(nn.Module):
    """Multi-head attention of ``x`` to a context (itself when none), MAE-DFER's parameter layout.

    ``q`` and ``kv`` are bias-free Linears; the biases are ``q_bias`` and ``v_bias`` (the key bias
    would be softmax-invariant, so MAE-DFER keeps none).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Queries ``x`` (B, N, C) attend to ``context`` (B, M, C) (default ``x``) -> (B, N, C)."""
        B, N, C = x.shape
        context = x if context is None else context
        M = context.shape[1]
        kv_bias = None if self.v_bias is None else torch.cat((torch.zeros_like(self.v_bias), self.v_bias))
        q = F.linear(x, self.q.weight, self.q_bias).view(B, N, self.num_heads, self.head_dim)
        kv = F.linear(context, self.kv.weight, kv_bias).view(B, M, 2, self.num_heads, self.head_dim)
        q, (k, v) = q.transpose(1, 2), kv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, N, d), (B, h, M, d)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class LocalGlobalBlock(nn.Module):
    """One LGI-Former block on regions (B, R, 1 + S, C): per region, its messenger then its S locals.

    Drop-path masks are drawn per (clip, region) for the region-wise steps and per clip for the
    clip-wise ones, as in MAE-DFER, which applies them to its (B*R, ...) and (B, ...) tensors.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_layer: type[nn.Module] | partial = nn.LayerNorm) -> None:
        super().__init__()
        self.first_attn_norm0 = norm_layer(dim)
        self.first_attn = ContextAttention(dim, num_heads, qkv_bias)
        self.second_attn_norm0 = norm_layer(dim)
        self.second_attn = ContextAttention(dim, num_heads, qkv_bias)
        self.third_attn_norm0 = norm_layer(dim)
        self.third_attn_norm1 = norm_layer(dim)
        self.third_attn = ContextAttention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Regions (B, R, 1 + S, C) -> (B, R, 1 + S, C)."""
        B, R, L, C = x.shape
        x = x.flatten(0, 1)  # (B*R, 1+S, C)
        x = x + self.drop_path(self.first_attn(self.first_attn_norm0(x)))  # intra-region
        msg, local = x[:, 0].view(B, R, C), x[:, 1:].reshape(B, R * (L - 1), C)  # (B, R, C), (B, R*S, C)
        msg = msg + self.drop_path(self.second_attn(self.second_attn_norm0(msg)))  # inter-region
        local = local + self.drop_path(self.third_attn(self.third_attn_norm0(local), self.third_attn_norm1(msg)))
        x = torch.cat((msg.view(B * R, 1, C), local.view(B * R, L - 1, C)), dim=1)  # (B*R, 1+S, C)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x.view(B, R, L, C)


class LGIFormerEncoder(ClipEncoder):
    """LGI-Former encoder: clip -> (B, N, C) local tokens (no pooling, no head).

    The same interface as :class:`~model.encoder.VideoMAEEncoder` (``cfg``, ``freeze``, ``frozen``,
    ``forward(x, layout)``). The output is the N local tokens in raster (t, h, w) order, like
    VideoMAE's; the R messenger tokens are dropped, as MAE-DFER's pre-training encoder drops them
    before its decoder (its fine-tuned classifier pools them instead; ``forward_regions`` returns both).
    """

    def __init__(self, cfg: LGIFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = TubeletEmbed(cfg)
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_tokens, cfg.embed_dim), persistent=False)
        self.lg_region_tokens = nn.Parameter(torch.zeros(cfg.num_regions, cfg.embed_dim))
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        norm = partial(nn.LayerNorm, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(
            LocalGlobalBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, dpr[i], norm)
            for i in range(cfg.depth)
        )
        self.norm = norm(cfg.embed_dim) if cfg.final_norm else nn.Identity()
        self.frozen = False
        self.apply(_init_weights)
        trunc_normal_(self.lg_region_tokens, std=0.02)

    def forward(self, x: torch.Tensor, layout: Layout = "BCTHW") -> torch.Tensor:
        """Encode a normalised clip.

        Args:
            x: Float clip, (B, 3, T, H, W) for ``layout="BCTHW"`` or (B, T, H, W, 3) for ``"BTHWC"``.
            layout: Axis order of ``x``.

        Returns:
            Local tokens (B, N, C) in raster (t, h, w) order, N = T/2 * H/16 * W/16.
        """
        return self.forward_regions(x, layout)[0]

    def forward_regions(self, x: torch.Tensor, layout: Layout = "BCTHW") -> tuple[torch.Tensor, torch.Tensor]:
        """Local tokens (B, N, C) and messenger tokens (B, R, C), both through the final norm."""
        x = self.patch_embed(self.check_clip(x, layout))  # (B, N, C)
        if self.cfg.use_pos_embed:
            x = x + self.pos_embed.to(x.dtype)
        B = x.shape[0]
        x = region_partition(x, self.cfg.grid, self.cfg.region_size)  # (B, R, S, C)
        msg = self.lg_region_tokens.to(x.dtype).expand(B, -1, -1).unsqueeze(2)  # (B, R, 1, C)
        x = torch.cat((msg, x), dim=2)  # (B, R, 1+S, C)
        for blk in self.blocks:
            use_ckpt = self.cfg.grad_checkpointing and torch.is_grad_enabled() and not self.frozen
            x = checkpoint(blk, x, use_reentrant=False) if use_ckpt else blk(x)
        local = region_merge(x[:, :, 1:], self.cfg.grid, self.cfg.region_size)  # (B, N, C)
        return self.norm(local), self.norm(x[:, :, 0])


def _init_weights(module: nn.Module) -> None:
    """MAE-DFER fine-tuning init: truncated-normal Linear weights (std 0.02), zero biases."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_lgi_former(cfg: LGIFormerConfig) -> LGIFormerEncoder:
    """The encoder for ``cfg`` (the entry point an encoder registry dispatches to)."""
    return LGIFormerEncoder(cfg)


def _attention_flops(queries: int, keys: int, c: int) -> int:
    """q, kv and output projections plus scores and weighted sum, 2 FLOPs per multiply-add."""
    return 2 * queries * c * c * 2 + 2 * keys * c * 2 * c + 2 * 2 * queries * keys * c


def lgi_former_flops(cfg: LGIFormerConfig) -> int:
    """Analytic forward FLOPs of one clip (2 per multiply-add; matmuls and attention only).

    About 99 GFLOPs (49.6 G multiply-adds) for ``lgi_former_base``; MAE-DFER reports 50G for it
    against 81G for VideoMAE ViT-B at the same 16x160x160 input.
    """
    n, r, c = cfg.num_tokens, cfg.num_regions, cfg.embed_dim
    region_len = cfg.tokens_per_region + 1
    patch = 2 * n * c * cfg.in_chans * cfg.tubelet_size * cfg.patch_size**2
    first = r * _attention_flops(region_len, region_len, c)
    second = _attention_flops(r, r, c)
    third = _attention_flops(n, r, c)
    mlp = 2 * 2 * r * region_len * c * int(c * cfg.mlp_ratio)
    return patch + cfg.depth * (first + second + third + mlp)
