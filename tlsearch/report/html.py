"""The report's HTML: ``report.html``, self-contained, with every figure also saved as a PNG file.

``report.html`` embeds every PNG as base64, so the one file can be mailed or archived.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from matplotlib.figure import Figure
from optuna.trial import FrozenTrial

from tlsearch._io import atomic_write
from tlsearch._version import __version__
from tlsearch.config import StudyConfig
from tlsearch.errors import TlsearchError
from tlsearch.export import read_final
from tlsearch.params import own_lambda
from tlsearch.report import data, figures

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
    cfg = data.study_config(study)
    best = data.best_trial(study)
    name = html.escape(study.study_name)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>tlsearch report: {name}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>tlsearch report: study '{name}'</h1>",
        f"<p class='meta'>generated {dt.datetime.now():%Y-%m-%d %H:%M} by tlsearch "
        f"{__version__}</p>",
        "<h2>Study</h2>" + _table(None, data.summary_rows(study, cfg, best)),
        *_final_section(final),
    ]
    for file, title, make, caption in _figures(study, cfg, best, final):
        png = _png(make(), out / f"{file}.png")
        parts.append(
            f"<h2 id='{file}'>{html.escape(title)}</h2><figure>"
            f"<img src='data:image/png;base64,{png}' alt='{html.escape(title)}'>"
            f"<figcaption>{html.escape(caption.strip())} ({file}.png)</figcaption></figure>"
        )
    header, rows = data.trial_rows(study)
    parts.append("<h2>Trials</h2>" + (_table(header, rows) if rows else "<p>no trial yet</p>"))
    parts.append("</body></html>")
    path = out / "report.html"
    atomic_write(path, lambda p: p.write_text("\n".join(parts) + "\n", encoding="utf-8"))
    return path


# A figure of the report: (file name, title, how to draw it, caption).
Shown = tuple[str, str, Callable[[], Figure], str]


def _figures(
    study: optuna.Study,
    cfg: StudyConfig | None,
    best: FrozenTrial | None,
    final: Mapping[str, Any] | None,
) -> list[Shown]:
    """The figures, in the order the report shows them."""
    points = data.points(study, cfg)
    importances = data.importances(study)
    epochs = cfg.finetune.epochs if cfg is not None else 1
    folds = cfg.cv.k * cfg.cv.repeats if cfg is not None else 1
    shown = _lambda_curves(points, best, folds)
    shown += [
        (
            "learning_curves",
            "Learning curves",
            lambda: figures.learning_curves(data.curves(study, epochs), epochs, folds),
            "Each fold's held-out loss every few epochs, the folds one after the other, for the "
            "best trial, plain fine-tuning and the pruned trials that trained longest (dashed, "
            "a cross where the pruner stopped them).",
        ),
        (
            "history",
            "Optimization history",
            lambda: figures.history(points),
            "Each trial's CV accuracy in the order the trials were created, and the best so far.",
        ),
        (
            "importances",
            "Parameter importances",
            lambda: figures.importances(importances),
            "optuna.importance.get_param_importances with Optuna's default evaluator, over the "
            "completed trials. " + importances.note,
        ),
        (
            "frozen_blocks",
            "CV accuracy vs frozen depth",
            lambda: figures.frozen_depth(points),
            "Completed trials by the number of leading blocks frozen at their pretrained values; "
            "the bar is the mean over the trials at that depth.",
        ),
        (
            "lr_vs_lambda",
            "Learning rate vs λ",
            lambda: figures.lr_vs_lambda(points, best),
            "Where the sampler looked, and how well: each completed trial coloured by its CV "
            "accuracy; grey crosses are pruned trials.",
        ),
    ]
    return shown + _augmentation_figure(points) + _test_figure(final)


def _augmentation_figure(points: list[data.Point]) -> list[Shown]:
    """CV accuracy by augmentation and strength, where some trial trained with one."""
    if all(p.params.get("augment", "none") == "none" for p in points):
        return []
    return [
        (
            "augmentation",
            "CV accuracy by augmentation",
            lambda: figures.augmentation(points),
            "Completed trials by the augmentation their minibatches trained with, each within "
            "its column by its strength (the range the trials reached below the name), and the "
            "mean of each column (red). Pruned trials are not shown: their means cover only "
            "their first epochs, where an augmented trial learns more slowly.",
        )
    ]


def _lambda_curves(points: list[data.Point], best: FrozenTrial | None, folds: int) -> list[Shown]:
    """CV accuracy against the shared λ, then against each λ of its own that a penalty of the
    trials declares (DELTA's), each on an axis of its own."""
    shown: list[Shown] = [
        (
            "lambda_curve",
            "CV accuracy vs λ",
            lambda: figures.lambda_curve(points, best),
            f"One point per trial: the mean accuracy over its {folds} validation folds, ± one "
            "standard error; the faint dots are the single folds. Colour: frozen blocks. Hollow "
            "grey points are pruned trials (the mean of the folds they ran; a triangle on the "
            "edge when off the axis). The diamond is plain fine-tuning's baseline trial, the "
            "dashed line scratch's CV accuracy. Rings mark the trials within one standard error "
            "of the best (export --select one_se picks among them), the star the best.",
        )
    ]
    own = {h.name: h for p in points if (h := own_lambda(p.params.get("regularizer")))}
    for h in own.values():
        label = h.label or h.name
        shown.append(
            (
                f"{h.name}_curve",
                f"CV accuracy vs {label}",
                lambda h=h: figures.lambda_curve(points, best, h),
                f"As above for the trials whose penalty has a λ of its own, {label} "
                f"({h.name}): it scales something else than the others' λ, so it has an axis of "
                "its own.",
            )
        )
    return shown


def _test_figure(final: Mapping[str, Any] | None) -> list[Shown]:
    """The held-out test comparison, given ``tlsearch final``'s results."""
    if final is None:
        return []
    return [
        (
            "test_comparison",
            "Held-out test comparison",
            lambda: figures.test_comparison(final),
            "Each model trained on the whole target training split and scored once on the "
            "held-out target test split, which the search never saw; the bar is the mean "
            "over seeds. Error bars: the 95 % Wilson interval of the test accuracy, the test "
            "images being the sample (seeds re-score the same images, so they narrow nothing). "
            "Dots: single seeds. Diamonds: the search's CV estimate of the same settings, ± "
            "one standard error, where the study has one.",
        )
    ]


def _final_section(final: Mapping[str, Any] | None) -> list[str]:
    """The held-out test results of ``tlsearch final``, its paired differences and verdict."""
    if final is None:
        return []
    parts = [
        "<h2>Held-out test (tlsearch final)</h2>"
        + _table(data.FINAL_HEADER, data.final_rows(final))
        + f"<p>{html.escape(data.plain_settings(final))}</p>"
    ]
    comparisons = data.comparison_rows(final)
    if comparisons:
        parts.append(
            "<p>Paired differences on the same test images: the interval is a normal "
            "approximation on the per-image differences; McNemar's exact test counts the "
            "images one model got right more often than the other.</p>"
            + _table(data.COMPARISON_HEADER, comparisons)
        )
    parts += [f"<p><strong>{html.escape(v)}</strong></p>" for v in final.get("verdict", [])]
    return parts


def _png(fig: Figure, path: Path) -> str:
    """Save ``fig`` as ``path``; return the same PNG as base64 for embedding."""
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
