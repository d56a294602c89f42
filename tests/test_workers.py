"""Workers sharing one study: exact budget, dead and stopped workers, dropped connections.

Every test runs real processes (``tlsearch run --workers``, ``tlsearch worker``) on real SQLite
files and real PostgreSQL databases, with a study small enough for a trial to take a fraction of a
second.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import optuna
import pytest
import torch
from conftest import run_cli, start_cli
from optuna.trial import TrialState
from pg import (
    FAST_BEATS,
    create,
    finished,
    running_trial_of,
    start_worker,
    terminate_backends,
    tiny_config,
    wait_for_server,
    wait_joined,
    wait_until,
)

from tlsearch import hosts
from tlsearch._io import sha256_file
from tlsearch.device import default_threads
from tlsearch.errors import ConfigError
from tlsearch.evidence import decode_oof
from tlsearch.storage import ATTR_CHECKPOINT, Heartbeat, create_storage
from tlsearch.study import run_trials
from tlsearch.workers import claim_gpu, plan_devices

# Trials of a few seconds (3-6 s on a quiet core), so that a signal sent when one is seen running
# lands inside it. Sized by measurement: at 150 epochs, once fine-tuning got faster, a tiny trial
# took 0.3 s and could finish between being seen and the signal.
SLOW = {"finetune": {"epochs": 2000, "device": "cpu", "threads": 1}}
# Trials of about half a second, so that a database fault after the first few lands while both
# workers still have trials to run (at 5 epochs one worker could finish the study while the
# other was still starting, and the fault then hit that one's start).
MEDIUM = {"finetune": {"epochs": 300, "device": "cpu", "threads": 1}}


def _check_exact(url: str, n: int, output: str) -> list[optuna.trial.FrozenTrial]:
    trials = optuna.load_study(study_name="tiny", storage=url).get_trials(deepcopy=False)
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "duplicate trial numbers"
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == n, {s.name: sum(t.state == s for t in trials) for s in TrialState}
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert "database is locked" not in output
    assert "Traceback" not in output
    return done


def _retry_of(trials: list[optuna.trial.FrozenTrial], number: int) -> optuna.trial.FrozenTrial:
    """The trial that retries trial ``number`` (itself perhaps a retry of an earlier one)."""
    (retry,) = [t for t in trials if t.system_attrs.get("retry_history", [])[-1:] == [number]]
    return retry


def test_four_workers_on_sqlite_run_exactly_the_budget(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = tiny_config(tmp_path, url, n_trials=100)
    result = run_cli("run", str(config), "--workers", "4", cwd=tmp_path, timeout=400)
    assert result.returncode == 0, result.stderr
    done = _check_exact(url, 100, result.stdout + result.stderr)
    assert all(t.state == TrialState.COMPLETE for t in done)
    workers = {t.user_attrs["worker"] for t in done}
    assert len(workers) == 4, "every worker process ran trials"
    assert {t.user_attrs["device"] for t in done} == {"cpu"}
    # Each spawned worker (tlsearch.workers.worker_main) marks its lines in the shared terminal,
    # and writes each line whole: two workers' lines never run into one.
    lines = result.stderr.splitlines()
    assert [ln for ln in lines if ln.count("[w") > 1] == []
    for i in range(4):
        assert any(
            ln.startswith(f"[w{i}] worker ") and "joined study 'tiny'" in ln for ln in lines
        )
        assert any(ln.startswith(f"[w{i}] worker done: ") for ln in lines), result.stderr
    progress = [ln for ln in lines if re.match(r"\[w\d\] \[\d+/100\] trial \d+", ln)]
    assert len(progress) == 100, result.stderr


def test_four_workers_on_postgresql_run_exactly_the_budget(
    tmp_path: Path,
    pg_url: str,
) -> None:
    """The multi-host shape: `create` once, then workers that know only the URL."""
    config = tiny_config(tmp_path, pg_url, n_trials=100)
    created = run_cli("create", str(config), cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    procs = [start_worker(pg_url, "tiny", tmp_path, log=f"w{i}.log") for i in range(4)]
    codes = [p.wait(400) for p in procs]
    output = "".join((tmp_path / f"w{i}.log").read_text() for i in range(4))
    assert codes == [0, 0, 0, 0], output
    _check_exact(pg_url, 100, output)


def test_killed_worker_trial_fails_and_is_retried(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = tiny_config(tmp_path, url, n_trials=2, **SLOW)
    create(config, **FAST_BEATS)
    victim = start_worker(url, "tiny", tmp_path, log="victim.log")
    trial = wait_until(lambda: running_trial_of(url, "tiny", victim.pid), 120, "victim trial")
    victim.kill()  # SIGKILL: no handler, no goodbye; the trial stays RUNNING
    assert victim.wait(10) == -signal.SIGKILL
    survivor = start_worker(url, "tiny", tmp_path, log="survivor.log")
    assert survivor.wait(300) == 0, (tmp_path / "survivor.log").read_text()

    study = optuna.load_study(study_name="tiny", storage=url)
    assert study.trials[trial.number].state == TrialState.FAIL
    retry = _retry_of(study.trials, trial.number)
    assert retry.state == TrialState.COMPLETE and retry.params == trial.params
    assert len(finished(url, "tiny")) == 2
    # Every complete trial keeps its per-image evidence in the shared storage, the retried one
    # too (the killed one has none: it never finished).
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert decode_oof(t.user_attrs) is not None, t.number
        assert decode_oof(t.user_attrs).p_true.shape == (1, 100)
    assert decode_oof(study.trials[trial.number].user_attrs) is None


def test_sigterm_and_sigint_fail_and_requeue_the_running_trial(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = tiny_config(tmp_path, url, n_trials=20, **SLOW)
    create(config)
    workers = {
        sig: start_worker(url, "tiny", tmp_path, log=f"{sig.name}.log")
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    running = {}
    for sig, p in workers.items():
        running[sig] = wait_until(lambda p=p: running_trial_of(url, "tiny", p.pid), 120, "trial")
        p.send_signal(sig)
    # SIGTERM is a scheduler's "stop now": a clean stop, exit 0. SIGINT is Ctrl-C: exit 130.
    codes = {sig: p.wait(60) for sig, p in workers.items()}
    logs = {sig: (tmp_path / f"{sig.name}.log").read_text() for sig in workers}
    assert codes == {signal.SIGTERM: 0, signal.SIGINT: 130}, logs

    trials = optuna.load_study(study_name="tiny", storage=url).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for sig, trial in running.items():
        assert trials[trial.number].state == TrialState.FAIL
        retry = _retry_of(trials, trial.number)
        # The other worker may have dequeued this retry before its own signal came, then failed
        # and queued it again: follow the chain to its end.
        while retry.state == TrialState.FAIL:
            retry = _retry_of(trials, retry.number)
        assert retry.state == TrialState.WAITING and retry.params == trial.params
        assert f"trial {trial.number} failed without finishing; queued again" in logs[sig]
        assert "Traceback" not in logs[sig]


def test_workers_survive_dropped_connections(tmp_path: Path, pg_url: str) -> None:
    config = tiny_config(tmp_path, pg_url, n_trials=12, **MEDIUM)
    create(config, **FAST_BEATS)
    procs = [start_worker(pg_url, "tiny", tmp_path, log=f"w{i}.log") for i in range(2)]
    wait_joined(tmp_path, ["w0.log", "w1.log"])
    wait_until(lambda: len(finished(pg_url, "tiny")) >= 3, 180, "first trials")
    before = {t.number: t.value for t in finished(pg_url, "tiny")}
    dropped = 0
    for _ in range(3):
        dropped += terminate_backends(pg_url)
        time.sleep(0.7)
    assert dropped, "the workers had connections to drop"
    codes = [p.wait(300) for p in procs]
    output = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], output
    after = {t.number: t.value for t in finished(pg_url, "tiny")}
    assert before.items() <= after.items(), "a finished trial was lost or changed"
    assert len(after) == 12
    assert "Traceback" not in output


@pytest.mark.slow
def test_workers_survive_a_server_restart(tmp_path: Path, pg_url: str) -> None:
    config = tiny_config(tmp_path, pg_url, n_trials=24, **MEDIUM)
    create(config, **FAST_BEATS)
    procs = [start_worker(pg_url, "tiny", tmp_path, log=f"w{i}.log") for i in range(2)]
    wait_joined(tmp_path, ["w0.log", "w1.log"])
    wait_until(lambda: len(finished(pg_url, "tiny")) >= 4, 180, "first trials")
    before = {t.number: t.value for t in finished(pg_url, "tiny")}
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "restart"],
        check=True,
        timeout=120,
    )
    wait_for_server()
    codes = [p.wait(300) for p in procs]
    output = "".join((tmp_path / f"w{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], output
    after = {t.number: t.value for t in finished(pg_url, "tiny")}
    assert before.items() <= after.items(), "a finished trial was lost or changed"
    assert len(after) == 24
    assert "Traceback" not in output


def test_worker_on_another_host_takes_the_studys_copy(tmp_path: Path) -> None:
    """Another host: the recorded checkpoint path is not there, so the worker takes the copy kept
    in the study's database, never pretraining (its bytes could differ: CPU kind, threads)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = tiny_config(tmp_path, url, n_trials=2)
    create(config)
    recorded = optuna.load_study(study_name="tiny", storage=url).user_attrs[ATTR_CHECKPOINT]
    shutil.rmtree(tmp_path / "cache")  # the creating host's cache is not on this one
    elsewhere = tmp_path / "other-host-cache"
    worker = ("worker", "--storage", url, "--study-name", "tiny", "--cache-dir", str(elsewhere))
    result = run_cli(*worker, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "using the study's copy in its database" in result.stderr
    assert "pretraining" not in result.stderr
    (copy,) = elsewhere.glob("source-*.pt")
    assert copy.name == Path(recorded["path"]).name and sha256_file(copy) == recorded["sha256"]
    assert len(finished(url, "tiny")) == 2

    # A study made before copies were kept: the host pretrains, and refuses to search from
    # another start point when its bytes differ from the recorded ones.
    shutil.rmtree(elsewhere)
    with sqlite3.connect(tmp_path / "study.db") as db:
        db.execute("DELETE FROM tlsearch_checkpoints")
    study = optuna.load_study(study_name="tiny", storage=url)
    study.set_user_attr(ATTR_CHECKPOINT, {**recorded, "sha256": "0" * 64})
    result = run_cli(*worker, cwd=tmp_path)
    assert result.returncode == 1
    assert "not on this host; pretraining it here" in result.stderr
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith(
        "tlsearch: error: pretraining on this host gave a checkpoint with SHA-256"
    )
    assert "or put pretrain.cache_dir on a filesystem every worker sees" in line


def test_a_trial_failed_by_another_worker_is_retried_not_fatal(tmp_path: Path) -> None:
    """Optuna #5582 ("Trial#N has already finished"): another worker failed our running trial."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = create_storage(url, Heartbeat(interval=1, grace_period=3))
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    elsewhere = create_storage(url)  # the other worker's view of the same study
    taken: list[optuna.Trial] = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if not taken:
            taken.append(trial)
            elsewhere.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        trial.report(x, 0)  # the first trial: "has already finished and can not be updated"
        return x

    assert run_trials(study, storage, objective, n_trials=3) == 3
    trials = study.get_trials(deepcopy=False)
    assert trials[0].state == TrialState.FAIL
    assert _retry_of(trials, 0).params == taken[0].params
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 3


def test_devices_round_robin_and_threads_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert plan_devices(5, [0, 2], None) == ["cuda:0", "cuda:2", "cuda:0", "cuda:2", "cuda:0"]
    assert plan_devices(3, None, "auto") == ["cuda:0", "cuda:1", "cuda:2"]
    assert plan_devices(2, None, "cpu") == ["cpu", "cpu"]
    with pytest.raises(ConfigError, match="--gpus: GPU 7 asked for, but 4 CUDA device"):
        plan_devices(2, [7], None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert plan_devices(2, None, None) == ["cpu", "cpu"]
    assert default_threads(64) == 1


def test_workers_of_one_host_spread_over_its_gpus(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scaled compose replicas all see every GPU; lock files give each the least used one."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(hosts, "_held", [])
    assert [claim_gpu(tmp_path) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    for lock in hosts._held[:2]:  # the workers on GPUs 0 and 1 exit
        lock.release()
    assert [claim_gpu(tmp_path) for _ in range(2)] == [0, 1]
    for lock in hosts._held:
        lock.release()


def test_two_workers_share_the_cores_and_say_so(tmp_path: Path) -> None:
    """Without --threads, finetune.threads or OMP_NUM_THREADS, each worker takes its share of the
    host's cores among this study's workers there, less what other work keeps busy, checked
    before every trial: two workers on 2 cores use 1 thread each (each used torch's default of 2
    before, and folds took 17-45 s instead of 1)."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    config = tiny_config(tmp_path, url, n_trials=16, finetune={**MEDIUM["finetune"], "threads": 0})
    create(config)
    args = ("worker", "--storage", url, "--study-name", "tiny")
    policy: dict[str, str | None] = {"OMP_NUM_THREADS": None, "MKL_NUM_THREADS": None}
    first = start_cli(*args, cwd=tmp_path, env=policy, log=tmp_path / "a.log")
    wait_joined(tmp_path, ["a.log"])
    second = start_cli(*args, cwd=tmp_path, env=policy, log=tmp_path / "b.log")
    assert first.wait(300) == 0 and second.wait(300) == 0
    share = max(1, len(os.sched_getaffinity(0)) // 2)
    line = re.compile(
        rf"{share} thread\(s\) \(\d+ cores, 2 worker\(s\) of this study on this host, "
        r"\d+\.\d busy with other work\)"
    )
    for log in ("a.log", "b.log"):
        text = (tmp_path / log).read_text()
        assert line.search(text), text
