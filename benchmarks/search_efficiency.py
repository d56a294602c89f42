"""Does the search find what a dense grid finds, for far less? Samplers and pruners, digits study.

1. A dense grid over (λ, lr, frozen depth) of the digits study (studies/digits.toml) is evaluated
   once with the study's own objective and cached in benchmarks/grid_digits.json: each point's fold
   scores and fold losses, and the held-out test accuracy of the model ``tlsearch final`` would
   train with it (the whole target training split, seed 0). ``--recompute`` evaluates it again.
2. Random search, TPE and Optuna's GP sampler, each with no pruner, the median pruner and the
   Wilcoxon pruner (the study's settings otherwise), search that grid over several seeds. This is a
   replay: λ and lr are suggested as integer indices of the grid's log-spaced values (an ordered,
   discrete version of the study's log-uniform ranges), and each trial reports the point's cached
   fold scores fold by fold as ``KFoldObjective`` does (running mean for the median pruner, each
   fold's score for Wilcoxon), so a pruner stops a trial where it would have stopped the real one.
   Each fold reported is a fold fit paid for.

Printed per strategy: the fold fits needed to come within 0.5 pp of the grid's best CV score and
within 2 pp (one image of 50), fold fits and sampler time per trial, and the held-out test accuracy
of what it selects after the default budget of 30 trials (also with ties at the best CV broken by
the lower CV loss) and after the whole run. The curves go to benchmarks/search_efficiency.png.

    python benchmarks/search_efficiency.py [--seeds 0 1 ... 9] [--n-trials 80] [--workers 2]
    python benchmarks/search_efficiency.py --smoke   # a 12-point grid of the smoke study, 6 trials
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import _smoke
import numpy as np
import optuna
import torch
from scipy.stats import spearmanr

import tlsearch

ROOT = Path(__file__).resolve().parent.parent
GRID_FILE = ROOT / "benchmarks" / "grid_digits.json"
PLOT_FILE = ROOT / "benchmarks" / "search_efficiency.png"
# λ in half-decade steps over the study's six decades; lr in seven log-spaced steps.
N_LAMBDA, N_LR = 13, 7
# --smoke: the ends of each range, on the smoke study (benchmarks/_smoke.py), 6 trials per search.
SMOKE_SIZES, SMOKE_TRIALS = (2, 2), 6
SAMPLERS = ["random", "tpe", "gp"]
PRUNERS = ["none", "median", "wilcoxon"]
DEFAULT_BUDGET = 30  # trials: studies/digits.toml's n_trials
# Bump when tlsearch changes what a grid point scores (2: hashed fine-tuning seeds, finetune.py).
GRID_FORMAT = 2


def grid_config(path: str | Path) -> tlsearch.StudyConfig:
    """The study file's config, the backbone's learning-rate multiplier fixed (the grid's axes are
    λ, lr and depth): at 0.1, tlsearch 0.2's default, where the study searches it."""
    cfg = tlsearch.load_config(path)
    if isinstance(cfg.search.backbone_lr_mult, float):
        return cfg
    return cfg.model_copy(
        update={"search": cfg.search.model_copy(update={"backbone_lr_mult": 0.1})}
    )


def grid_axes(
    cfg: tlsearch.StudyConfig, sizes: tuple[int, int] = (N_LAMBDA, N_LR)
) -> dict[str, list[float]]:
    """The grid: ``sizes`` log-spaced values of λ and of lr over their searched ranges, and every
    frozen depth."""
    lam, lr, depth = cfg.search.lambda_, cfg.search.lr, cfg.search.frozen_blocks
    return {
        "lambda": np.geomspace(lam.low, lam.high, sizes[0]).tolist(),
        "lr": np.geomspace(lr.low, lr.high, sizes[1]).tolist(),
        "frozen_blocks": list(range(int(depth.low), int(depth.high) + 1)),
    }


def identity(cfg: tlsearch.StudyConfig, sizes: tuple[int, int]) -> dict[str, Any]:
    """Everything that changes a grid point's scores; a cached grid must match it.

    That is the study's ``search_hash`` with the sampler, the pruner and ``cv.report`` at their
    defaults (the replays choose the first two; the grid's trials report to nobody), ``cv.metric``,
    ``cv.repeats`` and ``search.baselines`` at their 0.1 values (what a point scores is the same),
    and the axes.
    """
    d = cfg.to_dict()
    # What a trial's value is made of (cv.metric), how many repeats and which reference trials a
    # study queues change no point's fold scores: at their 0.1 values they leave the hash as it was.
    d.update(sampler={}, pruner={})
    d["cv"].update(report="auto", metric="accuracy", repeats=1)
    d["search"]["baselines"] = []
    return {
        "format": GRID_FORMAT,
        "search_hash": tlsearch.config_from_dict(d).search_hash(),
        "folds": cfg.cv.k,
        "axes": grid_axes(cfg, sizes),
    }


# ---------------------------------------------------------------------------------------------
# 1) The grid, evaluated once (in worker processes, one torch thread each)

_worker: dict[str, Any] = {}


def objective_and_test(
    cfg: tlsearch.StudyConfig, depths: Iterable[int]
) -> tuple[tlsearch.KFoldObjective, dict[int, torch.Tensor], torch.Tensor, tlsearch.TransferTask]:
    """The study's objective on the CPU, the test split's frozen features at each of ``depths``
    (as the objective caches the training split's), the test labels, and the task."""
    ctx = tlsearch.prepare(cfg, "cpu")
    pretrained = tlsearch.load_checkpoint(ctx.checkpoint)
    task = ctx.task
    objective = tlsearch.KFoldObjective(
        cfg, task.target_train, pretrained, task.input_shape, task.target_classes, ctx.device
    )
    source = tlsearch.create_model(cfg.model, task.input_shape, task.target_classes)
    source.load_state_dict(tlsearch.backbone_state(pretrained, cfg.model), strict=False)
    source.eval()
    xt = torch.from_numpy(task.target_test.x).to(ctx.device)
    yt = torch.from_numpy(task.target_test.y).to(ctx.device)
    with torch.no_grad():
        test = {d: source.features(xt, stop=d) for d in depths}
    return objective, test, yt, task


def _init_worker(config: str, axes: dict[str, list[float]]) -> None:
    torch.set_num_threads(1)
    cfg = grid_config(config)
    objective, test, yt, _ = objective_and_test(cfg, axes["frozen_blocks"])
    _worker.update(cfg=cfg, objective=objective, test=test, yt=yt, axes=axes)


def _evaluate_point(point: tuple[int, int, int]) -> dict[str, Any]:
    i, j, depth = point
    cfg: tlsearch.StudyConfig = _worker["cfg"]
    objective: tlsearch.KFoldObjective = _worker["objective"]
    axes = _worker["axes"]
    params = {"lambda": axes["lambda"][i], "lr": axes["lr"][j], "frozen_blocks": depth}
    t0 = time.perf_counter()
    trial = optuna.trial.FixedTrial(params)
    try:
        objective(trial)
    except optuna.TrialPruned:
        pass  # diverged: the fold scores before it are kept, the reason too
    out: dict[str, Any] = {
        "lambda_index": i,
        "lr_index": j,
        "frozen_blocks": depth,
        "fold_scores": trial.user_attrs["fold_scores"],
        "fold_losses": trial.user_attrs["fold_losses"],
        "fail_reason": trial.user_attrs.get("fail_reason"),
    }
    # What `tlsearch final` trains with these parameters: the whole training split, seed 0.
    fp = tlsearch.TrialParams(
        lambda_=params["lambda"],
        lr=params["lr"],
        frozen_blocks=depth,
        backbone_lr_mult=cfg.search.backbone_lr_mult,
        regularizer=cfg.regularizer.names[0],
    )
    x = objective.frozen_features(depth)
    try:
        model = tlsearch.finetune(
            objective.pretrained,
            cfg,
            fp,
            x,
            objective.y,
            objective.num_classes,
            objective.input_shape,
            seed=0,
            start=depth,
        )
        test = tlsearch.evaluate(model, _worker["test"][depth], _worker["yt"], start=depth)
        out["test_accuracy"] = test[0]
    except tlsearch.DivergedError:
        out["test_accuracy"] = None
    out["seconds"] = round(time.perf_counter() - t0, 2)
    return out


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def evaluate_grid(
    config: Path, path: Path, workers: int, recompute: bool, sizes: tuple[int, int]
) -> dict[str, Any]:
    """The cached grid; missing points (all of them with ``recompute``) are evaluated first."""
    cfg = grid_config(config)
    ident = identity(cfg, sizes)
    data: dict[str, Any] = {"identity": ident, "points": []}
    if path.is_file() and not recompute:
        cached = json.loads(path.read_text())
        if cached["identity"] != ident:
            raise SystemExit(f"{path} was computed for another config; pass --recompute")
        data = cached
    axes = ident["axes"]
    done = {(p["lambda_index"], p["lr_index"], p["frozen_blocks"]) for p in data["points"]}
    todo = [
        (i, j, d)
        for d in axes["frozen_blocks"]
        for i in range(len(axes["lambda"]))
        for j in range(len(axes["lr"]))
        if (i, j, d) not in done
    ]
    if not todo:
        return data
    print(f"evaluating {len(todo)} grid points in {workers} processes ...", flush=True)
    task = tlsearch.prepare(cfg, "cpu").task  # pretrain (once, cached) before the workers need it
    data["target_train"] = len(task.target_train)
    t0 = time.perf_counter()
    with _smoke.pool(workers, _init_worker, (str(config), axes)) as pool:
        for n, point in enumerate(pool.imap_unordered(_evaluate_point, todo), 1):
            data["points"].append(point)
            if n % 20 == 0 or n == len(todo):
                _write(path, data)
                print(f"  {n}/{len(todo)} points, {time.perf_counter() - t0:.0f} s", flush=True)
    data["seconds"] = data.get("seconds", 0.0) + round(time.perf_counter() - t0, 1)
    data["points"].sort(key=lambda p: (p["frozen_blocks"], p["lambda_index"], p["lr_index"]))
    _write(path, data)
    return data


# ---------------------------------------------------------------------------------------------
# 2) Searches replayed against the grid


class Grid:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.axes = data["identity"]["axes"]
        self.k = data["identity"]["folds"]
        self.points = {
            (p["lambda_index"], p["lr_index"], p["frozen_blocks"]): p for p in data["points"]
        }
        complete = [p for p in data["points"] if len(p["fold_scores"]) == self.k]
        self.best_cv = max(_cv(p) for p in complete)
        self.best = [p for p in complete if _cv(p) == self.best_cv]
        self.fold_fits = sum(
            len(p["fold_scores"]) + bool(p["fail_reason"]) for p in data["points"]
        )

    def describe(self, p: dict[str, Any]) -> str:
        return (
            f"λ={self.axes['lambda'][p['lambda_index']]:.3g} "
            f"lr={self.axes['lr'][p['lr_index']]:.3g} frozen_blocks={p['frozen_blocks']}"
        )


def _cv(p: dict[str, Any]) -> float:
    return statistics.fmean(p["fold_scores"])


def _cv_loss(p: dict[str, Any]) -> float:
    return statistics.fmean(p["fold_losses"])


def replay(
    data: dict[str, Any], config: str, sampler: str, pruner: str, seed: int, n_trials: int
) -> list[dict[str, Any]]:
    """One search; after each trial: fold fits so far, best CV so far and the point it selects.

    The selection is the best CV's first trial, as ``study.best_trial`` picks it (``point``), and,
    for comparison, among the trials tied at the best CV the one with the lowest CV loss
    (``point_by_loss``).
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    grid = Grid(data)
    cfg = grid_config(config)
    cfg = cfg.model_copy(
        update={
            "sampler": cfg.sampler.model_copy(update={"name": sampler, "seed": seed}),
            "pruner": cfg.pruner.model_copy(update={"name": pruner}),
        }
    )
    report_folds = pruner == "wilcoxon"  # cv.report = "auto", as KFoldObjective does
    history: list[dict[str, Any]] = []
    state: dict[str, Any] = {"fits": 0, "best": -math.inf, "point": None, "point_by_loss": None}
    t0 = time.perf_counter()

    def objective(trial: optuna.Trial) -> float:
        i = trial.suggest_int("lambda_index", 0, len(grid.axes["lambda"]) - 1)
        j = trial.suggest_int("lr_index", 0, len(grid.axes["lr"]) - 1)
        depths = grid.axes["frozen_blocks"]
        point = grid.points[(i, j, trial.suggest_int("frozen_blocks", depths[0], depths[-1]))]
        seen: list[float] = []
        for fold, score in enumerate(point["fold_scores"]):
            state["fits"] += 1
            seen.append(score)
            trial.report(score if report_folds else statistics.fmean(seen), fold)
            if fold < grid.k - 1 and trial.should_prune():
                raise optuna.TrialPruned()
        if point["fail_reason"]:
            state["fits"] += 1
            raise optuna.TrialPruned(point["fail_reason"])
        value = statistics.fmean(seen)
        if value > state["best"]:
            state.update(best=value, point=point, point_by_loss=point)
        elif value == state["best"] and _cv_loss(point) < _cv_loss(state["point_by_loss"]):
            state["point_by_loss"] = point
        return value

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        history.append({**state, "seconds": time.perf_counter() - t0})

    study = optuna.create_study(
        direction="maximize",
        sampler=tlsearch.make_sampler(cfg),
        pruner=tlsearch.PRUNERS.create(cfg.pruner.name, cfg),
    )
    study.optimize(objective, n_trials=n_trials, callbacks=[after])
    return history


def _reach(history: Sequence[dict[str, Any]], target: float) -> int | None:
    return next((h["fits"] for h in history if h["best"] >= target - 1e-9), None)


def _reach_summary(runs: Sequence[Sequence[dict[str, Any]]], target: float) -> str:
    """Median fold fits to the target over the seeds that reached it, the worst seed, and how many.

    A seed that never reached it counts as its whole run in the worst case (shown with ``>``).
    """
    reached = [_reach(h, target) for h in runs]
    got = [r for r in reached if r is not None]
    if not got:
        return f"never ({len(runs)} seeds)"
    worst = max(got) if len(got) == len(runs) else max(h[-1]["fits"] for h in runs)
    sign = "" if len(got) == len(runs) else ">"
    return f"{statistics.median(got):.0f} [{sign}{worst}] ({len(got)}/{len(runs)})"


def _mean_test(states: Iterable[dict[str, Any]], key: str = "point") -> float:
    """Mean test accuracy of the selected points (a search with no complete trial selects none)."""
    tests = [s[key]["test_accuracy"] if s[key] else None for s in states]
    return statistics.fmean(math.nan if t is None else t for t in tests)


def plot(curves: dict[str, list[list[dict[str, Any]]]], grid: Grid, path: Path) -> None:
    """Best CV so far (mean over seeds) and the share of seeds within 0.5 pp, against fold fits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"random": "tab:gray", "tpe": "tab:blue", "gp": "tab:orange"}
    styles = {"none": "-", "median": "--", "wilcoxon": ":"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    top = max(h[-1]["fits"] for runs in curves.values() for h in runs)
    xs = np.arange(1, top + 1)
    target = grid.best_cv - 0.005
    for name, runs in curves.items():
        sampler, pruner = name.split(" + ")
        ys = []
        for h in runs:
            fits = np.array([s["fits"] for s in h])
            best = np.array([s["best"] for s in h])
            idx = np.searchsorted(fits, xs, side="right") - 1
            ys.append(np.where(idx >= 0, best[np.clip(idx, 0, None)], np.nan))
        ys_arr = np.array(ys)
        # Before a seed's first complete trial its best is undefined; the mean skips it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(ys_arr, axis=0)
        style = {"color": colors[sampler], "linestyle": styles[pruner], "label": name}
        left.plot(xs, mean, **style)
        right.plot(xs, np.mean(np.nan_to_num(ys_arr, nan=-1.0) >= target - 1e-9, axis=0), **style)
    for ax in (left, right):
        ax.axvline(
            grid.fold_fits / 5,
            color="tab:red",
            linewidth=0.8,
            linestyle=":",
            label=f"1/5 of the grid ({grid.fold_fits // 5} fold fits)",
        )
        ax.set_xscale("log")
        ax.set_xlabel("fold fits (log scale)")
    left.axhline(grid.best_cv, color="black", linewidth=0.8, label="grid's best CV")
    left.axhline(target, color="black", linewidth=0.8, linestyle="--", label="0.5 pp below it")
    left.set_ylim(grid.best_cv - 0.12, grid.best_cv + 0.01)
    left.set_ylabel(f"best CV accuracy so far (mean over {len(runs)} seeds)")
    right.set_ylabel("share of seeds within 0.5 pp of the grid's best CV")
    right.legend(fontsize=7, ncol=2, loc="lower right")
    fig.suptitle(
        f"digits study: searches against a {len(grid.data['points'])}-point grid "
        f"({grid.fold_fits} fold fits, best CV {grid.best_cv:.2f})",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "studies" / "digits.toml")
    parser.add_argument("--grid", type=Path, default=GRID_FILE)
    parser.add_argument("--plot", type=Path, default=PLOT_FILE)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--n-trials", type=int, default=80, help="trials per search")
    parser.add_argument("--workers", type=int, default=2, help="processes")
    parser.add_argument("--recompute", action="store_true", help="evaluate the grid again")
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if not args.smoke:
        run(args, (N_LAMBDA, N_LR))
        return
    with _smoke.directory(args) as tmp:
        args.config, args.grid, args.plot = (
            _smoke.study_file(tmp),
            tmp / GRID_FILE.name,
            tmp / PLOT_FILE.name,
        )
        args.seeds, args.n_trials, args.workers = [0], SMOKE_TRIALS, 1
        run(args, SMOKE_SIZES)


def run(args: argparse.Namespace, sizes: tuple[int, int]) -> None:
    """The grid (``sizes`` values of λ and lr), every strategy's searches on it, the table and the
    curves."""
    data = evaluate_grid(args.config, args.grid, args.workers, args.recompute, sizes)
    grid = Grid(data)
    complete = [p for p in data["points"] if len(p["fold_scores"]) == grid.k]
    best_tests = [p["test_accuracy"] for p in grid.best]
    tests = [p["test_accuracy"] for p in data["points"] if p["test_accuracy"] is not None]
    rho_acc = spearmanr([_cv(p) for p in complete], [p["test_accuracy"] for p in complete])[0]
    rho_loss = spearmanr([-_cv_loss(p) for p in complete], [p["test_accuracy"] for p in complete])
    n = data["target_train"]
    print(
        f"grid: {len(data['points'])} points (λ {len(grid.axes['lambda'])} × lr "
        f"{len(grid.axes['lr'])} × frozen depth "
        f"{len(grid.axes['frozen_blocks'])}), {grid.fold_fits} fold fits, "
        f"{data.get('seconds', 0):.0f} s to evaluate"
    )
    print(
        f"grid's best CV {grid.best_cv:.3f} ({round(grid.best_cv * n)}/{n} images) at "
        f"{len(grid.best)} points, e.g. {grid.describe(grid.best[0])}; their test accuracy "
        f"{min(best_tests):.3f}-{max(best_tests):.3f}; best anywhere on the grid {max(tests):.3f}"
    )
    print(
        f"rank correlation with test accuracy over the grid: CV accuracy {rho_acc:.2f}, "
        f"CV loss (negated) {rho_loss[0]:.2f}"
    )
    print(
        f"searches: {len(args.seeds)} seeds × {args.n_trials} trials. A CV score is a mean over "
        f"{n} images, in steps of {100 / n:.0f} pp: 'within 0.5 pp' means reaching the best."
    )
    print()

    strategies = [(s, p) for s in SAMPLERS for p in PRUNERS]
    jobs = [
        (data, str(args.config), s, p, seed, args.n_trials)
        for s, p in strategies
        for seed in args.seeds
    ]
    t0 = time.perf_counter()
    with _smoke.pool(args.workers) as pool:
        results = pool.starmap(replay, jobs)
    print(f"({time.perf_counter() - t0:.0f} s of replays)")
    curves: dict[str, list[list[dict[str, Any]]]] = {}
    for job, history in zip(jobs, results, strict=True):
        curves.setdefault(f"{job[2]} + {job[3]}", []).append(history)

    budget = min(DEFAULT_BUDGET, args.n_trials)
    at = budget - 1
    rows = []
    for name, runs in curves.items():
        rows.append(
            [
                name,
                _reach_summary(runs, grid.best_cv - 0.005),
                _reach_summary(runs, grid.best_cv - 0.02),
                f"{statistics.fmean(h[-1]['fits'] / len(h) for h in runs):.2f}",
                f"{1e3 * statistics.fmean(h[-1]['seconds'] / len(h) for h in runs):.0f}",
                f"{statistics.fmean(h[at]['best'] for h in runs):.3f}",
                f"{_mean_test(h[at] for h in runs):.3f}",
                f"{_mean_test((h[at] for h in runs), 'point_by_loss'):.3f}",
                f"{_mean_test(h[-1] for h in runs):.3f}",
            ]
        )
    header = [
        "sampler + pruner",
        "fits to 0.5 pp",
        "fits to 2 pp",
        "fits/trial",
        "search ms/trial",
        f"CV @{budget}",
        f"test @{budget}",
        f"test @{budget}, ties by loss",
        f"test @{args.n_trials}",
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    print(
        "fits to ...: median over the seeds that got there [worst seed] (seeds that got there)\n"
        "search ms/trial: sampler and pruner time per trial (the replay's objective is a lookup)\n"
        "@N: after N trials, mean over seeds\n"
        f"1/5 of the grid's fold fits: {grid.fold_fits / 5:.0f}"
    )
    plot(curves, grid, args.plot)
    print(f"curves: {args.plot}")


if __name__ == "__main__":
    main()
