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


def dying_train_trial(config: dict) -> None:
    """The real trainable, whose worker process SIGKILLs itself once, right after reporting epoch 1
    of its first attempt, when ``<cache_dir>/die_once`` names this trial's fold (as Ray's OOM killer
    would end it). Every attempt is appended to ``<cache_dir>/attempts.txt``."""
    import os
    import signal
    from pathlib import Path

    from ray import tune

    from orchestrator.trial.entrypoints import train_trial

    rule = Path(config["cache_dir"]) / "die_once"
    with open(rule.with_name("attempts.txt"), "a") as handle:
        handle.write(config["trial_key"] + "\n")
    if rule.is_file() and rule.read_text().strip() == str(config["fold"]):
        rule.unlink()  # the retry runs normally
        rule.with_name("died").write_text(config["trial_key"])
        report = tune.report

        def report_then_die(metrics: dict, *args: object, **kwargs: object) -> None:
            report(metrics, *args, **kwargs)
            if metrics.get("epoch") == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        tune.report = report_then_die  # the trainable looks it up at call time
    train_trial(config)
