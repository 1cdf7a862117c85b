"""Dropout keep-masks that are cheap to draw on CPU, and the decoders' :class:`Dropout`.

PyTorch's CPU dropout draws its mask with ``bernoulli_`` (~10 ns per element on the 2-core machine
of benchmarks/report.md, float32 or bf16), and ``torch.rand`` costs ~3 ns: CPU generators are a
serial Mersenne Twister. :func:`keep_mask` draws 16 random bits per element instead, four elements
per 64-bit draw, and compares them with a threshold in one vectorised, multi-threaded pass: ~2 ns
per element in all.

The drop probability is thereby rounded to a multiple of 2^-16 (0.3 becomes 0.3000031), and kept
elements are scaled by ``1 / (1 - p)`` of that rounded ``p``, so the expectation is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # one int16 of random bits per element


def drop_threshold(p: float) -> tuple[int, float]:
    """``(threshold, p_used)``: an element is dropped when its int16 of random bits is below ``threshold``."""
    dropped = min(_LEVELS, max(0, round(p * _LEVELS)))
    return dropped - _LEVELS // 2, dropped / _LEVELS


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """A float32 mask of ``shape``: 0 with probability ``p`` (rounded to 2^-16), else ``1 / (1 - p)``.

    Args:
        shape: Mask shape.
        p: Drop probability in [0, 1).
        generator: Random source (default: the global generator of ``device``).
        device: Where the mask lives.
    """
    threshold, p_used = drop_threshold(p)
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)  # all 64 bits uniform (random_() leaves the sign bit 0)
    bits = words.view(torch.int16)[:numel].view(shape)
    return (bits >= threshold).mul(1.0 / (1.0 - p_used)) if p_used < 1.0 else torch.zeros(shape, device=device)


class Dropout(nn.Dropout):
    """``nn.Dropout`` with :func:`keep_mask` on CPU; same distribution (to 2^-16), same module API.

    Each element is kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``, as in
    ``F.dropout``; the decoder step applies dropout to every MLP activation
    (benchmarks/decoder_step.py), where ``F.dropout`` cost ~5-7% of a CPU step. bf16 activations are
    scaled in float32 and rounded once. On CUDA (and for p in {0, 1}) it is ``F.dropout`` out of
    place, CUDA's fused kernel.

    ``inplace=True`` *allows* overwriting the input (done on the CPU path): for fresh activations
    that autograd does not keep, such as a GELU's output, it saves an allocation and a pass.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Drop elements of ``x`` in training mode."""
        if (not self.training or not 0.0 < self.p < 1.0 or x.device.type != "cpu"
                or x.dtype not in (torch.float32, torch.bfloat16)):
            return F.dropout(x, self.p, self.training)
        keep = keep_mask(x.shape, self.p, device=x.device)
        if self.inplace:
            return x.mul_(keep)
        return x * keep if x.dtype == keep.dtype else (x * keep).to(x.dtype)
