"""Half the compute for the same answer? Pruners on partial training, replayed on the selection grids.

The grids of ``benchmarks/selection.py`` hold every fold's held-out loss and accuracy every 5 epochs
(its learning curve) beside its final scores, and the held-out test accuracy of the model ``final``
trains. Here real searches are replayed on them (the default sampler and budget, the baselines
first, 10 sampler seeds) with each way of stopping trials early, then the default selection rule
(its confirmation round included) exports an answer:

- ``none``: every trial trains every fold to the last epoch (the full budget);
- ``median``: tlsearch 0.2's default, Optuna's median pruner after each fold (step = fold);
- ``sha(m, η)`` / ``hyperband(m, η)``: Optuna's SuccessiveHalvingPruner / HyperbandPruner on
  partial training, the step being the fold-epochs a trial has trained (fold i's epoch e is step
  ``i·E + e``; a report every 5 epochs, the running metric with the current fold at that epoch),
  the first rung after ``m`` fold-epochs, each next η times further;
- ``epoch-major sha(m, η)``: the same on every fold at once (step = epoch, the metric over all
  folds at that epoch; a trial stopped at epoch e has cost k·e fold-epochs).

Baseline trials report (their rung values set the bar) but are never stopped; confirmation trials
train in full. Printed per task and pruner: the exported answer's held-out test accuracy minus
the full budget's with the same sampler seed (median over data seeds of the mean over sampler
seeds, pp) and the fold-epochs spent as a share of the full budget's, the confirmation round
included.

``--real`` runs real studies instead (``tlsearch.run_study``, then ``run_final`` on the export):
the default study and one task per family (3 shots), over sampler seeds, with the default pruner,
tlsearch 0.2's median pruner and no pruner; and the example ResNet plug-in on image folders
(``examples/resnet-folders.toml``, whose trials cost the most). Printed: the exported answer's test
accuracy, the fold-epochs (every fold's epochs trained, the confirmation round's included) and
the seconds of the search.

    python benchmarks/fidelity.py [--families ...] [--sampler-seeds 0 ... 9] [--workers 2]
    python benchmarks/fidelity.py --real [--sampler-seeds 0 1 2] [--no-resnet | --resnet-only]
        [--pruners default "median (0.2)" none]
    python benchmarks/fidelity.py --smoke   # replays on the selection benchmark's smoke grids
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _smoke
import optuna
import selection
from selection import FAMILIES, Grid, GridSpec

import tlsearch

# name: (pruner, (min resource, reduction factor) or None, epoch-major)
PRUNERS: dict[str, tuple[str, tuple[int, int] | None, bool]] = {
    "none": ("none", None, False),
    "median": ("median", None, False),
    "sha(10, 3)": ("sha", (10, 3), False),
    "sha(20, 3)": ("sha", (20, 3), False),
    "sha(5, 4)": ("sha", (5, 4), False),
    "sha(10, 4)": ("sha", (10, 4), False),
    "hyperband(10, 3)": ("hyperband", (10, 3), False),
    "epoch-major sha(5, 3)": ("sha", (5, 3), True),
    "epoch-major sha(10, 3)": ("sha", (10, 3), True),
    "epoch-major sha(5, 2)": ("sha", (5, 2), True),
    "epoch-major sha(10, 2)": ("sha", (10, 2), True),
    "epoch-major sha(5, 4)": ("sha", (5, 4), True),
    "epoch-major hyperband(5, 3)": ("hyperband", (5, 3), True),
}


def _pruner(kind: str, rungs: tuple[int, int] | None, full: int) -> optuna.pruners.BasePruner:
    if kind == "none":
        return optuna.pruners.NopPruner()
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
    assert rungs is not None
    m, eta = rungs
    if kind == "sha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=m, reduction_factor=eta)
    return optuna.pruners.HyperbandPruner(min_resource=m, max_resource=full, reduction_factor=eta)


def _objective(grid: Grid, cfg: tlsearch.StudyConfig, name: str, spent: list[int]) -> Any:
    kind, _, epoch_major = PRUNERS[name]
    metric = tlsearch.CVMetric(cfg.cv.metric, grid.fold_sizes)
    ax, k, epochs = grid.axes, grid.k, grid.epochs
    depths = ax["frozen_blocks"]

    def objective(trial: optuna.Trial) -> float:
        baseline = trial.user_attrs.get("baseline")
        fresh = trial.user_attrs.get(tlsearch.CONFIRM_ATTR) is not None
        if baseline is None:
            index = (
                trial.suggest_int("lambda_index", 0, len(ax["lambda"]) - 1),
                trial.suggest_int("lr_index", 0, len(ax["lr"]) - 1),
                trial.suggest_int("frozen_blocks", depths[0], depths[-1]),
                trial.suggest_int("backbone_lr_mult_index", 0, len(ax["backbone_lr_mult"]) - 1),
            )
            point = grid.point(index)
            trial.set_user_attr("grid_point", list(index))
        else:
            for name_ in grid.baseline_enqueue(baseline, True):
                high = depths[-1] if name_ == "frozen_blocks" else len(ax[name_[:-6]]) - 1
                trial.suggest_int(name_, depths[0] if name_ == "frozen_blocks" else 0, high)
            point = grid.baselines[baseline]
            trial.set_user_attr("grid_point", baseline)
        trial.set_user_attr("resolved_params", point["params"])
        rec = point["fresh" if fresh else "search"]
        scores, losses = rec["fold_scores"], rec["fold_losses"]
        curve = rec["curve"]
        stoppable = baseline is None and not fresh

        def stop(step: int, value: float, cost: int) -> bool:
            trial.report(value, step)
            if trial.should_prune() and stoppable:
                spent[0] += cost
                return True
            return False

        if not fresh and kind in ("sha", "hyperband") and epoch_major:
            for n, e in enumerate(curve["epochs"]):
                at = [(f[n] if n < len(f) else math.nan) for f in curve["accuracy"]]
                lo = [(f[n] if n < len(f) else math.nan) for f in curve["loss"]]
                if stop(e, metric.value(at, lo), k * e):
                    raise optuna.TrialPruned(f"pruned at epoch {e}")
        elif not fresh and kind in ("sha", "hyperband"):
            for i in range(len(scores)):
                for n, e in enumerate(curve["epochs"]):
                    if n >= len(curve["loss"][i]):
                        break
                    value = metric.value(
                        [*scores[:i], curve["accuracy"][i][n]], [*losses[:i], curve["loss"][i][n]]
                    )
                    if stop(i * epochs + e, value, i * epochs + e):
                        raise optuna.TrialPruned(f"pruned at fold {i}, epoch {e}")
        elif not fresh and kind == "median":
            for i in range(len(scores)):
                if stop(i, metric.value(scores[: i + 1], losses[: i + 1]), (i + 1) * epochs):
                    raise optuna.TrialPruned(f"pruned after fold {i}")
        spent[0] += len(scores) * epochs
        return selection.complete(trial, rec, metric, k)

    return objective


def replay(grid: Grid, sampler_seed: int, name: str, budget: int) -> dict[str, Any]:
    """One study with this pruner, its confirmation round, and the default rule's answer."""
    kind, rungs, epoch_major = PRUNERS[name]
    cfg = grid.spec.config(sampler={"seed": sampler_seed})
    full = grid.epochs if epoch_major else grid.k * grid.epochs
    study = optuna.create_study(
        direction="maximize",
        sampler=tlsearch.make_sampler(cfg),
        pruner=_pruner(kind, rungs, full),
    )
    # The grids hold the two baselines of a study without augmentation (as it enqueues them).
    for b in [b for b in cfg.search.baselines if b in grid.baselines][:budget]:
        study.enqueue_trial(grid.baseline_enqueue(b, True), user_attrs={"baseline": b})
    spent = [0]
    objective = _objective(grid, cfg, name, spent)
    anytime: list[tuple[int, float]] = []

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # The anytime curve: after each trial, what the best trial so far scores on the test.
        done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        if done:
            top = max(done, key=lambda t: (t.value, -t.number)).user_attrs["grid_point"]
            p = grid.baselines[top] if isinstance(top, str) else grid.point(tuple(top))
            anytime.append((spent[0], (p["test_accuracy"] or 0.0) - grid.plain))

    study.optimize(objective, n_trials=budget, callbacks=[after])
    tlsearch.queue_confirmation(study, cfg)
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    study.optimize(objective, n_trials=len(waiting))
    chosen = tlsearch.select(study, cfg).trial
    where = chosen.user_attrs["grid_point"]
    point = grid.baselines[where] if isinstance(where, str) else grid.point(tuple(where))
    return {"test": point["test_accuracy"], "fold_epochs": spent[0], "anytime": anytime}


def replay_job(spec: GridSpec, sampler_seed: int, budget: int) -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    grid = selection._grid(spec)
    return {name: replay(grid, sampler_seed, name, budget) for name in PRUNERS}


# --real: what each study runs with besides the default config (pruner only).
REAL_PRUNERS = {
    "default": {},
    "median (0.2)": {"name": "median", "steps": "folds"},
    "none": {"name": "none", "steps": "folds"},
}


def fold_epochs(study: optuna.Study) -> int:
    """Epochs trained, summed over every fold of every finished trial: from each fold's
    learning curve, whose last point is where its training ended."""
    total = 0
    for t in study.get_trials(deepcopy=False):
        curve = t.user_attrs.get("curve") or {}
        epochs = curve.get("epochs", [])
        total += sum(epochs[len(f) - 1] for f in curve.get("loss", []) if f)
    return total


def real_study(config: dict[str, Any], root: Path) -> dict[str, Any]:
    study, export, final, seconds = selection.end_to_end(tlsearch.config_from_dict(config), root)
    return {
        "test": final["tuned"]["test_accuracy"],
        "plain": final["plain_finetuning"]["test_accuracy"],
        "fold_epochs": fold_epochs(study),
        "seconds": round(seconds, 1),
        "reason": export["selection"]["reason"],
    }


def resnet_config(root: Path) -> dict[str, Any]:
    """examples/resnet-folders.toml with its folders and source checkpoint written under
    ``root`` (by the example's own scripts) and its plug-in loaded."""
    import subprocess
    import sys

    import tomllib

    examples = Path(__file__).resolve().parent.parent / "examples"
    folders = root / "mnist-folders"
    study = root / "resnet-folders.toml"
    text = (examples / "resnet-folders.toml").read_text()
    study.write_text(text)
    # The plug-in as README runs it without installing it: its folder on the path, loaded by name
    # (here and in train_source.py), so that it registers its model once.
    plugin = examples / "tlsearch-resnet"
    env = {**__import__("os").environ, "PYTHONPATH": str(plugin)}
    subprocess.run(
        [sys.executable, str(examples / "write_mnist_folders.py"), "--out", str(folders)],
        check=True,
        env=env,
    )
    subprocess.run(
        [
            sys.executable,
            str(examples / "train_source.py"),
            str(study),
            "--plugin",
            "tlsearch_resnet",
        ],
        check=True,
        env=env,
    )
    sys.path.insert(0, str(plugin))
    tlsearch.load_plugins(["tlsearch_resnet"])
    with study.open("rb") as f:
        data = tomllib.load(f)
    for key in ("source", "target", "target_test"):
        data["data"][key]["image_folder"] = str(root / data["data"][key]["image_folder"])
    data["pretrain"]["checkpoint"] = str(root / data["pretrain"]["checkpoint"])
    data["n_trials"] = 30
    return data


def run_real(
    families: dict[str, str],
    sampler_seeds: Sequence[int],
    resnet: bool,
    pruners: Sequence[str] = tuple(REAL_PRUNERS),
    digits: bool = True,
) -> None:
    import tempfile

    tasks = [selection.DEFAULT_TASK] + [(t, 3) for t in families.values()] if digits else []
    rows = []
    with tempfile.TemporaryDirectory(prefix="tlsearch-fidelity-") as tmp:
        root = Path(tmp)
        studies: list[tuple[str, dict[str, Any]]] = []
        for task, shots in tasks:
            base = {
                "data": {"task": task, "shots": shots, "seed": 0},
                "cv": {"k": min(5, shots)},
                "finetune": {"device": "cpu"},
            }
            studies.append((f"{task} {shots}-shot", base))
        if resnet:
            studies.append(("resnet plug-in, folders", resnet_config(root)))
        for label, base in studies:
            for seed in sampler_seeds:
                for name in pruners:
                    pruner = REAL_PRUNERS[name]
                    config = {
                        **base,
                        "name": f"{label}-{seed}-{name}",
                        "storage": f"sqlite:///{root / 'fidelity.db'}",
                        "sampler": {"seed": seed},
                        "pruner": {**base.get("pruner", {}), **pruner},
                    }
                    row = {"study": label, "seed": seed, "pruner": name}
                    row.update(real_study(config, root))
                    rows.append(row)
                    print(
                        f"  {label}, seed {seed}, {name}: test {row['test']:.3f} (plain "
                        f"{row['plain']:.3f}), {row['fold_epochs']} fold-epochs, "
                        f"{row['seconds']:.0f} s",
                        flush=True,
                    )
    print("\n| study | pruner | test (mean over seeds) | Δ vs none, pp | fold-epochs | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for label, _ in studies:
        none = [r for r in rows if r["study"] == label and r["pruner"] == "none"]
        for name in pruners:
            mine = [r for r in rows if r["study"] == label and r["pruner"] == name]
            delta = statistics.median(
                a["test"] - b["test"] for a, b in zip(mine, none, strict=True)
            )
            cost = {
                key: (
                    statistics.fmean(r[key] for r in mine),
                    statistics.fmean(r[key] for r in mine)
                    / statistics.fmean(r[key] for r in none),
                )
                for key in ("fold_epochs", "seconds")
            }
            print(
                f"| {label} | {name} | {statistics.fmean(r['test'] for r in mine):.3f} | "
                f"{100 * delta:+.1f} | {cost['fold_epochs'][0]:.0f} ({cost['fold_epochs'][1]:.2f})"
                f" | {cost['seconds'][0]:.0f} ({cost['seconds'][1]:.2f}) |"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=list(FAMILIES), default=None)
    parser.add_argument("--data-seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    parser.add_argument("--sampler-seeds", type=int, nargs="+", default=None, help="default: 0-9")
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--real", action="store_true", help="real studies instead of replays")
    parser.add_argument(
        "--no-resnet", action="store_true", help="--real without the ResNet plug-in's study"
    )
    parser.add_argument(
        "--resnet-only", action="store_true", help="--real with the ResNet plug-in's study alone"
    )
    parser.add_argument(
        "--pruners",
        nargs="+",
        choices=list(REAL_PRUNERS),
        default=list(REAL_PRUNERS),
        help="--real: the pruners to run (default: all; 'none' is the reference)",
    )
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        with _smoke.directory(args) as tmp:
            specs = selection.grid_specs(
                selection.SMOKE_FAMILIES, selection.SMOKE_SHOTS, selection.SMOKE_SEEDS, tmp
            )
            selection.evaluate_grids(specs, 1, None)
            replays(specs, selection.SMOKE_SAMPLER_SEEDS, selection.SMOKE_BUDGET, 1, tmp)
        return
    if args.real:
        run_real(
            {f: FAMILIES[f] for f in (args.families or FAMILIES)},
            args.sampler_seeds or [0, 1, 2],
            not args.no_resnet,
            args.pruners,
            digits=not args.resnet_only,
        )
        return
    families = {f: FAMILIES[f] for f in (args.families or FAMILIES)}
    seeds = args.data_seeds if args.data_seeds is not None else selection.DATA_SEEDS
    specs = selection.grid_specs(families, selection.SHOTS, seeds)
    budget = tlsearch.config_from_dict({}).n_trials
    replays(specs, args.sampler_seeds or list(range(10)), budget, args.workers, FIGURE.parent)


def replays(
    specs: Sequence[GridSpec], sampler_seeds: Sequence[int], budget: int, workers: int, out: Path
) -> None:
    """Every pruner's replays on the complete grids of ``specs``: the table, and the figure
    (``fidelity.png``) in ``out``."""
    ready = [s for s in specs if not selection.missing(s, selection.load_grid(s))]
    jobs = [(spec, seed, budget) for spec in ready for seed in sampler_seeds]
    print(
        f"replaying {len(ready)} grids × {len(sampler_seeds)} seeds × {len(PRUNERS)} pruners ..."
    )
    t0 = time.perf_counter()
    with _smoke.pool(workers) as pool:
        outs = pool.starmap(replay_job, jobs, chunksize=len(sampler_seeds))
    print(f"({time.perf_counter() - t0:.0f} s)\n")
    table(ready, jobs, outs)
    figure(outs, out / FIGURE.name)


FIGURE = Path(__file__).resolve().parent / "fidelity.png"
# The full budget, tlsearch 0.2's median pruner, the default (successive halving on epochs, rungs at
# 5 and 20) and the best of the fold-major ones.
DEFAULT = "epoch-major sha(5, 4)"
SHOWN = ("none", "median", DEFAULT, "sha(10, 3)")


def figure(outs: Sequence[dict], path: Path) -> None:
    """The anytime curves: the best trial so far, its test accuracy minus plain fine-tuning's,
    against the fold-epochs spent, the mean over every grid and sampler seed (the search only;
    the confirmation round comes after)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.3), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    top = max(p[0] for o in outs for p in o["none"]["anytime"])
    xs = [top * i / 100 for i in range(101)]
    for name in SHOWN:
        mean = []
        for x in xs:
            values = [_at(o[name]["anytime"], x) for o in outs]
            known = [v for v in values if not math.isnan(v)]
            mean.append(statistics.fmean(known) if known else math.nan)
        label = f"{name}, the default" if name == DEFAULT else name
        ax.plot([x / top for x in xs], [100 * m for m in mean], label=label)
    ax.axhline(0.0, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("fold-epochs spent, as a share of a full-budget search's")
    ax.set_ylabel("best trial so far: test − plain fine-tuning (pp)")
    ax.set_title("Anytime: the search's best trial against the compute spent")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.savefig(path)
    print(f"figure: {path}")


def _at(points: Sequence[tuple[int, float]], x: float) -> float:
    """The anytime value after ``x`` fold-epochs: that of the last trial finished by then."""
    value = math.nan
    for spent, v in points:
        if spent > x:
            break
        value = v
    return value


def table(ready: Sequence[GridSpec], jobs: Sequence[tuple], outs: Sequence[dict]) -> None:
    tasks = list(dict.fromkeys(s.label for s in ready))
    print("Δtest vs the full budget (pp, paired by sampler seed) / fold-epochs as a share of it\n")
    print("| pruner | " + " | ".join(tasks) + " | all: Δ / share |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for name in PRUNERS:
        cells, deltas, shares = [], [], []
        for task in tasks:
            per_seed_d, per_seed_s = [], []
            for spec in [s for s in ready if s.label == task]:
                runs = [o for (s, _, _), o in zip(jobs, outs, strict=True) if s.path == spec.path]
                d = statistics.fmean(
                    (r[name]["test"] or 0.0) - (r["none"]["test"] or 0.0) for r in runs
                )
                share = statistics.fmean(
                    r[name]["fold_epochs"] / r["none"]["fold_epochs"] for r in runs
                )
                per_seed_d.append(d)
                per_seed_s.append(share)
            d, share = statistics.median(per_seed_d), statistics.median(per_seed_s)
            deltas.append(d)
            shares.append(share)
            cells.append(f"{100 * d:+.1f} / {share:.2f}".replace("-", "−"))
        summary = f"{100 * statistics.median(deltas):+.1f} / {statistics.median(shares):.2f}"
        print(f"| {name} | " + " | ".join(cells) + f" | {summary.replace('-', '−')} |")


if __name__ == "__main__":
    main()
