"""The Optuna plots a group run gets (orchestrator.sweep.study_plots), on real Optuna and MLflow stores."""

from __future__ import annotations

import warnings
from pathlib import Path

from orchestrator import tracking
from orchestrator.sweep.searcher import Study, open_study
from orchestrator.sweep.study_plots import log_study_plots


def _study(storage: str, name: str, values: list[float]) -> Study:
    handle = open_study(storage, name, "max", metric="best_val_uar")
    for i, value in enumerate(values):
        handle.enqueue_trial({"lr": 1e-3 * (i + 1), "w_expr": 1.0 + 0.5 * i})
        trial = handle.ask()
        trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        trial.suggest_float("w_expr", 0.5, 4.0)
        handle.tell(trial, value)
    dataset, arch, fold = name.split("__")
    return Study(name, dataset, arch, None, (int(fold[-1]),), len(values), 0, int(fold[-1]))


def test_importances_are_drawn_only_when_optuna_can_rank_the_parameters(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    studies = [_study(storage, "demo__stl__fold0", [0.30, 0.50, 0.40, 0.70, 0.20, 0.60]),
               _study(storage, "demo__stl__fold1", [0.25, 0.25])]  # tied: PED-ANOVA ranks nothing
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = tracking.make_client(uri)
    experiment = client.create_experiment("plots", artifact_location=(tmp_path / "artifacts").as_uri())
    run = client.create_run(experiment).info.run_id
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logged = log_study_plots(uri, {"demo__stl": run}, storage, studies, "max")
    files = {a.path for s in studies for a in client.list_artifacts(run, f"optuna/{s.name}")}
    assert files == {"optuna/demo__stl__fold0/history.png", "optuna/demo__stl__fold0/importance.png",
                     "optuna/demo__stl__fold1/history.png"}
    assert logged == 3
    assert not [w for w in caught if "importances will be equal" in str(w.message)]
