"""From MLflow back to Ray: a Tune callback that tags each trial's MLflow run with where it ran.

Driver side, so the trial package need not change: every trial run (found by its ``trial_key``) gets

* ``ray_trial_id``: the Tune trial id (the name of its folder under the Tune storage path),
* ``ray_node_ip`` and ``ray_hostname``: the node of its latest start (a restored trial may move),
* ``ray_checkpoint_uri``: its latest checkpoint (a local/NFS path, or ``s3://...``),

and a trial whose retries are exhausted has its run marked ``FAILED`` at once, not when the sweep
ends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from ray import tune

from orchestrator import tracking
from orchestrator.sweep.cell import RECORDED_MARKER

logger = logging.getLogger(__name__)

TAG_TRIAL_ID = "ray_trial_id"
TAG_NODE_IP = "ray_node_ip"
TAG_HOSTNAME = "ray_hostname"
TAG_CHECKPOINT = "ray_checkpoint_uri"


class RunLinks(tune.Callback):
    """Tags trial runs with their Ray trial id, node and checkpoint; fails runs whose trial failed.

    Args:
        tracking_uri: The sweep's MLflow URI.
        experiment: The sweep's MLflow experiment name.
        trial_key: Tune config -> the trial's ``trial_key`` (how its run is found).
    """

    def __init__(self, tracking_uri: str, experiment: str, trial_key: Callable[[Mapping[str, Any]], str]) -> None:
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self._trial_key = trial_key
        self._runs: dict[str, str] = {}
        self._tagged: dict[str, tuple[str, str]] = {}
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:  # the Tuner pickles its callbacks; clients do not pickle
        return {**self.__dict__, "_client": None}

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        """Tag trial id and node on a trial's first result from each start."""
        if result.get(RECORDED_MARKER):
            return
        where = (str(result.get("node_ip", "")), str(result.get("hostname", "")))
        if self._tagged.get(trial.trial_id) == where:
            return
        self._set(trial, {TAG_TRIAL_ID: trial.trial_id, TAG_NODE_IP: where[0], TAG_HOSTNAME: where[1]})
        self._tagged[trial.trial_id] = where

    def on_checkpoint(self, iteration: int, trials: list, trial: Any, checkpoint: Any, **info: Any) -> None:
        """Tag the trial's latest checkpoint."""
        self._set(trial, {TAG_CHECKPOINT: checkpoint_uri(checkpoint)})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """The trial failed for good (its retries are spent): its run is FAILED now."""
        run_id = self._run_id(trial)
        if run_id is not None:
            self._guard(lambda: self._mlflow().set_terminated(run_id, status="FAILED"))

    def _set(self, trial: Any, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        run_id = self._run_id(trial)
        if run_id is not None:
            self._guard(lambda: self._mlflow().log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()]))

    def _run_id(self, trial: Any) -> str | None:
        key = self._trial_key(trial.config)
        if key not in self._runs:
            run_id = self._guard(lambda: tracking.find_run_id(self.tracking_uri, self.experiment, key))
            if run_id is None:  # the trainable creates its run before its first report
                return None
            self._runs[key] = run_id
        return self._runs[key]

    def _mlflow(self) -> Any:
        if self._client is None:
            self._client = tracking.make_client(self.tracking_uri)
        return self._client

    @staticmethod
    def _guard(call: Callable[[], Any]) -> Any:
        """A tracking hiccup must not stop the sweep (tags are retried on the next event)."""
        try:
            return call()
        except Exception as err:  # noqa: BLE001
            logger.warning("could not update a trial's MLflow run: %s", err)
            return None


def checkpoint_uri(checkpoint: Any) -> str:
    """A Tune checkpoint's location as a URI: a plain path on local/NFS storage, else ``scheme://path``."""
    kind = getattr(getattr(checkpoint, "filesystem", None), "type_name", "local")
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"
