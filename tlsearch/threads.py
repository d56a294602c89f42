"""This process's torch CPU threads: the one module that sets them.

The count comes from the thread policy (:func:`tlsearch.device.choose_threads`, a pure function
of the cores, the study's workers on this host, the load beside them and the user's fixed count):
:class:`ThreadPolicy` measures and applies it before each trial, and :func:`rebalance`, which the
schedulers call between epochs (:mod:`tlsearch.training.schedule`, pretraining), re-applies it at
most every second, so another job starting mid-trial costs at most that long at the wrong count.
:func:`thread_scope` makes a policy the process's. Folds trained side by side on threads
(:mod:`tlsearch.training.lanes`) each take a share of the count (:func:`as_lane`) and the thread
that started them sets its own back (:func:`set_threads`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from tlsearch import device
from tlsearch.device import CpuMeter, choose_threads, omp_env

__all__ = [
    "ThreadPolicy",
    "as_lane",
    "current_policy",
    "rebalance",
    "set_threads",
    "thread_scope",
]

_log = logging.getLogger(__name__)


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch CPU threads in this process (0 or None: leave them); return the count.

    Each process sets its count deliberately: small ops on many cores waste them, and workers side
    by side must not oversubscribe the host.
    """
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


class ThreadPolicy:
    """This process's torch threads, set by :func:`~tlsearch.device.choose_threads` and
    re-checked as it runs.

    :meth:`apply` measures the load and sets the count (before each trial, and when pretraining
    or ``final`` starts); :func:`rebalance`, which the schedulers call between epochs, does the
    same at most every :attr:`interval` seconds. Each change is logged with its reason.
    """

    def __init__(
        self,
        fixed: int | None = None,
        workers: Callable[[], int] | None = None,
        who: str = "",
        interval: float = 1.0,
    ) -> None:
        self.fixed = fixed or None
        self.workers = workers or (lambda: 1)
        self.who = who or f"{socket.gethostname()}:{os.getpid()}"
        self.interval = interval
        self.meter = CpuMeter()
        self._logged: tuple[int, int] | None = None

    def apply(self) -> int:
        """Set the thread count the policy chooses now; return it. Logged when the count or the
        number of the study's workers on this host changes."""
        workers = self.workers()
        env = omp_env()
        busy = None if self.fixed or env else self.meter.busy()
        threads, reason = choose_threads(
            device.available_cores(), workers=workers, busy=busy, fixed=self.fixed, env=env
        )
        if threads != torch.get_num_threads():
            set_threads(threads)
        if (threads, workers) != self._logged:
            _log.info("%s: %d thread(s) (%s)", self.who, threads, reason)
            self._logged = (threads, workers)
        return threads


_policy: ThreadPolicy | None = None


@contextmanager
def thread_scope(policy: ThreadPolicy) -> Iterator[ThreadPolicy]:
    """``policy`` is the one :func:`rebalance` applies in this process while the block runs."""
    global _policy
    previous, _policy = _policy, policy
    try:
        yield policy
    finally:
        _policy = previous


def current_policy() -> ThreadPolicy | None:
    return _policy


def rebalance() -> None:
    """Re-apply this process's thread policy if its interval has passed (no policy, or called in a
    lane: nothing).

    Cheap enough for every epoch: a clock read, and a ``/proc/stat`` read once per interval.
    """
    if getattr(_lane, "threads", None) is not None:
        return  # the thread that started the lanes re-checks the policy, between their epochs
    if _policy is not None and _policy.meter.seconds() >= _policy.interval:
        _policy.apply()


# Set in a lane: a thread that trains one of several runs beside the others
# (tlsearch.training.lanes), with its own share of the process's threads.
_lane = threading.local()


def as_lane(threads: int) -> None:
    """Make the calling thread a lane with ``threads`` torch threads (set before each epoch it
    trains: part of the count is per thread, part process-wide). :func:`rebalance` does nothing
    in it: the thread that started the lanes owns the policy, divides the cores it sets between
    them and sets its own count back after each epoch."""
    torch.set_num_threads(threads)
    _lane.threads = threads
