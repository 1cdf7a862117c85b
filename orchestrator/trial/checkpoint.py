"""Trial checkpoints: the trained weights, optimizer and loop state of one trial, on disk.

A frozen encoder is not stored (it is rebuilt from its seed or its own checkpoint); its weights'
fingerprint is, so a checkpoint never continues on top of other encoder weights. A checkpoint
holds tensors and plain Python values only and is read with ``torch.load(weights_only=True)``:
nothing in a file on shared Tune storage can run code on the worker that restores it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model import MTCAEModel

Reporter = Callable[[dict[str, float], Path], None]  # (metrics, checkpoint directory) -> None


CHECKPOINT_FILE = "state.pt"


CHECKPOINT_FORMAT = 2  # 2: tensors and plain values only (read with weights_only=True)


class TrialCheckpointError(ValueError):
    """A trial checkpoint cannot be used; the message names the file and what to do."""


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
    """Read a trial checkpoint (a directory holding ``state.pt`` or the file itself), executing nothing.

    Raises:
        FileNotFoundError: No checkpoint there.
        TrialCheckpointError: The file is truncated or corrupt, holds anything but tensors and plain
            values (a pickled object would run code: it is refused unread), or is not a trial
            checkpoint of this format.
    """
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no trial checkpoint at {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError (a forbidden global), corrupt zip, truncated file
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise TrialCheckpointError(f"{file} cannot be read as an mtcae trial checkpoint (tensors and plain "
                                   f"values only): {reason}; delete it to start the trial over") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrialCheckpointError(f"{file} is not an mtcae trial checkpoint of format {CHECKPOINT_FORMAT}; "
                                   "delete it to start the trial over")
    return state


def plain(value: Any) -> Any:
    """``value`` with NumPy scalars as Python scalars, in dicts, lists and tuples (tensors kept)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_checkpoint_file(state: Mapping[str, Any], directory: Path) -> Path:
    """Write ``state`` to ``directory/state.pt`` atomically (tmp + ``os.replace``), plain values only."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / CHECKPOINT_FILE
    tmp = directory / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    torch.save(plain(dict(state)), tmp)
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
