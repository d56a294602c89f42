"""tlsearch.export: the best trial as JSON, read back into the same config and parameters."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution, IntDistribution

from tlsearch.config import StudyConfig, config_from_dict
from tlsearch.errors import ConfigError, TlsearchError
from tlsearch.export import FORMAT, read_export, write_export
from tlsearch.params import TrialParams
from tlsearch.storage import ATTR_CONFIG, mask_url
from tlsearch.study import run_study

SEARCHED = {
    "lambda": FloatDistribution(1e-4, 1.0, log=True),
    "lr": FloatDistribution(1e-3, 3e-2, log=True),
    "frozen_blocks": IntDistribution(0, 2),
}


def _recorded_study(cfg: StudyConfig, url: str, values: list[float | None]) -> optuna.Study:
    """A study in ``url`` holding ``cfg`` as tlsearch records it, with one trial per value."""
    study = optuna.create_study(storage=url, study_name=cfg.name, direction="maximize")
    study.set_user_attr(ATTR_CONFIG, cfg.to_dict())
    for i, value in enumerate(values):
        state = (
            optuna.trial.TrialState.COMPLETE
            if value is not None
            else optuna.trial.TrialState.PRUNED
        )
        study.add_trial(
            optuna.trial.create_trial(
                params={"lambda": 10.0 ** -(i + 1), "lr": 0.01, "frozen_blocks": i % 3},
                distributions=SEARCHED,
                value=value,
                state=state,
                user_attrs={"cv_std": 0.1, "fold_scores": [value, value]}
                if value is not None
                else {},
            )
        )
    return study


def test_round_trip_of_a_real_study(tiny, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(n_trials=3, regularizer={"name": ["l2", "l2sp"]}))
    study = run_study(cfg)
    data = write_export(study, tmp_path / "best.json")
    best = read_export(tmp_path / "best.json")

    assert best.config.to_dict() == cfg.to_dict()  # sqlite: no password to mask
    assert best.config.search_hash() == cfg.search_hash()
    # Everything the trial trained with: for a searched trial its params plus the fixed ones.
    resolved = study.best_trial.user_attrs["resolved_params"]
    assert best.params == TrialParams.from_dict(resolved)
    if "baseline" not in study.best_trial.user_attrs:
        assert resolved == {**study.best_params, "backbone_lr_mult": 0.1}
    assert best.data == data == json.loads((tmp_path / "best.json").read_text())
    assert data["format"] == FORMAT
    assert data["trial_number"] == study.best_trial.number
    assert data["cv_mean"] == study.best_trial.user_attrs["cv_mean"]
    assert data["value"] == study.best_value
    assert data["fold_scores"] == study.best_trial.user_attrs["fold_scores"]
    assert data["searched_params"] == study.best_params
    assert data["n_trials"] == {"complete": 3, "pruned": 0, "fail": 0}
    assert data["checkpoint"]["sha256"] == study.user_attrs["tlsearch_checkpoint"]["sha256"]
    assert {"python", "torch", "optuna", "tlsearch"} <= set(data["versions"])


def test_fixed_parameters_are_exported(tiny, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny(search={"backbone_lr_mult": 0.5}, regularizer={"name": "l2"}))
    study = _recorded_study(cfg, f"sqlite:///{tmp_path / 's.db'}", [0.4, 0.7, None, 0.6])
    data = write_export(study, tmp_path / "best.json")
    assert data["trial_number"] == 1
    assert data["params"] == {
        "lambda": 0.01,
        "lr": 0.01,
        "frozen_blocks": 1,
        "backbone_lr_mult": 0.5,
        "regularizer": "l2",
    }
    assert data["n_trials"] == {"complete": 3, "pruned": 1, "fail": 0}
    assert read_export(tmp_path / "best.json").params == TrialParams(0.01, 0.01, 1, 0.5, "l2")


def test_export_masks_the_storage_password(tiny, tmp_path: Path) -> None:
    cfg = config_from_dict(
        tiny(storage="postgresql+psycopg://alice:s3cret@db.example:5432/studies")
    )
    study = _recorded_study(cfg, f"sqlite:///{tmp_path / 's.db'}", [0.5])
    write_export(study, tmp_path / "best.json")
    text = (tmp_path / "best.json").read_text()
    assert "s3cret" not in text
    best = read_export(tmp_path / "best.json")
    assert best.config.storage == "postgresql+psycopg://alice:***@db.example:5432/studies"
    # Everything but the password comes back as it was.
    assert {**best.config.to_dict(), "storage": cfg.storage} == cfg.to_dict()


@pytest.mark.parametrize(
    "url, shown",
    [
        (
            "postgresql+psycopg://alice:s3cret@db:5432/studies",
            "postgresql+psycopg://alice:***@db:5432/studies",
        ),
        ("postgresql://bob:p%40ss@localhost/x", "postgresql://bob:***@localhost/x"),
        ("postgresql://carol@localhost/x", "postgresql://carol@localhost/x"),
        ("sqlite:///tlsearch.db", "sqlite:///tlsearch.db"),
        ("::not a url::", "<unparseable storage URL>"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_no_completed_trial_is_an_error(tiny, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny())
    study = _recorded_study(cfg, f"sqlite:///{tmp_path / 's.db'}", [None, None])
    with pytest.raises(
        TlsearchError, match=r"^study 'tiny' has no completed trial to export yet$"
    ):
        write_export(study, tmp_path / "best.json")
    assert not (tmp_path / "best.json").exists()


def test_unwritable_output(tiny, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny())
    study = _recorded_study(cfg, f"sqlite:///{tmp_path / 's.db'}", [0.5])
    with pytest.raises(TlsearchError, match=r"^cannot write .*best\.json: "):
        write_export(study, tmp_path / "no-such-dir" / "best.json")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, r"best\.json: file not found$"),
        ("{not json", r"best\.json: not a readable JSON export: "),
        (
            '{"format": "other/1"}',
            r"best\.json: not a tlsearch export \(format must be 'tlsearch\.best/1'\)$",
        ),
        ('["tlsearch.best/1"]', r"best\.json: not a tlsearch export"),
    ],
)
def test_read_export_errors(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "best.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        read_export(path)


def test_read_export_validates_the_config(tiny, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny())
    study = _recorded_study(cfg, f"sqlite:///{tmp_path / 's.db'}", [0.5])
    data = write_export(study, tmp_path / "best.json")
    data["config"]["cv"]["k"] = 1
    (tmp_path / "best.json").write_text(json.dumps(data))
    with pytest.raises(
        ConfigError, match=r"best\.json: cv\.k: Input should be greater than or equal to 2"
    ):
        read_export(tmp_path / "best.json")
