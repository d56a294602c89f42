"""tlsearch.regularizers: each penalty's value and gradient against a hand computation.

Convention under test: ``scale · λ/2 · Σ‖p − p⁰‖²`` over the trainable parameters covered
(``penalize="weights"``: tensors of rank ≥ 2; ``"all"``: every parameter), with L2-SP pulling the
backbone toward the pretrained weights and the new head toward zero with β = ``head_lambda``.
The data terms, DELTA's feature-map distance and BSS, are checked against their formulas on random
tensors (value and gradient), stacked against fold by fold.
What every registered regularizer must do (a finite scalar, its closed form, zero at the start
point) is checked in test_registry.py.
"""

from __future__ import annotations

import pytest
import torch

from tlsearch.config import ModelConfig
from tlsearch.errors import ConfigError
from tlsearch.models import BlockNet, create_model, stack_models
from tlsearch.registry import REGULARIZERS
from tlsearch.regularizers import BSS, DataTerm, Regularizer, create_regularizer
from tlsearch.training import block_outputs


def _tiny_net(batch_norm: bool = False) -> BlockNet:
    torch.manual_seed(0)
    return create_model(ModelConfig(name="mlp", hidden=[3, 2], batch_norm=batch_norm), (4,), 2)


def _pretrained(model: BlockNet, shift: float) -> dict[str, torch.Tensor]:
    """The model's state moved by ``shift`` times fixed noise: a start point distinct from it."""
    g = torch.Generator().manual_seed(1)
    return {
        k: v + shift * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in model.state_dict().items()
    }


def _covered(p: torch.Tensor, penalize: str) -> bool:
    return p.requires_grad and (penalize == "all" or p.dim() >= 2)


def _hand(
    reg: str,
    model: BlockNet,
    pre: dict,
    lambda_: float,
    head_lambda: float,
    penalize: str,
    scale: float,
) -> tuple[float, dict[str, torch.Tensor | None]]:
    """The penalty and its gradient, written out parameter by parameter."""
    value = 0.0
    grads: dict[str, torch.Tensor | None] = {}
    for name, param in model.named_parameters():
        if reg == "none" or not _covered(param, penalize):
            grads[name] = None
            continue
        p = param.detach()
        is_head = name.startswith("head.")
        if reg == "l2":
            value += scale * lambda_ / 2 * float((p.double() ** 2).sum())
            grads[name] = scale * lambda_ * p
        elif is_head:  # l2sp: the new head toward zero, with β
            value += scale * head_lambda / 2 * float((p.double() ** 2).sum())
            grads[name] = scale * head_lambda * p
        else:  # l2sp: the backbone toward its pretrained values, with α = λ
            d = p - pre[name]
            value += scale * lambda_ / 2 * float((d.double() ** 2).sum())
            grads[name] = scale * lambda_ * d
    return value, grads


@pytest.mark.parametrize("reg", ["l2", "l2sp", "none"])
@pytest.mark.parametrize("penalize", ["weights", "all"])
@pytest.mark.parametrize("scale", [1.0, 0.125])
@pytest.mark.parametrize("frozen", [0, 1])
def test_value_and_gradient_match_hand_computation(
    reg: str, penalize: str, scale: float, frozen: int
) -> None:
    model = _tiny_net()
    model.freeze(frozen)
    pre = _pretrained(model, shift=0.3)
    lambda_, head_lambda = 0.7, 0.05
    penalty = create_regularizer(
        reg, model, pre, lambda_, head_lambda=head_lambda, penalize=penalize, scale=scale
    )

    value = penalty()
    expected_value, expected_grads = _hand(reg, model, pre, lambda_, head_lambda, penalize, scale)
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected_value, rel=1e-5, abs=1e-7)

    model.zero_grad(set_to_none=True)
    if value.requires_grad:
        value.backward()
    for name, p in model.named_parameters():
        want = expected_grads[name]
        if want is None:
            # Not covered: frozen, a bias under "weights", or no penalty at all.
            assert p.grad is None or torch.count_nonzero(p.grad) == 0, name
        else:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-7, msg=name)


def test_weights_covers_only_kernels_and_all_adds_biases() -> None:
    model = _tiny_net()
    start = model.state_dict()
    weights = create_regularizer("l2", model, start, lambda_=2.0, penalize="weights")
    everything = create_regularizer("l2", model, start, lambda_=2.0, penalize="all")
    kernels = sum(
        float((p.detach() ** 2).sum()) for n, p in model.named_parameters() if n.endswith("weight")
    )
    biases = sum(
        float((p.detach() ** 2).sum()) for n, p in model.named_parameters() if n.endswith("bias")
    )
    assert weights().item() == pytest.approx(kernels, rel=1e-5)
    assert everything().item() == pytest.approx(kernels + biases, rel=1e-5)


def test_frozen_blocks_are_not_penalized() -> None:
    model = _tiny_net()
    pre = _pretrained(model, shift=0.5)
    before = create_regularizer("l2sp", model, pre, lambda_=1.0, head_lambda=0.0)().item()
    model.freeze(2)  # every block: only the head trains
    after = create_regularizer("l2sp", model, pre, lambda_=1.0, head_lambda=0.0)()
    assert before > 0
    assert after.item() == 0.0


def test_l2sp_is_zero_at_the_pretrained_start_point_apart_from_the_head() -> None:
    model = _tiny_net()
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    head_sq = float((model.head.weight.detach() ** 2).sum())

    penalty = create_regularizer("l2sp", model, pre, lambda_=10.0, head_lambda=0.0)()
    assert penalty.item() == 0.0
    penalty.backward()
    for name, p in model.named_parameters():
        # ‖p − p⁰‖ is not differentiable at 0 in general; the gradient must still be exactly 0.
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p)), name

    with_head = create_regularizer("l2sp", model, pre, lambda_=10.0, head_lambda=0.5)()
    assert with_head.item() == pytest.approx(0.5 / 2 * head_sq, rel=1e-6)


def test_l2sp_reference_is_a_copy_of_the_start_point() -> None:
    model = _tiny_net()
    pre = _pretrained(model, shift=0.0)
    penalty = create_regularizer("l2sp", model, pre, lambda_=1.0, head_lambda=0.0)
    for v in pre.values():
        v.add_(1.0)  # the caller's state changing later must not move the reference
    assert penalty().item() == 0.0


def test_head_lambda_only_weighs_the_head() -> None:
    model = _tiny_net()
    pre = _pretrained(model, shift=0.2)
    base = create_regularizer("l2sp", model, pre, lambda_=1.0, head_lambda=0.0)().item()
    with_head = create_regularizer("l2sp", model, pre, lambda_=1.0, head_lambda=3.0)().item()
    head_sq = float((model.head.weight.detach() ** 2).sum())
    assert with_head - base == pytest.approx(3.0 / 2 * head_sq, rel=1e-5)
    # L2 ignores β: its head is pulled with λ like everything else.
    l2a = create_regularizer("l2", model, pre, lambda_=1.0, head_lambda=0.0)().item()
    l2b = create_regularizer("l2", model, pre, lambda_=1.0, head_lambda=3.0)().item()
    assert l2a == l2b


def test_unknown_regularizer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^regularizer\.name: unknown regularizer 'l3' \("):
        create_regularizer("l3", _tiny_net(), {}, lambda_=1.0)


def _stacked_net(n: int, batch_norm: bool) -> BlockNet:
    """An MLP whose parameters hold ``n`` different models along a leading fold dimension."""
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        cfg = ModelConfig(name="mlp", hidden=[3, 2], batch_norm=batch_norm)
        models.append(create_model(cfg, (4,), 2))
    return stack_models(models)


# The penalties whose gradient the loop adds in closed form (every built-in one, see below).
CLOSED_FORM = [n for n in REGULARIZERS.names() if REGULARIZERS.get(n).load().closed_form_grad]


def test_builtin_penalties_have_closed_form_gradients() -> None:
    # Backpropagating the penalty's graph instead costs a sixth of a fine-tuning step.
    assert {"l2", "l2sp", "none"} <= set(CLOSED_FORM)


@pytest.mark.parametrize("name", CLOSED_FORM)
@pytest.mark.parametrize("penalize", ["weights", "all"])
@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("frozen", [0, 1])
def test_closed_form_gradient_is_the_autograd_gradient(
    name: str, penalize: str, stacked: bool, frozen: int
) -> None:
    """What the fine-tuning loop adds to ``.grad`` is the gradient of ``forward()``, on top of the
    data gradient already there, and it skips parameters that train no longer (head warm-up)."""
    model = _stacked_net(3, batch_norm=True) if stacked else _tiny_net(batch_norm=True)
    model.freeze(frozen)
    pre = _pretrained(_tiny_net(batch_norm=True), shift=0.3)
    penalty = create_regularizer(
        name, model, pre, 0.7, head_lambda=0.05, penalize=penalize, scale=0.5, stacked=stacked
    )
    assert penalty.closed_form_grad
    trained = [p for p in model.parameters() if p.requires_grad]
    data_grads = [torch.randn_like(p) for p in trained]

    def autograd() -> list[torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        for p, g in zip(trained, data_grads, strict=True):
            p.grad = g.clone()
        value = penalty().sum()
        if value.requires_grad:
            value.backward()
        return [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    def closed_form() -> list[torch.Tensor | None]:
        model.zero_grad(set_to_none=True)
        for p, g in zip(trained, data_grads, strict=True):
            p.grad = g.clone()
        penalty.accumulate_grad_()
        return [None if p.grad is None else p.grad.clone() for p in model.parameters()]

    for want, got in zip(autograd(), closed_form(), strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # Head warm-up: the backbone does not train, so neither path touches its gradient.
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    trained = list(model.head.parameters())
    data_grads = [torch.randn_like(p) for p in trained]
    for want, got in zip(autograd(), closed_form(), strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Data terms: DELTA's feature-map distance and BSS, against their formulas written out here


def _maps(lead: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """Feature maps of three blocks (conv, conv, fc) on a batch: ``(*lead, channels, ...)``."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4, 4), (5, 2, 2), (6,)]
    return [torch.randn(*lead, *s, generator=g, dtype=torch.float64) for s in shapes]


def _delta_by_hand(
    maps: list[torch.Tensor],
    refs: list[torch.Tensor],
    lambda_: float,
    attention: list[torch.Tensor] | None = None,
) -> tuple[float, list[torch.Tensor]]:
    """λ/2 · mean over samples of Σ_j Σ_c a_jc ‖FM_jc − FM⁰_jc‖², and its gradient in each map
    (λ/B · a_jc (FM_jc − FM⁰_jc)), sample by sample and channel by channel."""
    batch = len(maps[0])
    value, grads = 0.0, []
    for j, (fm, ref) in enumerate(zip(maps, refs, strict=True)):
        fm = fm.detach()
        grad = torch.zeros_like(fm)
        for b in range(batch):
            for c in range(fm.shape[1]):
                a = 1.0 if attention is None else float(attention[j][c])
                d = fm[b, c] - ref[b, c]
                value += lambda_ / 2 * a * float((d**2).sum()) / batch
                grad[b, c] = lambda_ * a * d / batch
        grads.append(grad)
    return value, grads


def _delta(
    lambda_: float, stacked: bool = False, attention: list[torch.Tensor] | None = None
) -> Regularizer:
    model = _stacked_net(2, batch_norm=False) if stacked else _tiny_net()
    penalty = create_regularizer("delta", model, model.state_dict(), lambda_, stacked=stacked)
    penalty.attention = attention  # as the training loop sets it (delta_attention)
    return penalty


@pytest.mark.parametrize("attention", [False, True])
def test_delta_data_term_matches_its_formula(attention: bool) -> None:
    maps = [m.requires_grad_() for m in _maps((5,), seed=0)]
    refs = _maps((5,), seed=1)
    weights = None
    if attention:
        g = torch.Generator().manual_seed(2)
        weights = [torch.rand(m.shape[1], generator=g, dtype=torch.float64) for m in maps]
    penalty = _delta(0.7, attention=weights)
    assert isinstance(penalty, DataTerm)

    value = penalty.data_penalty(maps, refs)
    value.backward()
    want, grads = _delta_by_hand(maps, refs, 0.7, weights)
    assert value.dim() == 0
    assert value.item() == pytest.approx(want, rel=1e-10)
    for m, g in zip(maps, grads, strict=True):
        torch.testing.assert_close(m.grad, g)


def test_delta_stacked_is_each_folds_data_term() -> None:
    maps, refs = _maps((2, 5), seed=0), _maps((2, 5), seed=1)
    g = torch.Generator().manual_seed(2)
    # Each fold's attention is its own (computed from its own training split).
    weights = [torch.rand(2, m.shape[2], generator=g, dtype=torch.float64) for m in maps]
    stacked = _delta(0.7, stacked=True, attention=weights).data_penalty(maps, refs)
    assert stacked.shape == (2,)
    for fold in range(2):
        alone = _delta(0.7, attention=[w[fold] for w in weights]).data_penalty(
            [m[fold] for m in maps], [r[fold] for r in refs]
        )
        torch.testing.assert_close(stacked[fold], alone)


def test_delta_weight_term_is_the_heads_only() -> None:
    """β/2 · ‖w_head‖² (times the scale): the blocks are held by their feature maps, not here."""
    model = _tiny_net()
    pre = _pretrained(model, shift=0.5)
    penalty = create_regularizer("delta", model, pre, 10.0, head_lambda=0.3, scale=0.5)
    head_sq = float((model.head.weight.detach() ** 2).sum())
    assert penalty().item() == pytest.approx(0.5 * 0.3 / 2 * head_sq, rel=1e-6)


def test_delta_is_zero_at_the_start_point() -> None:
    """Before a weight moves, the trained blocks compute what the pretrained ones do: no cost and
    no pull (eval mode, as the training loop computes the pretrained maps)."""
    model = _tiny_net(batch_norm=True)
    model.freeze(1)
    x = torch.randn(6, 4)
    model.eval()
    with torch.no_grad():
        refs = block_outputs(model, x)[1][1:]
    penalty = create_regularizer("delta", model, model.state_dict(), 10.0, head_lambda=0.0)
    value = penalty.data_penalty(block_outputs(model, x)[1][1:], refs) + penalty()
    assert value.item() == 0.0
    value.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.equal(p.grad, torch.zeros_like(p)), name


def _bss_by_hand(features: torch.Tensor, eta: float, k: int) -> tuple[float, torch.Tensor]:
    """η · Σ of the k smallest σ², from the eigenvalues of F Fᵀ or Fᵀ F (the smaller one), and its
    gradient Σ_i 2 σ_i u_i v_iᵀ from the full SVD."""
    f = features.detach().double()
    gram = f @ f.T if f.shape[0] <= f.shape[1] else f.T @ f
    eig = torch.linalg.eigvalsh(gram)  # ascending: the squared singular values
    value = eta * float(eig[:k].sum())
    u, s, vh = torch.linalg.svd(f, full_matrices=False)
    grad = torch.zeros_like(f)
    for i in range(1, k + 1):
        grad += eta * 2 * s[-i] * torch.outer(u[:, -i], vh[-i])
    return value, grad


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("shape", [(8, 5), (4, 6)], ids=["tall", "wide"])
def test_bss_matches_its_formula(k: int, shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    value = BSS(0.3, k)(features)
    value.backward()
    want, grad = _bss_by_hand(features, 0.3, k)
    assert value.dim() == 0
    assert value.item() == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(features.grad, grad)


def test_bss_stacked_is_each_folds() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 8, 5, generator=g)
    stacked = BSS(0.3, 2)(features)
    assert stacked.shape == (3,)
    torch.testing.assert_close(stacked, torch.stack([BSS(0.3, 2)(f) for f in features]))


def test_delta_attention_of_ones_is_plain_delta() -> None:
    """a_jc = 1 everywhere (what delta_attention gives when no channel matters more) is DELTA
    without attention."""
    maps, refs = _maps((5,), seed=0), _maps((5,), seed=1)
    ones = [torch.ones(m.shape[1], dtype=torch.float64) for m in maps]
    torch.testing.assert_close(
        _delta(0.7, attention=ones).data_penalty(maps, refs), _delta(0.7).data_penalty(maps, refs)
    )
