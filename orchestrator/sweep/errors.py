"""The exceptions a sweep raises (:mod:`orchestrator.sweep.run`, :mod:`orchestrator.sweep.searcher`)."""

from __future__ import annotations


class SweepError(RuntimeError):
    """A sweep cannot start or cannot finish; the message says what to do."""


class SweepInterrupted(SweepError):
    """The sweep was stopped (Ctrl+C, SIGTERM, ``ray job stop``) before a stage finished; re-running
    continues it.

    Attributes:
        signum: The signal that stopped it (``SIGINT`` = 2 unless told); the CLI exits ``128 + signum``.
    """

    def __init__(self, message: str, signum: int = 2) -> None:
        super().__init__(message)
        self.signum = signum
