"""tlsearch.report: a self-contained HTML report and its PNG figures."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import TINY, finished_tiny_study, run_cli
from matplotlib.collections import PathCollection
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from optuna.trial import create_trial

from tlsearch.config import config_from_dict
from tlsearch.errors import ConfigError
from tlsearch.export import read_final
from tlsearch.report import figures, write_report
from tlsearch.report.data import Point
from tlsearch.storage import ATTR_CONFIG

PNG = b"\x89PNG\r\n\x1a\n"
STUDY_FIGURES = {
    "lambda_curve": "CV accuracy vs λ",
    "learning_curves": "Learning curves",
    "history": "Optimization history",
    "importances": "Parameter importances",
    "frozen_blocks": "CV accuracy vs frozen depth",
    "lr_vs_lambda": "Learning rate vs λ",
}
# BEST.final.json as `tlsearch final --seeds 2` writes it (the numbers made up, the shape real).
FINAL = {
    "study_name": "tiny",
    "target_test_size": 619,
    "seeds": [0, 1],
    **{
        name: {
            "test_accuracy": acc,
            "test_loss": 1.5,
            "test_interval": [acc - 0.03, acc + 0.02],
            "seed_accuracies": [acc - 0.01, acc + 0.01],
            "seed_losses": [1.4, 1.6],
            "cv_mean": cv,
            "cv_se": se,
            "params": {"lambda": lam, "lr": 0.001, "regularizer": reg},
        }
        for name, acc, cv, se, lam, reg in [
            ("tuned", 0.8123, 0.79, 0.031, 0.2, "l2sp"),
            ("plain_finetuning", 0.7456, 0.71, 0.042, 0.01, "l2sp"),
            ("scratch", 0.6789, None, None, 0.01, "l2"),
        ]
    },
    "comparisons": [
        {
            "model": "tuned",
            "baseline": "plain_finetuning",
            "difference": 0.0667,
            "interval": [0.031, 0.102],
            "mcnemar_p": 0.00123,
            "model_only": 61,
            "baseline_only": 20,
        },
        {
            "model": "tuned",
            "baseline": "scratch",
            "difference": 0.1334,
            "interval": [0.09, 0.17],
            "mcnemar_p": 1e-9,
            "model_only": 101,
            "baseline_only": 18,
        },
        {
            "model": "plain_finetuning",
            "baseline": "scratch",
            "difference": 0.0667,
            "interval": [0.03, 0.1],
            "mcnemar_p": 0.002,
            "model_only": 70,
            "baseline_only": 29,
        },
    ],  # fmt: skip
    "verdict": [
        "The search beat plain fine-tuning here (difference +6.7 pp, 95 % interval +3.1 … +10.2 "
        "pp).",
        "Transfer pays here: the tuned model beat training from scratch (...).",
    ],
}
# The same from tlsearch 0.1 (one seed, no intervals, the baseline named after its λ).
OLD_FINAL = {
    "study_name": "tiny",
    **{
        name: {"test_accuracy": acc, "test_loss": 1.5, "cv_mean": cv, "cv_std": None, "params": {}}
        for name, acc, cv in [
            ("tuned", 0.8123, 0.79),
            ("default_lambda", 0.7456, None),
            ("scratch", 0.6789, None),
        ]
    },
}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[optuna.Study, Path, str]:
    tmp = tmp_path_factory.mktemp("report")
    study, url = finished_tiny_study(tmp, {"fold_scores": [0.05]}, 0.05)
    return study, tmp, url


def _images(html: str) -> dict[str, bytes]:
    """The embedded PNGs of the report, by the id of the section that holds them."""
    found = re.findall(
        r"<h2 id='(\w+)'>.*?<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html
    )
    return {name: base64.b64decode(data) for name, data in found}


def test_report_with_final(study: tuple[optuna.Study, Path, str]) -> None:
    s, tmp, _ = study
    final = tmp / "best.final.json"
    final.write_text(json.dumps(FINAL))
    path = write_report(s, tmp / "out", final)
    assert path == tmp / "out" / "report.html"
    html = path.read_text(encoding="utf-8")

    images = _images(html)
    assert set(images) == {*STUDY_FIGURES, "test_comparison"}
    for name, data in images.items():
        png = tmp / "out" / f"{name}.png"
        assert png.read_bytes() == data, f"{name}: the embedded figure is not the PNG file"
        assert data.startswith(PNG) and len(data) > 5_000
    for title in STUDY_FIGURES.values():
        assert f">{title}</h2>" in html
    assert ">Held-out test comparison</h2>" in html

    # Self-contained: nothing is fetched from elsewhere.
    assert not re.search(r"(src|href)=['\"]?(https?:)?//", html)
    assert "<title>tlsearch report: tiny</title>" in html
    # The three-way table with intervals, seeds and CV ± SE; plain fine-tuning's settings; the
    # paired differences and the verdict; and the study described.
    for cells in (
        ["tuned fine-tuning", "0.8123", "0.7823 – 0.8323", "0.8023, 0.8223", "1.5000",
         "0.79 ± 0.031"],
        ["plain fine-tuning", "0.7456", "0.7156 – 0.7656", "0.7356, 0.7556", "1.5000",
         "0.71 ± 0.042"],
        ["from scratch (no transfer)", "0.6789", "0.6489 – 0.6989", "0.6689, 0.6889", "1.5000",
         "–"],
        ["tuned − plain fine-tuning", "+6.7 pp", "+3.1 pp … +10.2 pp", "0.00123", "61 vs 20"],
        ["plain fine-tuning − scratch", "+6.7 pp", "+3.0 pp … +10.0 pp", "0.002", "70 vs 29"],
    ):  # fmt: skip
        assert "<tr>" + "".join(f"<td>{c}</td>" for c in cells) in html, cells
    assert (
        "<p>Plain fine-tuning trains with lambda = 0.01, lr = 0.001, regularizer = l2sp.</p>"
    ) in html
    for sentence in FINAL["verdict"]:
        assert f"<strong>{sentence}</strong>" in html
    assert "2-fold stratified cross-validation" in html
    assert "4 complete, 1 pruned" in html
    assert html.count("<tr>") >= 5 + 3 + 3  # a row per trial, per final model, per difference


def test_report_with_an_old_final_file(study: tuple[optuna.Study, Path, str]) -> None:
    # tlsearch 0.1's best.final.json: no intervals, seeds or differences, `default_lambda`.
    s, tmp, _ = study
    final = tmp / "old.final.json"
    final.write_text(json.dumps(OLD_FINAL))
    data = read_final(final)
    assert "default_lambda" not in data
    assert data["plain_finetuning"] == OLD_FINAL["default_lambda"]
    html = write_report(s, tmp / "old", final).read_text(encoding="utf-8")
    assert "test_comparison" in _images(html)
    assert "<tr><td>plain fine-tuning</td><td>0.7456</td><td>–</td><td>–</td>" in html
    assert "Paired differences" not in html and "<strong>" not in html


def test_report_of_a_study_without_enough_trials(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    study = optuna.create_study(storage=url, study_name="one", direction="maximize")
    study.set_user_attr(ATTR_CONFIG, config_from_dict(TINY).to_dict())
    empty = write_report(study, tmp_path / "empty").read_text(encoding="utf-8")
    assert set(_images(empty)) == set(STUDY_FIGURES)
    assert "no trial yet" in empty

    study.add_trial(
        create_trial(
            value=0.5,
            params={"lambda": 0.1, "lr": 0.01, "frozen_blocks": 1},
            distributions={
                "lambda": optuna.distributions.FloatDistribution(1e-4, 1.0, log=True),
                "lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True),
                "frozen_blocks": optuna.distributions.IntDistribution(0, 2),
            },
            user_attrs={"fold_scores": [0.4, 0.6], "cv_std": 0.1},
        )
    )
    one = write_report(study, tmp_path / "one").read_text(encoding="utf-8")
    assert set(_images(one)) == set(STUDY_FIGURES)
    assert "Importances need at least 2 completed trials (1 so far)." in one


def test_final_file_must_come_from_final(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tuned": {"test_accuracy": 0.5}}))
    with pytest.raises(ConfigError, match="no test_accuracy for scratch, plain_finetuning"):
        read_final(bad)
    with pytest.raises(ConfigError, match="file not found"):
        read_final(tmp_path / "missing.json")


@pytest.mark.slow
def test_report_command(study: tuple[optuna.Study, Path, str]) -> None:
    _, tmp, url = study
    result = run_cli(
        "report", "--storage", url, "--study-name", "tiny", "-o", "cli-report",
        cwd=tmp, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(Path("cli-report") / "report.html")
    for name in STUDY_FIGURES:
        assert (tmp / "cli-report" / f"{name}.png").read_bytes().startswith(PNG)
    assert not (tmp / "cli-report" / "test_comparison.png").exists()


def _point(number: int, lam: float, value: float, depth: int = 0, pruned: bool = False) -> Point:
    folds = [value] if pruned else [value - 0.01, value + 0.01]
    params = {"lambda": lam, "lr": 1e-3, "frozen_blocks": depth}
    return Point(number, pruned, params, folds, value, 0.0 if pruned else 0.01)


def _data_points_in_display(fig: Figure) -> list[tuple[float, float]]:
    fig.canvas.draw()
    ax = fig.axes[0]
    found = []
    for coll in ax.collections:
        offsets = coll.get_offsets()
        if len(offsets):
            found += [tuple(p) for p in coll.get_offset_transform().transform(offsets)]
    for line in ax.lines:
        found += [tuple(p) for p in line.get_transform().transform(line.get_xydata())]
    return found


def test_pruned_trials_do_not_squeeze_the_lambda_curve() -> None:
    # Complete trials near 0.85-0.90, one pruned trial at 0.1: the axis shows the complete ones.
    pts = [_point(i, 10.0 ** (i - 3), 0.85 + 0.01 * i, depth=i % 2) for i in range(5)]
    pts.append(_point(5, 0.5, 0.1, pruned=True))
    fig = figures.lambda_curve(pts, None)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert 0.8 < low < 0.84 and 0.9 < high < 0.95, (low, high)
    # The clipped pruned trial is marked on the lower edge and named in the legend.
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "pruned, off the axis (1)" in labels


@pytest.mark.parametrize("draw", ["lambda_curve", "history", "frozen_depth", "lr_vs_lambda"])
def test_no_legend_covers_a_data_point(draw: str) -> None:
    pts = [_point(i, 10.0 ** (i / 2 - 3), 0.5 + 0.04 * i, depth=i % 3) for i in range(12)]
    pts.append(_point(12, 0.3, 0.2, pruned=True))
    fig = (
        getattr(figures, draw)(pts)
        if draw in ("history", "frozen_depth")
        else getattr(figures, draw)(pts, None)
    )
    points = _data_points_in_display(fig)
    box = fig.axes[0].get_legend().get_window_extent()
    assert points
    inside = [p for p in points if box.x0 <= p[0] <= box.x1 and box.y0 <= p[1] <= box.y1]
    assert not inside, (draw, inside)


def test_depth_figure_says_it_leaves_out_pruned_trials() -> None:
    pts = [_point(i, 0.1, 0.6, depth=i % 2) for i in range(4)]
    pts += [_point(4, 0.1, 0.2, pruned=True), _point(5, 0.1, 0.3, pruned=True)]
    label = figures.frozen_depth(pts).axes[0].get_xlabel()
    assert "2 pruned trial(s) not shown" in label


def _error_bars(ax: Any) -> list[tuple[float, float]]:
    """Every error bar of the axes as (low, high), rounded, sorted."""
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segments = [seg for c in bars for coll in c.lines[2] for seg in coll.get_segments()]
    return sorted((round(s[0][1], 4), round(s[1][1], 4)) for s in segments)


def test_test_comparison_draws_the_intervals(tmp_path: Path) -> None:
    ax = figures.test_comparison(FINAL).axes[0]
    order = ["scratch", "plain_finetuning", "tuned"]  # report order
    assert [b.get_height() for b in ax.patches] == [FINAL[n]["test_accuracy"] for n in order]
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "from scratch\n(no transfer)",
        "plain fine-tuning",
        "tuned fine-tuning",
    ]
    # The 95 % intervals as error bars from each bar's low to its high end, and each CV
    # estimate ± one standard error.
    wanted = [tuple(FINAL[n]["test_interval"]) for n in order] + [
        (FINAL[n]["cv_mean"] - FINAL[n]["cv_se"], FINAL[n]["cv_mean"] + FINAL[n]["cv_se"])
        for n in ("plain_finetuning", "tuned")
    ]
    assert _error_bars(ax) == sorted((round(lo, 4), round(hi, 4)) for lo, hi in wanted)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["one seed", "95 % interval (Wilson)", "CV estimate of the search (± 1 SE)"]
    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    seeds = [tuple(p) for c in dots for p in c.get_offsets()]
    assert sorted(round(y, 4) for _, y in seeds) == sorted(
        round(a, 4) for n in order for a in FINAL[n]["seed_accuracies"]
    )
    assert ax.get_title() == "Held-out test accuracy (619 images, mean of 2 seeds)"

    # An old file: its bars and the tuned CV estimate, no interval (no stored SE: zero length).
    old = tmp_path / "old.final.json"
    old.write_text(json.dumps(OLD_FINAL))
    ax = figures.test_comparison(read_final(old)).axes[0]
    assert [b.get_height() for b in ax.patches] == [0.6789, 0.7456, 0.8123]
    assert _error_bars(ax) == [(0.79, 0.79)]
    assert ax.get_title() == "Held-out test accuracy"


def test_learning_curves_lay_the_folds_end_to_end(tmp_path: Path) -> None:
    """A pruned trial's curve ends where the pruner stopped it: here in fold 1 at epoch 5."""
    from tlsearch.report import data

    curve = {
        "epochs": [5, 10, 15],
        "loss": [[1.0, 0.8, 0.7], [1.1]],
        "accuracy": [[0.2, 0.3, 0.4], [0.1]],
    }
    study, _ = finished_tiny_study(tmp_path, {"fold_scores": [0.4], "curve": curve}, 0.4)
    curves = data.curves(study, epochs=15)
    assert curves[0].label.endswith("(best)") and not curves[0].pruned
    (pruned,) = [c for c in curves if c.pruned]
    assert pruned.folds == [([5, 10, 15], [1.0, 0.8, 0.7]), ([20], [1.1])]
