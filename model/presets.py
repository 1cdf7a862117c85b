"""Named presets of frozen config dataclasses, resolved the same way for encoders and decoders."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import TypeVar

C = TypeVar("C")


def resolve_preset(kind: str, name: str | C, presets: Mapping[str, C], **overrides: object) -> C:
    """A preset by name (or a config passed through) with field overrides applied.

    Args:
        kind: What is configured, for error messages (``"encoder"``, ``"decoder"``).
        name: A preset name or an instance of the config dataclass.
        presets: Name -> config.
        **overrides: Fields to replace.

    Raises:
        ValueError: Unknown preset name or unknown field.
    """
    if isinstance(name, str):
        if name not in presets:
            raise ValueError(f"unknown {kind} preset {name!r}; expected one of {sorted(presets)}")
        base = presets[name]
    else:
        base = name
    unknown = set(overrides) - {f.name for f in fields(base)}
    if unknown:
        raise ValueError(f"unknown {kind} setting(s) {sorted(unknown)}")
    return replace(base, **overrides)
