"""The selected trial as JSON that tlsearch (and people) can read back; all trials as a table.

The JSON holds the selected trial's parameters (searched and fixed), its CV mean, std and fold
scores, the trial number, how it was selected and why (:mod:`tlsearch.selection`), the study name,
the full resolved config, the pretrained checkpoint's hash and the versions of the packages that
produced it. Storage URLs are written with the password masked.

The table (CSV or Parquet, through pandas) is :meth:`optuna.Study.trials_dataframe` with each
trial's fold scores spread into columns ``fold_0`` … ``fold_{k-1}`` (and ``fold_i_loss``,
``fold_i_seconds``); it holds no storage URL.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from tlsearch._io import atomic_write, read_json, write_json
from tlsearch.config import StudyConfig, config_from_dict
from tlsearch.errors import ConfigError, TlsearchError
from tlsearch.params import TrialParams
from tlsearch.selection import ATTR_SELECTED, Pool, baseline_of, select, trial_record
from tlsearch.storage import ATTR_CHECKPOINT, load_study_config, mask_url

__all__ = [
    "BestConfig",
    "best_config",
    "read_export",
    "FINAL_MODELS",
    "final_paths",
    "read_final",
    "trials_frame",
    "write_export",
    "write_trials",
]

FORMAT = "tlsearch.best/1"


@dataclass(frozen=True)
class BestConfig:
    """An export read back: the study config and the parameters to fine-tune with."""

    config: StudyConfig
    params: TrialParams
    data: dict[str, Any]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("tlsearch", "torch", "optuna", "numpy", "scikit-learn"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def best_config(study: optuna.Study, rule: str | None = None) -> dict[str, Any]:
    """The export as a dict, for the trial ``rule`` selects (default: the study's ``select.rule``;
    see :mod:`tlsearch.selection`); raises when the study has no completed trial.

    The top-level trial fields (:func:`~tlsearch.selection.trial_record`: ``trial_number``,
    ``params``, the CV fields) describe the selected trial (what ``tlsearch final`` retrains);
    ``selection`` says how it was chosen and why, beside Optuna's best and the runners-up;
    ``baselines`` holds the study's reference trials (plain fine-tuning, scratch).
    """
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise TlsearchError(f"study '{study.study_name}' has no completed trial to export yet")
    cfg = load_study_config(study, names=False)
    chosen = select(study, cfg, rule)
    config = cfg.to_dict()
    config["storage"] = mask_url(config["storage"])
    baselines = {}
    for t in Pool.of(study).search:
        name = baseline_of(t)
        if name is not None and name not in baselines:
            baselines[name] = trial_record(t, cfg)
    return {
        "format": FORMAT,
        "study_name": study.study_name,
        **trial_record(chosen.trial, cfg),
        "metric": cfg.cv.metric,
        "selection": chosen.to_dict(cfg),
        "baselines": baselines,
        "n_trials": {
            s.name.lower(): len(study.get_trials(deepcopy=False, states=(s,)))
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        },
        "checkpoint": study.user_attrs.get(ATTR_CHECKPOINT),
        "config": config,
        "versions": _versions(),
    }


def write_export(study: optuna.Study, path: str | Path, rule: str | None = None) -> dict[str, Any]:
    """Write :func:`best_config` to ``path`` atomically, store the selection with the study
    (``tlsearch_selected``) and return the export."""
    data = best_config(study, rule)
    write_json(Path(path), data)
    study.set_user_attr(ATTR_SELECTED, data["selection"])
    return data


# List-valued user attributes of a trial → the column name of each fold's entry.
_FOLD_COLUMNS = {
    "fold_scores": "fold_{}",
    "fold_losses": "fold_{}_loss",
    "fold_seconds": "fold_{}_seconds",
}


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """Every trial as a row: :meth:`optuna.Study.trials_dataframe` with one column per fold.

    ``fold_i`` is fold i's validation accuracy (``fold_i_loss``, ``fold_i_seconds`` its loss and
    time); a fold a pruned or running trial did not reach is empty. ``duration`` is in seconds.
    """
    df = study.trials_dataframe(
        attrs=(
            "number",
            "state",
            "value",
            "datetime_start",
            "datetime_complete",
            "duration",
            "params",
            "user_attrs",
        )
    )
    # One "value" column whatever the objective is named (Optuna writes value_<metric name> once
    # a study has metric names, as studies set up since the metric was named cv_accuracy do).
    df = df.rename(columns={f"value_{n}": "value" for n in study.metric_names or []})
    trials = study.get_trials(deepcopy=False)
    k = max([len(t.user_attrs.get("fold_scores") or []) for t in trials], default=0)
    try:
        k = max(k, load_study_config(study, names=False).cv.k)
    except TlsearchError:
        pass
    for attr, name in _FOLD_COLUMNS.items():
        values = [t.user_attrs.get(attr) or [] for t in trials]
        for i in range(k):
            df[name.format(i)] = [float(v[i]) if i < len(v) else float("nan") for v in values]
        df = df.drop(columns=f"user_attrs_{attr}", errors="ignore")
    if "duration" in df:
        df["duration"] = df["duration"].dt.total_seconds()
    return df


def write_trials(study: optuna.Study, path: str | Path) -> pd.DataFrame:
    """Write :func:`trials_frame` as CSV (``.csv``) or Parquet (``.parquet``, ``.pq``)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".parquet", ".pq"}:
        raise ConfigError(f"{path}: the trials table must end in .csv or .parquet")
    df = trials_frame(study)
    if suffix == ".csv":
        atomic_write(path, lambda p: df.to_csv(p, index=False))
    else:
        atomic_write(path, lambda p: df.to_parquet(p, index=False))
    return df


def read_export(path: str | Path) -> BestConfig:
    """Read a file written by :func:`write_export` back into a config and parameters."""
    path = Path(path)
    data = read_json(path, "a readable JSON export")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a tlsearch export (format must be '{FORMAT}')")
    if not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path}: config: missing or not a table")
    cfg = config_from_dict(data["config"], str(path))
    raw = data.get("params")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: params: missing or not a table")
    try:
        params = TrialParams.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return BestConfig(cfg, params, data)


# The models `tlsearch final` trains and scores, as keys of BEST.final.json, in report order.
FINAL_MODELS = {
    "scratch": "from scratch (no transfer)",
    "plain_finetuning": "plain fine-tuning",
    "tuned": "tuned fine-tuning",
}
# Keys of older BEST.final.json files → today's (tlsearch 0.1 named plain fine-tuning after its λ).
_OLD_FINAL_KEYS = {"default_lambda": "plain_finetuning"}


def final_paths(best_path: str | Path) -> tuple[Path, Path]:
    """Where ``tlsearch final`` writes for ``BEST.json``: ``BEST.final.json``, ``BEST.final.pt``."""
    stem = Path(best_path).with_suffix("")
    return Path(f"{stem}.final.json"), Path(f"{stem}.final.pt")


def read_final(path: str | Path) -> dict[str, Any]:
    """Read ``BEST.final.json`` (from ``tlsearch final``); one clear error if it is not one.

    A file from before the baseline's rename (``default_lambda``) reads with the key
    ``plain_finetuning``; one from before ``--seeds`` simply lacks the intervals and comparisons.
    """
    path = Path(path)
    data = read_json(path, "a readable JSON file")
    if not isinstance(data, dict):
        data = {}
    for old, new in _OLD_FINAL_KEYS.items():
        if old in data and new not in data:
            data[new] = data.pop(old)
    missing = [
        n
        for n in FINAL_MODELS
        if not isinstance(data.get(n), dict) or "test_accuracy" not in data[n]
    ]
    if missing:
        raise ConfigError(
            f"{path}: not written by `tlsearch final` (no test_accuracy for {', '.join(missing)})"
        )
    return data
