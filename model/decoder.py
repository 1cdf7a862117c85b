"""The plug-and-play ViT decoder of Algorithm 1, and the MLP decoder of the MLP variants.

Algorithm 1 (paper section 3.2)::

    K, V = Norm(Dense(F))              # once per decoder, reused by every layer
    for l in 1..L:
        Q  = Norm(Y);  Z = MHA(Q, K, V)
        Z' = Z + Y;    Y = MLP(Norm(Z')) + Z'

``Dense`` is the projection shared by all decoders (it lives in the architecture); ``Norm`` of the
K/V stream belongs to each decoder, as in the released code (official_spec.md 4.3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.presets import resolve_preset


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of one decoder (and of the shared encoder -> decoder projection).

    Attributes:
        embed_dim: Width D of the decoder stream.
        depth: Number of blocks L.
        num_heads: Attention heads.
        head_dim: Per-head width, decoupled from ``embed_dim`` (the released code uses 3 heads of 256
            on a 256-wide stream, Keras ``key_dim``); None means ``embed_dim // num_heads``.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        drop_rate: Dropout after each MLP layer.
        attn_drop: Dropout on the attention probabilities (Keras MHA ``dropout``).
        mlp_out_act: GELU after the second MLP layer too (a quirk of the released code, 4.3).
        input_dropout: Dropout on encoder tokens before the shared projection (official: 0.3).
        qkv_bias: Biases on the Q/K/V projections (Keras default: yes).
        norm_eps: LayerNorm epsilon.
    """

    embed_dim: int = 512
    depth: int = 5
    num_heads: int = 3
    head_dim: int | None = None
    mlp_ratio: float = 2.0
    drop_rate: float = 0.3
    attn_drop: float = 0.3
    mlp_out_act: bool = True
    input_dropout: float = 0.3
    qkv_bias: bool = True
    norm_eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        """Attention width: heads x per-head width (768 for the official 3 x 256)."""
        return self.num_heads * (self.head_dim or self.embed_dim // self.num_heads)


DECODER_PRESETS: dict[str, DecoderConfig] = {
    # Section 4.2: "the 5-layer, 3-head ViT Decoder", "feature dimension of 512". What the paper does
    # not state follows the released code: Keras key_dim = width per head, MLP 2x, dropout 0.3.
    "paper": DecoderConfig(embed_dim=512, depth=5, num_heads=3, head_dim=512),
    # What the released notebook runs (official_spec.md 4.2-4.3): projection_dim=256, num_heads=3,
    # key_dim=256, transformer_units=512, transformer_layers=3, dropout 0.3 everywhere.
    "official": DecoderConfig(embed_dim=256, depth=3, num_heads=3, head_dim=256),
}


def decoder_config(name: str | DecoderConfig, **overrides: object) -> DecoderConfig:
    """Resolve a preset name (or pass a config through) and apply non-None field overrides.

    Raises:
        ValueError: Unknown preset name or unknown field.
    """
    return resolve_preset("decoder", name, DECODER_PRESETS, **{k: v for k, v in overrides.items() if v is not None})


class CrossAttention(nn.Module):
    """Multi-head attention with queries from one stream and keys/values from another.

    K and V projections are fused into one matmul. Attention is ``F.scaled_dot_product_attention``
    (PyTorch picks the kernel: flash / memory-efficient / cuDNN on CUDA, flash on CPU without
    dropout, the math path otherwise). ``fused_attn = False`` computes the same
    ``dropout(softmax(q k^T / sqrt(d))) v`` as explicit matmuls, as timm's ``Attention`` does:
    the eager reference of benchmarks/decoder_step.py. It is an attribute, not a parameter, so
    checkpoints do not depend on it.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.inner_dim // cfg.num_heads
        self.q = nn.Linear(cfg.embed_dim, cfg.inner_dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.embed_dim, 2 * cfg.inner_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.inner_dim, cfg.embed_dim)
        self.attn_drop = cfg.attn_drop
        self.fused_attn = True

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Attend from ``x`` (B, Nq, D) to ``context`` (B, Nk, D); returns (B, Nq, D)."""
        B, Nq, _ = x.shape
        Nk = context.shape[1]
        q = self.q(x).view(B, Nq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, Nq, d)
        kv = self.kv(context).view(B, Nk, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (2, B, h, Nk, d)
        k, v = kv.unbind(0)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.fused_attn:
            z = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, h, Nq, d)
        else:
            attn = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)  # (B, h, Nq, Nk)
            z = F.dropout(attn, dropout_p, self.training) @ v  # (B, h, Nq, d)
        return self.proj(z.transpose(1, 2).reshape(B, Nq, -1))  # (B, Nq, D)


class DecoderMlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear [-> GELU] -> Dropout (exact-erf GELU, as Keras)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        hidden = int(cfg.embed_dim * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.out_act = cfg.mlp_out_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP token-wise."""
        x = self.drop(F.gelu(self.fc1(x)))
        x = self.fc2(x)
        return self.drop(F.gelu(x) if self.out_act else x)


class ViTDecoderBlock(nn.Module):
    """One layer of Algorithm 1: pre-norm cross-attention and MLP, two residuals."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.attn = CrossAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = DecoderMlp(cfg)

    def forward(self, y: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Update the query stream ``y`` (B, N, D) against normalised ``kv`` (B, Nk, D)."""
        z = y + self.attn(self.norm1(y), kv)  # Z' = MHA(Norm(Y), K, V) + Y
        return z + self.mlp(self.norm2(z))  # Y = MLP(Norm(Z')) + Z'


class ViTDecoder(nn.Module):
    """Algorithm 1: ``depth`` blocks; K/V normalised once and reused by every block."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.kv_norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.blocks = nn.ModuleList(ViTDecoderBlock(cfg) for _ in range(cfg.depth))

    def forward(self, y: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """Decode query stream ``y`` (B, N, D) against projected encoder tokens ``kv`` (B, Nk, D)."""
        kv = self.kv_norm(kv)
        for blk in self.blocks:
            y = blk(y, kv)
        return y


class MLPDecoderBlock(nn.Module):
    """A token-wise residual MLP layer: Y = MLP(Norm(Y)) + Y."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)
        self.mlp = DecoderMlp(cfg)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the residual MLP."""
        return y + self.mlp(self.norm(y))


class MLPDecoder(nn.Module):
    """The MLP decoder of the paper's MLP variants (Table 1): no attention, token-wise MLP blocks.

    Same call signature as :class:`ViTDecoder` so architectures can swap them; ``kv`` is unused.
    """

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MLPDecoderBlock(cfg) for _ in range(cfg.depth))

    def forward(self, y: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        """Decode ``y`` (B, N, D) -> (B, N, D)."""
        for blk in self.blocks:
            y = blk(y)
        return y


def vit_decoder_flops(cfg: DecoderConfig, num_tokens: int, kv_tokens: int | None = None) -> int:
    """Analytic forward FLOPs of one :class:`ViTDecoder` on one clip (2 per multiply-add)."""
    n, m, d, inner = num_tokens, kv_tokens or num_tokens, cfg.embed_dim, cfg.inner_dim
    hidden = int(d * cfg.mlp_ratio)
    attn = 2 * n * d * inner + 2 * m * d * 2 * inner + 2 * 2 * n * m * inner + 2 * n * inner * d
    mlp = 2 * 2 * n * d * hidden
    return cfg.depth * (attn + mlp)


def mlp_decoder_flops(cfg: DecoderConfig, num_tokens: int) -> int:
    """Analytic forward FLOPs of one :class:`MLPDecoder` on one clip."""
    return cfg.depth * 2 * 2 * num_tokens * cfg.embed_dim * int(cfg.embed_dim * cfg.mlp_ratio)
