"""A trial's MLflow run: which run it logs to, under which tags and params."""

from __future__ import annotations

import logging
import os

from orchestrator.tracking import TrialLogger
from orchestrator.trial.config import TRACKING_KEYS, TrialConfig

logger = logging.getLogger(__name__)


def make_trial_logger(cfg: TrialConfig) -> TrialLogger | None:
    """The trial's MLflow logger: ``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else None."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        logger.info("no tracking URI: not logging to MLflow")
        return None
    tags = {"dataset": cfg.dataset, "arch": cfg.arch, "fold": cfg.fold, "sweep": cfg.sweep,
            "stage": cfg.stage, "config_hash": cfg.config_hash}
    params = {k: v for k, v in cfg.to_flat().items() if k not in TRACKING_KEYS}
    return TrialLogger(uri, cfg.experiment, cfg.resolved_trial_key, cfg.run_name, tags, params,
                       parent_run_id=cfg.parent_run_id)
