"""orchestrator/trial/device.py: a trial that Ray gave a GPU but that sees no CUDA fails at once.

There is no GPU here, so "Ray gave a GPU" is the real thing Ray does on a CPU machine that
declares one (``ray.init(num_gpus=1)``: Ray assigns GPU 0 and sets ``CUDA_VISIBLE_DEVICES``), or
the same input passed explicitly (``gpu_ids``).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

import vocab
from orchestrator.trial.config import TrialConfig
from orchestrator.trial.device import (
    DeviceUnavailableError,
    describe_device,
    likely_cuda_cause,
    resolve_device,
)
from orchestrator.trial.run_logger import make_trial_logger

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: nothing to refuse")


@needs_no_cuda
def test_assigned_gpu_without_cuda_is_refused_naming_node_and_cause() -> None:
    with pytest.raises(DeviceUnavailableError) as err:
        resolve_device(gpu_ids=["0"])
    message = str(err.value)
    assert socket.gethostname() in message and "GPU(s) 0" in message
    assert likely_cuda_cause() in message
    assert "torch.cuda.is_available() is False" in message


@needs_no_cuda
def test_no_gpu_assigned_trains_on_cpu() -> None:
    assert resolve_device(gpu_ids=[]) == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")  # outside Ray: nothing was promised


@needs_no_cuda
def test_likely_cause_tells_cpu_wheel_container_and_driver_apart(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert "CPU-only build" in likely_cuda_cause(cuda_build=None, dev=tmp_path)
    assert "container started without GPU access" in likely_cuda_cause(cuda_build="13.0", dev=tmp_path)
    (tmp_path / "nvidia0").touch()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    cause = likely_cuda_cause(cuda_build="13.0", dev=tmp_path)
    assert "driver mismatch" in cause and "CUDA 13.0" in cause and "CUDA_VISIBLE_DEVICES='0'" in cause
    assert "raised nothing" not in cause, "torch's own reason is quoted"


@pytest.mark.slow
@needs_no_cuda
def test_ray_gpu_task_without_cuda_fails_at_once_with_ray_node_ip() -> None:
    """A real Ray task that holds a (declared) GPU: Ray's own assignment is what resolve_device reads."""
    import ray

    @ray.remote(num_gpus=1, num_cpus=0, max_retries=0)
    def trial_device() -> str:
        return str(resolve_device())

    @ray.remote(num_gpus=0, num_cpus=1, max_retries=0)
    def cpu_trial_device() -> str:
        return str(resolve_device())

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False)
    try:
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(trial_device.remote())
        assert ray.get(cpu_trial_device.remote()) == "cpu"
        node_ip = ray.util.get_node_ip_address()
    finally:
        ray.shutdown()
    assert isinstance(err.value.as_instanceof_cause(), DeviceUnavailableError)
    assert f"Ray node {node_ip}" in str(err.value) and "GPU(s) 0" in str(err.value)


def test_trial_run_is_tagged_with_its_device(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = TrialConfig.from_flat({"dataset": vocab.DEMO, "arch": vocab.ARCHITECTURES[0], "fold": 0,
                                 "cache_dir": str(tmp_path), "tracking_uri": uri, "experiment": "exp"})
    tracker = make_trial_logger(cfg, torch.device("cpu"))
    assert tracker is not None
    assert MlflowClient(uri).get_run(tracker.run_id).data.tags["device"] == "cpu"
    assert describe_device(torch.device("cpu")) == "cpu"
