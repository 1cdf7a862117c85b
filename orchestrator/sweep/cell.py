"""The sweep's trial wrapper: Tune config -> flat trial config -> trainable.

Every sweep trial runs :func:`run_cell`, which Ray pickles by reference, so it stays a top-level
function of this module. :class:`CellContext` carries what a trial needs besides its Tune config
(sweep name, stage, fixed settings, chosen configurations, MLflow parents).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vocab
from orchestrator import tracking
from orchestrator.hashing import stable_hash

FINAL_MARKER = tracking.RESULT_METRIC  # reported by the trainable only at the natural end of a trial
RECORDED_MARKER = "recorded_before"  # in the report of a trial whose result MLflow held: nothing ran
_TUNE_KEYS = frozenset({"study", "dataset", "arch", "fold", "config_index"})


def group_key(dataset: str, arch: str) -> str:
    """``"<dataset>__<arch>"``: the Optuna study name and the key of a group everywhere."""
    return f"{dataset}__{arch}"


@dataclass(frozen=True)
class CellContext:
    """Everything a trial needs besides its Tune config; shipped to workers once per Tuner.

    Attributes:
        trainable: The trial function (``train_trial(flat_config)``) or ``"module:function"``.
        stage: ``"search"`` or ``"cv"``.
        sweep: Sweep name.
        n_folds: Number of CV folds of the data.
        cache_root: Absolute folder holding ``<dataset>/`` preprocessing caches.
        fixed: Fixed trial settings of the search space.
        chosen: Group key -> chosen searched values (stage ``cv``).
        tracking_uri: MLflow tracking URI every trial logs to.
        experiment: MLflow experiment name.
        group_runs: Group key -> MLflow run id of the group's parent run.
        select_metric: The space's ``metric``: every trial selects its tested epoch on it.
        folds_files: Dataset -> the sweep's folds file (every trial reads its fold from it).
        selection: The space's selection protocol (None when nothing is searched).
    """

    trainable: Callable[[dict], Any] | str
    stage: str
    sweep: str
    n_folds: int
    cache_root: str
    fixed: Mapping[str, Any]
    chosen: Mapping[str, Mapping[str, Any]]
    tracking_uri: str
    experiment: str
    group_runs: Mapping[str, str]
    select_metric: str = vocab.DEFAULT_SELECTION_METRIC
    folds_files: Mapping[str, str] = field(default_factory=dict)
    selection: str | None = None

    def trial_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The flat trial config of one Tune trial (only keys the trainable accepts)."""
        dataset, arch, fold = config["dataset"], config["arch"], int(config["fold"])
        key = group_key(dataset, arch)
        searched = {k: v for k, v in config.items() if k not in _TUNE_KEYS}
        if self.stage == vocab.STAGE_CV:
            searched = {**self.chosen.get(key, {}), **searched}
        hyper = {**self.fixed, **searched}
        digest = stable_hash({**hyper, "dataset": dataset, "arch": arch}, 8)
        if self.stage == vocab.STAGE_SEARCH:
            digest = f"c{int(config['config_index']):03d}-{digest}"
        return {
            **hyper,
            "dataset": dataset, "arch": arch, "fold": fold, "n_folds": self.n_folds,
            "cache_dir": str(Path(self.cache_root) / dataset),
            "sweep": self.sweep, "stage": self.stage, "select_metric": self.select_metric,
            "folds_file": self.folds_files.get(dataset),
            "tracking_uri": self.tracking_uri, "experiment": self.experiment,
            "parent_run_id": self.group_runs.get(key),
            "trial_key": f"{self.sweep}/{self.stage}/{dataset}/{arch}/{digest}/f{fold}",
        }

    def resolve_trainable(self) -> Callable[[dict], Any]:
        """The trial function, importing it when given as ``"module:function"``."""
        if callable(self.trainable):
            return self.trainable
        module, _, name = self.trainable.partition(":")
        return getattr(importlib.import_module(module), name)


def run_cell(config: dict, context: CellContext) -> None:
    """Tune function trainable of every sweep trial: build the flat config, run the trainable.

    The trainable reports to Tune itself (``tune.report`` per epoch, with a checkpoint) and resumes
    from ``tune.get_checkpoint()``; this wrapper only adds the sweep's bookkeeping keys.
    """
    # One INFO line per checkpoint from Ray's storage layer would drown the trainable's own log.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    flat = context.trial_config(config)
    recorded = tracking.recorded_result(context.tracking_uri, context.experiment, flat["trial_key"])
    if recorded is not None:  # finished before a driver restart: report its record, train nothing
        from ray import tune

        logging.getLogger(__name__).info("trial %s finished before; reporting its MLflow record",
                                         flat["trial_key"])
        tune.report({**recorded, RECORDED_MARKER: 1.0})
        return
    context.resolve_trainable()(flat)
