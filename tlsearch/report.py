"""A self-contained HTML report of a study, with its figures also saved as PNG files.

The figures, drawn with matplotlib's object API (no pyplot state, no display needed):

- ``lambda_curve.png``: CV accuracy against λ on a log axis, one point per trial with its fold
  spread (± one standard deviation as an error bar, each fold's score as a faint dot);
- ``history.png``: the optimization history, every trial's value and the best so far;
- ``importances.png``: parameter importances from :func:`optuna.importance.get_param_importances`;
- ``frozen_blocks.png``: CV accuracy against the number of frozen blocks;
- ``lr_vs_lambda.png``: the learning rate against λ, coloured by CV accuracy;
- ``test_comparison.png`` (given ``BEST.final.json`` from ``tlsearch final``): held-out test
  accuracy of the tuned model, default-λ fine-tuning and training from scratch.

``report.html`` embeds every PNG as base64, so the one file can be mailed or archived.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import statistics
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial, TrialState

from tlsearch._io import atomic_write
from tlsearch._version import __version__
from tlsearch.config import StudyConfig
from tlsearch.dashboard import describe_study
from tlsearch.errors import TlsearchError
from tlsearch.export import FINAL_MODELS, read_final, trials_frame
from tlsearch.params import PLAIN_FINETUNING, fixed_params
from tlsearch.storage import load_study_config

__all__ = ["FINAL_MODELS", "read_final", "write_report"]

# The models ``tlsearch final`` compares, in the order the report shows them.
_SIZE = (7.0, 4.3)
_DPI = 110
_MARKERS = {"l2sp": "o", "l2": "s", "none": "^"}


@dataclass
class _Point:
    """One trial as the figures see it: parameters (fixed ones included) and its fold scores."""

    number: int
    pruned: bool
    params: dict[str, Any]
    folds: list[float]
    value: float
    std: float


def _points(study: optuna.Study, cfg: StudyConfig | None) -> list[_Point]:
    fixed = fixed_params(cfg) if cfg is not None else {}
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        folds = [float(s) for s in t.user_attrs.get("fold_scores") or []]
        if t.state == TrialState.COMPLETE:
            value = float(t.value)
        elif folds:  # a pruned trial: the mean of the folds it ran
            value = statistics.fmean(folds)
        else:
            continue
        std = statistics.pstdev(folds) if len(folds) > 1 else 0.0
        out.append(
            _Point(
                t.number, t.state == TrialState.PRUNED, {**fixed, **t.params}, folds, value, std
            )
        )
    return out


def _best(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def _figure() -> tuple[Figure, Any]:
    fig = Figure(figsize=_SIZE, dpi=_DPI, layout="constrained")
    return fig, fig.add_subplot()


def _empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _log_x(ax: Any, values: list[float]) -> None:
    """Log scale, or symlog when a λ of 0 was tried (a linear search range may include it)."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values):
        ax.set_xscale("log")
    elif positive:
        ax.set_xscale("symlog", linthresh=min(positive))


def _lambda_curve(points: list[_Point], best: FrozenTrial | None) -> Figure:
    fig, ax = _figure()
    ax.set_title("Cross-validated accuracy vs λ")
    pts = [p for p in points if "lambda" in p.params]
    if not pts:
        _empty(ax, "no finished trial yet")
        return fig
    depths = sorted({p.params.get("frozen_blocks", 0) for p in pts})
    colours = {d: f"C{i % 10}" for i, d in enumerate(depths)}
    labelled: set[Any] = set()
    for p in pts:
        x, depth = p.params["lambda"], p.params.get("frozen_blocks", 0)
        colour = "0.6" if p.pruned else colours[depth]
        marker = _MARKERS.get(p.params.get("regularizer"), "o")
        label = "pruned (mean of its folds)" if p.pruned else f"frozen_blocks = {depth}"
        ax.scatter([x] * len(p.folds), p.folds, s=12, color=colour, alpha=0.35, linewidths=0)
        ax.errorbar(
            x,
            p.value,
            yerr=p.std,
            fmt=marker,
            color=colour,
            mfc="none" if p.pruned else colour,
            ms=5,
            capsize=2,
            elinewidth=0.8,
            label=None if label in labelled else label,
        )
        labelled.add(label)
    if best is not None and "lambda" in best.params:
        ax.scatter(
            best.params["lambda"],
            best.value,
            marker="*",
            s=220,
            color="gold",
            edgecolors="black",
            zorder=5,
            label=f"best (trial {best.number})",
        )
    ax.axvline(
        PLAIN_FINETUNING["lambda"], color="0.4", ls=":", lw=1, label="default λ (final's baseline)"
    )
    _log_x(ax, [p.params["lambda"] for p in pts])
    ax.set_xlabel("λ (penalty strength, log scale)")
    ax.set_ylabel("CV accuracy (mean ± std over folds)")
    # Legend beside the plot, depths in order: the points fill the whole λ range.
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: (labels[i].startswith("pruned"), labels[i]))
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.grid(alpha=0.3)
    return fig


def _history(points: list[_Point], best: FrozenTrial | None) -> Figure:
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
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return fig


def _importances(study: optuna.Study) -> tuple[Figure, str]:
    fig, ax = _figure()
    ax.set_title("Parameter importances")
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if n < 2:
        note = f"Importances need at least 2 completed trials ({n} so far)."
        _empty(ax, note)
        return fig, note
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(study)
        except (ValueError, RuntimeError) as e:
            note = f"Importances could not be computed: {e}"
            _empty(ax, note)
            return fig, note
    if not importances:
        note = "No searched parameter to rank."
        _empty(ax, note)
        return fig, note
    names = list(importances)[::-1]
    ax.barh(names, [importances[k] for k in names], color="C0")
    for i, k in enumerate(names):
        ax.text(importances[k], i, f" {importances[k]:.2f}", va="center", fontsize=8)
    ax.set_xlabel("importance (normalized to sum 1)")
    ax.set_xlim(0, max(importances.values()) * 1.15 or 1)
    note = " ".join(str(w.message) for w in caught)
    return fig, note


def _frozen_depth(points: list[_Point]) -> Figure:
    fig, ax = _figure()
    ax.set_title("Cross-validated accuracy vs frozen depth")
    pts = [p for p in points if not p.pruned and "frozen_blocks" in p.params]
    if not pts:
        _empty(ax, "no completed trial yet")
        return fig
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
    ax.set_xlabel("frozen_blocks (leading blocks kept at their pretrained values)")
    ax.set_ylabel("CV accuracy")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3, axis="y")
    return fig


def _lr_vs_lambda(points: list[_Point], best: FrozenTrial | None) -> Figure:
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
        ax.scatter(
            best.params["lambda"],
            best.params["lr"],
            marker="*",
            s=260,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
            label=f"best (trial {best.number})",
        )
    _log_x(ax, [p.params["lambda"] for p in pts])
    ax.set_yscale("log")
    ax.set_xlabel("λ (log scale)")
    ax.set_ylabel("learning rate (log scale)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return fig


def _test_comparison(final: Mapping[str, Any]) -> Figure:
    fig, ax = _figure()
    size = final.get("target_test_size")
    of = f" on {size} images" if size else ""
    ax.set_title(f"Held-out test accuracy{of} (tlsearch final)")
    names = list(FINAL_MODELS)
    acc = [final[n]["test_accuracy"] for n in names]
    bars = ax.bar([FINAL_MODELS[n] for n in names], acc, color=["0.6", "C0", "C2"])
    for bar, a in zip(bars, acc, strict=True):
        x = bar.get_x() + bar.get_width() / 2
        ax.text(x, a - 0.02, f"{a:.3f}", ha="center", va="top", color="white", weight="bold")
    cv = final["tuned"].get("cv_mean")
    if cv is not None:
        ax.scatter(
            [bars[-1].get_x() + bars[-1].get_width() / 2],
            [cv],
            marker="D",
            color="C3",
            zorder=5,
            label=f"tuned: CV estimate of the search ({cv:.3f})",
        )
        ax.legend(fontsize=8, loc="upper left")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3, axis="y")
    return fig


def _png(fig: Figure, path: Path) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(header: list[str] | None, rows: list[list[str]]) -> str:
    head = ""
    if header:
        head = (
            "<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr></thead>"
        )
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
td, th { border: 1px solid #ccc; padding: 0.2rem 0.5rem; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1rem 0; } figcaption { font-size: 0.85rem; color: #555; max-width: 48rem; }
img { max-width: 100%; }
.meta { color: #666; font-size: 0.85rem; }
"""


def write_report(
    study: optuna.Study, out_dir: str | Path, final_path: str | Path | None = None
) -> Path:
    """Write ``report.html`` and the PNG figures of ``study`` into ``out_dir``; return its path.

    Args:
        study: the study (any state: a study with no finished trial gets empty figures).
        out_dir: the directory to write into (created if missing).
        final_path: ``BEST.final.json`` from ``tlsearch final``, for the three-way test comparison.
    """
    out = Path(out_dir)
    final = read_final(final_path) if final_path is not None else None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TlsearchError(f"cannot create {out}: {e.strerror}") from None
    try:
        cfg: StudyConfig | None = load_study_config(study)
    except TlsearchError:
        cfg = None
    points = _points(study, cfg)
    best = _best(study)
    k = cfg.cv.k if cfg is not None else "k"

    importance_fig, importance_note = _importances(study)
    figures: list[tuple[str, str, Callable[[], Figure] | Figure, str]] = [
        (
            "lambda_curve",
            "CV accuracy vs λ",
            lambda: _lambda_curve(points, best),
            f"One point per trial: the mean accuracy over the {k} validation folds, ± one "
            "standard deviation; the faint dots are the single folds. Colour: frozen blocks. "
            "Hollow grey points are pruned trials (the mean of the folds they ran). The dotted "
            "line is the λ of the default-λ baseline.",
        ),
        (
            "history",
            "Optimization history",
            lambda: _history(points, best),
            "Each trial's CV accuracy in the order the trials were created, and the best so far.",
        ),
        (
            "importances",
            "Parameter importances",
            importance_fig,
            "optuna.importance.get_param_importances with Optuna's default evaluator, over the "
            "completed trials. " + importance_note,
        ),
        (
            "frozen_blocks",
            "CV accuracy vs frozen depth",
            lambda: _frozen_depth(points),
            "Completed trials by the number of leading blocks frozen at their pretrained values; "
            "the bar is the mean over the trials at that depth.",
        ),
        (
            "lr_vs_lambda",
            "Learning rate vs λ",
            lambda: _lr_vs_lambda(points, best),
            "Where the sampler looked, and how well: each completed trial coloured by its CV "
            "accuracy; grey crosses are pruned trials.",
        ),
    ]
    if final is not None:
        figures.append(
            (
                "test_comparison",
                "Held-out test comparison",
                lambda: _test_comparison(final),
                "Each model trained on the whole target training split and scored once on the "
                "held-out target test split, which the search never saw. The diamond is the "
                "search's CV estimate for the tuned configuration.",
            )
        )

    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tlsearch report: {html.escape(study.study_name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>tlsearch report: study '{html.escape(study.study_name)}'</h1>",
        f"<p class='meta'>generated {dt.datetime.now():%Y-%m-%d %H:%M} by tlsearch "
        f"{__version__}</p>",
        _summary_html(study, cfg, best),
    ]
    if final is not None:
        parts.append(_final_html(final))
    for name, title, make, caption in figures:
        fig = make if isinstance(make, Figure) else make()
        data = _png(fig, out / f"{name}.png")
        parts.append(
            f"<h2 id='{name}'>{html.escape(title)}</h2><figure>"
            f"<img src='data:image/png;base64,{data}' alt='{html.escape(title)}'>"
            f"<figcaption>{html.escape(caption.strip())} ({name}.png)</figcaption></figure>"
        )
    parts.append(_trials_html(study))
    parts.append("</body></html>")
    path = out / "report.html"
    atomic_write(path, lambda p: p.write_text("\n".join(parts) + "\n", encoding="utf-8"))
    return path


def _summary_html(study: optuna.Study, cfg: StudyConfig | None, best: FrozenTrial | None) -> str:
    trials = study.get_trials(deepcopy=False)
    counts = ", ".join(
        f"{n} {s.name.lower()}" for s in TrialState if (n := sum(t.state == s for t in trials))
    )
    rows = [["trials", counts or "none"]]
    if best is not None:
        std = best.user_attrs.get("cv_std")
        rows.append(
            [
                "best trial",
                f"#{best.number}: CV accuracy {best.value:.4f}"
                + (f" ± {std:.4f}" if std is not None else "")
                + " — "
                + ", ".join(f"{k} = {_fmt(v)}" for k, v in best.params.items()),
            ]
        )
    if cfg is not None:
        described = describe_study(cfg, study.user_attrs.get("task"))
        rows += [[k, v.replace("`", "")] for k, v in described.items()]
    return "<h2>Study</h2>" + _table(None, rows)


def _final_html(final: Mapping[str, Any]) -> str:
    rows = []
    for name, label in FINAL_MODELS.items():
        m = final[name]
        params = m.get("params") or {}
        rows.append(
            [
                label,
                f"{m['test_accuracy']:.4f}",
                f"{m['test_loss']:.4f}",
                _fmt(m.get("cv_mean")),
                ", ".join(f"{k} = {_fmt(v)}" for k, v in params.items()),
            ]
        )
    return "<h2>Held-out test (tlsearch final)</h2>" + _table(
        ["model", "test accuracy", "test loss", "CV estimate", "parameters"], rows
    )


def _trials_html(study: optuna.Study) -> str:
    df = trials_frame(study)
    if df.empty:
        return "<h2>Trials</h2><p>no trial yet</p>"
    cols = [c for c in df.columns if c in ("number", "state", "value", "duration")]
    cols += [c for c in df.columns if c.startswith("params_")]
    cols += [c for c in ("user_attrs_cv_std", "user_attrs_fail_reason") if c in df.columns]
    header = [c.removeprefix("params_").removeprefix("user_attrs_") for c in cols]
    header = ["cv_mean" if h == "value" else "seconds" if h == "duration" else h for h in header]
    rows = [[_fmt(v) for v in r] for r in df[cols].itertuples(index=False)]
    return "<h2>Trials</h2>" + _table(header, rows)
