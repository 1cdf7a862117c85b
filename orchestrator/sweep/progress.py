"""The sweep's live progress: a Tune callback drawing one compact view and one line per trial epoch.

The view says how many trials are done / running / pending / failed (pending counts the trials not
created yet), the elapsed time, an ETA and the best ``metric`` so far per (dataset, arch) group.
Every reported epoch of a trial is a line (trial, epoch/N, train loss, validation metric), so a long
trial is never silent. On a terminal the view is a block rewritten in place below the log (log
records print above it), ending with the latest epoch line of each running trial. Elsewhere
(``ray job logs``, a file) every epoch line is logged, the summary is one line at most every
``interval_s`` seconds, and the full view is logged at the end of the stage.

ETA: the mean wall time of the trials finished in this Tune run times the trials not finished,
divided by the trials running at once (at least one); none before a trial finished.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, Any

from ray import tune

import vocab
from orchestrator.sweep.cell import FINAL_MARKER, RECORDED_MARKER

logger = logging.getLogger(__name__)

_STATUS = {"RUNNING": "running", "TERMINATED": "done", "ERROR": "failed", "PENDING": "pending",
           "PAUSED": "pending"}


class SweepProgress(tune.Callback):
    """A Tune callback: the live view of a stage and one log line per trial epoch.

    Args:
        sweep: Sweep name.
        stage: ``search`` or ``cv``.
        metric: The selection metric (``val_uar``); ``mode`` its direction.
        folds_per_config: Folds a configuration trains on (pooled selection: its score is their mean).
        interval_s: Least seconds between two summary lines (plain output; a terminal redraws every second).
        total: Trials the stage runs at most (trials not created yet count as pending).
        epochs: Epochs of a trial (``epoch k/N`` in the epoch lines).
        stream: Where a terminal view goes (default ``sys.stderr``); plain output goes to the log.
    """

    def __init__(self, sweep: str, stage: str, metric: str, mode: str, folds_per_config: int = 1,
                 interval_s: float = 30.0, total: int | None = None, epochs: int | None = None,
                 stream: IO[str] | None = None) -> None:
        self.sweep, self.stage, self.metric, self.mode = sweep, stage, metric, mode
        self.folds_per_config = folds_per_config
        self.interval_s, self.total, self.epochs = interval_s, total, epochs
        self._stream = stream
        self._start = time.monotonic()
        self._last = 0.0
        self._last_text = ""
        self._durations: dict[str, float] = {}
        self._latest: dict[str, str] = {}
        self._live: _LiveBlock | None = None

    def __getstate__(self) -> dict[str, Any]:  # the Tuner pickles its callbacks; streams do not pickle
        return {**self.__dict__, "_stream": None, "_live": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore, also from the pickle of an older version of this class (a resumed Tune run)."""
        defaults = {"total": None, "epochs": None, "_stream": None, "_live": None, "_durations": {},
                    "_start": time.monotonic(), "_last": 0.0, "_last_text": "", "_latest": {}}
        self.__dict__.update({**defaults, **state})

    # ----------------------------------------------------------------------------- Tune hooks

    def setup(self, **info: Any) -> None:
        """Start the clock; on a terminal, put the view below the log."""
        self._start = time.monotonic()
        stream = self._stream or sys.stderr
        if _is_tty(stream):
            self._live = _LiveBlock(stream)
            self._live.attach()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        """One line per reported epoch, then the (throttled) view."""
        line = self.epoch_line(trial, result)
        if line and self._live is not None:  # a terminal: the block shows each running trial's epoch
            self._latest[trial.trial_id] = line
        elif line:
            logger.info("%s", line)
        self._maybe_show(trials)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        """Throttled view."""
        self._maybe_show(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Record the trial's duration; the (throttled) view."""
        self._record_duration(trial)
        self._maybe_show(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        """Name the failed trial and its error file, then the view."""
        logger.warning("[%s] trial %s (%s) failed: %s", self.sweep, trial.trial_id,
                       _trial_label(trial.config), trial.error_file or "no error file")
        self._maybe_show(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Final view of the stage, as plain lines."""
        if self._live is not None:
            self._live.detach()
            self._live = None
        logger.info("%s", self.render(trials))

    # ------------------------------------------------------------------------------- rendering

    def epoch_line(self, trial: Any, result: Mapping[str, Any]) -> str | None:
        """``[sweep] demo/stl/f0 c003 (trial id) epoch 3/15 train_loss 0.41 val_uar 0.52``, or None."""
        epoch = result.get("epoch")
        if not isinstance(epoch, (int, float)) or result.get(RECORDED_MARKER):
            return None
        config = trial.config
        label = _trial_label(config)
        if "config_index" in config:
            label += f" c{int(config['config_index']):03d}"
        total = f"/{self.epochs}" if self.epochs else ""
        parts = [f"[{self.sweep}] {label} ({trial.trial_id}) epoch {int(epoch) + 1}{total}"]
        parts += [f"{k} {result[k]:.4f}" for k in ("train_loss", self.metric)
                  if isinstance(result.get(k), (int, float))]
        return "  ".join(parts)

    def counts(self, trials: Sequence[Any]) -> dict[str, int]:
        """done / running / pending / failed; trials not created yet are pending."""
        counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        for trial in trials:
            counts[_STATUS.get(trial.status, "pending")] += 1
        if self.total is not None:
            counts["pending"] += max(self.total - len(trials), 0)
        return counts

    def eta_s(self, trials: Sequence[Any]) -> float | None:
        """Seconds left, from finished trials' mean duration and the trials left (None: not known)."""
        for trial in trials:
            if trial.status == "TERMINATED":
                self._record_duration(trial)
        if not self._durations:
            return None
        counts = self.counts(trials)
        left = counts["running"] + counts["pending"]
        mean = sum(self._durations.values()) / len(self._durations)
        return mean * left / max(counts["running"], 1)

    def render(self, trials: Sequence[Any]) -> str:
        """The view: a summary line, then one line per group with its best ``metric`` so far."""
        lines = [self.summary(trials)]
        for label, members in self._groups(trials).items():
            line = f"  {label:<28} {_counts_text(self._group_counts(members)):<40} {self._best_text(members)}"
            lines.append(line.rstrip())
        return "\n".join(lines)

    def summary(self, trials: Sequence[Any]) -> str:
        """``[sweep] search: 3 done, 4 running, 9 pending, 0 failed | 2m10s elapsed, ETA 4m30s``."""
        eta = self.eta_s(trials)
        timing = f"{_duration(time.monotonic() - self._start)} elapsed"
        timing += f", ETA {_duration(eta)}" if eta is not None else ", ETA -"
        return f"[{self.sweep}] {self.stage}: {_counts_text(self.counts(trials))} | {timing}"

    def _groups(self, trials: Sequence[Any]) -> dict[str, list[Any]]:
        groups: dict[str, list[Any]] = {}
        for trial in trials:
            groups.setdefault(_group_label(trial.config), []).append(trial)
        return groups

    @staticmethod
    def _group_counts(members: Sequence[Any]) -> dict[str, int]:
        counts = {"done": 0, "running": 0, "pending": 0, "failed": 0}
        for trial in members:
            counts[_STATUS.get(trial.status, "pending")] += 1
        return counts

    def _best_text(self, trials: Sequence[Any]) -> str:
        """Best so far: cv, the mean test UAR over finished folds; search, the best configuration's
        mean ``metric`` over the folds it finished (all of them for pooled selection)."""
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
                key = (trial.config.get("study"), trial.config.get("config_index"))
                by_config.setdefault(key, []).append(value)
        means = {c: sum(v) / len(v) for c, v in by_config.items() if len(v) == self.folds_per_config}
        if not means:
            return ""
        pick = max if self.mode == "max" else min
        key = pick(means, key=means.get)
        return f"best {self.metric} {means[key]:.4f} (config {key[1]}, {self.folds_per_config} folds)"

    # --------------------------------------------------------------------------------- output

    def _record_duration(self, trial: Any) -> None:
        seconds = (trial.last_result or {}).get("time_total_s")
        if isinstance(seconds, (int, float)) and trial.trial_id not in self._durations:
            self._durations[trial.trial_id] = float(seconds)

    def _maybe_show(self, trials: Sequence[Any]) -> None:
        every = 1.0 if self._live is not None else self.interval_s
        if time.monotonic() - self._last >= every:
            self._show(trials)

    def _show(self, trials: Sequence[Any]) -> None:
        self._last = time.monotonic()
        if self._live is not None:
            running = [self._latest[t.trial_id] for t in trials
                       if t.status == "RUNNING" and t.trial_id in self._latest]
            self._live.draw("\n".join([self.render(trials), *running]))
            return
        text = self.summary(trials) + "".join(
            f" | {label} {best}" for label, members in self._groups(trials).items()
            if (best := self._best_text(members)))
        if text != self._last_text:
            logger.info("%s", text)
        self._last_text = text


def _is_tty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class _LiveBlock(logging.Handler):
    """A block of lines kept at the bottom of a terminal: log records print above it.

    While attached it stands in for the root logger's handlers that write to the same terminal (each
    record: clear the block, let the original handler write, redraw the block).
    """

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self.stream = stream
        self._lines: list[str] = []
        self._shown = 0
        self._replaced: list[logging.Handler] = []

    def attach(self) -> None:
        root = logging.getLogger()
        self._replaced = [h for h in root.handlers if getattr(h, "stream", None) is self.stream]
        for handler in self._replaced:
            root.removeHandler(handler)
        root.addHandler(self)

    def detach(self) -> None:
        self._clear()
        root = logging.getLogger()
        root.removeHandler(self)
        for handler in self._replaced:
            root.addHandler(handler)
        self.stream.flush()

    def emit(self, record: logging.LogRecord) -> None:
        self._clear()
        for handler in self._replaced:
            if record.levelno >= handler.level:
                handler.handle(record)
        self._write()

    def draw(self, text: str) -> None:
        width = max(shutil.get_terminal_size((120, 24)).columns - 1, 20)
        self._clear()
        self._lines = [line[:width] for line in text.splitlines()]
        self._write()

    def _clear(self) -> None:
        if self._shown:
            self.stream.write(f"\x1b[{self._shown}F\x1b[J")  # up to the block's first line, clear below
            self._shown = 0

    def _write(self) -> None:
        if self._lines:
            self.stream.write("\n".join(self._lines) + "\n")
            self._shown = len(self._lines)
        self.stream.flush()


def _trial_label(config: Mapping[str, Any]) -> str:
    """``dataset/arch``, and ``/f<k>`` for a nested study (one per outer fold) or a cv trial."""
    label = _group_label(config)
    nested = str(config.get("study", "")).count("__") == 2
    return label + f"/f{config['fold']}" if nested or "study" not in config else label


def _group_label(config: Mapping[str, Any]) -> str:
    return f"{config.get('dataset')}/{config.get('arch')}"


def _counts_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {label}" for label, n in counts.items())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _last(trial: Any, key: str) -> float | None:
    value = (trial.last_result or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _best_value(trial: Any, metric: str, mode: str) -> float | None:
    stats = (trial.metric_analysis or {}).get(metric)
    return float(stats[mode]) if stats and mode in stats else None
