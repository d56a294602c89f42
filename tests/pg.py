"""Helpers for the storage, worker and compose tests: PostgreSQL databases and tiny worker studies.

Each PostgreSQL test gets a database of its own on the local server (127.0.0.1:5432, user postgres)
and drops it afterwards, so runs never see each other's studies. Without a server the tests are
skipped, except under ``CI=true``, where they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import psycopg
import pytest
from psycopg import sql

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
REPO = Path(__file__).resolve().parents[1]


def _admin() -> psycopg.Connection:
    return psycopg.connect(
        host=PG_HOST,
        port=PG_PORT,
        user=PG_USER,
        dbname="postgres",
        autocommit=True,
        connect_timeout=5,
    )


def _server_problem() -> str | None:
    """None when the server answers, else why not."""
    try:
        with _admin():
            return None
    except psycopg.Error as e:
        return str(e).strip().splitlines()[0]


def require_postgres() -> None:
    """Skip (fail under CI=true) the calling test when no PostgreSQL server answers."""
    problem = _server_problem()
    if problem is None:
        return
    message = f"no PostgreSQL server at {PG_HOST}:{PG_PORT} ({problem})"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI=true needs it")
    pytest.skip(f"{message}; start it: pg_ctlcluster --skip-systemctl-redirect 15 main start")


def wait_for_server(seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while _server_problem() is not None:
        assert time.monotonic() < deadline, f"PostgreSQL did not come back in {seconds} s"
        time.sleep(0.5)


@contextmanager
def fresh_database() -> Iterator[str]:
    """URL of a new, empty PostgreSQL database, dropped (with its connections) afterwards."""
    require_postgres()
    name = f"tlsearch_test_{uuid.uuid4().hex[:12]}"
    with _admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        wait_for_server()
        with _admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


def terminate_backends(url: str) -> int:
    """``pg_terminate_backend`` each connection to the database of ``url``; return how many."""
    dbname = url.rsplit("/", 1)[1]
    with _admin() as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
    return len(rows)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test over a SQLite file and a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
    else:
        with fresh_database() as url:
            yield url


# A study that runs in well under a second per trial on one CPU thread.
def tiny_config(tmp_path: Path, storage: str, **overrides: Any) -> Path:
    """Write a tiny study file (digits-noisy, MLP 16-16, 2-fold CV) and return its path.

    ``overrides``: top-level values (``n_trials=100``) or sections (``finetune={"epochs": 60}``).
    """
    cfg: dict[str, dict[str, Any]] = {
        "": {"name": "tiny", "storage": storage, "n_trials": 4},
        "data": {"task": "digits-noisy"},
        "model": {"name": "mlp", "hidden": [16, 16]},
        "pretrain": {"epochs": 1, "cache_dir": str(tmp_path / "cache")},
        "finetune": {"epochs": 2, "device": "cpu", "threads": 1},
        "search": {"frozen_blocks": {"low": 0, "high": 2}},
        "cv": {"k": 2},
        "sampler": {"name": "random"},
        "pruner": {"name": "none"},
    }
    for name, values in overrides.items():
        if isinstance(values, dict):
            cfg.setdefault(name, {}).update(values)
        else:
            cfg[""][name] = values
    # None drops a key (its default applies).
    lines = [f"{k} = {_toml(v)}" for k, v in cfg.pop("").items() if v is not None]
    for name, values in cfg.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items() if v is not None]
    path = tmp_path / "tiny.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def create(config: Path, **heartbeat: int) -> None:
    """``tlsearch create CONFIG``, in this process (a subprocess would only add start-up time)."""
    from tlsearch.config import load_config
    from tlsearch.study import setup_study

    _, storage, _ = setup_study(load_config(config), heartbeat=heartbeat)
    storage.engine.dispose()


# Heartbeats fast enough to notice a dead worker within seconds.
FAST_BEATS = {"interval": 1, "grace_period": 3}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TLSEARCH_DB_PASSWORD"}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        TLSEARCH_CACHE=str(tmp_path / "default-cache"),
        **extra,
    )
    return env


def tlsearch(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlsearch.cli", *args]


def run_cli(
    *args: str, tmp_path: Path, timeout: float = 240, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tlsearch(*args),
        cwd=tmp_path,
        env=cli_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_worker(url: str, name: str, tmp_path: Path, *extra: str, log: str) -> subprocess.Popen:
    """A ``tlsearch worker`` process writing its output to ``tmp_path / log``."""
    out = (tmp_path / log).open("w")
    return subprocess.Popen(
        tlsearch("worker", "--storage", url, "--study-name", name, "--threads", "1", *extra),
        cwd=tmp_path,
        env=cli_env(tmp_path),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_joined(tmp_path: Path, logs: list[str], seconds: float = 120) -> None:
    """Until every worker's log says it joined its study: its storage is open. A database fault
    before that is a fault at start, which is reported, not retried (README: Failure modes)."""
    wait_until(
        lambda: all("joined study" in (tmp_path / log).read_text() for log in logs),
        seconds,
        "workers joined",
    )


def wait_until(what: Callable[[], Any], seconds: float, message: str) -> Any:
    deadline = time.monotonic() + seconds
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {seconds} s: {message}"
        time.sleep(0.2)


def running_trial_of(url: str, name: str, pid: int) -> optuna.trial.FrozenTrial | None:
    """The RUNNING trial of the worker process ``pid``, if it has one now whose parameters are
    drawn (a trial is RUNNING, with its worker attribute, a moment before the sampler fills its
    parameters; a test that compares them with its retry's must not catch it then)."""
    study = optuna.load_study(study_name=name, storage=url)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if str(t.user_attrs.get("worker", "")).endswith(f":{pid}") and t.params:
            return t
    return None


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Send ``sig`` and wait; kill it if it does not exit in time (the test then fails)."""
    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def finished(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=url)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)
