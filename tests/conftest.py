"""Shared helpers: a tiny study config on sklearn's 8×8 digits, a TOML writer and a CLI runner.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch

torch.set_num_threads(1)
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
    },
    "cv": {"k": 2},
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "none"},
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


def tiny_study(tmp: Path) -> tuple[optuna.Study, str]:
    """A real tiny study run by tlsearch (4 trials, 2 folds) in ``tmp``; the study and its URL."""
    from tlsearch.config import config_from_dict
    from tlsearch.study import run_study

    url = f"sqlite:///{tmp / 'study.db'}"
    overrides = {
        "n_trials": 4,
        "storage": url,
        "model": {"hidden": [16, 16]},
        "pretrain": {"epochs": 1, "cache_dir": str(tmp / "cache")},
        "finetune": {"epochs": 3},
    }
    return run_study(config_from_dict(merge(TINY, overrides))), url


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
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML for {value!r}")


def to_toml(data: dict[str, Any]) -> str:
    """TOML text for a study dict: scalars first, then one [section] per table."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for key, section in data.items():
        if isinstance(section, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in section.items()]
    return "\n".join(lines) + "\n"


def write_toml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(to_toml(data))
    return path


def cli_env(cwd: Path) -> dict[str, str]:
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
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start ``tlsearch ARGS`` in ``cwd`` without waiting; stdout and stderr are pipes."""
    return subprocess.Popen(
        cli_command(*args),
        cwd=cwd,
        env={**cli_env(cwd), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``tlsearch ARGS`` as a user would, in ``cwd``; capture stdout and stderr."""
    return subprocess.run(
        cli_command(*args),
        cwd=cwd,
        env=cli_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
