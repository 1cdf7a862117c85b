"""Sweeps with a real local Ray (num_cpus=2), a real MLflow SQLite store and a fake trainable.

The fake trainable, :func:`fake_trial`, follows the trainable's contract (docs/design.md): it takes
the flat trial config (unknown keys are an error), reports ``val_*`` metrics and ``epoch`` every epoch
with a checkpoint, resumes from ``tune.get_checkpoint()``, logs its own MLflow run through
``orchestrator.tracking`` and reports ``test_uar``/``test_war`` at the end. It talks to the tests
through files in its ``cache_dir`` (the sweep gives every trial ``<cache root>/<dataset>``):
``calls.jsonl`` records every start, ``crash.json`` makes a chosen trial raise, or interrupt the
driver the way Ctrl+C does (SIGINT to the pid in ``driver.pid``).
"""

from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest

from orchestrator.tracking import flat_metrics, mlflow_metric
from orchestrator.trial.config import TrialConfig

TESTS_DIR = Path(__file__).resolve().parent
FAKE_KEYS = frozenset(TrialConfig.model_fields)
EPOCHS = 3

SPACE = """\
datasets: [demo]
archs: [stl, cascaded_vit]
n_folds: 2
fixed: {encoder: tiny, epochs: %d, batch_size: 4}
search:
  num_samples: 2
  max_concurrent: 2
  params:
    lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
    w_expr: {type: uniform, low: 1.0, high: 2.0, when: {arch: [cascaded_vit]}}
resources: {cpu: 1, gpu: auto}
failure: {max_failures: 1}
""" % EPOCHS
# The same space with the pooled protocol: one study per group over both folds, then stage cv.
POOLED_SPACE = SPACE.replace("n_folds: 2\n", "n_folds: 2\nselection: pooled\n").replace(
    "num_samples: 2\n", "num_samples: 2\n  folds: [0, 1]\n")


def fake_val_uar(config: dict, epoch: int) -> float:
    """A deterministic validation UAR that prefers lr near 1e-3, improves with epochs and drops in
    the last one (not monotone: the selected epoch is the one before the last)."""
    arch_bonus = 0.1 if config["arch"] == "cascaded_vit" else 0.0
    trend = 0.02 * epoch - (0.05 if epoch == EPOCHS - 1 else 0.0)
    return 0.5 + arch_bonus - 0.1 * abs(math.log10(config["lr"]) + 3) + trend + 0.01 * config["fold"]


def fake_best_val_uar(config: dict) -> float:
    return max(fake_val_uar(config, e) for e in range(EPOCHS))


def fake_trial(config: dict) -> None:
    """Fake trainable following the real trainable's reporting, checkpoint and MLflow contract."""
    from ray import tune

    from orchestrator.tracking import TrialLogger

    unknown = set(config) - FAKE_KEYS
    if unknown:
        raise ValueError(f"unknown trial config keys {sorted(unknown)}")
    config = {"lr": 1e-3, "w_expr": 1.5, **config}
    channel = Path(config["cache_dir"])
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = json.loads((Path(directory) / "state.json").read_text())["epoch"] + 1
    _append(channel / "calls.jsonl", {"trial_key": config["trial_key"], "start": start,
                                      "stage": config["stage"], "pid": os.getpid(), "ppid": os.getppid(),
                                      "folds_file": config.get("folds_file"),
                                      "select_metric": config.get("select_metric")})
    tags = {k: config[k] for k in ("dataset", "arch", "fold", "sweep", "stage")}
    tags["config_hash"] = config["trial_key"].rsplit("/", 2)[1]
    params = {k: v for k, v in config.items() if k not in ("tracking_uri", "experiment", "parent_run_id")}
    tracker = TrialLogger(config["tracking_uri"], config["experiment"], config["trial_key"],
                          f"{config['dataset']}-{config['arch']}-f{config['fold']}", tags, params,
                          parent_run_id=config["parent_run_id"])
    for epoch in range(start, config["epochs"]):
        _maybe_crash(channel, config, epoch)
        uar = fake_val_uar(config, epoch)
        best = max(fake_val_uar(config, e) for e in range(epoch + 1))
        metrics = {"epoch": epoch, "val_uar": uar, "val_war": uar + 0.05, "val_accuracy": uar + 0.05,
                   "val_loss_expr": 1.0 - uar, "val_loss": 1.0 - uar, "best_val_uar": best}
        tracker.log_epoch({k: v for k, v in metrics.items() if k != "epoch"}, epoch)
        if epoch == config["epochs"] - 1:  # "tests" the best epoch's weights, as the trainable does
            metrics.update(test_uar=best - 0.1, test_war=best - 0.05)
            tracker.log_metrics({"test_uar": best - 0.1, "test_war": best - 0.05}, 0)
        with tempfile.TemporaryDirectory() as directory:
            (Path(directory) / "state.json").write_text(json.dumps({"epoch": epoch}))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
    tracker.finish()


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _maybe_crash(channel: Path, config: dict, epoch: int) -> None:
    """Act when ``crash.json`` selects this trial at this epoch (``once``: only the first time).

    ``action: raise`` (default) fails the trial; ``action: interrupt`` sends ``signal`` (default
    SIGINT: Tune stops the experiment gracefully, as on Ctrl+C; SIGTERM: as ``ray job stop``) to the
    driver and waits to be stopped with it; ``action: kill`` SIGKILLs the driver (tests/test_kills.py);
    ``action: pause`` keeps the trial (and its driver) busy; ``action: kill_raylet`` SIGKILLs the
    trial's raylet (its parent process: the node dies, as a lost machine) after writing its PID to
    ``killed-raylet.json``.
    """
    rule_file = channel / "crash.json"
    if not rule_file.is_file():
        return
    rule = json.loads(rule_file.read_text())
    selected = all(config[k] == rule[k] for k in ("stage", "arch", "fold")) and epoch == rule["epoch"]
    marker = channel / f"crashed-{config['stage']}-{config['arch']}-{config['fold']}"
    if not selected or (rule["once"] and marker.exists()):
        return
    marker.write_text(config["trial_key"])
    if rule.get("action") == "pause":  # keep the driver busy (tests/test_kills.py: a second driver)
        time.sleep(600)
    if rule.get("action") == "kill_raylet":
        (channel / "killed-raylet.json").write_text(json.dumps({"pid": os.getppid(), "trial_key": config["trial_key"]}))
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)
    if rule.get("action") == "kill":  # a driver that dies on the spot
        os.kill(int((channel / "driver.pid").read_text()), signal.SIGKILL)
        time.sleep(60)
    if rule.get("action") == "interrupt":
        os.kill(int((channel / "driver.pid").read_text()), getattr(signal, rule.get("signal", "SIGINT")))
        time.sleep(60)
    raise RuntimeError(f"injected crash at epoch {epoch}")


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance (2 CPUs) for the whole module; workers can import this module."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    path = os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


def write_manifest(cache: Path, subjects: int) -> None:
    """A manifest of usable clips (2 classes per subject) the sweep's pre-flight can split into folds;
    the fake trainable never opens a clip."""
    header = "clip,clip_id,status,reason,label,label_name,subject,valid_frames,padded,cache_file\n"
    rows = [f"a{s}/c{c}.mp4,a{s}__c{c},ok,,{c},class{c},{s},16,False,clips/a{s}__c{c}.npz\n"
            for s in range(subjects) for c in range(2)]
    (cache / "manifest.csv").write_text(header + "".join(rows))


def _setup(root: Path, crash: dict | None = None, space: str = SPACE) -> tuple[Path, Path]:
    space_file = root / "fake.yaml"
    space_file.write_text(space)
    channel = root / "out" / "cache" / "demo"
    channel.mkdir(parents=True)
    write_manifest(channel, subjects=4)
    if crash:
        (channel / "crash.json").write_text(json.dumps(crash))
    return space_file, channel


def _sweep(space_file: Path, root: Path, **kwargs):
    from orchestrator.sweep.run import run_sweep

    kwargs.setdefault("progress_interval_s", 1.0)
    return run_sweep(space_file, out=root / "out", trainable=fake_trial, **kwargs)


def _calls(channel: Path) -> list[dict]:
    return [json.loads(line) for line in (channel / "calls.jsonl").read_text().splitlines()]


def _runs(result):
    from mlflow import MlflowClient

    client = MlflowClient(result.tracking_uri)
    return client, client.search_runs([result.experiment_id], max_results=1000)


def _by_stage(runs) -> dict[str, list]:
    stages: dict[str, list] = {}
    for run in runs:
        stages.setdefault(run.data.tags.get("stage"), []).append(run)
    return stages


def _assert_no_duplicate_steps(client, runs) -> None:
    for run in runs:
        for key in ("val_uar", "val_loss"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, mlflow_metric(key))]
            assert sorted(steps) == list(range(EPOCHS)), (run.data.tags["trial_key"], key, steps)


# --------------------------------------------------------------------------------------------
# Tests


@pytest.fixture(scope="module")
def smoke(ray_local, tmp_path_factory):
    """A full nested sweep: 2 archs x 2 outer folds x 2 sampled configs (8 trials); search trial
    (stl, fold 1) crashes once at epoch 1 and must be retried from its checkpoint."""
    root = tmp_path_factory.mktemp("smoke")
    crash = {"stage": "search", "arch": "stl", "fold": 1, "epoch": 1, "once": True}
    space_file, channel = _setup(root, crash)
    return _sweep(space_file, root), channel, root


def _config_fold(run) -> tuple[str, str, str]:
    return run.data.tags["arch"], run.data.tags["config_hash"], run.data.tags["fold"]


@pytest.mark.slow
def test_smoke_sweep_completes_with_the_right_mlflow_runs(smoke) -> None:
    result, channel, _ = smoke
    assert result.complete
    client, runs = _runs(result)
    stages = _by_stage(runs)
    # nested selection: num_samples x folds trials per group, no cv stage, nothing trained twice
    assert {k: len(v) for k, v in stages.items()} == {"sweep": 1, "group": 2, "search": 8}
    assert len({_config_fold(r) for r in stages["search"]}) == 8
    sweep_run = stages["sweep"][0]
    assert sweep_run.info.run_id == result.sweep_run_id and sweep_run.info.status == "FINISHED"
    assert sweep_run.data.tags["sweep"] == "fake" and sweep_run.data.params["selection"] == "nested"
    assert [a.path for a in client.list_artifacts(sweep_run.info.run_id, "space")] == ["space/space.yaml"]
    experiment = client.get_experiment(result.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "selection nested on `val_uar`" in experiment.tags["mlflow.note.content"]
    groups = {r.data.tags["arch"]: r for r in stages["group"]}
    for group in groups.values():
        assert group.data.tags["mlflow.parentRunId"] == sweep_run.info.run_id
        assert group.info.status == "FINISHED"
        assert {"cv_test_uar_mean", "cv_test_uar_std"} <= set(flat_metrics(group.data.metrics))
        assert {"fold0.lr", "fold1.lr"} <= set(group.data.params)  # the choice of every outer fold
        plots = {a.path for study in ("fold0", "fold1") for a in client.list_artifacts(
            group.info.run_id, f"optuna/demo__{group.data.tags['arch']}__{study}")}
        assert {p.rsplit("/", 1)[1] for p in plots} == {"history.png", "importance.png"}
    for run in stages["search"]:
        tags = run.data.tags
        assert tags["sweep"] == "fake" and tags["dataset"] == "demo" and tags["selection"] == "nested"
        assert tags["mlflow.parentRunId"] == groups[tags["arch"]].info.run_id
        assert tags["trial_key"].startswith(f"fake/search/demo/{tags['arch']}/")
        assert tags["trial_key"].endswith(f"/f{tags['fold']}")
        assert run.info.status == "FINISHED"
    selected = sorted((r.data.tags["arch"], r.data.tags["fold"]) for r in stages["search"]
                      if r.data.tags["selected"] == "true")
    assert selected == [("cascaded_vit", "0"), ("cascaded_vit", "1"), ("stl", "0"), ("stl", "1")]
    _assert_no_duplicate_steps(client, stages["search"])
    assert len(_calls(channel)) == 8 + 1  # one retry


def test_the_folds_are_data_every_trial_reads_and_mlflow_holds(smoke) -> None:
    from orchestrator.data.cache import load_manifest
    from orchestrator.data.folds import read_folds

    result, channel, root = smoke
    folds_file = root / "out" / "sweeps" / "fake" / "folds" / "demo.json"
    folds = read_folds(folds_file, load_manifest(channel))  # checks the CV invariants against the cache
    assert len(folds) == 2
    for fold in folds:  # the leakage invariant, spelled out: no subject in two roles
        roles = [set(fold.subjects[r]) for r in ("train", "val", "test")]
        assert all(roles) and not (roles[0] & roles[1] or roles[0] & roles[2] or roles[1] & roles[2])
    calls = _calls(channel)
    assert {c["folds_file"] for c in calls} == {str(folds_file.resolve())}
    assert {c["select_metric"] for c in calls} == {"val_uar"}, "every trial selects on the space's metric"
    client, runs = _runs(result)
    for run in _by_stage(runs)["sweep"] + _by_stage(runs)["group"]:
        assert [a.path for a in client.list_artifacts(run.info.run_id, "folds")] == ["folds/demo.json"]


@pytest.mark.slow
def test_each_outer_fold_reports_the_trial_its_own_study_chose(smoke) -> None:
    import optuna

    result, _, root = smoke
    storage = f"sqlite:///{root / 'out' / 'sweeps' / 'fake' / 'optuna.db'}"
    client, runs = _runs(result)
    search = _by_stage(runs)["search"]
    names = optuna.get_all_study_names(storage)
    assert sorted(names) == [f"demo__{a}__fold{k}" for a in ("cascaded_vit", "stl") for k in (0, 1)]
    for arch in ("stl", "cascaded_vit"):
        for fold in (0, 1):
            study = optuna.load_study(study_name=f"demo__{arch}__fold{fold}", storage=storage)
            assert study.metric_names == ["val_uar"]
            complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
            assert len(complete) == 2
            for trial in complete:  # the objective: the best (not the last) val_uar of its one fold
                expected = fake_best_val_uar({"arch": arch, "fold": fold, **trial.params})
                assert trial.value == pytest.approx(expected)
                assert expected != pytest.approx(fake_val_uar({"arch": arch, "fold": fold, **trial.params},
                                                              EPOCHS - 1))
                assert trial.user_attrs[f"fold{fold}_trial_key"].endswith(f"/f{fold}")
                run_of_trial = next(r for r in search if r.info.run_id == trial.user_attrs[f"fold{fold}_mlflow_run_id"])
                assert run_of_trial.data.tags["trial_key"] == trial.user_attrs[f"fold{fold}_trial_key"]
            mine = [r for r in search if r.data.tags["arch"] == arch and r.data.tags["fold"] == str(fold)]
            assert len(mine) == 2  # trained only on this outer fold
            chosen = [r for r in mine if r.data.tags["selected"] == "true"]
            assert len(chosen) == 1
            assert flat_metrics(chosen[0].data.metrics)["best_val_uar"] == pytest.approx(study.best_value)
            assert chosen[0].data.tags["trial_key"] == study.best_trial.user_attrs[f"fold{fold}_trial_key"]
            row = next(r for r in result.cv_rows if r["arch"] == arch and r["fold"] == fold)
            assert row["status"] == "done" and row["run_id"] == chosen[0].info.run_id
            assert row["test_uar"] == pytest.approx(flat_metrics(chosen[0].data.metrics)["test_uar"])
            choice = result.chosen[f"demo__{arch}__fold{fold}"]
            assert choice["params"]["lr"] == pytest.approx(study.best_trial.params["lr"])
            assert ("w_expr" in choice["params"]) == (arch == "cascaded_vit")


@pytest.mark.slow
def test_tables_report_the_nested_choices(smoke) -> None:
    from orchestrator.report.export import make_tables
    from orchestrator.report.results import aggregate, load_runs

    result, _, root = smoke
    runs = load_runs(result.tracking_uri, result.experiment, sweep="fake", stage="auto")
    assert len(runs) == 4 and set(runs["selected"]) == {"true"}
    agg = aggregate(runs)
    assert list(agg["folds_done"]) == [2, 2] and set(agg["protocol"]) == {"nested"}
    for row in agg.itertuples():
        expected = [r["test_uar"] * 100 for r in result.cv_rows if r["arch"] == row.arch]
        assert row.uar_mean == pytest.approx(sum(expected) / 2)
    report = make_tables(result.tracking_uri, result.experiment, sweep="fake", stage="auto",
                         export_dir=root / "tables", formats="md", log_artifacts=False)
    assert "nested selection" in report.markdown and "optimistic" not in report.markdown


@pytest.mark.slow
def test_crashed_trial_is_retried_from_its_checkpoint(smoke) -> None:
    result, channel, _ = smoke
    key = (channel / "crashed-search-stl-1").read_text()
    starts = [r["start"] for r in _calls(channel) if r["trial_key"] == key]
    assert starts == [0, 1]  # crashed in epoch 1, restarted after the epoch-0 checkpoint
    assert all(r["status"] == "done" for r in result.cv_rows)


@pytest.mark.slow
def test_pooled_selection_tests_the_group_choice_on_every_fold_and_says_so(ray_local, tmp_path: Path) -> None:
    import optuna

    from orchestrator.report.export import make_tables

    space_file, channel = _setup(tmp_path, space=POOLED_SPACE)
    result = _sweep(space_file, tmp_path)
    assert result.complete
    client, runs = _runs(result)
    stages = _by_stage(runs)
    assert {k: len(v) for k, v in stages.items()} == {"sweep": 1, "group": 2, "search": 8, "cv": 4}
    storage = f"sqlite:///{tmp_path / 'out' / 'sweeps' / 'fake' / 'optuna.db'}"
    for arch in ("stl", "cascaded_vit"):
        study = optuna.load_study(study_name=f"demo__{arch}", storage=storage)
        for trial in study.trials:  # the objective: mean over both folds of the best val_uar
            expected = sum(fake_best_val_uar({"arch": arch, "fold": f, **trial.params}) for f in (0, 1)) / 2
            assert trial.value == pytest.approx(expected)
        assert result.chosen[f"demo__{arch}"]["params"] == study.best_trial.params
    for run in stages["cv"]:
        chosen = result.chosen[f"demo__{run.data.tags['arch']}"]["params"]
        assert float(run.data.params["lr"]) == pytest.approx(chosen["lr"])
        assert run.data.tags["selection"] == "pooled"
    report = make_tables(result.tracking_uri, result.experiment, sweep="fake", stage="auto",
                         export_dir=tmp_path / "tables", formats="md", log_artifacts=False)
    assert "selection on pooled folds (optimistic)" in report.markdown

    # Run again with the finished cv stage's snapshot cut short: its results come from MLflow's record.
    calls = len(_calls(channel))
    cv_state = max((tmp_path / "out" / "ray_results" / "fake" / "cv").glob("experiment_state-*.json"))
    cv_state.write_bytes(cv_state.read_bytes()[:100])
    again = _sweep(space_file, tmp_path)
    assert again.complete and len(_calls(channel)) == calls, "nothing trains again"
    keys = ("dataset", "arch", "fold", "status", "test_uar", "test_war")
    assert [[r.get(k) for k in keys] for r in again.cv_rows] == [[r.get(k) for k in keys] for r in result.cv_rows]
    assert (cv_state.parent / "unreadable" / cv_state.name).is_file()


def _finished_keys(tracking_uri: str) -> set[str]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    return {r.data.tags["trial_key"] for r in runs
            if r.info.status == "FINISHED" and "test_uar" in flat_metrics(r.data.metrics)}


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_or_duplicating(ray_local, tmp_path: Path) -> None:
    import optuna

    from orchestrator.sweep.errors import SweepInterrupted

    # Ctrl+C (SIGINT to this process, the driver) while search trial (cascaded_vit, fold 1) is in
    # epoch 1: some trials of the one Tune run have finished, others are part-way.
    crash = {"stage": "search", "arch": "cascaded_vit", "fold": 1, "epoch": 1, "once": True,
             "action": "interrupt"}
    space_file, channel = _setup(tmp_path, crash)
    (channel / "driver.pid").write_text(str(os.getpid()))
    with pytest.raises(SweepInterrupted, match="re-run the same command") as stopped:
        _sweep(space_file, tmp_path)
    state = json.loads((tmp_path / "out" / "sweeps" / "fake" / "state.json").read_text())
    assert state["search_done"] is False and state["complete"] is False
    before = _calls(channel)
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    finished_before = _finished_keys(uri)
    assert finished_before, "some trials finished before the interrupt"
    assert f"{len(finished_before)} trial result(s) recorded in MLflow" in str(stopped.value)  # what really finished

    result = _sweep(space_file, tmp_path, resume=True)
    assert result.complete
    after = _calls(channel)[len(before):]
    assert not finished_before & {c["trial_key"] for c in after}  # finished trials did not run again
    interrupted = (channel / "crashed-search-cascaded_vit-1").read_text()
    assert [c["start"] for c in after if c["trial_key"] == interrupted] == [1]  # from its checkpoint
    client, runs = _runs(result)
    stages = _by_stage(runs)
    assert {k: len(v) for k, v in stages.items()} == {"sweep": 1, "group": 2, "search": 8}
    keys = [r.data.tags["trial_key"] for r in runs]
    assert len(keys) == len(set(keys))
    assert all(r.info.status == "FINISHED" for r in runs)
    _assert_no_duplicate_steps(client, stages["search"])
    storage = f"sqlite:///{tmp_path / 'out' / 'sweeps' / 'fake' / 'optuna.db'}"
    for name in optuna.get_all_study_names(storage):  # no spurious FAIL, no extra trial
        study = optuna.load_study(study_name=name, storage=storage)
        assert sorted(t.state.name for t in study.trials) == ["COMPLETE", "COMPLETE"], name


@pytest.mark.slow
def test_failed_trial_is_retried_on_rerun(ray_local, tmp_path: Path) -> None:
    # Both search trials of (cascaded_vit, fold 0) fail at epoch 2 on every attempt (max_failures=1).
    crash = {"stage": "search", "arch": "cascaded_vit", "fold": 0, "epoch": 2, "once": False}
    space_file, channel = _setup(tmp_path, crash)
    first = _sweep(space_file, tmp_path)
    assert not first.complete
    assert [(r["arch"], r["fold"]) for r in first.cv_rows if r["status"] == "failed"] == [("cascaded_vit", 0)]
    state = json.loads((tmp_path / "out" / "sweeps" / "fake" / "state.json").read_text())
    assert state["search_done"] is False and len(state["studies"]) == 4
    calls = _calls(channel)
    failed = {c["trial_key"] for c in calls if "/cascaded_vit/" in c["trial_key"] and c["trial_key"].endswith("/f0")}
    assert len(failed) == 2

    (channel / "crash.json").unlink()
    second = _sweep(space_file, tmp_path)
    assert second.complete and all(r["status"] == "done" for r in second.cv_rows)
    resumed = _calls(channel)[len(calls):]
    assert sorted((c["trial_key"], c["start"]) for c in resumed) == sorted((k, 2) for k in failed)  # from checkpoints
    client, runs = _runs(second)
    stages = _by_stage(runs)
    assert {k: len(v) for k, v in stages.items()} == {"sweep": 1, "group": 2, "search": 8}
    _assert_no_duplicate_steps(client, stages["search"])
    retried = _assert_retries_recorded(tmp_path, "demo__cascaded_vit__fold0", stages["search"], folds=(0,))

    third = _sweep(space_file, tmp_path)  # everything finished: nothing runs again
    assert third.complete and len(_calls(channel)) == len(calls) + 2
    assert len(_runs(third)[1]) == len(runs)
    assert _assert_retries_recorded(tmp_path, "demo__cascaded_vit__fold0", stages["search"], folds=(0,)) == retried


def _assert_retries_recorded(root: Path, study_name: str, search_runs: list, folds: tuple[int, ...]) -> list:
    """The study's FAIL trials each have one COMPLETE twin (``retry_of``) valued from MLflow."""
    import optuna

    from orchestrator.tracking import flat_metrics

    storage = f"sqlite:///{root / 'out' / 'sweeps' / 'fake' / 'optuna.db'}"
    trials = optuna.load_study(study_name=study_name, storage=storage).trials
    failed = [t for t in trials if t.state.name == "FAIL"]
    twins = [t for t in trials if "retry_of" in t.user_attrs]
    assert failed and sorted(t.user_attrs["retry_of"] for t in twins) == [t.number for t in failed]
    best = {r.data.tags["trial_key"]: flat_metrics(r.data.metrics)["best_val_uar"] for r in search_runs}
    for twin in twins:
        source = trials[twin.user_attrs["retry_of"]]
        assert twin.state.name == "COMPLETE" and twin.params == source.params
        expected = sum(best[source.user_attrs[f"fold{f}_trial_key"]] for f in folds) / len(folds)
        assert twin.value == pytest.approx(expected)
    return [(t.number, t.value) for t in twins]


@pytest.mark.slow
def test_a_pooled_study_whose_every_configuration_failed_recovers_on_rerun(ray_local, tmp_path: Path) -> None:
    from orchestrator.sweep.errors import SweepError

    # Fold 0 of every cascaded_vit configuration fails on every attempt: its study has no COMPLETE trial.
    crash = {"stage": "search", "arch": "cascaded_vit", "fold": 0, "epoch": 2, "once": False}
    space_file, channel = _setup(tmp_path, crash, space=POOLED_SPACE)
    with pytest.raises(SweepError, match="demo__cascaded_vit"):
        _sweep(space_file, tmp_path)
    (channel / "crash.json").unlink()
    result = _sweep(space_file, tmp_path)  # the failed folds are retried; the study learns of them
    assert result.complete and all(r["status"] == "done" for r in result.cv_rows)
    client, runs = _runs(result)
    stages = _by_stage(runs)
    assert {k: len(v) for k, v in stages.items()} == {"sweep": 1, "group": 2, "search": 8, "cv": 4}
    _assert_retries_recorded(tmp_path, "demo__cascaded_vit", stages["search"], folds=(0, 1))
    chosen = result.chosen["demo__cascaded_vit"]["params"]
    expected = max(({"lr": float(r.data.params["lr"]), "w_expr": float(r.data.params["w_expr"])}
                    for r in stages["search"] if r.data.tags["arch"] == "cascaded_vit"),
                   key=lambda p: sum(fake_best_val_uar({"arch": "cascaded_vit", "fold": f, **p}) for f in (0, 1)))
    assert chosen == pytest.approx(expected)


@pytest.mark.slow
def test_grid_without_search_runs_only_the_final_cv(ray_local, tmp_path: Path) -> None:
    grid = SPACE[:SPACE.index("search:")] + "folds: [1]\n"
    space_file, channel = _setup(tmp_path)
    space_file.write_text(grid)
    result = _sweep(space_file, tmp_path)
    assert result.complete and result.chosen == {}
    assert sorted((r["arch"], r["fold"]) for r in result.cv_rows) == [("cascaded_vit", 1), ("stl", 1)]
    client, runs = _runs(result)
    stages = _by_stage(runs)
    assert {k: len(v) for k, v in stages.items()} == {"sweep": 1, "group": 2, "cv": 2}
    assert all(float(r.data.params["lr"]) == 1e-3 for r in stages["cv"])  # the trainable's default
    assert all(c["stage"] == "cv" for c in _calls(channel))
    assert not (tmp_path / "out" / "sweeps" / "fake" / "optuna.db").exists()


@pytest.mark.slow
def test_changed_space_under_the_same_name_is_refused(ray_local, tmp_path: Path) -> None:
    from orchestrator.sweep.errors import SweepError
    from orchestrator.sweep.run import run_sweep

    space_file, _ = _setup(tmp_path)
    sweep_dir = tmp_path / "out" / "sweeps" / "fake"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "state.json").write_text(json.dumps({"space_hash": "something-else"}))
    with pytest.raises(SweepError, match="different search space"):
        run_sweep(space_file, out=tmp_path / "out", trainable=fake_trial)


def test_resume_of_an_unknown_sweep_is_refused(tmp_path: Path) -> None:
    from orchestrator.sweep.errors import SweepError
    from orchestrator.sweep.run import run_sweep

    with pytest.raises(SweepError, match="no sweep named 'nope'"):
        run_sweep(None, out=tmp_path, name="nope", resume=True)


def test_missing_cache_is_reported_before_anything_runs(tmp_path: Path) -> None:
    from orchestrator.sweep.errors import SweepError
    from orchestrator.sweep.run import run_sweep

    space_file = tmp_path / "fake.yaml"
    space_file.write_text(SPACE)
    with pytest.raises(SweepError, match=r"no preprocessing cache for dataset 'demo'.*--data-root"):
        run_sweep(space_file, out=tmp_path / "out", trainable=fake_trial)


def test_trial_config_holds_only_trainable_keys(tmp_path: Path) -> None:
    from orchestrator.sweep.cell import CellContext
    from orchestrator.sweep.space_file import load_search_space

    space_file = tmp_path / "fake.yaml"
    space_file.write_text(SPACE)
    space = load_search_space(space_file)
    context = CellContext(trainable=fake_trial, stage="cv", sweep="s", n_folds=2, cache_root="/c",
                          fixed=space.fixed, chosen={"demo__stl": {"lr": 0.002}},
                          tracking_uri="sqlite:////x.db", experiment="e",
                          group_runs={"demo__stl": "run1"})
    flat = context.trial_config({"dataset": "demo", "arch": "stl", "fold": 1})
    assert set(flat) <= FAKE_KEYS
    assert flat["lr"] == 0.002 and flat["cache_dir"] == "/c/demo" and flat["parent_run_id"] == "run1"
    assert flat["trial_key"].startswith("s/cv/demo/stl/") and flat["trial_key"].endswith("/f1")
    other = context.trial_config({"dataset": "demo", "arch": "stl", "fold": 0})
    assert other["trial_key"].rsplit("/", 1)[0] == flat["trial_key"].rsplit("/", 1)[0]


def test_study_seeds_differ_and_are_stable() -> None:
    from orchestrator.sweep.searcher import study_seed

    seeds = {study_seed(0, d, a, k) for d in ("ravdess", "mead") for a in ("stl", "cascaded_vit")
             for k in (None, 0, 1)}
    assert len(seeds) == 12 and study_seed(0, "mead", "stl", 1) == study_seed(0, "mead", "stl", 1)
    assert study_seed(1, "mead", "stl") != study_seed(0, "mead", "stl")


@pytest.mark.slow
def test_asha_prunes_stopped_configurations_within_a_study(ray_local, tmp_path: Path) -> None:
    import optuna

    asha_space = SPACE.replace("archs: [stl, cascaded_vit]", "archs: [cascaded_vit]\nfolds: [0]").replace(
        "epochs: %d" % EPOCHS, "epochs: 4").replace("num_samples: 2\n",
        "num_samples: 4\n  seed: 2\n  scheduler: {type: asha, grace_period: 1, reduction_factor: 2}\n").replace(
        "max_concurrent: 2", "max_concurrent: 1")  # one trial at a time: the rungs fill in a fixed order
    # (seed 2 samples a sequence in which ASHA stops the 3rd and 4th configurations)
    space_file, _ = _setup(tmp_path)
    space_file.write_text(asha_space)
    result = _sweep(space_file, tmp_path)
    study = optuna.load_study(study_name="demo__cascaded_vit__fold0",
                              storage=f"sqlite:///{tmp_path / 'out' / 'sweeps' / 'fake' / 'optuna.db'}")
    states = [t.state for t in study.trials]
    assert len(states) == 4 and optuna.trial.TrialState.PRUNED in states, states
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert result.chosen["demo__cascaded_vit__fold0"]["params"]["lr"] == pytest.approx(best.params["lr"])
    config = {"arch": "cascaded_vit", "fold": 0, **best.params}
    assert best.value == pytest.approx(max(fake_val_uar(config, e) for e in range(4)))


def test_progress_view_counts_statuses_and_best_mean_per_group() -> None:
    from types import SimpleNamespace

    from orchestrator.sweep.progress import SweepProgress

    def trial(arch: str, status: str, index: int, fold: int, best: float, seconds: float = 0.0) -> SimpleNamespace:
        config = {"dataset": "demo", "arch": arch, "fold": fold, "config_index": index, "study": f"demo__{arch}"}
        return SimpleNamespace(config=config, status=status, metric_analysis={"val_uar": {"max": best}},
                               last_result={"time_total_s": seconds} if seconds else {},
                               trial_id=f"t{arch}{index}{fold}")

    trials = [trial("stl", "TERMINATED", 0, 0, 0.4, 10.0), trial("stl", "TERMINATED", 0, 1, 0.6, 20.0),
              trial("stl", "TERMINATED", 1, 0, 0.9, 30.0), trial("stl", "RUNNING", 1, 1, 0.1),
              trial("cascaded_vit", "ERROR", 0, 0, 0.2), trial("cascaded_vit", "PENDING", 0, 1, 0.0)]
    # 8 trials in all: 2 not created yet count as pending; ETA = mean 20 s x 4 left / 1 running
    text = SweepProgress("s", "search", "val_uar", "max", folds_per_config=2, total=8).render(trials)
    lines = text.splitlines()
    assert lines[0].startswith("[s] search: 3 done, 1 running, 3 pending, 1 failed | ")
    assert lines[0].endswith("s elapsed, ETA 1m20s")
    assert "demo/stl" in lines[1] and "3 done" in lines[1] and "best val_uar 0.5000 (config 0, 2 folds)" in lines[1]
    assert "demo/cascaded_vit" in lines[2] and "1 failed" in lines[2] and "best" not in lines[2]


def test_autoscaler_gpu_detection_reads_the_launcher_config(tmp_path: Path) -> None:
    from orchestrator.sweep.cluster import _autoscaler_offers_gpus

    config = tmp_path / "ray_bootstrap_config.yaml"
    assert not _autoscaler_offers_gpus(config)
    config.write_text("available_node_types:\n  head: {resources: {CPU: 0}}\n"
                      "  gpu_worker: {resources: {CPU: 8, GPU: 1}}\n")
    assert _autoscaler_offers_gpus(config)
    config.write_text("available_node_types:\n  head: {resources: {CPU: 0}}\n  cpu: {resources: {CPU: 8}}\n")
    assert not _autoscaler_offers_gpus(config)


@pytest.mark.parametrize("argv, fragment", [
    (["sweep", "{space}"], "archs[1]: Input should be"),
    (["sweep", "--resume", "nothing-here"], "no sweep named 'nothing-here'"),
    (["sweep"], "give a search space file"),
])
def test_cli_reports_bad_input_without_scheduling(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   argv: list[str], fragment: str) -> None:
    from orchestrator.cli import main

    space_file = tmp_path / "broken.yaml"
    space_file.write_text(SPACE.replace("[stl, cascaded_vit]", "[stl, cascade_vit]"))
    code = main([a.format(space=space_file) for a in argv] + ["--out", str(tmp_path / "out")])
    assert code == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("encoder, size, fits", [
    ("lgi_former_base", 160, True), ("lgi_former_base", 224, False), ("lgi_former_base", 64, False),
    ("tiny", 64, True),
])
def test_an_encoder_that_cannot_take_the_frames_fails_before_scheduling(
        tmp_path: Path, encoder: str, size: int, fits: bool) -> None:
    from orchestrator.sweep.caches import encoder_problems
    from orchestrator.sweep.space_file import load_search_space

    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE.replace("encoder: tiny", f"encoder: {encoder}") + f"preprocess: {{size: {size}}}\n")
    space = load_search_space(space_file)
    problems = encoder_problems(space, tmp_path / "cache", data_root=tmp_path)
    if fits:
        assert problems == []
    else:
        (problem,) = problems
        assert problem.startswith(f"encoder '{encoder}' does not fit dataset 'demo' at 16 frames of {size} px")


def test_more_folds_than_subjects_fails_before_any_trial_and_leaves_no_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from orchestrator.sweep.errors import SweepError
    from orchestrator.sweep.run import run_sweep

    space_file = tmp_path / "fake.yaml"
    space_file.write_text(SPACE.replace("n_folds: 2", "n_folds: 5"))
    cache = tmp_path / "out" / "cache" / "demo"
    cache.mkdir(parents=True)
    write_manifest(cache, subjects=3)
    with pytest.raises(SweepError, match=r"dataset 'demo' \(3 subjects with usable clips .*n_folds=5"):
        run_sweep(space_file, out=tmp_path / "out", trainable=fake_trial)
    uri = f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}"
    runs = [r for e in MlflowClient(uri).search_experiments() for r in MlflowClient(uri).search_runs([e.experiment_id])]
    assert not [r for r in runs if r.info.status == "RUNNING"]


def test_a_split_file_that_does_not_fit_the_cache_fails_before_ray_starts(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.sweep import run as sweep_run
    from orchestrator.sweep.errors import SweepError
    from orchestrator.sweep.run import run_sweep

    split = tmp_path / "split.txt"  # subjects 0..2 only: subject 3 of the cache is in no test fold
    split.write_text("subject,fold\n0 -> 0\n1 -> 1\n2 -> 1\n")
    space_file = tmp_path / "fake.yaml"
    space_file.write_text(SPACE.replace("n_folds: 2\n", f"n_folds: 2\nsplit_file: {split}\n"))
    cache = tmp_path / "out" / "cache" / "demo"
    cache.mkdir(parents=True)
    write_manifest(cache, subjects=4)
    def no_ray(*args: object) -> None:
        raise AssertionError("the split file must be refused before Ray starts")

    monkeypatch.setattr(sweep_run, "init_ray", no_ray)
    with pytest.raises(SweepError, match=r"split file .*split.txt does not fit dataset 'demo'"):
        run_sweep(space_file, out=tmp_path / "out", trainable=fake_trial)


def test_an_empty_cache_and_a_missing_one_are_reported_together(tmp_path: Path) -> None:
    from orchestrator.sweep.caches import preflight
    from orchestrator.sweep.errors import SweepError
    from orchestrator.sweep.space_file import load_search_space

    space_file = tmp_path / "two.yaml"
    space_file.write_text(SPACE.replace("datasets: [demo]", "datasets: [demo, ravdess]"))
    empty = tmp_path / "cache" / "demo"
    empty.mkdir(parents=True)
    write_manifest(empty, subjects=0)
    with pytest.raises(SweepError, match=r"\(2 problems\)") as err:
        preflight(load_search_space(space_file), tmp_path / "cache", data_root=None)
    assert "no preprocessing cache for dataset 'ravdess'" in str(err.value)
    assert "the cache of dataset 'demo'" in str(err.value) and "has no usable clip" in str(err.value)


def test_preflight_names_a_missing_checkpoint_and_a_class_without_clips(tmp_path: Path) -> None:
    from orchestrator.sweep.caches import checkpoint_problems, fold_problems
    from orchestrator.sweep.space_file import load_search_space

    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE.replace("encoder: tiny", f"encoder: tiny, encoder_checkpoint: {tmp_path / 'no.pth'}"))
    space = load_search_space(space_file)
    (problem,) = checkpoint_problems(space)
    assert problem.startswith("fixed.encoder_checkpoint: no file at") and "no.pth" in problem
    (tmp_path / "no.pth").write_bytes(b"weights")
    assert checkpoint_problems(space) == []
    cache = tmp_path / "cache" / "demo"
    cache.mkdir(parents=True)
    write_manifest(cache, subjects=4)  # labels 0 and 1 only
    (cache / "settings.json").write_text(json.dumps({"class_names": ["class0", "class1", "angry"]}))
    (problem,) = fold_problems(space, tmp_path / "cache")
    assert "has no usable clip of class(es) ['angry']" in problem


def test_trial_runs_left_running_by_a_dead_worker_are_closed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from orchestrator import tracking
    from orchestrator.sweep.parents import close_trial_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.ensure_experiment(uri, "e")
    client = MlflowClient(uri)

    def run(sweep: str, stage: str) -> str:
        return client.create_run(experiment, tags={"sweep": sweep, "stage": stage}).info.run_id

    orphan, parent, other = run("s", "cv"), run("s", "sweep"), run("t", "search")
    assert close_trial_runs(uri, experiment, "s", "FAILED") == 1
    status = {r: client.get_run(r).info.status for r in (orphan, parent, other)}
    assert status == {orphan: "FAILED", parent: "RUNNING", other: "RUNNING"}
    assert close_trial_runs(uri, experiment, "s", "FAILED") == 0
