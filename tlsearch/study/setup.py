"""Setting a study up: load the data, pretrain once, create or resume the study, record it.

After :func:`setup_study`, workers anywhere need only the storage URL and the study name: the
config, its search hash, the checkpoint and the heartbeat settings are recorded with the study
(:mod:`tlsearch.storage.records`).
"""

from __future__ import annotations

import logging
import os
import socket
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import optuna
import torch

from tlsearch._version import __version__
from tlsearch.config import StudyConfig, adopt_stored
from tlsearch.dashboard import write_study_note
from tlsearch.data import TransferTask, load_task
from tlsearch.device import resolve_device
from tlsearch.errors import ConfigError
from tlsearch.hosts import HostWorkers
from tlsearch.objective import KFoldObjective, check_folds, enqueue_baselines
from tlsearch.params import augment_choices
from tlsearch.pretrain import (
    Checkpoint,
    ensure_pretrained,
    load_checkpoint,
    lock_dir,
    source_record,
    user_checkpoint,
)
from tlsearch.pretrain import (
    cache_dir as study_cache_dir,
)
from tlsearch.samplers import make_pruner, make_sampler
from tlsearch.storage import (
    ATTR_CHECKPOINT,
    ATTR_CONFIG,
    ATTR_HASH,
    ATTR_HEARTBEAT,
    ATTR_SOURCE,
    ATTR_VERSION,
    Heartbeat,
    StudyStorage,
    check_url,
    count_budget,
    create_storage,
    mask_url,
    sqlite_file_missing,
    storage_location,
    store_checkpoint,
)
from tlsearch.threads import ThreadPolicy, current_policy, thread_scope

__all__ = [
    "StudyContext",
    "make_objective",
    "prepare",
    "setup_study",
    "thread_policy",
    "threads_per_trial",
    "worker_attrs",
]

_log = logging.getLogger(__name__)


@dataclass
class StudyContext:
    """Everything a process needs to run trials of one study."""

    cfg: StudyConfig
    task: TransferTask
    checkpoint: Checkpoint
    device: torch.device
    # Where the source model came from (tlsearch.pretrain.source_record), recorded with the study.
    source: dict | None = None


def prepare(cfg: StudyConfig, device: str | None = None) -> StudyContext:
    """Load the data, check the folds and make sure the source checkpoint exists: pretrained
    once, or the user's ``pretrain.checkpoint`` fitted to the model.

    No storage is touched: this is what ``final`` needs, and the first step of a study.
    """
    dev = resolve_device(device or cfg.finetune.device)
    task = load_task(cfg.data, cache_dir=study_cache_dir(cfg))
    check_folds(cfg, task.target_train)
    augment_choices(cfg, task.input_shape)  # augmentation named for flat features: before any work
    user_sha = None
    if cfg.pretrain.checkpoint is not None:
        checkpoint, user_sha = user_checkpoint(cfg, task)
    else:
        checkpoint = ensure_pretrained(cfg, task, dev)
    return StudyContext(cfg, task, checkpoint, dev, source_record(cfg, task, user_sha))


def _existing(
    cfg: StudyConfig, allow_config_change: bool, heartbeat: Mapping[str, int] | None
) -> tuple[optuna.Study | None, Heartbeat, StudyConfig]:
    """The study of that name if the storage holds one (checked against ``cfg``), the heartbeat
    settings to use, and ``cfg`` as the study goes on with it (see ``adopt_stored``).

    All before any data is loaded or pretrained, so a refused resume or a bad flag costs nothing
    and prints nothing about pretraining. A SQLite file that does not exist holds no study and is
    not created here."""
    existing = None
    if not sqlite_file_missing(cfg.storage):
        storage = create_storage(cfg.storage)
        try:
            existing = optuna.load_study(study_name=cfg.name, storage=storage)
        except KeyError:
            existing = None
    stored = None
    if existing is not None:
        # Fields added since the study was made keep the values it ran with.
        cfg = adopt_stored(cfg, existing.user_attrs.get(ATTR_CONFIG))
        old = existing.user_attrs.get(ATTR_HASH)
        if old is not None and not cfg.hash_matches(old) and not allow_config_change:
            raise ConfigError(
                f"name: study '{cfg.name}' already exists with a different config; "
                "choose another --study-name, or pass --allow-config-change to mix them"
            )
        stored = existing.user_attrs.get(ATTR_HEARTBEAT)
    # Checked before a new study exists: bad heartbeat flags must not leave a study behind.
    return existing, replace(Heartbeat.from_dict(stored), **(heartbeat or {})), cfg


def _record(
    study: optuna.Study, storage: StudyStorage, ctx: StudyContext, heartbeat: Heartbeat
) -> None:
    before = (study.user_attrs.get(ATTR_CHECKPOINT) or {}).get("sha256")
    if before not in (None, ctx.checkpoint.sha256) and count_budget(study):
        _log.warning(
            "the study's finished trials started from checkpoint %s…, this run from %s… "
            "(pretrained again with other data, torch or device?)",
            before[:12],
            ctx.checkpoint.sha256[:12],
        )
    config = ctx.cfg.to_dict()
    # The study is visible to anyone who can read it (the dashboard): never store a password.
    config["storage"] = mask_url(config["storage"])
    study.set_user_attr(ATTR_CONFIG, config)
    study.set_user_attr(ATTR_HASH, ctx.cfg.search_hash())
    study.set_user_attr(
        ATTR_CHECKPOINT,
        {
            "path": str(ctx.checkpoint.path),
            "sha256": ctx.checkpoint.sha256,
            "key": ctx.checkpoint.key,
        },
    )
    # Workers on hosts without the file take this copy: pretraining elsewhere (other CPU kind,
    # other thread count, a GPU) need not give the same bytes.
    store_checkpoint(storage, ctx.checkpoint.sha256, ctx.checkpoint.path)
    if ctx.source is not None:
        study.set_user_attr(ATTR_SOURCE, ctx.source)
    study.set_user_attr(ATTR_HEARTBEAT, heartbeat.to_dict())
    study.set_user_attr(ATTR_VERSION, __version__)
    # What optuna-dashboard and optuna.visualization call the objective (not "Objective 0").
    with warnings.catch_warnings():  # experimental in Optuna 5; the name is all we set
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([ctx.cfg.cv.metric_name])
    study.set_user_attr("task", ctx.task.description)
    # The markdown note optuna-dashboard shows beside the study: data, model, penalty, space, CV.
    write_study_note(study, ctx.cfg, ctx.task.description)


def setup_study(
    cfg: StudyConfig,
    *,
    device: str | None = None,
    allow_config_change: bool = False,
    heartbeat: Mapping[str, int] | None = None,
) -> tuple[optuna.Study, StudyStorage, StudyContext]:
    """Create or resume the study, pretrain its checkpoint once and record both in the storage.

    After this, workers anywhere need only the storage URL and the study name
    (``tlsearch worker``).

    Args:
        heartbeat: overrides of the study's :class:`~tlsearch.storage.Heartbeat` fields (those
            stored with the study, else the defaults), e.g. ``{"grace_period": 120}``.
    """
    check_url(cfg.storage)  # a bad URL or an unwritable directory costs no pretraining
    existing, beat, cfg = _existing(cfg, allow_config_change, heartbeat)
    # Pretraining shares the cores as trials do (`tlsearch create` has no policy of its own).
    own = current_policy() or ThreadPolicy(cfg.finetune.threads)
    with thread_scope(own):
        ctx = prepare(cfg, device)
    storage = create_storage(cfg.storage)
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.name,
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        direction="maximize",
        load_if_exists=True,
    )
    storage.enable_heartbeat(beat)
    if existing is None and not study.trials:
        enqueue_baselines(study, cfg, augment_choices(cfg, ctx.task.input_shape))
    _record(study, storage, ctx, beat)
    where = storage_location(cfg.storage)
    if existing is None:
        _log.info("created study '%s' in %s", cfg.name, where)
    else:
        total = cfg.n_trials if cfg.n_trials is not None else "∞"
        _log.info(
            "resuming study '%s' in %s: %d of %s trials done",
            cfg.name,
            where,
            count_budget(study),
            total,
        )
    return study, storage, ctx


def make_objective(ctx: StudyContext) -> KFoldObjective:
    """The k-fold objective of the study, on the context's device."""
    return KFoldObjective(
        ctx.cfg,
        ctx.task.target_train,
        load_checkpoint(ctx.checkpoint, ctx.device),
        ctx.task.input_shape,
        ctx.task.target_classes,
        ctx.device,
    )


def thread_policy(
    cfg: StudyConfig, study_name: str, threads: int | None = None, who: str = ""
) -> ThreadPolicy:
    """This process's CPU thread policy for the study (run it under
    :func:`tlsearch.threads.thread_scope`).

    ``threads`` (``--threads``), else ``finetune.threads``, fixes the count; ``OMP_NUM_THREADS``
    does when neither is set. Otherwise each process running the study's trials on this host
    (``run``, ``worker``, ``run --workers``) holds a lock file in ``<cache>/.locks`` for its
    lifetime and takes the cores ÷ the processes holding one, less the cores other processes
    keep busy (:func:`tlsearch.device.choose_threads`): two workers on 2 cores use 1 thread
    each, one left alone goes back to 2, and one beside another job uses the core it leaves.
    """
    fixed = threads or cfg.finetune.threads or None
    host: HostWorkers | None = None
    if fixed is None:
        try:
            host = HostWorkers(lock_dir(cfg), study_name)
        except OSError as e:  # a read-only cache serves checkpoints, but holds no locks
            _log.warning(
                "cannot count this host's workers (%s: %s); counting this one only",
                lock_dir(cfg),
                e.strerror,
            )
    return ThreadPolicy(fixed, host.count if host is not None else None, who)


def threads_per_trial(
    objective: Callable[[optuna.Trial], float], policy: ThreadPolicy
) -> Callable[[optuna.Trial], float]:
    """``objective`` with the thread count ``policy`` chooses set before each trial (and
    re-checked between its epochs, :func:`tlsearch.threads.rebalance`)."""

    def run(trial: optuna.Trial) -> float:
        policy.apply()
        return objective(trial)

    return run


def worker_attrs(device: torch.device) -> dict[str, str]:
    """What each trial records about the process that ran it."""
    return {"worker": f"{socket.gethostname()}:{os.getpid()}", "device": str(device)}
