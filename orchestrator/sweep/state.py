"""A sweep's ``state.json``: what its studies chose, whether its results are complete, where its storage lives."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.hashing import stable_hash
from orchestrator.sweep.space import SweepSpace

_STATE_VERSION = 2


@dataclass
class SweepState:
    """``state.json`` of a sweep: what its studies chose and whether its results are complete.

    Attributes:
        path: The JSON file.
        space_hash: Hash of the validated search space the sweep started with.
        settings: Storage, tracking URI, experiment and cache the sweep runs with.
        studies: Study name -> its choice: ``{"params", "score", "completed"}``, and with nested
            selection the chosen trial's ``run_id``, ``trial_key`` and test metrics.
        search_done: Whether every study of the search finished.
        complete: Whether every (dataset, arch, fold) of the sweep has its result.
    """

    path: Path
    space_hash: str
    settings: dict[str, str] = field(default_factory=dict)
    studies: dict[str, dict[str, Any]] = field(default_factory=dict)
    search_done: bool = False
    complete: bool = False

    @classmethod
    def load(cls, path: Path) -> SweepState | None:
        """Read the state, or None when the sweep never started."""
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        if raw.get("version", 1) < _STATE_VERSION:  # version 1: one search per group, then cv
            studies = {k: v for k, v in raw.get("groups", {}).items() if v.get("done")}
            return cls(path, raw["space_hash"], raw.get("settings", {}), studies,
                       bool(studies), bool(raw.get("cv_done", False)))
        return cls(path, raw["space_hash"], raw.get("settings", {}), raw.get("studies", {}),
                   bool(raw.get("search_done", False)), bool(raw.get("complete", False)))

    def save(self) -> None:
        """Write atomically (tmp + rename)."""
        body = {"version": _STATE_VERSION, "space_hash": self.space_hash, "settings": self.settings,
                "studies": self.studies, "search_done": self.search_done, "complete": self.complete}
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
