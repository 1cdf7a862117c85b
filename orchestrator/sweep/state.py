"""A sweep's ``state.json``: which stages finished, what they chose, and where its storage lives."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.hashing import stable_hash
from orchestrator.sweep.space import SweepSpace

_STATE_VERSION = 1


@dataclass
class SweepState:
    """``state.json`` of a sweep: which stages finished and what they chose.

    Attributes:
        path: The JSON file.
        space_hash: Hash of the validated search space the sweep started with.
        settings: Storage, tracking URI, experiment and cache the sweep runs with.
        groups: Group key -> ``{"done", "params", "score", "completed"}`` of stage A.
        cv_done: Whether stage B finished without errors.
    """

    path: Path
    space_hash: str
    settings: dict[str, str] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    cv_done: bool = False

    @classmethod
    def load(cls, path: Path) -> SweepState | None:
        """Read the state, or None when the sweep never started."""
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        return cls(path, raw["space_hash"], raw.get("settings", {}), raw.get("groups", {}),
                   bool(raw.get("cv_done", False)))

    def save(self) -> None:
        """Write atomically (tmp + rename)."""
        body = {"version": _STATE_VERSION, "space_hash": self.space_hash, "settings": self.settings,
                "groups": self.groups, "cv_done": self.cv_done}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body, indent=2, sort_keys=True, default=str))
        os.replace(tmp, self.path)


def space_hash(space: SweepSpace) -> str:
    """Hash of what a search space means (comments and layout do not count)."""
    fields = dataclasses.asdict(space)
    for volatile in ("path", "name", "description", "resources", "max_failures"):
        fields.pop(volatile)
    return stable_hash(fields, 16)


def join_storage(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])
