"""Shared helpers: the tiny study on sklearn's 8×8 digits, a TOML writer, a CLI runner, and the
storage fixtures (a SQLite file, a PostgreSQL database: tests/pg.py).

Everything runs on the CPU with one torch thread (test processes side by side on a small machine
must not oversubscribe it), and every pretrained checkpoint goes to a temporary directory, never
~/.cache.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

torch.set_num_threads(1)
# What tlsearch's thread policy reads as the user's explicit choice (tlsearch.device).
os.environ["OMP_NUM_THREADS"] = "1"
optuna.logging.set_verbosity(optuna.logging.WARNING)

# What every tiny study in the suite starts from: seconds, not minutes, per study.
TINY: dict[str, Any] = {
    "name": "tiny",
    "n_trials": 3,
    "data": {"task": "digits-noisy", "shots": 10, "seed": 0},
    "model": {"name": "mlp", "hidden": [32, 16]},
    "pretrain": {"epochs": 5, "lr": 0.01},
    "finetune": {"epochs": 5, "device": "cpu"},
    "regularizer": {"name": "l2sp"},
    "search": {
        "lambda": {"low": 1e-4, "high": 1.0, "log": True},
        "lr": {"low": 1e-3, "high": 3e-2, "log": True},
        "frozen_blocks": {"low": 0, "high": 2},
        # Fixed, and no confirmation round or augmentation: a test counts exactly the trials and
        # parameters it asks for; the defaults' own tests set them (test_selection, test_study,
        # test_augment_search).
        "backbone_lr_mult": 0.1,
        "augment": "none",
    },
    "cv": {"k": 2},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
    "select": {"confirm": 0},
}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``overrides``, section by section (a copy; neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# The tiny study at its smallest, for tests that run many trials or many processes: a fraction of
# a second per trial on one thread.
FAST: dict[str, Any] = merge(
    TINY,
    {
        "model": {"hidden": [16, 16]},
        "pretrain": {"epochs": 1},
        "finetune": {"epochs": 2, "threads": 1},
    },
)


def tiny_study(tmp: Path) -> tuple[optuna.Study, str]:
    """A real tiny study run by tlsearch (4 trials, 2 folds) in ``tmp``; the study and its URL."""
    from tlsearch.config import config_from_dict
    from tlsearch.study import run_study

    url = f"sqlite:///{tmp / 'study.db'}"
    overrides = {
        "n_trials": 4,
        "storage": url,
        "pretrain": {"cache_dir": str(tmp / "cache")},
        "finetune": {"epochs": 3},
    }
    return run_study(config_from_dict(merge(FAST, overrides))), url


def finished_tiny_study(
    tmp: Path, pruned_user_attrs: dict[str, Any], pruned_value: float
) -> tuple[optuna.Study, str]:
    """:func:`tiny_study` plus one trial pruned after its first fold."""
    from optuna.trial import TrialState, create_trial

    _, url = tiny_study(tmp)
    # Opened as any Optuna tool opens it (tlsearch's storage would refuse a trial past the budget).
    study = optuna.load_study(study_name="tiny", storage=url)
    first = study.trials[0]
    study.add_trial(
        create_trial(
            state=TrialState.PRUNED,
            params=first.params,
            distributions=first.distributions,
            user_attrs=pruned_user_attrs,
            intermediate_values={0: pruned_value},
        )
    )
    return study, url


@pytest.fixture
def tiny(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """``tiny(**overrides)``: the tiny study as a dict, storage and cache in ``tmp_path``."""

    def make(**overrides: Any) -> dict[str, Any]:
        base = merge(
            TINY,
            {
                "storage": f"sqlite:///{tmp_path / 'study.db'}",
                "pretrain": {"cache_dir": str(tmp_path / "cache")},
            },
        )
        return merge(base, overrides)

    return make


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # inf and nan are TOML too
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(data: dict[str, Any]) -> str:
    """TOML text for a study dict: scalars first, then one [section] per table. A None value is
    left out (its default applies): ``merge(FAST, {"pretrain": {"cache_dir": None}})``."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict | None)]
    for key, section in data.items():
        if isinstance(section, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in section.items() if v is not None]
    return "\n".join(lines) + "\n"


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(to_toml(data))
    return path


# --- the CLI as a user runs it: `python -m tlsearch.cli ARGS` in a directory -------------------


def cli_env(cwd: Path) -> dict[str, str]:
    """The environment of a CLI process in ``cwd``: one thread, unbuffered output, the default
    checkpoint cache inside ``cwd``, and no database password from the test's own environment."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TLSEARCH_CACHE=str(cwd / "default-cache"),
        PYTHONUNBUFFERED="1",
    )
    env.pop("TLSEARCH_DB_PASSWORD", None)
    return env


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tlsearch.cli", *args]


def start_cli(
    *args: str, cwd: Path, env: dict[str, str | None] | None = None, log: Path | None = None
) -> subprocess.Popen[str]:
    """Start ``tlsearch ARGS`` in ``cwd`` without waiting, ``env`` added to :func:`cli_env` (a
    variable whose value is None is removed).

    stdout and stderr are pipes, or both go to the file ``log``.
    """
    out = log.open("w") if log is not None else None
    merged = {**cli_env(cwd), **(env or {})}
    try:
        return subprocess.Popen(
            cli_command(*args),
            cwd=cwd,
            env={k: v for k, v in merged.items() if v is not None},
            stdout=out or subprocess.PIPE,
            stderr=subprocess.STDOUT if out else subprocess.PIPE,
            text=True,
        )
    finally:
        if out is not None:
            out.close()  # the child has its own copy


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``tlsearch ARGS`` as a user would, in ``cwd``; capture stdout and stderr."""
    return run_many({"": (cwd, list(args))}, timeout=timeout)[""]


Job = tuple[Path, list[str]] | tuple[Path, list[str], dict[str, str]]


def run_many(
    jobs: dict[str, Job], limit: int = 4, timeout: float = 300
) -> dict[str, subprocess.CompletedProcess[str]]:
    """:func:`run_cli` for each job (directory, arguments, optional extra environment), ``limit``
    at a time, each within ``timeout`` seconds."""
    waiting = list(jobs.items())
    running: dict[str, subprocess.Popen[str]] = {}
    done: dict[str, subprocess.CompletedProcess[str]] = {}
    while waiting or running:
        while waiting and len(running) < limit:
            key, (cwd, args, *extra) = waiting.pop(0)
            running[key] = start_cli(*args, cwd=cwd, env=extra[0] if extra else None)
        key = next(iter(running))
        proc = running.pop(key)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in (proc, *running.values()):
                p.kill()
                p.communicate()
            raise
        done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done


# --- storages ----------------------------------------------------------------------------------


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A new, empty PostgreSQL database of its own (tests/pg.py), dropped afterwards."""
    from pg import fresh_database

    with fresh_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The same test over a SQLite file and a PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'study.db'}"
    else:
        from pg import fresh_database

        with fresh_database() as url:
            yield url
