"""How fast is one trial? tlsearch's objective against the textbook way, side by side.

Both run the same trials (the same λ, lr, frozen depth and backbone learning-rate multiplier,
queued in the same order) with the same folds and epochs of the digits study (studies/digits.toml:
mnist-noisy, CNN, 5 shots, 5 folds, 60 epochs), each in a real Optuna study in SQLite, so storage
is counted. No pruner: every trial runs every fold.

* naive: the textbook objective: the source model pretrained inside every trial, a per-sample
  ``DataLoader`` over a ``TensorDataset``, the penalty summed in a Python loop over parameters.
* tlsearch: ``KFoldObjective`` as ``tlsearch run`` drives it (``setup_study``, ``run_trials``) with
  its defaults (frozen-feature cache, folds trained together where that pays); and its plain path
  (cache and fold batching off) to show what those two buy.

Each runs on torch's default thread count (the machine's cores) and on one thread. The trials of
all variants alternate (naive trial 1, tlsearch trial 1, ..., naive trial 2, ...), so a machine
shared with other work slows them alike. Then, on one thread: seconds per trial at each frozen
depth, folds trained together against one by one, a breakdown of one trial from ``torch.profiler``,
one fine-tuning step against the bare forward+backward of the same model on the same batches (at
each depth and over the trial mix; the goal: at most 1.2x), and the arithmetic of one trial of
each objective (``torch.utils.flop_counter``) against the rate each runs it at and this core's
float32 matmul peak: how much of the speedup is work removed, how much is faster arithmetic, and
how close to the limit that is.

Last, a real network brought as a plug-in: the example ResNet of ``examples/tlsearch-resnet``
(model ``resnet``; that folder is put on ``sys.path`` and the package loaded as ``--plugin
tlsearch_resnet`` loads it, so nothing needs installing). At each frozen depth, one thread: a
trial with tlsearch's defaults against its plain path (cache and fold batching off), and one
fine-tuning step against the bare forward+backward of the same model on the same batches, and
what the step adds split into the Adam update, the penalty's gradient and the rest. It runs on
``--resnet-task`` (the 8x8 digits by default: pretraining a ResNet on all of MNIST takes a CPU
core tens of minutes) with the study's shots, folds and epochs.

    python benchmarks/trial_speed.py [--per-depth 2] [--config studies/digits.toml]
    python benchmarks/trial_speed.py --only-resnet   # the ResNet rows alone, a few minutes
    python benchmarks/trial_speed.py --smoke         # every table, on a tiny study: seconds

The last line is ``speedup: <ratio>x``: trials per minute of tlsearch over the naive objective,
both on one thread (the throughput a search buys; the table has the median ratio too). One thread
because it is steady on a shared machine, where a second thread per process waits on the other
work; the line above it gives the ratio on torch's default thread count.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _smoke
import numpy as np
import optuna
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import tlsearch
from tlsearch import KFoldObjective, StudyConfig, TrialParams

# Not in tlsearch's public API (README, Architecture), needed here (see "What this benchmark asks
# of tlsearch's fine-tuning internals" below): what a trial's folds train (to ask the schedule
# whether it stacks them), and the optimizer fine-tuning runs, whose step the profile labels and
# whose update is timed alone.
from tlsearch.training import Recipe, TrialFolds
from tlsearch.training.adam import FusedAdam

if TYPE_CHECKING:
    # What tlsearch.prepare and tlsearch.load_task return.
    from tlsearch import StudyContext, TransferTask

ROOT = Path(__file__).resolve().parent.parent
# The example model plug-in (README, "Bring your own network"), used from its source folder.
RESNET_PLUGIN = ROOT / "examples" / "tlsearch-resnet"
# A fine-tuning step may cost this much more than the bare forward+backward of its model (the
# issues' bound, for the ResNet and the study's trial mix); the tables say where it is passed.
STEP_OVER_BARE_MAX = 1.2


# ---------------------------------------------------------------------------------------------
# The textbook objective


class NaiveObjective:
    """A k-fold transfer objective written as the tutorials write one (the baseline).

    The same network, folds, seeds, epochs, optimizer and penalty convention as tlsearch, but: the
    source model is pretrained inside every trial, every batch goes through a per-sample
    ``DataLoader``, the penalty is a Python loop over ``named_parameters()``, frozen blocks run in
    every step, and everything is in PyTorch's default layout and optimizer implementation.
    """

    def __init__(self, cfg: StudyConfig, task: TransferTask) -> None:
        self.cfg = cfg
        self.task = task

    def _pretrain(self) -> dict[str, torch.Tensor]:
        pre, task = self.cfg.pretrain, self.task
        torch.manual_seed(pre.seed)
        model = tlsearch.create_model(self.cfg.model, task.input_shape, task.source_classes)
        source = TensorDataset(torch.from_numpy(task.source.x), torch.from_numpy(task.source.y))
        loader = DataLoader(source, batch_size=pre.batch_size, shuffle=True)
        optimizer = torch.optim.Adam(model.parameters(), lr=pre.lr, weight_decay=pre.weight_decay)
        model.train()
        for _ in range(pre.epochs):
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb), yb)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def __call__(self, trial: optuna.Trial) -> float:
        cfg, task = self.cfg, self.task
        search = cfg.search
        lam, lr = search.lambda_, search.lr
        lam = trial.suggest_float("lambda", lam.low, lam.high, log=lam.log)
        lr = trial.suggest_float("lr", lr.low, lr.high, log=lr.log)
        depths = search.frozen_blocks
        frozen = trial.suggest_int("frozen_blocks", int(depths.low), int(depths.high))
        mult = search.backbone_lr_mult
        if not isinstance(mult, float):  # searched: the trial's, as tlsearch's trials ask for it
            mult = trial.suggest_float("backbone_lr_mult", mult.low, mult.high, log=mult.log)
        pretrained = self._pretrain()
        x, y = task.target_train.x, task.target_train.y
        folds = StratifiedKFold(cfg.cv.k, shuffle=True, random_state=cfg.cv.seed)
        scores = []
        for fold, (tr, va) in enumerate(folds.split(x.reshape(len(x), -1), y)):
            torch.manual_seed(cfg.cv.seed * 1000 + fold)
            model = tlsearch.create_model(cfg.model, task.input_shape, task.target_classes)
            model.load_state_dict(tlsearch.backbone_state(pretrained, cfg.model), strict=False)
            model.freeze(frozen)
            optimizer = torch.optim.Adam(param_groups(model, lr, mult), lr=lr)
            data = TensorDataset(torch.from_numpy(x[tr]), torch.from_numpy(y[tr]))
            loader = DataLoader(data, batch_size=cfg.finetune.batch_size, shuffle=True)
            for _ in range(cfg.finetune.epochs):
                model.train()
                for xb, yb in loader:
                    loss = F.cross_entropy(model(xb), yb)
                    for name, p in model.named_parameters():
                        if not p.requires_grad or p.dim() < 2:
                            continue
                        if name.startswith("head."):
                            loss = loss + cfg.regularizer.head_lambda / 2 * (p**2).sum()
                        else:
                            loss = loss + lam / 2 * ((p - pretrained[name]) ** 2).sum()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            model.eval()
            correct = 0
            val = DataLoader(TensorDataset(torch.from_numpy(x[va]), torch.from_numpy(y[va])))
            with torch.no_grad():
                for xb, yb in val:
                    correct += int((model(xb).argmax(1) == yb).sum())
            scores.append(correct / len(va))
            trial.report(statistics.fmean(scores), fold)
        return statistics.fmean(scores)


# ---------------------------------------------------------------------------------------------
# Running trials side by side


def trial_params(cfg: StudyConfig, per_depth: int, seed: int = 0) -> list[dict[str, Any]]:
    """``per_depth`` points at each frozen depth: λ, lr (and the backbone's learning-rate
    multiplier where the study searches it) drawn uniformly over their searched ranges (on a log
    scale where the range says so)."""
    rng = np.random.default_rng(seed)
    search = cfg.search
    mult = search.backbone_lr_mult
    searched = {} if isinstance(mult, float) else {"backbone_lr_mult": mult}

    def draw(r: Any) -> float:
        if r.log:
            return float(np.exp(rng.uniform(np.log(r.low), np.log(r.high))))
        return float(rng.uniform(r.low, r.high))

    depths = range(int(search.frozen_blocks.low), int(search.frozen_blocks.high) + 1)
    return [
        {
            "lambda": draw(search.lambda_),
            "lr": draw(search.lr),
            "frozen_blocks": depth,
            **{name: draw(r) for name, r in searched.items()},
        }
        for _ in range(per_depth)
        for depth in depths
    ]


class Variant:
    """One way of running the trials: its study, what runs its next trial, the timings."""

    def __init__(
        self,
        name: str,
        threads: int,
        study: optuna.Study,
        run_one: Callable[[], None],
        storage: Any = None,
    ) -> None:
        self.name = name
        self.threads = threads
        self.study = study
        self.run_one = run_one
        self.storage = storage  # tlsearch's storage of the study, if it has one
        self.seconds: list[float] = []
        self.values: list[float] = []

    @property
    def label(self) -> str:
        return f"{self.name} ({self.threads}t)"

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        """Trials per minute."""
        return 60 * len(self.seconds) / sum(self.seconds)

    def step(self, queued: dict[str, Any]) -> None:
        """Run the next trial, timed; it must be ``queued``, the trial its time is labelled with
        (a study that ran a baseline trial first would time each trial under another's label)."""
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        self.run_one()
        self.seconds.append(time.perf_counter() - t0)
        done = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()]
        last = max(done, key=lambda t: t.datetime_complete)
        ran = {name: last.params.get(name) for name in queued}
        assert ran == queued and "baseline" not in last.user_attrs, (
            f"{self.label} ran {ran} {last.user_attrs.get('baseline', '')}, not {queued}"
        )
        self.values.append(last.value)


def tlsearch_variant(
    base: StudyConfig, tmp: Path, name: str, threads: int, params: list[dict[str, Any]], **ft: Any
) -> tuple[Variant, StudyContext, KFoldObjective]:
    """tlsearch as ``tlsearch run`` drives it, in its own SQLite file, with ``params`` queued:
    exactly those trials, in that order (no baseline trials, no pruner, no confirmation round)."""
    cfg = base.model_copy(
        update={
            "name": name,
            "storage": new_database(tmp, name),
            "pruner": base.pruner.model_copy(update={"name": "none", "steps": "folds"}),
            "search": base.search.model_copy(update={"baselines": []}),
            "select": base.select.model_copy(update={"confirm": 0}),
            "finetune": base.finetune.model_copy(update={"threads": threads, **ft}),
        }
    )
    study, storage, ctx = tlsearch.setup_study(cfg)
    for p in params:
        study.enqueue_trial(p)
    objective = kfold_objective(ctx)

    def run_one() -> None:
        tlsearch.run_trials(study, storage, objective, n_trials=None, max_trials=1)

    return Variant(name, threads, study, run_one, storage), ctx, objective


def new_database(tmp: Path, name: str) -> str:
    """The URL of a new SQLite file in ``tmp`` for a study of ``name`` (two variants may share a
    name and thread count: on one core, torch's default is one thread)."""
    n = len(list(tmp.glob("*.db")))
    return f"sqlite:///{tmp / name.replace(' ', '-')}-{n}.db"


def kfold_objective(ctx: StudyContext) -> KFoldObjective:
    """The study's objective, as a worker of it builds one."""
    task = ctx.task
    pretrained = tlsearch.load_checkpoint(ctx.checkpoint, ctx.device)
    return KFoldObjective(
        ctx.cfg, task.target_train, pretrained, task.input_shape, task.target_classes, ctx.device
    )


def naive_variant(
    base: StudyConfig, tmp: Path, task: TransferTask, params: list[dict[str, Any]], threads: int
) -> Variant:
    """The textbook objective in a textbook study (a SQLite URL), with ``params`` queued."""
    study = optuna.create_study(
        storage=new_database(tmp, "naive"), study_name="naive", direction="maximize"
    )
    for p in params:
        study.enqueue_trial(p)
    objective = NaiveObjective(base, task)
    return Variant("naive", threads, study, lambda: study.optimize(objective, n_trials=1))


# ---------------------------------------------------------------------------------------------
# Where the time of one trial goes


def _labelled(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapper


class _TimedStorage:
    """Adds up the wall time of this thread's calls into Optuna storages (not the heartbeat's)."""

    def __init__(self, *storages: Any) -> None:
        self.seconds = 0.0
        self._depth = 0
        self._thread = threading.get_ident()
        self._patched: list[tuple[Any, str]] = []
        for storage in storages:
            for name in dir(type(storage)):
                fn = getattr(storage, name, None)
                if not name.startswith("_") and callable(fn):
                    setattr(storage, name, self._timed(fn))
                    self._patched.append((storage, name))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if threading.get_ident() != self._thread:
                return fn(*args, **kwargs)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.seconds += time.perf_counter() - t0

        return wrapper

    def restore(self) -> None:
        for storage, name in self._patched:
            delattr(storage, name)


def breakdown(run_one: Callable[[], None], model_type: type, storage: Any) -> dict[str, float]:
    """Seconds of one trial by kind, from ``torch.profiler`` (storage from its own clock).

    The forward of ``model_type`` (the study's model), the penalty (its value and its
    closed-form gradient), ``backward()`` and the optimizer step are labelled for the profile only
    (``torch.optim`` optimizers label themselves). Top-level ops outside those (minibatch indices,
    gathering the batch, the validation slice) are "data"; what no op accounts for is Python.
    Storage is the calls this thread makes into tlsearch's storage of the study (Optuna's cache in
    front of it answers some calls from memory, which are not counted).
    """
    penalties = {tlsearch.REGULARIZERS.get(n).load() for n in tlsearch.REGULARIZERS.names()}
    patches = [
        (model_type, "forward"),
        (torch.Tensor, "backward"),
        (OPTIMIZER, "step"),
        *(
            (cls, attr)
            for cls in penalties
            if isinstance(cls, type)
            for attr in ("forward", "accumulate_grad_")
            if attr in cls.__dict__
        ),
    ]
    labels = {model_type: "forward+loss", torch.Tensor: "backward", OPTIMIZER: "optimizer"}
    originals = [(owner, attr, owner.__dict__[attr]) for owner, attr in patches]
    timer = _TimedStorage(storage)
    for owner, attr, fn in originals:
        setattr(owner, attr, _labelled(labels.get(owner, "penalty"), fn))
    try:
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            run_one()
        wall = time.perf_counter() - t0
    finally:
        for owner, attr, fn in originals:
            setattr(owner, attr, fn)
        timer.restore()
    out = dict.fromkeys(["data", "forward+loss", "penalty", "backward", "optimizer"], 0.0)
    for event in prof.events():
        if event.cpu_parent is not None:
            continue
        name = event.name
        if name.startswith("Optimizer.") or name == "optimizer":
            kind = "optimizer"
        elif name in out:
            kind = name
        elif name.startswith("autograd::engine"):
            kind = "backward"
        elif name in ("aten::cross_entropy_loss", "aten::sum", "aten::add", "aten::mean"):
            kind = "forward+loss"  # the loss of the batch, outside the model's forward
        else:
            kind = "data"
        out[kind] += event.cpu_time_total / 1e6
    out["storage"] = timer.seconds
    out["python and other"] = max(0.0, wall - sum(out.values()))
    out["total"] = wall
    return out


def step_over_bare(objective: KFoldObjective, depth: int, repeats: int = 2) -> tuple[float, float]:
    """Seconds of one fine-tuning step and of the bare forward+backward alone.

    The step is the marginal cost: fine-tuning for E + 1 epochs minus 1 epoch, over E epochs'
    steps, so model set-up is not counted; the difference is nearly all of the longer run, so
    its noise is not magnified (as a difference of 2E and E epochs magnified it). Same model
    (channels-last, trained blocks only), same batches (fold 0 and its seed). Each of the three
    is the best of ``repeats``, taken in turn, and timed by this thread's CPU time: on one torch
    thread every op runs on it, and the time a shared machine gives to other work is not
    counted (by the wall clock, the ResNet's step swung 2x between runs at a load of 4 on 2
    cores).
    """
    cfg = objective.cfg
    params = probe_params(cfg, depth)
    x, y, trains, seeds = fold_inputs(objective, depth)
    xs, ys, seed = x[trains[0]], y[trains[0]], seeds[0]
    epochs = cfg.finetune.epochs
    batches_per_epoch = -(-len(ys) // cfg.finetune.batch_size)

    def fit(n_epochs: int) -> tuple[float, torch.nn.Module]:
        t0 = time.thread_time()
        model = fine_tune(objective, params, xs, ys, seed, n_epochs)
        return time.thread_time() - t0, model

    _, model = fit(epochs)  # a warm-up, and the model the bare passes run
    g = torch.Generator().manual_seed(seed)
    batches = [
        (xs[i], ys[i]) for i in torch.randperm(len(ys), generator=g).split(cfg.finetune.batch_size)
    ]
    model.train()

    def bare() -> None:
        for xb, yb in batches:
            F.cross_entropy(model(xb, start=depth), yb).backward()

    bare()
    shorts, longs, bares = [], [], []
    for _ in range(repeats):
        shorts.append(fit(1)[0])
        longs.append(fit(epochs + 1)[0])
        t0 = time.thread_time()
        for _ in range(epochs):
            bare()
        bares.append(time.thread_time() - t0)
    step = (min(longs) - min(shorts)) / (epochs * batches_per_epoch)
    return step, min(bares) / (epochs * len(batches))


def step_parts(objective: KFoldObjective, depth: int, repeats: int = 200) -> tuple[float, float]:
    """Seconds of a step's optimizer update and of its penalty's gradient, each timed alone.

    What a fine-tuning step adds to the forward+backward besides these two is the minibatch
    gather, dropping the old gradients, the epoch's draw and divergence check, and Python. The
    model is the one fine-tuning builds (its trained parameters; the optimizer as fine-tuning runs
    it); the penalty is the study's, over the same model. CPU time of this thread, as
    :func:`step_over_bare`.
    """
    cfg = objective.cfg
    params = probe_params(cfg, depth)
    x, y, trains, seeds = fold_inputs(objective, depth)
    xs, ys = x[trains[0]], y[trains[0]]
    model = fine_tune(objective, params, xs, ys, seeds[0], epochs=1)
    model.train()
    optimizer = fine_tuning_optimizer(model, params)
    penalty = tlsearch.REGULARIZERS.create(
        params.regularizer,
        model,
        objective.pretrained,
        params.lambda_,
        head_lambda=cfg.regularizer.head_lambda,
        penalize=cfg.regularizer.penalize,
    )
    F.cross_entropy(model(xs, start=depth), ys).backward()

    def per_call(fn: Callable[[], Any]) -> float:
        fn()
        t0 = time.thread_time()
        for _ in range(repeats):
            fn()
        return (time.thread_time() - t0) / repeats

    return per_call(optimizer.step), per_call(penalty.accumulate_grad_)


def folds_together(objective: KFoldObjective, depth: int, repeats: int = 2) -> tuple[float, float]:
    """Seconds to train all folds one by one, and all at once (forced, even where auto is off)."""
    params = probe_params(objective.cfg, depth)
    x, y, trains, seeds = fold_inputs(objective, depth)
    one, together = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for tr, seed in zip(trains, seeds, strict=True):
            fine_tune(objective, params, x[tr], y[tr], seed)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        stacked = torch.stack(trains)
        fine_tune_folds(objective, params, x[stacked], y[stacked], seeds)
        together.append(time.perf_counter() - t0)
    return min(one), min(together)


def probe_params(cfg: StudyConfig, depth: int) -> TrialParams:
    """Fixed parameters for the measurements below at frozen depth ``depth``: λ 0.1, lr 1e-3, and
    the backbone's learning-rate multiplier the study fixes, or plain fine-tuning's 1 (its
    baseline's) where it searches one."""
    mult = cfg.search.backbone_lr_mult
    return TrialParams(
        lambda_=0.1,
        lr=1e-3,
        frozen_blocks=depth,
        backbone_lr_mult=mult if isinstance(mult, float) else 1.0,
        regularizer=cfg.regularizer.names[0],
    )


def param_groups(model: torch.nn.Module, lr: float, mult: float) -> list[dict[str, Any]]:
    """Fine-tuning's optimizer groups: the head at ``lr``, the trained blocks at ``lr × mult``."""
    backbone = [p for p in model.blocks.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": list(model.head.parameters())}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * mult})
    return groups


# ---------------------------------------------------------------------------------------------
# What this benchmark asks of tlsearch's fine-tuning internals (tlsearch.training, and the
# objective's fold data): these functions and the optimizer's class alone call them.

# The optimizer fine-tuning runs on the CPU (finetune.optimizer = "adam"), whose step the profile
# labels.
OPTIMIZER = FusedAdam


def fold_inputs(
    objective: KFoldObjective, depth: int
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[int]]:
    """The training split's inputs to block ``depth`` (the objective's frozen-feature cache), its
    labels, and each search fold's training indices and fine-tuning seed."""
    search = objective.search_folds  # the confirmation round's fresh folds are not a trial's
    return (
        objective.frozen_features(depth),
        objective.y,
        [objective.folds[f][0] for f in search],
        [objective.seeds[f] for f in search],
    )


def fine_tune(
    objective: KFoldObjective,
    params: TrialParams,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    epochs: int | None = None,
) -> torch.nn.Module:
    """One fold's model fine-tuned from the objective's checkpoint on ``x`` (inputs to block
    ``params.frozen_blocks``), for ``epochs`` (default: the study's)."""
    cfg = objective.cfg
    if epochs is not None:
        cfg = cfg.model_copy(
            update={"finetune": cfg.finetune.model_copy(update={"epochs": epochs})}
        )
    return tlsearch.finetune(
        objective.pretrained,
        cfg,
        params,
        x,
        y,
        objective.num_classes,
        objective.input_shape,
        seed,
        start=params.frozen_blocks,
    )


def fine_tune_folds(
    objective: KFoldObjective,
    params: TrialParams,
    x: torch.Tensor,
    y: torch.Tensor,
    seeds: list[int],
) -> None:
    """Several folds' models fine-tuned together (one stacked model): ``x``, ``y`` stacked by fold."""
    tlsearch.finetune_folds(
        objective.pretrained,
        objective.cfg,
        params,
        x,
        y,
        objective.num_classes,
        objective.input_shape,
        seeds,
        start=params.frozen_blocks,
    )


def trains_folds_together(objective: KFoldObjective, params: TrialParams) -> bool:
    """Whether the objective's schedule stacks a search trial's first folds with ``params``
    (fold batching ``auto``)."""
    recipe = Recipe(
        objective.pretrained, objective.cfg, params, objective.num_classes, objective.input_shape
    )
    _, _, trains, seeds = fold_inputs(objective, params.frozen_blocks)
    held = [objective.folds[f][1] for f in objective.search_folds]
    plan = TrialFolds(recipe, list(zip(trains, held, strict=True)), seeds)
    return len(objective.schedule.groups(params, plan)[0]) > 1


def fine_tuning_optimizer(model: torch.nn.Module, params: TrialParams) -> torch.optim.Optimizer:
    """The optimizer fine-tuning builds for ``model`` on the CPU."""
    return OPTIMIZER(param_groups(model, params.lr, params.backbone_lr_mult), lr=params.lr)


# ---------------------------------------------------------------------------------------------
# The arithmetic


def count_flops(run: Callable[[], Any]) -> float:
    """Floating-point operations of ``run()`` (matmuls and convolutions, forward and backward), by
    ``torch.utils.flop_counter``: the arithmetic itself, whatever its speed."""
    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of one float32 ``size``² matmul on this thread count: what the core does at best."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


# ---------------------------------------------------------------------------------------------
# A real network as a plug-in: the example ResNet


def resnet_objectives(base: StudyConfig, task: str) -> tuple[KFoldObjective, KFoldObjective]:
    """The example ResNet's objective on ``task``, with tlsearch's defaults and on its plain path
    (cache and fold batching off); the base study's shots, folds, epochs and penalty, 1 thread."""
    if str(RESNET_PLUGIN) not in sys.path:
        sys.path.insert(0, str(RESNET_PLUGIN))
    tlsearch.load_plugins(["tlsearch_resnet"])
    data = base.to_dict()
    data["data"]["task"] = task
    data["model"] = {"name": "resnet"}
    data["finetune"]["threads"] = 1
    # Every depth, up to the whole backbone: the entry's block count at its default options.
    entry = tlsearch.MODELS.get("resnet")
    n_blocks = entry.blocks(entry.validate_options({}, "model"))
    data["search"]["frozen_blocks"] = {"low": 0, "high": n_blocks, "step": 1}
    ctx = tlsearch.prepare(tlsearch.config_from_dict(data))
    cached = kfold_objective(ctx)
    ft = ctx.cfg.finetune.model_copy(update={"cache_frozen": False, "fold_batching": "off"})
    plain = KFoldObjective(
        ctx.cfg.model_copy(update={"finetune": ft}),
        ctx.task.target_train,
        cached.pretrained,
        cached.input_shape,
        cached.num_classes,
        ctx.device,
    )
    return cached, plain


def resnet_section(base: StudyConfig, task: str, budget: Budget) -> None:
    """Measure the example ResNet at every frozen depth and print its table (see the docstring)."""
    torch.set_num_threads(1)
    cached, plain = resnet_objectives(base, task)
    cfg = cached.cfg
    depths = range(int(cfg.search.frozen_blocks.high) + 1)
    model = tlsearch.create_model(cfg.model, cached.input_shape, cached.num_classes)
    rows: list[list[str]] = []
    ratios: dict[int, float] = {}
    repeats = budget.resnet_repeats
    for d in depths:
        probe = probe_params(cfg, d)
        fixed = probe.to_dict()  # what the trial asks for (and the regularizer, unasked)
        seconds: dict[str, list[float]] = {"cached": [], "plain": []}
        # Alternating, best of ``repeats``: the first trial at a depth also builds the cache.
        for _ in range(repeats):
            for name, obj in (("cached", cached), ("plain", plain)):
                t0 = time.perf_counter()
                obj(optuna.trial.FixedTrial(fixed))
                seconds[name].append(time.perf_counter() - t0)
        step, bare = step_over_bare(cached, d, repeats)
        update, penalty = step_parts(cached, d, budget.calls)
        trained = sum(p.numel() for p in model.blocks[d:].parameters())
        t_cached, t_plain = min(seconds["cached"]), min(seconds["plain"])
        rows.append(
            [
                str(d),
                str(trained),
                f"{t_cached:.2f}",
                f"{t_plain:.2f}",
                f"{t_plain / t_cached:.1f}x",
                *(f"{t * 1e3:.3f}" for t in (step, bare)),
                f"{step / bare:.2f}",
                *(f"{t * 1e3:.3f}" for t in (update, penalty, step - bare - update - penalty)),
            ]
        )
        ratios[d] = step / bare
        print(f"resnet, frozen_blocks={d}: " + "  ".join(rows[-1][2:]), flush=True)

    options = cfg.model.options
    print()
    print(
        f"example ResNet plug-in (examples/tlsearch-resnet: width {options['width']}, "
        f"{options['stages']} stages of {options['blocks_per_stage']} basic block(s), "
        f"{len(depths)} blocks)\non {task} {'x'.join(map(str, cached.input_shape))}, "
        f"{cfg.data.shots} shots, {cfg.cv.k} folds, {cfg.finetune.epochs} epochs, "
        f"{cfg.regularizer.names[0]}, 1 thread; trial seconds best of {repeats}; the step is "
        "the marginal cost of one, against the bare forward+backward of its model on its batches:"
    )
    header = ["frozen", "trained block params", "tlsearch s/trial", "plain path s/trial"]
    header += ["cache gain", "step ms", "forward+backward ms", "ratio"]
    print(_table([*header, "of it: Adam ms", "penalty ms", "other ms"], rows))
    print(
        "(the step's extra over its forward+backward: the Adam update and the penalty's gradient,\n"
        "each timed alone; other: the minibatch gather, dropping the old gradients, the epoch's\n"
        "draw and divergence check, and Python, by difference)"
    )
    print(f"a fine-tuning step against its bare forward+backward: {verdict(ratios)}")


# ---------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    return "\n".join(lines)


def verdict(ratios: dict[int, float]) -> str:
    """Where a step costs more than :data:`STEP_OVER_BARE_MAX` × its bare forward+backward."""
    slow = [str(d) for d, ratio in ratios.items() if ratio > STEP_OVER_BARE_MAX]
    if slow:
        return f"past {STEP_OVER_BARE_MAX}x at frozen_blocks {', '.join(slow)}"
    return f"at most {STEP_OVER_BARE_MAX}x at every frozen depth"


@dataclass(frozen=True)
class Budget:
    """How much each measurement runs: trials per frozen depth, timings per measurement (the
    best is kept), calls of a step's parts, and the size of the peak's matmul."""

    per_depth: int = 2
    repeats: int = 2
    resnet_repeats: int = 3
    calls: int = 200
    matmul: int = 1024


# --smoke: every measurement once, on the smoke study (benchmarks/_smoke.py).
SMOKE = Budget(per_depth=1, repeats=1, resnet_repeats=1, calls=5, matmul=256)


@dataclass
class Trials:
    """The trials run side by side (:func:`side_by_side`): the variants, in the order they ran."""

    params: list[dict[str, Any]]
    naive: Variant
    fast: Variant
    naive1: Variant
    fast1: Variant
    plain1: Variant
    ctx: StudyContext
    objective: KFoldObjective

    @property
    def variants(self) -> list[Variant]:
        return [self.naive, self.fast, self.naive1, self.fast1, self.plain1]

    @property
    def depths(self) -> list[int]:
        return sorted({p["frozen_blocks"] for p in self.params})

    def at(self, depth: int) -> list[int]:
        """The indices of the trials at frozen depth ``depth``."""
        return [i for i, p in enumerate(self.params) if p["frozen_blocks"] == depth]


def side_by_side(base: StudyConfig, tmp: Path, params: list[dict[str, Any]]) -> Trials:
    """Every variant's trials, alternating: the naive objective and tlsearch on torch's default
    thread count and on one, and tlsearch's plain path on one."""
    threads = torch.get_num_threads()
    fast, ctx, objective = tlsearch_variant(base, tmp, "tlsearch", threads, params)
    trials = Trials(
        params,
        naive=naive_variant(base, tmp, ctx.task, params, threads),
        fast=fast,
        naive1=naive_variant(base, tmp, ctx.task, params, 1),
        fast1=tlsearch_variant(base, tmp, "tlsearch", 1, params)[0],
        plain1=tlsearch_variant(
            base, tmp, "plain path", 1, params, cache_frozen=False, fold_batching="off"
        )[0],
        ctx=ctx,
        objective=objective,
    )
    for i, p in enumerate(params):
        for v in trials.variants:
            v.step(p)
        print(
            f"trial {i} (frozen_blocks={p['frozen_blocks']}): "
            + "  ".join(f"{v.label} {v.seconds[-1]:.2f}s" for v in trials.variants),
            flush=True,
        )
    return trials


@dataclass
class Parts:
    """The finer measurements on one thread (:func:`measure_parts`)."""

    batching: list[tuple[str, int, KFoldObjective, tuple[float, float]]]
    steps: dict[int, tuple[float, float]]
    profiles: dict[int, dict[str, float]]
    work: dict[int, tuple[float, float]]
    peak: float


def measure_parts(base: StudyConfig, trials: Trials, budget: Budget) -> Parts:
    """Folds together against one by one (the study's model and an MLP), a step against its bare
    forward+backward at each depth, a profile of one trial at two depths, the arithmetic of a
    trial of each objective, and the core's matmul peak; on one thread, steadier on a shared
    machine."""
    torch.set_num_threads(1)
    objective, depths, repeats = trials.objective, trials.depths, budget.repeats
    batching = [
        (base.model.name, d, objective, folds_together(objective, d, repeats)) for d in depths
    ]
    # The same for an MLP of 256-128, whose blocks are matmuls of several sizes.
    mlp_dict = objective.cfg.to_dict()
    mlp_dict["model"] = {"name": "mlp", "hidden": [256, 128]}
    mlp_dict["finetune"]["threads"] = 1
    mlp_dict["search"]["frozen_blocks"] = {"low": 0, "high": 2, "step": 1}
    mlp = kfold_objective(tlsearch.prepare(tlsearch.config_from_dict(mlp_dict)))
    batching += [("mlp", d, mlp, folds_together(mlp, d, repeats)) for d in range(3)]
    steps = {d: step_over_bare(objective, d, repeats) for d in depths}
    # One more trial at two depths, profiled (queued: the same trials as above).
    task = trials.ctx.task
    model_type = type(tlsearch.create_model(base.model, task.input_shape, task.target_classes))
    profiles = {}
    for d in [d for d in (0, 2) if d in depths]:
        trials.fast1.study.enqueue_trial(trials.params[trials.at(d)[0]])
        profiles[d] = breakdown(trials.fast1.run_one, model_type, trials.fast1.storage)
    # The arithmetic of one trial at each depth, for both objectives (outside any study).
    naive_objective = NaiveObjective(base, task)
    work = {}
    for d in depths:
        fixed = optuna.trial.FixedTrial(trials.params[trials.at(d)[0]])
        work[d] = (
            count_flops(lambda f=fixed: naive_objective(f)),
            count_flops(lambda f=fixed: objective(f)),
        )
    return Parts(batching, steps, profiles, work, matmul_peak(budget.matmul))


def print_trials(trials: Trials) -> None:
    """Seconds per trial of each variant against the naive objective, overall and by depth."""
    rows = []
    for v in trials.variants:
        ref = trials.naive if v.threads == trials.naive.threads else trials.naive1
        rows.append(
            [
                v.name,
                str(v.threads),
                f"{v.median:.2f}",
                f"{v.rate:.1f}",
                f"{ref.median / v.median:.1f}x",
                f"{v.rate / ref.rate:.1f}x",
                f"{statistics.fmean(v.values):.3f}",
            ]
        )
    header = ["objective", "threads", "median s/trial", "trials/min", "ratio (median)"]
    print(_table([*header, "ratio (trials/min)", "mean cv"], rows))
    print(
        "(ratios against the naive objective on the same number of threads; mean cv only shows\n"
        "that both learn: the naive objective pretrains its own source model and seeds fold 0\n"
        "like it, so its fold-0 head starts as the source model's initial head, a leak tlsearch\n"
        "avoids)"
    )

    print()
    print("seconds per trial at each frozen depth (median over its trials):")
    rows = []
    for d in trials.depths:
        med = [statistics.median(v.seconds[i] for i in trials.at(d)) for v in trials.variants]
        by = dict(zip(trials.variants, med, strict=True))
        fast1 = by[trials.fast1]
        ratios = [by[trials.plain1] / fast1, by[trials.naive1] / fast1]
        rows.append([str(d), *(f"{m:.2f}" for m in med), *(f"{r:.1f}x" for r in ratios)])
    header = ["frozen", *(v.label for v in trials.variants)]
    print(_table([*header, "cache+batching (1t)", "tlsearch vs naive (1t)"], rows))


def print_parts(trials: Trials, parts: Parts) -> None:
    """The tables of :class:`Parts` but the arithmetic's."""
    print("folds trained together (torch.func.vmap) vs one by one; all folds, cache on, 1 thread:")
    rows = []
    for name, d, obj, (one, together) in parts.batching:
        model = tlsearch.create_model(obj.cfg.model, obj.input_shape, obj.num_classes)
        trained = sum(p.numel() for p in model.blocks[d:].parameters())
        auto = trains_folds_together(obj, probe_params(obj.cfg, d))
        cells = [f"{one:.2f}", f"{together:.2f}", f"{one / together:.2f}x"]
        rows.append([name, str(d), str(trained), *cells, "together" if auto else "one by one"])
    header = ["model", "frozen", "trained block params", "one by one s", "together s", "gain"]
    print(_table([*header, "auto (no pruner)"], rows))

    print()
    print("one fine-tuning step (marginal cost) vs the bare forward+backward of the same model on")
    print("the same batches, 1 thread; the trial mix weighs each depth by its trials:")
    steps = parts.steps
    rows = [
        [str(d), f"{s * 1e3:.3f}", f"{b * 1e3:.3f}", f"{s / b:.2f}"] for d, (s, b) in steps.items()
    ]
    # Every trial of the mix takes the same steps (folds x epochs x minibatches).
    step, bare = (sum(len(trials.at(d)) * steps[d][i] for d in steps) for i in (0, 1))
    n = len(trials.params)
    rows.append(
        ["trial mix", f"{step / n * 1e3:.3f}", f"{bare / n * 1e3:.3f}", f"{step / bare:.2f}"]
    )
    print(_table(["frozen", "step ms", "forward+backward ms", "ratio"], rows))
    print(
        f"a fine-tuning step against its bare forward+backward: {step / bare:.2f}x over the trial "
        f"mix (goal: at most {STEP_OVER_BARE_MAX}x); "
        + verdict({d: s / b for d, (s, b) in steps.items()})
    )

    print()
    print(
        "where one trial's time goes (torch.profiler, 1 thread; the profiler's own overhead lands"
    )
    print("in 'python and other', see the unprofiled trials of the same depth):")
    profiles = parts.profiles
    kinds = [k for k in next(iter(profiles.values())) if k != "total"]
    rows = [
        [
            kind,
            *(f"{p[kind]:.3f} s ({100 * p[kind] / p['total']:.0f}%)" for p in profiles.values()),
        ]
        for kind in kinds
    ]
    rows.append(["total", *(f"{p['total']:.3f} s" for p in profiles.values())])
    unprofiled = [
        statistics.median(trials.fast1.seconds[i] for i in trials.at(d)) for d in profiles
    ]
    rows.append(["unprofiled (median)", *(f"{t:.3f} s" for t in unprofiled)])
    print(_table(["", *(f"frozen_blocks={d}" for d in profiles)], rows))


def print_arithmetic(base: StudyConfig, trials: Trials, parts: Parts, budget: Budget) -> None:
    """The FLOPs of one trial of each objective against the rate each runs them at and the peak."""
    print("arithmetic of one trial (matmul and convolution FLOPs, forward and backward) and the")
    print("rate each objective runs it at, 1 thread (seconds: the medians above):")
    rows = []
    sums = [0.0, 0.0, 0.0, 0.0]
    for d in trials.depths:
        naive_flops, fast_flops = parts.work[d]
        t_naive = statistics.median(trials.naive1.seconds[i] for i in trials.at(d))
        t_fast = statistics.median(trials.fast1.seconds[i] for i in trials.at(d))
        for j, v in enumerate((naive_flops, fast_flops, t_naive, t_fast)):
            sums[j] += v
        rows.append([str(d), *_rates(naive_flops, fast_flops, t_naive, t_fast)])
    naive_flops, fast_flops, t_naive, t_fast = sums
    rows.append(["all", *_rates(naive_flops, fast_flops, t_naive, t_fast)])
    header = ["frozen", "naive GFLOP", "tlsearch GFLOP", "less work", "naive GFLOP/s"]
    print(_table([*header, "tlsearch GFLOP/s"], rows))
    work_ratio = naive_flops / fast_flops
    rate_ratio = (fast_flops / t_fast) / (naive_flops / t_naive)
    need = 20 / work_ratio * naive_flops / t_naive
    # Every step at the cost of its bare forward+backward (PyTorch's kernels, nothing else):
    # k folds x epochs x minibatches per epoch, one by one.
    n_train = len(fold_inputs(trials.objective, 0)[2][0])
    steps_per_trial = base.cv.k * base.finetune.epochs * -(-n_train // base.finetune.batch_size)
    bare_trial = sum(parts.steps[d][1] * steps_per_trial for d in trials.depths)
    peak, size = parts.peak, budget.matmul
    print(
        f"if every step cost only its bare forward+backward (the table above): "
        f"{t_naive / bare_trial:.1f}x\n"
        f"float32 matmul peak of this core ({size}x{size}, 1 thread): {peak / 1e9:.1f} GFLOP/s\n"
        f"speedup (medians, the trial mix) = less work x faster arithmetic = {work_ratio:.1f} x "
        f"{rate_ratio:.2f} = {work_ratio * rate_ratio:.1f}x\n"
        f"20x over the same mix needs tlsearch at {need / 1e9:.0f} GFLOP/s, "
        f"{100 * need / peak:.0f}% of the matmul peak, on minibatches of 8-32 images; "
        f"with no time but arithmetic at the peak, the speedup would be "
        f"{t_naive / (fast_flops / peak):.0f}x"
    )


def _rates(naive_flops: float, fast_flops: float, t_naive: float, t_fast: float) -> list[str]:
    return [
        f"{naive_flops / 1e9:.1f}",
        f"{fast_flops / 1e9:.2f}",
        f"{naive_flops / fast_flops:.1f}x",
        f"{naive_flops / t_naive / 1e9:.1f}",
        f"{fast_flops / t_fast / 1e9:.1f}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "studies" / "digits.toml")
    parser.add_argument("--per-depth", type=int, default=2, help="trials at each frozen depth")
    parser.add_argument(
        "--resnet-task", default="digits-noisy", help="the task of the example ResNet's rows"
    )
    parser.add_argument(
        "--resnet-repeats", type=int, default=3, help="ResNet timings per depth and path (best of)"
    )
    parser.add_argument(
        "--only-resnet", action="store_true", help="measure the example ResNet's rows alone"
    )
    _smoke.add_arguments(parser)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with _smoke.directory(args) as tmp:
        if args.smoke:
            # One epoch of pretraining: what the source models learn does not matter here.
            base = tlsearch.config_from_dict(_smoke.study(tmp / "cache", pretrain={"epochs": 1}))
            budget = SMOKE
        else:
            base = tlsearch.load_config(args.config)
            budget = Budget(per_depth=args.per_depth, resnet_repeats=args.resnet_repeats)
        if args.only_resnet:
            resnet_section(base, args.resnet_task, budget)
            return
        load0 = os.getloadavg()[0]
        trials = side_by_side(base, tmp, trial_params(base, budget.per_depth))
        parts = measure_parts(base, trials, budget)
        load1 = os.getloadavg()[0]

        print()
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"(default threads {trials.fast.threads}); load average {load0:.1f} before, "
            f"{load1:.1f} after"
        )
        print(
            f"study: {base.data.task}, {base.model.name}, {base.data.shots} shots, {base.cv.k} "
            f"folds, {base.finetune.epochs} epochs; {len(trials.params)} trials "
            f"({budget.per_depth} per depth), the same for every row, SQLite storage, no pruner"
        )
        print()
        print_trials(trials)
        print()
        print_parts(trials, parts)
        print()
        print_arithmetic(base, trials, parts, budget)
        print()
        resnet_section(base, args.resnet_task, budget)

    fast, naive, fast1, naive1 = trials.fast, trials.naive, trials.fast1, trials.naive1
    print()
    print(
        f"speedup on torch's default {fast.threads} threads: {fast.rate / naive.rate:.1f}x "
        "(trials/min; swings with other work on the machine, see the trials above)"
    )
    print(f"speedup: {fast1.rate / naive1.rate:.1f}x")


if __name__ == "__main__":
    main()
