"""The report's figures, drawn with matplotlib's object API (no pyplot state, no display needed).

- ``lambda_curve``: CV accuracy against λ on a log axis, one point per trial with ± one standard
  error as an error bar and each fold's score as a faint dot; the trials within one standard error
  of the best ringed (``export --select one_se`` chooses among them), the baselines marked. The
  trials of a penalty with a λ of its own (DELTA's) get a figure of their own, against it;
- ``history``: the optimization history, every trial's value and the best so far;
- ``importances``: parameter importances from :func:`optuna.importance.get_param_importances`;
- ``frozen_depth`` (saved as ``frozen_blocks.png``): CV accuracy against the number of frozen blocks;
- ``augmentation``: CV accuracy by augmentation, each trial placed in its augmentation's column by
  its strength (low to high, left to right);
- ``lr_vs_lambda``: the learning rate against λ, coloured by CV accuracy;
- ``learning_curves``: each fold's held-out loss by epoch for a few trials, the folds end to end,
  pruned trials marked where they stopped;
- ``test_comparison`` (given ``BEST.final.json`` from ``tlsearch final``): held-out test
  accuracy of the tuned model, plain fine-tuning and training from scratch, with their 95 %
  intervals, each seed's accuracy and the search's CV estimates.

Each function returns a new :class:`~matplotlib.figure.Figure`; a figure without data says why.
Legends sit beside the axes, never over a data point.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from optuna.trial import FrozenTrial

from tlsearch.export import FINAL_MODELS
from tlsearch.params import augment_strength, own_lambda
from tlsearch.registry import Hyperparameter
from tlsearch.report.data import Curve, Importances, Point

_SIZE = (7.0, 4.3)
_DPI = 110
_MARKERS = {"l2sp": "o", "l2": "s", "none": "^"}


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    return fig, fig.add_subplot()


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_beside(ax: Any, *handles_labels: list[Any]) -> None:
    """The legend beside the axes, where it covers no data point."""
    ax.legend(*handles_labels, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))


def _log_x(ax: Any, values: list[float]) -> None:
    """Log scale, or symlog when a λ of 0 was tried (a linear search range may include it)."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values):
        ax.set_xscale("log")
    elif positive:
        ax.set_xscale("symlog", linthresh=min(positive))


def lambda_curve(
    points: list[Point], best: FrozenTrial | None, own: Hyperparameter | None = None
) -> Figure:
    """CV accuracy against λ: each trial ± one standard error with its folds, the trials within one
    SE of the best ringed, the best starred, plain fine-tuning and scratch marked.

    ``own``: the trials of the penalty with that λ of its own (DELTA's ``delta_lambda``), against
    it; None: every other trial, against the shared λ. They never share an axis: a λ of its own
    scales something else (DELTA's: a distance between feature maps, not between weights)."""
    fig, ax = _figure()
    label = "λ" if own is None else own.label or own.name
    ax.set_title(f"Cross-validated accuracy vs {label}")
    scratch = [p for p in points if p.baseline == "scratch" and not p.pruned]
    pts = [
        p
        for p in points
        if "lambda" in p.params
        and p.baseline != "scratch"
        and own_lambda(p.params.get("regularizer")) == own
    ]
    if not pts:
        _empty(ax, "no finished trial yet")
        return fig
    _trials_with_folds(ax, pts)
    _within_one_se_and_best(ax, pts, best)
    for p in scratch:
        ax.axhline(p.value, color="C3", ls="--", lw=1, label=f"scratch (trial {p.number})")
    _log_x(ax, [p.params["lambda"] for p in pts])
    _clip_to_complete(ax, pts, also=[p.value for p in scratch])
    what = "λ (penalty strength" if own is None else f"{label} (a range of its own"
    ax.set_xlabel(f"{what}, log scale)")
    ax.set_ylabel("CV accuracy (mean ± 1 SE over folds)")
    # Legend beside the plot, depths in order: the points fill the whole λ range.
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith("pruned"), labels[i]))
    _legend_beside(ax, [handles[i] for i in order], [labels[i] for i in order])
    ax.grid(alpha=0.3)
    return fig


def _trials_with_folds(ax: Any, pts: list[Point]) -> None:
    """Each trial at its λ: the mean ± one SE coloured by frozen depth (grey and hollow when
    pruned, a diamond for a baseline), each fold's score as a faint dot."""
    depths = sorted({p.params.get("frozen_blocks", 0) for p in pts})
    colours = {d: f"C{i % 10}" for i, d in enumerate(depths)}
    labelled: set[Any] = set()
    for p in pts:
        x, depth = p.params["lambda"], p.params.get("frozen_blocks", 0)
        colour = "0.6" if p.pruned else colours[depth]
        marker = "D" if p.baseline else _MARKERS.get(p.params.get("regularizer"), "o")
        label = "pruned (mean of its folds)" if p.pruned else f"frozen_blocks = {depth}"
        if p.baseline == "plain_finetuning":
            label = "plain fine-tuning (baseline trial)"
        ax.scatter([x] * len(p.folds), p.folds, s=12, color=colour, alpha=0.35, linewidths=0)
        ax.errorbar(
            x,
            p.value,
            yerr=p.se,
            fmt=marker,
            color=colour,
            mfc="none" if p.pruned else colour,
            ms=5,
            capsize=2,
            elinewidth=0.8,
            label=None if label in labelled else label,
        )
        labelled.add(label)


def _within_one_se_and_best(ax: Any, pts: list[Point], best: FrozenTrial | None) -> None:
    """A ring around each trial within one SE of the best (one_se's pool), a star on the best."""
    within = [p for p in pts if p.within_one_se]
    if within:
        ax.scatter(
            [p.params["lambda"] for p in within],
            [p.value for p in within],
            s=110,
            facecolors="none",
            edgecolors="black",
            linewidths=1.0,
            zorder=4,
            label=f"within one SE of the best ({len(within)})",
        )
    star = next((p for p in pts if best is not None and p.number == best.number), None)
    if star is not None:
        _star(ax, star.params["lambda"], star.value, star.number, s=220, color="gold", zorder=5)


def _star(ax: Any, x: float, y: float, number: int, **style: Any) -> None:
    """The best trial, starred (black-edged unless ``style`` says otherwise)."""
    style.setdefault("edgecolors", "black")
    ax.scatter(x, y, marker="*", label=f"best (trial {number})", **style)


def _clip_to_complete(ax: Any, pts: list[Point], also: Sequence[float] = ()) -> None:
    """The y-limits of the complete trials (their folds and error bars) and of ``also``, so a
    pruned trial's low mean does not squeeze them; pruned points outside are marked on the edge
    they cross."""
    done = [p for p in pts if not p.pruned]
    if not done or len(done) == len(pts):
        return
    lows = [min([p.value - p.se, *p.folds]) for p in done] + list(also)
    highs = [max([p.value + p.se, *p.folds]) for p in done] + list(also)
    pad = max(0.02, 0.05 * (max(highs) - min(lows)))
    low, high = min(lows) - pad, max(highs) + pad
    ax.set_ylim(low, high)
    below = [p for p in pts if p.pruned and p.value < low]
    above = [p for p in pts if p.pruned and p.value > high]
    for clipped, y, marker in ((below, low, "v"), (above, high, "^")):
        if clipped:
            ax.scatter(
                [p.params["lambda"] for p in clipped],
                [y] * len(clipped),
                marker=marker,
                s=40,
                color="0.4",
                clip_on=False,
                zorder=4,
                label=f"pruned, off the axis ({len(clipped)})",
            )


def history(points: list[Point]) -> Figure:
    """Each trial's CV accuracy in trial order, and the best so far."""
    fig, ax = _figure()
    ax.set_title("Optimization history")
    if not points:
        _empty(ax, "no finished trial yet")
        return fig
    done = [p for p in points if not p.pruned]
    pruned = [p for p in points if p.pruned]
    ax.scatter([p.number for p in done], [p.value for p in done], s=18, label="complete")
    if pruned:
        ax.scatter(
            [p.number for p in pruned],
            [p.value for p in pruned],
            s=18,
            marker="x",
            color="0.6",
            label="pruned (mean of its folds)",
        )
    running, xs, ys = -math.inf, [], []
    for p in sorted(done, key=lambda p: p.number):
        running = max(running, p.value)
        xs.append(p.number)
        ys.append(running)
    if xs:
        ax.step(xs, ys, where="post", color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("CV accuracy")
    _legend_beside(ax)
    ax.grid(alpha=0.3)
    return fig


def learning_curves(curves: list[Curve], epochs: int, folds: int) -> Figure:
    """Held-out loss by epoch: one colour per trial, one line per fold, the folds end to end."""
    fig, ax = _figure()
    ax.set_title("Learning curves: held-out loss of each fold")
    if not curves:
        _empty(ax, "no trial with learning curves yet (studies made before tlsearch kept them)")
        return fig
    for i, c in enumerate(curves):
        colour = "0.55" if c.pruned else f"C{i % 10}"
        for n, (xs, ys) in enumerate(c.folds):
            ax.plot(
                xs,
                ys,
                color=colour,
                ls="--" if c.pruned else "-",
                lw=1.2,
                marker=".",
                ms=3,
                label=c.label if n == 0 else None,
            )
        if c.pruned and c.folds:
            xs, ys = c.folds[-1]
            ax.scatter(xs[-1], ys[-1], marker="x", s=40, color="C3", zorder=4)
    for fold in range(1, folds):
        ax.axvline(fold * epochs, color="0.85", lw=0.8, zorder=0)
    ax.scatter([], [], marker="x", color="C3", label="pruned here")
    ax.set_xlabel(f"epochs trained, fold after fold ({epochs} per fold)")
    ax.set_ylabel("held-out loss (mean cross-entropy)")
    _legend_beside(ax)
    ax.grid(alpha=0.3)
    return fig


def importances(imp: Importances) -> Figure:
    """The importances as horizontal bars, or the note saying why there are none."""
    fig, ax = _figure()
    ax.set_title("Parameter importances")
    if not imp.values:
        _empty(ax, imp.note)
        return fig
    values = imp.values
    names = list(values)[::-1]
    ax.barh(names, [values[k] for k in names], color="C0")
    for i, k in enumerate(names):
        ax.text(values[k], i, f" {values[k]:.2f}", va="center", fontsize=8)
    ax.set_xlabel("importance (normalized to sum 1)")
    ax.set_xlim(0, max(values.values()) * 1.15 or 1)
    return fig


def frozen_depth(points: list[Point]) -> Figure:
    """CV accuracy of the completed trials by frozen depth, with the mean at each depth."""
    fig, ax = _figure()
    ax.set_title("Cross-validated accuracy vs frozen depth")
    pts = [p for p in points if not p.pruned and "frozen_blocks" in p.params]
    if not pts:
        _empty(ax, "no completed trial yet")
        return fig
    pruned = sum(p.pruned for p in points)
    by_depth: dict[int, list[float]] = {}
    for p in pts:
        by_depth.setdefault(int(p.params["frozen_blocks"]), []).append(p.value)
    for i, p in enumerate(pts):
        jitter = ((i * 0.618) % 1 - 0.5) * 0.3  # spread points of one depth without randomness
        ax.scatter(int(p.params["frozen_blocks"]) + jitter, p.value, s=16, color="C0", alpha=0.7)
    depths = sorted(by_depth)
    ax.scatter(
        depths,
        [statistics.fmean(by_depth[d]) for d in depths],
        marker="_",
        s=900,
        color="C3",
        linewidths=2,
        label="mean of the trials",
    )
    ax.set_xticks(depths, [f"{d}\n({len(by_depth[d])} trials)" for d in depths])
    ax.set_xlim(min(depths) - 0.6, max(depths) + 0.6)
    # Said on the figure, under the axis where it covers nothing: a pruned trial's mean covers
    # only its first folds, so it is not drawn here.
    note = f"\n{pruned} pruned trial(s) not shown: their means cover only the first folds"
    ax.set_xlabel(
        "frozen_blocks (leading blocks kept at their pretrained values)" + (note if pruned else "")
    )
    ax.set_ylabel("CV accuracy")
    # Beside the axes, so the legend never covers a point.
    _legend_beside(ax)
    ax.grid(alpha=0.3, axis="y")
    return fig


def augmentation(points: list[Point]) -> Figure:
    """CV accuracy of the completed trials by augmentation ("none" first), each placed within its
    augmentation's column by its strength, with the mean of each column."""
    fig, ax = _figure()
    ax.set_title("Cross-validated accuracy by augmentation and strength")
    pts = [p for p in points if not p.pruned]
    if not pts:
        _empty(ax, "no completed trial yet")
        return fig
    names = sorted({p.params.get("augment", "none") for p in pts}, key=lambda n: (n != "none", n))
    ticks = []
    for i, name in enumerate(names):
        group = [p for p in pts if p.params.get("augment", "none") == name]
        h = augment_strength(name)
        strengths = [float(p.params.get(h.name, 0.0)) if h else 0.0 for p in group]
        low, high = min(strengths), max(strengths)
        for p, s in zip(group, strengths, strict=True):
            x = i if high <= low else i - 0.35 + 0.7 * (s - low) / (high - low)
            ax.scatter(x, p.value, s=16, color="C0", alpha=0.7)
        mean = statistics.fmean(p.value for p in group)
        ax.scatter(i, mean, marker="_", s=900, color="C3", linewidths=2)
        span = f"\n{low:.3g}–{high:.3g}" if high > low else ""
        label = h.label or h.name if h else name
        ticks.append(f"{name if name == 'none' else label}{span}\n({len(group)} trials)")
    ax.set_xticks(range(len(names)), ticks)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel("augmentation (within a column: its strength, low to high)")
    ax.set_ylabel("CV accuracy")
    ax.grid(alpha=0.3, axis="y")
    return fig


def lr_vs_lambda(points: list[Point], best: FrozenTrial | None) -> Figure:
    """Learning rate against λ, the completed trials coloured by CV accuracy."""
    fig, ax = _figure()
    ax.set_title("Learning rate vs λ, coloured by CV accuracy")
    pts = [p for p in points if "lambda" in p.params and "lr" in p.params]
    if not pts:
        _empty(ax, "no finished trial yet")
        return fig
    done = [p for p in pts if not p.pruned]
    pruned = [p for p in pts if p.pruned]
    if done:
        sc = ax.scatter(
            [p.params["lambda"] for p in done],
            [p.params["lr"] for p in done],
            c=[p.value for p in done],
            cmap="viridis",
            s=40,
            edgecolors="0.2",
            linewidths=0.5,
        )
        fig.colorbar(sc, ax=ax, label="CV accuracy")
    if pruned:
        ax.scatter(
            [p.params["lambda"] for p in pruned],
            [p.params["lr"] for p in pruned],
            marker="x",
            color="0.6",
            s=30,
            label="pruned",
        )
    if best is not None and "lambda" in best.params and "lr" in best.params:
        _star(
            ax,
            best.params["lambda"],
            best.params["lr"],
            best.number,
            s=260,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
        )
    _log_x(ax, [p.params["lambda"] for p in pts])
    ax.set_yscale("log")
    ax.set_xlabel("λ (log scale)")
    ax.set_ylabel("learning rate (log scale)")
    _legend_beside(ax)
    ax.grid(alpha=0.3)
    return fig


def test_comparison(final: Mapping[str, Any]) -> Figure:
    """Held-out test accuracy of the models of ``tlsearch final``: the mean over seeds with its 95 %
    interval as an error bar, each seed as a dot, and each model's CV estimate ± one SE as a
    diamond. A file from before ``--seeds`` has no intervals: its bars have no error bars."""
    fig, ax = _figure()
    size = final.get("target_test_size")
    n_seeds = len(final.get("seeds") or [0])
    of = [f"{size} images"] if size else []
    of += [f"mean of {n_seeds} seeds"] if n_seeds > 1 else []
    ax.set_title("Held-out test accuracy" + (f" ({', '.join(of)})" if of else ""))
    names = list(FINAL_MODELS)
    models = [final[n] for n in names]
    acc = [m["test_accuracy"] for m in models]
    xs = list(range(len(names)))
    ax.bar(xs, acc, color=["0.6", "C0", "C2"], width=0.6)
    ax.set_xticks(xs, [FINAL_MODELS[n].replace(" (", "\n(") for n in names])
    for x, a in zip(xs, acc, strict=True):
        ax.text(x, 0.02, f"{a:.3f}", ha="center", va="bottom", color="white", weight="bold")
    placed = list(zip(xs, models, strict=True))
    intervals = _test_intervals(ax, placed)
    if n_seeds > 1:
        _seeds(ax, placed)
    cv = _cv(ax, placed)
    if intervals or cv or n_seeds > 1:
        _legend_beside(ax)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3, axis="y")
    return fig


# A model of BEST.final.json at its place on the x axis.
Placed = list[tuple[int, Mapping[str, Any]]]


def _test_intervals(ax: Any, placed: Placed) -> bool:
    """Each model's 95 % Wilson interval of the test accuracy, where the file has one."""
    with_interval = [(x, m) for x, m in placed if m.get("test_interval")]
    if with_interval:
        ax.errorbar(
            [x for x, _ in with_interval],
            [m["test_accuracy"] for _, m in with_interval],
            yerr=[
                [m["test_accuracy"] - m["test_interval"][0] for _, m in with_interval],
                [m["test_interval"][1] - m["test_accuracy"] for _, m in with_interval],
            ],
            fmt="none",
            ecolor="black",
            capsize=6,
            elinewidth=1.2,
            label="95 % interval (Wilson)",
        )
    return bool(with_interval)


def _seeds(ax: Any, placed: Placed) -> None:
    """Each seed's test accuracy as a dot left of its model's bar."""
    seeds = [(x, a) for x, m in placed for a in m.get("seed_accuracies") or []]
    if seeds:
        ax.scatter(
            [x - 0.12 for x, _ in seeds],
            [a for _, a in seeds],
            s=14,
            color="black",
            alpha=0.6,
            zorder=4,
            label="one seed",
        )


def _cv(ax: Any, placed: Placed) -> bool:
    """The search's CV estimate ± one SE as a diamond right of the bar, where there is one."""
    cv = [(x, m) for x, m in placed if m.get("cv_mean") is not None]
    if cv:
        ax.errorbar(
            [x + 0.12 for x, _ in cv],
            [m["cv_mean"] for _, m in cv],
            yerr=[m.get("cv_se") or 0.0 for _, m in cv],
            fmt="D",
            color="C3",
            ms=5,
            capsize=3,
            zorder=5,
            label="CV estimate of the search (± 1 SE)",
        )
    return bool(cv)
