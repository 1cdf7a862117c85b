"""What a trial will cost where it runs: analytic FLOPs, a measured matmul rate, a memory floor.

The paper's preset (VideoMAE ViT-L, 1568 tokens per clip) is a GPU workload: on a CPU one epoch
over a handful of clips takes minutes and many GB. :func:`warn_if_heavy_on_cpu` says so before
the trial starts, with an estimate, instead of leaving a progress bar at 0.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

import vocab
from model import MTCAEModel
from model.encoders import any_encoder_flops

logger = logging.getLogger(__name__)

BACKWARD_FACTOR = 3  # forward + backward of a trained layer is about 3x its forward FLOPs


@dataclass(frozen=True)
class TrialCost:
    """A trial's compute and memory, estimated before it runs.

    Attributes:
        flops: Total FLOPs: encoding every clip (once with the feature cache, else every epoch)
            plus training and evaluating the decoders for every epoch.
        seconds: ``flops`` at the measured matmul rate (a lower bound: nothing runs at peak).
        peak_bytes: Weights plus one batch's encoder activations (a floor for the process's memory).
    """

    flops: float
    seconds: float
    peak_bytes: float


def matmul_rate(device: torch.device, size: int = 1024, seconds: float = 0.2) -> float:
    """Float32 matmul FLOP/s measured on ``device`` for about ``seconds``."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * size**3 * count / (time.perf_counter() - start)


def estimate_cost(model: MTCAEModel, clips: dict[str, int], epochs: int, batch_size: int,
                  feature_cache: bool, rate: float) -> TrialCost:
    """The :class:`TrialCost` of training ``model`` for ``epochs`` on ``clips`` (split -> count)."""
    enc = model.encoder.cfg
    per_clip_encoder = any_encoder_flops(enc)
    total_clips = sum(clips.values())
    encoding = per_clip_encoder * total_clips * (1 if feature_cache else epochs)
    decoding = model.decoder_flops() * (BACKWARD_FACTOR * clips.get("train", 0)
                                        + clips.get("val", 0)) * epochs
    flops = float(encoding + decoding)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    n, c = enc.num_tokens, enc.embed_dim
    # One attention matrix per head and a few (N, 4C) MLP activations per clip of a batch.
    activations = batch_size * 4 * (enc.num_heads * n * n + 8 * n * c)
    return TrialCost(flops, flops / rate, float(weights + activations))


def warn_if_heavy_on_cpu(model: MTCAEModel, encoder: str, clips: dict[str, int], epochs: int,
                         batch_size: int, feature_cache: bool, device: torch.device) -> TrialCost | None:
    """Log a warning with the estimate when a non-small encoder is about to train on a CPU.

    Returns:
        The estimate when one was made (CPU and an encoder outside ``vocab.SMALL_ENCODER_PRESETS``).
    """
    if device.type != "cpu" or encoder in vocab.SMALL_ENCODER_PRESETS:
        return None
    rate = matmul_rate(device)
    cost = estimate_cost(model, clips, epochs, batch_size, feature_cache, rate)
    logger.warning(
        "encoder=%s on a CPU: about %.3g TFLOP for %d epochs on %d clips, at least %s at this "
        "machine's %.0f GFLOP/s matmul rate, and at least %.1f GB of memory. The paper's presets are "
        "sized for a GPU; to try the pipeline here use --set encoder=tiny (or vit_small).",
        encoder, cost.flops / 1e12, epochs, sum(clips.values()), _duration(cost.seconds), rate / 1e9,
        cost.peak_bytes / 1e9)
    return cost


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
