"""The two ways a trial starts: as a Ray Tune function trainable, and as ``mtcae train`` (no Ray)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import vocab
from orchestrator.hashing import stable_hash
from orchestrator.trial.checkpoint import directory_reporter, load_checkpoint
from orchestrator.trial.config import TrialConfig
from orchestrator.trial.loop import run_trial


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
    split_file: Path | str | None = None,
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
        split_file: A published split (``orchestrator.data.folds.load_split_file`` formats, e.g.
            MAE-DFER's ``splitNN/`` folders); the folds it gives are stored in ``<out>/folds/`` and
            used instead of computed ones, ``n_folds`` following them.

    Returns:
        The final metrics (see :func:`run_trial`).

    Raises:
        ValueError: A bad config key or value.
        FileNotFoundError: ``resume`` without a checkpoint, or a missing cache.
    """
    from orchestrator.data.cache import load_settings
    from orchestrator.tracking import resolve_tracking_uri

    flat: dict[str, Any] = {"cache_dir": str(cache), "arch": arch, "fold": fold}
    if epochs is not None:
        flat["epochs"] = epochs
    flat["dataset"] = load_settings(cache).get("dataset", vocab.DEMO)
    if split_file is not None:
        flat |= _published_folds(Path(cache), Path(split_file), Path(out), flat["dataset"])
    flat.update(overrides or {})
    cfg = TrialConfig.from_flat(flat)
    cfg = cfg.model_copy(update={"tracking_uri": resolve_tracking_uri(tracking_uri or cfg.tracking_uri, Path(out))})
    ckpt_dir = Path(out) / "checkpoints" / cfg.run_name
    state = load_checkpoint(ckpt_dir) if resume else None
    return run_trial(cfg, reporter=directory_reporter(ckpt_dir), resume=state, progress=progress)


def _published_folds(cache: Path, split_file: Path, out: Path, dataset: str) -> dict[str, Any]:
    """``folds_file`` and ``n_folds`` for a published split, its folds stored under ``<out>/folds``."""
    from orchestrator.data.cache import load_manifest
    from orchestrator.data.folds import load_split_file, write_folds

    folds = load_split_file(split_file, load_manifest(cache))
    target = out / "folds" / f"{dataset}-{split_file.stem}-{stable_hash(str(split_file.resolve()), 8)}.json"
    write_folds(target, folds, dataset, source=str(split_file.resolve()))
    return {"folds_file": str(target.resolve()), "n_folds": len(folds)}
