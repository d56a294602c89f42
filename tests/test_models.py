"""tlsearch.models: every registered model builds, has the right output, and freezes block-wise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tlsearch.config import ModelConfig, config_from_dict
from tlsearch.errors import ConfigError
from tlsearch.models import create_model
from tlsearch.registry import MODELS


def _model(name: str, **options: object) -> ModelConfig:
    """A model section as a loaded study file holds it: the entry's defaults filled in."""
    return ModelConfig(name=name, **MODELS.get(name).validate_options(options, "model"))


def _cfg(name: str, batch_norm: bool = False, dropout: float = 0.0) -> ModelConfig:
    return _model(
        name, hidden=[16, 8], channels=[4], fc=16, batch_norm=batch_norm, dropout=dropout
    )


def _entry_blocks(cfg: ModelConfig) -> int:
    """The block count the registry entry gives, without building the model."""
    return MODELS.get(cfg.name).blocks(cfg.options)


def test_registry_lists_the_builtin_models() -> None:
    assert {"cnn", "mlp"} <= set(MODELS.names())


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("input_shape", [(1, 8, 8), (2, 12, 12)])
def test_builds_and_forward_shape(name: str, batch_norm: bool, input_shape: tuple) -> None:
    cfg = _cfg(name, batch_norm)
    model = create_model(cfg, input_shape, 7)
    assert len(model.blocks) == _entry_blocks(cfg)
    model.train()
    x = torch.randn(5, *input_shape)
    assert model(x).shape == (5, 7)
    # A flat sample is reshaped to the input shape: the same network reads either form.
    model.eval()
    torch.testing.assert_close(model(x.reshape(5, -1)), model(x))
    assert model.features(x).shape == (5, model.head.in_features)


@pytest.mark.parametrize("name", MODELS.names())
def test_replace_head(name: str) -> None:
    model = create_model(_cfg(name), (1, 8, 8), 10)
    features = model.head.in_features
    model.replace_head(3)
    assert (model.head.in_features, model.head.out_features) == (features, 3)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


@pytest.mark.parametrize("name", MODELS.names())
def test_freeze_sets_requires_grad_and_keeps_frozen_batchnorm_in_eval(name: str) -> None:
    cfg = _cfg(name, batch_norm=True, dropout=0.5)
    n_blocks = _entry_blocks(cfg)
    for k in range(n_blocks + 1):
        model = create_model(cfg, (1, 8, 8), 4)
        model.freeze(k)
        model.train()
        for i, block in enumerate(model.blocks):
            frozen = i < k
            assert all(p.requires_grad is not frozen for p in block.parameters()), (k, i)
            norms = [m for m in block.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
            assert norms, "batch_norm=True must put a BatchNorm in every block"
            for m in block.modules():
                assert m.training is not frozen, (k, i, m)
        assert all(p.requires_grad for p in model.head.parameters())
        assert model.head.training

        # A training-mode forward pass leaves frozen statistics as they were.
        before = {n: b.clone() for n, b in model.named_buffers()}
        model(torch.randn(6, 1, 8, 8))
        for n, b in model.named_buffers():
            block = int(n.split(".")[1])
            assert torch.equal(b, before[n]) is (block < k), (k, n)

        # eval() still puts everything in eval mode; train() again keeps frozen blocks in eval.
        model.eval()
        assert not any(m.training for m in model.modules())
        model.train()
        assert [b.training for b in model.blocks] == [i >= k for i in range(n_blocks)]


@pytest.mark.parametrize("name", MODELS.names())
def test_freeze_beyond_the_blocks_fails(name: str) -> None:
    model = create_model(_cfg(name), (1, 8, 8), 4)
    with pytest.raises(AssertionError):
        model.freeze(len(model.blocks) + 1)


def test_unknown_model_is_a_config_error() -> None:
    cfg = ModelConfig(name="resnet")
    with pytest.raises(
        ConfigError,
        match=r"^model\.name: unknown model 'resnet' \(choose from cnn, mlp; a plug-in adds more: "
        r"install its package, or pass --plugin MODULE\)$",
    ):
        create_model(cfg, (1, 8, 8), 10)


def test_cnn_needs_image_inputs() -> None:
    with pytest.raises(ConfigError, match=r"^model\.name: 'cnn' needs image inputs"):
        create_model(_cfg("cnn"), (64,), 10)


def test_block_count_of_the_entry() -> None:
    assert _entry_blocks(_model("mlp", hidden=[8, 8, 8])) == 3
    assert _entry_blocks(_model("cnn", channels=[4, 8])) == 3
    assert _entry_blocks(config_from_dict({}).model) == 3  # the default CNN: conv16, conv32, fc128


@pytest.mark.parametrize("batch_norm", [False, True])
def test_cnn_pools_before_relu_with_the_values_and_gradients_of_relu_then_pool(
    batch_norm: bool,
) -> None:
    """The CNN's conv blocks max-pool before the ReLU (cheaper); ReLU-then-pool is the same
    function with the same gradients, including windows with no positive value and ties."""
    torch.manual_seed(0)
    model = create_model(
        _model("cnn", channels=[4, 6], fc=8, batch_norm=batch_norm), (1, 8, 8), 3
    ).train()
    reference = copy.deepcopy(model)
    for block in reference.blocks[:2]:
        pool, relu = block[-2], block[-1]
        assert isinstance(pool, nn.MaxPool2d) and isinstance(relu, nn.ReLU)
        block[-2], block[-1] = relu, pool
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(16, 1, 8, 8)
    x[:4] = -x[:4].abs()  # whole windows ≤ 0 in the first layer
    x[4:8, :, :, 1::2] = x[4:8, :, :, ::2]  # ties inside windows
    outs = []
    for net in (model, reference):
        out = net(x)
        out.square().sum().backward()
        outs.append((out.detach(), {n: p.grad for n, p in net.named_parameters()}))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(grad, outs[1][1][name], rtol=1e-6, atol=1e-7, msg=name)
