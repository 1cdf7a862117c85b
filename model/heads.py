"""Task-specific heads (paper equations 7-9): B, P, E = FC(Pool(Norm(Y)))."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

import vocab

HeadOrder = Literal[vocab.HEAD_ORDERS]


class TaskHead(nn.Module):
    """Norm -> mean pool over tokens -> dropout -> linear.

    ``order="norm_pool"`` follows the paper (eq. 7-9); ``"pool_norm"`` follows the released code,
    which mean-pools first and normalises the pooled vector (official_spec.md 4.5). No output
    activation: boxes and landmarks regress targets in [0, 1], the expression head gives logits.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.1, order: HeadOrder = "norm_pool",
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        if order not in ("norm_pool", "pool_norm"):
            raise ValueError(f"head order must be 'norm_pool' or 'pool_norm', got {order!r}")
        self.order = order
        self.norm = nn.LayerNorm(in_dim, eps=norm_eps)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> (B, out_dim)."""
        if self.order == "norm_pool":
            pooled = self.norm(y).mean(dim=1)  # (B, D)
        else:
            pooled = self.norm(y.mean(dim=1))  # (B, D)
        return self.fc(self.drop(pooled))
