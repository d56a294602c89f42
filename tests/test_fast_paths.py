"""Fast paths give the plain path's results: frozen-feature cache, folds trained together, threads.

Equivalence only (no timing): the same fold scores, and fold losses equal up to float rounding.
Timings are in benchmarks/trial_speed.py.
"""

from __future__ import annotations

from typing import Any

import optuna
import pytest
import torch
from conftest import TINY, merge

from tlsearch.config import StudyConfig, config_from_dict
from tlsearch.errors import DivergedError
from tlsearch.models import create_model, fold_batchable, stack_models
from tlsearch.objective import KFoldObjective
from tlsearch.params import TrialParams
from tlsearch.pretrain import load_checkpoint
from tlsearch.regularizers import create_regularizer
from tlsearch.study import prepare
from tlsearch.training import Recipe, TrialFolds, evaluate, finetune, finetune_folds

INPUT = (1, 8, 8)
MLP = {"name": "mlp", "hidden": [32, 16]}
CNN = {"name": "cnn", "channels": [4, 8], "fc": 16}
# Dropout and BatchNorm in every block: caching is exact (frozen blocks run in eval mode), batching
# is not possible in the blocks that train.
MLP_BN = {"name": "mlp", "hidden": [32, 16], "batch_norm": True, "dropout": 0.2}


def _objective(cfg_dict: dict[str, Any]) -> KFoldObjective:
    cfg = config_from_dict(cfg_dict)
    ctx = prepare(cfg)
    pretrained = load_checkpoint(ctx.checkpoint)
    task = ctx.task
    return KFoldObjective(
        cfg, task.target_train, pretrained, task.input_shape, task.target_classes, ctx.device
    )


def _run(tiny, model: dict, params: dict[str, Any], **finetune: Any) -> dict[str, Any]:
    """One trial of the tiny study with ``model`` and ``params``; its user attributes."""
    trial = optuna.trial.FixedTrial(params)
    _objective(tiny(model=model, finetune={"epochs": 6, **finetune}))(trial)
    return trial.user_attrs


def _assert_same_folds(fast: dict[str, Any], plain: dict[str, Any]) -> None:
    assert fast["fold_scores"] == plain["fold_scores"]
    assert fast["fold_losses"] == pytest.approx(plain["fold_losses"], rel=1e-4, abs=1e-6)


PATHS = {
    "cache": {"cache_frozen": True, "fold_batching": "off"},
    "batched": {"cache_frozen": False, "fold_batching": "auto"},
    "both": {"cache_frozen": True, "fold_batching": "auto"},
}


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("model", [MLP, CNN, MLP_BN], ids=["mlp", "cnn", "mlp-bn-dropout"])
@pytest.mark.parametrize("frozen", [0, 1, 2])
def test_fast_paths_give_the_plain_fold_scores(tiny, model, frozen, path) -> None:
    params = {"lambda": 0.3, "lr": 0.02, "frozen_blocks": frozen}
    plain = _run(tiny, model, params, cache_frozen=False, fold_batching="off")
    fast = _run(tiny, model, params, **path)
    _assert_same_folds(fast, plain)


def test_cache_is_computed_once_per_depth(tiny) -> None:
    objective = _objective(tiny())
    first = objective.frozen_features(2)
    assert objective.frozen_features(2) is first
    assert objective.frozen_features(0) is objective.x
    assert first.shape == (len(objective.y), 16)


# ---------------------------------------------------------------------------------------------
# finetune_folds against finetune, fold by fold


def _cfg(model: dict, **overrides: Any) -> StudyConfig:
    return config_from_dict(merge(TINY, {"model": model, **overrides}))


def _pretrained(cfg: StudyConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    state = create_model(cfg.model, INPUT, 10).state_dict()
    return {k: v.detach().clone() for k, v in state.items()}


def _folds(k: int = 3, n: int = 24, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.rand(k, n, *INPUT, generator=g), torch.randint(0, classes, (k, n), generator=g)


SETTINGS = {
    "adam-l2sp": ({}, {}),
    "sgd-l2-warmup": (
        {"optimizer": "sgd", "head_warmup_epochs": 2},
        {"name": "l2", "penalize": "all", "scale": "per_sample"},
    ),
    "adam-none": ({}, {"name": "none"}),
    "adam-delta-attention": ({}, {"name": "delta", "delta_attention": True}),
}


@pytest.mark.parametrize("setting", SETTINGS.values(), ids=SETTINGS.keys())
@pytest.mark.parametrize("model", [MLP, CNN], ids=["mlp", "cnn"])
@pytest.mark.parametrize("frozen", [0, 1])
def test_folds_trained_together_match_one_by_one(model, setting, frozen) -> None:
    finetune_overrides, regularizer = setting
    cfg = _cfg(
        model,
        finetune={"epochs": 5, "batch_size": 10, **finetune_overrides},
        regularizer=regularizer,
    )
    pre = _pretrained(cfg)
    x, y = _folds()
    params = TrialParams(
        lambda_=0.5,
        lr=0.01,
        frozen_blocks=frozen,
        backbone_lr_mult=0.5,
        regularizer=cfg.regularizer.names[0],
    )
    seeds = [11, 12, 13]
    together = finetune_folds(pre, cfg, params, x, y, 4, INPUT, seeds)
    for fold, seed in enumerate(seeds):
        alone = finetune(pre, cfg, params, x[fold], y[fold], 4, INPUT, seed)
        trained = together[fold].state_dict()
        for name, value in alone.state_dict().items():
            torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5, msg=name)
        assert evaluate(together[fold], x[fold], y[fold]) == pytest.approx(
            evaluate(alone, x[fold], y[fold]), rel=1e-4
        )


def test_a_diverged_fold_is_reported_as_one_by_one() -> None:
    cfg = _cfg(MLP, finetune={"epochs": 3, "optimizer": "sgd"}, regularizer={"name": "l2"})
    pre = _pretrained(cfg)
    x, y = _folds(k=2)
    params = TrialParams(
        lambda_=1.0, lr=1e6, frozen_blocks=0, backbone_lr_mult=1.0, regularizer="l2"
    )
    together = finetune_folds(pre, cfg, params, x, y, 4, INPUT, [0, 1])
    with pytest.raises(DivergedError) as alone:
        finetune(pre, cfg, params, x[0], y[0], 4, INPUT, seed=0)
    assert isinstance(together[0], DivergedError)
    assert str(together[0]) == str(alone.value)


def test_stacked_penalty_is_each_folds_penalty() -> None:
    cfg = _cfg(MLP)
    pre = _pretrained(cfg)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(create_model(cfg.model, INPUT, 4))
    stacked = stack_models(models)
    for reg in ("l2", "l2sp", "none"):
        for penalize in ("weights", "all"):
            kw = {"head_lambda": 0.1, "penalize": penalize, "scale": 0.5}
            each = [create_regularizer(reg, m, pre, 0.7, **kw)() for m in models]
            per_fold = create_regularizer(reg, stacked, pre, 0.7, stacked=True, **kw)()
            torch.testing.assert_close(per_fold.expand(3), torch.stack(each))


# ---------------------------------------------------------------------------------------------
# When folds are batched


def test_fold_groups(tiny) -> None:
    def groups(model: dict, frozen: int, **overrides: Any) -> list[list[int]]:
        objective = _objective(tiny(model=model, cv={"k": 4}, **overrides))
        params = TrialParams(0.1, 0.01, frozen, 1.0, "l2sp")
        recipe = Recipe(objective.pretrained, objective.cfg, params, 4, INPUT)
        search = objective.search_folds
        trial = TrialFolds(recipe, [objective.folds[f] for f in search], search)
        return objective.schedule.groups(params, trial)

    assert groups(MLP, 0) == [[0, 1, 2, 3]]
    # Only the folds no pruner can skip train together.
    assert groups(MLP, 0, pruner={"name": "median", "n_warmup_steps": 1}) == [[0, 1], [2], [3]]
    assert groups(MLP, 0, pruner={"name": "wilcoxon", "n_warmup_steps": 3}) == [[0, 1, 2], [3]]
    assert groups(MLP, 0, finetune={"fold_batching": "off"}) == [[0], [1], [2], [3]]
    # BatchNorm or dropout in a block that trains: one by one; frozen (cached) it does not count.
    assert groups(MLP_BN, 1) == [[0], [1], [2], [3]]
    assert groups(MLP_BN, 2) == [[0, 1, 2, 3]]
    # Convolutions that train on the CPU (the tiny study's device): one by one.
    assert groups(CNN, 1) == [[0], [1], [2], [3]]
    # Large trained blocks on the CPU: one by one (the step is bound by arithmetic, not overhead).
    wide = {"name": "mlp", "hidden": [2048, 8]}
    assert groups(wide, 0) == [[0], [1], [2], [3]]
    assert groups(wide, 1) == [[0, 1, 2, 3]]
    assert groups(CNN, 2) == [[0, 1, 2, 3]]


def test_fold_batchable() -> None:
    cfg = _cfg(MLP_BN)
    model = create_model(cfg.model, INPUT, 4)
    assert not fold_batchable(model, 0)
    assert fold_batchable(model, 2)
    assert fold_batchable(create_model(_cfg(MLP).model, INPUT, 4), 0)


def test_objective_honours_finetune_threads(tiny) -> None:
    before = torch.get_num_threads()
    try:
        _objective(tiny(finetune={"threads": 2}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_new_head_is_not_the_source_models_initial_head() -> None:
    """Fine-tuning seed 0 must not redraw the head the source model started from under seed 0."""
    cfg = _cfg(MLP)
    torch.manual_seed(0)
    source_init = create_model(cfg.model, INPUT, 4)
    pre = _pretrained(cfg)
    x, y = _folds(k=1)
    params = TrialParams(
        lambda_=0.0, lr=1e-12, frozen_blocks=2, backbone_lr_mult=1.0, regularizer="none"
    )
    model = finetune(pre, _cfg(MLP, finetune={"epochs": 1}), params, x[0], y[0], 4, INPUT, seed=0)
    assert not torch.allclose(model.head.weight, source_init.head.weight)


# ---------------------------------------------------------------------------------------------
# Data terms (DELTA, BSS) on every path

DATA_TERMS = {
    "delta": ({"name": "delta"}, {"delta_lambda": 0.3}),
    "delta-attention": ({"name": "delta", "delta_attention": True}, {"delta_lambda": 0.3}),
    "l2sp-bss": ({"name": "l2sp", "bss_eta": 0.1, "bss_k": 2}, {"lambda": 0.3}),
}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One pretraining for the tests below (each of the others pretrains in its own tmp_path)."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("setting", DATA_TERMS.values(), ids=DATA_TERMS.keys())
def test_data_terms_fast_paths_give_the_plain_fold_scores(shared_cache, tmp_path, setting) -> None:
    """DELTA's pretrained feature maps from cached inputs, and BSS over folds trained together:
    the plain path's scores (frozen_blocks = 1: the cache starts at block 1, DELTA skips it)."""
    regularizer, lambda_ = setting
    params = {**lambda_, "lr": 0.02, "frozen_blocks": 1}
    cfg = merge(
        TINY,
        {
            "storage": f"sqlite:///{tmp_path / 'study.db'}",
            "pretrain": {"cache_dir": shared_cache},
            "model": MLP,
            "regularizer": regularizer,
        },
    )

    def run(**finetune: Any) -> dict[str, Any]:
        trial = optuna.trial.FixedTrial(params)
        _objective(merge(cfg, {"finetune": {"epochs": 6, **finetune}}))(trial)
        return trial.user_attrs

    plain = run(cache_frozen=False, fold_batching="off")
    resolved = plain["resolved_params"]
    assert resolved["regularizer"] == regularizer["name"]
    assert resolved.get("bss_eta", 0.0) == regularizer.get("bss_eta", 0.0)
    assert resolved["lambda"] == 0.3
    for path in PATHS.values():
        _assert_same_folds(run(**path), plain)
