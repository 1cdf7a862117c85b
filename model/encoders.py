"""The encoder families behind one name space: a preset name -> its config -> its encoder.

``vocab.VIDEOMAE_PRESETS`` are plain VideoMAE ViTs (``model.encoder``, the paper's encoder family);
``vocab.LGI_FORMER_PRESETS`` are MAE-DFER's LGI-Former (``model.lgi_former``). ``LGIFormerConfig``
is an ``EncoderConfig`` and both encoders are ``ClipEncoder`` subclasses, so one signature serves
both families. Both return (B, N, C) tokens: the decoders, heads and feature cache do not care
which one runs.
"""

from __future__ import annotations

from model.encoder import (
    ClipEncoder,
    EncoderConfig,
    VideoMAEEncoder,
    encoder_config,
    encoder_flops,
)
from model.lgi_former import (
    LGI_FORMER_PRESETS,
    LGIFormerConfig,
    LGIFormerEncoder,
    lgi_former_config,
    lgi_former_flops,
)


def resolve_encoder_config(name: str | EncoderConfig, **overrides: object) -> EncoderConfig:
    """The config of a preset of either family (or a config passed through), overrides applied.

    Raises:
        ValueError: Unknown preset name or field.
    """
    if isinstance(name, LGIFormerConfig) or name in LGI_FORMER_PRESETS:
        return lgi_former_config(name, **overrides)
    return encoder_config(name, **overrides)


def build_encoder(cfg: EncoderConfig) -> ClipEncoder:
    """The encoder module of a resolved config."""
    return LGIFormerEncoder(cfg) if isinstance(cfg, LGIFormerConfig) else VideoMAEEncoder(cfg)


def any_encoder_flops(cfg: EncoderConfig) -> int:
    """Analytic forward FLOPs of one clip for either family."""
    return lgi_former_flops(cfg) if isinstance(cfg, LGIFormerConfig) else encoder_flops(cfg)
