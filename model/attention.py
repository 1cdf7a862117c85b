"""Attention without an N x N matrix: PyTorch's fused kernels, or query chunks on CPU.

:func:`attention` is what the decoders call. It dispatches to ``F.scaled_dot_product_attention``
(CUDA flash / memory-efficient / cuDNN kernels, which also apply dropout; the CPU flash kernel for
float32 without dropout) except on CPU for bfloat16 or with dropout on the probabilities, where it
runs :class:`ChunkedAttention`. (No fused CPU kernel supports that dropout: PyTorch's math path
would keep the (B, h, N, N) probabilities and mask of every layer for backward; the released code
trains with dropout 0.3 there.)

Why: without AMX, PyTorch's CPU flash kernel gains ~1.1x from bf16, while oneDNN's bf16 batched
matmuls run at ~2.3x the float32 ones (AVX512-BF16). :class:`ChunkedAttention` computes attention
one block of queries at a time (equal blocks of at most ``MAX_CHUNK`` rows) with whole-row softmax
(no online rescaling, as each block sees every key), so every product is one large batched matmul
and every element-wise step is one fused PyTorch kernel:

- forward, per block: ``S = Q_c K^T`` (scale folded into Q), ``P = softmax(S)`` (float32 inside,
  stored in the inputs' dtype), ``O_c = P V``; only Q, K and V are kept for backward;
- backward, per block: the same ``S`` and ``P`` again (the same kernels on the same inputs: equal
  bit for bit), ``dV += P^T dO_c``, ``dP = dO_c V^T``, ``dS = P * (dP - rowsum(dP * P))`` in one
  fused softmax-backward pass, ``dQ_c = dS K * scale``, ``dK += dS^T Q_c``, with ``dK``/``dV``
  accumulated in float32;
- with dropout, each block's probabilities are multiplied by a keep mask
  (:func:`model.dropout.keep_mask`) drawn from a seed (taken from the global RNG, so
  ``torch.manual_seed`` reproduces it) plus the block index, and backward draws the same mask
  again instead of keeping it; ``rowsum(dP * P)`` of the undropped ``P`` is still the right term.

Live memory is O(B h chunk N) for the block's scores instead of O(B h N^2); what is kept for
backward is Q, K and V. On a 2-core AVX-512 CPU (official shape, 3 heads of 256, N = 1568, batch
16) the bf16 matmuls run at ~380 GFLOP/s (~90% of the bf16 peak), the element-wise passes take ~15%
of the time, and forward + backward is ~1.6x the float32 flash kernel; in float32 the flash kernel
stays ~10% ahead (it fuses the element-wise work into its blocks). Results match float32 attention
to bf16 rounding (~0.9% relative error on random inputs, as for bf16 inputs to any kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.dropout import keep_mask

MAX_CHUNK = 512  # query rows per block; blocks are made equal (1568 -> 4 x 392): a ragged last block runs slowly


def even_chunk(num_queries: int, max_chunk: int = MAX_CHUNK) -> int:
    """The block size splitting ``num_queries`` into the fewest equal blocks of at most ``max_chunk``."""
    blocks = max(1, -(-num_queries // max_chunk))
    return -(-num_queries // blocks)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """``dropout(softmax(q k^T / sqrt(d))) v`` for (B, h, N, d) tensors, never holding an N x N matrix.

    CUDA, and float32 on CPU without dropout: ``F.scaled_dot_product_attention`` (fused kernels).
    CPU with bf16, or with dropout on the probabilities (which no fused CPU kernel supports: PyTorch's
    math path would hold the (B, h, N, N) probabilities and mask for every layer):
    :class:`ChunkedAttention`.
    """
    if q.device.type == "cpu" and (q.dtype == torch.bfloat16 or dropout_p > 0.0):
        seed = int(torch.randint(0, 2**62, (1,)).item()) if dropout_p > 0.0 else 0  # global RNG: reproducible
        return ChunkedAttention.apply(q, k, v, even_chunk(q.shape[-2]), dropout_p, seed)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)


def _keep_mask(shape: torch.Size, dropout_p: float, seed: int, device: torch.device) -> torch.Tensor:
    """:func:`model.dropout.keep_mask` drawn from ``seed`` (so backward can draw it again)."""
    return keep_mask(shape, dropout_p, torch.Generator(device=device).manual_seed(seed), device)


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
        kt = k.transpose(-1, -2)
        for block, i in enumerate(range(0, q.shape[-2], chunk)):
            p = torch.softmax(torch.matmul(qs[..., i:i + chunk, :], kt), dim=-1)  # float32 inside, one pass
            if dropout_p > 0.0:
                p.mul_(_keep_mask(p.shape, dropout_p, seed + block, p.device))
            out[..., i:i + chunk, :] = torch.matmul(p, v)
        ctx.save_for_backward(qs, k, v)
        ctx.chunk, ctx.scale, ctx.dropout_p, ctx.seed = chunk, scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # noqa: D102
        qs, k, v = ctx.saved_tensors  # qs = q * scale
        chunk, scale, dropout_p = ctx.chunk, ctx.scale, ctx.dropout_p
        dout = dout.to(qs.dtype).contiguous()
        dq = torch.empty_like(qs)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        kt, vt = k.transpose(-1, -2), v.transpose(-1, -2)
        for block, i in enumerate(range(0, qs.shape[-2], chunk)):
            qc, doc = qs[..., i:i + chunk, :], dout[..., i:i + chunk, :]
            # The same matmul and softmax as forward on the same inputs: the same P, bit for bit.
            p = torch.softmax(torch.matmul(qc, kt), dim=-1)
            dp = torch.matmul(doc, vt)  # dL/d(P M) with dropout mask M, else dL/dP
            if dropout_p > 0.0:
                keep = _keep_mask(p.shape, dropout_p, ctx.seed + block, p.device)
                dv.add_(torch.matmul(p.mul(keep).to(p.dtype).transpose(-1, -2), doc))  # as forward rounded it
                dp.mul_(keep)
            else:
                dv.add_(torch.matmul(p.transpose(-1, -2), doc))
            # P * (dP - rowsum(dP * P)) in one fused pass (float32 inside): dS / scale.
            ds = torch._softmax_backward_data(dp, p, -1, p.dtype)
            dq[..., i:i + chunk, :] = torch.matmul(ds, k).mul_(scale)
            dk.add_(torch.matmul(ds.transpose(-1, -2), qc))  # dS^T Q = (dS / scale)^T (Q * scale)
        return dq, dk.to(k.dtype), dv.to(v.dtype), None, None, None
