"""What tlsearch records with a study, and opening an existing study by name.

The study's resolved config, its search hash, the pretrained checkpoint's path and SHA-256, where
the source model came from (``ATTR_SOURCE``), the heartbeat settings and the tlsearch version are
study user attributes, so a worker on another host, ``export``, ``status`` or ``final`` reads them
from the storage alone.
"""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from tlsearch.config import StudyConfig, stored_config
from tlsearch.errors import StorageError
from tlsearch.storage.rdb import (
    CONFIRM_ATTR,
    StudyStorage,
    create_storage,
    mask_url,
    sqlite_file_missing,
)

__all__ = [
    "ATTR_CHECKPOINT",
    "ATTR_CONFIG",
    "ATTR_HASH",
    "ATTR_HEARTBEAT",
    "ATTR_SOURCE",
    "ATTR_VERSION",
    "BUDGET_STATES",
    "count_budget",
    "existing_storage",
    "load_study",
    "load_study_config",
    "open_study",
]

ATTR_CONFIG = "tlsearch_config"
ATTR_HASH = "tlsearch_search_hash"
ATTR_CHECKPOINT = "tlsearch_checkpoint"
ATTR_VERSION = "tlsearch_version"
ATTR_HEARTBEAT = "tlsearch_heartbeat"
# Where the source model came from: the model's registry origin (a plug-in's distribution and
# version), the user's checkpoint (path, SHA-256, strict) if any, and the image normalization.
ATTR_SOURCE = "tlsearch_source"
# Trials that count toward the budget: those that ran to an end the search can learn from.
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def load_study_config(study: optuna.Study, *, names: bool = True) -> StudyConfig:
    """The config a study was created with, from its user attributes.

    ``names=False``: without checking its model, task and other names against the registries
    (export and status read results and build nothing, so they need no plug-in).
    """
    raw = study.user_attrs.get(ATTR_CONFIG)
    if raw is None:
        raise StorageError(f"study '{study.study_name}' was not created by tlsearch (no config)")
    return stored_config(raw, f"study '{study.study_name}'", names=names)


def load_study(
    storage: StudyStorage,
    url: str,
    study_name: str,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
) -> optuna.Study:
    """Load an existing study; one clear error naming the studies there when it does not exist."""
    try:
        return optuna.load_study(
            study_name=study_name, storage=storage, sampler=sampler, pruner=pruner
        )
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise StorageError(
            f"no study '{study_name}' in {mask_url(url)}"
            + (f" (studies there: {', '.join(names)})" if names else " (it holds no study)")
        ) from None


def existing_storage(storage_url: str, study_name: str) -> StudyStorage:
    """The storage of an existing study (``open_study``, workers).

    A SQLite file that does not exist is reported, not created: a typo in the path would
    otherwise leave an empty database behind.
    """
    if sqlite_file_missing(storage_url):
        raise StorageError(
            f"no study '{study_name}' in {mask_url(storage_url)} (it holds no study)"
        )
    return create_storage(storage_url)


def open_study(storage_url: str, study_name: str | None = None) -> optuna.Study:
    """Load an existing study; one clear error when it does not exist.

    Without a name, the storage must hold exactly one study, which is the one opened.
    """
    if study_name is None and sqlite_file_missing(storage_url):
        raise StorageError(f"{mask_url(storage_url)}: no such SQLite file, so no study in it")
    storage = existing_storage(storage_url, study_name or "")
    if study_name is None:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        if len(names) != 1:
            raise StorageError(
                f"{mask_url(storage_url)} holds "
                + (f"{len(names)} studies ({', '.join(names)})" if names else "no study")
                + ": pass --study-name"
            )
        study_name = names[0]
    return load_study(storage, storage_url, study_name)


def count_budget(study: optuna.Study) -> int:
    """Trials of the study that used up part of its budget (complete or pruned; the
    confirmation round's trials are outside it)."""
    return sum(
        CONFIRM_ATTR not in t.user_attrs
        for t in study.get_trials(deepcopy=False, states=BUDGET_STATES)
    )
