"""Sweep search spaces: the YAML format, its validation, and what the sweep needs from it.

A search space file (``search_spaces/*.yaml``, documented in ``search_spaces/README.md``) names the
grid (datasets x architectures x folds), the fixed trial settings, and optionally the searched
hyperparameters with their distributions::

    datasets: [ravdess]
    archs: [cascaded_vit, shared_vit]
    n_folds: 5
    fixed: {encoder: vit_large, decoder: paper, epochs: 100}
    search:
      num_samples: 20
      params:
        lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
        decoder_head_dim: {type: choice, values: [64, 128], when: {arch: [cascaded_vit]}}

:func:`load_search_space` reads and validates a file completely before anything is scheduled; every
problem raises :class:`SearchSpaceError` naming the file, the key and a hint. The result,
:class:`SweepSpace`, converts to an Optuna define-by-run function per (dataset, arch) group
(:meth:`SweepSpace.define_by_run`) and to the fixed part of every trial config
(:meth:`SweepSpace.fixed_config`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Kept in sync with model.ARCHITECTURES / model.encoder / model.decoder presets (a test checks it);
# listed here so validating a file does not import torch.
DATASETS: tuple[str, ...] = ("ravdess", "crema-d", "mead", "demo")
ARCHITECTURES: tuple[str, ...] = (
    "stl", "nonshared_mlp", "nonshared_vit", "shared_mlp", "shared_vit", "cascaded_vit",
)
VIT_DECODER_ARCHS: tuple[str, ...] = ("nonshared_vit", "shared_vit", "cascaded_vit")
ENCODERS: tuple[str, ...] = ("tiny", "vit_small", "vit_base", "vit_large")
DECODER_PRESETS: tuple[str, ...] = ("paper", "official")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")
FEATURE_CACHE_MODES: tuple[str, ...] = ("auto", "on", "off")

# Trial-config keys a search space may set, with their value type (docs/design.md, "Trial config").
SETTABLE_KEYS: dict[str, type] = {
    "seed": int, "encoder": str, "encoder_checkpoint": str, "freeze_encoder": bool,
    "use_pos_embed": bool, "head_order": str, "normalization": str, "decoder": str, "decoder_depth": int, "decoder_heads": int,
    "decoder_dim": int, "decoder_head_dim": int, "decoder_mlp_ratio": float,
    "decoder_dropout": float, "head_dropout": float, "w_box": float, "w_landmark": float,
    "w_expr": float, "lr": float, "weight_decay": float, "batch_size": int, "epochs": int,
    "early_stop_patience": int, "lr_patience": int, "lr_factor": float, "precision": str,
    "feature_cache": str, "num_workers": int, "cpu_heap": str,
}
# Keys the sweep sets itself for every trial; a search space may not set them.
SWEEP_KEYS: frozenset[str] = frozenset({
    "dataset", "arch", "fold", "n_folds", "cache_dir", "sweep", "stage", "tracking_uri",
    "experiment", "parent_run_id", "trial_key",
})
_CHOICES: dict[str, tuple[str, ...]] = {
    "encoder": ENCODERS, "decoder": DECODER_PRESETS, "precision": PRECISIONS,
    "feature_cache": FEATURE_CACHE_MODES, "head_order": ("norm_pool", "pool_norm"),
    "normalization": ("imagenet", "official"), "cpu_heap": ("retain", "default"),
}
_POSITIVE = {"lr", "batch_size", "epochs", "decoder_depth", "decoder_heads", "decoder_dim",
             "decoder_head_dim", "decoder_mlp_ratio", "early_stop_patience", "lr_patience",
             "lr_factor"}
_NON_NEGATIVE = {"weight_decay", "w_box", "w_landmark", "w_expr", "num_workers"}
_UNIT_INTERVAL = {"decoder_dropout", "head_dropout", "lr_factor"}  # [0, 1)

DISTRIBUTIONS: tuple[str, ...] = ("uniform", "loguniform", "int", "choice")
_PARAM_FIELDS: dict[str, set[str]] = {
    "uniform": {"type", "low", "high", "step", "when"},
    "loguniform": {"type", "low", "high", "when"},
    "int": {"type", "low", "high", "step", "log", "when"},
    "choice": {"type", "values", "when"},
}
_TOP_KEYS = {"description", "datasets", "archs", "n_folds", "folds", "metric", "mode", "fixed",
             "search", "preprocess", "resources", "failure"}
_SEARCH_KEYS = {"num_samples", "folds", "seed", "max_concurrent", "scheduler", "params"}
_SCHEDULER_KEYS = {"type", "grace_period", "reduction_factor"}
_RESOURCE_KEYS = {"cpu", "gpu", "max_concurrent"}
_FAILURE_KEYS = {"max_failures"}
_PREPROCESS_KEYS = {"size", "sampling", "resize", "workers"}
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SearchSpaceError(ValueError):
    """A search space file is malformed; the message names the file, the key and a hint.

    Attributes:
        path: The offending file.
        key: Dotted key inside the file (``search.params.lr.low``), or ``""`` for the whole file.
    """

    def __init__(self, path: Path | str, key: str, problem: str, hint: str = "") -> None:
        self.path = Path(path)
        self.key = key
        where = f"{self.path}: {key}" if key else str(self.path)
        super().__init__(f"{where}: {problem}" + (f" (hint: {hint})" if hint else ""))


@dataclass(frozen=True)
class Param:
    """One searched hyperparameter.

    Attributes:
        name: Trial-config key.
        kind: One of :data:`DISTRIBUTIONS`.
        low: Lower bound (uniform, loguniform, int).
        high: Upper bound, inclusive as in Optuna.
        step: Discretisation step (uniform, int), or None.
        log: Sample an int on a log scale.
        values: Candidates of a ``choice``.
        when: Conditions ``(key, allowed values)``; the parameter is sampled only when every key
            of the partial config (dataset, arch, fixed settings, earlier parameters) has an
            allowed value.
    """

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    values: tuple[Any, ...] = ()
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, partial: Mapping[str, Any]) -> bool:
        """Whether the conditions hold for ``partial`` (a key missing from it fails them)."""
        return all(key in partial and partial[key] in allowed for key, allowed in self.when)

    def suggest(self, trial: Any) -> Any:
        """Draw this parameter from an ``optuna.Trial`` (or anything with its ``suggest_*``)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        if self.kind == "int":
            step = int(self.step or 1)
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=step, log=self.log)
        return trial.suggest_float(
            self.name, self.low, self.high, step=self.step, log=self.kind == "loguniform"
        )


@dataclass(frozen=True)
class Scheduler:
    """ASHA early stopping inside one group's search (``time_attr="epoch"``)."""

    kind: str = "asha"
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class Search:
    """The hyperparameter search (stage A) of every (dataset, arch) group.

    Attributes:
        params: Searched parameters, sampled in this order.
        num_samples: Configurations sampled per group.
        folds: CV folds each configuration trains on; its score is the mean validation metric.
        seed: Base seed; each group's sampler seed is derived from it and the group key.
        max_concurrent: Trials of one group running at once (fewer = better-informed TPE).
        scheduler: Optional ASHA within the group.
    """

    params: tuple[Param, ...]
    num_samples: int
    folds: tuple[int, ...]
    seed: int = 0
    max_concurrent: int = 4
    scheduler: Scheduler | None = None


@dataclass(frozen=True)
class Resources:
    """What one trial asks for.

    Attributes:
        cpu: CPUs per trial (data loading, and the whole model on a CPU-only cluster).
        gpu: GPUs per trial, fractions allowed; ``"auto"`` = 1 when the cluster has GPUs, else 0.
        max_concurrent: Limit on concurrent final-CV trials (None: as many as resources allow).
    """

    cpu: float = 1.0
    gpu: float | str = "auto"
    max_concurrent: int | None = None


@dataclass(frozen=True)
class SweepSpace:
    """A validated search space file.

    Attributes:
        path: Where it was read from.
        name: Default sweep name (the file stem).
        description: Free text.
        datasets: Datasets of the grid.
        archs: Architectures of the grid.
        n_folds: Number of CV folds the data are split into.
        folds: Folds the final cross-validation runs (default: all).
        metric: Validation metric that scores configurations (``val_*``, never a test metric).
        mode: ``max`` or ``min``.
        fixed: Fixed trial settings.
        search: The searched parameters, or None when every setting is fixed.
        preprocess: Settings for building a missing preprocessing cache (e.g. ``size``).
        resources: Per-trial resources.
        max_failures: Retries of a crashed trial (from its last checkpoint).
    """

    path: Path
    name: str
    description: str
    datasets: tuple[str, ...]
    archs: tuple[str, ...]
    n_folds: int
    folds: tuple[int, ...]
    metric: str = "val_uar"
    mode: str = "max"
    fixed: Mapping[str, Any] = field(default_factory=dict)
    search: Search | None = None
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    resources: Resources = Resources()
    max_failures: int = 2

    def groups(self) -> list[tuple[str, str]]:
        """The (dataset, arch) groups, in file order."""
        return [(d, a) for d in self.datasets for a in self.archs]

    def group_params(self, dataset: str, arch: str) -> tuple[Param, ...]:
        """Searched parameters that can be active in this group (conditions on group keys)."""
        if self.search is None:
            return ()
        group = {"dataset": dataset, "arch": arch}
        return tuple(
            p for p in self.search.params
            if all(k not in group or group[k] in allowed for k, allowed in p.when)
        )

    def fixed_config(self, dataset: str, arch: str) -> dict[str, Any]:
        """The fixed trial settings of a group (without the keys the sweep adds)."""
        del dataset, arch  # the same fixed settings for every group; kept for a uniform API
        return dict(self.fixed)

    def define_by_run(self, dataset: str, arch: str) -> GroupSpace:
        """An Optuna define-by-run function for one group's study."""
        return GroupSpace(self.group_params(dataset, arch), dataset, arch, dict(self.fixed))


@dataclass(frozen=True)
class GroupSpace:
    """Optuna define-by-run space of one (dataset, arch) group; picklable.

    Calling it with an ``optuna.Trial`` samples every active parameter in file order and returns the
    sampled values (conditions see the group keys, the fixed settings and earlier samples).
    """

    params: tuple[Param, ...]
    dataset: str
    arch: str
    fixed: Mapping[str, Any]

    def __call__(self, trial: Any) -> dict[str, Any]:
        partial: dict[str, Any] = {**self.fixed, "dataset": self.dataset, "arch": self.arch}
        sampled: dict[str, Any] = {}
        for param in self.params:
            if param.active(partial):
                sampled[param.name] = partial[param.name] = param.suggest(trial)
        return sampled


# --------------------------------------------------------------------------------------------
# Loading and validation


def load_search_space(path: Path | str) -> SweepSpace:
    """Read and fully validate a search space file.

    Raises:
        SearchSpaceError: The file is missing, not YAML, or any key or value is invalid.
    """
    path = Path(path)
    raw = _read_yaml(path)
    _check_keys(path, "", raw, _TOP_KEYS, required={"datasets", "archs", "n_folds"})
    v = _Validator(path)
    n_folds = v.positive_int("n_folds", raw["n_folds"], minimum=2)
    folds = v.folds("folds", raw.get("folds", list(range(n_folds))), n_folds)
    fixed = v.fixed(raw.get("fixed") or {})
    return SweepSpace(
        path=path,
        name=path.stem,
        description=str(raw.get("description", "")),
        datasets=v.names("datasets", raw["datasets"], DATASETS),
        archs=v.names("archs", raw["archs"], ARCHITECTURES),
        n_folds=n_folds,
        folds=folds,
        metric=v.metric(raw.get("metric", "val_uar")),
        mode=v.one_of("mode", raw.get("mode", "max"), ("max", "min")),
        fixed=fixed,
        search=v.search(raw.get("search"), n_folds, fixed),
        preprocess=v.preprocess(raw.get("preprocess") or {}),
        resources=v.resources(raw.get("resources") or {}),
        max_failures=v.failure(raw.get("failure") or {}),
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SearchSpaceError(path, "", "no such file", "pass a path, or a name from search_spaces/")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SearchSpaceError(path, "", f"not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise SearchSpaceError(path, "", "expected a mapping at the top level",
                               "see search_spaces/README.md for the format")
    return raw


def _check_keys(
    path: Path, where: str, raw: Any, allowed: set[str], required: frozenset[str] | set[str] = frozenset()
) -> None:
    """Raise on a non-mapping, an unknown key (with the closest allowed one) or a missing key."""
    if not isinstance(raw, dict):
        raise SearchSpaceError(path, where or "<top>", f"expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in allowed:
            raise SearchSpaceError(path, _join(where, str(key)), "unknown key",
                                   _suggest(str(key), allowed))
    for key in sorted(required - set(raw)):
        raise SearchSpaceError(path, _join(where, key), "required key is missing")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _suggest(word: str, allowed: Sequence[str] | set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, sorted(allowed), n=1)
    listing = ", ".join(sorted(allowed))
    return f"did you mean {close[0]!r}? allowed: {listing}" if close else f"allowed: {listing}"


class _Validator:
    """Per-section validation of one file; every method raises :class:`SearchSpaceError`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str, hint: str = "") -> SearchSpaceError:
        return SearchSpaceError(self.path, key, problem, hint)

    # ---- scalars and lists

    def positive_int(self, key: str, value: Any, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def one_of(self, key: str, value: Any, allowed: Sequence[str]) -> str:
        if value not in allowed:
            raise self.fail(key, f"unknown value {value!r}", _suggest(str(value), allowed))
        return value

    def names(self, key: str, value: Any, allowed: Sequence[str]) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise self.fail(key, "expected a non-empty list", f"choose from {', '.join(allowed)}")
        for i, item in enumerate(items):
            self.one_of(f"{key}[{i}]", item, allowed)
        if len(set(items)) != len(items):
            raise self.fail(key, f"duplicate entries in {items}")
        return tuple(items)

    def folds(self, key: str, value: Any, n_folds: int) -> tuple[int, ...]:
        if not isinstance(value, list) or not value:
            raise self.fail(key, "expected a non-empty list of fold indices",
                            f"folds are 0..{n_folds - 1}")
        for i, fold in enumerate(value):
            if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < n_folds:
                raise self.fail(f"{key}[{i}]", f"fold {fold!r} is not in 0..{n_folds - 1}",
                                "folds are 0-based and below n_folds")
        if len(set(value)) != len(value):
            raise self.fail(key, f"duplicate folds in {value}")
        return tuple(value)

    def metric(self, value: Any) -> str:
        if not isinstance(value, str) or not value.startswith("val_"):
            raise self.fail("metric", f"{value!r} is not a validation metric",
                            "configurations are selected on validation metrics (val_uar, "
                            "val_war, val_accuracy, val_loss, ...), never on test metrics")
        return value

    # ---- trial settings

    def fixed(self, raw: Any) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail("fixed", f"expected a mapping of trial settings, got {type(raw).__name__}")
        out = {}
        for key, value in raw.items():
            where = f"fixed.{key}"
            self.settable(where, key)
            out[key] = self.setting(where, key, _expand_env(self, where, value))
        return out

    def settable(self, where: str, key: Any) -> None:
        if key in SWEEP_KEYS:
            raise self.fail(where, "is set by the sweep itself",
                            "use the top-level datasets / archs / n_folds / folds keys")
        if key not in SETTABLE_KEYS:
            raise self.fail(where, "unknown trial setting", _suggest(str(key), SETTABLE_KEYS))

    def setting(self, where: str, key: str, value: Any) -> Any:
        """Check one setting's value against its type, enumeration and range."""
        if value is None and key == "encoder_checkpoint":
            return None
        if key == "feature_cache" and isinstance(value, bool):
            value = "on" if value else "off"  # the trainable accepts both spellings
        expected = SETTABLE_KEYS[key]
        value = self.typed(where, expected, value)
        if key in _CHOICES:
            self.one_of(where, value, _CHOICES[key])
        self.in_range(where, key, value)
        return value

    def typed(self, where: str, expected: type, value: Any) -> Any:
        if expected is float and isinstance(value, str):
            value = _as_number(value)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise self.fail(where, f"expected {expected.__name__}, got {value!r}")
        return value

    def in_range(self, where: str, key: str, value: Any) -> None:
        if key in _POSITIVE and not value > 0:
            raise self.fail(where, f"must be > 0, got {value!r}")
        if key in _NON_NEGATIVE and not value >= 0:
            raise self.fail(where, f"must be >= 0, got {value!r}")
        if key in _UNIT_INTERVAL and not 0 <= value < 1:
            raise self.fail(where, f"must be in [0, 1), got {value!r}")

    # ---- search

    def search(self, raw: Any, n_folds: int, fixed: Mapping[str, Any]) -> Search | None:
        if raw is None:
            return None
        _check_keys(self.path, "search", raw, _SEARCH_KEYS, required={"params", "num_samples"})
        params = self.params(raw["params"], fixed)
        folds = self.folds("search.folds", raw.get("folds", list(range(n_folds))), n_folds)
        scheduler = self.scheduler(raw.get("scheduler"))
        if scheduler is not None and "epochs" not in fixed:
            raise self.fail("search.scheduler", "ASHA needs a fixed epoch budget",
                            "set fixed.epochs (ASHA's max_t); do not search epochs with ASHA")
        if scheduler is not None and len(folds) != 1:
            raise self.fail("search.scheduler", "ASHA needs exactly one search fold",
                            "ASHA rungs would compare trials of different folds; set "
                            "search.folds to one fold or drop the scheduler")
        seed = raw.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise self.fail("search.seed", f"expected an integer, got {seed!r}")
        return Search(
            params=params,
            num_samples=self.positive_int("search.num_samples", raw["num_samples"]),
            folds=folds,
            seed=seed,
            max_concurrent=self.positive_int("search.max_concurrent", raw.get("max_concurrent", 4)),
            scheduler=scheduler,
        )

    def params(self, raw: Any, fixed: Mapping[str, Any]) -> tuple[Param, ...]:
        if not isinstance(raw, dict) or not raw:
            raise self.fail("search.params", "expected a non-empty mapping name -> distribution",
                            "drop the search section when nothing is searched")
        params: list[Param] = []
        for name, spec in raw.items():
            where = f"search.params.{name}"
            self.settable(where, name)
            if name in fixed:
                raise self.fail(where, "is both fixed and searched", f"remove fixed.{name}")
            params.append(self.param(where, name, spec, fixed, params))
        return tuple(params)

    def param(
        self, where: str, name: str, spec: Any, fixed: Mapping[str, Any], earlier: list[Param]
    ) -> Param:
        if not isinstance(spec, dict) or "type" not in spec:
            raise self.fail(where, "expected a mapping with a 'type'",
                            f"type is one of {', '.join(DISTRIBUTIONS)}")
        kind = spec["type"]
        if kind not in _PARAM_FIELDS:
            raise self.fail(f"{where}.type", f"unknown distribution {kind!r}",
                            _suggest(str(kind), DISTRIBUTIONS))
        _check_keys(self.path, where, spec, _PARAM_FIELDS[kind])
        when = self.when(f"{where}.when", spec.get("when"), fixed, earlier)
        if kind == "choice":
            return self.choice(where, name, spec, when)
        return self.ranged(where, name, kind, spec, when)

    def choice(self, where: str, name: str, spec: dict, when: tuple) -> Param:
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise self.fail(f"{where}.values", "expected a non-empty list of candidates")
        checked = tuple(self.setting(f"{where}.values", name, v) for v in values)
        if len(set(map(repr, checked))) != len(checked):
            raise self.fail(f"{where}.values", f"duplicate candidates in {values}")
        return Param(name, "choice", values=checked, when=when)

    def ranged(self, where: str, name: str, kind: str, spec: dict, when: tuple) -> Param:
        expected = SETTABLE_KEYS[name]
        if expected is bool or expected is str:
            raise self.fail(f"{where}.type", f"{name} takes {expected.__name__} values",
                            "use type: choice with a list of values")
        if expected is int and kind != "int":
            raise self.fail(f"{where}.type", f"{name} is an integer setting",
                            "use type: int (or choice)")
        if expected is float and kind == "int":
            raise self.fail(f"{where}.type", f"{name} is a float setting",
                            "use uniform or loguniform")
        low, high = (self.bound(f"{where}.{b}", spec.get(b), expected) for b in ("low", "high"))
        if not low < high:
            raise self.fail(where, f"empty range: low ({low}) must be below high ({high})")
        if kind == "loguniform" or spec.get("log"):
            if low <= 0:
                raise self.fail(f"{where}.low", f"a log scale needs low > 0, got {low}")
        for bound, value in (("low", low), ("high", high)):
            self.in_range(f"{where}.{bound}", name, value)
        step = self.step(where, spec.get("step"), expected, low, high)
        log = self.flag(f"{where}.log", spec.get("log", False))
        if log and step not in (None, 1):
            raise self.fail(f"{where}.step", "a log-scale int cannot have a step", "drop step")
        return Param(name, kind, low=low, high=high, step=step, log=log, when=when)

    def bound(self, where: str, value: Any, expected: type) -> float | int:
        if isinstance(value, str):
            value = _as_number(value)
        ok = isinstance(value, int) if expected is int else isinstance(value, (int, float))
        if value is None or isinstance(value, bool) or not ok or not math.isfinite(value):
            kind = "an integer" if expected is int else "a finite number"
            raise self.fail(where, f"expected {kind}, got {value!r}")
        return value if expected is int else float(value)

    def step(self, where: str, value: Any, expected: type, low: float, high: float) -> Any:
        if value is None:
            return None
        step = self.bound(f"{where}.step", value, expected)
        if step <= 0 or step > high - low:
            raise self.fail(f"{where}.step", f"step {step} must be in (0, high - low]")
        return step

    def flag(self, where: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {value!r}")
        return value

    def when(
        self, where: str, raw: Any, fixed: Mapping[str, Any], earlier: list[Param]
    ) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        if raw is None:
            return ()
        if not isinstance(raw, dict) or not raw:
            raise self.fail(where, "expected a mapping key -> allowed value(s)",
                            "e.g. when: {arch: [cascaded_vit, shared_vit]}")
        known = {"dataset", "arch", *fixed, *(p.name for p in earlier)}
        out = []
        for key, allowed in raw.items():
            if key not in known:
                raise self.fail(f"{where}.{key}", "a condition can only test dataset, arch, a "
                                "fixed setting or a parameter listed earlier",
                                _suggest(str(key), known))
            values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
            if key in ("dataset", "arch"):
                pool = DATASETS if key == "dataset" else ARCHITECTURES
                for value in values:
                    self.one_of(f"{where}.{key}", value, pool)
            out.append((str(key), values))
        return tuple(out)

    def scheduler(self, raw: Any) -> Scheduler | None:
        if raw is None:
            return None
        _check_keys(self.path, "search.scheduler", raw, _SCHEDULER_KEYS, required={"type"})
        self.one_of("search.scheduler.type", raw["type"], ("asha",))
        grace = self.positive_int("search.scheduler.grace_period", raw.get("grace_period", 1))
        factor = raw.get("reduction_factor", 2)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 1:
            raise self.fail("search.scheduler.reduction_factor", f"expected a number > 1, got {factor!r}")
        return Scheduler("asha", grace, float(factor))

    # ---- runtime sections

    def preprocess(self, raw: Any) -> dict[str, Any]:
        _check_keys(self.path, "preprocess", raw, _PREPROCESS_KEYS)
        if "size" in raw:
            self.positive_int("preprocess.size", raw["size"], minimum=16)
        return dict(raw)

    def resources(self, raw: Any) -> Resources:
        _check_keys(self.path, "resources", raw, _RESOURCE_KEYS)
        cpu = raw.get("cpu", 1)
        if isinstance(cpu, bool) or not isinstance(cpu, (int, float)) or cpu <= 0:
            raise self.fail("resources.cpu", f"expected a number > 0, got {cpu!r}")
        gpu = raw.get("gpu", "auto")
        if gpu != "auto" and (isinstance(gpu, bool) or not isinstance(gpu, (int, float)) or gpu < 0):
            raise self.fail("resources.gpu", f"expected 'auto' or a number >= 0, got {gpu!r}",
                            "fractions such as 0.5 share one GPU between two small trials")
        if isinstance(gpu, (int, float)) and gpu > 1 and gpu != int(gpu):
            raise self.fail("resources.gpu", f"more than one GPU must be a whole number, got {gpu}")
        limit = raw.get("max_concurrent")
        if limit is not None:
            limit = self.positive_int("resources.max_concurrent", limit)
        return Resources(float(cpu), gpu if gpu == "auto" else float(gpu), limit)

    def failure(self, raw: Any) -> int:
        _check_keys(self.path, "failure", raw, _FAILURE_KEYS)
        retries = raw.get("max_failures", 2)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < -1:
            raise self.fail("failure.max_failures", f"expected an integer >= -1, got {retries!r}",
                            "-1 retries forever, 0 never")
        return retries


def _as_number(text: str) -> Any:
    """``"1e-4"`` -> 1e-4 (YAML 1.1 reads exponents without a dot as strings); else unchanged."""
    try:
        return float(text)
    except ValueError:
        return text


def _expand_env(validator: _Validator, where: str, value: Any) -> Any:
    """Replace ``${VAR}`` in a string value by the environment variable (which must be set)."""
    if not isinstance(value, str):
        return value

    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise validator.fail(where, f"environment variable {name} is not set",
                                 f"export {name}=... before starting the sweep")
        return os.environ[name]

    return _ENV_REF.sub(sub, value)


def find_search_space(name_or_path: str | Path) -> Path:
    """Resolve ``SPACE``: an existing path, else a file of the repository's ``search_spaces/``.

    ``smoke``, ``smoke.yaml`` and ``search_spaces/smoke.yaml`` all name the shipped smoke space.

    Raises:
        SearchSpaceError: Nothing matches; the message lists the shipped spaces.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if shipped.is_file():
        return shipped
    names = sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml")) if SHIPPED_DIR.is_dir() else []
    raise SearchSpaceError(path, "", "no such search space file",
                           f"shipped spaces: {', '.join(names) or 'none found'}")


SHIPPED_DIR = Path(__file__).resolve().parent.parent / "search_spaces"
