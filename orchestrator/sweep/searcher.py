"""Stage A's searcher: per-group Optuna ask/tell over CV folds, group seeds, the study storage."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ray.tune.search import Searcher

from orchestrator.hashing import stable_hash
from orchestrator.sweep.errors import SweepError
from orchestrator.sweep.space import GroupSpace

logger = logging.getLogger(__name__)


def group_seed(base_seed: int, dataset: str, arch: str) -> int:
    """A per-group sampler seed, so groups do not replay the same suggestion sequence."""
    return int(stable_hash([base_seed, dataset, arch], 8), 16)


class FoldCVSearcher(Searcher):
    """Per-group Optuna search whose objective is the mean validation metric over CV folds.

    Each configuration Optuna suggests (define-by-run, conditional parameters included) is handed
    out as one Tune trial per search fold; when all its folds are finished the study is told the mean
    of the folds' best ``metric`` values. Its state (configurations, fold assignments, the sampler
    with its RNG) is saved with Tune's experiment state, and the study itself persists in an RDB
    storage, so ``Tuner.restore`` continues the same search.

    Args:
        space: The group's define-by-run space (:meth:`SweepSpace.define_by_run`).
        folds: Search folds; every configuration trains on each.
        metric: Validation metric reported by the trainable.
        mode: ``max`` or ``min``.
        num_configs: Configurations to sample.
        storage_url: Optuna RDB URL (``sqlite:///.../optuna.db``).
        study_name: Optuna study name (``"<dataset>__<arch>"``).
        seed: Sampler seed.
        prune_without: Result key that only a naturally finished trial reports; a fold whose last
            result lacks it was stopped early (ASHA) and prunes its configuration. None: never prune.
    """

    def __init__(
        self,
        space: GroupSpace,
        folds: Sequence[int],
        metric: str,
        mode: str,
        num_configs: int,
        storage_url: str,
        study_name: str,
        seed: int,
        prune_without: str | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self._space = space
        self._folds = tuple(folds)
        self._num_configs = num_configs
        self._storage_url = storage_url
        self._study_name = study_name
        self._seed = seed
        self._prune_without = prune_without
        self._sampler: Any = None
        self._study: Any = None
        self._configs: list[dict[str, Any]] = []
        self._assigned: dict[str, tuple[int, int]] = {}
        self._best: dict[str, float] = {}
        self._finished_naturally: dict[str, bool] = {}

    def __getstate__(self) -> dict[str, Any]:
        # The study holds a database connection; it is reopened from the storage URL on demand.
        return {k: v for k, v in self.__dict__.items() if k != "_study"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._study = None

    # ---- Tune's Searcher interface

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        """Accept metric/mode from ``TuneConfig``; the space is fixed at construction."""
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next (configuration, fold) pair, asking Optuna for a new configuration if needed."""
        index = next((i for i, c in enumerate(self._configs) if c["next"] < len(self._folds)), None)
        if index is None:
            if len(self._configs) >= self._num_configs:
                return Searcher.FINISHED
            index = self._new_config()
        config = self._configs[index]
        fold = self._folds[config["next"]]
        config["next"] += 1
        self._assigned[trial_id] = (index, fold)
        return {"dataset": self._space.dataset, "arch": self._space.arch, "fold": fold,
                "config_index": index, **config["params"]}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        """Track the best value of the metric a fold trial has reported."""
        value = result.get(self._metric)
        if self._prune_without and self._prune_without in result:
            self._finished_naturally[trial_id] = True
        if not isinstance(value, (int, float)) or math.isnan(value):
            return
        best = self._best.get(trial_id)
        if best is None or (value > best if self._mode == "max" else value < best):
            self._best[trial_id] = float(value)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        """Record a fold's score; tell Optuna once every fold of the configuration is in."""
        if trial_id not in self._assigned:
            return
        if result:
            self.on_trial_result(trial_id, result)
        index, fold = self._assigned.pop(trial_id)
        config = self._configs[index]
        tracked = self._best.pop(trial_id, None)
        # The trial's own record of its selected epoch when it finished (the same quantity the
        # tested weights and the tables use), else the best reported value (a pruned trial).
        final = (result or {}).get(f"best_{self._metric}")
        score = None if error else (float(final) if isinstance(final, (int, float)) else tracked)
        pruned = bool(self._prune_without) and not self._finished_naturally.pop(trial_id, False)
        config["folds"][str(fold)] = {"score": score, "pruned": pruned and not error}
        if len(config["folds"]) == len(self._folds):
            self._tell(config)

    def save(self, checkpoint_path: str) -> None:
        """Pickle the search state (Tune calls this with every experiment snapshot)."""
        import pickle

        with open(checkpoint_path, "wb") as handle:
            pickle.dump(self._get_state(), handle)

    def restore(self, checkpoint_path: str) -> None:
        """Load the state written by :meth:`save`."""
        import pickle

        with open(checkpoint_path, "rb") as handle:
            self._set_state(pickle.load(handle))

    # ---- internals

    def _get_state(self) -> dict[str, Any]:
        keys = ("_sampler", "_configs", "_assigned", "_best", "_finished_naturally")
        return {k: getattr(self, k) for k in keys}

    def _set_state(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        self._study = None

    def _get_study(self) -> Any:
        if self._study is None:
            self._study = open_study(self._storage_url, self._study_name, self._mode,
                                     self._get_sampler())
            self._fail_orphans()
        return self._study

    def _get_sampler(self) -> Any:
        if self._sampler is None:
            import optuna

            self._sampler = optuna.samplers.TPESampler(seed=self._seed)
        return self._sampler

    def _fail_orphans(self) -> None:
        """Fail study trials left RUNNING by a driver that died after asking for them."""
        import optuna

        mine = {c["number"] for c in self._configs if not c["told"]}
        for trial in self._study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial.number not in mine:
                logger.info("study %s: trial %d was lost with a previous driver; marking it failed",
                            self._study_name, trial.number)
                self._study.tell(trial.number, state=optuna.trial.TrialState.FAIL,
                                 skip_if_finished=True)

    def _new_config(self) -> int:
        trial = self._get_study().ask()
        params = self._space(trial)
        self._configs.append({"number": trial.number, "params": params, "next": 0, "folds": {},
                              "told": False, "value": None})
        logger.debug("study %s: configuration %d = %s", self._study_name, len(self._configs) - 1, params)
        return len(self._configs) - 1

    def _tell(self, config: dict[str, Any]) -> None:
        import optuna

        states = optuna.trial.TrialState
        folds = list(config["folds"].values())
        values = [f["score"] for f in folds]
        if any(v is None for v in values):
            state, value = states.FAIL, None
        elif any(f["pruned"] for f in folds):
            state, value = states.PRUNED, None
        else:
            state, value = states.COMPLETE, sum(values) / len(values)
        try:
            self._get_study().tell(config["number"], value, state=state, skip_if_finished=True)
        except (ValueError, RuntimeError) as err:  # e.g. a NaN value
            logger.warning("study %s: could not record trial %d: %s", self._study_name,
                           config["number"], err)
        config["told"], config["value"] = True, value


def open_study(storage_url: str, study_name: str, mode: str, sampler: Any = None) -> Any:
    """Create or load an Optuna study in an RDB storage (quietly)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(
        storage_url, engine_kwargs={"connect_args": {"timeout": 60}}
    )
    return optuna.create_study(
        storage=storage,
        sampler=sampler,
        study_name=study_name,
        direction="maximize" if mode == "max" else "minimize",
        load_if_exists=True,
    )


def best_configuration(storage_url: str, study_name: str, mode: str) -> tuple[dict, float, int]:
    """The best completed configuration of a study: (params, mean score, number of completed).

    Raises:
        SweepError: No configuration of the group completed.
    """
    import optuna

    study = open_study(storage_url, study_name, mode)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise SweepError(f"no configuration of group {study_name} completed on all its search "
                         "folds; see the failed trials above, fix the cause and re-run the sweep")
    best = max(done, key=lambda t: t.value if mode == "max" else -t.value)
    return dict(best.params), float(best.value), len(done)
