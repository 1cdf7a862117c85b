"""Benchmarks: every stage's speed as a ratio against a baseline measured in the same run.

Entry points: ``python -m benchmarks [--quick] [--only NAME ...] [--out DIR]`` and ``mtcae bench``,
both calling :func:`run_all`. Each benchmark is a module ``benchmarks/<name>.py`` exposing
``run(quick: bool) -> list[dict]``; modules are imported lazily, one at a time, and a benchmark that
is absent or raises is recorded in the report instead of stopping the others.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import time
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks.common import (
    Result,
    add_run_best_fractions,
    default_device,
    error_result,
    machine_info,
    normalize_result,
    recorded_peaks,
    write_report,
)

log = logging.getLogger(__name__)

# Pipeline order: videos -> preprocess -> encoder (feature cache) -> decoder step -> trial -> sweep.
BENCHMARKS: tuple[str, ...] = ("preprocess", "encoder", "decoder_step", "trial", "sweep")
DEFAULT_OUT = Path(__file__).resolve().parent

NOTES = (
    "Every ratio compares this system with a baseline measured in the same process, alternating the "
    "two (A, B, A, B) and using each side's fastest run, so load from other processes on a shared "
    "machine disturbs both sides alike.",
    "Fractions of peak divide achieved FLOP/s (analytic FLOP counts in the benchmark code) by the "
    "dense matmul FLOP/s of the same dtype measured right before, between the rounds of, and right "
    "after that benchmark (the best of those; every sample is listed under the machine), and, as "
    "fraction_of_run_best_peak, by the best probe of the whole run: stricter, and steadier where "
    "the machine's speed drifts.",
    "CPU peak memory is the most malloc'd bytes in use during the step (glibc mallinfo2, sampled "
    "every 50 ms) minus the bytes in use when it started; CUDA peak memory is max_memory_allocated.",
)


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(f"benchmarks.{name}") is not None


def run_benchmark(name: str, quick: bool) -> tuple[list[Result], dict[str, Any]]:
    """Import ``benchmarks.<name>`` and run it; a failure becomes one error result.

    Returns:
        ``(results, status)`` where status holds ``status`` (``ok`` | ``error``), ``duration_s``
        and the module's ``NOTES`` (optional strings the report prints under its notes).
    """
    start = time.perf_counter()
    notes: list[str] = []
    try:
        module = importlib.import_module(f"benchmarks.{name}")
        notes = [str(n) for n in getattr(module, "NOTES", ())]
        results = [normalize_result(r, name) for r in module.run(quick)]
        if not results:
            raise ValueError(f"benchmark {name!r} returned no results")
        status = "ok"
    except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
        log.error("benchmark %s failed:\n%s", name, traceback.format_exc())
        results, status = [{**error_result(name, exc), "source": name}], "error"
    return results, {"status": status, "duration_s": time.perf_counter() - start, "notes": notes}


def run_all(quick: bool = False, only: Sequence[str] | None = None, out_dir: Path | None = DEFAULT_OUT,
            merge: bool = False) -> dict[str, Any]:
    """Run the benchmarks and write ``report.json`` + ``report.md``.

    Args:
        quick: Few-minute settings for a 2-core CPU (the full run is for a GPU machine).
        only: Benchmark names to run (default: every module of :data:`BENCHMARKS` that exists).
        out_dir: Where the report goes; None writes nothing.
        merge: Keep the results of ``out_dir/report.json`` that this run did not measure again
            (by result name); the report's notes say which run measured what.

    Returns:
        The report dict (also what ``report.json`` holds).

    Raises:
        ValueError: ``only`` names an unknown benchmark.
    """
    unknown = sorted(set(only or ()) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; expected names from {list(BENCHMARKS)}")
    names = [n for n in BENCHMARKS if not only or n in only]
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    report: dict[str, Any] = {
        "command": "python -m benchmarks" + (" --quick" if quick else "")
        + (" --only " + " ".join(only) if only else ""),
        "started": started.isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine_info(default_device()),
        "benchmarks": {},
        "results": [],
        "notes": list(NOTES),
    }
    for name in names:
        if not _has_module(name):
            report["benchmarks"][name] = {"status": "absent"}
            report["notes"].append(f"benchmarks/{name}.py is not present yet; nothing measured for it.")
            if only:
                report["results"].append(error_result(name, FileNotFoundError(f"benchmarks/{name}.py")))
            continue
        log.info("running benchmark %s (%s)", name, "quick" if quick else "full")
        results, status = run_benchmark(name, quick)
        report["results"] += results
        report["notes"] += [f"{name}: {note}" for note in status.pop("notes")]
        report["benchmarks"][name] = status
    report["duration_s"] = time.perf_counter() - t0
    report["matmul_peak"] = recorded_peaks()
    add_run_best_fractions(report["results"], report["matmul_peak"])
    report["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if merge and out_dir is not None and (Path(out_dir) / "report.json").is_file():
        report = merge_reports(json.loads((Path(out_dir) / "report.json").read_text()), report)
    if out_dir is not None:
        for path in write_report(report, Path(out_dir)):
            log.info("wrote %s", path)
    return report


def merge_reports(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with the results of ``old`` it did not measure again (by name), in ``old``'s order."""
    fresh = {r["name"]: r for r in new["results"]}
    results = [fresh.pop(r["name"], r) for r in old["results"]] + list(fresh.values())
    notes = list(dict.fromkeys([*old.get("notes", []), *new["notes"]]))
    notes.append(f"Merged report: {', '.join(r['name'] for r in new['results'])} measured by "
                 f"`{new['command']} --merge` on {new['started']}; the other results by "
                 f"`{old['command']}` on {old['started']}.")
    return {**new, "command": f"{old['command']}, then {new['command']} --merge", "results": results,
            "measured_now": [r["name"] for r in new["results"]],
            "benchmarks": {**old.get("benchmarks", {}), **new["benchmarks"]}, "notes": notes,
            "matmul_peak": old.get("matmul_peak", []) + new.get("matmul_peak", [])}


def any_errors(report: dict[str, Any]) -> bool:
    """Whether a benchmark of this run errored (results a merged report kept do not count)."""
    now = report.get("measured_now")
    return any(r.get("error") for r in report["results"] if now is None or r["name"] in now)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """One line per result, for the console."""
    lines = []
    for r in report["results"]:
        if r.get("error"):
            lines.append(f"ERROR  {r['name']}: {r['error']}")
        else:
            verdict = "pass" if r["passed"] else "FAIL"
            lines.append(f"{verdict:5s}  {r['name']}: ratio {r['ratio']:.3g} (target {r['target']:.3g})")
    return lines
