"""``tlsearch`` command line: a thin layer over the library API.

Each subcommand parses its flags, calls one library function and returns an exit code. A
:class:`~tlsearch.errors.TlsearchError` becomes one line on stderr (exit 2 for config and usage errors);
Ctrl-C ends a run with every finished trial kept (exit 130).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna

from tlsearch import __version__

_log = logging.getLogger("tlsearch")


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("tlsearch")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False
    # tlsearch prints its own progress line per trial; Optuna's would repeat it.
    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _add_storage_flags(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--storage",
        required=required,
        help="database URL of the study, e.g. sqlite:///tlsearch.db or "
        "postgresql+psycopg://user@host/db (password from the URL or $TLSEARCH_DB_PASSWORD)",
    )
    p.add_argument("--study-name", required=required, help="name of the study in the storage")


def cmd_run(args: argparse.Namespace) -> int:
    from tlsearch.config import load_config
    from tlsearch.storage import mask_url
    from tlsearch.study import run_study, summary_table

    cfg = load_config(
        args.config,
        storage=args.storage,
        name=args.study_name,
        n_trials=args.n_trials,
        timeout=args.timeout,
    )
    _log.info(
        "study '%s' in %s: %s trials, %d-fold CV, sampler %s, pruner %s",
        cfg.name,
        mask_url(cfg.storage),
        cfg.n_trials if cfg.n_trials is not None else "∞",
        cfg.cv.k,
        cfg.sampler.name,
        cfg.pruner.name,
    )
    try:
        study = run_study(
            cfg,
            device=args.device,
            allow_config_change=args.allow_config_change,
            progress=not args.quiet,
        )
    except KeyboardInterrupt:
        from tlsearch.study import open_study

        print("interrupted: finished trials are kept; run the same command to resume", file=sys.stderr)
        print(summary_table(open_study(cfg.storage, cfg.name)))
        return 130
    print(summary_table(study))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tlsearch.export import write_export
    from tlsearch.study import open_study

    data = write_export(open_study(args.storage, args.study_name), args.output)
    _log.info(
        "best trial %d (cv %.4f ± %.4f) written to %s",
        data["trial_number"],
        data["cv_mean"],
        data["cv_std"] or 0.0,
        args.output,
    )
    return 0


def cmd_final(args: argparse.Namespace) -> int:
    from tlsearch.export import read_export
    from tlsearch.final import evaluate_on_test, save_outcomes
    from tlsearch.study import prepare

    best = read_export(args.best)
    ctx = prepare(best.config, args.device)
    expected = (best.data.get("checkpoint") or {}).get("sha256")
    if expected and expected != ctx.checkpoint.sha256:
        _log.warning("the pretrained checkpoint was rebuilt and differs from the one the search used")
    outcomes = evaluate_on_test(best.config, ctx.task, ctx.checkpoint, best.params, ctx.device)
    stem = args.best.with_suffix("")
    json_path = Path(f"{stem}.final.json")
    weights_path = Path(f"{stem}.final.pt")
    data = save_outcomes(
        outcomes,
        json_path,
        weights_path,
        {"study_name": best.data.get("study_name"), "cv_mean": best.data.get("cv_mean")},
    )
    for name in ("tuned", "default_lambda", "scratch"):
        print(f"{name:>15}: test accuracy {data[name]['test_accuracy']:.4f}  loss {data[name]['test_loss']:.4f}")
    _log.info("metrics: %s, weights: %s", json_path, weights_path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tlsearch",
        description="Cross-validated search for the regularization strength (λ), learning rate and "
        "frozen depth of transfer learning, on Optuna.",
    )
    parser.add_argument("--version", action="version", version=f"tlsearch {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run or resume a study from a config file",
        description="Run a study until its trial budget is used; rerunning resumes it. Flags "
        "override the config file.",
    )
    run.add_argument(
        "config", nargs="?", type=Path, help="study file (TOML); omitted: the built-in defaults"
    )
    _add_storage_flags(run, required=False)
    run.add_argument("--n-trials", type=int, help="total trials in the study (finished ones count)")
    run.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: finetune.device)")
    run.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume a study even though its search config differs from this one",
    )
    run.set_defaults(func=cmd_run)

    export = sub.add_parser(
        "export",
        help="write the best trial's config as JSON",
        description="Write the best trial (params, CV scores, resolved config, checkpoint hash, "
        "versions) as JSON that `tlsearch final` reads.",
    )
    _add_storage_flags(export, required=True)
    export.add_argument("-o", "--output", type=Path, default=Path("best.json"), help="output file")
    export.set_defaults(func=cmd_export)

    final = sub.add_parser(
        "final",
        help="retrain with an exported config and measure the held-out test once",
        description="Retrain on the whole target training split with the exported config, beside "
        "training from scratch and default-λ fine-tuning, and score all three on the held-out "
        "target test split. Writes BEST.final.json and BEST.final.pt next to BEST.json.",
    )
    final.add_argument("best", type=Path, help="JSON written by `tlsearch export`")
    final.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    final.set_defaults(func=cmd_final)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from tlsearch.errors import TlsearchError

    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet)
    try:
        return args.func(args)
    except TlsearchError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"tlsearch: error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
