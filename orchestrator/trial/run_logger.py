"""A trial's MLflow run: which run it logs to, under which tags and params."""

from __future__ import annotations

import logging
import os

import torch

from model.decoder import decoder_config
from orchestrator.tracking import TrialLogger
from orchestrator.trial.config import RUNTIME_KEYS, TRACKING_KEYS, TrialConfig
from orchestrator.trial.device import describe_device, resolve_device

logger = logging.getLogger(__name__)


def make_trial_logger(cfg: TrialConfig, device: torch.device | None = None) -> TrialLogger | None:
    """The trial's MLflow logger: ``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else None.

    Args:
        cfg: The trial config.
        device: The device the trial trains on, tagged ``device`` on every start (default
            :func:`resolve_device`).
    """
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        logger.info("no tracking URI: not logging to MLflow")
        return None
    tags = {"dataset": cfg.dataset, "arch": cfg.arch, "fold": cfg.fold, "sweep": cfg.sweep,
            "stage": cfg.stage, "config_hash": cfg.config_hash}
    tags |= {f"runtime.{k}": v for k, v in cfg.to_flat().items()
             if k in RUNTIME_KEYS - TRACKING_KEYS - set(tags) and v is not None}
    tracker = TrialLogger(uri, cfg.experiment, cfg.resolved_trial_key, cfg.run_name, tags, resolved_params(cfg),
                          parent_run_id=cfg.parent_run_id)
    # Set on every start, not only at creation: a restored trial may continue on another node.
    tracker.set_tags({"device": describe_device(device or resolve_device())})
    return tracker


# TrialConfig's decoder_* overrides -> the DecoderConfig field whose resolved value they log as.
_DECODER_FIELDS = {"decoder_dim": "embed_dim", "decoder_depth": "depth", "decoder_heads": "num_heads",
                   "decoder_head_dim": "head_dim", "decoder_mlp_ratio": "mlp_ratio", "decoder_dropout": "drop_rate"}


def resolved_params(cfg: TrialConfig) -> dict[str, object]:
    """The hyperparameters a trial actually used, as MLflow params.

    Runtime keys (paths, worker counts, sweep bookkeeping) are tags (``runtime.*``), not params; a
    ``decoder_*`` left to its preset logs the preset's value, never ``None``; an unset optional
    setting (no encoder checkpoint: the seeded random init) is left out.
    """
    params = cfg.hparams()
    preset = decoder_config(cfg.decoder)
    for key, field in _DECODER_FIELDS.items():
        if params.get(key) is None:
            params[key] = getattr(preset, field)
    if params.get("decoder_head_dim") is None:  # the preset splits the width over the heads
        params["decoder_head_dim"] = params["decoder_dim"] // params["decoder_heads"]
    return {k: v for k, v in params.items() if v is not None}
