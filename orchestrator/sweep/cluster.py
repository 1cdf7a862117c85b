"""Ray: connect to a cluster or start a local instance, and size one trial's resource request."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from orchestrator.sweep.space import SweepSpace

logger = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to a cluster (``address``, else ``$RAY_ADDRESS``) or start a local Ray instance.

    Args:
        address: ``auto`` or ``host:port`` of a cluster; ``local`` forces a new local instance.
        num_cpus: CPUs of a local instance (default: all).

    Returns:
        ``"existing"`` when Ray was already initialised (the caller leaves it running),
        ``"cluster"`` or ``"local"`` when this call connected or started it (the caller shuts it down).
    """
    import ray

    if ray.is_initialized():
        return "existing"
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address)
        return "cluster"
    # Ray 2.60 turns token auth on for local instances; a single-machine sweep needs none.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local" if address else None, num_cpus=num_cpus, include_dashboard=False)
    return "local"


def trial_resources(space: SweepSpace, gpus_per_trial: float | None, local: bool) -> dict[str, float]:
    """CPU/GPU request of one trial.

    ``gpu: auto`` asks for one GPU when the cluster has GPUs now or its launcher config offers GPU
    workers (an autoscaling cluster starts without any); ``gpus_per_trial`` overrides the space. On
    a local Ray instance the CPU request is capped at the machine's CPUs so trials can start at all.
    """
    import ray

    available = ray.cluster_resources()
    gpu = space.resources.gpu if gpus_per_trial is None else gpus_per_trial
    if gpu == "auto":
        gpu = 1.0 if available.get("GPU", 0) > 0 or _autoscaler_offers_gpus() else 0.0
        if not gpu and not local:
            logger.warning("the cluster has no GPUs now and its autoscaler offers none: trials run "
                           "on CPUs (pass --gpus-per-trial 1 to wait for GPU workers)")
    cpu = space.resources.cpu
    if local and available.get("CPU", 0) > 0:
        cpu = min(cpu, float(available["CPU"]))
    return {"cpu": cpu, "gpu": float(gpu)}


def trial_slots(resources: Mapping[str, float], nodes: list[dict] | None = None,
                config: Path = Path("~/ray_bootstrap_config.yaml")) -> int:
    """How many trials of ``resources`` the cluster holds at once: its nodes now (``ray.nodes()``),
    plus the workers its launcher config may still start (``max_workers`` of each node type); at
    least 1."""
    if nodes is None:
        import ray

        nodes = ray.nodes()

    def fits(node: Mapping[str, float]) -> int:
        asked = {"CPU": resources.get("cpu", 0.0), "GPU": resources.get("gpu", 0.0)}
        counts = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in asked.items() if v > 0]
        return min(counts) if counts else 0

    slots = sum(fits(n.get("Resources", {})) for n in nodes if n.get("Alive"))
    for node_type in _launcher_node_types(config).values():
        slots += int(node_type.get("max_workers", 0)) * fits(node_type.get("resources") or {})
    return max(slots, 1)


@contextlib.contextmanager
def pending_trials(resources: Mapping[str, float]) -> Iterator[None]:
    """Let Tune start as many trials at once as the cluster holds (``TUNE_MAX_PENDING_TRIALS_PG``).

    With a custom searcher Tune keeps a single trial pending: trial actors then start one after
    another (a fresh worker process, CUDA init) and an autoscaler sees the demand of one trial at a
    time. A value the user set is kept.
    """
    key = "TUNE_MAX_PENDING_TRIALS_PG"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(trial_slots(resources))
    try:
        yield
    finally:
        os.environ.pop(key, None)


def _launcher_node_types(config: Path) -> dict:
    """The node types of the cluster launcher's config on this head (``{}`` elsewhere)."""
    import yaml

    path = config.expanduser()
    if not path.is_file():
        return {}
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("available_node_types", {}) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _autoscaler_offers_gpus(config: Path = Path("~/ray_bootstrap_config.yaml")) -> bool:
    """Whether the cluster launcher's config on this head node has a node type with GPUs.

    An autoscaling cluster starts with no GPU workers; the launcher writes its config (node types
    with their resources filled in) to ``~/ray_bootstrap_config.yaml`` on the head.
    """
    types = _launcher_node_types(config)
    return any((t.get("resources") or {}).get("GPU", 0) > 0 for t in types.values())


def is_local(mode: str) -> bool:
    """Whether trials run on this machine only (a local instance, or an existing one without nodes
    elsewhere)."""
    if mode != "existing":
        return mode == "local"
    import ray

    if Path("~/ray_bootstrap_config.yaml").expanduser().exists():  # a launcher cluster's head
        return False
    return len({n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}) <= 1
