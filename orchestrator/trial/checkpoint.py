"""Trial checkpoints: the trained weights, optimizer and loop state of one trial, on disk.

A frozen encoder is not stored (it is rebuilt from its seed or its own checkpoint); its weights'
fingerprint is, so a checkpoint never continues on top of other encoder weights.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from model import MTCAEModel

Reporter = Callable[[dict[str, float], Path], None]  # (metrics, checkpoint directory) -> None


CHECKPOINT_FILE = "state.pt"


CHECKPOINT_FORMAT = 1


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
