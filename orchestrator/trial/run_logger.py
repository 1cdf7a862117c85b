"""A trial's MLflow run: which run it logs to, under which tags and params."""

from __future__ import annotations

import logging
import os

import torch

from orchestrator.tracking import TrialLogger
from orchestrator.trial.config import TRACKING_KEYS, TrialConfig
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
    params = {k: v for k, v in cfg.to_flat().items() if k not in TRACKING_KEYS}
    tracker = TrialLogger(uri, cfg.experiment, cfg.resolved_trial_key, cfg.run_name, tags, params,
                          parent_run_id=cfg.parent_run_id)
    # Set on every start, not only at creation: a restored trial may continue on another node.
    tracker.set_tags({"device": describe_device(device or resolve_device())})
    return tracker
