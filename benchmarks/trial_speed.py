"""How fast is one trial? tlsearch's objective against the textbook way, side by side.

Both run the same trials (the same λ, lr and frozen depth, queued in the same order) with the same
folds and epochs of the digits study (studies/digits.toml: mnist-noisy, CNN, 5 shots, 5 folds, 60
epochs), each in a real Optuna study in SQLite, so storage is counted. No pruner: every trial runs
every fold.

* naive: the textbook objective: the source model pretrained inside every trial, a per-sample
  ``DataLoader`` over a ``TensorDataset``, the penalty summed in a Python loop over parameters.
* tlsearch: ``KFoldObjective`` as ``tlsearch run`` drives it (``setup_study``, ``run_trials``) with
  its defaults (frozen-feature cache, folds trained together where that pays); and its plain path
  (cache and fold batching off) to show what those two buy.

Each runs on torch's default thread count (the machine's cores) and on one thread. The trials of
all variants alternate (naive trial 1, tlsearch trial 1, ..., naive trial 2, ...), so a machine
shared with other work slows them alike. Then, on one thread: seconds per trial at each frozen
depth, folds trained together against one by one, a breakdown of one trial from ``torch.profiler``,
one fine-tuning step against the bare forward+backward of the same model on the same batches, and
the arithmetic of one trial of each objective (``torch.utils.flop_counter``) against the rate each
runs it at and this core's float32 matmul peak: how much of the speedup is work removed, how much
is faster arithmetic, and how close to the limit that is.

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
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

import tlsearch
from tlsearch import KFoldObjective, StudyConfig, TrialParams

# Not in tlsearch's public API (README, Architecture), needed here: the trial loop `tlsearch run`
# drives (storage, heartbeats, budget), the folds trained together, and the optimizer whose step
# the profile labels.
from tlsearch.training.adam import FusedAdam

if TYPE_CHECKING:
    # What tlsearch.prepare and tlsearch.load_task return.
    from tlsearch import StudyContext, TransferTask

ROOT = Path(__file__).resolve().parent.parent
# The example model plug-in (README, "Bring your own network"), used from its source folder.
RESNET_PLUGIN = ROOT / "examples" / "tlsearch-resnet"
# A fine-tuning step may cost this much more than the bare forward+backward of its model (the
# issue's bound for the ResNet); the ResNet's table says where it is passed, and by what.
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
        lam = trial.suggest_float("lambda", 1e-4, 100.0, log=True)
        lr = trial.suggest_float("lr", 1e-4, 3e-2, log=True)
        frozen = trial.suggest_int("frozen_blocks", 0, 3)
        pretrained = self._pretrain()
        x, y = task.target_train.x, task.target_train.y
        folds = StratifiedKFold(cfg.cv.k, shuffle=True, random_state=cfg.cv.seed)
        scores = []
        for fold, (tr, va) in enumerate(folds.split(x.reshape(len(x), -1), y)):
            torch.manual_seed(cfg.cv.seed * 1000 + fold)
            model = tlsearch.create_model(cfg.model, task.input_shape, task.target_classes)
            model.load_state_dict(tlsearch.backbone_state(pretrained, cfg.model), strict=False)
            model.freeze(frozen)
            backbone = [p for p in model.blocks.parameters() if p.requires_grad]
            groups = [{"params": model.head.parameters()}]
            if backbone:
                mult = cfg.search.backbone_lr_mult
                groups.append({"params": backbone, "lr": lr * mult})
            optimizer = torch.optim.Adam(groups, lr=lr)
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
    """``per_depth`` (λ, lr) points at each frozen depth, log-uniform over the searched ranges."""
    rng = np.random.default_rng(seed)
    lam, lr = cfg.search.lambda_, cfg.search.lr

    def log_uniform(r: Any) -> float:
        return float(np.exp(rng.uniform(np.log(r.low), np.log(r.high))))

    depths = range(int(cfg.search.frozen_blocks.low), int(cfg.search.frozen_blocks.high) + 1)
    return [
        {"lambda": log_uniform(lam), "lr": log_uniform(lr), "frozen_blocks": depth}
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

    def step(self) -> None:
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        self.run_one()
        self.seconds.append(time.perf_counter() - t0)
        done = [t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()]
        self.values.append(max(done, key=lambda t: t.datetime_complete).value)


def tlsearch_variant(
    base: StudyConfig, tmp: Path, name: str, threads: int, params: list[dict[str, Any]], **ft: Any
) -> tuple[Variant, StudyContext, KFoldObjective]:
    """tlsearch as ``tlsearch run`` drives it, in its own SQLite file, with ``params`` queued:
    exactly those trials, in that order (no baseline trials, no pruner, no confirmation round)."""
    cfg = base.model_copy(
        update={
            "name": name,
            "storage": f"sqlite:///{tmp / name.replace(' ', '-')}{threads}.db",
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
        storage=f"sqlite:///{tmp / 'naive'}{threads}.db", study_name="naive", direction="maximize"
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
        (FusedAdam, "step"),
        *(
            (cls, attr)
            for cls in penalties
            if isinstance(cls, type)
            for attr in ("forward", "accumulate_grad_")
            if attr in cls.__dict__
        ),
    ]
    labels = {model_type: "forward+loss", torch.Tensor: "backward", FusedAdam: "optimizer"}
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
    tr = objective.folds[0][0]
    xs, ys = objective.frozen_features(depth)[tr], objective.y[tr]
    seed = objective.seeds[0]
    epochs = cfg.finetune.epochs
    batches_per_epoch = -(-len(tr) // cfg.finetune.batch_size)

    def fit(n_epochs: int) -> tuple[float, torch.nn.Module]:
        c = cfg.model_copy(
            update={"finetune": cfg.finetune.model_copy(update={"epochs": n_epochs})}
        )
        t0 = time.thread_time()
        model = tlsearch.finetune(
            objective.pretrained,
            c,
            params,
            xs,
            ys,
            objective.num_classes,
            objective.input_shape,
            seed,
            start=depth,
        )
        return time.thread_time() - t0, model

    _, model = fit(epochs)  # a warm-up, and the model the bare passes run
    g = torch.Generator().manual_seed(seed)
    batches = [
        (xs[i], ys[i]) for i in torch.randperm(len(tr), generator=g).split(cfg.finetune.batch_size)
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
    model is the one fine-tuning builds (its trained parameters; Adam as fine-tuning runs it on
    the CPU, ``finetune.optimizer = "adam"``); the penalty is the study's, over the same model.
    CPU time of this thread, as :func:`step_over_bare`.
    """
    cfg = objective.cfg
    params = probe_params(cfg, depth)
    tr = objective.folds[0][0]
    xs, ys = objective.frozen_features(depth)[tr], objective.y[tr]
    one_epoch = cfg.model_copy(update={"finetune": cfg.finetune.model_copy(update={"epochs": 1})})
    model = tlsearch.finetune(
        objective.pretrained,
        one_epoch,
        params,
        xs,
        ys,
        objective.num_classes,
        objective.input_shape,
        objective.seeds[0],
        start=depth,
    )
    model.train()
    backbone = [p for p in model.blocks.parameters() if p.requires_grad]
    groups = [{"params": list(model.head.parameters())}]
    if backbone:
        groups.append({"params": backbone, "lr": params.lr * params.backbone_lr_mult})
    optimizer = FusedAdam(groups, lr=params.lr)
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
    cfg = objective.cfg
    params = probe_params(cfg, depth)
    x = objective.frozen_features(depth)
    args = (objective.num_classes, objective.input_shape)
    search = objective.search_folds  # the confirmation round's fresh folds are not a trial's
    train = torch.stack([objective.folds[f][0] for f in search])
    seeds = [objective.seeds[f] for f in search]
    one, together = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for f, seed in zip(search, seeds, strict=True):
            tr = objective.folds[f][0]
            tlsearch.finetune(
                objective.pretrained, cfg, params, x[tr], objective.y[tr], *args, seed, start=depth
            )
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tlsearch.finetune_folds(
            objective.pretrained,
            cfg,
            params,
            x[train],
            objective.y[train],
            *args,
            seeds,
            start=depth,
        )
        together.append(time.perf_counter() - t0)
    return min(one), min(together)


def probe_params(cfg: StudyConfig, depth: int) -> TrialParams:
    """Fixed parameters for the measurements below (λ 0.1, lr 1e-3) at frozen depth ``depth``."""
    return TrialParams(
        lambda_=0.1,
        lr=1e-3,
        frozen_blocks=depth,
        backbone_lr_mult=cfg.search.backbone_lr_mult,
        regularizer=cfg.regularizer.names[0],
    )


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


def resnet_section(base: StudyConfig, task: str, repeats: int) -> None:
    """Measure the example ResNet at every frozen depth and print its table (see the docstring)."""
    torch.set_num_threads(1)
    cached, plain = resnet_objectives(base, task)
    cfg = cached.cfg
    depths = range(int(cfg.search.frozen_blocks.high) + 1)
    model = tlsearch.create_model(cfg.model, cached.input_shape, cached.num_classes)
    rows: list[list[str]] = []
    slow: list[int] = []
    for d in depths:
        probe = probe_params(cfg, d)
        fixed = {"lambda": probe.lambda_, "lr": probe.lr, "frozen_blocks": d}
        seconds: dict[str, list[float]] = {"cached": [], "plain": []}
        # Alternating, best of ``repeats``: the first trial at a depth also builds the cache.
        for _ in range(repeats):
            for name, obj in (("cached", cached), ("plain", plain)):
                t0 = time.perf_counter()
                obj(optuna.trial.FixedTrial(fixed))
                seconds[name].append(time.perf_counter() - t0)
        step, bare = step_over_bare(cached, d, repeats)
        update, penalty = step_parts(cached, d)
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
        if step / bare > STEP_OVER_BARE_MAX:
            slow.append(d)
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
    verdict = (
        f"past {STEP_OVER_BARE_MAX}x at frozen_blocks {', '.join(map(str, slow))}"
        if slow
        else f"at most {STEP_OVER_BARE_MAX}x at every frozen depth"
    )
    print(f"a fine-tuning step against its bare forward+backward: {verdict}")


# ---------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    return "\n".join(lines)


def main() -> None:
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
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    base = tlsearch.load_config(args.config)
    if args.only_resnet:
        resnet_section(base, args.resnet_task, args.resnet_repeats)
        return
    params = trial_params(base, args.per_depth)
    default_threads = torch.get_num_threads()
    load0 = os.getloadavg()[0]

    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        fast, ctx, objective = tlsearch_variant(base, tmp, "tlsearch", default_threads, params)
        fast1, _, _ = tlsearch_variant(base, tmp, "tlsearch", 1, params)
        plain1, _, _ = tlsearch_variant(
            base, tmp, "plain path", 1, params, cache_frozen=False, fold_batching="off"
        )
        naive = naive_variant(base, tmp, ctx.task, params, default_threads)
        naive1 = naive_variant(base, tmp, ctx.task, params, 1)
        variants = [naive, fast, naive1, fast1, plain1]
        for i, p in enumerate(params):
            for v in variants:
                v.step()
            print(
                f"trial {i} (frozen_blocks={p['frozen_blocks']}): "
                + "  ".join(f"{v.label} {v.seconds[-1]:.2f}s" for v in variants),
                flush=True,
            )

        # The finer measurements on one thread: steadier on a shared machine.
        torch.set_num_threads(1)
        depths = sorted({p["frozen_blocks"] for p in params})
        batching = [(base.model.name, d, objective, folds_together(objective, d)) for d in depths]
        # The same for the MLP (784-256-128-10), whose blocks are matmuls of several sizes.
        mlp_dict = objective.cfg.to_dict()
        mlp_dict["model"] = {"name": "mlp", "hidden": [256, 128]}
        mlp_dict["finetune"]["threads"] = 1
        mlp_dict["search"]["frozen_blocks"] = {"low": 0, "high": 2, "step": 1}
        mlp = kfold_objective(tlsearch.prepare(tlsearch.config_from_dict(mlp_dict)))
        batching += [("mlp", d, mlp, folds_together(mlp, d)) for d in range(3)]
        steps = {d: step_over_bare(objective, d) for d in depths}
        # One more trial at two depths, profiled (queued: the same trials as above).
        profiles = {}
        model_type = type(
            tlsearch.create_model(base.model, ctx.task.input_shape, ctx.task.target_classes)
        )
        for d in (0, 2):
            fast1.study.enqueue_trial(next(q for q in params if q["frozen_blocks"] == d))
            profiles[d] = breakdown(fast1.run_one, model_type, fast1.storage)
        # The arithmetic of one trial at each depth, for both objectives (outside any study).
        naive_objective = NaiveObjective(base, ctx.task)
        work = {}
        for d in depths:
            p = next(q for q in params if q["frozen_blocks"] == d)
            work[d] = (
                count_flops(lambda p=p: naive_objective(optuna.trial.FixedTrial(p))),
                count_flops(lambda p=p: objective(optuna.trial.FixedTrial(p))),
            )
        peak = matmul_peak()
    load1 = os.getloadavg()[0]

    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"(default threads {default_threads}); load average {load0:.1f} before, {load1:.1f} after"
    )
    print(
        f"study: {base.data.task}, {base.model.name}, {base.data.shots} shots, {base.cv.k} folds, "
        f"{base.finetune.epochs} epochs; {len(params)} trials ({args.per_depth} per depth), "
        "the same for every row, SQLite storage, no pruner"
    )
    print()
    rows = []
    for v in variants:
        ref = naive if v.threads == default_threads else naive1
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
    print(
        _table(
            [
                "objective",
                "threads",
                "median s/trial",
                "trials/min",
                "ratio (median)",
                "ratio (trials/min)",
                "mean cv",
            ],
            rows,
        )
    )
    print(
        "(ratios against the naive objective on the same number of threads; mean cv only shows\n"
        "that both learn: the naive objective pretrains its own source model and seeds fold 0\n"
        "like it, so its fold-0 head starts as the source model's initial head, a leak tlsearch\n"
        "avoids)"
    )

    print()
    print("seconds per trial at each frozen depth (median over its trials):")
    rows = []
    for d in depths:
        idx = [i for i, p in enumerate(params) if p["frozen_blocks"] == d]
        med = [statistics.median(v.seconds[i] for i in idx) for v in variants]
        by = dict(zip(variants, med, strict=True))
        rows.append(
            [
                str(d),
                *(f"{m:.2f}" for m in med),
                f"{by[plain1] / by[fast1]:.1f}x",
                f"{by[naive1] / by[fast1]:.1f}x",
            ]
        )
    print(
        _table(
            [
                "frozen",
                *(v.label for v in variants),
                "cache+batching (1t)",
                "tlsearch vs naive (1t)",
            ],
            rows,
        )
    )

    print()
    print("folds trained together (torch.func.vmap) vs one by one; all folds, cache on, 1 thread:")
    rows = []
    for name, d, obj, (one, together) in batching:
        model = tlsearch.create_model(obj.cfg.model, obj.input_shape, obj.num_classes)
        trained = sum(p.numel() for p in model.blocks[d:].parameters())
        auto = obj.fold_groups(probe_params(obj.cfg, d))
        rows.append(
            [
                name,
                str(d),
                str(trained),
                f"{one:.2f}",
                f"{together:.2f}",
                f"{one / together:.2f}x",
                "together" if len(auto[0]) > 1 else "one by one",
            ]
        )
    header = ["model", "frozen", "trained block params", "one by one s", "together s", "gain"]
    print(_table([*header, "auto (no pruner)"], rows))

    print()
    print("one fine-tuning step (marginal cost) vs the bare forward+backward of the same model on")
    print("the same batches, 1 thread:")
    rows = [
        [str(d), f"{s * 1e3:.3f}", f"{b * 1e3:.3f}", f"{s / b:.2f}"] for d, (s, b) in steps.items()
    ]
    print(_table(["frozen", "step ms", "forward+backward ms", "ratio"], rows))

    print()
    print(
        "where one trial's time goes (torch.profiler, 1 thread; the profiler's own overhead lands"
    )
    print("in 'python and other', see the unprofiled trials of the same depth):")
    kinds = [k for k in next(iter(profiles.values())) if k != "total"]
    rows = [
        [
            kind,
            *(
                f"{prof[kind]:.3f} s ({100 * prof[kind] / prof['total']:.0f}%)"
                for prof in profiles.values()
            ),
        ]
        for kind in kinds
    ]
    rows.append(["total", *(f"{prof['total']:.3f} s" for prof in profiles.values())])
    unprofiled = [
        statistics.median(
            t for t, p in zip(fast1.seconds, params, strict=True) if p["frozen_blocks"] == d
        )
        for d in profiles
    ]
    rows.append(["unprofiled (median)", *(f"{t:.3f} s" for t in unprofiled)])
    print(_table(["", *(f"frozen_blocks={d}" for d in profiles)], rows))

    print()
    print("arithmetic of one trial (matmul and convolution FLOPs, forward and backward) and the")
    print("rate each objective runs it at, 1 thread (seconds: the medians above):")
    rows = []
    sums = [0.0, 0.0, 0.0, 0.0]
    for d in depths:
        (naive_flops, fast_flops), idx = (
            work[d],
            [i for i, p in enumerate(params) if p["frozen_blocks"] == d],
        )
        t_naive = statistics.median(naive1.seconds[i] for i in idx)
        t_fast = statistics.median(fast1.seconds[i] for i in idx)
        for j, v in enumerate((naive_flops, fast_flops, t_naive, t_fast)):
            sums[j] += v
        rows.append(
            [
                str(d),
                f"{naive_flops / 1e9:.1f}",
                f"{fast_flops / 1e9:.2f}",
                f"{naive_flops / fast_flops:.1f}x",
                f"{naive_flops / t_naive / 1e9:.1f}",
                f"{fast_flops / t_fast / 1e9:.1f}",
            ]
        )
    naive_flops, fast_flops, t_naive, t_fast = sums
    rows.append(
        [
            "all",
            f"{naive_flops / 1e9:.1f}",
            f"{fast_flops / 1e9:.2f}",
            f"{naive_flops / fast_flops:.1f}x",
            f"{naive_flops / t_naive / 1e9:.1f}",
            f"{fast_flops / t_fast / 1e9:.1f}",
        ]
    )
    header = ["frozen", "naive GFLOP", "tlsearch GFLOP", "less work", "naive GFLOP/s"]
    print(_table([*header, "tlsearch GFLOP/s"], rows))
    work_ratio = naive_flops / fast_flops
    rate_ratio = (fast_flops / t_fast) / (naive_flops / t_naive)
    need = 20 / work_ratio * naive_flops / t_naive
    # Every step at the cost of its bare forward+backward (PyTorch's kernels, nothing else):
    # 5 folds x epochs x minibatches per epoch, one by one.
    n_train = len(objective.folds[0][0])
    steps_per_trial = base.cv.k * base.finetune.epochs * -(-n_train // base.finetune.batch_size)
    bare_trial = sum(steps[d][1] * steps_per_trial for d in depths)
    print(
        f"if every step cost only its bare forward+backward (the table above): "
        f"{t_naive / bare_trial:.1f}x\n"
        f"float32 matmul peak of this core (1024x1024, 1 thread): {peak / 1e9:.1f} GFLOP/s\n"
        f"speedup (medians, the trial mix) = less work x faster arithmetic = {work_ratio:.1f} x "
        f"{rate_ratio:.2f} = {work_ratio * rate_ratio:.1f}x\n"
        f"20x over the same mix needs tlsearch at {need / 1e9:.0f} GFLOP/s, "
        f"{100 * need / peak:.0f}% of the matmul peak, on minibatches of 8-32 images; "
        f"with no time but arithmetic at the peak, the speedup would be "
        f"{t_naive / (fast_flops / peak):.0f}x"
    )

    print()
    resnet_section(base, args.resnet_task, args.resnet_repeats)

    print()
    print(
        f"speedup on torch's default {default_threads} threads: {fast.rate / naive.rate:.1f}x "
        "(trials/min; swings with other work on the machine, see the trials above)"
    )
    print(f"speedup: {fast1.rate / naive1.rate:.1f}x")


if __name__ == "__main__":
    main()
