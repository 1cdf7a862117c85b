"""The paper's six structure strategies (section 4.3, Table 1), built by one function.

Every architecture is the same module, :class:`MTCAEModel`, wired by a routing table: a list of
decoder stages ``(name, query_source)``; each stage decodes its query source against the shared
projected encoder tokens ``proj`` (K/V), and each task head reads one named feature. The
cascade of equations 4-6 is then just ``box <- proj, landmark <- box, expr <- landmark``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import vocab
from model.decoder import (
    DecoderConfig,
    MLPDecoder,
    ViTDecoder,
    decoder_config,
    mlp_decoder_flops,
    vit_decoder_flops,
)
from model.encoder import NORMALIZATIONS, EncoderConfig
from model.encoders import build_encoder, resolve_encoder_config
from model.heads import HeadOrder, TaskHead

TASKS = vocab.TASKS
NUM_LANDMARKS = 5  # left eye, right eye, nose, left mouth corner, right mouth corner (MTCNN order)


@dataclass(frozen=True)
class Architecture:
    """How decoders are wired for one structure strategy.

    Attributes:
        names: The strategy's name and Table 1 labels (``vocab``).
        stages: ``(decoder name, query source)`` in execution order; sources are ``"proj"`` (the
            shared projection of the encoder tokens) or an earlier stage.
        heads: Task -> feature the task head reads.
    """

    names: vocab.ArchitectureName
    stages: tuple[tuple[str, str], ...]
    heads: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        """Registry name."""
        return self.names.name

    @property
    def decoder_kind(self) -> str | None:
        """``"vit"``, ``"mlp"`` or None (STL has no decoder)."""
        return self.names.decoder_kind


_TASK_HEADS = tuple((t, t) for t in TASKS)
_PARALLEL = (("box", "proj"), ("landmark", "proj"), ("expr", "proj"))
_SHARED = (("shared", "proj"), ("box", "shared"), ("landmark", "shared"), ("expr", "shared"))
_CASCADE = (("box", "proj"), ("landmark", "box"), ("expr", "landmark"))  # equations 4-6

# (stages, heads) of each strategy.
_WIRING: dict[str, tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]] = {
    vocab.STL: ((), (("expr", "tokens"),)),
    vocab.NONSHARED_MLP: (_PARALLEL, _TASK_HEADS),
    vocab.NONSHARED_VIT: (_PARALLEL, _TASK_HEADS),
    vocab.SHARED_MLP: (_SHARED, _TASK_HEADS),
    vocab.SHARED_VIT: (_SHARED, _TASK_HEADS),
    vocab.CASCADED_VIT: (_CASCADE, _TASK_HEADS),
}
ARCHITECTURE_SPECS: dict[str, Architecture] = {
    names.name: Architecture(names, *_WIRING[names.name]) for names in vocab.ARCHITECTURE_NAMES
}
ARCHITECTURES: tuple[str, ...] = vocab.ARCHITECTURES


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build any of the six architectures.

    Attributes:
        encoder: Encoder preset name (``vocab.ENCODER_PRESETS``: VideoMAE ViTs and LGI-Formers) or config.
        encoder_checkpoint: Local file with pretrained encoder weights (see ``model.checkpoint``).
        freeze_encoder: Freeze the encoder, as the released code does (303.9M frozen vs 9.8M trained).
        use_pos_embed: Add the sinusoid position table (the official wiring likely skipped it).
        num_classes: Expression classes K.
        num_frames: Frames per clip T (16).
        img_size: Frame size (224).
        decoder: Decoder preset (``paper`` or ``official``) or config.
        head_dropout: Dropout before each head's linear layer (0.1 in the released code).
        head_order: ``norm_pool`` (paper eq. 7-9) or ``pool_norm`` (released code).
        normalization: Input statistics the clip is normalised with before the encoder:
            ``imagenet`` (VideoMAE / MAE-DFER) or ``official`` (std 0.225 on every channel, as the
            released notebook); see :meth:`norm_stats`.
        encoder_overrides: Extra :class:`EncoderConfig` fields (e.g. ``final_norm``).
    """

    encoder: str | EncoderConfig = "vit_large"
    encoder_checkpoint: str | None = None
    freeze_encoder: bool = True
    use_pos_embed: bool = True
    num_classes: int = 7
    num_frames: int = 16
    img_size: int = 224
    decoder: str | DecoderConfig = "paper"
    head_dropout: float = 0.1
    head_order: HeadOrder = "norm_pool"
    normalization: str = "imagenet"
    encoder_overrides: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; expected one of {sorted(NORMALIZATIONS)}")

    def norm_stats(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """(mean, std) per channel for ``model.normalize_video``."""
        return NORMALIZATIONS[self.normalization]

    def encoder_cfg(self) -> EncoderConfig:
        """The resolved encoder config (frame count, size and position switch applied)."""
        return resolve_encoder_config(self.encoder, num_frames=self.num_frames, img_size=self.img_size,
                              use_pos_embed=self.use_pos_embed, **self.encoder_overrides)

    def decoder_cfg(self) -> DecoderConfig:
        """The resolved decoder config."""
        return decoder_config(self.decoder)


@dataclass
class MTCAEOutput:
    """What every architecture returns; STL leaves ``boxes`` and ``landmarks`` as None.

    Attributes:
        boxes: (B, T, 4) face boxes [x, y, w, h] / img_size.
        landmarks: (B, T, 5, 2) points / img_size.
        logits: (B, K) expression logits.
    """

    logits: torch.Tensor
    boxes: torch.Tensor | None = None
    landmarks: torch.Tensor | None = None


class MTCAEModel(nn.Module):
    """Shared encoder (VideoMAE ViT or LGI-Former), routed decoders and task heads."""

    def __init__(self, arch: Architecture, cfg: ModelConfig) -> None:
        super().__init__()
        self.arch, self.cfg = arch, cfg
        enc_cfg, dec_cfg = cfg.encoder_cfg(), cfg.decoder_cfg()
        self.encoder = build_encoder(enc_cfg).freeze(cfg.freeze_encoder)
        self.proj: nn.Module | None = None
        self.decoders = nn.ModuleDict()
        if arch.decoder_kind is not None:
            # One bias-free projection shared by all decoders: K/V source and first query (4.2).
            self.input_drop = nn.Dropout(dec_cfg.input_dropout)
            self.proj = nn.Linear(enc_cfg.embed_dim, dec_cfg.embed_dim, bias=False)
            decoder_cls = ViTDecoder if arch.decoder_kind == "vit" else MLPDecoder
            for name, _ in arch.stages:
                self.decoders[name] = decoder_cls(dec_cfg)
        T = cfg.num_frames
        out_dims = {"box": T * 4, "landmark": T * 2 * 5, "expr": cfg.num_classes}
        self.heads = nn.ModuleDict()
        for task, source in arch.heads:
            in_dim = enc_cfg.embed_dim if source == "tokens" else dec_cfg.embed_dim
            self.heads[task] = TaskHead(in_dim, out_dims[task], cfg.head_dropout, cfg.head_order)

    def encode(self, video: torch.Tensor, layout: str = "BCTHW") -> torch.Tensor:
        """Encoder tokens (B, N, C) of a normalised clip; no graph is built for a frozen encoder."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder.frozen):
            return self.encoder(video, layout=layout)

    def forward_tokens(self, tokens: torch.Tensor) -> MTCAEOutput:
        """Decoders and heads on encoder tokens (B, N, C): the feature-cache training path."""
        B = tokens.shape[0]
        feats = {"tokens": tokens}
        if self.proj is not None:
            feats["proj"] = self.proj(self.input_drop(tokens))  # (B, N, D)
        for name, source in self.arch.stages:
            feats[name] = self.decoders[name](feats[source], feats["proj"])  # (B, N, D)
        out = {task: self.heads[task](feats[source]) for task, source in self.arch.heads}
        T = self.cfg.num_frames
        return MTCAEOutput(
            logits=out["expr"],
            boxes=out["box"].view(B, T, 4) if "box" in out else None,
            landmarks=out["landmark"].view(B, T, NUM_LANDMARKS, 2) if "landmark" in out else None,
        )

    def forward(self, video: torch.Tensor, layout: str = "BCTHW") -> MTCAEOutput:
        """Full model on a normalised clip (B, 3, T, H, W) (or (B, T, H, W, 3) with ``layout``)."""
        return self.forward_tokens(self.encode(video, layout=layout))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser should update (a frozen encoder's are excluded)."""
        return [p for p in self.parameters() if p.requires_grad]

    def decoder_flops(self, num_tokens: int | None = None) -> int:
        """Analytic forward FLOPs per clip of everything after the encoder (projection, decoders, heads)."""
        n = num_tokens or self.encoder.cfg.num_tokens
        c, dec = self.encoder.cfg.embed_dim, self.cfg.decoder_cfg()
        total = sum(2 * h.fc.in_features * h.fc.out_features for h in self.heads.values())
        if self.proj is None:
            return total
        per_decoder = vit_decoder_flops(dec, n) if self.arch.decoder_kind == "vit" else mlp_decoder_flops(dec, n)
        return total + 2 * n * c * dec.embed_dim + len(self.decoders) * per_decoder


def build_model(arch: str, config: ModelConfig | None = None) -> MTCAEModel:
    """Build one of :data:`ARCHITECTURES` and load the encoder checkpoint if the config names one.

    Raises:
        ValueError: Unknown architecture name.
    """
    if arch not in ARCHITECTURE_SPECS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {list(ARCHITECTURES)}")
    config = config or ModelConfig()
    model = MTCAEModel(ARCHITECTURE_SPECS[arch], config)
    if config.encoder_checkpoint:
        from model.checkpoint import load_encoder_checkpoint

        load_encoder_checkpoint(model.encoder, config.encoder_checkpoint)
    return model
