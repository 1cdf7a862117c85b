"""A sweep driver as its own process, for tests that kill it: ``python -m sweep_driver SPACE OUT``.

Runs :func:`orchestrator.sweep.run.run_sweep` on a local Ray instance with the fake trainable of
``test_sweep`` (importable by the Ray workers through ``PYTHONPATH``); exit 0 when complete.
"""

from __future__ import annotations

import logging
import sys


def main() -> int:
    from orchestrator.sweep.run import run_sweep

    logging.basicConfig(level=logging.INFO)
    space, out = sys.argv[1:3]
    result = run_sweep(space, out=out, trainable="test_sweep:fake_trial", address="local", num_cpus=2,
                       progress_interval_s=5.0)
    return 0 if result.complete else 1


if __name__ == "__main__":
    sys.exit(main())
