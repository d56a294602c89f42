"""Several trainers (a trial's folds) advanced one epoch at a time, side by side on the process's
cores: the mechanics of :mod:`tlsearch.training.schedule`'s side-by-side folds.

A few-label fold is a small model on a small batch: its operations are too short for torch's
threads to share (a second thread buys little, :mod:`tlsearch.device`), while two folds on a
thread each train in ~0.6 of the time of one after the other (``benchmarks/trial_speed.py``).
So with ``c`` CPU threads allowed (the thread policy's count, :mod:`tlsearch.threads`) and ``n``
trainers, ``min(c, n)`` lanes each train a share of them with ``c // lanes`` threads of their
own; every fold still trains exactly as it would alone, on its own model, data and minibatch
generator.

Lanes run only what is safe to run on threads: CPU models (a GPU keeps its folds in turn, on one
stream) whose first epoch drew nothing from torch's global random stream
(:attr:`Trainer.draws <tlsearch.training.trainer.Trainer.draws>`; a model with dropout draws its
masks there, and trainers that take turns keep that stream apart, which threads could not). Such
trainers, trainers whose first epoch took under :data:`MIN_SECONDS`, and a process with one thread
advance in turn.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType

import torch

from tlsearch.threads import as_lane, set_threads
from tlsearch.training.trainer import Trainer

__all__ = ["Lanes"]

# A fold's first epoch (its setup included) shorter than this trains in turn: handing its epochs
# to threads costs more than it saves (an 8×8 MLP on 16 images, ~1 ms: 0.9× in lanes; 2-10 ms:
# 1.1-2.1×).
MIN_SECONDS = 0.002


class Lanes:
    """Advances ``trainers`` a few epochs each per :meth:`advance`; a context manager (its threads
    end with the block)."""

    def __init__(
        self,
        trainers: Sequence[Trainer],
        cores: int | None = None,
        min_seconds: float = MIN_SECONDS,
    ) -> None:
        self.runs = list(trainers)
        # The threads to divide (None: this thread's torch count, which the policy sets).
        self.cores = cores
        self.min_seconds = min_seconds
        self._small = False  # the first epochs were too short for lanes to pay
        self._pool: ThreadPoolExecutor | None = None
        self._width = 0
        self._cpu = all(r.device.type == "cpu" for r in self.runs)

    def __enter__(self) -> Lanes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._close()

    def _close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def lanes(self) -> int:
        """How many trainers train at once now (1: in turn)."""
        if not self._cpu or self._small or any(r.draws is not False for r in self.runs):
            return 1
        return max(1, min(self.cores or torch.get_num_threads(), len(self.runs)))

    def advance(self, epochs: int = 1) -> bool:
        """Train every trainer ``epochs`` more epochs; False when any had none left or diverged (a
        divergence stops the others, which may then have trained fewer)."""
        if epochs and any(r.draws is None for r in self.runs):
            # A first epoch in turn: it tells whether a trainer draws from the global stream, and
            # whether an epoch is long enough for lanes to pay.
            t0 = time.perf_counter()
            if not all([run.epoch() for run in self.runs]):
                return False
            self._small = (time.perf_counter() - t0) / len(self.runs) < self.min_seconds
            epochs -= 1
            if not epochs:
                return True
        lanes = self.lanes()
        if lanes == 1:
            return all([all(run.epoch() for _ in range(epochs)) for run in self.runs])
        before = torch.get_num_threads()
        cores = self.cores or before
        if self._width != lanes:
            self._close()
            self._pool = ThreadPoolExecutor(lanes, thread_name_prefix="tlsearch-lane")
            self._width = lanes
        assert self._pool is not None
        work = _Work(self.runs, epochs)
        try:
            for future in [self._pool.submit(work.lane, cores // lanes) for _ in range(lanes)]:
                future.result()
        except BaseException:
            work.stop = True  # an error in a lane, or an interrupt here: the lanes stop too
            raise
        finally:
            set_threads(before)  # part of a lane's count is process-wide
        return work.ok


class _Work:
    """The epochs left to train, trainer by trainer: each lane takes the next trainer nobody
    trains, one epoch at a time, so lanes stay busy until the last epoch (5 folds on 2 lanes: 13
    rounds, not 15)."""

    def __init__(self, runs: list[Trainer], epochs: int) -> None:
        self.left = dict.fromkeys(runs, epochs)
        self.queue = deque(runs)
        self.lock = threading.Lock()
        self.ok = True  # every epoch asked for was trained
        self.stop = False  # a fold diverged or raised: the other lanes stop after their epoch

    def lane(self, threads: int) -> None:
        as_lane(threads)  # at least 1: never more lanes than cores
        while True:
            with self.lock:
                if self.stop or not self.queue:
                    return
                run = self.queue.popleft()
            try:
                ok = run.epoch()
            except BaseException:
                self.stop = True  # raised to advance()'s caller
                raise
            with self.lock:
                self.left[run] -= 1
                self.ok = self.ok and ok
                self.stop = self.stop or any(e is not None for e in run.diverged)
                if ok and self.left[run]:
                    self.queue.append(run)
