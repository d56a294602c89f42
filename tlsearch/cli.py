"""``tlsearch`` command line: a thin layer over the library API.

Each subcommand parses its flags, calls one library function and returns an exit code. A
:class:`~tlsearch.errors.TlsearchError` or a database error becomes one line on stderr (exit 2 for
config and usage errors). In ``run`` and ``worker``, SIGINT (Ctrl-C) and SIGTERM fail the running
trial, queue it again and stop with every finished trial kept: exit 130 after SIGINT, 0 after
SIGTERM (a clean stop a scheduler asked for).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tlsearch._version import __version__
from tlsearch.errors import TlsearchError
from tlsearch.logs import guarded, quiet_optuna, setup_logging
from tlsearch.registry import PLUGINS_ENV, SELECTION_RULES, load_plugins

_log = logging.getLogger("tlsearch")


def _add_storage_flags(
    p: argparse.ArgumentParser, storage_default: str | None, name_default: str | None
) -> None:
    """``--storage`` and ``--study-name``, each with the help's ``(default: ...)``; None: required."""
    p.add_argument(
        "--storage",
        required=storage_default is None,
        help="database URL of the study, e.g. sqlite:///tlsearch.db or "
        "postgresql+psycopg://user@host/db (password from the URL or $TLSEARCH_DB_PASSWORD)"
        + (f"; default: {storage_default}" if storage_default else ""),
    )
    p.add_argument(
        "--study-name",
        required=name_default is None,
        help="name of the study in the storage"
        + (f" (default: {name_default})" if name_default else ""),
    )


def _add_reader_flags(p: argparse.ArgumentParser) -> None:
    """Where the commands that read an existing study (export, status, report) find it."""
    p.add_argument(
        "config",
        nargs="?",
        type=Path,
        help="the study file `tlsearch run` was given: its storage and study name are read "
        "(omitted: --storage, else the only study in ./tlsearch.db)",
    )
    _add_storage_flags(
        p,
        "the study file's storage; without one, sqlite:///tlsearch.db",
        "the study file's name, else the storage's only study",
    )


def _at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def _positive(text: str) -> int:
    return _at_least(text, 1)


def _seconds(text: str) -> float:
    from tlsearch.config import parse_duration

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _non_negative(text: str) -> int:
    return _at_least(text, 0)


def _gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(g) for g in text.split(",") if g.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected GPU numbers like 0,1,2, got '{text}'"
        ) from None
    if not gpus:
        raise argparse.ArgumentTypeError("name at least one GPU")
    return gpus


def _add_study_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the commands that create or resume a study from a config file."""
    p.add_argument(
        "config", nargs="?", type=Path, help="study file (TOML); omitted: the built-in defaults"
    )
    _add_storage_flags(
        p,
        "the study file's storage (sqlite:///tlsearch.db unless it names another)",
        "the study file's name",
    )
    # Checked here, so that a bad flag is reported as the flag, not as the study file.
    p.add_argument(
        "--n-trials", type=_positive, help="total trials in the study (finished ones count)"
    )
    p.add_argument(
        "--timeout", type=_seconds, help="start no trial after this long: seconds, or 90s, 10m, 2h"
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: finetune.device)")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a study even though its search config differs from this one",
    )
    g = p.add_argument_group(
        "dead workers", "stored with the study, so every worker uses the same values"
    )
    g.add_argument(
        "--heartbeat-interval",
        type=_positive,
        metavar="S",
        help="seconds between heartbeats of a running trial (default 10)",
    )
    g.add_argument(
        "--grace-period",
        type=_positive,
        metavar="S",
        help="seconds without a heartbeat before a trial is failed and queued again (default 60)",
    )
    g.add_argument(
        "--max-retry",
        type=_non_negative,
        metavar="N",
        help="times one trial is queued again after its worker died or stopped (default 3)",
    )


def _add_threads_flag(p: argparse.ArgumentParser, per: str) -> None:
    p.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help=f"torch CPU threads {per}(default: finetune.threads, else $OMP_NUM_THREADS, else this "
        "host's cores shared among the study's workers here, less those other work keeps busy, "
        "checked before each trial and between epochs)",
    )


def _heartbeat(args: argparse.Namespace) -> dict[str, int]:
    given = {
        "interval": args.heartbeat_interval,
        "grace_period": args.grace_period,
        "max_retry": args.max_retry,
    }
    return {k: v for k, v in given.items() if v is not None}


def _add_plugin_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (a dotted name, from the current directory too, or a .py path) to "
        f"register its models, regularizers or tasks; repeatable; also ${PLUGINS_ENV}",
    )


def _load_config(args: argparse.Namespace):  # noqa: ANN202 - StudyConfig, imported lazily
    from tlsearch.config import load_config

    load_plugins(args.plugin)
    cfg = load_config(
        args.config,
        storage=args.storage,
        name=args.study_name,
        n_trials=args.n_trials,
        timeout=args.timeout,
    )
    quiet_optuna()
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_config(args)  # first: a study file's mistake is one line before torch loads
    from tlsearch.storage import mask_url, open_study
    from tlsearch.study import graceful_stop, run_study, stopped, summary_table
    from tlsearch.workers import run_workers

    if args.threads:
        cfg = cfg.model_copy(
            update={"finetune": cfg.finetune.model_copy(update={"threads": args.threads})}
        )
    _log.info(
        "study '%s' in %s: %s trials, %d-fold CV, sampler %s, pruner %s%s",
        cfg.name,
        mask_url(cfg.storage),
        cfg.n_trials if cfg.n_trials is not None else "∞",
        cfg.cv.k,
        cfg.sampler.name,
        cfg.pruner.name,
        f", {args.workers} workers" if args.workers > 1 else "",
    )
    if args.workers > 1:
        study, exits, signum = run_workers(
            cfg,
            args.workers,
            gpus=args.gpus,
            device=args.device,
            allow_config_change=args.allow_config_change,
            heartbeat=_heartbeat(args),
            quiet=args.quiet,
        )
        print(summary_table(study))
        failed = [e for e in exits if e.failed(signum)]
        for e in failed:
            print(f"tlsearch: error: {e.describe()}", file=sys.stderr)
        if signum is not None:
            return stopped(signum)
        return 1 if failed else 0

    device = f"cuda:{args.gpus[0]}" if args.gpus else args.device
    with graceful_stop() as stop:
        try:
            study = run_study(
                cfg,
                device=device,
                allow_config_change=args.allow_config_change,
                progress=not args.quiet,
                heartbeat=_heartbeat(args),
                stop=stop,
            )
        except KeyboardInterrupt:
            code = stopped(stop.signum)
            # Stopped before the study existed (e.g. while pretraining): nothing to summarise;
            # open_study reports a missing SQLite file rather than creating it.
            try:
                print(summary_table(open_study(cfg.storage, cfg.name)))
            except TlsearchError:
                pass
            return code
    print(summary_table(study))
    return stopped(stop.signum) if stop.signum is not None else 0


def cmd_create(args: argparse.Namespace) -> int:
    cfg = _load_config(args)  # first: a study file's mistake is one line before torch loads
    from tlsearch.storage import count_budget, mask_url, without_password
    from tlsearch.study import setup_study

    study, _storage, ctx = setup_study(
        cfg,
        device=args.device,
        allow_config_change=args.allow_config_change,
        heartbeat=_heartbeat(args),
    )
    _log.info(
        "study '%s' ready in %s: %d of %s trials finished, checkpoint %s",
        cfg.name,
        mask_url(cfg.storage),
        count_budget(study),
        cfg.n_trials if cfg.n_trials is not None else "∞",
        ctx.checkpoint.path,
    )
    # What to run on each worker host; a password is never printed, the worker reads it from
    # $TLSEARCH_DB_PASSWORD (or libpq's PGPASSWORD, ~/.pgpass).
    print(f"tlsearch worker --storage '{without_password(cfg.storage)}' --study-name '{cfg.name}'")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from tlsearch.workers import worker_main

    return worker_main(
        args.storage,
        args.study_name,
        plugins=args.plugin,
        device=args.device,
        n_trials=args.max_trials,
        timeout=args.timeout,
        threads=args.threads,
        cache_dir=args.cache_dir,
        checkpoint=args.checkpoint,
        progress=not args.quiet,
    )


def cmd_export(args: argparse.Namespace) -> int:
    quiet_optuna()
    from tlsearch.export import write_export, write_trials
    from tlsearch.storage import find_study

    study, _url = find_study(args.config, args.storage, args.study_name)
    if args.trials is not None:
        df = write_trials(study, args.trials)
        _log.info("%d trials written to %s", len(df), args.trials)
    data = write_export(study, args.output, args.select)
    sel = data["selection"]
    se = data["cv_se"]
    _log.info(
        "exported trial %d (CV accuracy %.4f%s; rule %s) to %s",
        data["trial_number"],
        data["cv_mean"],
        f" ± {se:.4f} SE" if se is not None else "",
        sel["rule"],
        args.output,
    )
    _log.info("%s", sel["reason"])
    return 0


def cmd_final(args: argparse.Namespace) -> int:
    load_plugins(args.plugin)
    quiet_optuna()
    from tlsearch.export import final_paths
    from tlsearch.final import format_final, run_final

    data = run_final(args.best, args.device, args.seeds)
    for line in format_final(data):
        print(line)
    _log.info("metrics: %s, weights: %s", *final_paths(args.best))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    quiet_optuna()
    from tlsearch.status import study_status

    print(study_status(args.storage, args.study_name, study_file=args.config))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    load_plugins(args.plugin)
    quiet_optuna()
    from tlsearch.report import write_report
    from tlsearch.storage import find_study

    study, _url = find_study(args.config, args.storage, args.study_name)
    path = write_report(study, args.output, args.final)
    print(path)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    quiet_optuna()
    from tlsearch.dashboard import DashboardServer

    server = DashboardServer(args.storage, args.host, args.port)
    print(f"optuna-dashboard for {server.storage_label} at {server.url} (Ctrl-C to stop)")
    for name, url in server.study_urls().items():
        print(f"  study '{name}': {url}")
    sys.stdout.flush()
    server.serve_forever()
    return 0


def _run_command(sub: Any, common: argparse.ArgumentParser) -> None:
    run = sub.add_parser(
        "run",
        parents=[common],
        help="run or resume a study from a config file",
        description="Run a study until its trial budget is used, then its confirmation round "
        "(select.confirm); rerunning resumes it. Flags override the config file. With "
        "--workers N, N worker processes share the study.",
    )
    _add_study_flags(run)
    run.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="worker processes on this host (default 1: run in this process)",
    )
    run.add_argument(
        "--gpus",
        type=_gpu_list,
        metavar="0,1,...",
        help="GPUs the workers are pinned to, round-robin (default: every visible GPU, else CPU)",
    )
    _add_threads_flag(run, "per worker ")
    _add_plugin_flag(run)
    run.set_defaults(func=cmd_run)


def _create_command(sub: Any, common: argparse.ArgumentParser) -> None:
    create = sub.add_parser(
        "create",
        parents=[common],
        help="create or resume a study and pretrain its checkpoint, for workers to join",
        description="Create (or resume) the study, pretrain the source checkpoint and record both "
        "in the storage, then exit; `tlsearch worker` processes on any host then run its trials.",
    )
    _add_study_flags(create)
    _add_plugin_flag(create)
    create.set_defaults(func=cmd_create)


def _worker_command(sub: Any, common: argparse.ArgumentParser) -> None:
    worker = sub.add_parser(
        "worker",
        parents=[common],
        help="join an existing study and run its trials until its budget is used",
        description="Run trials of a study created by `create` or `run`, reading its config, "
        "heartbeat settings and pretrained checkpoint from the storage; any number of workers, "
        "on any host, share the study's budget exactly. SIGINT/SIGTERM stop it cleanly.",
    )
    _add_storage_flags(worker, None, None)
    worker.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: finetune.device)")
    worker.add_argument(
        "--max-trials",
        "--n-trials",
        dest="max_trials",
        type=_positive,
        metavar="N",
        help="at most N trials in this worker (the study's n_trials still holds for all workers; "
        "--n-trials is the old spelling)",
    )
    worker.add_argument(
        "--timeout", type=_seconds, help="start no trial after this long: seconds, or 90s, 10m, 2h"
    )
    _add_threads_flag(worker, "")
    worker.add_argument(
        "--cache-dir",
        type=Path,
        help="pretrained checkpoint cache on this host (default: the study's pretrain.cache_dir)",
    )
    worker.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="this host's copy of the study's source checkpoint: the user's pretrain.checkpoint "
        "file, or the study's pretrained checkpoint (checked against the SHA-256 the study "
        "recorded)",
    )
    _add_plugin_flag(worker)
    worker.set_defaults(func=cmd_worker)


def _export_command(sub: Any, common: argparse.ArgumentParser) -> None:
    export = sub.add_parser(
        "export",
        parents=[common],
        help="write the trial the study's selection rule picks as JSON, for `tlsearch final`",
        description="Write the trial the study's selection rule picks (select.rule, or --select; "
        "the default, confirm: the search's top configuration and plain fine-tuning trained "
        "again on fresh folds, the better one on those; without that round, the search's best) "
        "with its params, CV scores, resolved config, checkpoint hash and versions, as JSON "
        "that `tlsearch final` reads. The choice and its reason are stored with the study.",
    )
    _add_reader_flags(export)
    export.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("best.json"),
        help="output file (default: best.json)",
    )
    export.add_argument(
        "--select",
        choices=SELECTION_RULES.names(),
        default=None,
        metavar="RULE",
        help="which trial to export: a selection rule (default: the study's select.rule); one of "
        f"{', '.join(SELECTION_RULES.names())} (docs/selection.md)",
    )
    export.add_argument(
        "--trials",
        type=Path,
        metavar="FILE",
        help="also write every trial as a table, CSV (.csv) or Parquet (.parquet), with the fold "
        "scores as columns fold_0 ... fold_{k-1}",
    )
    export.set_defaults(func=cmd_export)


def _final_command(sub: Any, common: argparse.ArgumentParser) -> None:
    final = sub.add_parser(
        "final",
        parents=[common],
        help="retrain with an exported config and measure the held-out test once",
        description="Retrain on the whole target training split with the exported config, beside "
        "plain fine-tuning and training from scratch, and score all three on the held-out "
        "target test split: each accuracy with a 95 % interval, the paired differences with "
        "McNemar's test, and whether the search and transfer paid beyond the noise. Writes "
        "BEST.final.json and BEST.final.pt (the tuned model of seed 0) next to BEST.json.",
    )
    final.add_argument("best", type=Path, help="JSON written by `tlsearch export`")
    final.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    final.add_argument(
        "--seeds",
        type=_positive,
        default=1,
        metavar="N",
        help="train each model on seeds 0 ... N-1 and report the mean and each seed's "
        "(default: 1)",
    )
    _add_plugin_flag(final)
    final.set_defaults(func=cmd_final)


def _status_command(sub: Any, common: argparse.ArgumentParser) -> None:
    status = sub.add_parser(
        "status",
        parents=[common],
        help="show a study's trials by state, best trial, running trials and ETA",
        description="Print the study's trials by state and the budget used, the confirmation "
        "round's progress, the search's best trial and the baselines, what the last export "
        "selected and why, the running trials with their start and last heartbeat, and an ETA "
        "from the trial budget and the mean trial duration.",
    )
    _add_reader_flags(status)
    status.set_defaults(func=cmd_status)


def _report_command(sub: Any, common: argparse.ArgumentParser) -> None:
    report = sub.add_parser(
        "report",
        parents=[common],
        help="write an HTML report with figures (CV score vs λ and more)",
        description="Write DIR/report.html, self-contained, and its figures as PNG files: CV "
        "accuracy vs λ, learning curves, optimization history, parameter importances, accuracy "
        "vs frozen depth, lr vs λ, and with --final the held-out test comparison of `tlsearch "
        "final`.",
    )
    _add_reader_flags(report)
    report.add_argument(
        "-o", "--output", type=Path, default=Path("report"), help="directory (default: report)"
    )
    report.add_argument(
        "--final", type=Path, metavar="BEST.final.json", help="written by `tlsearch final`"
    )
    _add_plugin_flag(report)
    report.set_defaults(func=cmd_report)


def _dashboard_command(sub: Any, common: argparse.ArgumentParser) -> None:
    dashboard = sub.add_parser(
        "dashboard",
        parents=[common],
        help="serve optuna-dashboard for a storage on this machine",
        description="Serve optuna-dashboard for every study in the storage until Ctrl-C. It has "
        "no login: it listens on 127.0.0.1 unless --host widens it.",
    )
    dashboard.add_argument("--storage", required=True, help="database URL of the studies")
    dashboard.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    dashboard.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)",
    )
    dashboard.set_defaults(func=cmd_dashboard)


# Every subcommand, in the order `tlsearch --help` lists them: each adds its parser and flags.
_COMMANDS = (
    _run_command,
    _create_command,
    _worker_command,
    _export_command,
    _final_command,
    _status_command,
    _report_command,
    _dashboard_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsearch",
        description="Cross-validated search for the regularization strength (λ), learning "
        "rates and frozen depth of transfer learning, on Optuna.",
    )
    parser.add_argument("--version", action="version", version=f"tlsearch {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    # -q after the subcommand too ("tlsearch run -q ..."); SUPPRESS keeps the one given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.quiet)
    return guarded(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
