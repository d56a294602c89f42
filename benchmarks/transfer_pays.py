"""Does the search pay on the default task? Held-out test accuracy over several target-split seeds.

For each seed of the target split (which images are the few labelled ones, and the noise), run the
default study (studies/digits.toml) to its budget (its confirmation round included), export what
its rule selects and run ``tlsearch final``
on it (:func:`tlsearch.run_final`): retrain with the selected config on the whole target training
split and score it once on the held-out test split, beside training from scratch and plain
fine-tuning (the study's two baseline trials' settings). Prints a table.

    python benchmarks/transfer_pays.py [--seeds 0 1 2] [--n-trials 30] [--config studies/digits.toml]
    python benchmarks/transfer_pays.py --smoke   # the smoke study (benchmarks/_smoke.py), seed 0
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import _smoke
import optuna

import tlsearch

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "studies" / "digits.toml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-trials", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: tlsearch's choice)"
    )
    parser.add_argument(
        "--select",
        choices=list(tlsearch.SELECTION_RULES.names()),
        default=None,
        help="export's rule (default: the study's select.rule)",
    )
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if args.smoke:
        args.seeds = [0]
    rows = []
    with _smoke.directory(args) as tmp:
        for seed in args.seeds:
            overrides = {
                "storage": f"sqlite:///{tmp}/bench.db",
                "name": f"seed{seed}",
                "n_trials": args.n_trials,
            }
            if args.smoke:
                base = tlsearch.config_from_dict(_smoke.study(tmp / "cache", **overrides))
            else:
                base = tlsearch.load_config(args.config, **overrides)
            cfg = base.model_copy(
                update={
                    "data": base.data.model_copy(update={"seed": seed}),
                    "finetune": base.finetune.model_copy(update={"threads": args.threads}),
                }
            )
            t0 = time.perf_counter()
            study = tlsearch.run_study(cfg)
            search_s = time.perf_counter() - t0
            best = Path(tmp) / f"best-seed{seed}.json"
            exported = tlsearch.write_export(study, best, args.select)
            out = tlsearch.run_final(best)
            rows.append(
                {
                    "seed": seed,
                    "scratch": out["scratch"]["test_accuracy"],
                    "plain_finetuning": out["plain_finetuning"]["test_accuracy"],
                    "tuned": out["tuned"]["test_accuracy"],
                    "tuned_cv": exported["cv_mean"],
                    "search_s": search_s,
                    "params": exported["searched_params"] or exported["params"],
                    "reason": exported["selection"]["reason"],
                    "sizes": (out["target_train_size"], out["target_test_size"]),
                }
            )
            r = rows[-1]
            print(
                f"seed {seed}: scratch {r['scratch']:.3f}  "
                f"plain fine-tuning {r['plain_finetuning']:.3f}  "
                f"tuned {r['tuned']:.3f} (cv {r['tuned_cv']:.3f}, search {search_s:.0f}s)\n"
                f"  {r['reason']}",
                flush=True,
            )

    task = tlsearch.load_task(cfg.data).description
    train, test = rows[-1]["sizes"]
    print()
    print(
        f"task: {task}; {train} labelled target images, {test} held-out test images; "
        f"{cfg.n_trials} trials, {cfg.cv.k}-fold CV"
    )
    print(
        f"{'seed':>4}  {'scratch':>8}  {'plain ft':>9}  {'tuned':>6}  {'tuned CV':>8}  "
        f"{'search s':>8}  selected"
    )
    for r in rows:
        params = " ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items()
        )
        print(
            f"{r['seed']:>4}  {r['scratch']:8.3f}  {r['plain_finetuning']:9.3f}  "
            f"{r['tuned']:6.3f}  "
            f"{r['tuned_cv']:8.3f}  {r['search_s']:8.0f}  {params}"
        )
    mean = {
        k: statistics.fmean(r[k] for r in rows) for k in ("scratch", "plain_finetuning", "tuned")
    }
    print(
        f"{'mean':>4}  {mean['scratch']:8.3f}  {mean['plain_finetuning']:9.3f}  {mean['tuned']:6.3f}"
    )
    wins = sum(r["tuned"] > max(r["scratch"], r["plain_finetuning"]) for r in rows)
    print(f"tuned beats both baselines on {wins}/{len(rows)} seeds")
    gain = [r["tuned"] - r["plain_finetuning"] for r in rows]
    print(f"tuned − plain fine-tuning: mean {100 * statistics.fmean(gain):+.1f} pp")


if __name__ == "__main__":
    main()
