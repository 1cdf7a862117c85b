"""A Tune snapshot a killed driver left half uploaded, and a searcher whose snapshot was lost.

``usable_snapshot`` runs on files laid out as Tune lays them out (real ``tuner.pkl`` and per-session
files); the searcher runs on a real Optuna SQLite storage a previous "driver" filled.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import optuna
import pytest
from test_sweep import SPACE

from orchestrator.sweep.searcher import (
    RETRY_OF,
    StudySearcher,
    open_study,
    sweep_studies,
)
from orchestrator.sweep.space_file import load_search_space
from orchestrator.sweep.tune_state import SET_ASIDE, usable_snapshot

OLD, NEW = "2026-12-02_10-00-00", "2026-12-02_11-00-00"


def _session(root: Path, session: str, damaged: str | None = None) -> None:
    files = {f"experiment_state-{session}.json": b'{"trial_data": []}',
             f"search_gen_state-{session}.json": pickle.dumps({"counter": 1}),
             f"searcher-state-{session}.pkl": pickle.dumps({"configs": {}})}
    for name, data in files.items():
        (root / name).write_bytes(data[: len(data) // 2] if name.startswith(damaged or "\0") else data)


@pytest.fixture
def experiment(tmp_path: Path) -> Path:
    root = tmp_path / "search"
    root.mkdir()
    (root / "tuner.pkl").write_bytes(pickle.dumps({"trainable": "run_cell"}))
    return root


def test_a_newer_snapshot_cut_short_is_set_aside_and_the_older_one_kept(experiment: Path, caplog) -> None:
    _session(experiment, OLD)
    _session(experiment, NEW, damaged="searcher-state")
    with caplog.at_level(logging.WARNING, "orchestrator.sweep.tune_state"):
        snapshot = usable_snapshot(str(experiment))
    assert snapshot.session == OLD
    # The whole newer set goes, not just its bad file: Tune would mix its trials with the old searcher.
    assert sorted(p.name for p in (experiment / SET_ASIDE).iterdir()) == [
        f"experiment_state-{NEW}.json", f"search_gen_state-{NEW}.json", f"searcher-state-{NEW}.pkl"]
    assert {p.name for p in experiment.iterdir()} == {
        "tuner.pkl", SET_ASIDE, f"experiment_state-{OLD}.json", f"search_gen_state-{OLD}.json",
        f"searcher-state-{OLD}.pkl"}
    assert f"searcher-state-{NEW}.pkl does not decode" in caplog.text and OLD in caplog.text
    assert usable_snapshot(str(experiment)).set_aside == [], "a second look finds nothing more to do"


def test_a_session_missing_a_kind_of_file_is_not_whole(experiment: Path) -> None:
    _session(experiment, OLD)
    _session(experiment, NEW)
    (experiment / f"searcher-state-{NEW}.pkl").unlink()  # killed before that file was uploaded
    snapshot = usable_snapshot(str(experiment))
    assert snapshot.session == OLD
    assert (f"searcher-state-{NEW}.pkl", "is missing") in snapshot.set_aside


def test_without_a_whole_snapshot_the_stage_starts_a_new_tune_run(experiment: Path, caplog) -> None:
    from ray import tune

    _session(experiment, OLD)
    (experiment / f"experiment_state-{OLD}.json").write_bytes(b"")
    with caplog.at_level(logging.WARNING, "orchestrator.sweep.tune_state"):
        snapshot = usable_snapshot(str(experiment))
    assert snapshot.session is None
    assert (f"experiment_state-{OLD}.json", "is empty") in snapshot.set_aside
    assert not tune.Tuner.can_restore(str(experiment)), "tuner.pkl is set aside too"
    assert (experiment / SET_ASIDE / "tuner.pkl").is_file()
    assert "starts a new Tune run" in caplog.text


def test_a_whole_snapshot_is_left_alone(experiment: Path) -> None:
    _session(experiment, OLD)
    _session(experiment, NEW)
    assert usable_snapshot(str(experiment)).session == NEW
    assert not (experiment / SET_ASIDE).exists()
    assert usable_snapshot(str(experiment / "never-started")).session is None


def _studies(tmp_path: Path):
    space_file = tmp_path / "fake.yaml"
    space_file.write_text(SPACE)
    return [s for s in sweep_studies(load_search_space(space_file)) if s.arch == "cascaded_vit"][:1]


def test_a_searcher_without_its_snapshot_takes_up_what_the_storage_holds(tmp_path: Path) -> None:
    """A previous driver finished configuration 0 and was training 1 when it died; its searcher
    state is gone. A new searcher must finish the study with those two, sampling nothing."""
    studies = _studies(tmp_path)
    study = studies[0]
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = StudySearcher(studies, "val_uar", "max", url, max_per_study=2)
    handed = [first.suggest(f"t{i}") for i in range(2)]
    first.on_trial_complete("t0", {"best_val_uar": 0.7})  # t1 dies with its driver
    storage = open_study(url, study.name, "max")
    assert [t.state.name for t in storage.trials] == ["COMPLETE", "RUNNING"]

    second = StudySearcher(studies, "val_uar", "max", url, max_per_study=2)  # no restore
    again = second.suggest("u0")
    assert {k: again[k] for k in ("config_index", "lr", "w_expr")} == {
        k: handed[1][k] for k in ("config_index", "lr", "w_expr")}, "the dead driver's trial 1, same parameters"
    assert second.suggest("u1") == second.FINISHED, "configuration 0 is done: nothing is handed out again"
    second.on_trial_complete("u0", {"best_val_uar": 0.8})
    trials = open_study(url, study.name, "max").trials
    assert [(t.state.name, t.value) for t in trials] == [("COMPLETE", 0.7), ("COMPLETE", 0.8)]


def test_a_searcher_with_an_older_snapshot_samples_no_configuration_twice(tmp_path: Path) -> None:
    """The snapshot predates a configuration the storage holds; the snapshot's sampler would draw
    that configuration's parameters again (same random state), wasting a configuration."""
    studies = [s.__class__(**{**s.__dict__, "num_configs": 3}) for s in _studies(tmp_path)]
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = StudySearcher(studies, "val_uar", "max", url, max_per_study=1)
    first.suggest("t0")
    first.on_trial_complete("t0", {"best_val_uar": 0.7})
    snapshot = pickle.dumps(first._get_state())  # what Tune saved
    first.suggest("t1")
    first.on_trial_complete("t1", {"best_val_uar": 0.75})  # after the snapshot, then the driver dies

    second = StudySearcher(studies, "val_uar", "max", url, max_per_study=1)
    second._set_state(pickle.loads(snapshot))
    third = second.suggest("u0")
    assert third is not None, "a third configuration is sampled, not the second one drawn again"
    assert third["config_index"] == 2, "configuration 1 is taken from the storage, not handed out again"
    second.on_trial_complete("u0", {"best_val_uar": 0.6})
    trials = open_study(url, studies[0].name, "max").trials
    assert len(trials) == 3 and len({tuple(sorted(t.params.items())) for t in trials}) == 3, [t.params for t in trials]
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    assert not any(RETRY_OF in t.user_attrs or "same_as_trial" in t.user_attrs for t in trials)


@pytest.fixture
def ray_session(monkeypatch: pytest.MonkeyPatch):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=1, include_dashboard=False)
    yield
    ray.shutdown()


def test_a_set_aside_session_leaves_the_staging_folder_a_stopped_driver_left(ray_session, experiment: Path) -> None:
    """On a running cluster a stopped driver's staging folder stays, holding the whole snapshot it
    was uploading; Tune restores its searcher from there, so that copy must go too."""
    from ray.train._internal.storage import StorageContext

    staging = Path(StorageContext(str(experiment.parent), experiment.name).experiment_driver_staging_path)
    staging.mkdir(parents=True)
    _session(experiment, OLD)
    _session(experiment, NEW, damaged="experiment_state")
    _session(staging, OLD)
    _session(staging, NEW)
    assert usable_snapshot(str(experiment)).session == OLD
    assert sorted(p.name for p in staging.iterdir()) == sorted(p.name for p in experiment.glob(f"*{OLD}*"))
