"""Reading a search-space YAML file: its schema, its validation against the trial config, every problem at once.

The file's structure is a set of pydantic models (``extra="forbid"``); what it says about trials is
checked by the trial's own schema, :class:`~orchestrator.trial.config.TrialConfig`: ``fixed`` is
validated as a trial config, and every bound, candidate and condition value of a searched
parameter as a value of its trial field. :func:`load_search_space` reports every problem of a
file at once, each with its key path, in one :class:`~orchestrator.sweep.space.SearchSpaceError`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

import vocab
from orchestrator.data.settings import RESIZE_MODES, SAMPLING_MODES
from orchestrator.sweep.space import (
    STRICT,
    Param,
    Problem,
    Resources,
    Scheduler,
    Search,
    SearchSpaceError,
    SweepSpace,
)
from orchestrator.trial.config import (
    SETTABLE_KEYS,
    SWEEP_KEYS,
    TrialConfig,
    field_problems,
    validation_problems,
)

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _unique(items: tuple | dict) -> Any:
    """Non-empty, no repeats (checked after the items, so a bad item is not also "empty")."""
    if not items:
        raise ValueError("expected at least one entry")
    if len(set(items)) != len(items):
        raise ValueError(f"duplicate entries in {list(items)}")
    return items


def _below_n_folds(fold: int, info: ValidationInfo) -> int:
    n_folds = (info.context or {}).get("n_folds")
    if type(n_folds) is int and fold >= n_folds:
        raise ValueError(f"fold {fold} is not in 0..{n_folds - 1}; folds are 0-based and below n_folds")
    return fold


def _validation_metric(metric: str) -> str:
    if metric not in vocab.SELECTION_METRICS:
        kind = "a test metric: selection never sees the test fold" if metric.startswith("test_") else \
            "not a metric the trainable selects on"
        raise ValueError(f"{metric!r} is {kind}; expected one of {list(vocab.SELECTION_METRICS)} (the same "
                         "metric picks the tested epoch, the Optuna objective and the tables' configuration)")
    return metric


def _names(names: tuple[str, ...]) -> Any:
    """A list of vocabulary names; a single name stands for a list of one."""
    return Annotated[tuple[Literal[names], ...], AfterValidator(_unique),
                     BeforeValidator(lambda v: [v] if isinstance(v, str) else v)]


Integer = Annotated[int, Field(strict=True)]


PositiveInt = Annotated[int, Field(strict=True, ge=1)]


Folds = Annotated[tuple[Annotated[int, Field(strict=True, ge=0), AfterValidator(_below_n_folds)], ...],
                  AfterValidator(_unique)]


class _Search(BaseModel):
    """The ``search`` section; each of ``params`` is checked on its own (:func:`_param`)."""

    model_config = STRICT
    num_samples: PositiveInt
    folds: Folds | None = None  # default: all folds
    seed: Integer = 0
    max_concurrent: PositiveInt = 4
    scheduler: Scheduler | None = None
    params: Annotated[dict[str, dict[str, Any]], AfterValidator(_unique)]

    @field_validator("folds")
    @classmethod
    def _pooled_only(cls, folds: tuple[int, ...] | None, info: ValidationInfo) -> tuple[int, ...] | None:
        if folds is not None and (info.context or {}).get("selection") != vocab.SELECTION_POOLED:
            raise ValueError("search folds exist only with `selection: pooled`; nested selection (the "
                             "default) searches inside every outer fold on its training subjects: drop "
                             "search.folds (top-level `folds:` limits the outer folds)")
        return folds

    @field_validator("scheduler")
    @classmethod
    def _asha(cls, scheduler: Scheduler | None, info: ValidationInfo) -> Scheduler | None:
        context, problems = info.context or {}, []
        n_folds = context.get("n_folds") if type(context.get("n_folds")) is int else 2
        if scheduler is not None and "epochs" not in context.get("fixed", {}):
            problems.append("ASHA needs a fixed epoch budget: set fixed.epochs (ASHA's max_t); do "
                            "not search epochs with ASHA")
        pooled = context.get("selection") == vocab.SELECTION_POOLED
        if pooled and scheduler is not None and len(info.data.get("folds") or range(n_folds)) != 1:
            problems.append("ASHA needs exactly one search fold: its rungs would compare trials of "
                            "different folds; set search.folds to one fold or drop the scheduler")
        if problems:
            raise ValueError("; ".join(problems))
        return scheduler


class _Preprocess(BaseModel):
    """Settings for the caches a sweep builds (``--data-root``)."""

    model_config = STRICT
    size: Annotated[int, Field(strict=True, ge=16)] | None = None
    sampling: Literal[SAMPLING_MODES] | None = None
    resize: Literal[RESIZE_MODES] | None = None
    workers: Annotated[int, Field(strict=True, ge=0)] | None = None


class _Failure(BaseModel):
    model_config = STRICT
    max_failures: Annotated[int, Field(strict=True, ge=-1)] = 2  # -1 retries forever, 0 never


class _File(BaseModel):
    """A search space file; ``fixed`` is checked by :class:`TrialConfig` (:func:`_fixed`)."""

    model_config = STRICT
    description: str = ""
    datasets: _names(vocab.DATASETS)
    archs: _names(vocab.ARCHITECTURES)
    n_folds: Annotated[int, Field(strict=True, ge=2)]
    folds: Folds | None = None  # default: all folds
    metric: Annotated[str, AfterValidator(_validation_metric)] = "val_uar"
    selection: Literal[vocab.SELECTIONS] = vocab.SELECTION_NESTED
    split_file: str | None = None  # a published split (relative to the space file), else computed folds
    mode: Literal["max", "min"] | None = None  # default: the metric's own direction
    fixed: dict[str, Any] = {}
    search: _Search | None = None
    preprocess: _Preprocess = _Preprocess()
    resources: Resources = Resources()
    failure: _Failure = _Failure()

    @field_validator("mode")
    @classmethod
    def _mode_fits_metric(cls, mode: str | None, info: ValidationInfo) -> str | None:
        metric = info.data.get("metric")
        wanted = vocab.SELECTION_METRICS.get(metric)
        if mode is not None and wanted is not None and mode != wanted:
            raise ValueError(f"{mode!r} contradicts metric {metric!r}, which is selected by its "
                             f"{wanted}imum; drop `mode` or set it to {wanted!r}")
        return mode

    @field_validator("fixed", "preprocess", "resources", "failure", mode="before")
    @classmethod
    def _empty(cls, value: Any) -> Any:
        """A section with nothing under it (``fixed:``) is an empty one."""
        return {} if value is None else value


def _as_number(value: Any) -> Any:
    """``"1e-4"`` -> 1e-4 (YAML 1.1 reads exponents without a dot as strings); else unchanged."""
    try:
        return float(value) if isinstance(value, str) else value
    except ValueError:
        return value


Bound = Annotated[float, BeforeValidator(_as_number), Field(strict=True, allow_inf_nan=False)]


class _Distribution(BaseModel):
    """What every distribution takes; ``when`` values are checked by :func:`_when`."""

    model_config = STRICT
    when: dict[str, Any] | None = None

    def range_problems(self) -> list[str]:
        """Problems of the distribution on its own (bounds, step, candidates)."""
        low, high, step = getattr(self, "low", 0), getattr(self, "high", 1), getattr(self, "step", None)
        log = getattr(self, "type", "") == "loguniform" or getattr(self, "log", False)
        problems = [] if low < high else [f"empty range: low ({low}) must be below high ({high})"]
        if log and low <= 0:
            problems.append(f"a log scale needs low > 0, got {low}")
        if step is not None and not 0 < step <= high - low:
            problems.append(f"step {step} must be in (0, high - low]")
        if log and step not in (None, 1):
            problems.append("a log scale cannot have a step; drop step")
        return problems


class _Uniform(_Distribution):
    type: Literal["uniform"]
    low: Bound
    high: Bound
    step: Bound | None = None


class _LogUniform(_Distribution):
    type: Literal["loguniform"]
    low: Bound
    high: Bound


class _Int(_Distribution):
    type: Literal["int"]
    low: Integer
    high: Integer
    step: Integer | None = None
    log: Annotated[bool, Field(strict=True)] = False


class _Choice(_Distribution):
    type: Literal["choice"]
    values: Annotated[tuple[Any, ...], Field(min_length=1)]

    def range_problems(self) -> list[str]:
        if len(set(map(repr, self.values))) != len(self.values):
            return [f"duplicate candidates in {list(self.values)}"]
        return []


_DISTRIBUTION_MODELS: dict[str, type[_Distribution]] = {
    "uniform": _Uniform, "loguniform": _LogUniform, "int": _Int, "choice": _Choice,
}


DISTRIBUTIONS: tuple[str, ...] = tuple(_DISTRIBUTION_MODELS)


def load_search_space(path: Path | str) -> SweepSpace:
    """Read and fully validate a search space file.

    Raises:
        SearchSpaceError: The file is missing or not YAML, or with every invalid key and value.
    """
    path = Path(path)
    raw = _read_yaml(path)
    problems: list[Problem] = []
    fixed = _fixed(raw.get("fixed"), problems)
    context = {"n_folds": raw.get("n_folds"), "fixed": fixed,
               "selection": raw.get("selection", vocab.SELECTION_NESTED)}
    file = _validate(_File, raw, "", problems, context)
    search = raw.get("search")
    params = search.get("params") if isinstance(search, dict) else None
    params = tuple(_param(str(name), spec, fixed, [str(n) for n in list(params)[:i]], problems)
                   for i, (name, spec) in enumerate(params.items())) if isinstance(params, dict) else ()
    if problems:
        order = {str(key): i for i, key in enumerate(raw)}  # report in file order, section by section
        problems.sort(key=lambda p: order.get(re.split(r"[.\[]", p[0])[0], len(order)))
        raise SearchSpaceError(path, problems)
    return _sweep_space(path, file, fixed, params)


def _sweep_space(path: Path, file: _File, fixed: dict[str, Any], params: tuple[Param, ...]) -> SweepSpace:
    all_folds = tuple(range(file.n_folds))
    s = file.search
    search = s and Search(params, s.num_samples, s.folds or all_folds, s.seed, s.max_concurrent, s.scheduler)
    return SweepSpace(
        path=path, name=path.stem, description=file.description, datasets=file.datasets,
        archs=file.archs, n_folds=file.n_folds, folds=file.folds or all_folds, metric=file.metric,
        selection=file.selection,
        split_file=str((path.parent / file.split_file).resolve()) if file.split_file else None,
        mode=file.mode or vocab.SELECTION_METRICS[file.metric], fixed=fixed, search=search, resources=file.resources,
        preprocess=file.preprocess.model_dump(exclude_none=True), max_failures=file.failure.max_failures,
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SearchSpaceError(path, [("", "no such file; pass a path, or a name from search_spaces/")])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SearchSpaceError(path, [("", f"not valid YAML: {err}")]) from err
    if not isinstance(raw, dict):
        message = "expected a mapping at the top level; see search_spaces/README.md for the format"
        raise SearchSpaceError(path, [("", message)])
    return raw


def _fixed(raw: Any, problems: list[Problem]) -> dict[str, Any]:
    """The fixed settings as :class:`TrialConfig` validates and coerces them (``${VAR}`` expanded)."""
    if not isinstance(raw, dict):
        return {}  # _File reports it
    settable = {key: _expand_env(value, f"fixed.{key}", problems) for key, value in raw.items()
                if not _key_problems(key, f"fixed.{key}", problems)}
    try:
        coerced = TrialConfig.model_validate(settable).model_dump()
    except ValidationError as err:
        problems += validation_problems(err, "fixed")
        return settable
    return {key: coerced[key] for key in settable}


def _key_problems(key: Any, where: str, problems: list[Problem]) -> bool:
    """Add a problem if a search space may not set ``key``; return whether one was added."""
    if key in SWEEP_KEYS:
        problems.append((where, "is set by the sweep itself; use datasets / archs / n_folds / folds"))
    elif key not in SETTABLE_KEYS:
        problems.append((where, f"unknown trial setting; {_suggest(str(key), SETTABLE_KEYS)}"))
    return key not in SETTABLE_KEYS


def _expand_env(value: Any, where: str, problems: list[Problem]) -> Any:
    """Replace ``${VAR}`` in a string value by the environment variable (which must be set)."""
    if not isinstance(value, str):
        return value
    for name in _ENV_REF.findall(value):
        if name not in os.environ:
            message = f"environment variable {name} is not set; export {name}=... before starting the sweep"
            problems.append((where, message))
    return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value)


def _param(name: str, spec: Any, fixed: Mapping[str, Any], earlier: list[str],
           problems: list[Problem]) -> Param | None:
    """One searched parameter, checked against its distribution's model and its trial field.

    Returns:
        The parameter, or None after adding at least one problem.
    """
    where, found = f"search.params.{name}", len(problems)
    _key_problems(name, where, problems)
    if name in fixed:
        problems.append((where, f"is both fixed and searched; remove fixed.{name}"))
    if not isinstance(spec, dict):
        return None  # _File reports that it is not a mapping
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in _DISTRIBUTION_MODELS:
        message = (f"unknown distribution {kind!r}; {_suggest(str(kind), DISTRIBUTIONS)}" if "type" in spec
                   else f"required key is missing; one of {', '.join(DISTRIBUTIONS)}")
        problems.append((f"{where}.type", message))
        return None
    if name in SETTABLE_KEYS:
        problems += _trial_value_problems(name, kind, spec, where)
    dist = _validate(_DISTRIBUTION_MODELS[kind], spec, where, problems)
    when = spec.get("when")
    when = _when(when, f"{where}.when", {"dataset", "arch", *fixed, *earlier}, problems) \
        if isinstance(when, dict) else ()
    problems += [(where, message) for message in (dist.range_problems() if dist else ())]
    if len(problems) > found:
        return None
    return Param(name, kind, when=when, **dist.model_dump(exclude={"type", "when"}))


def _trial_value_problems(name: str, kind: str, spec: dict[str, Any], where: str) -> list[Problem]:
    """Whether the trial field takes this distribution, and each bound or candidate as its value."""
    types = _TRIAL_TYPES[name]
    needs = {"int": "integer", "uniform": "number", "loguniform": "number"}.get(kind)
    if needs and needs not in types:
        hint = {"integer": "use type: int (or choice)", "number": "use uniform or loguniform"}
        return [(f"{where}.type", (f"{name} takes {'/'.join(types)} values; "
                                  f"{hint.get(types[0], 'use type: choice')}"))]
    bounds = [(b, _as_number(spec[b])) for b in ("low", "high") if b in spec]
    if kind == "choice" and isinstance(spec.get("values"), list):
        bounds = [(f"values[{i}]", value) for i, value in enumerate(spec["values"])]
    return [p for key, value in bounds for p in field_problems(name, value, f"{where}.{key}")]


def _when(raw: Mapping[str, Any], where: str, known: set[str],
          problems: list[Problem]) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """Conditions as ``(key, allowed values)``; each value is checked as a value of its trial field."""
    out = []
    for key, allowed in raw.items():
        if key not in known:
            message = "a condition can only test dataset, arch, a fixed setting or a parameter listed earlier"
            problems.append((f"{where}.{key}", f"{message}; {_suggest(str(key), known)}"))
            continue
        values = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        problems += [p for value in values for p in field_problems(key, value, f"{where}.{key}")]
        out.append((key, values))
    return tuple(out)


def _trial_types() -> dict[str, tuple[str, ...]]:
    """The JSON types each trial field takes (``integer``, ``number``, ``string``, ``boolean``)."""
    properties = TrialConfig.model_json_schema()["properties"]
    return {name: tuple(t["type"] for t in prop.get("anyOf", [prop]) if t.get("type") != "null")
            for name, prop in properties.items()}


_TRIAL_TYPES = _trial_types()


def _validate(model: type[BaseModel], data: Any, prefix: str, problems: list[Problem],
              context: Mapping[str, Any] | None = None) -> Any:
    """``model`` validated from ``data``, or None with every problem added under ``prefix``."""
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        problems += [_problem(model, item, prefix) for item in err.errors(include_url=False)]
        return None


def _problem(model: type, item: Mapping[str, Any], prefix: str) -> Problem:
    """One pydantic error as ``(key path, message)``; lists are indexed as ``archs[1]``."""
    loc, kind, path = item["loc"], item["type"], prefix
    for part in loc:
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else str(part)
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return path, f"unknown key; {_suggest(str(loc[-1]), _keys_at(model, loc[:-1]))}"
    if kind == "missing":
        return path, "required key is missing"
    message = item["msg"].removeprefix("Value error, ")
    message += "" if kind == "value_error" else f" (got {item['input']!r})"
    if kind == "literal_error":
        expected = re.findall(r"'([^']*)'", item["ctx"]["expected"])
        close = difflib.get_close_matches(str(item["input"]), expected, 1)
        message += f"; did you mean {close[0]!r}?" if close else ""
    return path, message


def _keys_at(model: type, loc: Sequence[Any]) -> list[str]:
    """The keys the (nested) model at ``loc`` accepts."""
    for part in loc:
        if isinstance(part, str) and part in model.__pydantic_fields__:
            annotation = model.__pydantic_fields__[part].annotation
            model = next(t for t in (annotation, *get_args(annotation)) if hasattr(t, "__pydantic_fields__"))
    return [info.alias or name for name, info in model.__pydantic_fields__.items()]


def _suggest(word: str, allowed: Sequence[str] | set[str]) -> str:
    close = difflib.get_close_matches(word, sorted(allowed), n=1)
    listing = ", ".join(sorted(allowed))
    return f"did you mean {close[0]!r}? allowed: {listing}" if close else f"allowed: {listing}"
