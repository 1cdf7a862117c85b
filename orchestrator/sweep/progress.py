"""The sweep's live progress view: a Tune callback logging per-group status and best scores."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ray import tune

import vocab
from orchestrator.sweep.cell import FINAL_MARKER

logger = logging.getLogger(__name__)


class SweepProgress(tune.Callback):
    """A Tune callback logging a compact per-group view: running / done / failed, best so far.

    Stage ``search`` shows, per group, the best configuration's mean ``metric`` over the folds it has
    finished on all of; stage ``cv`` shows the mean of ``test_uar`` over finished folds. Lines are
    logged when a trial finishes or fails and otherwise at most every ``interval_s`` seconds.
    """

    def __init__(self, sweep: str, stage: str, metric: str, mode: str, folds_per_config: int = 1,
                 interval_s: float = 30.0) -> None:
        self.sweep, self.stage, self.metric, self.mode = sweep, stage, metric, mode
        self.folds_per_config = folds_per_config
        self.interval_s = interval_s
        self._last = 0.0
        self._last_text = ""

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Throttled view."""
        if time.monotonic() - self._last >= self.interval_s:
            self._log(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """View after each finished trial."""
        self._log(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Name the failed trial and its error file, then the view."""
        logger.warning("[%s] trial %s (%s) failed: %s", self.sweep, trial.trial_id,
                       _trial_label(trial.config), trial.error_file or "no error file")
        self._log(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Final view of the stage."""
        self._log(trials, force=True)

    def render(self, trials: Sequence[Any]) -> str:
        """The view as text (one header line, one line per group)."""
        groups: dict[str, list[Any]] = {}
        for trial in trials:
            groups.setdefault(_trial_label(trial.config), []).append(trial)
        if len(groups) == 1:
            (label, members), = groups.items()
            return (f"[{self.sweep}] {self.stage} {label}: {_status_counts(members)}  "
                    f"{self._best_text(members)}").rstrip()
        lines = [f"[{self.sweep}] {self.stage}: {_status_counts(trials)}"]
        for label, members in groups.items():
            lines.append(f"  {label:<28} {_status_counts(members):<44} {self._best_text(members)}".rstrip())
        return "\n".join(lines)

    def _log(self, trials: Sequence[Any], force: bool = False) -> None:
        text = self.render(trials)
        if force or text != self._last_text:
            logger.info("%s", text)
        self._last, self._last_text = time.monotonic(), text

    def _best_text(self, trials: Sequence[Any]) -> str:
        if self.stage == vocab.STAGE_CV:
            values = [_last(t, FINAL_MARKER) for t in trials if t.status == "TERMINATED"]
            values = [v for v in values if v is not None]
            if not values:
                return ""
            return f"mean {FINAL_MARKER} {sum(values) / len(values):.4f} over {len(values)} folds"
        by_config: dict[Any, list[float]] = {}
        for trial in trials:
            value = _best_value(trial, self.metric, self.mode)
            if trial.status == "TERMINATED" and value is not None:
                by_config.setdefault(trial.config.get("config_index"), []).append(value)
        means = {c: sum(v) / len(v) for c, v in by_config.items() if len(v) == self.folds_per_config}
        if not means:
            return ""
        pick = max if self.mode == "max" else min
        index = pick(means, key=means.get)
        return f"best {self.metric} {means[index]:.4f} (config {index}, {self.folds_per_config} folds)"


def _trial_label(config: Mapping[str, Any]) -> str:
    """``dataset/arch``, and ``/f<k>`` for a nested study (one per outer fold)."""
    label = f"{config.get('dataset')}/{config.get('arch')}"
    return label + f"/f{config['fold']}" if str(config.get("study", "")).count("__") == 2 else label


def _status_counts(trials: Sequence[Any]) -> str:
    names = {"RUNNING": "running", "TERMINATED": "done", "ERROR": "failed", "PENDING": "pending",
             "PAUSED": "paused"}
    counts = {label: 0 for label in names.values()}
    for trial in trials:
        counts[names.get(trial.status, "pending")] += 1
    return ", ".join(f"{n} {label}" for label, n in counts.items() if n or label != "paused")


def _last(trial: Any, key: str) -> float | None:
    value = (trial.last_result or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _best_value(trial: Any, metric: str, mode: str) -> float | None:
    stats = (trial.metric_analysis or {}).get(metric)
    return float(stats[mode]) if stats and mode in stats else None
