"""The search stage's searcher: many Optuna studies behind one Tune run, their seeds and storage.

One sweep runs every study of its search at once, in one Tune run (:class:`StudySearcher`), so a
free slot always takes the next pending configuration of any study and no group waits for another
group's tail. A study is one (dataset, arch) group's search, or with nested selection one
(dataset, arch, outer fold)'s (:class:`Study`). ASHA, when enabled, keeps one bracket per study
(:class:`PerStudyScheduler`): trials of different studies never compete.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

import vocab
from orchestrator.hashing import stable_hash
from orchestrator.sweep.errors import SweepError
from orchestrator.sweep.space import GroupSpace, SweepSpace

logger = logging.getLogger(__name__)

SAME_AS = "same_as_trial"  # user attribute of a configuration sampled twice: the first one's number
RETRY_OF = "retry_of"  # user attribute of a COMPLETE trial recording a FAIL trial's later success


def study_seed(base_seed: int, dataset: str, arch: str, outer_fold: int | None = None) -> int:
    """A per-study sampler seed, so studies do not replay the same suggestion sequence."""
    parts: list[Any] = [base_seed, dataset, arch]
    if outer_fold is not None:
        parts.append(outer_fold)
    return int(stable_hash(parts, 8), 16)


@dataclass(frozen=True)
class Study:
    """One Optuna study of a sweep.

    Attributes:
        name: Optuna study name and the key of its state: ``<dataset>__<arch>`` (pooled) or
            ``<dataset>__<arch>__fold<k>`` (nested).
        dataset: Dataset of the group.
        arch: Architecture of the group.
        space: The group's define-by-run space.
        folds: Folds every configuration trains on; its score is the mean over them.
        num_configs: Configurations to sample.
        seed: Sampler seed.
        outer_fold: The outer fold this study selects for (nested selection), else None.
    """

    name: str
    dataset: str
    arch: str
    space: GroupSpace
    folds: tuple[int, ...]
    num_configs: int
    seed: int
    outer_fold: int | None = None

    @property
    def group(self) -> str:
        return f"{self.dataset}__{self.arch}"

    @property
    def num_trials(self) -> int:
        return self.num_configs * len(self.folds)


class StudySearcher(Searcher):
    """Optuna ask/tell for many studies at once, each configuration scored over its study's folds.

    Each configuration a study's sampler suggests (define-by-run, conditional parameters included)
    becomes one Tune trial per fold of the study; once all its folds are finished the study is told
    the mean of the folds' ``best_<metric>`` (the trial's own record of its selected epoch). The
    next trial goes to the study with the fewest running trials (then the fewest sampled), so
    every study's sampler learns from results as early as possible; ``max_per_study`` caps one
    study's running trials. A configuration equal to one the study already sampled is not trained
    again: it receives that configuration's score. The searcher's state is saved with Tune's
    experiment state, and the studies persist in an RDB storage, each trial carrying its folds'
    scores, trial keys and MLflow run ids as user attributes. The storage, not Tune's snapshot, is what
    a study sampled: a configuration a dead driver sampled after Tune's last usable snapshot (or with
    no usable snapshot at all) is taken up again (same number, same parameters), never failed and
    never sampled twice.

    Args:
        studies: The studies of the sweep's search.
        metric: Validation metric the trainable reports.
        mode: ``max`` or ``min``.
        storage_url: Optuna RDB URL (``sqlite:///.../optuna.db``).
        trial_key: Tune config -> the trial's key (its MLflow ``trial_key`` tag), for user attributes.
        run_id: Trial key -> its MLflow run id (None when it has none), for user attributes.
        max_per_study: Running trials of one study at once (None: no cap).
        prune_without: Result key that only a naturally finished trial reports; a fold whose last
            result lacks it was stopped early (ASHA) and prunes its configuration. None: never prune.
    """

    def __init__(
        self,
        studies: Sequence[Study],
        metric: str,
        mode: str,
        storage_url: str,
        trial_key: Callable[[Mapping[str, Any]], str] | None = None,
        run_id: Callable[[str], str | None] | None = None,
        max_per_study: int | None = None,
        prune_without: str | None = None,
    ) -> None:
        super().__init__(metric=metric, mode=mode)
        self._studies = {s.name: s for s in studies}
        self._storage_url = storage_url
        self._trial_key = trial_key
        self._run_id = run_id
        self._max_per_study = max_per_study
        self._prune_without = prune_without
        self._samplers: dict[str, Any] = {}
        self._configs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in studies}
        self._assigned: dict[str, tuple[str, int, int]] = {}
        self._best: dict[str, float] = {}
        self._finished_naturally: dict[str, bool] = {}
        self._open: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Open studies hold database connections; they are reopened from the storage URL on demand.
        return {k: v for k, v in self.__dict__.items() if k != "_open"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open = {}

    # ---- Tune's Searcher interface

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        """Accept metric/mode from ``TuneConfig``; the studies are fixed at construction."""
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next (study, configuration, fold), sampling a new configuration when one is due."""
        running: dict[str, int] = {}
        for name, _, _ in self._assigned.values():
            running[name] = running.get(name, 0) + 1
        candidates = [s for s in self._studies.values() if self._has_work(s)]
        if not candidates:
            return Searcher.FINISHED
        free = [s for s in candidates
                if self._max_per_study is None or running.get(s.name, 0) < self._max_per_study]
        for study in sorted(free, key=lambda s: (running.get(s.name, 0), len(self._configs[s.name]))):
            index = self._next_config(study)
            if index is None:
                continue
            config = self._configs[study.name][index]
            fold = study.folds[config["next"]]
            config["next"] += 1
            self._assigned[trial_id] = (study.name, index, fold)
            return self._tune_config(study, index, fold)
        return None  # every study with work left is at its cap: ask again when a trial ends

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
        """Record a fold's score; tell the study once every fold of the configuration is in."""
        if trial_id not in self._assigned:
            return
        if result:
            self.on_trial_result(trial_id, result)
        name, index, fold = self._assigned.pop(trial_id)
        study, config = self._studies[name], self._configs[name][index]
        tracked = self._best.pop(trial_id, None)
        # The trial's own record of its selected epoch when it finished (the same quantity the
        # tested weights and the tables use), else the best reported value (a pruned trial).
        final = (result or {}).get(f"best_{self._metric}")
        score = None if error else (float(final) if isinstance(final, (int, float)) else tracked)
        pruned = bool(self._prune_without) and not self._finished_naturally.pop(trial_id, False)
        config["folds"][str(fold)] = {"score": score, "pruned": pruned and not error}
        key = self._trial_key(self._tune_config(study, index, fold)) if self._trial_key else None
        run = self._run_id(key) if self._run_id and key else None
        self._set_attrs(name, config, {f"fold{fold}_{self._metric}": score, f"fold{fold}_trial_key": key,
                                       f"fold{fold}_mlflow_run_id": run})
        if len(config["folds"]) == len(study.folds):
            self._tell(name, index)

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
        keys = ("_samplers", "_configs", "_assigned", "_best", "_finished_naturally")
        return {k: getattr(self, k) for k in keys}

    def _set_state(self, state: Mapping[str, Any]) -> None:
        self.__dict__.update(state)
        self._open = {}

    def _tune_config(self, study: Study, index: int, fold: int) -> dict[str, Any]:
        return {"study": study.name, "dataset": study.dataset, "arch": study.arch, "fold": fold,
                "config_index": index, **self._configs[study.name][index]["params"]}

    def _has_work(self, study: Study) -> bool:
        configs = self._configs[study.name]
        return len(configs) < study.num_configs or any(
            c["alias"] is None and c["next"] < len(study.folds) for c in configs)

    def _next_config(self, study: Study) -> int | None:
        """A configuration with a fold still to hand out, sampling a new one when none has."""
        configs = self._configs[study.name]
        while True:
            index = next((i for i, c in enumerate(configs)
                          if c["alias"] is None and c["next"] < len(study.folds)), None)
            if index is not None:
                return index
            if len(configs) >= study.num_configs:
                return None
            self._new_config(study)

    def _study(self, name: str) -> Any:
        if name not in self._open:
            study = self._studies[name]
            self._open[name] = open_study(self._storage_url, name, self._mode, self._sampler(study),
                                          metric=self._metric)
        return self._open[name]

    def _sampler(self, study: Study, sampled: int = 0) -> Any:
        """The study's TPE sampler. ``sampled``: trials its storage holds that this searcher's state
        did not (a lost or older snapshot): a sampler seeded apart replaces it, as the old one's
        random state would draw those trials' parameters again."""
        if study.name not in self._samplers or sampled:
            import optuna

            seed = int(stable_hash([study.seed, sampled], 8), 16) if sampled else study.seed
            self._samplers[study.name] = optuna.samplers.TPESampler(seed=seed)
        return self._samplers[study.name]

    def _new_config(self, study: Study) -> None:
        """Add the study's next configuration: one its storage holds that this searcher does not know
        (a previous driver sampled it after Tune's last usable snapshot, or Tune's snapshot was lost),
        else a newly sampled one.

        A known-to-storage trial keeps its number and parameters. A finished one (COMPLETE, PRUNED, or
        FAIL with a ``retry_of`` twin) is taken as it stands: nothing of it is handed out again. A
        RUNNING one, or a FAIL one never retried, hands its folds out again; folds whose result MLflow
        holds report that record and train nothing (``run_cell``).
        """
        import optuna

        states = optuna.trial.TrialState
        handle = self._study(study.name)
        configs = self._configs[study.name]
        known = {c["number"] for c in configs}
        trials = handle.get_trials(deepcopy=False, states=(states.COMPLETE, states.PRUNED, states.FAIL,
                                                          states.RUNNING))
        retried = {t.user_attrs.get(RETRY_OF) for t in trials} - {None}
        unknown = [t for t in trials if t.number not in known and RETRY_OF not in t.user_attrs]
        if unknown:
            frozen = min(unknown, key=lambda t: t.number)
            done = frozen.state in (states.COMPLETE, states.PRUNED) or frozen.number in retried
            # A finished trial's parameters cannot be suggested again on it: replay them.
            trial = (optuna.trial.Trial(handle, frozen._trial_id) if frozen.state == states.RUNNING
                     else optuna.trial.FixedTrial(frozen.params, frozen.number))
            logger.info("study %s: taking up trial %d (%s) sampled by a previous driver%s", study.name,
                        frozen.number, frozen.state.name, "" if done else ": its folds are handed out again")
            number, trial_id = frozen.number, frozen._trial_id
            handle.sampler = self._sampler(study, sampled=len(trials))
        else:
            trial = handle.ask()
            number, trial_id, frozen, done = trial.number, trial._trial_id, None, False
        params = study.space(trial)
        alias = None if done else next((i for i, c in enumerate(configs) if c["params"] == params), None)
        config = {"number": number, "trial_id": trial_id, "params": params, "next": 0, "folds": {},
                  "told": False, "value": None, "alias": alias}
        if done:
            assert frozen is not None
            pruned = frozen.state == states.PRUNED
            config.update(next=len(study.folds), told=True, value=frozen.value, folds={
                str(f): {"score": frozen.user_attrs.get(f"fold{f}_{self._metric}", frozen.value), "pruned": pruned}
                for f in study.folds})
        configs.append(config)
        logger.debug("study %s: configuration %d = %s%s", study.name, len(configs) - 1, params,
                     "" if alias is None else f" (the same as configuration {alias}: not trained again)")
        if alias is not None and configs[alias]["told"]:
            self._tell(study.name, len(configs) - 1)

    def _set_attrs(self, name: str, config: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
        import optuna

        try:
            trial = optuna.trial.Trial(self._study(name), config["trial_id"])
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
        except (RuntimeError, ValueError) as err:  # the trial finished already (a resumed sweep)
            logger.debug("study %s: user attributes of trial %d not set: %s", name, config["number"], err)

    def _tell(self, name: str, index: int) -> None:
        import optuna

        states = optuna.trial.TrialState
        configs = self._configs[name]
        config = configs[index]
        source = configs[config["alias"]] if config["alias"] is not None else config
        folds = list(source["folds"].values())
        values = [f["score"] for f in folds]
        if any(v is None for v in values):
            state, value = states.FAIL, None
        elif any(f["pruned"] for f in folds):
            state, value = states.PRUNED, None
        else:
            state, value = states.COMPLETE, sum(values) / len(values)
        if config["alias"] is not None:
            self._set_attrs(name, config, {SAME_AS: source["number"]})
        try:
            self._study(name).tell(config["number"], value, state=state, skip_if_finished=True)
        except (ValueError, RuntimeError) as err:  # e.g. a NaN value
            logger.warning("study %s: could not record trial %d: %s", name, config["number"], err)
        config["told"], config["value"] = True, value
        for other, alias in enumerate(configs):
            if alias["alias"] == index and not alias["told"]:
                self._tell(name, other)


class PerStudyScheduler(FIFOScheduler):
    """One scheduler per study (ASHA brackets never compare trials of different studies).

    Args:
        make: Builds the scheduler of one study (e.g. an ``ASHAScheduler``).
    """

    def __init__(self, make: Callable[[], TrialScheduler]) -> None:
        super().__init__()
        self._make = make
        self._by_study: dict[str, TrialScheduler] = {}
        self._metric: str | None = None
        self._mode: str | None = None

    def _of(self, trial: Any) -> TrialScheduler:
        name = str(trial.config.get("study", ""))
        if name not in self._by_study:
            scheduler = self._make()
            scheduler.set_search_properties(self._metric, self._mode)
            self._by_study[name] = scheduler
        return self._by_study[name]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        self._metric, self._mode = metric, mode
        return all(s.set_search_properties(metric, mode) for s in self._by_study.values())

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"one scheduler per study ({len(self._by_study)} studies)"


def open_study(storage_url: str, study_name: str, mode: str, sampler: Any = None,
               metric: str | None = None) -> Any:
    """Create or load an Optuna study in an RDB storage (quietly); ``metric`` names its objective."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(
        storage_url, engine_kwargs={"connect_args": {"timeout": 60}}
    )
    study = optuna.create_study(
        storage=storage,
        sampler=sampler,
        study_name=study_name,
        direction="maximize" if mode == "max" else "minimize",
        load_if_exists=True,
    )
    if metric and study.metric_names != [metric]:
        with warnings.catch_warnings():  # experimental since Optuna 3.2; what the dashboard shows
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([metric])
    return study


def best_configuration(storage_url: str, study_name: str, mode: str) -> tuple[dict, float, int]:
    """The best completed configuration of a study: (params, mean score, number of completed).

    Raises:
        SweepError: No configuration of the study completed.
    """
    import optuna

    study = open_study(storage_url, study_name, mode)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise SweepError(f"no configuration of study {study_name} completed on all its folds; see "
                         "the failed trials above, fix the cause and re-run the sweep")
    best = max(done, key=lambda t: t.value if mode == "max" else -t.value)
    return dict(best.params), float(best.value), len(done)


def record_retried(storage_url: str, studies: Sequence[Study], mode: str, metric: str,
                   recorded: Callable[[str], Mapping[str, float] | None]) -> int:
    """Tell each study the configurations that failed for good and then completed on a re-run.

    Optuna cannot re-tell a finished trial, so each such configuration becomes a new COMPLETE trial
    with the same parameters and the user attribute ``retry_of`` (the FAIL trial's number); its value
    is the mean over its folds of ``best_<metric>`` as MLflow recorded it (the record of what
    finished). Pooled selection and the samplers then count it. Idempotent.

    Args:
        recorded: A fold trial's key -> its MLflow metrics once its result is recorded, else None.

    Returns:
        How many trials were added.
    """
    import optuna

    added = 0
    for study in studies:
        handle = open_study(storage_url, study.name, mode)
        trials = handle.get_trials(deepcopy=False)
        by_number = {t.number: t for t in trials}
        done = {t.user_attrs.get(RETRY_OF) for t in trials}
        for trial in trials:
            if trial.state != optuna.trial.TrialState.FAIL or trial.number in done:
                continue
            scores = _recorded_scores(by_number.get(trial.user_attrs.get(SAME_AS), trial),
                                      study.folds, metric, recorded)
            if scores is None:
                continue
            attrs = {**trial.user_attrs, RETRY_OF: trial.number,
                     **{f"fold{f}_{metric}": v for f, v in scores.items()}}
            handle.add_trial(optuna.trial.create_trial(
                params=trial.params, distributions=trial.distributions,
                value=sum(scores.values()) / len(scores), user_attrs=attrs))
            logger.info("study %s: trial %d failed before and has completed since; recorded as trial %d",
                        study.name, trial.number, len(handle.get_trials(deepcopy=False)) - 1)
            added += 1
    return added


def _recorded_scores(trial: Any, folds: Sequence[int], metric: str,
                     recorded: Callable[[str], Mapping[str, float] | None]) -> dict[int, float] | None:
    """``best_<metric>`` per fold from MLflow, or None while any fold has no recorded result."""
    scores = {}
    for fold in folds:
        key = trial.user_attrs.get(f"fold{fold}_trial_key")
        result = recorded(key) if key else None
        value = (result or {}).get(f"best_{metric}")
        if not isinstance(value, (int, float)) or math.isnan(value):
            return None
        scores[fold] = float(value)
    return scores


def sweep_studies(space: SweepSpace) -> list[Study]:
    """The studies of a space's search (none when nothing is searched).

    Nested selection: one study per (dataset, arch, outer fold), each configuration trained on that
    fold only. Pooled: one study per (dataset, arch), each configuration trained on every search fold.
    """
    search = space.search
    if search is None:
        return []
    studies = []
    for dataset, arch in space.groups():
        group_space = space.define_by_run(dataset, arch)
        if space.selection == vocab.SELECTION_NESTED:
            studies.extend(
                Study(f"{dataset}__{arch}__fold{k}", dataset, arch, group_space, (k,), search.num_samples,
                      study_seed(search.seed, dataset, arch, k), outer_fold=k)
                for k in space.folds)
        else:
            studies.append(Study(f"{dataset}__{arch}", dataset, arch, group_space, tuple(search.folds),
                                 search.num_samples, study_seed(search.seed, dataset, arch)))
    return studies


def unfinished_studies(storage_url: str, studies: Sequence[Study], mode: str) -> list[str]:
    """Studies whose storage holds fewer finished trials than configurations to sample."""
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    return [s.name for s in studies
            if len(open_study(storage_url, s.name, mode).get_trials(deepcopy=False, states=states)) < s.num_configs]
