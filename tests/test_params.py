"""tlsearch.params: a trial's choices under the user's names, searched or fixed, and as printed."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from tlsearch.config import config_from_dict
from tlsearch.errors import ConfigError
from tlsearch.params import (
    BASELINES,
    PLAIN_FINETUNING,
    SEARCHED,
    TrialParams,
    baseline_enqueue,
    baseline_params,
    fixed_params,
    format_params,
    resolve_params,
    suggest_params,
)
from tlsearch.registry import REGULARIZERS, TERMS

USER_NAMES = ["lambda", "lr", "frozen_blocks", "backbone_lr_mult", "regularizer"]


def test_round_trip_with_user_names() -> None:
    p = TrialParams(lambda_=0.5, lr=0.01, frozen_blocks=2, backbone_lr_mult=0.1, regularizer="l2")
    d = p.to_dict()
    assert d == {
        "lambda": 0.5,
        "lr": 0.01,
        "frozen_blocks": 2,
        "backbone_lr_mult": 0.1,
        "regularizer": "l2",
    }
    assert list(d) == USER_NAMES
    assert TrialParams.from_dict(d) == p
    # Values as JSON or a database hand them back: types are restored.
    back = TrialParams.from_dict({**d, "frozen_blocks": 2.0, "lambda": 1})
    assert back == dataclasses.replace(p, lambda_=1.0)
    assert isinstance(back.frozen_blocks, int) and isinstance(back.lambda_, float)


@pytest.mark.parametrize("missing", USER_NAMES)
def test_from_dict_names_a_missing_parameter(missing: str) -> None:
    d = {
        "lambda": 0.5,
        "lr": 0.01,
        "frozen_blocks": 2,
        "backbone_lr_mult": 0.1,
        "regularizer": "l2",
    }
    del d[missing]
    with pytest.raises(ConfigError, match=rf"^params: missing {missing}$"):
        TrialParams.from_dict(d)


def test_from_dict_names_every_missing_parameter_and_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"^params: missing lr, backbone_lr_mult, regularizer$"):
        TrialParams.from_dict({"lambda": 0.5, "frozen_blocks": 1})
    with pytest.raises(ConfigError, match=r"^params: invalid value: "):
        TrialParams.from_dict({**PLAIN_FINETUNING, "lr": "fast", "regularizer": "l2"})
    with pytest.raises(ConfigError, match=r"^params: invalid value: "):
        TrialParams.from_dict({**PLAIN_FINETUNING, "frozen_blocks": None, "regularizer": "l2"})


def test_searched_names_are_the_config_fields() -> None:
    cfg = config_from_dict({})
    declared = [
        h.field
        for registry in (REGULARIZERS, TERMS)
        for name in registry.names()
        for h in registry.get(name).hyperparameters
        if h.field is not None
    ]
    for path in [*SEARCHED.values(), *declared]:
        section, field = path.split(".")
        assert hasattr(getattr(cfg, section), field), path
    # Every trial's; DELTA's λ and BSS's η are their entries' (a dict holds η only when BSS is on).
    assert list(SEARCHED) == USER_NAMES[:-1]
    assert declared == ["search.delta_lambda", "regularizer.bss_eta"]


def test_plain_finetuning_is_a_complete_trial_without_its_regularizer() -> None:
    params = TrialParams.from_dict({**PLAIN_FINETUNING, "regularizer": "l2sp"})
    assert params == TrialParams(0.01, 1e-3, 0, 1.0, "l2sp")


# ---------------------------------------------------------------------------------------------
# Fixed and searched


def test_fixed_params_are_what_the_config_does_not_search(tiny) -> None:
    cfg = config_from_dict(tiny())
    # The tiny study searches λ, lr and the frozen depth; the rest is fixed.
    assert fixed_params(cfg) == {"backbone_lr_mult": 0.1, "regularizer": "l2sp"}
    fixed = config_from_dict(
        tiny(search={"lambda": 0.5, "lr": 0.01, "frozen_blocks": 1, "backbone_lr_mult": 1})
    )
    assert fixed_params(fixed) == {
        "lambda": 0.5,
        "lr": 0.01,
        "frozen_blocks": 1,
        "backbone_lr_mult": 1.0,
        "regularizer": "l2sp",
    }
    assert isinstance(fixed_params(fixed)["frozen_blocks"], int)


def test_fixed_and_searched_parameters(tiny) -> None:
    cfg = config_from_dict(
        tiny(
            search={"lambda": 0.5, "frozen_blocks": 1},
            regularizer={"name": ["l2", "l2sp", "none"]},
        )
    )
    assert fixed_params(cfg) == {"lambda": 0.5, "frozen_blocks": 1, "backbone_lr_mult": 0.1}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = suggest_params(trial, cfg)
    # Only what is searched is asked of the trial (and so shown in the dashboard).
    assert set(trial.params) == {"lr", "regularizer"}
    assert params.lambda_ == 0.5 and params.frozen_blocks == 1 and params.backbone_lr_mult == 0.1
    assert 1e-3 <= params.lr <= 3e-2
    assert params.regularizer in {"l2", "l2sp", "none"}
    assert resolve_params(cfg, trial.params) == params


def test_searched_parameters_have_the_configs_distributions(tiny) -> None:
    cfg = config_from_dict(
        tiny(
            search={"backbone_lr_mult": {"low": 0.0, "high": 1.0, "step": 0.25}},
            regularizer={"name": ["l2", "l2sp"]},
        )
    )
    study = optuna.create_study()
    trial = study.ask()
    suggest_params(trial, cfg)
    assert trial.distributions == {
        "lambda": FloatDistribution(1e-4, 1.0, log=True),
        "lr": FloatDistribution(1e-3, 3e-2, log=True),
        "frozen_blocks": IntDistribution(0, 2, step=1),
        "backbone_lr_mult": FloatDistribution(0.0, 1.0, step=0.25),
        "regularizer": CategoricalDistribution(["l2", "l2sp"]),
    }


def test_searched_frozen_blocks_are_integers(tiny) -> None:
    cfg = config_from_dict(tiny())
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(10):
        params = suggest_params(study.ask(), cfg)
        assert isinstance(params.frozen_blocks, int) and 0 <= params.frozen_blocks <= 2
        assert params.regularizer == "l2sp"
        assert isinstance(params, TrialParams)


def test_suggest_from_a_fixed_trial(tiny) -> None:
    # What `tlsearch final` and the fast-path tests do: replay chosen values through the objective.
    cfg = config_from_dict(tiny())
    trial = optuna.trial.FixedTrial({"lambda": 0.3, "lr": 0.02, "frozen_blocks": 1})
    params = suggest_params(trial, cfg)
    assert params == TrialParams(0.3, 0.02, 1, 0.1, "l2sp")
    assert resolve_params(cfg, trial.params) == params
    # A searched parameter the trial lacks is Optuna's error, not a silent default.
    with pytest.raises(ValueError, match="frozen_blocks"):
        suggest_params(optuna.trial.FixedTrial({"lambda": 0.3, "lr": 0.02}), cfg)


def test_resolve_params_names_what_a_stored_trial_lacks(tiny) -> None:
    cfg = config_from_dict(tiny(regularizer={"name": ["l2", "l2sp"]}))
    with pytest.raises(ConfigError, match=r"^params: missing regularizer$"):
        resolve_params(cfg, {"lambda": 0.3, "lr": 0.02, "frozen_blocks": 1})


# ---------------------------------------------------------------------------------------------
# As printed


def test_format_params_four_significant_digits() -> None:
    assert format_params({"lambda": 1.00495}) == "lambda=1.005"
    # Two trials whose values differ in the fourth digit print differently.
    assert format_params({"lambda": 1.004}) != format_params({"lambda": 1.005})
    assert (
        format_params(
            {"lambda": 12345.6, "lr": 0.00379, "frozen_blocks": 2, "regularizer": "l2sp"}
        )
        == "lambda=1.235e+04 lr=0.00379 frozen_blocks=2 regularizer=l2sp"
    )
    assert format_params(TrialParams(3e-05, 0.001, 0, 1.0, "none").to_dict()) == (
        "lambda=3e-05 lr=0.001 frozen_blocks=0 backbone_lr_mult=1 regularizer=none"
    )
    assert format_params({}) == ""


# ---------------------------------------------------------------------------------------------
# DELTA's λ and BSS's η


def test_bss_eta_is_in_a_dict_only_when_bss_is_on() -> None:
    off = TrialParams(0.5, 0.01, 2, 0.1, "l2")
    assert "bss_eta" not in off.to_dict()  # exports and resolved_params as before BSS
    on = TrialParams(0.5, 0.01, 2, 0.1, "l2", hyperparameters={"bss_eta": 0.2})
    assert on.to_dict() == {**off.to_dict(), "bss_eta": 0.2}
    assert TrialParams.from_dict(on.to_dict()) == on
    # A trial stored by an older version has no bss_eta: BSS was off; so is η = 0, left out.
    assert TrialParams.from_dict(off.to_dict()) == off
    assert TrialParams.from_dict({**off.to_dict(), "bss_eta": 0}) == off
    assert TrialParams(0.5, 0.01, 2, 0.1, "l2", hyperparameters={"bss_eta": 0.0}) == off
    # A name no entry declares is not a parameter of the trial.
    assert TrialParams.from_dict({**off.to_dict(), "bss_etta": 0.2}) == off


def test_delta_asks_for_delta_lambda_in_its_own_range(tiny) -> None:
    cfg = config_from_dict(tiny(regularizer={"name": "delta"}))
    assert "lambda" not in fixed_params(cfg)  # λ of L2/L2-SP does not apply
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = suggest_params(trial, cfg)
    assert trial.distributions == {
        "lr": FloatDistribution(1e-3, 3e-2, log=True),
        "frozen_blocks": IntDistribution(0, 2, step=1),
        "delta_lambda": FloatDistribution(1e-4, 10.0, log=True),
    }
    # TrialParams holds the λ used, under the name files use for every regularizer.
    assert params.lambda_ == trial.params["delta_lambda"]
    assert params.to_dict()["lambda"] == trial.params["delta_lambda"]
    assert resolve_params(cfg, trial.params) == params
    assert TrialParams.from_dict(params.to_dict()) == params


def test_a_searched_regularizer_with_delta_is_asked_first(tiny) -> None:
    cfg = config_from_dict(tiny(regularizer={"name": ["l2sp", "delta"]}))
    assert "lambda" not in fixed_params(cfg) and "delta_lambda" not in fixed_params(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = suggest_params(trial, cfg)
        # The regularizer first: which λ a trial has depends on it; never both.
        assert next(iter(trial.params)) == "regularizer"
        name = "delta_lambda" if params.regularizer == "delta" else "lambda"
        assert {"lambda", "delta_lambda"} & set(trial.params) == {name}
        assert params.lambda_ == trial.params[name]
        assert resolve_params(cfg, trial.params) == params
        seen.add(params.regularizer)
    assert seen == {"l2sp", "delta"}
    # Without DELTA among the choices the order is as before: the regularizer last.
    plain = config_from_dict(tiny(regularizer={"name": ["l2", "l2sp"]}))
    trial = optuna.create_study().ask()
    suggest_params(trial, plain)
    assert list(trial.params)[-1] == "regularizer"


def test_fixed_delta_lambda_and_bss_eta(tiny) -> None:
    cfg = config_from_dict(
        tiny(
            search={"lambda": 0.5, "delta_lambda": 0.02},
            regularizer={"name": ["l2", "delta"], "bss_eta": 0.1, "bss_k": 3},
        )
    )
    assert fixed_params(cfg) == {
        "lambda": 0.5,
        "backbone_lr_mult": 0.1,
        "delta_lambda": 0.02,
        "bss_eta": 0.1,
    }
    delta = resolve_params(cfg, {"lr": 0.01, "frozen_blocks": 1, "regularizer": "delta"})
    l2 = resolve_params(cfg, {"lr": 0.01, "frozen_blocks": 1, "regularizer": "l2"})
    assert (delta.lambda_, l2.lambda_) == (0.02, 0.5)
    assert delta.hyperparameters == l2.hyperparameters == {"bss_eta": 0.1}


def test_searched_bss_eta(tiny) -> None:
    cfg = config_from_dict(tiny(regularizer={"bss_eta": {"low": 1e-3, "high": 1.0, "log": True}}))
    assert "bss_eta" not in fixed_params(cfg)
    trial = optuna.create_study().ask()
    params = suggest_params(trial, cfg)
    assert trial.distributions["bss_eta"] == FloatDistribution(1e-3, 1.0, log=True)
    assert params.hyperparameters == {"bss_eta": trial.params["bss_eta"]}
    assert params.to_dict()["bss_eta"] == trial.params["bss_eta"] > 0


def test_baselines_keep_bss_off_and_enqueue_delta_lambda(tiny) -> None:
    cfg = config_from_dict(
        tiny(
            regularizer={"name": ["delta", "l2sp"], "bss_eta": {"low": 0.0, "high": 1.0}},
            search={"delta_lambda": {"low": 1e-3, "high": 1.0, "log": True}},
        )
    )
    for name in BASELINES:
        assert baseline_params(cfg, name).hyperparameters == {}
    plain = baseline_params(cfg, "plain_finetuning")
    assert plain.regularizer == "delta" and plain.lambda_ == PLAIN_FINETUNING["lambda"]
    enqueued = baseline_enqueue(cfg, "plain_finetuning")
    assert enqueued == {
        "lr": 1e-3,
        "frozen_blocks": 0,
        "delta_lambda": PLAIN_FINETUNING["lambda"],
        "bss_eta": 0.0,
        "regularizer": "delta",
    }
    # The enqueued trial asks for those; what it trains with is the baseline.
    trial = optuna.trial.FixedTrial(enqueued)
    suggest_params(trial, cfg, only=enqueued)
    assert baseline_params(cfg, "scratch").to_dict() == {**PLAIN_FINETUNING, "regularizer": "l2"}
