"""What a sweep's Optuna studies leave on their MLflow group runs: optimisation history and parameter importances."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from orchestrator import tracking
from orchestrator.sweep.searcher import Study, open_study

logger = logging.getLogger(__name__)


def log_study_plots(tracking_uri: str, group_runs: Mapping[str, str], storage_url: str,
                    studies: Sequence[Study], mode: str) -> int:
    """Log ``optuna/<study>/history.png`` (and ``importance.png`` when Optuna can rank the searched
    parameters: 2+ completed trials whose values do not all tie) to each study's group run; returns
    how many files were logged.

    A study whose plots cannot be drawn (no completed trial) is skipped with a log line, never fatal.
    """
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    client = tracking.make_client(tracking_uri)
    logged = 0
    with tempfile.TemporaryDirectory(prefix="mtcae_optuna_") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for study in studies:
            handle = open_study(storage_url, study.name, mode)
            done = handle.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if not done:
                logger.info("study %s has no completed trial: no plots", study.name)
                continue
            drawings = {"history": plots.plot_optimization_history}
            if len(done) >= 2 and any(t.params for t in done):
                drawings["importance"] = plots.plot_param_importances
            folder = Path(tmp) / study.name
            folder.mkdir()
            for name, draw in drawings.items():
                try:
                    axes = _draw(draw, handle)
                except (ValueError, RuntimeError) as err:  # e.g. a parameter that never varied
                    logger.info("study %s: no %s plot (%s)", study.name, name, err)
                    continue
                figure = axes.figure  # a pyplot figure (Optuna draws with pyplot): closed once saved
                figure.set_size_inches(6.4, 4.0)
                figure.tight_layout()
                figure.savefig(folder / f"{name}.png", dpi=100)
                plt.close(figure)
                client.log_artifact(group_runs[study.group], str(folder / f"{name}.png"),
                                    artifact_path=f"optuna/{study.name}")
                logged += 1
    return logged


def _draw(draw: Callable[[Any], Any], study: Any) -> Any:
    """Optuna's drawing of ``study``; a ValueError when Optuna finds every importance equal.

    PED-ANOVA (Optuna's default importance) warns, and returns equal importances, when too few
    trials or tied values leave nothing to compare; a bar chart of those would claim a ranking.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        axes = draw(study)
    equal = [w for w in caught if "importances will be equal" in str(w.message)]
    if equal:
        import matplotlib.pyplot as plt

        plt.close(axes.figure)
        raise ValueError(f"importances undefined: {equal[0].message}")
    for w in caught:  # anything else Optuna said is still said
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return axes
