"""Decoder training step: cascaded ViT decoders + heads on encoder tokens, against an eager baseline.

One step = forward of ``MTCAEModel.forward_tokens`` on cached encoder tokens (B, N, C), the
multi-task loss, backward, and an AdamW update of every trainable parameter (the shared projection,
three decoders, three heads). That is what a feature-cache trial runs per batch.

Baseline: the same weights run by :func:`baseline_forward_tokens`, a straightforward eager float32
implementation (explicit ``softmax(Q K^T / sqrt(d)) V`` attention, probability dropout with
``F.dropout``), with the textbook per-parameter ``AdamW(foreach=False)``.

System: the real model (``F.scaled_dot_product_attention``, see ``model/decoder.py``) with a
multi-tensor AdamW (fused on CUDA), in float32 on CPU (optionally bf16 autocast, reported against
the bf16 matmul peak). Both sides run in the same process, alternated, each under the heap policy
it runs with for real (``StepSetting.retain_heap``).

Analytic FLOPs of one step (:func:`step_flops`): backward costs twice the forward for every trained
matmul (input grad + weight grad), except the shared projection whose input, the frozen encoder's
tokens, needs no gradient: step = 3 x forward(decoders + heads) + 2 x forward(projection).

Findings while tuning (2-core AMD EPYC Zen 4 VM, AVX-512, no AMX, torch 2.14; other jobs shared
the machine, so CPU seconds were compared as well as wall time):

- In CPU time the eager baseline is about as fast as the system for the official preset (~68
  user-seconds per batch-16 step each, once neither pays page faults): MKL's batched matmuls and a
  softmax over warm memory are efficient, while the CPU flash kernel runs its forward at ~95% of
  the fp32 matmul peak but its backward at ~65-80% (it recomputes Q K^T: 5 matmuls where the
  analytic count has 4).
- What separates them is memory: 5.5 vs 9.9 GiB of live heap at batch 16, and with glibc's
  default heap (every block of 32 MiB and up is a fresh mmap) ~3 M vs ~10 M page faults per step.
  On this VM a fault costs several microseconds of guest CPU plus host-side stalls that show only
  in wall time, so wall-clock ratios swung between 1.0x and 3x from run to run with the host's
  memory state. A retained heap (``orchestrator.cpu_heap``, what the trainable runs on CPU)
  removes most of that: the system's step went from ~42-70 s to ~30-46 s wall.
- ``bernoulli_`` (``F.dropout``'s CPU mask, float32 or bf16) costs ~10 ns per element and
  ``rand`` ~3 ns (a serial Mersenne Twister), hence ``model.dropout.keep_mask``: 16 random bits
  per element, four per 64-bit draw, one vectorised compare (~2 ns in all). Splitting the fused ``kv``
  projection into two matmuls (no dK/dV re-packing copy) measured no different (official b4, paper
  b1) and was dropped. bf16 autocast: matmuls 2.3x faster, CPU flash attention ~1.1x, hence
  ``model.attention.ChunkedAttention`` for bf16 on CPU. Its first version ran float32
  log-softmax, exp and casts over every block of scores (~35% of its time); one fused
  ``softmax`` each way and the fused softmax backward brought that to ~15% and the bf16 step at
  batch 4 from 5.4 s to 4.45 s. A ragged last query block (1568 = 6 x 256 + 32) cost ~10%, hence
  equal blocks (4 x 392). In float32 the flash kernel stays ~10% faster than the chunked path
  (it fuses the element-wise work), also for heads of 512. foreach AdamW 6 ms vs fused 12 ms;
  2 threads = 2 cores.
  Transparent huge pages for PyTorch's allocations (``THP_MEM_ALLOC_ENABLE=1``) made steps slower
  here (compaction). ``torch.compile`` of ``forward_tokens`` (official, batch 2) took 350 s to
  compile under load and its steps were 0.75x-1.03x of eager's time: not used.
"""

from __future__ import annotations

import copy
import logging
import math
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    PeakMemory,
    Result,
    default_device,
    dtype_name,
    error_result,
    glibc_default_heap,
    heap_retention,
    make_result,
    matmul_peak_flops,
    prefault_heap,
    release_heap,
    summarize_times,
    time_call,
)
from model import ModelConfig, MTCAEModel, MTCAEOutput, MultiTaskLoss, build_model, decoder_config
from model.decoder import DecoderConfig, ViTDecoder
from model.encoder import EncoderConfig
from model.heads import TaskHead

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]

NOTES = (
    "Rows named attn_drop0.3 run the presets as trained (the released code's dropout 0.3 on the "
    "attention probabilities). PyTorch has no fused CPU attention kernel with dropout (its math "
    "path keeps the B x h x N x N probabilities and mask of every layer), so on CPU the decoders run "
    "model.attention.ChunkedAttention there: no N x N matrix, the masks redrawn in backward, in "
    "float32 ~1.45x the eager baseline in CPU time at batch 4. On CUDA the flash / memory-efficient "
    "kernels apply the dropout inside the kernel. DecoderConfig(attn_drop=0.0) (rows named "
    "attn_drop0) lets float32 CPU training use PyTorch's flash kernel: a different regulariser, the "
    "same architecture and weights.",
    "On CPU the fused kernel's gain is memory, not arithmetic: in CPU seconds the eager baseline's "
    "batched matmuls and softmax are about as fast (see cpu_time_ratio), while its N x N tensors "
    "double the live memory and, with glibc's default heap, page-fault gigabytes of fresh memory "
    "every step (see page_faults and system_cpu_s). How much wall time that costs depends on the "
    "machine and, on a VM, on the host: the wall-clock ratio of the same code varied between about "
    "1x and 3x across runs on the reference VM.",
    "Heap policy: rows without a suffix run each side as it runs for real: the system as the "
    "trainable runs a CPU trial (orchestrator.cpu_heap.retained_heap, TrialConfig.cpu_heap='retain': "
    "malloc keeps freed memory for reuse, the CPU analogue of CUDA's caching allocator; its heap is "
    "pre-faulted, untimed, as a long run's already is), the baseline as a plain PyTorch process "
    "(glibc's default). The speed-up therefore includes the allocator policy, which is part of "
    "the system. Rows named default_heap run the system (and, when measured, the baseline) on "
    "glibc's default, both_retained_heap both sides retained: they separate the two effects.",
    "bf16 rows: the system under CPU autocast (TrialConfig.precision='bf16'), the baseline in "
    "float32 as always (a bf16 row after the float32 row of the same shape reuses that row's "
    "baseline measurement instead of repeating it), reported against the bf16 matmul peak. Without AMX PyTorch's CPU flash "
    "kernel gains ~1.1x from bf16 while oneDNN's bf16 matmuls gain ~2.3x, so on CPU the decoders "
    "run bf16 attention in query blocks of large batched matmuls (model.attention.ChunkedAttention: "
    "no N x N matrix, one fused softmax pass each way with float32 inside, float32 gradient "
    "accumulation; its matmuls run at ~90% of the bf16 peak). The step's fraction of the bf16 peak "
    "stays below the float32 step's of the float32 peak because the element-wise work (softmax "
    "passes over the scores, LayerNorm, GELU, dropout, autocast casts) does not get faster with bf16 "
    "while the matmuls get 2.2x faster, and backward recomputes Q K^T (7 products counted as 6).",
    "The paper preset in float32 gains less over the eager baseline on CPU (1.1x-1.5x at batch "
    "1-2) than the official one: with heads of 512 the baseline's softmax grows with N^2 while its matmuls grow with N^2 x "
    "head width, so it is a small share of its work, and MKL's batched matmuls are as fast as the "
    "flash kernel, whose backward recomputes Q K^T.",
    "torch.compile is not used: compiling the step took minutes on a 2-core CPU and the compiled "
    "step was not reliably faster than eager (see the module docstring).",
)

# Issue 7 targets: the step against the eager fp32 baseline (CPU fp32; CUDA with bf16), and the
# achieved fraction of the same machine's dense matmul FLOP/s (CPU, batch 16).
TARGET_SPEEDUP = {"cpu": 1.75, "cuda": 3.0}
TARGET_FRACTION_OF_PEAK = 0.75


@dataclass(frozen=True)
class StepSetting:
    """One decoder-step configuration.

    Attributes:
        decoder: Decoder preset (``official`` | ``paper``) or a config.
        batch_size: Clips per step (16 in the paper and the released code).
        attn_drop: Attention-probability dropout; None keeps the preset's (0.3 for both presets).
        precision: ``fp32`` or ``bf16`` (autocast) for the system side; the baseline is always fp32.
        encoder_dim: Encoder token width C (1024 for VideoMAE ViT-L).
        num_frames: Clip length T; with ``img_size`` it fixes N = T/2 * (S/16)^2 (1568).
        img_size: Frame size S.
        num_classes: Expression classes K.
        rounds: Timed steps per side (alternated; each also measures peak memory).
        bracket: One more system step after the last round, so that every baseline step sits
            between two system steps (S B S B S ...). The speed-up then divides each baseline step
            by the mean of the system steps either side of it, which cancels a linear drift in the
            machine's speed (a shared VM's drifts by ~10% over a minute), and reports the median
            over rounds; without it, the fastest baseline step over the fastest system step. The
            fraction of peak uses the fastest system step either way.
        warmup: One untimed step per side first (optimizer state, library start-up, and the
            retained heap filled); without it, on CPU a retained heap is pre-faulted to twice the
            estimated need instead: seconds instead of a step, removing most (not all) of the
            first step's page faults.
        retain_heap: The CPU heap policy (``orchestrator.cpu_heap``). None (default): each side
            as it runs for real: the system as the trainable runs a CPU trial (freed memory
            retained for reuse, ``TrialConfig.cpu_heap="retain"``), the baseline as a plain PyTorch
            process (glibc's default policy). True: both sides retained. False: both on glibc's
            default, under which every block of 32 MiB and up is page-faulted afresh on every
            step. A retaining side's heap is pre-faulted before each of its steps (untimed) when
            the other side does not retain (its steps hand the memory back), or when there is
            no warm-up step; a side on glibc's default starts each step from a trimmed heap
            (untimed), so it does not run on the other side's resident memory.
        sides: What to run: both, or ``("system",)`` for a fraction-of-peak figure alone.
    """

    decoder: str | DecoderConfig = "official"
    batch_size: int = 16
    attn_drop: float | None = None
    precision: Precision = "fp32"
    encoder_dim: int = 1024
    num_frames: int = 16
    img_size: int = 224
    num_classes: int = 7
    rounds: int = 2
    bracket: bool = False
    warmup: bool = True
    retain_heap: bool | None = None
    sides: tuple[str, ...] = ("system", "baseline")

    @property
    def label(self) -> str:
        """Short name used in result names: preset, batch, precision, effective attention dropout."""
        name = self.decoder if isinstance(self.decoder, str) else "custom"
        label = f"{name}/b{self.batch_size}/{self.precision}/attn_drop{self.decoder_cfg().attn_drop:g}"
        return label + {None: "", True: "/both_retained_heap", False: "/default_heap"}[self.retain_heap]

    def baseline_key(self) -> StepSetting:
        """What the baseline's measurement depends on: this setting but for the system's precision
        and how many steps are timed. A bf16 row shares the float32 row's baseline (the baseline
        runs float32 either way) instead of paying another minute for the same numbers."""
        return replace(self, precision="fp32", rounds=1, bracket=False)

    def side_retains_heap(self, side: str) -> bool:
        """Whether ``side`` (``system`` | ``baseline``) runs on a retained heap (see ``retain_heap``)."""
        return side == "system" if self.retain_heap is None else self.retain_heap

    def decoder_cfg(self) -> DecoderConfig:
        """The decoder config with the attention-dropout override applied."""
        return decoder_config(self.decoder, attn_drop=self.attn_drop)

    def model_config(self) -> ModelConfig:
        """A cascaded model whose encoder has no blocks: only its width and token count matter here."""
        enc = EncoderConfig(embed_dim=self.encoder_dim, depth=0, num_heads=1, num_frames=self.num_frames,
                            img_size=self.img_size)
        return ModelConfig(encoder=enc, decoder=self.decoder_cfg(), num_frames=self.num_frames,
                           img_size=self.img_size, num_classes=self.num_classes)


# --------------------------------------------------------------------------------------------------
# The straightforward baseline


def _eager_attention(block_attn: nn.Module, cfg: DecoderConfig, x: torch.Tensor, context: torch.Tensor,
                     training: bool) -> torch.Tensor:
    """Textbook cross-attention on ``block_attn``'s weights; materialises the (B, h, N, Nk) matrix."""
    B, N, _ = x.shape
    h = cfg.num_heads
    d = cfg.inner_dim // h
    q = F.linear(x, block_attn.q.weight, block_attn.q.bias).view(B, N, h, d).transpose(1, 2)  # (B, h, N, d)
    kv = F.linear(context, block_attn.kv.weight, block_attn.kv.bias)  # (B, Nk, 2 h d)
    k, v = kv.view(B, -1, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, Nk, d)
    scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d)  # (B, h, N, Nk)
    probs = F.dropout(torch.softmax(scores, dim=-1), cfg.attn_drop, training)
    z = torch.matmul(probs, v).transpose(1, 2).reshape(B, N, h * d)  # (B, N, h d)
    return F.linear(z, block_attn.proj.weight, block_attn.proj.bias)


def _eager_decoder(dec: ViTDecoder, cfg: DecoderConfig, y: torch.Tensor, kv: torch.Tensor,
                   training: bool) -> torch.Tensor:
    """Algorithm 1 written out with functional ops on ``dec``'s weights."""
    kv = F.layer_norm(kv, (cfg.embed_dim,), dec.kv_norm.weight, dec.kv_norm.bias, cfg.norm_eps)
    for blk in dec.blocks:
        a = F.layer_norm(y, (cfg.embed_dim,), blk.norm1.weight, blk.norm1.bias, cfg.norm_eps)
        z = y + _eager_attention(blk.attn, cfg, a, kv, training)
        m = F.layer_norm(z, (cfg.embed_dim,), blk.norm2.weight, blk.norm2.bias, cfg.norm_eps)
        m = F.dropout(F.gelu(F.linear(m, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), cfg.drop_rate, training)
        m = F.linear(m, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        m = F.dropout(F.gelu(m) if cfg.mlp_out_act else m, cfg.drop_rate, training)
        y = z + m
    return y


def _eager_head(head: TaskHead, y: torch.Tensor, training: bool) -> torch.Tensor:
    dim = (y.shape[-1],)
    if head.order == "norm_pool":
        pooled = F.layer_norm(y, dim, head.norm.weight, head.norm.bias, head.norm.eps).mean(dim=1)
    else:
        pooled = F.layer_norm(y.mean(dim=1), dim, head.norm.weight, head.norm.bias, head.norm.eps)
    return F.linear(F.dropout(pooled, head.drop.p, training), head.fc.weight, head.fc.bias)


def baseline_forward_tokens(model: MTCAEModel, tokens: torch.Tensor) -> MTCAEOutput:
    """``model.forward_tokens`` for ViT-decoder architectures, written the straightforward eager way.

    Reads ``model``'s weights by their state-dict names, so it computes the same function as the
    real model (bit-for-bit up to float rounding in eval mode) with none of its kernel choices.

    Raises:
        ValueError: ``model`` has no ViT decoders (the baseline covers the attention path only).
    """
    if model.arch.decoder_kind != "vit":
        raise ValueError(f"the decoder-step baseline needs a ViT-decoder architecture, got {model.arch.name!r}")
    cfg, training = model.cfg.decoder_cfg(), model.training
    B = tokens.shape[0]
    proj = F.linear(F.dropout(tokens, cfg.input_dropout, training), model.proj.weight)  # (B, N, D)
    feats = {"tokens": tokens, "proj": proj}
    for name, source in model.arch.stages:
        feats[name] = _eager_decoder(model.decoders[name], cfg, feats[source], proj, training)
    out = {task: _eager_head(model.heads[task], feats[src], training) for task, src in model.arch.heads}
    T = model.cfg.num_frames
    return MTCAEOutput(logits=out["expr"], boxes=out["box"].view(B, T, 4),
                       landmarks=out["landmark"].view(B, T, 5, 2))


# --------------------------------------------------------------------------------------------------
# FLOPs and memory estimates


def step_flops(model: MTCAEModel, num_tokens: int, batch_size: int) -> int:
    """Analytic FLOPs of one training step (matmuls and attention; 2 FLOPs per multiply-add).

    ``model.decoder_flops`` is the forward per clip: the shared projection ``2 N C D``, per decoder
    layer ``Q: 2 N D I``, ``K/V: 2 N D 2I``, ``QK^T and PV: 2 x 2 N N I``, ``out: 2 N I D``,
    ``MLP: 2 x 2 N D H`` (I = heads x head width, H = MLP width), and the heads. Backward: twice the
    forward (grad of inputs + grad of weights), except for the projection whose input is the frozen
    encoder's output (weight grad only). The optimizer's element-wise work is not counted.
    """
    enc = model.encoder.cfg
    proj = 2 * num_tokens * enc.embed_dim * model.cfg.decoder_cfg().embed_dim
    forward = model.decoder_flops(num_tokens)
    return batch_size * (3 * (forward - proj) + 2 * proj)


def attention_matrix_bytes(setting: StepSetting, num_tokens: int) -> int:
    """Bytes of one layer's full fp32 attention matrix for the batch: B x h x N x N x 4."""
    return setting.batch_size * setting.decoder_cfg().num_heads * num_tokens**2 * 4


def estimated_baseline_bytes(setting: StepSetting, num_tokens: int, attention_matrices: bool = True) -> int:
    """Rough peak of the eager baseline (the system needs less): per layer the activations kept for
    backward, the softmax output and, with dropout, the float keep-mask and the dropped
    probabilities too (3 decoders x depth layers), plus the batch of encoder tokens."""
    cfg = setting.decoder_cfg()
    per_layer = attention_matrix_bytes(setting, num_tokens) * (3 if cfg.attn_drop > 0 else 1) * attention_matrices
    tokens = setting.batch_size * num_tokens * setting.encoder_dim * 4
    # Kept for backward per token and layer: 5 D-wide (norm inputs/outputs, residuals), 4 I-wide
    # (Q, K, V, attention output), 3 H-wide (MLP activation, its dropout mask, GELU input) floats.
    hidden = int(cfg.embed_dim * cfg.mlp_ratio)
    activations = setting.batch_size * num_tokens * 4 * (5 * cfg.embed_dim + 4 * cfg.inner_dim + 3 * hidden)
    return 3 * cfg.depth * (per_layer + activations) + tokens


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on the device: ``MemAvailable`` on CPU (Linux), free CUDA memory on GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------------------------------
# The step


def _fake_batch(setting: StepSetting, num_tokens: int, device: torch.device, gen: torch.Generator
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    B, T = setting.batch_size, setting.num_frames
    tokens = torch.randn(B, num_tokens, setting.encoder_dim, generator=gen)
    batch = {
        "label": torch.randint(0, setting.num_classes, (B,), generator=gen),
        "boxes": torch.rand(B, T, 4, generator=gen),
        "landmarks": torch.rand(B, T, 5, 2, generator=gen),
        "valid": torch.ones(B, T, dtype=torch.bool),
    }
    return tokens.to(device), {k: v.to(device) for k, v in batch.items()}


def _adamw(params: list[nn.Parameter], device: torch.device, fast: bool) -> torch.optim.Optimizer:
    """The released code's optimiser (AdamW, lr 1e-3, weight decay 1e-3).

    System: the fused kernel on CUDA; on CPU the multi-tensor (``foreach``) update, which measured
    about twice as fast as the fused CPU kernel for these ~10M parameters (6 vs 12 ms; either is
    well under 1% of a step). Baseline: the per-parameter loop.
    """
    kwargs: dict[str, Any] = {"lr": 1e-3, "weight_decay": 1e-3}
    if fast and device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = fast
    return torch.optim.AdamW(params, **kwargs)


class StepRunner:
    """A model, its optimizer and a fixed batch; ``step()`` runs one training step.

    Args:
        model: The model (its trainable parameters are optimised).
        forward: ``tokens -> MTCAEOutput``, the real ``forward_tokens`` or the eager baseline.
        tokens: Encoder tokens (B, N, C).
        batch: Loss targets.
        fast_optimizer: Multi-tensor AdamW (fused on CUDA) for the system, or the per-parameter
            loop for the baseline.
        autocast_dtype: Run forward and loss under CPU/CUDA autocast with this dtype (None: off).
    """

    def __init__(self, model: MTCAEModel, forward: Any, tokens: torch.Tensor, batch: dict[str, torch.Tensor],
                 fast_optimizer: bool, autocast_dtype: torch.dtype | None = None) -> None:
        self.model, self.forward, self.tokens, self.batch = model.train(), forward, tokens, batch
        self.optimizer = _adamw(model.trainable_parameters(), tokens.device, fast_optimizer)
        self.autocast_dtype = autocast_dtype
        self.loss_fn = MultiTaskLoss()
        self.last_loss = float("nan")

    def step(self) -> None:
        """Forward, loss, backward, AdamW update."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.tokens.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                            enabled=self.autocast_dtype is not None):
            loss = self.loss_fn(self.forward(self.tokens), self.batch)["loss"]
        loss.backward()
        self.optimizer.step()
        self.last_loss = float(loss.detach())


def build_runners(setting: StepSetting, device: torch.device, seed: int = 0
                  ) -> tuple[StepRunner, StepRunner, MTCAEModel, int]:
    """System and baseline runners on identical initial weights and the same batch.

    Returns:
        ``(system, baseline, model, num_tokens)``.
    """
    torch.manual_seed(seed)
    model = build_model("cascaded_vit", setting.model_config()).to(device)
    twin = copy.deepcopy(model)
    num_tokens = model.encoder.cfg.num_tokens
    tokens, batch = _fake_batch(setting, num_tokens, device, torch.Generator().manual_seed(seed))
    autocast = torch.bfloat16 if setting.precision == "bf16" else None
    system = StepRunner(model, model.forward_tokens, tokens, batch, fast_optimizer=True, autocast_dtype=autocast)
    baseline = StepRunner(twin, lambda x: baseline_forward_tokens(twin, x), tokens, batch, fast_optimizer=False)
    return system, baseline, model, num_tokens


@dataclass
class Side:
    """One side of the comparison and what its timed steps measured."""

    runner: StepRunner
    retain_heap: bool
    prefault_bytes: int = 0
    wall_s: list[float] = field(default_factory=list)
    cpu_per_thread_s: list[float] = field(default_factory=list)
    page_faults: list[int] = field(default_factory=list)
    system_cpu_s: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None

    def step(self, device: torch.device, record: bool = True) -> None:
        """One step under this side's heap policy; records wall and CPU time, page faults, memory."""
        if device.type == "cpu":
            heap_retention(self.retain_heap)
            if self.retain_heap and self.prefault_bytes:
                prefault_heap(self.prefault_bytes)  # untimed: a long run's heap is already resident
            elif not self.retain_heap:
                release_heap()  # untimed: not the other side's resident memory, as in a plain process
        before, cpu_start = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
        with PeakMemory(device) as mem:
            wall = time_call(self.runner.step, device)
        after = resource.getrusage(resource.RUSAGE_SELF)
        if not record:
            return
        self.wall_s.append(wall)
        self.cpu_per_thread_s.append((time.process_time() - cpu_start) / torch.get_num_threads())
        self.page_faults.append(after.ru_minflt - before.ru_minflt)
        self.system_cpu_s.append(after.ru_stime - before.ru_stime)
        if mem.peak_bytes is not None:
            self.peak_memory_bytes = max(self.peak_memory_bytes or 0, mem.peak_bytes)


def time_steps(sides: dict[str, Side], device: torch.device, rounds: int, warmup: bool,
               between_rounds: Callable[[], object] | None = None, bracket: str | None = None) -> None:
    """Warm-up steps if asked, then alternated timed steps; glibc's default heap, released, after.

    Args:
        between_rounds: Called (untimed) after every round but the last: the matmul-peak probe, so
            that the peak is sampled across the steps' time span, not only at its ends.
        bracket: The side that takes one more step after the last round (``StepSetting.bracket``).
    """
    try:
        if warmup:
            for side in sides.values():
                side.step(device, record=False)
        for i in range(rounds):
            for side in sides.values():
                side.step(device)
            if between_rounds is not None and i < rounds - 1:
                between_rounds()
        if bracket is not None:
            sides[bracket].step(device)
    finally:
        if device.type == "cpu":
            heap_retention(False)
            release_heap()


def run_setting(setting: StepSetting, device: torch.device, peak_size: int | None = None,
                shared_baseline: dict[str, Any] | None = None) -> list[Result]:
    """Measure one setting: speed ratio vs the baseline and fraction of the matmul peak.

    Args:
        setting: What to measure.
        device: Where.
        peak_size: Matmul size of the peak probe (tests pass a small one).
        shared_baseline: The baseline's numbers from a setting with the same
            :meth:`StepSetting.baseline_key` measured earlier in this run; the baseline is then
            not run again.

    Returns:
        ``decoder_step/<label>`` (speed-up; only when the baseline is measured or shared) and
        ``decoder_step/<label>/fraction_of_peak``.

    Raises:
        MemoryError: The step (the eager baseline's, if measured) would not fit in free memory.
    """
    num_tokens = setting.model_config().encoder_cfg().num_tokens
    need, free = estimated_baseline_bytes(setting, num_tokens), available_memory_bytes(device)
    if free is not None and need > 0.8 * free:
        raise MemoryError(f"the eager baseline of {setting.label} would need ~{need / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB available; run it on a bigger machine")
    system, baseline, model, num_tokens = build_runners(setting, device)
    peak_dtype = torch.bfloat16 if setting.precision == "bf16" else torch.float32
    peaks = [matmul_peak_flops(device, peak_dtype, peak_size)]
    if device.type == "cpu":
        glibc_default_heap()  # a known starting point, whatever ran before in this process
    runners = {"system": system, "baseline": baseline}
    measured = [name for name in ("system", "baseline")  # alternated in this order
                if name in setting.sides and not (name == "baseline" and shared_baseline is not None)]
    sides = {name: Side(runners[name], setting.side_retains_heap(name)) for name in measured}
    mixed = len({side.retain_heap for side in sides.values()}) > 1
    for name, side in sides.items():
        if device.type == "cpu" and side.retain_heap and (mixed or not setting.warmup):
            heap_need = estimated_baseline_bytes(setting, num_tokens, attention_matrices=name == "baseline")
            # Twice the estimated live peak: the heap fragments (posix_memalign cannot reuse a freed
            # block for a request of the same size), bounded by what the machine has free.
            side.prefault_bytes = int(min(2 * heap_need, 0.6 * free)) if free is not None else 2 * heap_need
    bracket = setting.bracket and len(sides) == 2
    time_steps(sides, device, setting.rounds, setting.warmup,
               between_rounds=lambda: peaks.append(matmul_peak_flops(device, peak_dtype, peak_size)),
               bracket="system" if bracket else None)
    peaks.append(matmul_peak_flops(device, peak_dtype, peak_size))
    peak = max(peaks)  # the best probe before, between and after the steps: conditions they ran under
    flops = step_flops(model, num_tokens, setting.batch_size)
    raw = {name: _side_numbers(side, setting.batch_size, flops) for name, side in sides.items()}
    if "baseline" in sides:  # what caps the speed-up: the baseline's own share of the float32 peak
        fp32_peak = peak if setting.precision == "fp32" else matmul_peak_flops(device, torch.float32, peak_size)
        raw["baseline"]["fraction_of_fp32_peak"] = raw["baseline"]["flop_per_s"] / fp32_peak
    elif shared_baseline is not None and "baseline" in setting.sides:
        raw["baseline"] = {**shared_baseline, "shared": "measured with the float32 row of the same shape"}
    cfg = setting.decoder_cfg()
    described = {**asdict(replace(setting, decoder=setting.label.split("/")[0])), "num_tokens": num_tokens,
                 "attn_drop_effective": cfg.attn_drop, "device": str(device)}
    name = f"decoder_step/{setting.label}"
    achieved = raw["system"]["flop_per_s"]
    summary = f"{achieved / 1e9:.1f} of {peak / 1e9:.1f} {setting.precision} GFLOP/s"
    if "baseline" in raw:
        summary += f"; eager baseline at {raw['baseline']['fraction_of_fp32_peak']:.2f} of the fp32 peak"
    results = [make_result(
        f"{name}/fraction_of_peak", achieved / peak, TARGET_FRACTION_OF_PEAK, summary=summary,
        achieved_flop_per_s=achieved, matmul_peak_flop_per_s=peak, matmul_peak_samples=len(peaks),
        peak_dtype=dtype_name(peak_dtype),
        setting=described, **({} if "baseline" in raw else {"system": raw["system"], "step_flops": flops}))]
    if "baseline" in raw:
        cpu_ratio = min(raw["baseline"]["cpu_per_thread_s"]) / min(raw["system"]["cpu_per_thread_s"])
        speedup, method = _speedup(raw["system"]["samples_s"], raw["baseline"]["samples_s"], bracket)
        results.insert(0, make_result(
            name, speedup, TARGET_SPEEDUP.get(device.type, TARGET_SPEEDUP["cpu"]),
            summary=_speed_summary(raw, cpu_ratio), setting=described, speedup_method=method,
            attention_path=attention_path(cfg, device, setting.precision), step_flops=flops, **raw,
            cpu_time_ratio=cpu_ratio, attention_matrix_bytes_per_layer=attention_matrix_bytes(setting, num_tokens)))
    return results


def _speedup(system_s: list[float], baseline_s: list[float], bracket: bool) -> tuple[float, str]:
    """The speed-up and how it was computed (see ``StepSetting.bracket``)."""
    if not bracket:
        return min(baseline_s) / min(system_s), "fastest baseline step / fastest system step"
    ratios = [b / ((system_s[i] + system_s[i + 1]) / 2) for i, b in enumerate(baseline_s)]
    return (statistics.median(ratios),
            "median over rounds of each baseline step / the mean of the system steps either side of it")


def _speed_summary(raw: dict[str, dict[str, Any]], cpu_ratio: float) -> str:
    """One line: throughput, CPU-time ratio, live memory and page faults of both sides."""
    sys_, base = raw["system"], raw["baseline"]
    line = f"{sys_['clips_per_s']:.3g} vs {base['clips_per_s']:.3g} clips/s; CPU time {cpu_ratio:.2f}x"
    if sys_["peak_memory_bytes"] is not None and base["peak_memory_bytes"] is not None:
        line += f"; peak {sys_['peak_memory_bytes'] / 2**30:.2f} vs {base['peak_memory_bytes'] / 2**30:.2f} GiB"
    if sys_["page_faults"] and base["page_faults"]:
        line += f"; page faults {min(sys_['page_faults']) / 1e6:.2f}M vs {min(base['page_faults']) / 1e6:.2f}M"
    return line


def _side_numbers(side: Side, batch_size: int, flops: int) -> dict[str, Any]:
    """Raw numbers of one side: times (best is used), throughput, memory, page faults, final loss."""
    stats = summarize_times(side.wall_s)
    return {**stats, "clips_per_s": batch_size / stats["best_s"], "flop_per_s": flops / stats["best_s"],
            "peak_memory_bytes": side.peak_memory_bytes, "cpu_per_thread_s": side.cpu_per_thread_s,
            "page_faults": side.page_faults, "system_cpu_s": side.system_cpu_s,
            "retained_heap": side.retain_heap, "loss": side.runner.last_loss}


def attention_path(cfg: DecoderConfig, device: torch.device, precision: Precision) -> str:
    """Which SDPA implementation a training step takes (PyTorch's dispatch rules, stated)."""
    if device.type == "cpu" and (cfg.attn_drop > 0 or precision == "bf16"):
        return (f"query-chunked {precision} matmuls (model.attention.ChunkedAttention, no N x N matrix"
                + (", dropout masks redrawn in backward)" if cfg.attn_drop > 0 else ")"))
    if device.type == "cpu":
        return "flash (fused CPU kernel, no N x N matrix)"
    return f"fused CUDA kernel (flash / memory-efficient / cuDNN), {precision}"


def quick_settings() -> list[StepSetting]:
    """What ``--quick`` measures on a 2-core CPU in a few minutes.

    The targets' shape (official preset, batch 16, 1568 tokens) with fused attention
    (``attn_drop=0``), each side under the heap policy it runs with for real (the system as the
    trainable: retained; the baseline: glibc's default), in float32 as S B S (``bracket``: the
    machine's speed drifts by ~10% over a minute on a shared VM, where one 31-36 s step measured
    0.89 of the peak and the next 0.76, so one sample decides too much) and with bf16 autocast
    (``precision="bf16"``: query-chunked bf16 attention, ``model.attention``; one step, against
    the float32 row's baseline, see :meth:`StepSetting.baseline_key`);
    the preset as trained (attention dropout 0.3: chunked attention on CPU) at batch 4 (1.9x at
    batch 8 in a separate run; at batch 16 its eager baseline, which keeps probabilities and
    masks, needs ~17 GiB); the paper preset in
    both precisions at batch 2, to stay within 10 minutes (at batch 16 its eager baseline needs
    ~23 GiB). Batch 2 rather than 1: with 3 heads, batch 1 gives PyTorch's CPU flash backward
    (parallel over batch x heads) 3 work items for 2 threads, and the baseline's 30 MB score blocks
    stay below glibc's mmap threshold; at batch 2, as at 16, the threads are balanced and the
    blocks are page-faulted as in a real run. No warm-up steps: a
    retained heap is pre-faulted instead, and on glibc's default heap every step page-faults its
    large blocks afresh, so the first step is the steady state up to one-off costs (optimizer
    state, thread pools already started by the matmul-peak probe) that are small against a step
    of seconds to a minute.
    """
    return [
        StepSetting("official", batch_size=16, attn_drop=0.0, rounds=1, bracket=True, warmup=False),
        StepSetting("official", batch_size=16, attn_drop=0.0, rounds=1, warmup=False, precision="bf16"),
        StepSetting("official", batch_size=4, rounds=1, warmup=False),
        StepSetting("paper", batch_size=2, attn_drop=0.0, rounds=1, warmup=False),
        StepSetting("paper", batch_size=2, attn_drop=0.0, rounds=1, warmup=False, precision="bf16"),
    ]


def full_settings(device: torch.device) -> list[StepSetting]:
    """Both presets at batch 16, fused (``attn_drop=0``) and as trained, two bracketed rounds
    (S B S B S); bf16 on CUDA (its target); on CPU both precisions (bf16 against the float32 rows'
    baselines), and the official preset with both sides on a retained heap and on glibc's default."""
    precisions: tuple[Precision, ...] = ("bf16",) if device.type == "cuda" else ("fp32", "bf16")
    settings = [StepSetting(preset, batch_size=16, attn_drop=drop, precision=precision, bracket=True)
                for precision in precisions for preset in ("official", "paper") for drop in (0.0, None)]
    if device.type == "cpu":
        settings += [StepSetting("official", batch_size=16, attn_drop=0.0, retain_heap=True, bracket=True),
                     StepSetting("official", batch_size=16, attn_drop=0.0, retain_heap=False, bracket=True)]
    return settings


def run(quick: bool, device: torch.device | None = None, settings: list[StepSetting] | None = None,
        peak_size: int | None = None) -> list[Result]:
    """Run the decoder-step benchmark.

    Args:
        quick: The few-minute CPU configuration.
        device: Defaults to CUDA when available.
        settings: Override what is measured (tests pass a toy setting).
    """
    device = device or default_device()
    settings = settings if settings is not None else (quick_settings() if quick else full_settings(device))
    results: list[Result] = []
    baselines: dict[StepSetting, dict[str, Any]] = {}
    for setting in settings:
        log.info("decoder step %s", setting.label)
        try:
            rows = run_setting(setting, device, peak_size, shared_baseline=baselines.get(setting.baseline_key()))
            if "baseline" in rows[0] and "shared" not in rows[0]["baseline"]:
                baselines[setting.baseline_key()] = rows[0]["baseline"]
            results += rows
        except (MemoryError, RuntimeError) as exc:  # one setting too big for this machine
            log.error("decoder step %s failed: %s", setting.label, exc)
            results.append(error_result(f"decoder_step/{setting.label}", exc))
    return results
