"""Workers benchmark: trials per minute with 1 and 2 worker processes, and the storage's cost per
trial, for SQLite and PostgreSQL side by side in one run.

    python benchmarks/workers.py                   # PostgreSQL at 127.0.0.1:5432, user postgres
    python benchmarks/workers.py --pg-admin postgresql://user@host:5432/postgres --trials 60
    python benchmarks/workers.py --backends sqlite # no PostgreSQL server needed
    python benchmarks/workers.py --smoke           # SQLite, 2 workers, 4 trials of 5 epochs

For each backend and worker count it measures two things:

- **trials/min**: ``tlsearch run --workers N`` (spawned processes, one torch thread each) on a
  small real study, in steady state: each worker from the end of its first trial to the end of its
  last, summed over workers. Start-up (imports, data, the first trial's torch warm-up) is reported
  apart, as ``start s``: seconds until every worker had finished a trial.
- **storage ms/trial**: the same worker loop with an objective that does no training but the same
  storage traffic as a real trial (3 suggested parameters, one report per fold, the trial's user
  attributes, heartbeats, the budget check): wall time per trial and worker, from its start to the
  end of its last trial (not the heartbeat interval a worker done first then waits for the
  other's). That is the overhead the storage adds to every trial; with 2 workers it includes their
  contention for the database.

PostgreSQL runs in a temporary database that is dropped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import _smoke
import optuna
import torch

import tlsearch

FOLDS = 3
EPOCHS = 100
BACKENDS = ("sqlite", "postgresql")
# --smoke: heartbeats every second, so that a worker done before the other waits a second for the
# other's last trial, not tlsearch's 10 s interval.
SMOKE_HEARTBEAT = {"interval": 1, "grace_period": 10}


def study_config(
    storage: str, name: str, n_trials: int, cache: Path, epochs: int = EPOCHS
) -> tlsearch.StudyConfig:
    """A small real study: clean → noisy 8×8 digits, MLP 64-32, 3 folds of ``epochs`` epochs
    (default 100), 1 thread."""
    return tlsearch.config_from_dict(
        {
            "name": name,
            "storage": storage,
            "n_trials": n_trials,
            "data": {"task": "digits-noisy"},
            "model": {"name": "mlp", "hidden": [64, 32]},
            "pretrain": {"epochs": 3, "cache_dir": str(cache)},
            # One thread per worker either way, so 1 vs 2 workers compares processes, not threads.
            "finetune": {"epochs": epochs, "device": "cpu", "threads": 1},
            "search": {"frozen_blocks": {"low": 0, "high": 2}},
            "cv": {"k": FOLDS},
            "sampler": {"name": "tpe"},
            "pruner": {"name": "none"},
            # No confirmation round: the study runs exactly the trials asked for.
            "select": {"confirm": 0},
        }
    )


def trials_per_minute(
    cfg: tlsearch.StudyConfig, workers: int, heartbeat: dict[str, int]
) -> tuple[float, float]:
    """(steady trials/min of all workers together, seconds until every worker ran its first trial).

    Each worker's rate runs from the end of its first trial (which pays for torch's lazy imports)
    to the end of its last one; the study's rate is their sum. A worker that started after the
    others had run every trial (a budget too small to share) is said on stderr and left out.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    t0 = time.time()
    study, exits, _ = tlsearch.run_workers(
        cfg, workers, device="cpu", quiet=True, heartbeat=heartbeat
    )
    assert all(e.exitcode == 0 for e in exits), [e.describe() for e in exits]
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == cfg.n_trials, len(trials)
    ends: dict[str, list[float]] = {}
    for t in trials:
        ends.setdefault(t.user_attrs["worker"], []).append(t.datetime_complete.timestamp())
    if len(ends) < workers:
        print(f"    only {len(ends)} of {workers} workers ran trials", file=sys.stderr)
    rate = sum((len(e) - 1) / (max(e) - min(e)) * 60 for e in ends.values() if len(e) > 1)
    return rate, max(min(e) for e in ends.values()) - t0


def _null_objective(trial: optuna.Trial) -> float:
    # The storage calls of KFoldObjective, without the training.
    trial.suggest_float("lambda", 1e-4, 100.0, log=True)
    trial.suggest_float("lr", 1e-4, 3e-2, log=True)
    trial.suggest_int("frozen_blocks", 0, 2)
    scores = [0.5] * FOLDS
    for fold in range(FOLDS):
        trial.report(0.5, fold)
    for key, value in {
        "fold_scores": scores,
        "fold_losses": scores,
        "fold_seconds": scores,
        "seconds": 1.0,
        "cv_mean": 0.5,
        "cv_std": 0.0,
    }.items():
        trial.set_user_attr(key, value)
    return 0.5


def _null_worker(
    url: str, name: str, n_trials: int, heartbeat: dict[str, int], out: multiprocessing.Queue
) -> None:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = tlsearch.create_storage(url, tlsearch.Heartbeat(**heartbeat))
    study = optuna.load_study(study_name=name, storage=storage)
    # Imported before the clock starts (tlsearch imports on first use): a second or more of
    # imports is no storage cost.
    run_trials, attrs = tlsearch.run_trials, tlsearch.worker_attrs(torch.device("cpu"))
    t0 = time.time()
    ran = run_trials(study, storage, _null_objective, n_trials=n_trials, attrs=attrs)
    # Up to the end of this worker's last trial: one done before the other then waits a heartbeat
    # interval for the other's last trial (tlsearch's loop), which is no storage cost (with 10 s
    # and 50 trials each, it made 2 workers' 55 ms/trial read 600).
    ends = [
        t.datetime_complete.timestamp()
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("worker") == attrs["worker"] and t.datetime_complete is not None
    ]
    out.put((max(ends, default=t0) - t0) / max(ran, 1) * 1000)


def storage_ms_per_trial(
    url: str, workers: int, n_trials: int, heartbeat: dict[str, int]
) -> float:
    """Wall milliseconds per trial and worker of the storage-only loop, to each worker's last
    trial."""
    name = f"null-{workers}-{uuid.uuid4().hex[:6]}"
    optuna.create_study(
        study_name=name, storage=tlsearch.create_storage(url), direction="maximize"
    )
    spawn = multiprocessing.get_context("spawn")
    out = spawn.Queue()
    procs = [
        spawn.Process(target=_null_worker, args=(url, name, n_trials, heartbeat, out))
        for _ in range(workers)
    ]
    for p in procs:
        p.start()
    per_worker = [out.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return statistics.fmean(per_worker)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40, help="real trials per measurement")
    parser.add_argument(
        "--storage-trials", type=int, default=100, help="storage-only trials per measurement"
    )
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS), help="default: both"
    )
    parser.add_argument(
        "--pg-admin",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="libpq URL of a PostgreSQL database from which a temporary one can be created",
    )
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    # tlsearch's heartbeat; a worker whose last trial ends before another's sleeps an interval.
    counts, epochs, heartbeat = (1, 2), EPOCHS, {}
    if args.smoke:
        args.trials, args.storage_trials, args.backends = 4, 4, ["sqlite"]
        counts, epochs, heartbeat = (2,), 5, SMOKE_HEARTBEAT

    rows = []
    with _smoke.directory(args) as tmp, databases(args, tmp) as backends:
        # Pretrain the checkpoint once, outside every measurement.
        tlsearch.setup_study(
            study_config(f"sqlite:///{tmp / 'warmup.db'}", "warmup", 1, tmp / "cache", epochs),
            device="cpu",
        )
        for backend, url in backends.items():
            for workers in counts:
                cfg = study_config(url, f"real-{workers}", args.trials, tmp / "cache", epochs)
                rate, start = trials_per_minute(cfg, workers, heartbeat)
                ms = storage_ms_per_trial(url, workers, args.storage_trials, heartbeat)
                rows.append((backend, workers, args.trials, rate, start, ms))
                print(
                    f"  {backend} x{workers}: {rate:.0f} trials/min, {ms:.1f} ms", file=sys.stderr
                )

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"\nworkers benchmark: {cores} CPU cores (load average {load}), digits-noisy MLP 64-32, "
        f"{FOLDS}-fold CV, {epochs} epochs, 1 thread per worker; storage-only loop "
        f"{args.storage_trials} trials"
    )
    header = ("backend", "workers", "trials", "trials/min", "start s", "storage ms/trial")
    print("  ".join(f"{h:>16}" for h in header))
    for backend, workers, n, rate, start, ms in rows:
        cells = (backend, workers, n, f"{rate:.1f}", f"{start:.1f}", f"{ms:.1f}")
        print("  ".join(f"{c:>16}" for c in cells))
    for backend in args.backends:
        rates = {r[1]: r[3] for r in rows if r[0] == backend}
        if {1, 2} <= set(rates):
            print(
                f"{backend}: 2 workers run {rates[2] / rates[1]:.2f}x the trials per minute of 1"
            )
    return 0


@contextlib.contextmanager
def databases(args: argparse.Namespace, tmp: Path) -> Iterator[dict[str, str]]:
    """Each of ``args.backends``' URL: a SQLite file in ``tmp``, a temporary PostgreSQL database
    (dropped on leaving)."""
    urls = {"sqlite": f"sqlite:///{tmp / 'bench.db'}"} if "sqlite" in args.backends else {}
    if "postgresql" not in args.backends:
        yield urls
        return
    # Imported here: a run on SQLite alone (and every worker process) needs no PostgreSQL client.
    import psycopg
    from psycopg import sql

    pg_db = f"tlsearch_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.pg_admin, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(pg_db)))
    server = args.pg_admin.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        yield {**urls, "postgresql": f"postgresql+psycopg://{server}/{pg_db}"}
    finally:
        # A new connection: the server may have been restarted meanwhile.
        with psycopg.connect(args.pg_admin, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(pg_db)))


if __name__ == "__main__":
    sys.exit(main())
