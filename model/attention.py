"""Attention without an N x N matrix: PyTorch's fused kernels, or query chunks on CPU.

:func:`attention` is what the decoders call. It dispatches to ``F.scaled_dot_product_attention``
(CUDA flash / memory-efficient / cuDNN kernels, which also apply dropout; the CPU flash kernel for
float32 without dropout) except on CPU for bfloat16 or with dropout on the probabilities, where it
runs :class:`ChunkedAttention`. (No fused CPU kernel supports that dropout: PyTorch's math path
would keep the (B, h, N, N) probabilities and mask of every layer for backward; the released code
trains with dropout 0.3 there.)

Why: without AMX, PyTorch's CPU flash kernel gains ~1.1x from bf16, while oneDNN's bf16 batched
matmuls run at ~2.3x the float32 ones (AVX512-BF16). :class:`ChunkedAttention` computes attention
one block of ``chunk`` queries at a time with whole-row softmax (no online rescaling, as each block
sees every key), so every product is one large batched matmul:

- forward, per block: ``S = Q_c K^T`` (scale folded into Q; bf16 in, rounded to bf16),
  ``P = exp(log_softmax(S))`` in float32, ``O_c = P V`` (bf16); only ``O`` and the float32
  log-sum-exp rows are kept;
- backward, per block: ``S`` and ``P`` recomputed from ``lse``, then ``dV += P^T dO_c``,
  ``dP = dO_c V^T``, ``dS = P * (dP - rowsum(dO * O)) * scale``, ``dQ_c = dS K``,
  ``dK += dS^T Q_c``, with ``dK``/``dV`` accumulated in float32;
- with dropout, each block's probabilities are multiplied by a keep mask drawn from a seed (taken
  from the global RNG, so ``torch.manual_seed`` reproduces it) plus the block index, and backward
  draws the same mask again instead of keeping it.

Live memory is O(B h chunk N) for the block's scores instead of O(B h N^2); what is kept for
backward is Q, K, V, O and lse, as for the flash kernels. On a 2-core AVX-512 CPU (official shape,
3 heads of 256, N = 1568) forward + backward ran at ~205 GFLOP/s against ~150 for the CPU flash
kernel in float32 and ~130 for an explicit float32 ``softmax(Q K^T) V``; with heads of 512 (paper
preset) ~250. Results match float32 attention to bf16 rounding (~0.6% relative error).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 256


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """``dropout(softmax(q k^T / sqrt(d))) v`` for (B, h, N, d) tensors, never holding an N x N matrix.

    CUDA, and float32 on CPU without dropout: ``F.scaled_dot_product_attention`` (fused kernels).
    CPU with bf16, or with dropout on the probabilities (which no fused CPU kernel supports: PyTorch's
    math path would hold the (B, h, N, N) probabilities and mask for every layer):
    :class:`ChunkedAttention`.
    """
    if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or dropout_p > 0.0):
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0.0 else 0  # global RNG: reproducible
        return ChunkedAttention.apply(q, k, v, DEFAULT_CHUNK, dropout_p, seed)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def _keep_mask(shape: torch.Size, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask scaled by 1 / (1 - p), drawn from ``seed`` (redrawn in backward)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device).ge_(dropout_p).div_(1.0 - dropout_p)


class ChunkedAttention(torch.autograd.Function):
    """Exact attention in blocks of query rows, with large batched matmuls (see the module doc).

    ``apply(q, k, v, chunk, dropout_p=0, seed=0)``: q (B, h, Nq, d), k and v (B, h, Nk, d) of one
    floating dtype; the softmax and the gradient accumulators are float32 whatever that dtype is.
    With ``dropout_p > 0`` each block's probabilities are dropped with a keep mask drawn from
    ``seed + block index``; backward draws the same masks again instead of keeping them.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int,  # noqa: D102
                dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        qs = (q * scale).contiguous()  # the scale on (N, d), not on every (c, N) block of scores
        k, v = k.contiguous(), v.contiguous()
        out = torch.empty_like(qs)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)  # (B, h, Nq)
        kt = k.transpose(-1, -2)
        for block, i in enumerate(range(0, q.shape[-2], chunk)):
            s = torch.matmul(qs[..., i:i + chunk, :], kt)  # (B, h, c, Nk), q's dtype
            log_p = torch.log_softmax(s, dim=-1, dtype=torch.float32)  # one fused pass, float32 out
            lse[..., i:i + chunk] = s[..., 0].float() - log_p[..., 0]  # log_softmax = s - lse
            p = log_p.exp_()
            if dropout_p > 0.0:
                p.mul_(_keep_mask(p.shape, dropout_p, seed + block, p.device))
            out[..., i:i + chunk, :] = torch.matmul(p.to(q.dtype), v)
        ctx.save_for_backward(qs, k, v, out, lse)
        ctx.chunk, ctx.scale, ctx.dropout_p, ctx.seed = chunk, scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        qs, k, v, out, lse = ctx.saved_tensors  # qs = q * scale
        chunk, scale, dropout_p = ctx.chunk, ctx.scale, ctx.dropout_p
        dout = dout.to(qs.dtype).contiguous()
        # rowsum(dO * O) = rowsum(dP * P) also with dropout: O = (P * M) V and dP = (dO V^T) * M.
        delta = (dout.float() * out.float()).sum(-1)  # (B, h, Nq)
        dq = torch.empty_like(qs)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)
        for block, i in enumerate(range(0, qs.shape[-2], chunk)):
            qc, doc = qs[..., i:i + chunk, :], dout[..., i:i + chunk, :]
            p = torch.matmul(qc, kt).float().sub_(lse[..., i:i + chunk, None]).exp_()
            dp = torch.matmul(doc, vt).float()
            if dropout_p > 0.0:
                keep = _keep_mask(p.shape, dropout_p, ctx.seed + block, p.device)
                dv.add_(torch.matmul((p * keep).to(qs.dtype).transpose(-1, -2), doc))
                dp.mul_(keep)
            else:
                dv.add_(torch.matmul(p.to(qs.dtype).transpose(-1, -2), doc))
            ds = p.mul_(dp.sub_(delta[..., i:i + chunk, None])).to(qs.dtype)  # dS / scale
            dq[..., i:i + chunk, :] = torch.matmul(ds, k).mul_(scale)
            dk.add_(torch.matmul(ds.transpose(-1, -2), qc))  # dS^T Q = (dS / scale)^T (Q * scale)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None
