"""Load foreign checkpoints into :class:`~model.encoder.VideoMAEEncoder` or
:class:`~model.lgi_former.LGIFormerEncoder`.

Five layouts a user will have on disk are converted by one small converter each
(official_spec.md 7.2, 8.2-8.4):

* ``videomae``: the original MCG-NJU / MAE-DFER plain ViT, fine-tuned (``fc_norm``/``head`` to drop).
* ``videomae_pretrain``: the same ViT inside an MAE pre-training model (``encoder.`` prefix, decoder
  keys to drop).
* ``huggingface``: transformers ``VideoMAEModel`` / ``VideoMAEForVideoClassification`` /
  ``VideoMAEForPreTraining`` (split query/key/value projections).
* ``lgi_former``: MAE-DFER's LGI-Former fine-tuned on DFEW/FERV39k/MAFW (``fc_norm``/``head`` to drop).
* ``lgi_former_pretrain``: its VoxCeleb2 pre-training model (``encoder.`` prefix, decoder keys to drop).

A ``timm``-style state dict (one ``attn.qkv.bias`` of width 3C instead of ``q_bias``/``v_bias``) is
accepted as well. The encoder family is read from the keys (``lg_region_tokens`` marks an
LGI-Former); a checkpoint of one family loaded into the other family's encoder is refused.

:func:`checkpoint_filter_fn` is the pure conversion (timm style); :func:`load_encoder_checkpoint`
reads a ``.pth``/``.pt``/``.bin`` (``weights_only=True``) or ``.safetensors`` file, converts it and
loads it with strict key matching. Keys are dropped only when they belong to one of the explicit,
commented sets below; anything else missing or unexpected is an error that lists the keys.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from model.encoder import ENCODER_PRESETS, VideoMAEEncoder
from model.lgi_former import LGI_FORMER_PRESETS, LGIFormerEncoder

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "IncompatibleCheckpointError",
    "LoadReport",
    "SOURCE_FORMATS",
    "checkpoint_filter_fn",
    "detect_format",
    "load_encoder_checkpoint",
]

_logger = logging.getLogger(__name__)

SOURCE_FORMATS = ("videomae", "videomae_pretrain", "huggingface", "timm", "lgi_former", "lgi_former_pretrain")
_LGI_FORMATS = ("lgi_former", "lgi_former_pretrain")

# Wrapper prefixes stripped from every key: ``module.`` from DistributedDataParallel, ``backbone.``
# as stripped by VideoMAE / MAE-DFER ``run_class_finetuning.py`` (official_spec.md 7.2).
_WRAPPER_PREFIXES = ("module.", "backbone.")

# Top-level keys that hold the state dict inside a saved training checkpoint, tried in order:
# VideoMAE's ``--model_key 'model|module'`` (official_spec.md 7.2), then the Lightning-style key.
_CONTAINER_KEYS = ("model", "module", "state_dict")

# Keys (exact names, or prefixes ending in ".") that are dropped on purpose, with the reason.
# Original fine-tuned VideoMAE / MAE-DFER (official_spec.md 8.2).
_VIDEOMAE_IGNORED = {
    "fc_norm.": "classification-head norm of a fine-tuned mean-pool model; the encoder outputs tokens",
    "head.": "Kinetics/DFER classification head; task heads are separate modules here",
}
# MAE pre-training model around the encoder (official_spec.md 7.2, 8.2).
_PRETRAIN_IGNORED = {
    "decoder.": "MAE pre-training pixel decoder",
    "encoder_to_decoder.": "MAE pre-training projection from encoder to decoder width",
    "mask_token": "MAE pre-training mask token",
}
# transformers VideoMAE* heads and pre-training decoder (official_spec.md 8.3).
_HF_IGNORED = {
    "fc_norm.": _VIDEOMAE_IGNORED["fc_norm."],
    "classifier.": "VideoMAEForVideoClassification head; task heads are separate modules here",
    **_PRETRAIN_IGNORED,
}
# Fine-tuned MAE-DFER LGI-Former (DFEW / FERV39k / MAFW; MAE-DFER modeling_finetune.py). Its pre-training
# model drops the same _PRETRAIN_IGNORED keys as VideoMAE's (modeling_pretrain.py).
_LGI_IGNORED = {
    "fc_norm.": "norm of the pooled region tokens of a fine-tuned LGI-Former; the encoder outputs tokens",
    "head.": "DFEW/FERV39k/MAFW classification head; task heads are separate modules here",
}
_REASON_FINAL_NORM = "final norm of the checkpoint, unused: the model is configured with final_norm=False"
_REASON_HF_KEY_BIAS = "all-zero key bias; VideoMAE attention has no key bias"
_REASON_POS_EMBED = "fixed sinusoid position table; the encoder recomputes it (non-persistent buffer)"

# Key fragments that only MAE-DFER's LGI-Former has (official_spec.md 7.1, 7.2).
_LGI_MARKERS = ("lg_region_tokens", ".first_attn.", ".second_attn.", ".third_attn.", "first_attn_norm0")
# Keys only an LGBlock variant MAE-DFER did not release has (lg_first_attn_type='cross'); the other
# variants (third 'self', lg_no_second/lg_no_third) show up as missing keys.
_LGI_VARIANT_MARKERS = (".first_attn_norm1.",)

# HF per-layer names (after ``encoder.layer.{i}.``) -> original VideoMAE names (official_spec.md 8.3).
_HF_LAYER_RENAMES = {
    "layernorm_before.": "norm1.",
    "attention.attention.q_bias": "attn.q_bias",
    "attention.attention.v_bias": "attn.v_bias",
    "attention.output.dense.": "attn.proj.",
    "layernorm_after.": "norm2.",
    "intermediate.dense.": "mlp.fc1.",
    "output.dense.": "mlp.fc2.",
}
_HF_TOP_RENAMES = {
    "embeddings.patch_embeddings.projection.": "patch_embed.proj.",
    "embeddings.position_embeddings": "pos_embed",
    "layernorm.": "norm.",
}
_HF_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_MAX_LISTED = 12
_REFUSED_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_ERROR_RE = re.compile(r"WeightsUnpickler error:\s*(\S[^\n]*)")

StateDict = dict[str, Tensor]
Ignored = dict[str, list[str]]
Encoder = VideoMAEEncoder | LGIFormerEncoder


class CheckpointError(ValueError):
    """A checkpoint file or state dict cannot be loaded into the encoder."""


class CheckpointReadError(CheckpointError):
    """The file is unreadable, corrupt, refused by ``weights_only``, or holds no state dict."""


class CheckpointMismatchError(CheckpointError):
    """Keys or tensor shapes of the checkpoint disagree with the encoder."""


class IncompatibleCheckpointError(CheckpointError):
    """The checkpoint belongs to another architecture (e.g. an LGI-Former loaded into a plain ViT)."""


@dataclass
class LoadReport:
    """What :func:`load_encoder_checkpoint` did.

    Attributes:
        path: The checkpoint file.
        source_format: Detected layout, one of :data:`SOURCE_FORMATS`.
        num_loaded: Number of tensors copied into the encoder.
        ignored: Dropped checkpoint keys (original names) grouped by the reason they were dropped.
        missing_keys: Encoder keys the checkpoint lacked (non-empty only with ``strict=False``).
        unexpected_keys: Converted checkpoint keys the encoder lacks (only with ``strict=False``).
    """

    path: str
    source_format: str
    num_loaded: int
    ignored: dict[str, list[str]] = field(default_factory=dict)
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """Name the layout of a state dict (wrapper prefixes such as ``module.`` are looked through).

    Returns:
        One of ``"lgi_former_pretrain"``, ``"lgi_former"``, ``"huggingface"``, ``"videomae_pretrain"``,
        ``"timm"``, ``"videomae"``.

    Raises:
        IncompatibleCheckpointError: No known encoder layout is recognised.
    """
    keys = list(_strip_wrappers(state_dict))
    if any(marker in key for key in keys for marker in _LGI_MARKERS):
        return "lgi_former_pretrain" if any(key.startswith("encoder.") for key in keys) else "lgi_former"
    if any(_is_hf_key(key) for key in keys):
        return "huggingface"
    if any(key.startswith("encoder.") for key in keys):
        return "videomae_pretrain"
    if any(key.endswith("attn.qkv.bias") for key in keys):
        return "timm"
    if any(key.startswith(("patch_embed.", "blocks.")) for key in keys):
        return "videomae"
    raise IncompatibleCheckpointError(
        f"unrecognised checkpoint layout: expected VideoMAE ('patch_embed.proj.weight', 'blocks.N...'), "
        f"its pre-train form ('encoder.' prefix) or Hugging Face ('videomae.encoder.layer.N...') keys; "
        f"got {_summarise_keys(keys)}"
    )


def _is_hf_key(key: str) -> bool:
    key = key.removeprefix("videomae.")
    return key.startswith(("embeddings.patch_embeddings.", "encoder.layer."))


def _strip_wrappers(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Remove DDP/backbone wrapper prefixes from every key (repeatedly, in any order)."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------
# One converter per source layout: (state_dict, ignored) -> state_dict in the encoder's keys
# --------------------------------------------------------------------------------------------------


def _convert_videomae(state_dict: StateDict, ignored: Ignored) -> StateDict:
    """Original fine-tuned VideoMAE / MAE-DFER plain ViT: same names, head keys dropped."""
    return _drop_ignored(state_dict, _VIDEOMAE_IGNORED, ignored)


def _convert_videomae_pretrain(state_dict: StateDict, ignored: Ignored) -> StateDict:
    """MAE pre-training model: drop the decoder side, then strip ``encoder.``."""
    kept = _drop_ignored(state_dict, _PRETRAIN_IGNORED, ignored)
    return {key.removeprefix("encoder."): value for key, value in kept.items()}


def _convert_huggingface(state_dict: StateDict, ignored: Ignored) -> StateDict:
    """transformers VideoMAE*: rename, and concatenate query/key/value into ``attn.qkv.weight``."""
    kept = _drop_ignored(state_dict, _HF_IGNORED, ignored)
    out: StateDict = {}
    layers: dict[int, dict[str, tuple[str, Tensor]]] = {}
    for key, value in kept.items():
        name = key.removeprefix("videomae.")
        match = _HF_LAYER_RE.match(name)
        if match is None:
            out[_rename_prefix(name, _HF_TOP_RENAMES) or key] = value
            continue
        index, rest = int(match.group(1)), match.group(2)
        renamed = _rename_prefix(rest, _HF_LAYER_RENAMES)
        if renamed is not None:
            out[f"blocks.{index}.{renamed}"] = value
        else:
            layers.setdefault(index, {})[rest] = (key, value)
    for index, attn in sorted(layers.items()):
        out.update(_merge_hf_qkv(index, attn, ignored))
    return out


def _merge_hf_qkv(index: int, attn: dict[str, tuple[str, Tensor]], ignored: Ignored) -> StateDict:
    """Concatenate one HF layer's query/key/value weights; leftovers keep their original names."""
    parts = [f"attention.attention.{p}.weight" for p in ("query", "key", "value")]
    key_bias = attn.pop("attention.attention.key.bias", None)
    if key_bias is not None:
        _require_zero_key_bias(key_bias[0], key_bias[1])
        ignored.setdefault(_REASON_HF_KEY_BIAS, []).append(key_bias[0])
    if not all(p in attn for p in parts):
        return {original: value for original, value in attn.values()}
    out = {f"blocks.{index}.attn.qkv.weight": torch.cat([attn.pop(p)[1] for p in parts], dim=0)}
    out.update({original: value for original, value in attn.values()})
    return out


def _convert_lgi_former(state_dict: StateDict, ignored: Ignored) -> StateDict:
    """Fine-tuned MAE-DFER LGI-Former: the encoder's own names, classification head dropped."""
    return _drop_ignored(state_dict, _LGI_IGNORED, ignored)


_CONVERTERS: dict[str, Callable[[StateDict, Ignored], StateDict]] = {
    "videomae": _convert_videomae,
    "timm": _convert_videomae,  # same names; the 3C qkv bias is split by the shared step below
    "videomae_pretrain": _convert_videomae_pretrain,
    "huggingface": _convert_huggingface,
    "lgi_former": _convert_lgi_former,
    "lgi_former_pretrain": _convert_videomae_pretrain,  # same wrapper: encoder. prefix, MAE decoder
}


# --------------------------------------------------------------------------------------------------
# Steps shared by every layout
# --------------------------------------------------------------------------------------------------


def _split_qkv_bias(state_dict: StateDict) -> StateDict:
    """timm layout: ``attn.qkv.bias`` (3C) -> ``attn.q_bias`` and ``attn.v_bias``; the k third must be 0."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if not key.endswith("attn.qkv.bias"):
            out[key] = value
            continue
        q, k, v = value.chunk(3)
        _require_zero_key_bias(key, k)
        stem = key.removesuffix("qkv.bias")
        out[stem + "q_bias"], out[stem + "v_bias"] = q, v
    return out


def _require_zero_key_bias(key: str, bias: Tensor) -> None:
    if torch.count_nonzero(bias):
        raise IncompatibleCheckpointError(
            f"{key!r} has a non-zero key bias (max |b| = {bias.abs().max().item():.3g}); "
            "VideoMAEEncoder attention carries only q_bias and v_bias (VideoMAE's layout), "
            "so this checkpoint cannot be represented exactly"
        )


def _check_pos_embed(state_dict: StateDict, model: Encoder, ignored: Ignored) -> StateDict:
    """Accept a stored position table only if it is the fixed sinusoid the encoder recomputes."""
    if "pos_embed" not in state_dict:
        return state_dict
    out = dict(state_dict)
    table = out.pop("pos_embed")
    expected = model.pos_embed
    if table.numel() != expected.numel() or not torch.allclose(
        table.reshape(expected.shape).float(), expected.float().cpu(), atol=1e-4
    ):
        raise IncompatibleCheckpointError(
            f"checkpoint 'pos_embed' {tuple(table.shape)} is not VideoMAE's fixed sinusoid table "
            f"{tuple(expected.shape)} for this encoder: learned or resized position embeddings are not supported"
        )
    ignored.setdefault(_REASON_POS_EMBED, []).append("pos_embed")
    return out


def _drop_unused_final_norm(state_dict: StateDict, model: Encoder, ignored: Ignored) -> StateDict:
    """Drop ``norm.*`` only when the model is configured without a final norm (mean-pool FT model)."""
    norm_keys = [key for key in state_dict if key.startswith("norm.")]
    if model.cfg.final_norm or not norm_keys:
        return state_dict
    ignored.setdefault(_REASON_FINAL_NORM, []).extend(norm_keys)
    return {key: value for key, value in state_dict.items() if key not in norm_keys}


def _check_shapes(state_dict: StateDict, model: Encoder) -> None:
    """Raise if a tensor shared with the model has another shape, hinting at the right preset."""
    target = model.state_dict()
    bad = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)}"
        for key, value in state_dict.items()
        if key in target and value.shape != target[key].shape
    ]
    if bad:
        more = f"; ... and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
        raise CheckpointMismatchError(
            f"{len(bad)} tensor shape(s) disagree with the encoder: {'; '.join(bad[:_MAX_LISTED])}{more}. "
            f"Hint: {_architecture_hint(state_dict, model)}"
        )


def _architecture_hint(state_dict: StateDict, model: Encoder) -> str:
    """Describe the encoder the checkpoint was made for and name the preset that matches it."""
    if isinstance(model, LGIFormerEncoder):
        return _lgi_former_hint(state_dict, model)
    weight = state_dict.get("patch_embed.proj.weight")
    depths = [int(m.group(1)) for key in state_dict if (m := _BLOCK_RE.match(key))]
    if weight is None or weight.ndim != 5 or not depths:
        return "the checkpoint does not look like a complete VideoMAE ViT encoder"
    embed_dim, depth = weight.shape[0], max(depths) + 1
    kernel = f"{weight.shape[2]}x{weight.shape[3]}x{weight.shape[4]}"
    found = f"the checkpoint is an embed_dim={embed_dim}, depth={depth}, tubelet {kernel} encoder"
    presets = [name for name, c in ENCODER_PRESETS.items() if (c.embed_dim, c.depth) == (embed_dim, depth)]
    if presets:
        return f"{found}; choose the matching preset, encoder_config({presets[0]!r}) (this model: {_describe(model)})"
    return (
        f"{found}; no preset matches, build one with encoder_config(..., embed_dim={embed_dim}, depth={depth}, "
        f"num_heads=...) (this model: {_describe(model)})"
    )


def _lgi_former_hint(state_dict: StateDict, model: LGIFormerEncoder) -> str:
    """:func:`_architecture_hint` for an LGI-Former: width, depth and region count of the checkpoint."""
    weight, regions = state_dict.get("patch_embed.proj.weight"), state_dict.get("lg_region_tokens")
    depths = [int(m.group(1)) for key in state_dict if (m := _BLOCK_RE.match(key))]
    if weight is None or weight.ndim != 5 or regions is None or not depths:
        return "the checkpoint does not look like a complete LGI-Former encoder"
    embed_dim, depth, num_regions = weight.shape[0], max(depths) + 1, regions.shape[0]
    found = f"the checkpoint is an LGI-Former with embed_dim={embed_dim}, depth={depth} and {num_regions} regions"
    if any(marker in key for key in state_dict for marker in _LGI_VARIANT_MARKERS):
        found += (" whose 'first_attn_norm1' means lg_first_attn_type='cross', an LGBlock variant MAE-DFER did "
                  "not release and LGIFormerEncoder does not implement")
    presets = [name for name, c in LGI_FORMER_PRESETS.items() if (c.embed_dim, c.depth) == (embed_dim, depth)]
    if presets:
        return (f"{found}; choose the matching preset, lgi_former_config({presets[0]!r}), with frames, img_size and "
                f"region_size that give {num_regions} regions (this model: {_describe(model)})")
    return (f"{found}; no preset matches, build one with lgi_former_config(..., embed_dim={embed_dim}, depth={depth}, "
            f"num_heads=...) (this model: {_describe(model)})")


def _describe(model: Encoder) -> str:
    cfg = model.cfg
    text = f"embed_dim={cfg.embed_dim}, depth={cfg.depth}, tubelet {cfg.tubelet_size}x{cfg.patch_size}x{cfg.patch_size}"
    if isinstance(model, LGIFormerEncoder):
        text += f", {model.cfg.num_regions} regions of {'x'.join(map(str, model.cfg.region_size))} tokens"
    return text


# --------------------------------------------------------------------------------------------------
# Public conversion
# --------------------------------------------------------------------------------------------------


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: Encoder) -> dict[str, Tensor]:
    """Convert a foreign state dict to ``model``'s keys (pure: the input is not modified).

    Detects the layout (:func:`detect_format`), applies that layout's converter, splits a timm-style
    3C ``qkv.bias``, drops the explicit ignored sets (logged), and checks tensor shapes.

    Args:
        state_dict: Checkpoint tensors in any supported layout.
        model: The encoder the weights are meant for: a :class:`VideoMAEEncoder` or an
            :class:`LGIFormerEncoder` (its config decides about the final norm).

    Returns:
        A state dict in the encoder's key names. Key-set completeness is checked by the loader.

    Raises:
        IncompatibleCheckpointError: A checkpoint of the other encoder family, an unknown layout,
            a non-zero key bias, a learned position embedding.
        CheckpointMismatchError: A tensor's shape disagrees with the model.
    """
    _, converted, _ = _convert(state_dict, model)
    return converted


def _convert(state_dict: Mapping[str, Tensor], model: Encoder) -> tuple[str, StateDict, Ignored]:
    """:func:`checkpoint_filter_fn` plus the detected format and the ignored keys by reason."""
    fmt = detect_format(state_dict)
    _require_family(fmt, model)
    ignored: Ignored = {}
    converted = _CONVERTERS[fmt](_strip_wrappers(state_dict), ignored)
    converted = _split_qkv_bias(converted)
    converted = _check_pos_embed(converted, model, ignored)
    converted = _drop_unused_final_norm(converted, model, ignored)
    _check_shapes(converted, model)
    for reason, keys in ignored.items():
        _logger.info("ignored %d checkpoint key(s) (%s): %s", len(keys), reason, _summarise_keys(keys))
    return fmt, converted, ignored


def _require_family(fmt: str, model: Encoder) -> None:
    """Refuse a checkpoint of one encoder family (plain ViT, LGI-Former) meant for the other."""
    lgi_checkpoint, lgi_model = fmt in _LGI_FORMATS, isinstance(model, LGIFormerEncoder)
    if lgi_checkpoint and not lgi_model:
        raise IncompatibleCheckpointError(
            "this is an LGI-Former checkpoint from MAE-DFER (keys such as 'lg_region_tokens', "
            "'blocks.0.first_attn.q.weight'), not a plain VideoMAE ViT: its local-global blocks cannot be "
            "loaded into VideoMAEEncoder. Load it into an LGIFormerEncoder (encoder preset 'lgi_former_base'), "
            "or use a plain VideoMAE ViT checkpoint (e.g. MCG-NJU VideoMAE ViT-L K400)"
        )
    if lgi_model and not lgi_checkpoint:
        raise IncompatibleCheckpointError(
            f"this is a plain VideoMAE ViT checkpoint ({fmt} layout: no 'lg_region_tokens', no "
            "'blocks.N.first_attn.*'), not an LGI-Former from MAE-DFER: it cannot be loaded into LGIFormerEncoder. "
            "Load it into a VideoMAEEncoder (an encoder preset such as 'vit_large'), or use MAE-DFER's checkpoint"
        )


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def load_encoder_checkpoint(encoder: Encoder, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Read a checkpoint file, convert it and load it into ``encoder`` in place.

    Args:
        encoder: Destination :class:`VideoMAEEncoder` or :class:`LGIFormerEncoder`; its config must
            match the checkpoint's architecture.
        path: ``.pth``/``.pt``/``.bin`` (``torch.save``; loaded with ``weights_only=True``, allowing
            only ``argparse.Namespace`` besides tensors and containers) or ``.safetensors``.
        strict: Raise on missing/unexpected keys beyond the explicit ignored sets. With ``False``
            they are logged as warnings and returned in the report; shapes are always checked.

    Returns:
        What was loaded and what was dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointReadError: Unreadable, corrupt, refused by ``weights_only``, or not a state dict.
        CheckpointMismatchError: Missing/unexpected keys (``strict``) or shape mismatches.
        IncompatibleCheckpointError: The other encoder family (an LGI-Former into a plain ViT or the
            reverse) or an unknown layout.
    """
    path = Path(path)
    state_dict = _unwrap(_read(path), path)
    try:
        fmt, converted, ignored = _convert(state_dict, encoder)
        missing, unexpected = _key_diff(converted, encoder)
        if strict and (missing or unexpected):
            raise CheckpointMismatchError(_mismatch_message(fmt, missing, unexpected, ignored, converted, encoder))
    except CheckpointError as err:
        raise type(err)(f"{path}: {err}") from err
    if missing or unexpected:
        _logger.warning("%s", _mismatch_message(fmt, missing, unexpected, ignored, converted, encoder))
    loadable = {key: value for key, value in converted.items() if key not in unexpected}
    encoder.load_state_dict(loadable, strict=strict)
    _logger.info("loaded %d tensors from %s (%s layout)", len(loadable), path, fmt)
    return LoadReport(str(path), fmt, len(loadable), ignored, missing, unexpected)


def _read(path: Path) -> object:
    """Deserialise ``path`` safely; every failure names the file."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # VideoMAE / MAE-DFER checkpoints pickle their argparse Namespace (official_spec.md 7.2).
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any deserialisation failure becomes one clear error
        raise CheckpointReadError(f"cannot read checkpoint {path}: {_read_error_detail(err)}") from err


def _unwrap(obj: object, path: Path) -> StateDict:
    """Find the tensor dict: the object itself or its ``model`` / ``module`` / ``state_dict`` entry."""
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path} holds a {type(obj).__name__}, not a state dict")
    container = next((key for key in _CONTAINER_KEYS if isinstance(obj.get(key), Mapping)), None)
    if container is not None:
        obj = obj[container]
    bad = [f"{key!r} ({type(value).__name__})" for key, value in obj.items() if not isinstance(value, Tensor)]
    if bad or not obj:
        found = f"non-tensor entries {', '.join(bad[:5])}" if bad else "no tensors"
        raise CheckpointReadError(
            f"{path} is not a state dict: {found}; expected a tensor dict, possibly under one of the top-level keys "
            f"{list(_CONTAINER_KEYS)}"
        )
    return dict(obj)


def _key_diff(state_dict: StateDict, model: Encoder) -> tuple[list[str], list[str]]:
    expected = set(model.state_dict())
    return sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)


def _mismatch_message(
    fmt: str, missing: list[str], unexpected: list[str], ignored: Ignored, converted: StateDict, model: Encoder
) -> str:
    parts = [f"checkpoint ({fmt} layout) does not match the encoder's keys"]
    if missing:
        parts.append(f"{len(missing)} missing: {_summarise_keys(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_summarise_keys(unexpected)}")
    if ignored:
        parts.append("ignored on purpose: " + "; ".join(f"{_summarise_keys(k)} ({r})" for r, k in ignored.items()))
    if any(key.startswith("norm.") for key in missing):
        parts.append(
            "Hint: the checkpoint has no final norm (a fine-tuned mean-pool model); "
            "build the encoder with final_norm=False"
        )
    else:
        parts.append(f"Hint: {_architecture_hint(converted, model)}")
    return ". ".join(parts)


def _summarise_keys(keys: Iterable[str]) -> str:
    """Compact, bounded listing: ``blocks.{2..23}.norm1.weight``; a key seen once is printed verbatim."""
    groups: dict[str, list[int]] = {}
    singles: list[str] = []
    for key in sorted(keys):
        match = _BLOCK_RE.match(key)
        if match is None:
            singles.append(key)
        else:
            groups.setdefault(key[match.end():], []).append(int(match.group(1)))
    items = singles + [
        f"blocks.{indices[0]}.{rest}" if len(indices) == 1 else f"blocks.{_index_set(indices)}.{rest}"
        for rest, indices in groups.items()
    ]
    listed = ", ".join(items[:_MAX_LISTED])
    return listed + (f", ... ({len(items) - _MAX_LISTED} more patterns)" if len(items) > _MAX_LISTED else "")


def _index_set(indices: list[int]) -> str:
    indices = sorted(set(indices))
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{{{indices[0]}..{indices[-1]}}}"
    return "{" + ",".join(map(str, indices)) + "}"


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _ignore_reason(key: str, rules: Mapping[str, str]) -> str | None:
    """Reason ``key`` is dropped under ``rules`` (prefixes end with "."), or None to keep it."""
    for pattern, reason in rules.items():
        if key == pattern or (pattern.endswith(".") and key.startswith(pattern)):
            return reason
    return None


def _drop_ignored(state_dict: StateDict, rules: Mapping[str, str], ignored: Ignored) -> StateDict:
    kept: StateDict = {}
    for key, value in state_dict.items():
        reason = _ignore_reason(key, rules)
        if reason is None:
            kept[key] = value
        else:
            ignored.setdefault(reason, []).append(key)
    return kept


def _rename_prefix(name: str, renames: Mapping[str, str]) -> str | None:
    """Apply the first matching prefix rename (exact match for names not ending in "."), else None."""
    for old, new in renames.items():
        if name == old or (old.endswith(".") and name.startswith(old)):
            return new + name[len(old):]
    return None


def _read_error_detail(err: BaseException) -> str:
    """Short reason for a failed read, naming a global that ``weights_only`` refused."""
    text = str(err)
    refused = _REFUSED_GLOBAL_RE.search(text)
    if refused:
        return (
            f"refused by torch.load(weights_only=True): it pickles {refused.group(1)!r}, and only "
            "argparse.Namespace is allowed besides tensors and containers. If you trust the file, re-save "
            "its state dict alone (or as .safetensors)"
        )
    unpickler = _UNPICKLER_ERROR_RE.search(text)
    detail = unpickler.group(1) if unpickler else (text.strip().splitlines() or ["no detail"])[0]
    return (
        f"{type(err).__name__}: {detail.strip()}. Expected a torch.save state dict (.pth/.pt/.bin) or a "
        ".safetensors file; the file may be corrupt or truncated"
    )
