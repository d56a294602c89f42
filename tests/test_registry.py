"""tlsearch.registry: names → entries, built lazily; and every registered model and regularizer
keeps the contract the rest of tlsearch relies on (parametrized over the registries, as timm's
tests are over its models: a new entry is tested for free)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from tlsearch.config import ModelConfig, config_from_dict
from tlsearch.errors import ConfigError
from tlsearch.models import BlockNet, create_model
from tlsearch.params import SEARCHED
from tlsearch.registry import (
    AUGMENTATIONS,
    MODELS,
    REGULARIZERS,
    TERMS,
    Entry,
    Hyperparameter,
    Registry,
)
from tlsearch.regularizers import Regularizer, create_regularizer

ADD_MORE = "a plug-in adds more: install its package, or pass --plugin MODULE"

# ---------------------------------------------------------------------------------------------
# Registry


def _widgets() -> Registry:
    reg = Registry("widget", "widget.name")
    reg.register("round", "builtins:round")
    reg.register("abs", abs)
    return reg


def test_register_names_get_create() -> None:
    reg = _widgets()
    assert reg.names() == ["abs", "round"]
    assert "abs" in reg and "max" not in reg
    entry = reg.get("round")
    assert isinstance(entry, Entry)
    assert (entry.name, entry.target, entry.origin) == ("round", "builtins:round", "tlsearch")
    assert reg.create("round", 2.6) == 3
    assert reg.create("abs", -2) == 2
    assert reg.create("round", 2.567, ndigits=1) == 2.6  # keywords reach the builder


def test_register_as_a_decorator_returns_the_object_unchanged() -> None:
    reg = Registry("widget", "widget.name")

    @reg.register("double")
    def double(x: int) -> int:
        return 2 * x

    assert double(4) == 8
    assert reg.get("double").target is double
    assert reg.create("double", 5) == 10


def test_unknown_name_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        _widgets().get("max")
    assert str(info.value) == (
        f"widget.name: unknown widget 'max' (choose from abs, round; {ADD_MORE})"
    )
    assert info.value.exit_code == 2
    with pytest.raises(ConfigError, match=r"^widget\.name: unknown widget 'max' "):
        _widgets().create("max", 1)


def test_unknown_model_names_the_builtin_models() -> None:
    with pytest.raises(ConfigError) as info:
        MODELS.get("x")
    assert str(info.value) == f"model.name: unknown model 'x' (choose from cnn, mlp; {ADD_MORE})"


def test_a_builder_is_imported_only_by_create(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = "tlsearch_registry_probe"
    (tmp_path / f"{module}.py").write_text(
        "class Widget:\n"
        "    def __init__(self, size, colour='red'):\n"
        "        self.size, self.colour = size, colour\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert module not in sys.modules
    try:
        reg = Registry("widget", "widget.name")
        reg.register("probe", f"{module}:Widget")
        # Listing, looking up and checking a name never imports the builder.
        assert reg.names() == ["probe"]
        assert "probe" in reg
        assert reg.get("probe").target == f"{module}:Widget"
        assert module not in sys.modules
        widget = reg.create("probe", 3, colour="blue")
        assert module in sys.modules
        assert type(widget).__module__ == module
        assert (widget.size, widget.colour) == (3, "blue")
        # Imported once: the entry keeps the builder.
        assert reg.get("probe").load() is sys.modules[module].Widget
    finally:
        sys.modules.pop(module, None)


def test_a_builder_that_cannot_be_imported_is_one_config_error() -> None:
    reg = Registry("widget", "widget.name")
    reg.register("gone", "tlsearch_no_such_module:build")
    reg.register("typo", "builtins:nope")
    with pytest.raises(ConfigError) as info:
        reg.create("gone")
    assert str(info.value) == (
        "gone (tlsearch): cannot load tlsearch_no_such_module:build: "
        "ModuleNotFoundError: No module named 'tlsearch_no_such_module'"
    )
    with pytest.raises(ConfigError, match=r"^typo \(tlsearch\): cannot load builtins:nope: "):
        reg.create("typo")


def test_a_name_registered_twice_by_another_origin_is_an_error() -> None:
    reg = _widgets()
    with pytest.raises(ConfigError) as info:
        reg.register("round", "plugin_widgets:round", origin="plugin-widgets 1.0")
    assert str(info.value) == "widget 'round' is registered twice (tlsearch; plugin-widgets 1.0)"
    assert reg.get("round").target == "builtins:round"  # never a silent swap
    # The same origin may register a name again (a module imported twice).
    reg.register("round", "builtins:round")
    assert reg.create("round", 1.4) == 1


def test_a_plugin_cannot_take_a_builtin_model_name() -> None:
    with pytest.raises(ConfigError, match=r"^model 'mlp' is registered twice \(tlsearch; evil\)$"):
        MODELS.register("mlp", "evil:mlp", origin="evil")
    assert MODELS.get("mlp").origin == "tlsearch"
    assert MODELS.get("mlp").target == "tlsearch.models.blocknet:mlp"


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    width: int = 4


def test_options_are_validated_with_defaults_filled_in() -> None:
    entry = Entry("box", "builtins:dict", options=_Options)
    assert entry.validate_options({}, "model") == {"width": 4}
    assert entry.validate_options({"width": 7}, "model") == {"width": 7}
    with pytest.raises(ConfigError) as info:
        entry.validate_options({"widht": 3, "width": "x"}, "model")
    assert sorted(str(info.value).splitlines()) == [
        "model.widht: unknown option for model 'box'",
        "model.width: Input should be a valid integer",
    ]
    bare = Entry("plain", "builtins:dict")
    assert bare.validate_options({}, "model") == {}
    with pytest.raises(ConfigError, match=r"^model\.size: unknown option \('plain' takes none\)$"):
        bare.validate_options({"size": 1}, "model")


def test_an_unknown_model_option_is_one_line_naming_it() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"name": "mlp", "widht": 3}})
    assert str(info.value) == "config: model.widht: unknown option for model 'mlp'"


def test_key_adapter_maps_a_checkpoints_names() -> None:
    state = {"0.weight": 1, "fc.weight": 2}
    assert Entry("m", "builtins:dict").adapt_keys(state) == state
    renamed = Entry(
        "m", "builtins:dict", key_adapter=lambda s: {f"blocks.{k}": v for k, v in s.items()}
    )
    assert renamed.adapt_keys(state) == {"blocks.0.weight": 1, "blocks.fc.weight": 2}
    by_name = Entry("m", "builtins:dict", key_adapter="builtins:dict")
    assert by_name.adapt_keys(state) == state and by_name.adapt_keys(state) is not state


# ---------------------------------------------------------------------------------------------
# Every registered model

INPUT = (1, 16, 16)
# Small options for the built-ins; a plug-in model is tested with its defaults.
SMALL = {"mlp": {"hidden": [6, 4]}, "cnn": {"channels": [3], "fc": 8}}


def _model_config(name: str, options: dict) -> ModelConfig:
    """The model section a loaded study file holds: the entry's defaults filled in."""
    return ModelConfig(name=name, **MODELS.get(name).validate_options(options, "model"))


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_with_the_blocks_its_entry_counts(name: str) -> None:
    entry = MODELS.get(name)
    assert entry.blocks is not None, "a model entry says how many blocks it has"
    for options in ({}, SMALL.get(name, {})):
        cfg = _model_config(name, options)
        model = create_model(cfg, INPUT, 5)
        assert isinstance(model, BlockNet)
        assert len(model.blocks) == entry.blocks(cfg.options)
        assert model(torch.randn(2, *INPUT)).shape == (2, 5)


BLOCK_COUNTS = [
    ("mlp", {"hidden": [8]}, 1),
    ("mlp", {"hidden": [8, 8, 8, 8]}, 4),
    ("mlp", {"hidden": [4, 4], "batch_norm": True, "dropout": 0.1}, 2),
    ("mlp", {}, 2),
    ("cnn", {"channels": [4]}, 2),
    ("cnn", {"channels": [2, 2, 2], "fc": 4}, 4),
    ("cnn", {"channels": [4, 8], "batch_norm": True}, 3),
    ("cnn", {}, 3),
]


@pytest.mark.parametrize("name, options, n_blocks", BLOCK_COUNTS)
def test_block_count_from_the_entry_is_the_built_models(
    name: str, options: dict, n_blocks: int
) -> None:
    # Checking frozen_blocks against the model must not build it: the entry counts the blocks.
    cfg = _model_config(name, options)
    assert MODELS.get(name).blocks(cfg.options) == n_blocks
    assert len(create_model(cfg, INPUT, 3).blocks) == n_blocks


def test_frozen_blocks_are_checked_against_the_entrys_count() -> None:
    ok = {"model": {"name": "mlp", "hidden": [8, 8, 8]}, "search": {"frozen_blocks": 3}}
    assert config_from_dict(ok).search.frozen_blocks == 3
    with pytest.raises(ConfigError) as info:
        config_from_dict({**ok, "search": {"frozen_blocks": 4}})
    assert str(info.value) == "config: search.frozen_blocks: 4 exceeds the 3 blocks of model 'mlp'"


# ---------------------------------------------------------------------------------------------
# Every registered regularizer, on every registered model


# A penalty's own hyperparameters (besides λ) at their off values: what it is without them.
NONE_OWN: dict[str, Any] = {"hyperparameters": {}}


def _net(name: str, batch_norm: bool = False) -> BlockNet:
    torch.manual_seed(0)
    return create_model(
        _model_config(name, {**SMALL.get(name, {}), "batch_norm": batch_norm}), INPUT, 3
    )


def _shifted(model: BlockNet, shift: float) -> dict[str, torch.Tensor]:
    """The model's state moved by ``shift`` times fixed noise: a start point distinct from it."""
    g = torch.Generator().manual_seed(1)
    return {
        k: v + shift * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("name", REGULARIZERS.names())
def test_every_regularizer_is_created_by_name(name: str) -> None:
    model = _net("mlp")
    penalty = create_regularizer(
        name, model, model.state_dict(), 0.3, head_lambda=0.01, **NONE_OWN
    )
    assert isinstance(penalty, Regularizer)
    assert penalty.name == name
    assert (penalty.lambda_, penalty.head_lambda) == (0.3, 0.01)


# Every hyperparameter a registered penalty, loss term or augmentation declares: (registry, entry,
# declaration).
DECLARED = [
    (registry, name, h)
    for registry in (REGULARIZERS, TERMS, AUGMENTATIONS)
    for name in registry.names()
    for h in registry.get(name).hyperparameters
]


def test_every_declared_hyperparameter_has_a_name_of_its_own() -> None:
    names = [h.name for _, _, h in DECLARED]
    assert len(set(names)) == len(names), names
    assert not set(names) & {*SEARCHED, "regularizer"}


@pytest.mark.parametrize(
    ("registry", "entry", "h"), DECLARED, ids=[f"{e}.{h.name}" for _, e, h in DECLARED]
)
def test_every_declared_hyperparameter_has_a_value(
    registry: Registry, entry: str, h: Hyperparameter
) -> None:
    """Its config field exists, or its default is a valid value; a loss term's is off (a term is
    on only where a study turns it on), and only a penalty has a λ of its own."""
    cfg = config_from_dict({"regularizer": {"name": entry}} if registry is REGULARIZERS else {})
    if h.field is not None:
        section, field = h.field.split(".")
        value = getattr(getattr(cfg, section), field)
    else:
        value = cfg.search.model_extra.get(h.name, h.default)
    assert value is not None
    if registry is TERMS:
        assert value == h.off and not h.is_lambda


@pytest.mark.parametrize("name", REGULARIZERS.names())
@pytest.mark.parametrize("model_name", MODELS.names())
@pytest.mark.parametrize("batch_norm", [False, True])
def test_every_regularizer_is_a_finite_scalar_with_a_gradient(
    name: str, model_name: str, batch_norm: bool
) -> None:
    model = _net(model_name, batch_norm)
    model.freeze(1)
    pre = _shifted(model, shift=0.1)
    for penalize in ("weights", "all"):
        penalty = create_regularizer(
            name, model, pre, lambda_=0.3, head_lambda=0.01, penalize=penalize, **NONE_OWN
        )
        value = penalty()
        assert isinstance(value, torch.Tensor) and value.dim() == 0
        assert math.isfinite(value.item()) and value.item() >= 0.0

        # It is added to a loss: the sum must backpropagate into the trainable parameters only.
        x = torch.randn(5, *INPUT)
        loss = model(x).logsumexp(1).mean() + value
        model.zero_grad(set_to_none=True)
        loss.backward()
        for pname, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), pname
            else:
                assert p.grad is None, pname

        # Linear in the scale factor, and nothing at all when λ = β = 0.
        scaled = create_regularizer(
            name, model, pre, 0.3, head_lambda=0.01, penalize=penalize, scale=0.25, **NONE_OWN
        )
        assert scaled().item() == pytest.approx(0.25 * value.item(), rel=1e-6, abs=1e-12)
        zero = create_regularizer(
            name, model, pre, lambda_=0.0, head_lambda=0.0, penalize=penalize, **NONE_OWN
        )
        assert zero().item() == 0.0


@pytest.mark.parametrize("name", REGULARIZERS.names())
@pytest.mark.parametrize("model_name", MODELS.names())
@pytest.mark.parametrize("penalize", ["weights", "all"])
def test_every_closed_form_gradient_is_the_autograd_gradient(
    name: str, model_name: str, penalize: str
) -> None:
    """Where a regularizer has a closed-form gradient (the loop then skips backpropagating the
    penalty), it is the gradient of ``forward()``; where it has none, it says so."""
    model = _net(model_name, batch_norm=True)
    model.freeze(1)
    penalty = create_regularizer(
        name,
        model,
        _shifted(model, 0.3),
        0.7,
        head_lambda=0.05,
        penalize=penalize,
        scale=0.5,
        **NONE_OWN,
    )
    if not penalty.closed_form_grad:
        with pytest.raises(NotImplementedError, match=f"regularizer '{name}'"):
            penalty.accumulate_grad_()
        return
    trained = [p for p in model.parameters() if p.requires_grad]
    data_grads = [torch.randn_like(p) for p in trained]
    model.zero_grad(set_to_none=True)
    for p, g in zip(trained, data_grads, strict=True):
        p.grad = g.clone()
    value = penalty()
    if value.requires_grad:
        value.backward()
    want = [p.grad.clone() for p in trained]
    for p, g in zip(trained, data_grads, strict=True):
        p.grad = g.clone()
    penalty.accumulate_grad_()
    for p, w in zip(trained, want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name", ["l2sp", "none"])
@pytest.mark.parametrize("model_name", MODELS.names())
def test_zero_at_the_start_point(name: str, model_name: str) -> None:
    """L2-SP (with β = 0 for the new head) and no penalty cost nothing, and pull nowhere, before
    fine-tuning moves a weight."""
    model = _net(model_name, batch_norm=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    for penalize in ("weights", "all"):
        penalty = create_regularizer(
            name, model, start, lambda_=10.0, head_lambda=0.0, penalize=penalize
        )
        value = penalty()
        assert value.item() == 0.0
        model.zero_grad(set_to_none=True)
        if value.requires_grad:
            value.backward()
        for pname, p in model.named_parameters():
            assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p)), pname
        model.zero_grad(set_to_none=True)
        penalty.accumulate_grad_()
        for pname, p in model.named_parameters():
            assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p)), pname
