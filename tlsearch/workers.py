"""Workers: processes, on one host or many, that share one study through its storage.

A worker needs only the storage URL and the study name: the study's config, its heartbeat settings
and the reference of its pretrained checkpoint (path, SHA-256, content key) are user attributes of
the study, written by ``tlsearch create`` or ``tlsearch run``, which also keep a copy of the
checkpoint in the study's database (:mod:`tlsearch.storage.checkpoints`). The checkpoint is found
in this order:

1. ``worker --checkpoint COPY``, a copy of the study's pretrained checkpoint file;
2. the recorded path, when this host sees it (same host, or ``pretrain.cache_dir`` on a shared
   filesystem or volume) and its bytes hash to the recorded SHA-256; or this host's cache under the
   study's key, holding those bytes;
3. the copy in the study's database, written into this host's cache. No host is asked to pretrain
   the same bytes again: they depend on the CPU kind's matrix kernels, the thread count and GPU
   kernels;
4. only for a study made before copies were kept (or one too large to keep): this host pretrains
   it into its own cache (same content key, under the cache's file lock, so workers of one host
   train it once) and checks that it hashes to the recorded SHA-256. When it does not, the worker
   stops with an error that says which file to share, rather than search with a different
   starting point than the study recorded; ``tlsearch worker --checkpoint COPY`` then points it at
   a copy.

A study started from the user's own checkpoint (``pretrain.checkpoint``) records that file's
SHA-256; its fitted checkpoint is kept in the database like a pretrained one. Without that copy, a
worker fits its copy of the user's file (the recorded path, or ``--checkpoint PATH``) to the model
the same way, and stops with one line when the file differs. Its model must come from the same
plug-in distribution and version as the study's (:func:`tlsearch.pretrain.check_model_origin`).

:func:`run_workers` is ``tlsearch run --workers N``: it creates the study and pretrains in this
process, then starts N ``tlsearch worker`` processes (spawned, never forked: CUDA and database
connections do not survive a fork), each pinned to its own device with its own share of the CPU
threads.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch

from tlsearch._io import sha256_file
from tlsearch.config import StudyConfig
from tlsearch.confirmation import queue_confirmation
from tlsearch.data import TransferTask, load_task
from tlsearch.device import resolve_device
from tlsearch.errors import CheckpointError, ConfigError, StorageError
from tlsearch.hosts import claim_gpu
from tlsearch.logs import guarded, quiet_optuna, setup_logging
from tlsearch.objective import check_folds
from tlsearch.pretrain import (
    Checkpoint,
    cache_copy,
    cached_checkpoint,
    check_model_origin,
    checkpoint_key,
    ensure_pretrained,
    lock_dir,
    user_checkpoint,
)
from tlsearch.pretrain import (
    cache_dir as study_cache_dir,
)
from tlsearch.registry import load_plugins, loaded_plugins
from tlsearch.samplers import make_pruner, make_sampler
from tlsearch.storage import (
    ATTR_CHECKPOINT,
    ATTR_HEARTBEAT,
    ATTR_SOURCE,
    Heartbeat,
    StudyStorage,
    existing_storage,
    fetch_checkpoint,
    load_study,
    load_study_config,
    mask_url,
)
from tlsearch.study import (
    ProgressPrinter,
    StopFlag,
    StudyContext,
    graceful_stop,
    make_objective,
    run_trials,
    setup_study,
    stopped,
    thread_policy,
    threads_per_trial,
    worker_attrs,
)
from tlsearch.threads import ThreadPolicy, thread_scope

__all__ = [
    "WorkerExit",
    "claim_gpu",
    "join_study",
    "plan_devices",
    "run_worker",
    "run_workers",
    "shared_checkpoint",
    "worker_main",
]

_log = logging.getLogger(__name__)


def shared_checkpoint(
    cfg: StudyConfig,
    task: TransferTask,
    recorded: Mapping[str, str],
    device: torch.device,
    *,
    source: Mapping[str, Any] | None = None,
    copy: Path | None = None,
    storage: StudyStorage | None = None,
) -> Checkpoint:
    """The study's checkpoint on this host, verified against its recorded SHA-256.

    ``copy`` (``worker --checkpoint``): this host's copy of the user's source checkpoint, for a
    study started from one; otherwise a copy of the study's pretrained checkpoint file.
    ``source`` is the study's :data:`~tlsearch.storage.ATTR_SOURCE` record; ``storage`` the
    study's, whose copy of the checkpoint is taken before anything is pretrained or fitted
    again (the module docstring gives the order).
    """
    path, sha, key = Path(recorded["path"]), recorded["sha256"], recorded["key"]
    user = (source or {}).get("checkpoint")
    if copy is not None and cfg.pretrain.checkpoint is None:
        return _pretrained_copy(copy, path, sha, key)
    if copy is not None:  # the user's file, as this host has it: checked, then fitted
        return _fit_users_file(cfg, task, copy, user, path, sha)
    if path.is_file() and sha256_file(path) == sha:
        return Checkpoint(path, sha, key)
    cached = cached_checkpoint(cfg, key)
    if cached is not None and cached.sha256 == sha:
        return cached
    kept = fetch_checkpoint(storage, sha) if storage is not None else None
    if kept is not None:
        _log.info("checkpoint %s not on this host; using the study's copy in its database", path)
        return cache_copy(cfg, key, kept, "the study's database")
    # A study made before the database kept a copy, or one too large to keep.
    if cfg.pretrain.checkpoint is not None:
        return _fit_users_file(cfg, task, None, user, path, sha)
    return _pretrain_here(cfg, task, device, path, sha, key)


def _pretrained_copy(copy: Path, path: Path, sha: str, key: str) -> Checkpoint:
    if not copy.is_file():
        raise ConfigError(f"--checkpoint: file not found: {copy}")
    actual = sha256_file(copy)
    if actual != sha:
        raise ConfigError(
            f"--checkpoint: {copy} has SHA-256 {actual[:12]}…, the study's checkpoint "
            f"{path.name} has {sha[:12]}…"
        )
    return Checkpoint(copy, sha, key)


def _fit_users_file(
    cfg: StudyConfig,
    task: TransferTask,
    copy: Path | None,
    user: Mapping[str, Any] | None,
    path: Path,
    sha: str,
) -> Checkpoint:
    src = copy or cfg.pretrain.checkpoint
    assert src is not None
    field = "--checkpoint" if copy is not None else "pretrain.checkpoint"
    if not src.is_file():
        raise ConfigError(
            f"{field}: the study's source checkpoint {src} is not on this host; give this "
            "host's copy with `tlsearch worker --checkpoint PATH`"
        )
    ckpt, _ = user_checkpoint(cfg, task, copy, expected=user)
    if ckpt.sha256 != sha:
        raise CheckpointError(
            f"{field}: fitting {src} to the model on this host gave SHA-256 "
            f"{ckpt.sha256[:12]}…, the study used {sha[:12]}…; copy {path.name} from the "
            f"host that created the study and pass it with --checkpoint"
        )
    return ckpt


def _pretrain_here(
    cfg: StudyConfig, task: TransferTask, device: torch.device, path: Path, sha: str, key: str
) -> Checkpoint:
    own_key = checkpoint_key(cfg, task)
    if own_key != key:
        raise CheckpointError(
            f"the study's checkpoint has key {key}, but this host's data and config give "
            f"{own_key} (another tlsearch version, or different data files?)"
        )
    _log.info("pretrained checkpoint %s not on this host; pretraining it here", path)
    ckpt = ensure_pretrained(cfg, task, device)
    if ckpt.sha256 != sha:
        raise CheckpointError(
            f"pretraining on this host gave a checkpoint with SHA-256 {ckpt.sha256[:12]}…, the "
            f"study used {sha[:12]}…; copy {path.name} and {path.with_suffix('.json').name} from "
            f"the host that created the study into {ckpt.path.parent} (or pass it with "
            "--checkpoint), or put pretrain.cache_dir on a filesystem every worker sees"
        )
    return ckpt


def join_study(
    storage_url: str,
    study_name: str,
    *,
    device: str | None = None,
    cache_dir: Path | None = None,
    checkpoint: Path | None = None,
) -> tuple[optuna.Study, StudyStorage, StudyContext]:
    """Open an existing study as one of its workers; config, heartbeats, checkpoint from storage.

    Args:
        device: overrides the study's ``finetune.device`` for this worker.
        cache_dir: overrides the study's ``pretrain.cache_dir`` on this host.
        checkpoint: this host's copy of the study's source checkpoint (see
            :func:`shared_checkpoint`).
    """
    study, storage, cfg = _worker_study(storage_url, study_name, cache_dir)
    recorded = study.user_attrs.get(ATTR_CHECKPOINT)
    if not recorded:
        raise StorageError(
            f"study '{study_name}' has no pretrained checkpoint recorded; "
            "run `tlsearch create` with its config first"
        )
    source = study.user_attrs.get(ATTR_SOURCE) or {}
    check_model_origin(cfg, source)
    if checkpoint is not None and not checkpoint.is_file():
        raise ConfigError(f"--checkpoint: file not found: {checkpoint}")
    storage.enable_heartbeat(Heartbeat.from_dict(study.user_attrs.get(ATTR_HEARTBEAT)))
    dev = _worker_device(cfg, device)
    task = load_task(cfg.data, cache_dir=study_cache_dir(cfg))
    check_folds(cfg, task.target_train)
    ckpt = shared_checkpoint(
        cfg, task, recorded, dev, source=source, copy=checkpoint, storage=storage
    )
    return study, storage, StudyContext(cfg, task, ckpt, dev, source or None)


def _worker_study(
    storage_url: str, study_name: str, cache_dir: Path | None
) -> tuple[optuna.Study, StudyStorage, StudyConfig]:
    """The study with the sampler and pruner of its stored config, and that config as this host
    runs it (this URL, and ``cache_dir`` when given)."""
    storage = existing_storage(storage_url, study_name)
    cfg = load_study_config(load_study(storage, storage_url, study_name))
    updates: dict[str, Any] = {"storage": storage_url}
    if cache_dir is not None:
        updates["pretrain"] = cfg.pretrain.model_copy(update={"cache_dir": cache_dir})
    cfg = cfg.model_copy(update=updates)
    study = load_study(
        storage,
        storage_url,
        study_name,
        sampler=make_sampler(cfg, parallel=True),
        pruner=make_pruner(cfg),
    )
    return study, storage, cfg


def _worker_device(cfg: StudyConfig, device: str | None) -> torch.device:
    """This worker's device: ``device``, else the study's ``finetune.device``; ``auto`` on a host
    with several GPUs claims the one the fewest other workers of the host hold."""
    spec = device or cfg.finetune.device
    if spec == "auto" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        spec = f"cuda:{claim_gpu(lock_dir(cfg))}"
    dev = resolve_device(spec)
    if dev.type == "cuda" and dev.index is not None:
        # Stray allocations (cuDNN workspaces, a bare .cuda()) go to this worker's GPU too.
        torch.cuda.set_device(dev.index)
    return dev


def run_worker(
    storage_url: str,
    study_name: str,
    *,
    device: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    threads: int | None = None,
    cache_dir: Path | None = None,
    checkpoint: Path | None = None,
    progress: bool = False,
    prefix: str = "",
    stop: StopFlag | None = None,
) -> int:
    """Run trials of an existing study until its budget is finished; return how many ran here.

    Args:
        n_trials: at most this many trials in this worker (the study's budget still holds).
        timeout: start no trial after this many seconds (default: the study's ``timeout``).
        threads: torch CPU threads (default: the study's ``finetune.threads``, else
            ``OMP_NUM_THREADS``, else the cores shared among this study's workers on this host
            less those other work keeps busy, checked before each trial and between epochs:
            :func:`tlsearch.study.thread_policy`).
        prefix: put in front of each progress line, to tell workers apart in one terminal.
        stop: from :func:`graceful_stop`; a signal then ends the loop cleanly.
    """
    # Until the study's config is read: pretraining on this host shares the cores as trials do.
    with thread_scope(ThreadPolicy(threads)):
        study, storage, ctx = join_study(
            storage_url, study_name, device=device, cache_dir=cache_dir, checkpoint=checkpoint
        )
    who = worker_attrs(ctx.device)["worker"]
    _log.info(
        "worker %s joined study '%s' in %s on %s",
        who,
        study_name,
        mask_url(storage_url),
        ctx.device,
    )
    policy = thread_policy(ctx.cfg, study_name, threads, who)
    with thread_scope(policy):
        return run_trials(
            study,
            storage,
            threads_per_trial(make_objective(ctx), policy),
            n_trials=ctx.cfg.n_trials,
            max_trials=n_trials,
            timeout=timeout if timeout is not None else ctx.cfg.timeout,
            callbacks=[ProgressPrinter(ctx.cfg.n_trials, prefix=prefix)] if progress else [],
            stop=stop,
            attrs=worker_attrs(ctx.device),
            confirm=lambda s: queue_confirmation(s, ctx.cfg),
        )


def plan_devices(n_workers: int, gpus: Sequence[int] | None, device: str | None) -> list[str]:
    """The device of each worker: ``--gpus`` round-robin, else ``device`` (``auto``: every visible
    GPU round-robin, or the CPU when there is none)."""
    if n_workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {n_workers}")
    if gpus:
        visible = torch.cuda.device_count()
        for g in gpus:
            if g < 0 or g >= visible:
                raise ConfigError(
                    f"--gpus: GPU {g} asked for, but {visible} CUDA device(s) are visible"
                )
        return [f"cuda:{gpus[i % len(gpus)]}" for i in range(n_workers)]
    if device in (None, "auto"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count:
            return [f"cuda:{i % count}" for i in range(n_workers)]
        return ["cpu"] * n_workers
    return [device] * n_workers


@dataclass(frozen=True)
class WorkerExit:
    """How one worker process ended."""

    index: int
    device: str
    exitcode: int

    def failed(self, signum: int | None) -> bool:
        """Whether it ended badly: any exit but 0, except the 130 of a SIGINT passed on to it
        (``signum``: the signal that stopped the run, None if none did)."""
        return self.exitcode != 0 and not (signum and self.exitcode == 130)

    def describe(self) -> str:
        who = f"worker {self.index} ({self.device})"
        if self.exitcode < 0:
            return f"{who} was killed by {signal.Signals(-self.exitcode).name}"
        return f"{who} exited with code {self.exitcode}"


def worker_main(
    storage_url: str,
    study_name: str,
    *,
    plugins: Sequence[str] = (),
    **kwargs: Any,
) -> int:
    """``tlsearch worker``: run :func:`run_worker` with clean stops, and return the exit code.

    SIGINT and SIGTERM stop it cleanly (exit 130 and 0); a user's error is one line on stderr
    (exit 2 for config errors, 1 for others). ``plugins`` are loaded first (``--plugin``).
    """

    def work() -> int:
        load_plugins(plugins)
        quiet_optuna()
        with graceful_stop() as stop:
            try:
                ran = run_worker(storage_url, study_name, stop=stop, **kwargs)
            except KeyboardInterrupt:
                return stopped(stop.signum)
        if stop.signum is not None:
            return stopped(stop.signum)
        _log.info("worker done: %d trial(s) run here", ran)
        return 0

    return guarded(work)


def _worker_process(quiet: bool, prefix: str, kwargs: dict[str, Any]) -> None:
    # A spawned process starts bare: its logging, then the same code path as `tlsearch worker`.
    setup_logging(quiet, prefix)
    sys.exit(worker_main(**kwargs, prefix=prefix, progress=not quiet))


def run_workers(
    cfg: StudyConfig,
    n_workers: int,
    *,
    gpus: Sequence[int] | None = None,
    device: str | None = None,
    allow_config_change: bool = False,
    heartbeat: Mapping[str, int] | None = None,
    quiet: bool = False,
) -> tuple[optuna.Study, list[WorkerExit], int | None]:
    """Create (or resume) the study, pretrain once, then run it with ``n_workers`` processes.

    Each worker runs :func:`worker_main` (what ``tlsearch worker`` runs) in a spawned process,
    pinned to its device from :func:`plan_devices`, with ``finetune.threads`` torch threads (0:
    each worker's :func:`~tlsearch.study.thread_policy`). SIGINT and SIGTERM are passed on to the
    workers, which stop cleanly; this waits for all of them.

    Returns:
        The study, how each worker ended, and the signal that stopped the run (None if none did).
    """
    devices = plan_devices(n_workers, gpus, device)
    study, _storage, _ctx = setup_study(
        cfg, device=devices[0], allow_config_change=allow_config_change, heartbeat=heartbeat
    )
    procs = _worker_processes(cfg, devices, quiet)
    started = time.perf_counter()
    signum = _run_passing_signals(procs)
    _log.info("ran for %.1fs", time.perf_counter() - started)
    exits = [
        WorkerExit(i, d, int(p.exitcode))
        for i, (d, p) in enumerate(zip(devices, procs, strict=True))
    ]
    return study, exits, signum


def _worker_processes(
    cfg: StudyConfig, devices: Sequence[str], quiet: bool
) -> list[multiprocessing.process.BaseProcess]:
    """One spawned (not yet started) ``tlsearch worker`` process per device, named w0, w1, ..."""
    # With finetune.threads unset, each worker takes its share of the cores among this study's
    # workers on this host (those of this run, and any other `tlsearch worker` or `run` there),
    # less the cores other work keeps busy.
    threads = cfg.finetune.threads or None
    spawn = multiprocessing.get_context("spawn")
    procs = []
    for i, dev in enumerate(devices):
        kwargs = {
            "storage_url": cfg.storage,
            "study_name": cfg.name,
            "device": dev,
            "threads": threads,
            # The spawned process imports what this one was given on the command line.
            "plugins": list(loaded_plugins()),
        }
        procs.append(
            spawn.Process(
                target=_worker_process, args=(quiet, f"[w{i}] ", kwargs), name=f"tlsearch-w{i}"
            )
        )
    return procs


def _run_passing_signals(procs: Sequence[multiprocessing.process.BaseProcess]) -> int | None:
    """Start ``procs`` and wait for all of them, passing SIGINT and SIGTERM on to those still
    running (from the main thread only: Python handles signals there); the first signal received,
    or None."""
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        for p in procs:
            if p.pid is not None and p.exitcode is None:
                os.kill(p.pid, signum)

    in_main = threading.current_thread() is threading.main_thread()
    previous = (
        {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if in_main else {}
    )
    try:
        for p in procs:
            p.start()
        if received:  # a signal came while the workers were starting
            forward(received[0], None)
        for p in procs:
            p.join()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return received[0] if received else None
