"""What tlsearch records with a study, and opening an existing study by name.

The study's resolved config, its search hash, the pretrained checkpoint's path and SHA-256, where
the source model came from (``ATTR_SOURCE``), the heartbeat settings and the tlsearch version are
study user attributes, so a worker on another host, ``export``, ``status`` or ``final`` reads them
from the storage alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

import optuna
from optuna.trial import TrialState

from tlsearch.config import StudyConfig, load_config, stored_config
from tlsearch.errors import ConfigError, StorageError, TlsearchError
from tlsearch.storage.rdb import (
    CONFIRM_ATTR,
    StudyStorage,
    create_storage,
    mask_url,
    sqlite_file_missing,
    storage_location,
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
    "find_study",
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

_log = logging.getLogger(__name__)


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
        names = [s.study_name for s in storage.get_all_studies()]
        raise StorageError(_absent(study_name, mask_url(url), names)) from None


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
    names = [s.study_name for s in storage.get_all_studies()]
    study_name = _choose(names, study_name, mask_url(storage_url), StorageError)
    return load_study(storage, storage_url, study_name)


def _choose(
    names: list[str],
    study_name: str | None,
    where: str,
    error: type[TlsearchError],
    prefix: str = "",
    none_hint: str = "pass --study-name",
) -> str:
    """``study_name`` when the storage ``where`` holds it (``names``), else its only study; else
    ``error``, after ``prefix``, naming the studies there (or, when it holds none,
    ``none_hint``)."""
    if study_name is None and len(names) == 1:
        return names[0]
    if study_name is None:
        held = f"{len(names)} studies ({', '.join(names)}): pass --study-name"
        raise error(f"{prefix}{where} holds " + (held if names else f"no study: {none_hint}"))
    if study_name not in names:
        raise error(prefix + _absent(study_name, where, names))
    return study_name


def _absent(study_name: str, where: str, names: list[str]) -> str:
    there = f"studies there: {', '.join(names)}" if names else "it holds no study"
    return f"no study '{study_name}' in {where} ({there})"


def find_study(
    study_file: str | Path | None = None,
    storage: str | None = None,
    study_name: str | None = None,
) -> tuple[optuna.Study, str]:
    """The existing study that a command reading one (status, export, report) is pointed at, and
    its storage URL.

    ``storage`` and ``study_name`` (``--storage``, ``--study-name``) win. The study file gives what
    they leave unset: its storage (a relative SQLite URL is relative to the current directory, as
    ``tlsearch run`` reads it) and its name. With neither a study file nor a storage: the default
    storage of ``tlsearch run``, ``./tlsearch.db``, and the study named, else its only one. Unless
    both flags named it, one log line says which study in which database was read (a SQLite
    file's path, else the URL with its password masked). Nothing is created.

    Raises:
        ConfigError: the study file is missing or invalid, or its storage or the default one does
            not hold the study (or holds several and none was named).
        StorageError: as :func:`open_study`, when ``storage`` was given without a study file.
    """
    if study_file is None and storage is not None:
        study = open_study(storage, study_name)
        if study_name is None:
            _log.info("reading study '%s' in %s", study.study_name, storage_location(storage))
        return study, storage
    if study_file is not None:
        cfg = load_config(study_file, names=False, storage=storage, name=study_name)
        url, study_name, prefix = cfg.storage, cfg.name, f"{study_file}: "
    else:
        url, prefix = StudyConfig.model_fields["storage"].default, ""
    location = storage_location(url)
    hint = "pass the study file you ran (e.g. studies/digits.toml), or --storage URL"
    if sqlite_file_missing(url):
        raise ConfigError(
            f"{prefix}no study '{study_name}': {location} does not exist (`tlsearch run` makes it; "
            "a relative SQLite path is relative to the current directory)"
            if prefix
            else f"no study file or --storage given, and no {location}: {hint}"
        )
    opened = create_storage(url)
    names = [s.study_name for s in opened.get_all_studies()]
    study = load_study(
        opened, url, _choose(names, study_name, location, ConfigError, prefix, hint)
    )
    _log.info("reading study '%s' in %s", study.study_name, location)
    return study, url


def count_budget(study: optuna.Study) -> int:
    """Trials of the study that used up part of its budget (complete or pruned; the
    confirmation round's trials are outside it)."""
    return sum(
        CONFIRM_ATTR not in t.user_attrs
        for t in study.get_trials(deepcopy=False, states=BUDGET_STATES)
    )
