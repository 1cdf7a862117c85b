"""A trained network as one self-describing object: uint8 frames in, class probabilities out.

:class:`Predictor` wraps an :class:`model.MTCAEModel` with what applying it needs and a trial
checkpoint does not hold: the class names, the preprocessing settings its clips were made with
(frame count, size, sampling, resize, MTCNN thresholds) and where its frozen encoder came from.
:meth:`Predictor.spec` is that description as plain JSON; :func:`build_predictor` rebuilds the
object from the spec and the weights.

**The frozen encoder.** A random-initialised (seeded) or fine-tuned encoder is stored with the
weights. An encoder loaded frozen from a local checkpoint file is referenced instead, by the file's
path and the SHA-256 of its content (ViT-L's 1.2 GB would otherwise be copied into every trial's
model): rebuilding reads the file (or another path given for it, e.g. the same checkpoint mounted
elsewhere) and refuses one whose hash differs (:class:`EncoderMismatchError`, naming the file and
both hashes). Either way the encoder's weights fingerprint
(:func:`orchestrator.features.weights_fingerprint`) is checked after loading.

Pickling a :class:`Predictor` (the MLflow PyTorch flavour does) stores the spec and tensors and
rebuilds through :func:`build_predictor`, so the same rules hold for ``mlflow.pytorch.load_model``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model import (
    ModelConfig,
    MTCAEModel,
    build_model,
    load_encoder_checkpoint,
    normalize_video,
)
from model.decoder import DecoderConfig
from orchestrator.data.settings import PreprocessSettings
from orchestrator.features import weights_fingerprint

SPEC_FORMAT = 1
ENCODER_PREFIX = "encoder."
# Where a referenced encoder checkpoint is when not at its recorded path (another machine or mount).
ENCODER_CHECKPOINT_ENV = "MTCAE_ENCODER_CHECKPOINT"
_HASH_CHUNK = 1 << 24


class EncoderMismatchError(ValueError):
    """The encoder checkpoint a packaged model references is missing or holds other weights."""


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path | str) -> str:
    """SHA-256 of a file's content (hex), read in 16 MiB chunks.

    Remembered per process by (path, size, mtime): every trial of a sweep worker packages its model
    on top of the same 1.2 GB checkpoint, which is hashed once.
    """
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


class Predictor(nn.Module):
    """A trained MTCAE model with its class names, preprocessing settings and encoder source.

    ``forward`` takes uint8 frames exactly as the preprocessing cache stores them and returns
    probabilities, boxes and landmarks; ``net`` is the bare :class:`model.MTCAEModel`.

    Args:
        net: The network (put in eval mode).
        class_names: Class names, index = label.
        preprocess: The settings the training clips were made with.
        encoder_source: ``{"checkpoint": path | None, "checkpoint_sha256": hex | None}``: a frozen
            encoder loaded from a local file is referenced by it, otherwise stored.
        info: Plain descriptive values carried along (dataset, run name, config hash, ...).
    """

    def __init__(self, net: MTCAEModel, class_names: Sequence[str], preprocess: PreprocessSettings,
                 encoder_source: Mapping[str, Any] | None = None, info: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.net = net.eval()
        self.class_names = tuple(str(c) for c in class_names)
        self.preprocess = preprocess
        self.encoder_source = dict(encoder_source or {"checkpoint": None, "checkpoint_sha256": None})
        self.info = dict(info or {})

    @property
    def stores_encoder(self) -> bool:
        """The encoder's weights travel with the model (not referenced by a checkpoint file)."""
        return not (self.net.encoder.frozen and self.encoder_source.get("checkpoint_sha256"))

    @torch.no_grad()
    def forward(self, frames: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Class probabilities, boxes and landmarks of uint8 clips.

        Args:
            frames: uint8 (B, T, S, S, 3), T and S as in :attr:`preprocess`.

        Returns:
            ``probabilities`` (B, K); ``boxes`` (B, T, 4) ``[x, y, w, h] / S`` and ``landmarks``
            (B, T, 5, 2) ``/ S`` (None for ``stl``).
        """
        device = next(self.net.parameters()).device
        video = normalize_video(frames.to(device), *self.net.cfg.norm_stats())  # (B, 3, T, S, S)
        out = self.net(video)
        return {"probabilities": out.logits.float().softmax(dim=1), "boxes": out.boxes,
                "landmarks": out.landmarks}

    def spec(self) -> dict[str, Any]:
        """Everything but the weights, as JSON-ready values (see :func:`build_predictor`)."""
        cfg = self.net.cfg
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
        fields["decoder"] = dataclasses.asdict(cfg.decoder_cfg())
        fields["encoder_checkpoint"] = None  # the weights come from encoder_source, never a path in the config
        if not isinstance(fields["encoder"], str):
            raise TypeError("only encoder presets can be packaged (the trial config names one)")
        return {"format": SPEC_FORMAT, "arch": self.net.arch.name, "model_config": fields,
                "class_names": list(self.class_names), "preprocess": self.preprocess.to_dict(),
                "encoder": {**self.encoder_source, "stored": self.stores_encoder,
                            "weights_sha256": weights_fingerprint(self.net.encoder)},
                "info": self.info}

    def weights(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``(everything but the encoder, the encoder or None when referenced)``, on the CPU."""
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.net.state_dict().items()}
        trained = {k: v for k, v in state.items() if not k.startswith(ENCODER_PREFIX)}
        encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        return trained, (encoder if self.stores_encoder else None)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle as spec + tensors, rebuilt (and the encoder checked) by :func:`build_predictor`."""
        trained, encoder = self.weights()
        return build_predictor, (self.spec(), trained, encoder)


def build_predictor(spec: Mapping[str, Any], trained: Mapping[str, torch.Tensor],
                    encoder: Mapping[str, torch.Tensor] | None = None,
                    encoder_checkpoint: Path | str | None = None) -> Predictor:
    """Rebuild a :class:`Predictor` from :meth:`Predictor.spec` and :meth:`Predictor.weights`.

    Args:
        spec: The description.
        trained: Every weight but the encoder's.
        encoder: The encoder's weights when the spec says they are stored.
        encoder_checkpoint: Where the referenced encoder checkpoint is (default: the path recorded
            at training, else ``$MTCAE_ENCODER_CHECKPOINT``).

    Raises:
        EncoderMismatchError: The referenced checkpoint is missing or its SHA-256 differs, or the
            loaded encoder's fingerprint is not the one recorded.
        ValueError: A spec of another format, or weights that do not fit.
    """
    if spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"packaged model spec format {spec.get('format')!r}, expected {SPEC_FORMAT}")
    fields = dict(spec["model_config"])
    fields["decoder"] = DecoderConfig(**fields["decoder"])
    net = build_model(spec["arch"], ModelConfig(**fields))
    source = spec["encoder"]
    if source["stored"]:
        if encoder is None:
            raise ValueError("the packaged model stores its encoder, but no encoder weights were given")
        net.encoder.load_state_dict(dict(encoder))
        label = "the stored encoder weights"
    else:
        path = _referenced_checkpoint(source, encoder_checkpoint)
        load_encoder_checkpoint(net.encoder, str(path))
        label = str(path)
    missing, unexpected = net.load_state_dict(dict(trained), strict=False)
    if unexpected or any(not k.startswith(ENCODER_PREFIX) for k in missing):
        raise ValueError(f"packaged weights do not fit the {spec['arch']} model: missing "
                         f"{sorted(k for k in missing if not k.startswith(ENCODER_PREFIX))[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    fingerprint = weights_fingerprint(net.encoder)
    if fingerprint != source["weights_sha256"]:
        raise EncoderMismatchError(f"{label}: encoder weights fingerprint {fingerprint}, but the model was "
                                   f"trained on top of {source['weights_sha256']}")
    return Predictor(net, spec["class_names"], PreprocessSettings(**_settings(spec["preprocess"])),
                     {"checkpoint": source.get("checkpoint"), "checkpoint_sha256": source.get("checkpoint_sha256")},
                     spec.get("info"))


def _settings(values: Mapping[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(PreprocessSettings)}
    return {k: tuple(v) if k == "thresholds" else v for k, v in values.items() if k in known}


def _referenced_checkpoint(source: Mapping[str, Any], override: Path | str | None) -> Path:
    """The encoder checkpoint file, checked against the recorded SHA-256.

    ``override`` when given; else the path recorded at training if it exists, else
    ``$MTCAE_ENCODER_CHECKPOINT``.
    """
    expected = source["checkpoint_sha256"]
    env = os.environ.get(ENCODER_CHECKPOINT_ENV)
    candidates = [Path(override)] if override else [Path(p) for p in (source["checkpoint"], env) if p]
    path = next((c for c in candidates if c.is_file()), candidates[0])
    if not path.is_file():
        raise EncoderMismatchError(
            f"{path}: the encoder checkpoint this model was trained on top of (sha256 {expected}) is not "
            f"there; pass its location (--encoder-checkpoint or ${ENCODER_CHECKPOINT_ENV})")
    actual = file_sha256(path)
    if actual != expected:
        raise EncoderMismatchError(
            f"{path}: encoder checkpoint sha256 {actual}, but the model was trained on top of a checkpoint "
            f"with sha256 {expected}; refusing to combine its heads with other encoder weights")
    return path


def predictor_from_trial(net: MTCAEModel, best_state: Mapping[str, torch.Tensor], class_names: Sequence[str],
                         preprocess: PreprocessSettings, encoder_checkpoint: str | None,
                         info: Mapping[str, Any] | None = None) -> Predictor:
    """The predictor of a finished trial: a copy of ``net`` carrying its selected epoch's weights.

    Args:
        net: The trial's model (not modified).
        best_state: The selected epoch's trainable weights (a frozen encoder's keys left out).
        class_names: Class names.
        preprocess: The cache's preprocessing settings.
        encoder_checkpoint: The trial config's ``encoder_checkpoint`` (hashed when the encoder is frozen).
        info: Descriptive values.
    """
    import copy

    copy_net = copy.deepcopy(net).to("cpu")
    copy_net.load_state_dict(dict(best_state), strict=False)
    frozen_file = encoder_checkpoint if copy_net.encoder.frozen else None
    source = {"checkpoint": str(Path(frozen_file).resolve()) if frozen_file else None,
              "checkpoint_sha256": file_sha256(frozen_file) if frozen_file else None}
    return Predictor(copy_net, class_names, preprocess, source, info)
