"""tlsearch.report: a self-contained HTML report and its PNG figures."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import optuna
import pytest
from conftest import TINY, finished_tiny_study, run_cli
from optuna.trial import create_trial

from tlsearch.config import config_from_dict
from tlsearch.errors import ConfigError
from tlsearch.export import read_final
from tlsearch.report import write_report
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
