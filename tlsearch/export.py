"""The best trial as a JSON file that tlsearch (and people) can read back.

The file holds the best trial's parameters (searched and fixed), its CV mean, std and fold scores, the
trial number, the study name, the full resolved config, the pretrained checkpoint's hash and the versions
of the packages that produced it. Storage URLs are written with the password masked.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from tlsearch.config import StudyConfig, config_from_dict
from tlsearch.errors import ConfigError, TlsearchError
from tlsearch.finetune import FinetuneParams
from tlsearch.objective import resolve_params
from tlsearch.storage import mask_url
from tlsearch.study import ATTR_CHECKPOINT, load_study_config

__all__ = ["BestConfig", "best_config", "read_export", "write_export"]

FORMAT = "tlsearch.best/1"


@dataclass(frozen=True)
class BestConfig:
    """An export read back: the study config and the parameters to fine-tune with."""

    config: StudyConfig
    params: FinetuneParams
    data: dict[str, Any]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("tlsearch", "torch", "optuna", "numpy", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def best_config(study: optuna.Study) -> dict[str, Any]:
    """The export as a dict; raises when the study has no completed trial."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise TlsearchError(f"study '{study.study_name}' has no completed trial to export yet")
    cfg = load_study_config(study)
    best = study.best_trial
    config = cfg.to_dict()
    config["storage"] = mask_url(config["storage"])
    return {
        "format": FORMAT,
        "study_name": study.study_name,
        "trial_number": best.number,
        "params": resolve_params(cfg, best.params).to_dict(),
        "searched_params": best.params,
        "cv_mean": best.value,
        "cv_std": best.user_attrs.get("cv_std"),
        "fold_scores": best.user_attrs.get("fold_scores"),
        "n_trials": {
            s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        },
        "checkpoint": study.user_attrs.get(ATTR_CHECKPOINT),
        "config": config,
        "versions": _versions(),
    }


def write_export(study: optuna.Study, path: str | Path) -> dict[str, Any]:
    """Write :func:`best_config` to ``path`` atomically and return it."""
    data = best_config(study)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise TlsearchError(f"cannot write {path}: {e.strerror}") from None
    return data


def read_export(path: str | Path) -> BestConfig:
    """Read a file written by :func:`write_export` back into a config and parameters."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON export: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a tlsearch export (format must be '{FORMAT}')")
    cfg = config_from_dict(data["config"], str(path))
    try:
        params = FinetuneParams.from_dict(data["params"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: params: missing or invalid {e}") from None
    return BestConfig(cfg, params, data)
