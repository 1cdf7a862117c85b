"""Shared benchmark machinery: machine facts, timing, matmul peak, peak memory, result records, reports.

A benchmark returns a list of result dicts. Every result carries ``name``, ``ratio`` (this system over
its baseline measured in the same run, higher is better), ``target`` and ``passed``; the rest are raw
numbers (seconds, clips/s, bytes, FLOP/s) so a reader can recompute every ratio.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import logging
import math
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

Result = dict[str, Any]


# --------------------------------------------------------------------------------------------------
# Machine and versions


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE)
    return match.group(1).strip() if match else platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on: CPU, cores, threads, accelerator, load and versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(device),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "timm": _version("timm"),
            "numpy": _version("numpy"),
            "mtcae": _version("mtcae"),
        },
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["versions"]["cuda"] = torch.version.cuda
    return info


def default_device() -> torch.device:
    """CUDA when available (the full run is for a GPU machine), else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock timing is honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], device: torch.device, rounds: int
) -> dict[str, list[float]]:
    """Time several functions alternately (A, B, A, B, ...), ``rounds`` calls each.

    Alternating means a burst of load from a neighbour hits both sides instead of one, so ratios of
    the per-function minimum stay meaningful on a shared machine.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


def summarize_times(times: list[float]) -> dict[str, Any]:
    """Best (used for ratios: the least disturbed run) and median seconds, plus all samples."""
    ordered = sorted(times)
    return {"best_s": ordered[0], "median_s": ordered[len(ordered) // 2], "samples_s": times}


# --------------------------------------------------------------------------------------------------
# Dense matmul peak


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``: how peaks and results name a dtype."""
    return str(dtype).removeprefix("torch.")


def matmul_peak(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5
) -> dict[str, Any]:
    """Best achieved FLOP/s of a square ``size`` x ``size`` matmul: the machine's practical dense peak.

    On CPU, 2048 is large enough for MKL/oneDNN to reach its plateau (1024 is ~15% lower on a
    2-core EPYC); on GPUs a larger size is passed in.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    torch.mm(a, b)
    times = [time_call(lambda: torch.mm(a, b), device) for _ in range(repeats)]
    best = min(times)
    flops = 2 * size**3
    return {"dtype": dtype_name(dtype), "size": size, "flop_per_s": flops / best,
            "best_s": best}


# Every peak measured in this process, by (device, dtype), for the report.
_PEAKS: dict[tuple[str, str], list[dict[str, Any]]] = {}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None) -> float:
    """Measure the dense matmul peak now (and record it for the report); returns FLOP/s.

    Benchmarks measure it right before and right after their own timings and divide by the better
    of the two: the peak then reflects the conditions the timed code ran under, which matters on a
    machine shared with other work.

    Args:
        device: Where.
        dtype: Matmul dtype (the peak a step is compared with has the step's dtype).
        size: Square matrix size; default 2048 on CPU, 8192 on GPU (tests pass a small one).
    """
    size = size or (2048 if device.type == "cpu" else 8192)
    sample = matmul_peak(device, dtype, size=size)
    _PEAKS.setdefault((device.type, sample["dtype"]), []).append(sample)
    return sample["flop_per_s"]


def recorded_peaks() -> list[dict[str, Any]]:
    """Per (device, dtype): the best and worst matmul peak measured in this process, and how often."""
    return [{"device": dev, "dtype": dtype, "flop_per_s": max(s["flop_per_s"] for s in samples),
             "min_flop_per_s": min(s["flop_per_s"] for s in samples), "samples": len(samples)}
            for (dev, dtype), samples in sorted(_PEAKS.items())]


def add_run_best_fractions(results: list[Result], peaks: list[dict[str, Any]]) -> None:
    """Give every result that has a fraction of peak the same figure against the best probe of the
    whole run as well (``fraction_of_run_best_peak``, and in its summary).

    A result's own fraction divides by the probes taken right around it, the conditions it ran
    under; on a machine whose speed drifts (a shared VM's by 10-20% within a run) that figure moves
    with the probes' luck. The run's best probe is the machine's capability: a stricter, steadier
    denominator. Results say what they need with ``peak_dtype`` (``float32`` | ``bfloat16``),
    ``achieved_flop_per_s`` and ``setting.device``.

    Args:
        results: Results, changed in place.
        peaks: :func:`recorded_peaks` of the run.
    """
    best = {(p["device"], p["dtype"]): p["flop_per_s"] for p in peaks}
    for result in results:
        dtype, achieved = result.get("peak_dtype"), result.get("achieved_flop_per_s")
        device = str((result.get("setting") or {}).get("device", "")).split(":")[0]
        top = best.get((device, dtype))
        if achieved is None or not top:
            continue
        result["fraction_of_run_best_peak"] = achieved / top
        note = f"{achieved / top:.2f} of the run's best {dtype} probe"
        result["summary"] = f"{result['summary']}; {note}" if result.get("summary") else note


# --------------------------------------------------------------------------------------------------
# Peak memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it has ``mallinfo2`` (glibc >= 2.33), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None
    return libc


def malloc_bytes_in_use() -> int | None:
    """Bytes malloc has handed out and not taken back (glibc ``mallinfo2``, all arenas); None elsewhere.

    Unlike RSS this does not depend on whether freed memory went back to the OS, so two steps
    measured one after the other in one process are compared fairly.
    """
    libc = _glibc()
    if libc is None:
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, flags=re.MULTILINE)
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory a block of code adds over what was live when it started.

    CUDA: ``torch.cuda.max_memory_allocated`` (the caching allocator's view). CPU with glibc: a
    thread samples :func:`malloc_bytes_in_use` every 50 ms (a step's activation peak lasts
    seconds, so sampling does not miss it; ``mallinfo2`` walks the free lists under the malloc
    lock, ~1.4 ms on a batch-16 step's fragmented heap, so sampling every 5 ms cost a 2-core step
    ~10% of its speed); it counts every malloc'd byte (tensors, oneDNN/MKL scratch), not pages,
    so it does not depend on what earlier code left resident. Elsewhere: sampled ``VmRSS``.

    Attributes:
        peak_bytes: Peak over the starting level, set when the block exits; None if unmeasurable.
        method: How it was measured.
    """

    def __init__(self, device: torch.device, interval_s: float = 0.05) -> None:
        self.device = device
        self.interval_s = interval_s
        self.peak_bytes: int | None = None
        self.method = "none"
        self._start = 0
        self._sampled = 0
        self._probe = malloc_bytes_in_use
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start, self.method = torch.cuda.memory_allocated(self.device), "cuda_max_memory_allocated"
            return self
        start = malloc_bytes_in_use()
        self.method = "malloc_in_use_sampling"
        if start is None:
            rss = _status_kib("VmRSS")
            if rss is None:
                self.method = "none"
                return self
            self._probe = lambda: (_status_kib("VmRSS") or 0) * 1024
            start, self.method = rss * 1024, "rss_sampling"
        self._start = self._sampled = start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, self._probe() or 0)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda_max_memory_allocated":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sampled = max(self._sampled, self._probe() or 0)
            self.peak_bytes = self._sampled - self._start


# --------------------------------------------------------------------------------------------------
# Results


def make_result(name: str, ratio: float, target: float, **raw: Any) -> Result:
    """One result record; ``passed`` is ``ratio >= target``."""
    return {"name": name, "ratio": float(ratio), "target": float(target), "passed": bool(ratio >= target), **raw}


def error_result(name: str, exc: BaseException) -> Result:
    """The record of a benchmark that raised: it fails, and the report says why."""
    return {"name": name, "ratio": None, "target": None, "passed": False,
            "error": f"{type(exc).__name__}: {exc}"}


def normalize_result(result: Mapping[str, Any], source: str) -> Result:
    """Check a result from any benchmark module and fill in ``passed`` and ``source``.

    A result with an ``error`` key (a part of the benchmark that could not run) passes through with
    ``ratio`` and ``target`` None and ``passed`` False.

    Raises:
        ValueError: A required key is missing or ``ratio``/``target`` is not a finite number.
    """
    missing = {"name", "ratio", "target"} - set(result)
    if missing:
        raise ValueError(f"benchmark {source!r} returned a result without {sorted(missing)}: {dict(result)}")
    out = dict(result)
    if out.get("error"):
        return {**out, "ratio": None, "target": None, "passed": False, "source": out.get("source", source)}
    for key in ("ratio", "target"):
        value = out[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"benchmark {source!r} result {out['name']!r}: {key} must be a finite number, got {value!r}")
        out[key] = float(value)
    out.setdefault("passed", out["ratio"] >= out["target"])
    out.setdefault("source", source)
    return out


# --------------------------------------------------------------------------------------------------
# Reports


def write_report(report: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``out_dir``; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "report.json", out_dir / "report.md"
    json_path.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    md_path.write_text(render_markdown(report))
    return json_path, md_path


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def render_markdown(report: Mapping[str, Any]) -> str:
    """A human-readable report: machine, settings, the results table, then each result's raw numbers."""
    machine, results = report["machine"], report["results"]
    lines = [
        "# mtcae benchmark report",
        "",
        f"Generated by `{report['command']}` on {report['started']} in {report['duration_s']:.0f} s "
        f"(mode: {'quick' if report['quick'] else 'full'}).",
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu']} ({machine['cpu_count']} logical CPUs, torch threads "
        f"{machine['torch_threads']}, capability {machine['cpu_capability']})",
        f"- Device: {machine['device']}" + (f" ({machine['gpu']})" if machine.get("gpu") else ""),
        f"- Load average (1, 5, 15 min) at start: {_fmt_nested(machine['load_average'])}; "
        f"at end: {_fmt_nested(report.get('load_average_end'))}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v),
        "- Dense matmul peak measured in this run (best / worst of the samples): " + ", ".join(
            f"{p['dtype']} {p['flop_per_s'] / 1e9:.1f} / {p['min_flop_per_s'] / 1e9:.1f} GFLOP/s "
            f"({p['samples']} samples)" for p in report.get("matmul_peak", [])),
        "",
        "## Results",
        "",
        "Ratio = this system over its baseline measured in the same run (higher is better).",
        "",
        "| benchmark | ratio | target | passed | note |",
        "|---|---:|---:|:---:|---|",
    ]
    for r in results:
        note = r.get("error") or r.get("summary", "")
        lines.append(f"| {r['name']} | {_fmt(r['ratio'])} | {_fmt(r['target'])} | {_fmt(r['passed'])} | {note} |")
    lines += ["", "## Details", ""]
    for r in results:
        lines.append(f"### {r['name']}")
        lines.append("")
        for key, value in r.items():
            if key in ("name", "ratio", "target", "passed", "summary"):
                continue
            lines.append(f"- {key}: {_fmt_nested(value)}")
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _fmt_nested(value: Any) -> str:
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_fmt_nested(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt_nested(v) for v in value) + "]"
    return _fmt(value)

