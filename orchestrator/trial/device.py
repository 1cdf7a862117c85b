"""Where and how precisely a trial computes: device, autocast dtype, seeding and RNG state."""

from __future__ import annotations

import logging
import os
import random
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vocab

logger = logging.getLogger(__name__)


class DeviceUnavailableError(RuntimeError):
    """Ray gave this trial a GPU that torch cannot use."""


def resolve_device(gpu_ids: Sequence[str | int] | None = None) -> torch.device:
    """The first CUDA device if there is one, else the CPU -- unless Ray promised a GPU.

    A trial that Ray scheduled on a GPU but that sees no CUDA would otherwise train on the CPU
    for hours, holding the node's GPU slot; it fails at once instead.

    Args:
        gpu_ids: The GPUs Ray assigned to this process; default :func:`ray_gpu_ids`.

    Raises:
        DeviceUnavailableError: GPUs were assigned but ``torch.cuda.is_available()`` is False;
            the message names the node and the likely cause.
    """
    if torch.cuda.is_available():
        return torch.device("cuda")
    assigned = ray_gpu_ids() if gpu_ids is None else [str(i) for i in gpu_ids]
    if assigned:
        raise DeviceUnavailableError(
            f"Ray assigned GPU(s) {', '.join(assigned)} to this trial on node {node_name()}, but "
            f"torch.cuda.is_available() is False: {likely_cuda_cause()}. Not training on the CPU instead."
        )
    return torch.device("cpu")


def ray_gpu_ids() -> list[str]:
    """GPU ids Ray assigned to this process; [] outside a Ray worker (Ray is never imported here)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return []
    return [str(i) for i in ray.get_gpu_ids()]


def node_name() -> str:
    """This machine's hostname, with its Ray node IP inside a Ray worker."""
    host = socket.gethostname()
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return host
    return f"{host} (Ray node {ray.util.get_node_ip_address()})"


def likely_cuda_cause(cuda_build: str | None = torch.version.cuda, dev: Path = Path("/dev")) -> str:
    """Why torch sees no CUDA here, best guess first.

    Args:
        cuda_build: The CUDA version torch was built for (None: a CPU-only wheel).
        dev: Where the NVIDIA device nodes would be.
    """
    if cuda_build is None:
        return (f"torch {torch.__version__} is a CPU-only build; install the CUDA wheel "
                f"(pip install torch=={torch.__version__.split('+')[0]} from the default index)")
    if not any(dev.glob("nvidia[0-9]*")):
        return (f"no {dev}/nvidia* device is visible: a container started without GPU access (docker "
                f"--gpus all / --runtime=nvidia), or no NVIDIA driver loaded on the host")
    driver = Path("/proc/driver/nvidia/version")
    version = driver.read_text().splitlines()[0] if driver.is_file() else "unknown"
    return (f"the GPU device exists but CUDA does not initialise ({_cuda_init_error()}): a driver mismatch "
            f"(torch is built for CUDA {cuda_build}; NVIDIA driver: {version}; upgrade the driver or install "
            f"the torch wheel for its CUDA), or CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r} hides the GPU")


def _cuda_init_error() -> str:
    """torch's own reason for not initialising CUDA (the driver's words, e.g. "too old")."""
    try:
        torch.cuda.init()
    except Exception as err:  # RuntimeError or AssertionError, depending on the build
        return str(err).strip().splitlines()[0]
    return "torch.cuda.init() raised nothing"


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda:<index> (<GPU name>)``: the device a trial trained on, for its MLflow tag."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX), per PyTorch's probes."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    Raises:
        ValueError: ``fp16`` without CUDA, or an unknown name.
    """
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("trial config precision='fp16' needs a CUDA device; use 'bf16' or 'fp32' on CPU")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("precision='bf16' on a CPU without AVX512-BF16 or AMX: bf16 matmuls are emulated "
                       "and likely slower than float32 here (precision='fp32' or 'auto' avoids that)")
    table = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in table:
        raise ValueError(f"trial config precision={precision!r}; expected one of {list(vocab.PRECISIONS)}")
    return table[precision]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    """Every global RNG's state as tensors and plain Python values (loadable with ``weights_only=True``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore :func:`rng_state` output."""
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
