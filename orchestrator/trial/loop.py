"""One trial: one architecture on one fold of one dataset with one configuration.

:func:`run_trial` ``(cfg, reporter=None, resume=None, progress=False) -> dict`` runs it to the end;
``orchestrator.trial.entrypoints`` calls it from Ray Tune and from ``mtcae train``.

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
   to the reporter (Ray Tune) and to MLflow (``step = epoch``); on the last epoch, before that
   report, the tested weights are logged as the run's MLflow model (:func:`log_trial_model`,
   ``orchestrator.trial.packaging``).

With a frozen encoder the trial trains from the feature cache (``orchestrator.features``): the
encoder runs once per clip for the whole sweep instead of once per clip per epoch per trial.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vocab
from model import (
    ModelConfig,
    MultiTaskLoss,
    build_model,
    classification_metrics,
    normalize_video,
)
from model.decoder import decoder_config
from orchestrator import features as feat
from orchestrator.tracking import TrialLogger, recall_metric_name
from orchestrator.trial.checkpoint import (
    CHECKPOINT_FORMAT,
    Reporter,
    load_checkpoint,
    load_trainable_state,
    save_checkpoint_file,
    trainable_state_dict,
)
from orchestrator.trial.config import TrialConfig
from orchestrator.trial.data import (
    TokenSource,
    TrialData,
    VideoSource,
    derive_seed,
    epoch_batches,
    eval_batches,
    load_trial_data,
)
from orchestrator.trial.device import (
    resolve_device,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
)
from orchestrator.trial.packaging import MODEL_NAME, log_model
from orchestrator.trial.predictor import predictor_from_trial
from orchestrator.trial.run_logger import make_trial_logger
from orchestrator.trial.sizing import warn_if_heavy_on_cpu

logger = logging.getLogger(__name__)


ADAM_BETAS = (0.9, 0.999)  # Keras AdamW defaults (official_spec.md 5)
ADAM_EPS = 1e-7  # Keras default; PyTorch's is 1e-8 (official_spec.md 5)
LR_MIN = 1e-13  # ReduceLROnPlateau(min_lr=1e-13) in the released code
LR_MIN_DELTA = 1e-4  # Keras ReduceLROnPlateau min_delta, an absolute threshold

LOSS_KEYS = ("loss", "loss_expr", "loss_box", "loss_landmark")
# Reported every epoch (Tune and MLflow; MLflow gets all but ``epoch``, which is its step).
EPOCH_METRICS = (
    "epoch", "lr", "epoch_time_s",
    "train_loss", "train_loss_expr", "train_loss_box", "train_loss_landmark", "train_accuracy",
    "val_loss", "val_loss_expr", "val_loss_box", "val_loss_landmark", "val_uar", "val_war", "val_accuracy",
    "best_epoch", *(f"best_{m}" for m in vocab.SELECTION_METRICS),
)
# Added to the last epoch's report, plus ``test_recall_<class>`` per class present in the test fold.
FINAL_METRICS = ("test_loss", "test_loss_expr", "test_loss_box", "test_loss_landmark",
                 "test_uar", "test_war", "test_accuracy")



def model_config(cfg: TrialConfig, num_classes: int, num_frames: int, img_size: int) -> ModelConfig:
    """The network a trial config describes; frame count and size come from the cache."""
    drop = cfg.decoder_dropout
    decoder = decoder_config(cfg.decoder, embed_dim=cfg.decoder_dim, depth=cfg.decoder_depth,
                             num_heads=cfg.decoder_heads, head_dim=cfg.decoder_head_dim,
                             mlp_ratio=cfg.decoder_mlp_ratio, drop_rate=drop, attn_drop=drop,
                             input_dropout=drop)
    return ModelConfig(encoder=cfg.encoder, encoder_checkpoint=cfg.encoder_checkpoint,
                       freeze_encoder=cfg.freeze_encoder, use_pos_embed=cfg.use_pos_embed,
                       num_classes=num_classes, num_frames=num_frames, img_size=img_size,
                       decoder=decoder, head_dropout=cfg.head_dropout,
                       head_order=cfg.head_order, normalization=cfg.normalization)


@dataclass
class EarlyStopping:
    """Keras ``EarlyStopping(monitor, patience, min_delta=0)``: stop after ``patience`` epochs without
    a strict gain; the best epoch is the first one reaching the optimum (what
    ``ModelCheckpoint(save_best_only=True)`` keeps in the released code, which monitors val accuracy).
    ``mode`` is ``max`` or ``min`` (``vocab.SELECTION_METRICS``)."""

    patience: int
    mode: str = "max"
    best: float | None = None
    best_epoch: int = -1
    wait: int = 0
    stopped: bool = False

    def update(self, value: float, epoch: int) -> bool:
        """Record one epoch's value; True when it is a new best."""
        better = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if better and not math.isnan(value):
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


class Trial:
    """The objects of one running trial and the steps of its loop.

    Args:
        cfg: The trial config.
        data: The fold's data (:func:`load_trial_data`).
        device: Where to train (default: :func:`resolve_device`).
        progress: A progress bar while the feature cache is built.
    """

    def __init__(self, cfg: TrialConfig, data: TrialData, device: torch.device | None = None,
                 progress: bool = False) -> None:
        self.cfg, self.data = cfg, data
        self.device = device or resolve_device()
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        seed_everything(cfg.seed)
        mcfg = model_config(cfg, len(data.class_names), data.num_frames, data.img_size)
        self.model = build_model(cfg.arch, mcfg).to(self.device)
        self.loss_fn = MultiTaskLoss(w_box=cfg.w_box, w_landmark=cfg.w_landmark, w_expr=cfg.w_expr)
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
        clips = {split: len(targets.clip_ids) for split, targets in data.splits.items()}
        warn_if_heavy_on_cpu(self.model, cfg.encoder, clips, cfg.epochs, cfg.batch_size,
                             cfg.uses_feature_cache, self.device)
        self.source = self._make_source(progress)
        mode = vocab.SELECTION_METRICS[cfg.select_metric]
        self.state = TrainState(stopper=EarlyStopping(cfg.early_stop_patience, mode))

    def _make_source(self, progress: bool) -> TokenSource | VideoSource:
        if not self.cfg.uses_feature_cache:
            return VideoSource(self.data, self.cfg.num_workers)
        mean, std = self.model.cfg.norm_stats()
        spec = feat.FeatureSpec(self.encoder_hash, asdict(self.model.encoder.cfg), self.data.settings_hash,
                                mean=mean, std=std, compute_dtype=feat.dtype_name(self.amp_dtype))
        store = feat.FeatureStore.open(self.data.cache_dir, spec)
        clips = [c for s in ("train", "val", "test") for c in self.data.splits[s].clip_ids]
        encode = feat.encoder_fn(self.model, self.device, self.amp_dtype, mean, std)
        built = store.build(encode, self.data.load_frames, clips, batch_size=self.cfg.batch_size,
                            progress=progress)
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
        scores = {f"val_{k}": v for k, v in val.items() if k != "per_class_recall"}
        if stopper.update(scores[self.cfg.select_metric], epoch):
            self.state.best_state = trainable_state_dict(self.model)
            self.state.best_metrics = {m: scores[m] for m in vocab.SELECTION_METRICS}
        metrics = {"epoch": epoch, "lr": lr, "epoch_time_s": time.perf_counter() - start, **train, **scores}
        metrics |= {"best_epoch": stopper.best_epoch}
        metrics |= {f"best_{m}": v for m, v in (self.state.best_metrics or {}).items()}
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
                "rng": rng_state()}

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
        set_rng_state(ckpt["rng"])
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
    trial = Trial(cfg, load_trial_data(cfg), device, progress)
    if resume is not None:
        trial.restore(resume if isinstance(resume, Mapping) else load_checkpoint(resume))
    tracker = make_trial_logger(cfg, trial.device)
    try:
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
        log_trial_model(trial, tracker)
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


MODEL_URI_TAG = "model_uri"


def log_trial_model(trial: Trial, tracker: TrialLogger) -> str | None:
    """Log the tested (selected-epoch) weights as the run's MLflow model; its ``models:/`` URI.

    The run gets the tag ``model_uri``. A failure is logged and the trial goes on: its metrics and
    checkpoint are valid without the model.
    """
    from orchestrator.data.cache import load_settings
    from orchestrator.data.settings import PreprocessSettings

    cfg, data = trial.cfg, trial.data
    try:
        known = set(PreprocessSettings.__dataclass_fields__)
        values = {k: v for k, v in load_settings(data.cache_dir).items() if k in known}
        values |= {"num_frames": data.num_frames, "size": data.img_size}
        values["thresholds"] = tuple(values.get("thresholds", PreprocessSettings.thresholds))
        info = {"dataset": cfg.dataset, "run_name": cfg.run_name, "config_hash": cfg.config_hash,
                "fold": cfg.fold, "best_epoch": trial.state.stopper.best_epoch}
        predictor = predictor_from_trial(trial.model, trial.state.best_state, data.class_names,
                                         PreprocessSettings(**values), cfg.encoder_checkpoint, info)
        uri = log_model(predictor, tracker.tracking_uri, tracker.run_id, MODEL_NAME,
                        tags={"dataset": cfg.dataset, "arch": cfg.arch, "fold": cfg.fold},
                        step=max(trial.state.stopper.best_epoch, 0))
    except Exception:
        logger.exception("run %s: could not log the trained model to MLflow", tracker.run_id)
        return None
    tracker.set_tags({MODEL_URI_TAG: uri})
    logger.info("logged model %s (runs:/%s/%s)", uri, tracker.run_id, MODEL_NAME)
    return uri
