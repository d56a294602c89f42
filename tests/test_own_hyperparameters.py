"""A penalty with a hyperparameter of its own is one class, one registry line and one test.

The class and the line below are all a plug-in writes: no module of tlsearch names the penalty or
its parameter, yet a study asks for the parameter under its own name, in its own range, trains with
it, records, exports, reports and selects with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import FAST, merge
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial

from tlsearch.config import ParamRange, config_from_dict
from tlsearch.errors import ConfigError
from tlsearch.export import read_export, write_export
from tlsearch.models import create_model
from tlsearch.params import TrialParams, baseline_params, fixed_params, suggest_params
from tlsearch.registry import REGULARIZERS, Hyperparameter
from tlsearch.regularizers import L2SP, create_regularizer
from tlsearch.report import write_report
from tlsearch.selection import select
from tlsearch.storage import ATTR_CONFIG
from tlsearch.study import run_study


class L2SPMean(L2SP):
    """L2-SP averaged over the pulled weights: ``α/2 · mean_i (w_i − w⁰_i)² + β/2 · ‖w_head‖²``.

    A mean, not a sum: α lives on a scale of its own, so it has a range and a name of its own
    (``mean_alpha``), as DELTA's λ does. The penalty receives it as its λ.
    """

    name = "l2sp_mean"
    received: list[float] = []  # what each penalty built was given: the test checks it trained

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        type(self).received.append(self.lambda_)
        lead = 1 if self.stacked else 0  # stacked, each fold's penalty covers its own slice
        count = sum(p[0].numel() if lead else p.numel() for p in self.backbone)
        self.lambda_ /= max(1, count)


class L2SPHead(L2SP):
    """L2-SP whose pull on the new head, β, is searched (``head_beta``) instead of fixed: a
    hyperparameter besides λ, which the penalty receives as a keyword argument."""

    name = "l2sp_head"
    received: list[float] = []

    def __init__(self, *args: Any, head_beta: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        type(self).received.append(head_beta)
        self.head_lambda = head_beta


MEAN_ALPHA = Hyperparameter(
    "mean_alpha",
    default={"low": 1.0, "high": 1000.0, "log": True},
    is_lambda=True,
    label="L2-SP-mean's α",
)
HEAD_BETA = Hyperparameter("head_beta", default={"low": 1e-3, "high": 1.0, "log": True}, off=0.0)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The two penalties registered for this test only (the registry is the process's)."""
    monkeypatch.setattr(REGULARIZERS, "_entries", dict(REGULARIZERS._entries))
    # The one line a plug-in writes for each:
    REGULARIZERS.register("l2sp_mean", L2SPMean, hyperparameters=(MEAN_ALPHA,))
    REGULARIZERS.register("l2sp_head", L2SPHead, hyperparameters=(HEAD_BETA,))
    L2SPMean.received.clear()
    L2SPHead.received.clear()
    yield


def _study(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    return merge(
        FAST,
        merge(
            {
                "n_trials": 5,
                "storage": f"sqlite:///{tmp_path / 'study.db'}",
                "pretrain": {"cache_dir": str(tmp_path / "cache")},
                "regularizer": {"name": ["l2sp", "l2sp_mean"]},
                "search": {"baselines": [], "frozen_blocks": 0},
                "sampler": {"seed": 3},
                "select": {"rule": "best"},
            },
            overrides,
        ),
    )


def test_a_penalty_with_a_lambda_of_its_own_end_to_end(registered, tmp_path: Path) -> None:
    cfg = config_from_dict(_study(tmp_path))
    # Its declared range is filled in, so the stored study says what its trials ran with.
    assert cfg.search.model_extra == {"mean_alpha": ParamRange(low=1.0, high=1000.0, log=True)}
    study = run_study(cfg)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    mean = [t for t in trials if t.params["regularizer"] == "l2sp_mean"]
    assert len(trials) == 5 and 0 < len(mean) < 5
    for t in trials:
        # Asked first (which λ a trial has depends on it), then its own λ or the shared one.
        assert next(iter(t.params)) == "regularizer"
        own = t.params["regularizer"] == "l2sp_mean"
        lam = "mean_alpha" if own else "lambda"
        assert {"lambda", "mean_alpha"} & set(t.params) == {lam}
        if own:
            assert t.distributions[lam] == FloatDistribution(1.0, 1000.0, log=True)
        # Resolved: the trial's λ, under the name files use for every penalty.
        assert t.user_attrs["resolved_params"]["lambda"] == t.params[lam]
    # Trained with it: each of its trials' α reached the penalty (once per fold, or stacked).
    assert set(L2SPMean.received) == {t.params["mean_alpha"] for t in mean}

    export = write_export(study, tmp_path / "best.json", "best")
    searched = export["searched_params"]
    assert export["params"]["lambda"] == searched.get("mean_alpha", searched.get("lambda"))
    back = read_export(tmp_path / "best.json")
    assert back.params == TrialParams.from_dict(export["params"])
    assert back.config.search.model_extra == cfg.search.model_extra

    page = write_report(study, tmp_path / "report").read_text()
    assert (tmp_path / "report" / "mean_alpha_curve.png").is_file()
    assert "CV accuracy vs L2-SP-mean&#x27;s α" in page and "(mean_alpha)" in page
    assert json.loads(json.dumps(study.user_attrs[ATTR_CONFIG]))["search"]["mean_alpha"] == {
        "low": 1.0,
        "high": 1000.0,
        "log": True,
        "step": None,
    }


def _complete(value: float, regularizer: str, lam_name: str, lam: float) -> Any:
    return create_trial(
        state=TrialState.COMPLETE,
        value=value,
        params={"regularizer": regularizer, lam_name: lam, "lr": 1e-3, "frozen_blocks": 0},
        distributions={
            "regularizer": optuna.distributions.CategoricalDistribution(["l2sp", "l2sp_mean"]),
            lam_name: FloatDistribution(1e-4, 1000.0, log=True),
            "lr": FloatDistribution(1e-4, 3e-2, log=True),
            "frozen_blocks": IntDistribution(0, 2),
        },
        user_attrs={"cv_mean": value, "cv_se": 0.02, "fold_scores": [value] * 3},
    )


def test_one_se_places_a_lambda_of_its_own_in_its_own_range(registered, tmp_path: Path) -> None:
    """Two trials within one SE, as frozen: one_se takes the stronger penalty, by each λ's place
    in its own range. L2-SP's 0.5 is near the top of [1e-4, 1]; L2-SP-mean's 2 near the bottom
    of [1, 1000], though the larger number."""
    cfg = config_from_dict(_study(tmp_path, search={"lambda": {"low": 1e-4, "high": 1.0}}))
    study = optuna.create_study(storage=cfg.storage, direction="maximize")
    study.set_user_attr(ATTR_CONFIG, cfg.to_dict())
    study.add_trial(_complete(0.90, "l2sp_mean", "mean_alpha", 2.0))
    study.add_trial(_complete(0.89, "l2sp", "lambda", 0.5))
    assert select(study, cfg, "one_se").trial.number == 1


def test_a_hyperparameter_besides_lambda(registered, tiny) -> None:
    """``head_beta`` is asked for after the shared parameters, recorded under its name, off (and
    left out) in a baseline, and handed to the penalty as a keyword argument."""
    cfg = config_from_dict(tiny(regularizer={"name": "l2sp_head"}))
    assert cfg.search.model_extra == {"head_beta": ParamRange(low=1e-3, high=1.0, log=True)}
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    params = suggest_params(trial, cfg)
    assert list(trial.params) == ["lambda", "lr", "frozen_blocks", "head_beta"]
    assert params.hyperparameters == {"head_beta": trial.params["head_beta"]}
    assert params.to_dict()["head_beta"] == trial.params["head_beta"]
    assert TrialParams.from_dict(params.to_dict()) == params
    plain = baseline_params(cfg, "plain_finetuning")
    assert plain.hyperparameters == {} and "head_beta" not in plain.to_dict()
    fixed = config_from_dict(tiny(regularizer={"name": "l2sp_head"}, search={"head_beta": 0.3}))
    assert fixed_params(fixed)["head_beta"] == 0.3

    model = create_model(cfg.model, (64,), 10)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(1.0)
    penalty = create_regularizer(
        "l2sp_head", model, start, 0.3, hyperparameters=params.hyperparameters
    )
    assert penalty.head_lambda == trial.params["head_beta"]
    assert create_regularizer("l2sp_head", model, start, 0.3, hyperparameters={}).head_lambda == 0
    with pytest.raises(AssertionError, match="declares head_beta: pass the trial's"):
        create_regularizer("l2sp_head", model, start, 0.3)


def test_a_hyperparameter_besides_lambda_trains(registered, tmp_path: Path) -> None:
    """In a study: each trial's head_beta is recorded with its λ and reaches its penalty; the
    baseline trains with it off."""
    overrides = {"n_trials": 3, "regularizer": {"name": "l2sp_head"}}
    search = {"baselines": ["plain_finetuning"]}
    study = run_study(config_from_dict(_study(tmp_path, **overrides, search=search)))
    baseline, *trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert baseline.user_attrs["baseline"] == "plain_finetuning" and len(trials) == 2
    assert "head_beta" not in baseline.params
    assert "head_beta" not in baseline.user_attrs["resolved_params"]
    for t in trials:
        assert list(t.params) == ["lambda", "lr", "head_beta"]
        assert t.user_attrs["resolved_params"]["head_beta"] == t.params["head_beta"]
    assert set(L2SPHead.received) == {0.0, *(t.params["head_beta"] for t in trials)}


@pytest.mark.parametrize(
    ("search", "line"),
    [
        ({"head_bta": 0.3}, "cfg.toml: search.head_bta: unknown key"),
        ({"head_beta": -0.5}, "cfg.toml: search.head_beta: must be >= 0, got -0.5"),
        (
            {"head_beta": {"low": -1.0, "high": 1.0}},
            "cfg.toml: search.head_beta: must be >= 0, got -1.0",
        ),
    ],
)
def test_a_declared_hyperparameter_is_checked(registered, tiny, search, line) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict(tiny(regularizer={"name": "l2sp_head"}, search=search), "cfg.toml")
    assert str(err.value) == line


def test_a_config_that_does_not_use_them_hashes_as_before(registered, tiny) -> None:
    """Registered or not, a penalty not chosen adds nothing to the config or its hash; one chosen
    adds its range, and setting it to that range is the same config."""
    before = config_from_dict(tiny())
    assert before.search.model_extra == {}
    assert "mean_alpha" not in before.to_dict()["search"]
    chosen = config_from_dict(tiny(regularizer={"name": "l2sp_mean"}))
    same = config_from_dict(
        tiny(
            regularizer={"name": "l2sp_mean"},
            search={"mean_alpha": {"low": 1.0, "high": 1000.0, "log": True}},
        )
    )
    assert chosen.search_hash() == same.search_hash() != before.search_hash()
