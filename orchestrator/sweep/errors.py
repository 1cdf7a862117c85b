"""The exceptions a sweep raises (:mod:`orchestrator.sweep.run`, :mod:`orchestrator.sweep.searcher`)."""

from __future__ import annotations


class SweepError(RuntimeError):
    """A sweep cannot start or cannot finish; the message says what to do."""


class SweepInterrupted(SweepError):
    """The sweep was stopped (Ctrl+C) before a stage finished; re-running continues it."""
