"""Facts about this process's devices and cores, and the thread policy as a pure function.

Device choice (:func:`resolve_device`: CUDA when there is one, or the one asked for, else the
CPU); the cores this process may use (:func:`available_cores`: affinity and a container's CPU
quota); how busy other processes keep them (:class:`CpuMeter`); and how many torch threads a
process should take given those facts (:func:`choose_threads`).

**Why a policy.** torch's CPU operations split over OpenMP threads that wait for each other at
the end of each operation. On cores that nothing else uses, a second thread buys a few-label
trial little: 0-17 % of the default study's time by machine, and nothing on the 2-core machine
where folds side by side were measured (35.3 against 35.9 s). On a core another process keeps
busy, the thread that waits for a descheduled one waits for the scheduler, and a study ran
11-32x slower beside any single-threaded job. So each process takes its share of the cores
among its study's workers on this host, less the cores other processes keep busy;
``--threads``, ``finetune.threads`` and ``OMP_NUM_THREADS`` fix the count instead. GPUs are
unaffected. :mod:`tlsearch.threads` applies the policy: it alone sets the process's thread count.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch

from tlsearch.errors import ConfigError

__all__ = [
    "BUSY_TOLERANCE",
    "CpuMeter",
    "available_cores",
    "choose_threads",
    "cpu_quota",
    "default_threads",
    "omp_env",
    "resolve_device",
]


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; anything else must exist here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"finetune.device: '{spec}' is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"finetune.device: '{spec}' asked for, but no CUDA device is visible"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"finetune.device: '{spec}' asked for, but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
    return device


def available_cores() -> int:
    """CPU cores this process may run on: its CPU affinity, capped by a container's CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    return max(1, min(cores, int(quota))) if quota is not None else cores


def cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (``docker run --cpus 1.5``: 1.5), or None
    when there is none: cgroup v2's ``cpu.max``, else v1's ``cpu.cfs_quota_us`` over the period."""
    for quota_file, period_file in (
        (root / "cpu.max", None),
        (root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"),
        (root / "cpu,cpuacct" / "cpu.cfs_quota_us", root / "cpu,cpuacct" / "cpu.cfs_period_us"),
    ):
        try:
            fields = quota_file.read_text().split()
            if period_file is not None:
                fields.append(period_file.read_text().strip())
            quota, period = fields[0], float(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota in ("max", "-1") or period <= 0:
            return None
        try:
            return float(quota) / period
        except ValueError:
            return None
    return None


def default_threads(n_workers: int) -> int:
    """CPU threads per worker so that the workers together use each core once."""
    return max(1, available_cores() // n_workers)


# A core counts as busy with other work when the other processes on this process's cores use
# more than this share of one on average. An idle machine measures 0.01-0.03 here. Generous on
# purpose: a thread too few costs at most its share of the work (1 of 2 threads: 0-17 % on the
# default study), a thread too many on a core another process holds costs 10-30x, because torch's
# OpenMP threads wait for each other at the end of every operation.
BUSY_TOLERANCE = 0.1


def choose_threads(
    cores: int,
    *,
    workers: int = 1,
    busy: float | None = 0.0,
    fixed: int | None = None,
    env: str | None = None,
) -> tuple[int, str]:
    """The torch threads of one process, and why: the thread policy as a pure function.

    1. ``fixed`` (``--threads``, ``finetune.threads``) always wins;
    2. else ``env``, a valid ``OMP_NUM_THREADS``, is what the user asked the process for;
    3. else the process's share of the ``cores`` it may use (affinity and CPU quota:
       :func:`available_cores`) among the ``workers`` of its study on this host, less the cores
       other processes keep ``busy`` (in cores, measured by :class:`CpuMeter`; a fraction above
       :data:`BUSY_TOLERANCE` counts as a whole core; None: not measurable here), at least 1.

    Two threads on a core another process holds are far slower than one: every torch operation
    ends with its threads waiting for each other, and the one waiting for a descheduled thread
    waits for the scheduler (11-32x slower in the busy-machine issue).
    """
    if fixed:
        return fixed, "set by --threads or finetune.threads"
    if env is not None:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value > 0:
            return value, f"OMP_NUM_THREADS={value}"
    share = max(1, cores // max(1, workers))
    base = f"{cores} cores, {workers} worker(s) of this study on this host"
    if busy is None:
        return share, f"{base}, other load not measurable here"
    taken = max(0, math.ceil(busy - BUSY_TOLERANCE))
    threads = max(1, min(share, cores - taken))
    return threads, f"{base}, {busy:.1f} busy with other work"


def _busy_ticks(cpus: set[int]) -> int | None:
    """Ticks the CPUs in ``cpus`` spent on any work since boot, from ``/proc/stat`` (Linux)."""
    try:
        with open("/proc/stat") as f:
            lines = f.readlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait.
        fields = [int(v) for v in rest.split()]
        total += sum(fields[:3]) + sum(fields[5:8])
    return total


class CpuMeter:
    """How many of this process's cores other processes kept busy since the last reading.

    ``/proc/stat`` counts the work of every process on each CPU; this process's own CPU time
    (all its threads, spinning ones too) is subtracted. Readings are a few tens of microseconds.
    """

    # Seconds a reading spans at least: /proc/stat counts in ticks of 10 ms.
    MIN_SECONDS = 0.2

    def __init__(self) -> None:
        try:
            self._cpus: set[int] = set(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            self._cpus = set()
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last = self._now()
        self._value: float | None = None

    def _now(self) -> tuple[float, int | None, float]:
        return time.monotonic(), _busy_ticks(self._cpus), time.process_time()

    def seconds(self) -> float:
        """Seconds since the last reading."""
        return time.monotonic() - self._last[0]

    def busy(self) -> float | None:
        """Cores used by other processes, on average since the last reading; None off Linux.

        Asked again within :attr:`MIN_SECONDS`, it answers the last reading; the first reading
        waits until that much time has passed since the meter started."""
        if self._last[1] is None:
            return None
        if self.seconds() < self.MIN_SECONDS:
            if self._value is not None:
                return self._value
            time.sleep(self.MIN_SECONDS - self.seconds())
        then, now = self._last, self._now()
        self._last = now
        wall = now[0] - then[0]
        if now[1] is None or then[1] is None or wall <= 0:
            return self._value
        everything = (now[1] - then[1]) / self._tick
        self._value = max(0.0, (everything - (now[2] - then[2])) / wall)
        return self._value


def omp_env() -> str | None:
    """``OMP_NUM_THREADS`` as set for this process (None: unset or empty)."""
    return os.environ.get("OMP_NUM_THREADS") or None
