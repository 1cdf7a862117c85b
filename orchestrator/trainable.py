"""One trial: one architecture on one fold of one dataset with one configuration.

Entry points:

* :func:`train_trial` ``(config: dict) -> None``: the Ray Tune function trainable (reports with
  ``tune.report``, resumes from ``tune.get_checkpoint()``).
* :func:`run_trial` ``(cfg, reporter=None, resume=None, progress=False) -> dict``: the same loop
  without Ray (``mtcae train``, tests).

The loop, in the order things happen each epoch (defaults follow the paper and the released code,
official_spec.md section 5):

1. reseed the global RNGs from ``(seed, epoch)`` and draw the epoch's batch order from them, so a
   resumed run replays exactly what an uninterrupted one does;
2. train one pass over the fold's training clips (AdamW, weighted multi-task loss, autocast);
3. evaluate the validation clips; step ReduceLROnPlateau on the validation expression loss; update
   early stopping on validation accuracy and keep the best epoch's weights;
4. on the last epoch (budget reached or early stop) evaluate the test clips with the **best
   validation epoch's** weights (never selected on test);
5. save a checkpoint and report :data:`EPOCH_METRICS` (+ :data:`FINAL_METRICS` on the last epoch)
   to the reporter (Ray Tune) and to MLflow (``step = epoch``).

With a frozen encoder the trial trains from the feature cache (``orchestrator.features``): the
encoder runs once per clip for the whole sweep instead of once per clip per epoch per trial.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import shutil
import tempfile
import time
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import NORMALIZATIONS, MTCAEModel, ModelConfig, MultiTaskLoss, build_model, classification_metrics, normalize_video
from model.architectures import ARCHITECTURES
from model.decoder import decoder_config
from orchestrator import features as feat
from orchestrator.cpu_heap import retained_heap
from orchestrator.trial_data import (
    TokenSource,
    TrialData,
    VideoSource,
    derive_seed,
    epoch_batches,
    eval_batches,
    load_trial_data,
)
from orchestrator.tracking import TrialLogger, config_hash, recall_metric_name

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
FEATURE_CACHE_MODES = ("auto", "on", "off")
STAGES = ("search", "cv")
# Where a trial is logged, not what it is: not hashed, not logged as params.
TRACKING_KEYS = frozenset({"tracking_uri", "experiment", "parent_run_id", "trial_key"})
CPU_HEAP_POLICIES = ("retain", "default")
# Neither changes results: left out of the config hash and of the resume check.
RUNTIME_KEYS = frozenset({"cache_dir", "num_workers", "cpu_heap", "sweep", "stage"}) | TRACKING_KEYS

ADAM_BETAS = (0.9, 0.999)  # Keras AdamW defaults (official_spec.md 5)
ADAM_EPS = 1e-7  # Keras default; PyTorch's is 1e-8 (official_spec.md 5)
LR_MIN = 1e-13  # ReduceLROnPlateau(min_lr=1e-13) in the released code
LR_MIN_DELTA = 1e-4  # Keras ReduceLROnPlateau min_delta, an absolute threshold
CHECKPOINT_FILE = "state.pt"
CHECKPOINT_FORMAT = 1
DEFAULT_EXPERIMENT = "mtcae"

LOSS_KEYS = ("loss", "loss_expr", "loss_box", "loss_landmark")
# Reported every epoch (Tune and MLflow; MLflow gets all but ``epoch``, which is its step).
EPOCH_METRICS = (
    "epoch", "lr", "epoch_time_s",
    "train_loss", "train_loss_expr", "train_loss_box", "train_loss_landmark", "train_accuracy",
    "val_loss", "val_loss_expr", "val_loss_box", "val_loss_landmark", "val_uar", "val_war", "val_accuracy",
    "best_epoch", "best_val_accuracy", "best_val_uar",
)
# Added to the last epoch's report, plus ``test_recall_<class>`` per class present in the test fold.
FINAL_METRICS = ("test_loss", "test_loss_expr", "test_loss_box", "test_loss_landmark",
                 "test_uar", "test_war", "test_accuracy")

Reporter = Callable[[dict[str, float], Path], None]  # (metrics, checkpoint directory) -> None


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs; built from Ray Tune's flat dict by :meth:`from_flat` only.

    ``None`` for a ``decoder_*`` field keeps the value of the ``decoder`` preset.

    Attributes:
        dataset: Dataset name (a tag; the data come from ``cache_dir``).
        arch: One of ``model.ARCHITECTURES``; ``cascaded_vit`` is the paper's model.
        fold: Test fold index, ``0 <= fold < n_folds``.
        n_folds: Subject-independent folds (paper: 5-fold CV).
        seed: Seeds model init, batch order and dropout.
        cache_dir: Preprocessing cache (``mtcae preprocess`` output).
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
        precision: ``auto`` (bf16 on CUDA if supported, else fp16; fp32 on CPU), ``fp32``,
            ``bf16`` or ``fp16`` (CUDA only, with loss scaling).
        feature_cache: ``auto`` (on when the encoder is frozen), ``on`` or ``off``.
        num_workers: DataLoader workers for the end-to-end path.
        cpu_heap: On CPU, ``retain`` (default) keeps freed memory in the process for reuse during
            the trial, like CUDA's caching allocator, instead of page-faulting every large
            activation afresh each step (``orchestrator.cpu_heap``; a batch-16 official-preset
            step ran 1.2x to 1.9x faster across runs on a 2-core VM); ``default`` leaves glibc's
            policy. Not a hyperparameter.
        sweep: Sweep name (tag).
        stage: ``search`` (HPO) or ``cv`` (final cross-validation) (tag).
        tracking_uri: MLflow tracking URI; None falls back to ``$MLFLOW_TRACKING_URI``, and to no
            MLflow logging when that is unset too.
        experiment: MLflow experiment name.
        parent_run_id: MLflow run to nest this trial's run under.
        trial_key: Identity of the trial's MLflow run; None derives it from the configuration.
    """

    dataset: str = "demo"
    arch: str = "cascaded_vit"
    fold: int = 0
    n_folds: int = 5
    seed: int = 0
    cache_dir: str = ""
    encoder: str = "vit_large"
    encoder_checkpoint: str | None = None
    freeze_encoder: bool = True
    use_pos_embed: bool = True
    head_order: str = "norm_pool"
    normalization: str = "imagenet"
    decoder: str = "paper"
    decoder_depth: int | None = None
    decoder_heads: int | None = None
    decoder_dim: int | None = None
    decoder_head_dim: int | None = None
    decoder_mlp_ratio: float | None = None
    decoder_dropout: float | None = None
    head_dropout: float = 0.1
    w_box: float = 0.5
    w_landmark: float = 0.5
    w_expr: float = 1.5
    lr: float = 1e-3
    weight_decay: float = 1e-3
    batch_size: int = 16
    epochs: int = 100
    early_stop_patience: int = 50
    lr_patience: int = 10
    lr_factor: float = 0.1
    precision: str = "auto"
    feature_cache: str = "auto"
    num_workers: int = 0
    cpu_heap: str = "retain"
    sweep: str = ""
    stage: str = "cv"
    tracking_uri: str | None = None
    experiment: str = DEFAULT_EXPERIMENT
    parent_run_id: str | None = None
    trial_key: str | None = None

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> TrialConfig:
        """Build and validate a config from a flat dict (Ray Tune's ``config``).

        Values are coerced to the field's type (numpy scalars, ``"true"``/``"1e-3"`` strings from
        the command line); ``feature_cache`` also accepts a bool (True = ``on``).

        Raises:
            ValueError: An unknown key (named), a value of the wrong type, or an invalid setting.
        """
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in flat.items():
            if key not in known:
                raise ValueError(f"unknown trial config key {key!r}; known keys: {sorted(known)}")
            kwargs[key] = _coerce(key, value, hints[key])
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check value ranges and choices.

        Raises:
            ValueError: Naming the key and what was expected.
        """
        choices = {"arch": ARCHITECTURES, "precision": PRECISIONS, "feature_cache": FEATURE_CACHE_MODES,
                   "stage": STAGES, "head_order": ("norm_pool", "pool_norm"),
                   "normalization": tuple(NORMALIZATIONS), "cpu_heap": CPU_HEAP_POLICIES}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"trial config {key}={getattr(self, key)!r}; expected one of {list(allowed)}")
        for key in ("n_folds", "batch_size", "epochs", "early_stop_patience", "lr_patience"):
            if getattr(self, key) < 1:
                raise ValueError(f"trial config {key}={getattr(self, key)} must be >= 1")
        if not 0 <= self.fold < self.n_folds:
            raise ValueError(f"trial config fold={self.fold} must be in [0, n_folds={self.n_folds})")
        if not 0.0 < self.lr_factor < 1.0:
            raise ValueError(f"trial config lr_factor={self.lr_factor} must be in (0, 1)")
        if self.lr <= 0 or self.weight_decay < 0 or self.num_workers < 0:
            raise ValueError("trial config needs lr > 0, weight_decay >= 0 and num_workers >= 0")
        if self.feature_cache == "on" and not self.freeze_encoder:
            raise ValueError("trial config feature_cache='on' needs freeze_encoder=True (a trained "
                             "encoder's tokens change every step)")

    def to_flat(self) -> dict[str, Any]:
        """All keys with their values (defaults included)."""
        return asdict(self)

    def hparams(self) -> dict[str, Any]:
        """What determines the result: the flat config without runtime and tracking keys."""
        return {k: v for k, v in self.to_flat().items() if k not in RUNTIME_KEYS}

    @property
    def config_hash(self) -> str:
        """``tracking.config_hash`` of :meth:`hparams` (the fold does not take part)."""
        return config_hash(self.hparams())

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

    def model_config(self, num_classes: int, num_frames: int, img_size: int) -> ModelConfig:
        """The model config; frame count and size come from the cache."""
        drop = self.decoder_dropout
        decoder = decoder_config(self.decoder, embed_dim=self.decoder_dim, depth=self.decoder_depth,
                                 num_heads=self.decoder_heads, head_dim=self.decoder_head_dim,
                                 mlp_ratio=self.decoder_mlp_ratio, drop_rate=drop, attn_drop=drop,
                                 input_dropout=drop)
        return ModelConfig(encoder=self.encoder, encoder_checkpoint=self.encoder_checkpoint,
                           freeze_encoder=self.freeze_encoder, use_pos_embed=self.use_pos_embed,
                           num_classes=num_classes, num_frames=num_frames, img_size=img_size,
                           decoder=decoder, head_dropout=self.head_dropout,
                           head_order=self.head_order, normalization=self.normalization)

    def loss(self) -> MultiTaskLoss:
        """The weighted multi-task loss."""
        return MultiTaskLoss(w_box=self.w_box, w_landmark=self.w_landmark, w_expr=self.w_expr)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Coerce one flat value to its field type (``X | None`` accepts None and ``"none"``)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args else hint
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"trial config {key} must not be None")
    if key == "feature_cache" and isinstance(value, (bool, np.bool_)):
        return "on" if value else "off"
    try:
        return _cast(value, base)
    except (TypeError, ValueError) as err:
        raise ValueError(f"trial config {key}={value!r}: expected {getattr(base, '__name__', base)}") from err


def _cast(value: Any, base: type) -> Any:
    if base is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, (bool, np.bool_)) or value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if base is int:
        number = float(value)
        if isinstance(value, (bool, np.bool_)) or not number.is_integer():
            raise ValueError(value)
        return int(number)
    if base is float:
        if isinstance(value, (bool, np.bool_)):
            raise ValueError(value)
        return float(value)
    return str(value)


# --------------------------------------------------------------------------------------------
# Devices, precision, seeding


def resolve_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX), per PyTorch's probes."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    Raises:
        ValueError: ``fp16`` without CUDA, or an unknown name.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trial config precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("precision='bf16' on a CPU without AVX512-BF16 or AMX: bf16 matmuls are emulated "
                       "and likely slower than float32 here (precision='fp32' or 'auto' avoids that)")
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"trial config precision={precision!r}; expected one of {list(PRECISIONS)}")
    return table[precision]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Training state


@dataclass
class EarlyStopping:
    """Keras ``EarlyStopping(monitor=val accuracy, patience, min_delta=0)``: stop after ``patience``
    epochs without a strict gain; the best epoch is the first one reaching the maximum (what
    ``ModelCheckpoint(save_best_only=True)`` keeps in the released code)."""

    patience: int
    best: float = -math.inf
    best_epoch: int = -1
    wait: int = 0
    stopped: bool = False

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; True when it is a new best."""
        if value > self.best:
            self.best, self.best_epoch, self.wait = value, epoch, 0
            return True
        self.wait += 1
        self.stopped = self.wait >= self.patience
        return False


@dataclass
class TrainState:
    """Everything a checkpoint restores besides the model, optimizer, scheduler and scaler."""

    epoch: int = -1  # last completed epoch
    stopper: EarlyStopping | None = None
    best_state: dict[str, torch.Tensor] | None = None
    best_metrics: dict[str, float] | None = None
    last_metrics: dict[str, float] | None = None


def trainable_state_dict(model: MTCAEModel) -> dict[str, torch.Tensor]:
    """The model's state without a frozen encoder (it is rebuilt from the seed or its checkpoint)."""
    skip = "encoder." if model.encoder.frozen else None
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            if skip is None or not k.startswith(skip)}


def load_trainable_state(model: MTCAEModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load :func:`trainable_state_dict` output; only a frozen encoder's keys may be missing.

    Raises:
        ValueError: Unexpected keys, or missing keys outside a frozen encoder.
    """
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    allowed = [k for k in missing if model.encoder.frozen and k.startswith("encoder.")]
    if unexpected or len(allowed) != len(missing):
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(set(missing) - set(allowed))[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a trial checkpoint: a directory holding ``state.pt`` or the file itself.

    Raises:
        FileNotFoundError: No checkpoint there.
        ValueError: Not a trial checkpoint of this format.
    """
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no trial checkpoint at {file}")
    state = torch.load(file, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file} is not an mtcae trial checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def save_checkpoint_file(state: Mapping[str, Any], directory: Path) -> Path:
    """Write ``state`` to ``directory/state.pt`` atomically (tmp + ``os.replace``)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    torch.save(dict(state), tmp)
    os.replace(tmp, final)
    return final


def directory_reporter(directory: Path, also: Reporter | None = None) -> Reporter:
    """A reporter keeping the latest checkpoint in ``directory`` (for ``mtcae train --resume``)."""

    def report(metrics: dict[str, float], checkpoint: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
        shutil.copyfile(checkpoint / CHECKPOINT_FILE, tmp)
        os.replace(tmp, directory / CHECKPOINT_FILE)
        if also is not None:
            also(metrics, checkpoint)

    return report


# --------------------------------------------------------------------------------------------
# The loop


class Trial:
    """The objects of one running trial and the steps of its loop.

    Args:
        cfg: The trial config.
        data: The fold's data (:func:`load_trial_data`).
        device: Where to train (default: :func:`resolve_device`).
    """

    def __init__(self, cfg: TrialConfig, data: TrialData, device: torch.device | None = None) -> None:
        self.cfg, self.data = cfg, data
        self.device = device or resolve_device()
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        seed_everything(cfg.seed)
        mcfg = cfg.model_config(len(data.class_names), data.num_frames, data.img_size)
        self.model = build_model(cfg.arch, mcfg).to(self.device)
        self.loss_fn = cfg.loss()
        self.optimizer = torch.optim.AdamW(self.model.trainable_parameters(), lr=cfg.lr, betas=ADAM_BETAS,
                                           eps=ADAM_EPS, weight_decay=cfg.weight_decay)
        # Keras reduces after `patience` bad epochs, torch after `patience + 1`: shift by one. Keras
        # has no minimum step (eps); torch's default 1e-8 would stop the decay at 1e-8, while the
        # released run went down to 1e-9 (official_spec.md 5).
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.lr_factor, patience=cfg.lr_patience - 1,
            threshold=LR_MIN_DELTA, threshold_mode="abs", cooldown=0, min_lr=LR_MIN, eps=0.0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.encoder_hash = feat.weights_fingerprint(self.model.encoder) if self.model.encoder.frozen else None
        self.source = self._make_source()
        self.state = TrainState(stopper=EarlyStopping(cfg.early_stop_patience))

    def _make_source(self) -> TokenSource | VideoSource:
        if not self.cfg.uses_feature_cache:
            return VideoSource(self.data, self.cfg.num_workers)
        mean, std = self.model.cfg.norm_stats()
        spec = feat.FeatureSpec(self.encoder_hash, asdict(self.model.encoder.cfg), self.data.settings_hash,
                                mean=mean, std=std, compute_dtype=feat.dtype_name(self.amp_dtype))
        store = feat.FeatureStore.open(self.data.cache_dir, spec)
        clips = [c for s in ("train", "val", "test") for c in self.data.splits[s].clip_ids]
        encode = feat.encoder_fn(self.model, self.device, self.amp_dtype, mean, std)
        built = store.build(encode, self.data.load_frames, clips, batch_size=self.cfg.batch_size)
        logger.info("feature cache %s: %d clips encoded now, %d reused", store.root, built, len(clips) - built)
        return TokenSource(store)

    # -- one forward pass ------------------------------------------------------------------

    def _forward(self, batch: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Losses and logits of one batch (under autocast)."""
        x = batch["inputs"].to(self.device, non_blocking=True)
        targets = {k: batch[k].to(self.device, non_blocking=True)
                   for k in ("boxes", "landmarks", "valid", "label")}
        if self.source.kind == "video":
            x = normalize_video(x, *self.model.cfg.norm_stats())  # (B, 3, T, S, S)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            out = self.model.forward_tokens(x.float()) if self.source.kind == "tokens" else self.model(x)
            losses = self.loss_fn(out, targets)
        return losses, out.logits.detach().float()

    def train_epoch(self, epoch: int, progress: bool = False) -> dict[str, float]:
        """One pass over the training clips; mean losses and accuracy."""
        self.model.train()
        targets = self.data.splits["train"]
        batches = epoch_batches(len(targets.clip_ids), self.cfg.batch_size, self.cfg.seed, epoch)
        meter = _Meter()
        for batch in _bar(self.source(targets, batches), len(batches), f"epoch {epoch}", progress):
            losses, logits = self._forward(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(losses["loss"]).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            meter.add(losses, logits, batch["label"], batch["clip_id"])
        return {f"train_{k}": v for k, v in meter.losses().items()} | {"train_accuracy": meter.accuracy()}

    @torch.no_grad()
    def evaluate(self, split: str) -> _Meter:
        """Losses and predictions on ``val`` or ``test`` (eval mode, fixed order)."""
        self.model.eval()
        targets = self.data.splits[split]
        meter = _Meter()
        for batch in self.source(targets, eval_batches(len(targets.clip_ids), self.cfg.batch_size)):
            losses, logits = self._forward(batch)
            meter.add(losses, logits, batch["label"], batch["clip_id"])
        return meter

    # -- epoch bookkeeping -----------------------------------------------------------------

    def run_epoch(self, epoch: int, progress: bool = False) -> dict[str, float]:
        """Train, validate, step the LR schedule and early stopping; the epoch's metrics."""
        torch.manual_seed(derive_seed(self.cfg.seed, epoch, 2))  # dropout stream of this epoch
        start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        train = self.train_epoch(epoch, progress)
        val = self.evaluate("val").summary(len(self.data.class_names))
        self.scheduler.step(val["loss_expr"])
        stopper = self.state.stopper
        if stopper.update(val["accuracy"], epoch):
            self.state.best_state = trainable_state_dict(self.model)
            self.state.best_metrics = {"val_accuracy": val["accuracy"], "val_uar": val["uar"]}
        metrics = {"epoch": epoch, "lr": lr, "epoch_time_s": time.perf_counter() - start, **train}
        metrics |= {f"val_{k}": v for k, v in val.items() if k != "per_class_recall"}
        metrics |= {"best_epoch": stopper.best_epoch, "best_val_accuracy": stopper.best,
                    "best_val_uar": self.state.best_metrics["val_uar"]}
        self.state.epoch, self.state.last_metrics = epoch, metrics
        return metrics

    def is_finished(self) -> bool:
        """Budget reached or early stopping triggered."""
        return self.state.epoch >= self.cfg.epochs - 1 or self.state.stopper.stopped

    def test(self) -> tuple[dict[str, float], _Meter]:
        """Test metrics with the best validation epoch's weights (current weights are restored after)."""
        current = trainable_state_dict(self.model)
        load_trainable_state(self.model, self.state.best_state)
        meter = self.evaluate("test")
        load_trainable_state(self.model, current)
        summary = meter.summary(len(self.data.class_names))
        metrics = {f"test_{k}": v for k, v in summary.items() if k != "per_class_recall"}
        for name, recall in zip(self.data.class_names, summary["per_class_recall"]):
            if not math.isnan(recall):
                metrics[recall_metric_name(name)] = recall
        return metrics, meter

    # -- checkpoints -----------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this epoch ended."""
        s = self.state
        return {"format": CHECKPOINT_FORMAT, "epoch": s.epoch, "config": self.cfg.hparams(),
                "encoder_hash": self.encoder_hash, "model": trainable_state_dict(self.model),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "early_stopping": asdict(s.stopper),
                "best_state": s.best_state, "best_metrics": s.best_metrics, "last_metrics": s.last_metrics,
                "rng": _rng_state()}

    def restore(self, ckpt: Mapping[str, Any]) -> None:
        """Continue from :meth:`checkpoint` output.

        Raises:
            ValueError: The checkpoint belongs to another configuration or encoder.
        """
        changed = {k for k in set(ckpt["config"]) | set(self.cfg.hparams())
                   if ckpt["config"].get(k) != self.cfg.hparams().get(k)}
        if changed:
            raise ValueError(f"checkpoint was written by another trial config (differs in {sorted(changed)})")
        if ckpt["encoder_hash"] != self.encoder_hash:
            raise ValueError("checkpoint was trained on top of different frozen encoder weights")
        load_trainable_state(self.model, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.state = TrainState(ckpt["epoch"], EarlyStopping(**ckpt["early_stopping"]), ckpt["best_state"],
                                ckpt["best_metrics"], ckpt["last_metrics"])
        _set_rng_state(ckpt["rng"])
        logger.info("resumed after epoch %d (best epoch %d)", self.state.epoch, self.state.stopper.best_epoch)


class _Meter:
    """Accumulates batch-size-weighted losses and predictions."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(LOSS_KEYS, 0.0)
        self.count = 0
        self.y_true: list[int] = []
        self.y_pred: list[int] = []
        self.clip_ids: list[str] = []

    def add(self, losses: Mapping[str, torch.Tensor], logits: torch.Tensor, labels: torch.Tensor,
            clip_ids: Sequence[str]) -> None:
        n = len(clip_ids)
        for key in LOSS_KEYS:
            self.sums[key] += float(losses[key].detach()) * n
        self.count += n
        self.y_true += labels.tolist()
        self.y_pred += logits.argmax(dim=1).tolist()
        self.clip_ids += list(clip_ids)

    def losses(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def accuracy(self) -> float:
        return float(np.mean(np.asarray(self.y_true) == np.asarray(self.y_pred))) if self.count else math.nan

    def summary(self, num_classes: int) -> dict[str, Any]:
        """Mean losses, ``uar``, ``war``, ``accuracy`` and ``per_class_recall``."""
        m = classification_metrics(self.y_true, self.y_pred, num_classes)
        return self.losses() | {"uar": m["uar"], "war": m["war"], "accuracy": m["accuracy"],
                                "per_class_recall": m["per_class_recall"]}


def _bar(items: Iterator[Any], total: int, desc: str, enabled: bool) -> Iterator[Any]:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, leave=False, unit="batch")


# --------------------------------------------------------------------------------------------
# MLflow


def make_trial_logger(cfg: TrialConfig) -> TrialLogger | None:
    """The trial's MLflow logger: ``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else None."""
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        logger.info("no tracking URI: not logging to MLflow")
        return None
    tags = {"dataset": cfg.dataset, "arch": cfg.arch, "fold": cfg.fold, "sweep": cfg.sweep,
            "stage": cfg.stage, "config_hash": cfg.config_hash}
    params = {k: v for k, v in cfg.to_flat().items() if k not in TRACKING_KEYS}
    return TrialLogger(uri, cfg.experiment, cfg.resolved_trial_key, cfg.run_name, tags, params,
                       parent_run_id=cfg.parent_run_id)


# --------------------------------------------------------------------------------------------
# Entry points


def run_trial(
    cfg: TrialConfig,
    reporter: Reporter | None = None,
    resume: Path | str | Mapping[str, Any] | None = None,
    progress: bool = False,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Train one trial to the end and return its last report (epoch + test metrics).

    Args:
        cfg: The trial config.
        reporter: Called once per epoch with the metrics and a directory holding the checkpoint
            (``state.pt``), which is deleted after the call returns (copy it to keep it).
        resume: A checkpoint (directory, ``state.pt`` file or loaded dict) to continue from.
        progress: tqdm bars (the CLI; keep off inside Ray Tune).
        device: Override :func:`resolve_device`.

    Returns:
        The final metrics: :data:`EPOCH_METRICS` of the last epoch, :data:`FINAL_METRICS` and
        ``test_recall_<class>``.
    """
    trial = Trial(cfg, load_trial_data(cfg), device)
    if resume is not None:
        trial.restore(resume if isinstance(resume, Mapping) else load_checkpoint(resume))
    tracker = make_trial_logger(cfg)
    retain = trial.device.type == "cpu" and cfg.cpu_heap == "retain"
    try:
        with retained_heap() if retain else contextlib.nullcontext():
            final = _loop(trial, reporter, tracker, progress)
    except (SystemExit, KeyboardInterrupt):  # Tune stops a trial with sys.exit(0) inside tune.report
        if tracker is not None:
            tracker.finish("KILLED")
        raise
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    if tracker is not None:
        tracker.finish("FINISHED")
    return final


def _loop(trial: Trial, reporter: Reporter | None, tracker: TrialLogger | None, progress: bool) -> dict[str, float]:
    cfg = trial.cfg
    metrics = dict(trial.state.last_metrics or {})
    for epoch in range(trial.state.epoch + 1, cfg.epochs):
        if trial.state.stopper.stopped:
            break
        metrics = trial.run_epoch(epoch, progress)
        logger.info("epoch %d: train_loss %.4f val_loss %.4f val_uar %.4f val_war %.4f lr %.2e", epoch,
                    metrics["train_loss"], metrics["val_loss"], metrics["val_uar"], metrics["val_war"],
                    metrics["lr"])
        if trial.is_finished():
            break
        _report(trial, metrics, reporter, tracker)
    if not metrics:
        raise ValueError(f"trial config epochs={cfg.epochs}: nothing to train")
    test_metrics, meter = trial.test()
    final = metrics | test_metrics
    if tracker is not None:  # before the last report: Tune may end the trial inside tune.report
        tracker.log_final(test_metrics, meter.y_true, meter.y_pred, trial.data.class_names, meter.clip_ids)
    _report(trial, final, reporter, tracker)
    logger.info("test (best epoch %d): uar %.4f war %.4f", final["best_epoch"], final["test_uar"], final["test_war"])
    return final


def _report(trial: Trial, metrics: dict[str, float], reporter: Reporter | None,
            tracker: TrialLogger | None) -> None:
    """Log the epoch to MLflow, then save a checkpoint and hand both to the reporter."""
    if tracker is not None:
        tracker.log_epoch({k: v for k, v in metrics.items() if k in EPOCH_METRICS and k != "epoch"},
                          int(metrics["epoch"]))
    if reporter is None:
        return
    with tempfile.TemporaryDirectory(prefix="mtcae_ckpt_") as tmp:
        save_checkpoint_file(trial.checkpoint(), Path(tmp))
        reporter(metrics, Path(tmp))


def train_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable: one trial, reported per epoch with a checkpoint.

    Resumes from ``tune.get_checkpoint()`` when Tune restores the trial. Only ``ray.tune`` APIs
    are used (``ray.train.report`` fails inside Tune functions in Ray 2.60).
    """
    from ray import tune

    cfg = TrialConfig.from_flat(config)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = load_checkpoint(Path(directory))

    def report(metrics: dict[str, float], ckpt_dir: Path) -> None:
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(ckpt_dir)))

    run_trial(cfg, reporter=report, resume=resume, progress=False)


def train_one_fold(
    cache: Path | str,
    arch: str,
    fold: int,
    epochs: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: Path | str = "mtcae_runs",
    tracking_uri: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """``mtcae train``: one fold of one configuration, without Ray.

    The latest checkpoint is kept in ``<out>/checkpoints/<run name>/state.pt``; MLflow logging
    goes to ``tracking_uri``, ``$MLFLOW_TRACKING_URI`` or the embedded store under ``out``.

    Args:
        cache: Preprocessing cache.
        arch: Architecture.
        fold: Test fold.
        epochs: Epoch budget (default: the config's).
        overrides: Further flat config keys (strings are coerced).
        out: Output folder.
        tracking_uri: MLflow tracking URI.
        resume: Continue from the checkpoint in ``out`` (an error if there is none).
        progress: tqdm bars.

    Returns:
        The final metrics (see :func:`run_trial`).

    Raises:
        ValueError: A bad config key or value.
        FileNotFoundError: ``resume`` without a checkpoint, or a missing cache.
    """
    from orchestrator.data import load_settings
    from orchestrator.tracking import resolve_tracking_uri

    flat: dict[str, Any] = {"cache_dir": str(cache), "arch": arch, "fold": fold}
    if epochs is not None:
        flat["epochs"] = epochs
    flat["dataset"] = load_settings(cache).get("dataset", TrialConfig.dataset)
    flat.update(overrides or {})
    cfg = TrialConfig.from_flat(flat)
    cfg = replace(cfg, tracking_uri=resolve_tracking_uri(tracking_uri or cfg.tracking_uri, Path(out)))
    ckpt_dir = Path(out) / "checkpoints" / cfg.run_name
    state = load_checkpoint(ckpt_dir) if resume else None
    return run_trial(cfg, reporter=directory_reporter(ckpt_dir), resume=state, progress=progress)
