"""A validated search space: what the sweep needs from a ``search_spaces/*.yaml`` file.

A search space (format in ``search_spaces/README.md``) names the grid (datasets x architectures x
folds), the fixed trial settings and optionally the searched hyperparameters with their
distributions. ``orchestrator.sweep.space_file`` reads and validates a file into a
:class:`SweepSpace`, which gives an Optuna define-by-run function per (dataset, arch) group and the
fixed part of every trial config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    PlainValidator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass

import vocab

Problem = tuple[str, str]  # (key path, message)

SHIPPED_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
STRICT = ConfigDict(extra="forbid")  # every model of a space file: unknown keys are errors


class SearchSpaceError(ValueError):
    """A search space file is malformed; the message lists every problem with its key path.

    Attributes:
        path: The offending file.
        problems: ``(key path, message)`` of every problem; the key is ``""`` for the whole file.
        key: The first problem's key path (``search.params.lr.low``).
    """

    def __init__(self, path: Path | str, problems: Sequence[Problem]) -> None:
        self.path = Path(path)
        self.problems = list(problems)
        self.key = self.problems[0][0] if self.problems else ""
        lines = [f"{key}: {message}" if key else message for key, message in self.problems]
        if len(lines) == 1:
            super().__init__(f"{self.path}: {lines[0]}")
        else:
            super().__init__(f"{self.path}: {len(lines)} problems\n" + "\n".join(f"  {x}" for x in lines))


# --------------------------------------------------------------------------- the validated space


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


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", validate_by_name=True))
class Scheduler:
    """ASHA early stopping inside one group's search (``time_attr="epoch"``); ``type`` in the file."""

    kind: Literal["asha"] = Field(alias="type")
    grace_period: Annotated[int, Field(strict=True, ge=1)] = 1
    reduction_factor: Annotated[float, Field(strict=True, gt=1)] = 2.0


@dataclass(frozen=True)
class Search:
    """The hyperparameter search (stage A) of every (dataset, arch) group.

    Attributes:
        params: Searched parameters, sampled in this order.
        num_samples: Configurations sampled per study (per group, or per outer fold when nested).
        folds: With pooled selection, the folds each configuration trains on (its score is the mean
            validation metric); with nested selection, unused (each outer fold is its own study).
        seed: Base seed; each study's sampler seed is derived from it and the study's key.
        max_concurrent: Trials of one study running at once (fewer = better-informed TPE); the
            sweep as a whole runs as many trials as the cluster's resources allow.
        scheduler: Optional ASHA within each study.
    """

    params: tuple[Param, ...]
    num_samples: int
    folds: tuple[int, ...]
    seed: int = 0
    max_concurrent: int = 4
    scheduler: Scheduler | None = None


def _gpu(value: Any) -> float | str:
    """``auto``, or a GPU count: fractions share one GPU, more than one must be whole."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"expected 'auto' or a number >= 0, got {value!r}; fractions such as 0.5 "
                         "share one GPU between two small trials")
    if value > 1 and value != int(value):
        raise ValueError(f"more than one GPU must be a whole number, got {value}")
    return float(value)


@pydantic_dataclass(frozen=True, config=STRICT)
class Resources:
    """What one trial asks for.

    Attributes:
        cpu: CPUs per trial (data loading, and the whole model on a CPU-only cluster).
        gpu: GPUs per trial, fractions allowed; ``"auto"`` = 1 when the cluster has GPUs, else 0.
        max_concurrent: Limit on concurrent final-CV trials (None: as many as resources allow).
    """

    cpu: Annotated[float, Field(strict=True, gt=0)] = 1.0
    gpu: Annotated[float | str, PlainValidator(_gpu)] = "auto"
    max_concurrent: Annotated[int, Field(strict=True, ge=1)] | None = None


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
        selection: ``nested`` (default) or ``pooled``: how a searched configuration is chosen for
            an outer fold (:data:`vocab.SELECTIONS`).
        fixed: Fixed trial settings, as :class:`TrialConfig` coerced them.
        search: The searched parameters, or None when every setting is fixed.
        preprocess: Settings for building a missing preprocessing cache (e.g. ``size``).
        resources: Per-trial resources.
        max_failures: Retries of a crashed trial (from its last checkpoint).
        split_file: A published subject split every dataset's folds come from (absolute path), or
            None for computed folds; either way the sweep stores the folds it uses as data.
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
    selection: str = vocab.SELECTION_NESTED
    fixed: Mapping[str, Any] = field(default_factory=dict)
    search: Search | None = None
    preprocess: Mapping[str, Any] = field(default_factory=dict)
    resources: Resources = field(default_factory=Resources)
    max_failures: int = 2
    split_file: str | None = None

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


# ------------------------------------------------------------------------- the file's structure
# The validation context holds ``n_folds`` and ``fixed`` as the file gives them, for the checks
# across sections (folds below n_folds, ASHA needs a fixed epoch budget).


# ------------------------------------------------------------------------------- distributions


# -------------------------------------------------------------------------------------- loading


# ------------------------------------------------------------------------------ searched params


# ----------------------------------------------------------------------------------- problems


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
    message = f"no such search space file; shipped spaces: {', '.join(names) or 'none found'}"
    raise SearchSpaceError(path, [("", message)])
