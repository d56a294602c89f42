"""Augmentation searched beside λ: what a trial asks for, how a fold trains with it, and when the
frozen-feature cache is used. The augmentations themselves: tests/test_augmentations.py."""

from __future__ import annotations

import threading
from typing import Any

import optuna
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, merge

from tlsearch.augmentations import create_augmentation
from tlsearch.config import ParamRange, StudyConfig, config_from_dict
from tlsearch.config.schema import AUTO_AUGMENT
from tlsearch.errors import ConfigError
from tlsearch.models import create_model
from tlsearch.objective import KFoldObjective
from tlsearch.params import (
    STANDARD_AUGMENT,
    TrialParams,
    augment_choices,
    baseline_enqueue,
    baseline_params,
    suggest_params,
)
from tlsearch.pretrain import load_checkpoint
from tlsearch.registry import AUGMENTATIONS
from tlsearch.study import prepare
from tlsearch.training import Lanes, trainer

INPUT = (1, 8, 8)
MLP = {"name": "mlp", "hidden": [16, 8]}


def _cfg(**overrides: Any) -> StudyConfig:
    return config_from_dict(merge(TINY, {"model": MLP, **overrides}))


def _pretrained(cfg: StudyConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return create_model(cfg.model, INPUT, 10).state_dict()


def _params(augment: str, strength: float, regularizer: str = "l2sp") -> TrialParams:
    return TrialParams(0.1, 0.03, 0, 1.0, regularizer, {augment: strength}, augment=augment)


# ---------------------------------------------------------------------------------------------
# What a trial asks for


def test_auto_searches_augmentation_on_images_and_none_on_flat_features() -> None:
    cfg = config_from_dict({"search": {"augment": "auto"}})
    assert augment_choices(cfg, (1, 28, 28)) == [
        "none",
        "translate",
        "affine",
        "erase",
        "mixup",
        "cutmix",
    ]
    assert augment_choices(cfg, (64,)) == ["none"]
    named = config_from_dict({"search": {"augment": ["none", "translate"]}})
    with pytest.raises(ConfigError, match=r"search\.augment: translate transform images"):
        augment_choices(named, (64,))


def test_auto_records_each_strength_it_searches_and_none_drops_them() -> None:
    searched = config_from_dict({"search": {"augment": "auto"}})
    for name in AUTO_AUGMENT:
        declared = AUGMENTATIONS.get(name).hyperparameters[0].default
        assert searched.search.model_extra[name] == ParamRange.model_validate(declared)
    off = config_from_dict({"search": {"augment": "none"}})
    assert off.search.model_extra == {}
    assert off.search_hash() == config_from_dict({}).search_hash()  # "none" is the default


def test_a_trial_asks_for_its_augmentation_then_its_strength_last() -> None:
    cfg = config_from_dict({"search": {"augment": ["none", "translate", "mixup"]}})
    trial = optuna.trial.FixedTrial(
        {"lambda": 0.1, "lr": 0.01, "frozen_blocks": 1, "backbone_lr_mult": 0.5}
        | {"augment": "translate", "translate": 0.07}
    )
    params = suggest_params(trial, cfg, augment=["none", "translate", "mixup"])
    assert (params.augment, params.hyperparameters) == ("translate", {"translate": 0.07})
    assert params.to_dict()["augment"] == "translate"
    assert TrialParams.from_dict(params.to_dict()) == params
    # No augmentation: nothing written, as a trial read before augmentation existed.
    plain = baseline_params(cfg, "plain_finetuning")
    assert "augment" not in plain.to_dict() and plain.augment == "none"


def test_the_augmented_reference_is_plain_finetuning_with_the_standard_augmentation() -> None:
    cfg = config_from_dict({"search": {"augment": "auto"}})
    choices = augment_choices(cfg, (1, 28, 28))
    ref = baseline_params(cfg, "plain_augmented")
    plain = baseline_params(cfg, "plain_finetuning")
    assert ref.to_dict() == {**plain.to_dict(), **STANDARD_AUGMENT}
    assert baseline_enqueue(cfg, "plain_augmented", choices) == {
        **baseline_enqueue(cfg, "plain_finetuning", choices),
        **STANDARD_AUGMENT,
    }
    assert baseline_enqueue(cfg, "plain_finetuning", choices)["augment"] == "none"


# ---------------------------------------------------------------------------------------------
# How a fold trains with it


def _job(cfg: StudyConfig, params: TrialParams, folds: list[int]) -> trainer.FoldJob:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, *INPUT, generator=g), torch.arange(40) % 10
    recipe = trainer.Recipe(_pretrained(cfg), cfg, params, 10, INPUT)
    if len(folds) == 1:
        return recipe.job(x[folds[0] :: 2], y[folds[0] :: 2], tuple(folds))
    rows = torch.stack([torch.arange(f, 40, 2) for f in folds])
    return recipe.job(x[rows], y[rows], tuple(folds))


def _trained(t: trainer.Trainer) -> list[Any]:
    while t.epoch():
        pass
    return t.results()


@pytest.mark.parametrize("augment", ["translate", "mixup"])
def test_an_augmented_fold_trains_alike_in_turn_stacked_and_in_lanes(augment: str) -> None:
    """Each fold draws its augmentation from a generator of its own: alone, stacked with another
    fold, or on a thread beside it, it ends with the same weights."""
    cfg = _cfg(finetune={"epochs": 4, "batch_size": 8})
    params = _params(augment, 0.15 if augment == "translate" else 0.4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # bit for bit: one thread alone, one per lane
        alone = [_trained(trainer.Trainer(_job(cfg, params, [f])))[0] for f in (0, 1)]
        stacked = _trained(trainer.Trainer(_job(cfg, params, [0, 1])))
        lanes = [trainer.Trainer(_job(cfg, params, [f])) for f in (0, 1)]
        seen: set[str] = set()
        epoch = trainer.Trainer.epoch

        def watched(t: trainer.Trainer) -> bool:
            seen.add(threading.current_thread().name)
            return epoch(t)

        trainer.Trainer.epoch = watched  # type: ignore[method-assign]
        try:
            with Lanes(lanes, cores=2, min_seconds=0.0) as side_by_side:
                while side_by_side.advance(2):
                    pass
        finally:
            trainer.Trainer.epoch = epoch  # type: ignore[method-assign]
    finally:
        torch.set_num_threads(before)
    assert any(name.startswith("tlsearch-lane") for name in seen)
    for a, s, t in zip(alone, stacked, lanes, strict=True):
        (threaded,) = t.results()
        for k, v in a.state_dict().items():
            assert torch.equal(v, threaded.state_dict()[k]), k
            torch.testing.assert_close(v, s.state_dict()[k], rtol=1e-4, atol=1e-5)


def test_mixed_labels_are_the_targets_of_a_mixing_augmentation() -> None:
    cfg = _cfg(finetune={"epochs": 1, "batch_size": 64})
    t = trainer.Trainer(_job(cfg, _params("mixup", 0.4), [0]))
    state = t.augment_generators[0].get_state()
    loss = t._batch_loss((None,))
    g = torch.Generator()
    g.set_state(state)
    mix = create_augmentation("mixup", {"mixup": 0.4})
    x, y = mix(t.job.x, F.one_hot(t.job.y, 10).float(), g)
    assert not torch.equal(x, t.job.x)
    # The batch's loss: the cross-entropy against the mixed labels (L2-SP's own is closed-form).
    torch.testing.assert_close(loss, F.cross_entropy(t.model(x), y))


def test_delta_compares_augmented_images_with_the_start_models_own_maps() -> None:
    """At its start the model is its frozen copy: DELTA's term on augmented images is 0 there,
    where the maps of the images before augmentation would not be."""
    cfg = _cfg(regularizer={"name": "delta"}, finetune={"epochs": 1})
    t = trainer.Trainer(_job(cfg, _params("translate", 0.15, "delta"), [0]))
    (delta,) = [term for term in t.terms if term is t.penalty]
    g = torch.Generator().manual_seed(0)
    x, _ = create_augmentation("translate", {"translate": 0.15})(t.job.x, t.job.y, g)
    with torch.no_grad():
        outputs = t.forward(x, maps=True)[1]
        assert float(delta.batch_term(outputs, None, inputs=x)) == pytest.approx(0.0, abs=1e-6)
        assert float(delta.batch_term(outputs, slice(None))) > 1e-3


# ---------------------------------------------------------------------------------------------
# When the frozen-feature cache is used


def test_the_cache_is_used_exactly_when_no_input_augmentation_is_on(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config_from_dict(tiny(search={"augment": ["none", "translate"]}))
    ctx = prepare(cfg)
    task = ctx.task
    objective = KFoldObjective(
        cfg,
        task.target_train,
        load_checkpoint(ctx.checkpoint),
        task.input_shape,
        task.target_classes,
        ctx.device,
    )
    starts: list[int] = []
    build = trainer.Trainer.__init__

    def spy(self: trainer.Trainer, job: trainer.FoldJob) -> None:
        starts.append(job.start)
        build(self, job)

    monkeypatch.setattr(trainer.Trainer, "__init__", spy)
    fixed = {"lambda": 0.1, "lr": 0.01, "frozen_blocks": 2}
    objective(optuna.trial.FixedTrial({**fixed, "augment": "none"}))
    assert set(starts) == {2}
    starts.clear()
    objective(optuna.trial.FixedTrial({**fixed, "augment": "translate", "translate": 0.1}))
    assert set(starts) == {0}
