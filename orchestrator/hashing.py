"""The one way this project hashes a value: SHA-256 of its canonical JSON (a leaf module).

Cache settings, feature-cache keys, trial configurations, search spaces and Optuna seeds all go
through :func:`stable_hash`, so a hash means the same thing wherever it is shown.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_json(value: Any) -> str:
    """``value`` as JSON with sorted keys and no spaces; non-JSON values by ``str``."""
    return json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))


def stable_hash(value: Any, length: int = 16) -> str:
    """The first ``length`` hex digits of the SHA-256 of :func:`canonical_json` of ``value``.

    Key order does not matter; values compare through their JSON form (``1`` and ``1.0`` differ).
    """
    return hashlib.sha256(canonical_json(value).encode("utf-8")).hexdigest()[:length]
