"""Which penalty transfers best? L2, L2-SP and DELTA, each with and without BSS, on held-out test.

On the default task (mnist-noisy, the default CNN and fine-tuning settings) every method trains
with the same learning rate, frozen depth and backbone learning-rate multiplier (``--lr``,
``--frozen-blocks``, ``--backbone-lr-mult``); only its penalty differs. Its λ (and BSS's η) is
chosen by a short screen on the target *training* split, as a study would choose it: the
default 5-fold CV (``tlsearch.KFoldObjective``, the study's ``accuracy_then_loss`` metric) over a
log grid spanning the penalty's default search range; then, at that λ, η over a small grid. The
test split is not seen until the end.

Each method is then retrained on the whole target training split with fine-tuning seeds 0, 1, 2
and scored once on the 1,950 held-out test images, as ``tlsearch final`` does: the table gives
the test accuracy (mean over seeds, and each seed's) and, against L2-SP, the paired difference
over the same images of the seed-averaged correctness with its 95 % interval and the exact McNemar
(sign) test on the images where one method was right on more seeds than the other
(``tlsearch.paired_difference``, ``tlsearch.mcnemar_exact``).

    python benchmarks/regularizers.py [--seeds 0 1 2] [--frozen-blocks 0] [--lr 0.01]
        [--backbone-lr-mult 0.1]
    python benchmarks/regularizers.py --smoke   # the smoke study, two points per grid, seed 0

32 CV trials and 18 retrainings: about 3 minutes on 2 idle CPU cores (18 minutes when other jobs
kept the load at 3-4).
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import _smoke
import numpy as np
import optuna
import torch

import tlsearch

# λ grids: a point per decade of the default search ranges (search.lambda for L2 and L2-SP,
# search.delta_lambda for DELTA).
LAMBDAS = {
    "l2": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0],
    "l2sp": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0],
    "delta": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0],
}
# η of BSS: the authors' 0.001 (on ResNet-50's 2048 features), a decade below and two above,
# for the CNN's 128 features.
ETAS = [1e-4, 1e-3, 1e-2, 1e-1]
# --smoke: the ends of each grid.
SMOKE_LAMBDAS = {reg: [grid[0], grid[-1]] for reg, grid in LAMBDAS.items()}
SMOKE_ETAS = [ETAS[0], ETAS[-1]]
NAMES = {"l2": "L2", "l2sp": "L2-SP", "delta": "DELTA"}


def cv_value(
    objective: tlsearch.KFoldObjective, params: dict[str, Any]
) -> tuple[float, float, float]:
    """The trial's value (what a study maximizes), its mean fold accuracy and loss."""
    trial = optuna.trial.FixedTrial(params)
    try:
        value = objective(trial)
    except optuna.TrialPruned:  # a diverged fold
        return -math.inf, math.nan, math.nan
    return value, trial.user_attrs["cv_mean"], trial.user_attrs["cv_loss"]


def screen(
    objective: tlsearch.KFoldObjective, base: dict[str, Any], name: str, grid: list[float]
) -> tuple[float, tuple[float, float, float]]:
    """The value of ``name`` in ``grid`` with the best CV value, and that CV result."""
    results = {v: cv_value(objective, {**base, name: v}) for v in grid}
    best = max(grid, key=lambda v: results[v][0])
    print(
        f"  {name}: "
        + ", ".join(f"{v:g}→{results[v][1]:.3f}" for v in grid)
        + f"  (chose {best:g})",
        flush=True,
    )
    return best, results[best]


def correct_on_test(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per test image, whether the model's top class is its label."""
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).cpu().numpy().astype(float)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning")
    parser.add_argument("--frozen-blocks", type=int, default=0, help="the same for every method")
    parser.add_argument("--lr", type=float, default=0.01, help="the same for every method")
    parser.add_argument(
        "--backbone-lr-mult", type=float, default=0.1, help="the same for every method"
    )
    parser.add_argument("--bss-k", type=int, default=1, help="k of BSS (the authors' 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _smoke.directory(args) as tmp:
        if args.smoke:
            args.seeds, args.threads = [0], 1
            run(args, _smoke.study(tmp / "cache"), SMOKE_LAMBDAS, SMOKE_ETAS)
        else:
            run(args, {}, LAMBDAS, ETAS)


def run(
    args: argparse.Namespace,
    study: dict[str, Any],
    lambdas: dict[str, list[float]],
    etas: list[float],
) -> None:
    """Screen every penalty's λ (from ``lambdas``) and BSS's η (from ``etas``) on ``study`` (a
    study dict: ``{}`` is the default study), retrain, score and print the table."""
    t0 = time.perf_counter()

    def config(regularizer: str = "l2sp", bss_eta: Any = 0.0) -> tlsearch.StudyConfig:
        """The study's config with this penalty (and BSS η: a number, or a range)."""
        return tlsearch.config_from_dict(
            {
                **study,
                "finetune": {
                    **study.get("finetune", {}),
                    "device": "cpu",
                    "threads": args.threads,
                },
                "regularizer": {"name": regularizer, "bss_eta": bss_eta, "bss_k": args.bss_k},
            }
        )

    # 1) the task and model, pretrained once (cached)
    cfg = config()
    ctx = tlsearch.prepare(cfg, "cpu")
    task = ctx.task
    pretrained = tlsearch.load_checkpoint(ctx.checkpoint)
    fixed = {
        "lr": args.lr,
        "frozen_blocks": args.frozen_blocks,
        "backbone_lr_mult": args.backbone_lr_mult,
    }

    def objective(cfg: tlsearch.StudyConfig) -> tlsearch.KFoldObjective:
        return tlsearch.KFoldObjective(
            cfg, task.target_train, pretrained, task.input_shape, task.target_classes, ctx.device
        )

    # 2) λ, then η at that λ, by the study's k-fold CV on the target training split
    methods: dict[str, tlsearch.TrialParams] = {}
    cv: dict[str, tuple[float, float, float]] = {}
    for reg, grid in lambdas.items():
        # DELTA's λ has a name (and a range) of its own in a study.
        lam_name = "delta_lambda" if reg == "delta" else "lambda"
        print(f"{NAMES[reg]}:", flush=True)
        lam, cv[reg] = screen(objective(config(reg)), fixed, lam_name, grid)
        # η as a study searches it: a parameter of the trial.
        searched = {"low": etas[0], "high": etas[-1], "log": True}
        eta, cv[f"{reg}+bss"] = screen(
            objective(config(reg, searched)), {**fixed, lam_name: lam}, "bss_eta", etas
        )
        common = {**fixed, "regularizer": reg}
        methods[reg] = tlsearch.TrialParams.from_dict({**common, "lambda": lam})
        methods[f"{reg}+bss"] = tlsearch.TrialParams.from_dict(
            {**common, "lambda": lam, "bss_eta": eta}
        )
    screened = time.perf_counter() - t0

    # 3) retrain on the whole training split per seed; score the held-out test once
    x = torch.from_numpy(task.target_train.x)
    y = torch.from_numpy(task.target_train.y)
    xt = torch.from_numpy(task.target_test.x)
    yt = torch.from_numpy(task.target_test.y)
    correct: dict[str, np.ndarray] = {}
    for method, params in methods.items():
        per_seed = []
        for seed in args.seeds:
            model = tlsearch.finetune(
                pretrained, cfg, params, x, y, task.target_classes, task.input_shape, seed
            )
            per_seed.append(correct_on_test(model, xt, yt))
        correct[method] = np.stack(per_seed)

    # 4) the table
    def label(method: str) -> str:
        reg, _, bss = method.partition("+")
        return NAMES[reg] + (" + BSS" if bss else "")

    ref = correct["l2sp"].mean(0)
    print()
    print(
        f"{cfg.data.task}, {cfg.model.name}, frozen_blocks={args.frozen_blocks}, lr={args.lr:g}, "
        f"backbone_lr_mult={args.backbone_lr_mult:g}, {len(yt)} test images, "
        f"fine-tuning seeds {args.seeds}, BSS k={args.bss_k}; λ and η by {cfg.cv.k}-fold CV on "
        f"the {len(y)} training images"
    )
    print()
    print(
        "| method | λ | η | CV acc | test acc (mean) | per seed | Δ vs L2-SP [95 % CI] "
        "| McNemar p |"
    )
    print("|---|---:|---:|---:|---:|---|---|---:|")
    for method, params in methods.items():
        acc = correct[method].mean(1)
        if method == "l2sp":
            diff = "—"
            p = "—"
        else:
            d, low, high = tlsearch.paired_difference(correct[method].mean(0), ref)
            a, b = correct[method].mean(0), ref
            p = f"{tlsearch.mcnemar_exact(int((a > b).sum()), int((b > a).sum())):.3f}"
            diff = f"{100 * d:+.1f} pp [{100 * low:+.1f}, {100 * high:+.1f}]"
        bss_eta = params.hyperparameters.get("bss_eta")  # absent: BSS off
        eta = f"{bss_eta:g}" if bss_eta else "—"
        print(
            f"| {label(method)} | {params.lambda_:g} | {eta} | {cv[method][1]:.3f} "
            f"| **{acc.mean():.3f}** | {', '.join(f'{a:.3f}' for a in acc)} | {diff} | {p} |"
        )
    print()
    total = time.perf_counter() - t0
    print(f"screen {screened:.0f} s, total {total:.0f} s ({args.threads} threads)")


if __name__ == "__main__":
    main()
