"""tlsearch.report: a self-contained HTML report and its PNG figures."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import optuna
import pytest
from conftest import TINY, finished_tiny_study, run_cli
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
    "history": "Optimization history",
    "importances": "Parameter importances",
    "frozen_blocks": "CV accuracy vs frozen depth",
    "lr_vs_lambda": "Learning rate vs λ",
}
FINAL = {
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
    # The three-way table, and the study described.
    for number in ("0.8123", "0.7456", "0.6789"):
        assert number in html
    assert "2-fold stratified cross-validation" in html
    assert "4 complete, 1 pruned" in html
    assert html.count("<tr>") >= 5 + 3  # a row per trial, a row per final model


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
    with pytest.raises(ConfigError, match="no test_accuracy for scratch, default_lambda"):
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
