"""Stopping a study cleanly: SIGINT and SIGTERM end the trial loop at a safe point."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["Interrupted", "StopFlag", "graceful_stop", "stopped"]

_log = logging.getLogger(__name__)


class StopFlag:
    """A stop asked for from outside (a signal): the trial loop ends at its next safe point.

    ``in_loop`` is true while :func:`run_trials` runs and ``in_trial`` while the objective runs. A
    signal handler raises :class:`Interrupted` in a trial (which then fails and is queued again) or
    outside the loop (loading data, pretraining), and otherwise only sets ``signum``, so Optuna's
    storage bookkeeping between trials is never cut in half.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.in_loop = False
        self.in_trial = False

    @property
    def requested(self) -> bool:
        return self.signum is not None


class Interrupted(KeyboardInterrupt):
    """Raised in a running trial when a stop was asked for: the trial fails, is queued again."""


@contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """SIGINT and SIGTERM stop the trial loop cleanly instead of killing the process.

    The running trial is failed and queued again with its parameters (a stop between trials starts
    no new one); the loop returns and ``flag.signum`` says which signal stopped it. Outside the
    main thread signals cannot be caught, and the flag is never set.
    """
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if flag.signum is None:
            flag.signum = signum
            what = (
                "the running trial is failed and queued again" if flag.in_trial else "no new trial"
            )
            _log.warning("%s: stopping; %s", name, what)
        if flag.in_trial or not flag.in_loop:
            if flag.in_trial:
                # Python runs a handler between any two bytecodes, finalizers included, and an
                # exception raised in a finalizer is dropped: if the trial still runs in a moment,
                # the exception was lost, so deliver the signal again.
                again = threading.Timer(0.5, _deliver_again, args=(flag, signum))
                again.daemon = True
                again.start()
            raise Interrupted(name)

    def unraisable(info: Any) -> None:
        if not isinstance(info.exc_value, Interrupted):  # a dropped Interrupted is delivered again
            previous_hook(info)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        yield flag
    finally:
        sys.unraisablehook = previous_hook
        for s, h in previous.items():
            signal.signal(s, h)


def _deliver_again(flag: StopFlag, signum: int) -> None:
    if flag.in_trial:
        os.kill(os.getpid(), signum)


def stopped(signum: int | None) -> int:
    """Log that a signal stopped the study and return the exit code: 0 after SIGTERM (a clean stop
    a scheduler asked for), 130 after SIGINT."""
    _log.warning("stopped: finished trials are kept; run the same command to resume")
    return 0 if signum == signal.SIGTERM else 130
