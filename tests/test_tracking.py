"""orchestrator.tracking against a real MLflow SQLite store under tmp_path."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from orchestrator import tracking
from orchestrator.tracking import (
    TrialLogger,
    default_tracking_uri,
    ensure_experiment,
    flat_metrics,
    get_or_create_run,
    mlflow_metric,
    resolve_tracking_uri,
)

CLASSES = ["angry", "happy", "sad"]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """One SQLite store for the module (store creation costs ~1 s)."""
    out = tmp_path_factory.mktemp("mlruns_out")
    return default_tracking_uri(out), out


def _runs_with_key(uri: str, experiment_id: str, key: str) -> list:
    return MlflowClient(uri).search_runs([experiment_id], filter_string=f"tags.trial_key = '{key}'")


def _tags(fold: int = 0) -> dict:
    return {"dataset": "demo", "arch": "cascaded_vit", "fold": fold, "sweep": "s1", "stage": "cv",
            "config_hash": "abc"}


def test_default_uri_is_absolute_sqlite_in_out_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri(Path("runs"))
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert uri.startswith("sqlite:////")  # absolute path: four slashes
    assert (tmp_path / "runs").is_dir()


def test_resolve_precedence_and_file_store_rejected(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, tmp_path) == default_tracking_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://head:5000"
    assert resolve_tracking_uri("sqlite:////x/m.db", tmp_path) == "sqlite:////x/m.db"
    for bad in ("file:///tmp/mlruns", "./mlruns"):
        with pytest.raises(ValueError, match="file store"):
            resolve_tracking_uri(bad, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "./mlruns")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        resolve_tracking_uri(None, tmp_path)


def test_ensure_experiment_idempotent_with_artifacts_under_out(store):
    uri, out = store
    first = ensure_experiment(uri, "exp-a")
    assert ensure_experiment(MlflowClient(uri), "exp-a") == first
    location = MlflowClient(uri).get_experiment(first).artifact_location
    assert location == (out / "mlartifacts" / "exp-a").as_uri()


def test_ensure_experiment_restores_deleted(store):
    uri, _ = store
    client = MlflowClient(uri)
    exp_id = ensure_experiment(uri, "exp-deleted")
    client.delete_experiment(exp_id)
    assert ensure_experiment(uri, "exp-deleted") == exp_id
    assert client.get_experiment(exp_id).lifecycle_stage == "active"


def test_get_or_create_run_is_idempotent_and_nests(store):
    uri, _ = store
    exp = ensure_experiment(uri, "exp-runs")
    parent = get_or_create_run(uri, exp, "sweep/s1", "s1", {"stage": "sweep", "sweep": "s1"})
    child = get_or_create_run(uri, exp, "s1/demo/f0", "f0", _tags(), parent_run_id=parent)
    assert get_or_create_run(uri, exp, "s1/demo/f0", "other", {"x": 1}) == child
    assert len(_runs_with_key(uri, exp, "s1/demo/f0")) == 1
    run = MlflowClient(uri).get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["fold"] == "0" and run.data.tags["trial_key"] == "s1/demo/f0"
    assert run.info.run_name == "f0"
    with pytest.raises(ValueError, match="quotes"):
        get_or_create_run(uri, exp, "it's", "x", {})


def test_trial_logger_epochs_never_duplicate_steps(store):
    uri, _ = store
    params = {"lr": 1e-3, "epochs": 3, "fold": 0, "encoder_checkpoint": None}
    logger = TrialLogger(uri, "exp-trial", "k-epochs", "run", _tags(), params)
    assert logger.log_epoch({"train_loss": 1.0, "val_uar": 0.2}, 0) == 2
    assert logger.log_epoch({"train_loss": 0.8, "val_uar": 0.3}, 1) == 2
    assert logger.log_epoch({"train_loss": 9.9, "val_uar": 9.9}, 1) == 0  # re-reported epoch
    client = MlflowClient(uri)
    history = client.get_metric_history(logger.run_id, mlflow_metric("train_loss"))
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.8)]
    assert client.get_run(logger.run_id).data.params == {
        "lr": "0.001", "epochs": "3", "fold": "0", "encoder_checkpoint": "None"}


def test_trial_logger_resume_reuses_run_and_keeps_params(store):
    uri, _ = store
    first = TrialLogger(uri, "exp-trial", "k-resume", "run", _tags(), {"lr": 0.1, "epochs": 2})
    first.log_epoch({"val_loss": 1.0}, 0)
    first.log_epoch({"val_loss": 0.9}, 1)
    first.finish("FAILED")
    # Resumed from the epoch-0 checkpoint with a changed param: must neither crash nor duplicate.
    resumed = TrialLogger(uri, "exp-trial", "k-resume", "run", _tags(), {"lr": 0.5, "epochs": 4})
    assert resumed.run_id == first.run_id
    client = MlflowClient(uri)
    assert client.get_run(resumed.run_id).info.status == "RUNNING"
    assert resumed.log_epoch({"val_loss": 0.95}, 1) == 0
    assert resumed.log_epoch({"val_loss": 0.7}, 2) == 1
    steps = [m.step for m in client.get_metric_history(resumed.run_id, mlflow_metric("val_loss"))]
    assert steps == [0, 1, 2]
    assert client.get_run(resumed.run_id).data.params == {"lr": "0.1", "epochs": "2"}
    resumed.finish()
    assert client.get_run(resumed.run_id).info.status == "FINISHED"


def test_log_final_metrics_and_artifacts(store, tmp_path):
    uri, _ = store
    y_true = [0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 2, 0, 2]
    clips = [f"c{i}" for i in range(8)]
    with TrialLogger(uri, "exp-trial", "k-final", "run", _tags(), {"lr": 0.1}) as logger:
        logger.log_final({"test_uar": 0.75, "best_epoch": 3}, y_true, y_pred, CLASSES, clips)
    client = MlflowClient(uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED"
    metrics = flat_metrics(run.data.metrics)
    assert metrics["test_recall_angry"] == pytest.approx(0.5)
    assert metrics["test_recall_happy"] == pytest.approx(1.0)
    assert metrics["test_recall_sad"] == pytest.approx(0.75)
    assert metrics["test_uar"] == 0.75 and metrics["best_epoch"] == 3
    names = {f.path for f in client.list_artifacts(logger.run_id)}
    assert names == {"confusion_matrix.png", "per_class_recall.csv", "predictions.csv"}
    folder = Path(client.download_artifacts(logger.run_id, "", str(tmp_path)))
    with Image.open(folder / "confusion_matrix.png") as image:
        assert image.format == "PNG" and min(image.size) > 100
    recall = list(csv.DictReader(open(folder / "per_class_recall.csv")))
    assert [(r["class"], float(r["recall"]), int(r["support"])) for r in recall] == [
        ("angry", 0.5, 2), ("happy", 1.0, 2), ("sad", 0.75, 4)]
    predictions = list(csv.DictReader(open(folder / "predictions.csv")))
    assert len(predictions) == 8 and predictions[6]["pred_name"] == "angry"
    assert predictions[6]["correct"] == "0"


def test_fold_confusion_sums_the_folds_predictions_without_a_download_bar(store, capfd):
    uri, _ = store
    folds = {"k-fold0": ([0, 0, 1, 2], [0, 1, 1, 2]), "k-fold1": ([1, 2, 2, 0], [1, 2, 0, 0])}
    run_ids = []
    for key, (y_true, y_pred) in folds.items():
        with TrialLogger(uri, "exp-trial", key, "run", _tags(), {"lr": 0.1}) as logger:
            logger.log_final({"test_uar": 0.5}, y_true, y_pred, CLASSES, [f"{key}-c{i}" for i in range(4)])
        run_ids.append(logger.run_id)
    capfd.readouterr()
    counts, names = tracking.fold_confusion(MlflowClient(uri), run_ids)
    assert "Downloading artifacts" not in capfd.readouterr().err  # one bar per fold would fill the sweep's log
    np.testing.assert_array_equal(counts, [[2, 1, 0], [0, 2, 0], [1, 0, 2]])
    assert names == list(CLASSES)


def test_context_manager_marks_failure(store):
    uri, _ = store
    with pytest.raises(RuntimeError):
        with TrialLogger(uri, "exp-trial", "k-fail", "run", _tags(), {}) as logger:
            raise RuntimeError("boom")
    assert MlflowClient(uri).get_run(logger.run_id).info.status == "FAILED"


def test_log_final_rejects_bad_predictions(store):
    uri, _ = store
    logger = TrialLogger(uri, "exp-trial", "k-bad", "run", _tags(), {})
    with pytest.raises(ValueError, match="equal lengths"):
        logger.log_final({}, [0, 1], [0], CLASSES, ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        logger.log_final({}, [0, 3], [0, 1], CLASSES, ["a", "b"])


def test_recall_metric_name_sanitises():
    assert tracking.recall_metric_name("Happy") == "test_recall_Happy"
    assert tracking.recall_metric_name("a/b(c)") == "test_recall_a_b_c_"


@pytest.mark.slow
def test_concurrent_processes_share_experiment_and_run(tmp_path):
    """Several processes opening a fresh store and the same trial key at once end up with one
    experiment and one run (MLflow alone fails with "table experiments already exists")."""
    uri = default_tracking_uri(tmp_path)
    script = textwrap.dedent(f"""
        from orchestrator.tracking import ensure_experiment, get_or_create_run
        exp = ensure_experiment({uri!r}, "race")
        print(exp, get_or_create_run({uri!r}, exp, "same-key", "r", {{}}))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    assert len({out.strip() for out, _ in outputs}) == 1
    exp_id = outputs[0][0].split()[0]
    assert len(_runs_with_key(uri, exp_id, "same-key")) == 1


def test_recall_csv_counts(tmp_path):
    confusion = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]])
    tracking._write_recall_csv(confusion, np.array([0.5, 1.0, np.nan]), ["a", "b", "c"], tmp_path / "r.csv")
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert rows == ["class,recall,support,correct", "a,0.500000,2,1", "b,1.000000,1,1", "c,,0,0"]
