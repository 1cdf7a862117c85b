"""The real path under nested selection: run_sweep -> trial wrapper -> the real trainable, real Ray, real MLflow.

A tiny generated cache (6 subjects, 3 classes, 32 px), the tiny encoder and 2 epochs keep it to
about a minute on 2 cores; everything else is what a cluster runs.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from cache_fixture import write_tiny_cache

from orchestrator.tracking import flat_metrics

SPACE = """\
datasets: [demo]
archs: [cascaded_vit]
n_folds: 2
metric: val_uar
fixed: {encoder: tiny, decoder: official, decoder_dim: 16, decoder_head_dim: 8, decoder_depth: 1,
        batch_size: 4, epochs: 2, num_workers: 0}
search:
  num_samples: 2
  max_concurrent: 2
  params:
    lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
resources: {cpu: 1, gpu: 0}
failure: {max_failures: 0}
"""


@pytest.mark.slow
def test_nested_sweep_with_the_real_trainable_never_leaks_and_never_retrains(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    from orchestrator.data.cache import load_manifest
    from orchestrator.data.folds import read_folds
    from orchestrator.sweep.run import run_sweep

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cache = write_tiny_cache(tmp_path / "out" / "cache" / "demo")
    space = tmp_path / "nested.yaml"
    space.write_text(SPACE)
    result = run_sweep(space, out=tmp_path / "out", num_cpus=2, address="local", progress_interval_s=5.0)
    assert result.complete, result.summary()

    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs([result.experiment_id], filter_string="tags.stage = 'search'", max_results=100)
    assert len(runs) == 2 * 2  # num_samples x folds, nothing else
    assert not client.search_runs([result.experiment_id], filter_string="tags.stage = 'cv'")
    trained = [(r.data.tags["config_hash"], r.data.tags["fold"]) for r in runs]
    assert len(set(trained)) == len(trained), "a (config, fold) was trained twice"

    folds = read_folds(tmp_path / "out" / "sweeps" / "nested" / "folds" / "demo.json", load_manifest(cache.root))
    for run in runs:
        fold = folds[int(run.data.tags["fold"])]
        roles = {r: set(fold.subjects[r]) for r in ("train", "val", "test")}
        assert not (roles["train"] & roles["val"] or roles["train"] & roles["test"] or roles["val"] & roles["test"])
        # what this trial was tested on is exactly its fold's test clips: no other subject's clip
        text = client.download_artifacts(run.info.run_id, "predictions.csv", str(tmp_path / run.info.run_id))
        tested = {row["clip_id"] for row in csv.DictReader(io.StringIO(Path(text).read_text()))}
        assert tested == set(fold.test)

    for k in (0, 1):
        mine = [r for r in runs if r.data.tags["fold"] == str(k)]
        chosen = [r for r in mine if r.data.tags["selected"] == "true"]
        assert len(chosen) == 1
        best = max(flat_metrics(r.data.metrics)["best_val_uar"] for r in mine)
        assert flat_metrics(chosen[0].data.metrics)["best_val_uar"] == best  # chosen on validation, never on test
        row = next(r for r in result.cv_rows if r["fold"] == k)
        assert row["test_uar"] == flat_metrics(chosen[0].data.metrics)["test_uar"]

    sections = ("train/", "val/", "test/", "time/")
    for run in runs:  # MLflow pages: sectioned metric names, params that are hyperparameters only
        assert all(key.startswith(sections) for key in run.data.metrics), sorted(run.data.metrics)
        assert not {"cache_dir", "folds_file", "num_workers", "sweep", "stage"} & set(run.data.params)
        assert not [k for k, v in run.data.params.items() if v == "None" or v.startswith("/")]
        assert run.data.params["decoder_dropout"] == "0.3"  # the official preset's value, resolved
        assert run.data.tags["runtime.cache_dir"] == str(cache.root)
    group = client.search_runs([result.experiment_id], filter_string="tags.stage = 'group'")[0]
    assert {"confusion_counts.png", "confusion_normalised.png"} <= {a.path for a in client.list_artifacts(
        group.info.run_id)}  # summed over the folds' chosen trials
    assert {"cv_test_uar_mean", "cv_test_uar_std", "search_fold0_best_val_uar"} <= set(flat_metrics(group.data.metrics))

    version = client.get_model_version_by_alias("mtcae-nested-demo-cascaded_vit", "best")
    chosen = {r["run_id"] for r in result.cv_rows}
    assert version.tags["run_id"] in chosen and version.tags["sweep"] == "nested"
    assert version.tags["metric"] == "val_uar" and version.tags["fold"] in ("0", "1")
    assert any(m.source_run_id in chosen for m in client.search_logged_models(experiment_ids=[result.experiment_id]))

    again = run_sweep(space, out=tmp_path / "out", num_cpus=2, address="local")  # nothing left to train
    assert again.complete and again.cv_rows == result.cv_rows
    assert len(client.search_runs([result.experiment_id], filter_string="tags.stage = 'search'")) == 4
