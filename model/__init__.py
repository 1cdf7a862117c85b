"""MTCAE-DFER in PyTorch + timm.

Shape legend used in every docstring and trailing shape comment:
    B batch, T frames (16), H/W frame size (224), N tokens (T/2 * H/16 * W/16 = 1568),
    C encoder width (1024 for ViT-L), D decoder width, h heads, d per-head width, K classes.

Usage::

    from model import build_model, ModelConfig, ARCHITECTURES
    net = build_model("cascaded_vit", ModelConfig(encoder="vit_large", decoder="official",
                                                   encoder_checkpoint="videomae_vitl_k400.pth"))
    out = net(video)            # MTCAEOutput(logits (B,K), boxes (B,T,4), landmarks (B,T,5,2))
"""

from model.architectures import (
    ARCHITECTURE_SPECS,
    ARCHITECTURES,
    TASKS,
    Architecture,
    ModelConfig,
    MTCAEModel,
    MTCAEOutput,
    build_model,
)
from model.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    IncompatibleCheckpointError,
    LoadReport,
    checkpoint_filter_fn,
    load_encoder_checkpoint,
)
from model.decoder import (
    DECODER_PRESETS,
    DecoderConfig,
    MLPDecoder,
    ViTDecoder,
    decoder_config,
)
from model.encoder import (
    ENCODER_PRESETS,
    NORMALIZATIONS,
    EncoderConfig,
    VideoMAEEncoder,
    count_parameters,
    encoder_config,
    normalize_video,
)
from model.heads import TaskHead
from model.losses import MultiTaskLoss, masked_mse
from model.metrics import classification_metrics

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "CheckpointMismatchError",
    "IncompatibleCheckpointError",
    "LoadReport",
    "checkpoint_filter_fn",
    "load_encoder_checkpoint",
    "ARCHITECTURE_SPECS",
    "DECODER_PRESETS",
    "ENCODER_PRESETS",
    "NORMALIZATIONS",
    "TASKS",
    "Architecture",
    "DecoderConfig",
    "EncoderConfig",
    "MLPDecoder",
    "MTCAEModel",
    "MTCAEOutput",
    "ModelConfig",
    "MultiTaskLoss",
    "TaskHead",
    "VideoMAEEncoder",
    "ViTDecoder",
    "build_model",
    "classification_metrics",
    "count_parameters",
    "decoder_config",
    "encoder_config",
    "masked_mse",
    "normalize_video",
]
