"""What this process holds on its host, by lock files in the shared checkpoint cache: the GPU a
worker takes (:func:`claim_gpu`) and its slot among the study's workers here (:class:`HostWorkers`,
which the thread policy counts). The OS releases a process's locks when it exits or is killed.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

import torch
from filelock import FileLock, Timeout

__all__ = ["HostWorkers", "claim_gpu"]

# Lock files this process holds for its lifetime; the OS releases them when it exits or is killed.
_held: list[FileLock] = []


def claim_gpu(lock_dir: Path) -> int:
    """A GPU for this worker when it may use any of several: the one fewest other workers hold.

    Workers started side by side (``docker compose up --scale worker=4``, which gives every replica
    every GPU; or several ``tlsearch worker`` on one host) each take a lock file per GPU in the
    shared checkpoint cache: first one worker per GPU, then a second per GPU, and so on.
    """
    lock_dir.mkdir(parents=True, exist_ok=True)
    count = torch.cuda.device_count()
    slots = [
        (gpu, lock_dir / f"gpu{gpu}.worker{layer}.lock")
        for layer in range(1024)
        for gpu in range(count)
    ]
    taken = _take_first_free([path for _, path in slots])
    if taken is None:
        raise AssertionError(f"no GPU slot free among {count} GPUs x 1024 workers in {lock_dir}")
    return next(gpu for gpu, path in slots if path == taken)


def _take_first_free(paths: list[Path]) -> Path | None:
    """Take the first of ``paths`` whose lock no process holds, for this process's lifetime."""
    for path in paths:
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        _held.append(lock)
        return path
    return None


class HostWorkers:
    """The workers of one study on this host, counted by a lock file each holds for its lifetime.

    The OS releases a process's locks when it exits or is killed, so the count never includes a
    dead worker. A lock taken momentarily by :meth:`count` to probe a slot makes a worker that
    starts at that instant take the next slot instead; nothing else changes.
    """

    def __init__(self, locks: Path, study_name: str) -> None:
        locks.mkdir(parents=True, exist_ok=True)
        tag = hashlib.sha256(f"{socket.gethostname()}\0{study_name}".encode()).hexdigest()[:16]
        self._paths = [locks / f"workers-{tag}.{slot}.lock" for slot in range(1024)]
        own = _take_first_free(self._paths)
        if own is None:
            raise AssertionError(f"no worker slot free among 1024 in {locks}")
        self.own = own

    def count(self) -> int:
        """Workers of the study alive on this host now, this one included."""
        alive = 1
        for path in self._paths:
            if path == self.own or not path.exists():
                continue
            probe = FileLock(str(path))
            try:
                probe.acquire(timeout=0)
            except Timeout:
                alive += 1
            else:
                probe.release()
        return alive
