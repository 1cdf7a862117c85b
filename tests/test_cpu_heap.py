"""orchestrator/cpu_heap.py: retained heap and pre-faulting, measured in page faults."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator import cpu_heap

pytestmark = pytest.mark.skipif(cpu_heap.mmapped_bytes() is None, reason="needs glibc (mallopt, mallinfo2)")

MIB = 2**20


_HOLE_PROBE = """
import resource, sys, torch
from orchestrator import cpu_heap
MIB = 2**20
with cpu_heap.retained_heap():
    hole = torch.ones(64 * MIB, dtype=torch.uint8)
    pin = torch.ones(MIB, dtype=torch.uint8)  # keeps the hole below the heap's top
    del hole
    cpu_heap.release_heap()  # the hole's pages go back to the OS, its addresses stay
    if sys.argv[1] == "prefault":
        assert cpu_heap.prefault_heap(64 * MIB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    reused = torch.ones(60 * MIB, dtype=torch.uint8)  # a little smaller than the hole: it lands there
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.parametrize("prefault", [True, False])
def test_prefault_makes_released_free_memory_resident_again(prefault: bool) -> None:
    # A fresh process: where a block lands depends on every free chunk earlier tests left behind.
    run = subprocess.run([sys.executable, "-c", _HOLE_PROBE, "prefault" if prefault else "no"],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    reused = int(run.stdout.strip().splitlines()[-1])
    pages = 60 * MIB // 4096
    if prefault:
        assert reused < pages // 10
    else:
        assert reused > pages // 2


def test_retained_heap_serves_large_blocks_from_the_heap_and_restores_the_default() -> None:
    def mmapped_growth() -> int:  # a block larger than all the free memory malloc holds
        size = cpu_heap.free_heap_bytes() + 48 * MIB
        before = cpu_heap.mmapped_bytes()
        block = torch.ones(size, dtype=torch.uint8)
        grown = cpu_heap.mmapped_bytes() - before
        del block
        return grown

    with cpu_heap.retained_heap() as enabled:
        assert enabled
        assert mmapped_growth() == 0  # the heap grows instead, and keeps the memory
    assert mmapped_growth() >= 48 * MIB  # glibc's default again: a block of its own
