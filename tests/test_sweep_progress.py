"""The sweep's progress view on a terminal, its per-epoch lines, and the MLflow -> Ray tags.

Tune hands the callbacks its own trial objects; these tests give them the attributes the callbacks
read (``config``, ``status``, ``trial_id``, ``last_result``, ``metric_analysis``) and use a real
MLflow store and a real Tune checkpoint.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from types import SimpleNamespace

import vocab


def _trial(status: str = "RUNNING", index: int = 3, fold: int = 0) -> SimpleNamespace:
    config = {"dataset": vocab.DEMO, "arch": vocab.STL, "fold": fold, "config_index": index,
              "study": f"{vocab.DEMO}__{vocab.STL}__fold{fold}"}
    return SimpleNamespace(config=config, status=status, trial_id=f"abc_{index:05d}", last_result={},
                           metric_analysis={}, error_file=None)


def test_each_reported_epoch_is_one_line_naming_trial_epoch_loss_and_metric() -> None:
    from orchestrator.sweep.progress import SweepProgress

    progress = SweepProgress("s", vocab.STAGE_SEARCH, "val_uar", "max", epochs=15)
    line = progress.epoch_line(_trial(), {"epoch": 2, "train_loss": 0.41234, "val_uar": 0.5, "lr": 1e-3})
    assert line == f"[s] {vocab.DEMO}/{vocab.STL}/f0 c003 (abc_00003) epoch 3/15  train_loss 0.4123  val_uar 0.5000"
    assert progress.epoch_line(_trial(), {"epoch": 2, "recorded_before": 1.0}) is None  # nothing ran


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_view_is_rewritten_in_place_below_the_log() -> None:
    from orchestrator.sweep.progress import SweepProgress

    terminal = _Terminal()
    root = logging.getLogger()
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        progress = SweepProgress("s", vocab.STAGE_SEARCH, "val_uar", "max", total=4, epochs=3, stream=terminal)
        progress.setup()
        trials = [_trial("RUNNING", 0), _trial("PENDING", 1)]
        progress.on_step_end(0, trials)
        first = terminal.getvalue()
        assert first.count("\n") == 2 and first.startswith("[s] search: 0 done, 1 running, 3 pending, 0 failed")
        logging.getLogger("orchestrator.sweep").warning("a log record")
        again = terminal.getvalue()[len(first):]
        # the block goes (cursor up 2 lines, clear), the record is printed, the block comes back
        assert again.startswith("\x1b[2F\x1b[J") and again.splitlines()[0].endswith("a log record")
        assert again.splitlines()[1:] == first.splitlines()
        progress._last = 0.0  # as if a second had passed
        progress.on_trial_result(1, trials, trials[0], {"epoch": 0, "train_loss": 1.0, "val_uar": 0.4})
        block = terminal.getvalue()[len(first) + len(again):]
        # redrawn with the running trial's latest epoch as its last line; nothing logged per epoch
        assert block.startswith("\x1b[2F\x1b[J") and len(block.splitlines()) == 3
        assert block.splitlines()[-1].endswith("epoch 1/3  train_loss 1.0000  val_uar 0.4000")
        progress.on_experiment_end(trials)
        assert root.handlers.count(handler) == 1  # the terminal's own handler is back
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_trial_runs_are_tagged_with_trial_id_node_and_checkpoint_and_failed_at_once(tmp_path: Path) -> None:
    from mlflow import MlflowClient
    from ray import tune

    from orchestrator import tracking
    from orchestrator.sweep.cell import RECORDED_MARKER
    from orchestrator.sweep.links import RunLinks

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "e")
    keys = {0: "s/search/k0/f0", 1: "s/search/k1/f0"}
    runs = {i: tracking.get_or_create_run(uri, experiment, key, key, {}) for i, key in keys.items()}
    links = RunLinks(uri, "e", lambda config: keys[config["config_index"]])
    done, failed = _trial(index=0), _trial(index=1)
    links.on_trial_result(0, [], done, {"node_ip": "127.0.0.2", "hostname": "w1", "epoch": 0})
    (tmp_path / "ckpt").mkdir()
    links.on_checkpoint(0, [], done, tune.Checkpoint.from_directory(str(tmp_path / "ckpt")))
    links.on_trial_result(0, [], failed, {"node_ip": "127.0.0.3", "hostname": "w2", RECORDED_MARKER: 1.0})
    links.on_trial_error(0, [], failed)

    client = MlflowClient(uri)
    tags = client.get_run(runs[0]).data.tags
    assert (tags["ray_trial_id"], tags["ray_node_ip"], tags["ray_hostname"]) == ("abc_00000", "127.0.0.2", "w1")
    assert tags["ray_checkpoint_uri"] == str(tmp_path / "ckpt")
    other = client.get_run(runs[1])
    assert other.info.status == "FAILED" and "ray_node_ip" not in other.data.tags  # recorded: nothing ran


def test_a_view_pickled_by_an_older_version_still_restores() -> None:
    import pickle

    from orchestrator.sweep.progress import SweepProgress

    progress = SweepProgress("s", vocab.STAGE_SEARCH, "val_uar", "max", total=2, stream=_Terminal())
    state = pickle.loads(pickle.dumps(progress)).__dict__
    assert state["_stream"] is None and state["total"] == 2  # streams are not pickled
    old = SweepProgress.__new__(SweepProgress)  # what a Tune run started before this version holds
    old.__setstate__({"sweep": "s", "stage": vocab.STAGE_SEARCH, "metric": "val_uar", "mode": "max",
                      "folds_per_config": 1, "interval_s": 30.0, "_last": 0.0, "_last_text": ""})
    assert old.summary([_trial("RUNNING")]).startswith("[s] search: 0 done, 1 running, 0 pending")


def test_tune_may_keep_as_many_trials_pending_as_the_cluster_holds(tmp_path: Path) -> None:
    from orchestrator.sweep.cluster import trial_slots

    nodes = [{"Alive": True, "Resources": {"CPU": 0.0}},  # the head schedules nothing
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
             {"Alive": True, "Resources": {"CPU": 2.0}},
             {"Alive": False, "Resources": {"CPU": 64.0}}]
    missing = tmp_path / "none.yaml"
    assert trial_slots({"cpu": 1.0, "gpu": 0.0}, nodes, missing) == 10
    assert trial_slots({"cpu": 4.0, "gpu": 1.0}, nodes, missing) == 1
    assert trial_slots({"cpu": 1.0, "gpu": 0.5}, nodes[:1], missing) == 1  # never 0
    launcher = tmp_path / "ray_bootstrap_config.yaml"
    launcher.write_text("available_node_types:\n  head: {resources: {CPU: 0}, max_workers: 0}\n"
                        "  gpu: {resources: {CPU: 8, GPU: 1}, max_workers: 8}\n")
    assert trial_slots({"cpu": 4.0, "gpu": 0.5}, nodes, launcher) == 2 + 8 * 2  # what autoscaling adds
