"""The trial configuration: one schema for Ray Tune's flat dict, ``mtcae train --set`` and search spaces.

:class:`TrialConfig` is a pydantic model (``extra="forbid"``, the vocabulary as literals, bounds as
fields): a search-space file is validated against this model itself (``orchestrator.sweep.space``),
never against a copy of its keys. Every problem of a config is reported at once, by key, in one
:class:`TrialConfigError`. The flat dict Ray passes becomes the model in exactly one place,
:meth:`TrialConfig.from_flat`.

Defaults follow the paper (section 4.2) and the authors' released code (official_spec.md 5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

import vocab
from orchestrator.hashing import stable_hash

DEFAULT_EXPERIMENT = "mtcae"

# Set by the sweep for every trial; a search space may not set them.
SWEEP_KEYS = frozenset({"dataset", "arch", "fold", "n_folds", "cache_dir", "sweep", "stage",
                        "tracking_uri", "experiment", "parent_run_id", "trial_key", "select_metric",
                        "folds_file"})
# Where a trial is logged, not what it is: not hashed, not logged as params.
TRACKING_KEYS = frozenset({"tracking_uri", "experiment", "parent_run_id", "trial_key"})
# Neither changes results: left out of the config hash and of the resume check.
RUNTIME_KEYS = frozenset({"cache_dir", "folds_file", "num_workers", "sweep", "stage"}) | TRACKING_KEYS
# The same configuration on every fold has the same hash, so the tables can group its folds.
CONFIG_HASH_EXCLUDED = frozenset({"fold"})


class TrialConfigError(ValueError):
    """A trial config (or the part of a search space that sets one) is invalid.

    Attributes:
        problems: ``(key path, message)`` for every problem found.
    """

    def __init__(self, problems: Sequence[tuple[str, str]], source: str = "trial config") -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  {key}: {message}" for key, message in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s)\n{lines}")


def _none_words(value: Any) -> Any:
    """``"none"``/``"null"``/``""`` from a command line mean None for an optional field."""
    if isinstance(value, str) and value.strip().lower() in ("none", "null", ""):
        return None
    return _plain(value)


def _plain(value: Any) -> Any:
    """NumPy scalars (what Tune and Optuna hand out) as Python scalars."""
    item = getattr(value, "item", None)
    return item() if callable(item) and getattr(value, "shape", None) == () else value


def _on_off(value: Any) -> Any:
    """``feature_cache`` also takes a bool: True is ``on``, False is ``off``."""
    value = _plain(value)
    return ("on" if value else "off") if isinstance(value, bool) else value


Plain = BeforeValidator(_plain)
Optional = BeforeValidator(_none_words)
PositiveInt = Annotated[int, Plain, Field(ge=1)]
Weight = Annotated[float, Plain, Field(ge=0.0)]
Probability = Annotated[float, Plain, Field(ge=0.0, lt=1.0)]


class TrialConfig(BaseModel):
    """Everything one trial needs: one architecture on one fold of one dataset.

    ``None`` for a ``decoder_*`` field keeps the value of the ``decoder`` preset.

    Attributes:
        dataset: Dataset name (a tag; the data come from ``cache_dir``).
        arch: One of Table 1's six structure strategies; ``cascaded_vit`` is the paper's model.
        fold: Test fold index, ``0 <= fold < n_folds``.
        n_folds: Subject-independent folds (paper: 5-fold CV).
        seed: Seeds model init, batch order and dropout.
        cache_dir: Preprocessing cache (``mtcae preprocess`` output).
        folds_file: The folds as data (``orchestrator.data.folds.write_folds``: a sweep's
            ``folds/<dataset>.json``, or a published split via ``mtcae train --split-file``); None
            computes them (subject-independent, stratified, seed 0).
        encoder: Encoder preset; VideoMAE ViT-L in the paper and the released code.
        encoder_checkpoint: Local encoder weights file; None keeps the (seeded) random init.
        freeze_encoder: The released code freezes the encoder (303.9M frozen vs 9.8M trained).
        use_pos_embed: Add the encoder's sinusoid position table (the released TF wiring most
            likely skipped it, official_spec.md 4.1).
        head_order: ``norm_pool`` (paper eq. 7-9) or ``pool_norm`` (the released code pools first).
        normalization: ``imagenet`` (VideoMAE's statistics) or ``official`` (std 0.225 on every
            channel, as the released notebook).
        decoder: Decoder preset, ``paper`` (section 4.2: 5 layers, 3 heads, width 512) or ``official``.
        decoder_depth: Blocks per decoder.
        decoder_heads: Attention heads.
        decoder_dim: Decoder width D.
        decoder_head_dim: Per-head width.
        decoder_mlp_ratio: MLP hidden width over D.
        decoder_dropout: Every decoder dropout: MLP, attention and the encoder-token dropout before
            the shared projection (the released code uses 0.3 for all three).
        head_dropout: Dropout before each head's linear layer (0.1, released code).
        w_box: Box loss weight (0.5, paper section 4.2).
        w_landmark: Landmark loss weight (0.5).
        w_expr: Expression loss weight (1.5).
        lr: AdamW learning rate (1e-3, official_spec.md 5).
        weight_decay: AdamW decoupled weight decay (1e-3, on every trained weight as in Keras).
        batch_size: Clips per step (16).
        epochs: Epoch budget (100).
        early_stop_patience: Epochs without a validation-accuracy gain before stopping (Keras
            EarlyStopping(patience=50) in the released code).
        lr_patience: Epochs without a validation expression-loss gain before the LR drops (10).
        lr_factor: LR multiplier on a plateau (0.1).
        select_metric: The validation metric that picks the tested epoch's weights and drives early
            stopping (``vocab.SELECTION_METRICS``, with its direction). A sweep sets it to its space's
            ``metric``, so the epoch, the Optuna objective and the tables' choice are one quantity.
        precision: ``auto`` (bf16 on CUDA if supported, else fp16; fp32 on CPU), ``fp32``,
            ``bf16`` or ``fp16`` (CUDA only, with loss scaling).
        feature_cache: ``auto`` (on when the encoder is frozen), ``on`` or ``off``.
        num_workers: DataLoader workers for the end-to-end path.
        sweep: Sweep name (tag).
        stage: ``search`` (HPO) or ``cv`` (final cross-validation) (tag).
        tracking_uri: MLflow tracking URI; None falls back to ``$MLFLOW_TRACKING_URI``, and to no
            MLflow logging when that is unset too.
        experiment: MLflow experiment name.
        parent_run_id: MLflow run to nest this trial's run under.
        trial_key: Identity of the trial's MLflow run; None derives it from the configuration.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    dataset: Literal[vocab.DATASETS] = vocab.DEMO
    arch: Literal[vocab.ARCHITECTURES] = vocab.CASCADED_VIT
    fold: Annotated[int, Plain, Field(ge=0)] = 0
    n_folds: Annotated[int, Plain, Field(ge=2)] = 5
    seed: Annotated[int, Plain] = 0
    cache_dir: str = ""
    folds_file: Annotated[str | None, Optional] = None
    encoder: Literal[vocab.ENCODER_PRESETS] = "vit_large"
    encoder_checkpoint: Annotated[str | None, Optional] = None
    freeze_encoder: Annotated[bool, Plain] = True
    use_pos_embed: Annotated[bool, Plain] = True
    head_order: Literal[vocab.HEAD_ORDERS] = "norm_pool"
    normalization: Literal[vocab.NORMALIZATIONS] = "imagenet"
    decoder: Literal[vocab.DECODER_PRESETS] = "paper"
    decoder_depth: Annotated[PositiveInt | None, Optional] = None
    decoder_heads: Annotated[PositiveInt | None, Optional] = None
    decoder_dim: Annotated[PositiveInt | None, Optional] = None
    decoder_head_dim: Annotated[PositiveInt | None, Optional] = None
    decoder_mlp_ratio: Annotated[Annotated[float, Field(gt=0.0)] | None, Optional] = None
    decoder_dropout: Annotated[Probability | None, Optional] = None
    head_dropout: Probability = 0.1
    w_box: Weight = 0.5
    w_landmark: Weight = 0.5
    w_expr: Weight = 1.5
    lr: Annotated[float, Plain, Field(gt=0.0)] = 1e-3
    weight_decay: Weight = 1e-3
    batch_size: PositiveInt = 16
    epochs: PositiveInt = 100
    early_stop_patience: PositiveInt = 50
    lr_patience: PositiveInt = 10
    lr_factor: Annotated[float, Plain, Field(gt=0.0, lt=1.0)] = 0.1
    select_metric: Literal[tuple(vocab.SELECTION_METRICS)] = vocab.DEFAULT_SELECTION_METRIC
    precision: Literal[vocab.PRECISIONS] = "auto"
    feature_cache: Annotated[Literal[vocab.FEATURE_CACHE_MODES], BeforeValidator(_on_off)] = "auto"
    num_workers: Annotated[int, Plain, Field(ge=0)] = 0
    sweep: str = ""
    stage: Literal[vocab.STAGES] = vocab.STAGE_CV
    tracking_uri: Annotated[str | None, Optional] = None
    experiment: str = DEFAULT_EXPERIMENT
    parent_run_id: Annotated[str | None, Optional] = None
    trial_key: Annotated[str | None, Optional] = None

    @model_validator(mode="after")
    def _consistent(self) -> TrialConfig:
        if self.fold >= self.n_folds:
            raise ValueError(f"fold={self.fold} must be in [0, n_folds={self.n_folds})")
        if self.feature_cache == "on" and not self.freeze_encoder:
            raise ValueError("feature_cache='on' needs freeze_encoder=True (a trained encoder's "
                             "tokens change every step)")
        return self

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], source: str = "trial config") -> TrialConfig:
        """Validate a flat dict (Ray Tune's ``config``, ``--set`` pairs, a space's ``fixed``).

        Values are coerced to the field's type (NumPy scalars, ``"true"``/``"1e-3"``/``"none"``
        strings from the command line).

        Raises:
            TrialConfigError: Every unknown key and every bad value, each named.
        """
        try:
            return cls.model_validate(dict(flat))
        except ValidationError as err:
            raise TrialConfigError(validation_problems(err), source) from None

    def to_flat(self) -> dict[str, Any]:
        """All keys with their values (defaults included)."""
        return self.model_dump()

    def hparams(self) -> dict[str, Any]:
        """What determines the result: the flat config without runtime and tracking keys."""
        return {k: v for k, v in self.to_flat().items() if k not in RUNTIME_KEYS}

    @property
    def config_hash(self) -> str:
        """12 hex digits of :meth:`hparams` without the fold (the tag that groups folds)."""
        kept = {k: v for k, v in self.hparams().items() if k not in CONFIG_HASH_EXCLUDED}
        return stable_hash(kept, 12)

    @property
    def uses_feature_cache(self) -> bool:
        """Train from cached tokens (``auto``: exactly when the encoder is frozen)."""
        return self.feature_cache == "on" or (self.feature_cache == "auto" and self.freeze_encoder)

    @property
    def run_name(self) -> str:
        """MLflow display name."""
        return f"{self.dataset}-{self.arch}-f{self.fold}-{self.config_hash[:6]}"

    @property
    def resolved_trial_key(self) -> str:
        """``trial_key`` or ``<sweep|manual>/<stage>/<dataset>/<arch>/<config_hash>/f<fold>``."""
        if self.trial_key:
            return self.trial_key
        return f"{self.sweep or 'manual'}/{self.stage}/{self.dataset}/{self.arch}/{self.config_hash}/f{self.fold}"


SETTABLE_KEYS: tuple[str, ...] = tuple(k for k in TrialConfig.model_fields if k not in SWEEP_KEYS)


def validation_problems(err: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    """``(key path, message)`` of every error pydantic found, the offending value included."""
    problems = []
    for item in err.errors(include_url=False):
        path = ".".join(str(p) for p in (prefix, *item["loc"]) if p != "")
        if item["type"] == "extra_forbidden":
            message = f"unknown key; known keys: {', '.join(sorted(TrialConfig.model_fields))}"
        else:
            message = item["msg"].removeprefix("Value error, ")
            if item["loc"]:
                message += f" (got {item.get('input')!r})"
        problems.append((path or "(config)", message))
    return problems


def field_problems(key: str, value: Any, path: str) -> list[tuple[str, str]]:
    """Problems of one value for one field on its own (bounds, type, literal), at ``path``.

    Used for the values a search space may draw (a distribution's bounds, a choice's values).
    """
    if key not in TrialConfig.model_fields:
        return [(path, f"unknown trial config key {key!r}")]
    try:
        TrialConfig.__pydantic_validator__.validate_assignment(TrialConfig.model_construct(), key, value)
    except ValidationError as err:
        return [(path, f"{e['msg'].removeprefix('Value error, ')} (got {e.get('input')!r})")
                for e in err.errors(include_url=False)]
    return []
