"""Helpers for the storage, worker and compose tests: PostgreSQL databases and worker processes.

Each PostgreSQL test gets a database of its own on the local server (127.0.0.1:5432, user postgres)
and drops it afterwards, so runs never see each other's studies (conftest's ``pg_url`` and
``storage_url`` fixtures). Without a server the tests are skipped, except under ``CI=true``, where
they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import psycopg
import pytest
from conftest import FAST, merge, start_cli, write_toml
from psycopg import sql

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
REPO = Path(__file__).resolve().parents[1]


def admin() -> psycopg.Connection:
    """A connection to the server's ``postgres`` database as its superuser, in autocommit."""
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
        with admin():
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
    with admin() as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        wait_for_server()
        with admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))


def terminate_backends(url: str) -> int:
    """``pg_terminate_backend`` each connection to the database of ``url``; return how many."""
    dbname = url.rsplit("/", 1)[1]
    with admin() as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
    return len(rows)


def tiny_config(tmp_path: Path, storage: str, **overrides: Any) -> Path:
    """conftest's ``FAST`` study (4 trials) in ``storage``, its cache in ``tmp_path``, written to
    ``tmp_path / "tiny.toml"``; return the path.

    ``overrides``: top-level values (``n_trials=100``) or sections (``finetune={"epochs": 60}``),
    merged; None drops a key (its default applies).
    """
    base = {"storage": storage, "n_trials": 4, "pretrain": {"cache_dir": str(tmp_path / "cache")}}
    return write_toml(tmp_path / "tiny.toml", merge(merge(FAST, base), overrides))


def create(config: Path, **heartbeat: int) -> None:
    """``tlsearch create CONFIG``, in this process (a subprocess would only add start-up time)."""
    from tlsearch.config import load_config
    from tlsearch.study import setup_study

    _, storage, _ = setup_study(load_config(config), heartbeat=heartbeat)
    storage.engine.dispose()


# Heartbeats fast enough to notice a dead worker within seconds.
FAST_BEATS = {"interval": 1, "grace_period": 3}


def start_worker(url: str, name: str, tmp_path: Path, *extra: str, log: str) -> subprocess.Popen:
    """A ``tlsearch worker`` process writing its output to ``tmp_path / log``."""
    args = ("worker", "--storage", url, "--study-name", name, "--threads", "1", *extra)
    return start_cli(*args, cwd=tmp_path, log=tmp_path / log)


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
    all drawn (a trial is RUNNING, with its worker attribute, a moment before the sampler fills
    its parameters, one by one; a test that compares them with its retry's must not catch it
    then). The objective sets ``resolved_params`` once the last one is drawn."""
    study = optuna.load_study(study_name=name, storage=url)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = str(t.user_attrs.get("worker", ""))
        if worker.endswith(f":{pid}") and "resolved_params" in t.user_attrs:
            return t
    return None


def finished(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=name, storage=url)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return study.get_trials(deepcopy=False, states=states)
