"""tlsearch: cross-validated hyperparameter search for regularized transfer learning.

The library API the CLI is built on::

    import tlsearch
    cfg = tlsearch.load_config("studies/digits.toml", n_trials=10)
    study = tlsearch.run_study(cfg)
    tlsearch.write_export(study, "best.json")

Every name below is imported on first use (PEP 562), so ``import tlsearch`` loads neither torch
nor Optuna. README's "Architecture" section lists what users, plug-ins and benchmarks may import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tlsearch._version import __version__

# Public name → the module that defines it.
_API = {
    # config and errors
    "StudyConfig": "tlsearch.config",
    "config_from_dict": "tlsearch.config",
    "load_config": "tlsearch.config",
    "ConfigError": "tlsearch.errors",
    "TlsearchError": "tlsearch.errors",
    # the trial's choices
    "TrialParams": "tlsearch.params",
    # registries and plug-ins
    "MODELS": "tlsearch.registry",
    "REGULARIZERS": "tlsearch.registry",
    "TASKS": "tlsearch.registry",
    "SAMPLERS": "tlsearch.registry",
    "PRUNERS": "tlsearch.registry",
    "SELECTION_RULES": "tlsearch.registry",
    "Entry": "tlsearch.registry",
    "load_plugins": "tlsearch.registry",
    # studies
    "open_study": "tlsearch.storage",
    "find_study": "tlsearch.storage",
    "load_study_config": "tlsearch.storage",
    "run_study": "tlsearch.study",
    "setup_study": "tlsearch.study",
    "prepare": "tlsearch.study",
    "run_workers": "tlsearch.workers",
    "run_worker": "tlsearch.workers",
    # data, models, fine-tuning
    "load_task": "tlsearch.data",
    "create_model": "tlsearch.models",
    "backbone_state": "tlsearch.models",
    "finetune": "tlsearch.training",
    "evaluate": "tlsearch.training",
    "KFoldObjective": "tlsearch.objective",
    "load_checkpoint": "tlsearch.pretrain",
    # building blocks the benchmarks use too
    "DivergedError": "tlsearch.errors",
    "TransferTask": "tlsearch.data",
    "Dataset": "tlsearch.data",
    "make_sampler": "tlsearch.samplers",
    "make_pruner": "tlsearch.samplers",
    "run_trials": "tlsearch.study",
    "StudyContext": "tlsearch.study",
    "worker_attrs": "tlsearch.study",
    "finetune_folds": "tlsearch.training",
    "create_storage": "tlsearch.storage",
    "Heartbeat": "tlsearch.storage",
    "CVMetric": "tlsearch.objective",
    "select": "tlsearch.selection",
    "queue_confirmation": "tlsearch.confirmation",
    "CONFIRM_ATTR": "tlsearch.confirmation",
    "paired_difference": "tlsearch.stats",
    "mcnemar_exact": "tlsearch.stats",
    # results
    "read_export": "tlsearch.export",
    "write_export": "tlsearch.export",
    "trials_frame": "tlsearch.export",
    "run_final": "tlsearch.final",
    "write_report": "tlsearch.report",
    "study_status": "tlsearch.status",
}

__all__ = [
    "__version__",
    "CONFIRM_ATTR",
    "CVMetric",
    "ConfigError",
    "Dataset",
    "DivergedError",
    "Entry",
    "Heartbeat",
    "KFoldObjective",
    "MODELS",
    "PRUNERS",
    "REGULARIZERS",
    "SAMPLERS",
    "SELECTION_RULES",
    "StudyConfig",
    "StudyContext",
    "TASKS",
    "TlsearchError",
    "TransferTask",
    "TrialParams",
    "backbone_state",
    "config_from_dict",
    "create_model",
    "create_storage",
    "evaluate",
    "finetune",
    "finetune_folds",
    "find_study",
    "load_checkpoint",
    "load_config",
    "load_plugins",
    "load_study_config",
    "load_task",
    "make_pruner",
    "make_sampler",
    "mcnemar_exact",
    "open_study",
    "paired_difference",
    "prepare",
    "queue_confirmation",
    "read_export",
    "run_final",
    "run_study",
    "run_trials",
    "run_worker",
    "run_workers",
    "select",
    "setup_study",
    "study_status",
    "trials_frame",
    "worker_attrs",
    "write_export",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'tlsearch' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


if TYPE_CHECKING:
    from tlsearch.config import StudyConfig, config_from_dict, load_config
    from tlsearch.confirmation import CONFIRM_ATTR, queue_confirmation
    from tlsearch.data import Dataset, TransferTask, load_task
    from tlsearch.errors import ConfigError, DivergedError, TlsearchError
    from tlsearch.export import read_export, trials_frame, write_export
    from tlsearch.final import run_final
    from tlsearch.models import backbone_state, create_model
    from tlsearch.objective import CVMetric, KFoldObjective
    from tlsearch.params import TrialParams
    from tlsearch.pretrain import load_checkpoint
    from tlsearch.registry import (
        MODELS,
        PRUNERS,
        REGULARIZERS,
        SAMPLERS,
        SELECTION_RULES,
        TASKS,
        Entry,
        load_plugins,
    )
    from tlsearch.report import write_report
    from tlsearch.samplers import make_pruner, make_sampler
    from tlsearch.selection import select
    from tlsearch.stats import mcnemar_exact, paired_difference
    from tlsearch.status import study_status
    from tlsearch.storage import (
        Heartbeat,
        create_storage,
        find_study,
        load_study_config,
        open_study,
    )
    from tlsearch.study import (
        StudyContext,
        prepare,
        run_study,
        run_trials,
        setup_study,
        worker_attrs,
    )
    from tlsearch.training import evaluate, finetune, finetune_folds
    from tlsearch.workers import run_worker, run_workers
