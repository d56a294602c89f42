"""The CPU thread policy (tlsearch/device.py): its choice for given cores, load, affinity, quota and
explicit settings as a pure function; the cgroup quota files; the load meter. Applying it:
tests/test_threads.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tlsearch import device
from tlsearch.device import CpuMeter, available_cores, choose_threads, cpu_quota


@pytest.mark.parametrize(
    ("cores", "workers", "busy", "threads"),
    [
        (2, 1, 0.0, 2),  # alone on an idle machine: every core
        (2, 1, 0.03, 2),  # an idle machine's background noise is no busy core
        (2, 1, 1.0, 1),  # beside one busy single-threaded job: the core it leaves
        (2, 1, 0.4, 1),  # a job using part of a core still takes it (a thread there stalls)
        (2, 1, 2.0, 1),  # beside a busy 2-thread job: one thread, never none
        (2, 1, 3.5, 1),
        (2, 2, 0.0, 1),  # run --workers 2 on 2 cores: one each
        (2, 2, 1.0, 1),  # ... each sees the other as busy: still one
        (16, 1, 1.0, 15),
        (16, 4, 3.0, 4),  # four workers of 4 threads: the other three keep 12 cores busy
        (16, 4, 12.0, 4),
        (16, 4, 13.2, 2),
        (1, 3, 0.0, 1),
        (8, 1, None, 8),  # load not measurable (not Linux): the share
    ],
)
def test_the_policy_takes_the_cores_left_free(
    cores: int, workers: int, busy: float | None, threads: int
) -> None:
    chosen, reason = choose_threads(cores, workers=workers, busy=busy)
    assert chosen == threads
    assert reason.startswith(f"{cores} cores, {workers} worker(s) of this study on this host, ")
    assert reason.endswith(
        "other load not measurable here" if busy is None else f"{busy:.1f} busy with other work"
    )


def test_an_explicit_count_always_wins() -> None:
    for busy in (0.0, 1.0, 7.0):
        assert choose_threads(2, busy=busy, fixed=3, env="1") == (
            3,
            "set by --threads or finetune.threads",
        )
        assert choose_threads(2, workers=4, busy=busy, env="4") == (4, "OMP_NUM_THREADS=4")
    # An OMP_NUM_THREADS that is no count (libgomp ignores it too) leaves the policy to decide.
    assert choose_threads(2, busy=1.0, env="two")[0] == 1
    assert choose_threads(2, busy=0.0, env="0")[0] == 2


def _cgroup(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_a_containers_cpu_quota_is_read_from_its_cgroup(tmp_path: Path) -> None:
    assert cpu_quota(_cgroup(tmp_path / "v2", {"cpu.max": "150000 100000\n"})) == 1.5
    assert cpu_quota(_cgroup(tmp_path / "v2max", {"cpu.max": "max 100000\n"})) is None
    v1 = {"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert cpu_quota(_cgroup(tmp_path / "v1", v1)) == 2.0
    unlimited = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert cpu_quota(_cgroup(tmp_path / "v1max", unlimited)) is None
    assert cpu_quota(tmp_path / "none") is None


def test_usable_cores_are_the_affinity_capped_by_the_quota(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(device, "cpu_quota", lambda: None)
    assert available_cores() == 4
    monkeypatch.setattr(device, "cpu_quota", lambda: 2.5)  # docker run --cpus 2.5
    assert available_cores() == 2
    monkeypatch.setattr(device, "cpu_quota", lambda: 0.5)
    assert available_cores() == 1
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: {3}, raising=False)
    monkeypatch.setattr(device, "cpu_quota", lambda: 8.0)  # taskset -c 3
    assert available_cores() == 1


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="the load meter reads /proc/stat")
def test_the_meter_sees_another_process_and_not_this_one() -> None:
    meter = CpuMeter()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # this process's own work is not "busy with other work"
        pass
    assert meter.busy() < 0.5
    spin = "import time\nend = time.monotonic() + 0.6\nwhile time.monotonic() < end: pass"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        time.sleep(0.5)
        busy = meter.busy()
    finally:
        child.wait()
    assert busy is not None and busy > 0.5
