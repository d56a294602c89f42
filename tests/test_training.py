"""tlsearch.training: frozen blocks stay bit-identical, the rest trains, runs repeat exactly."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import TINY, merge

from tlsearch.config import ModelConfig, StudyConfig, config_from_dict
from tlsearch.errors import DivergedError
from tlsearch.models import create_model, stack_models
from tlsearch.params import TrialParams
from tlsearch.registry import REGULARIZERS
from tlsearch.regularizers import delta
from tlsearch.training import Lanes, batchnorm_from, block_outputs, evaluate, finetune, trainer
from tlsearch.training.adam import FusedAdam

INPUT = (1, 8, 8)


def _cfg(model: dict, **overrides: object) -> StudyConfig:
    return config_from_dict(merge(TINY, {"model": model, **overrides}))


def _pretrained(cfg: StudyConfig, source_classes: int = 10) -> dict[str, torch.Tensor]:
    """A 'pretrained' state whose BatchNorm statistics are not the defaults."""
    torch.manual_seed(123)
    model = create_model(cfg.model, INPUT, source_classes)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, *INPUT) * 2 + 0.5)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _target(n: int = 40, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.rand(n, *INPUT, generator=g), torch.arange(n) % classes


MODELS = {
    "mlp": {"name": "mlp", "hidden": [16, 8, 8], "batch_norm": True},
    "cnn": {"name": "cnn", "channels": [4, 4], "fc": 16, "batch_norm": True},
}


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
@pytest.mark.parametrize("frozen", [1, 2])
@pytest.mark.parametrize("head_warmup", [0, 2])
def test_frozen_blocks_stay_bit_identical(model: dict, frozen: int, head_warmup: int) -> None:
    cfg = _cfg(model, finetune={"epochs": 4, "batch_size": 16, "head_warmup_epochs": head_warmup})
    pre = _pretrained(cfg)
    pre_copy = {k: v.clone() for k, v in pre.items()}
    x, y = _target()
    params = TrialParams(
        lambda_=0.01, lr=0.05, frozen_blocks=frozen, backbone_lr_mult=1.0, regularizer="l2sp"
    )

    tuned = finetune(pre, cfg, params, x, y, num_classes=4, input_shape=INPUT, seed=0)

    state = tuned.state_dict()
    n_blocks = len(tuned.blocks)
    for key, value in state.items():
        if key.startswith("head."):
            continue
        block = int(key.split(".")[1])
        if block < frozen:
            # Weights, biases and BatchNorm statistics (running mean/var, batch count) alike.
            assert torch.equal(value, pre[key]), key
        elif key.endswith(("weight", "running_mean")):
            assert not torch.equal(value, pre[key]), f"{key} of an unfrozen block did not train"
    assert frozen < n_blocks, "the test needs an unfrozen block to watch"
    assert state["head.weight"].shape == (4, tuned.head.in_features)
    # The caller's pretrained state is not touched.
    assert all(torch.equal(pre[k], pre_copy[k]) for k in pre)


@pytest.mark.parametrize("model", MODELS.values(), ids=MODELS.keys())
def test_all_blocks_frozen_trains_only_the_head(model: dict) -> None:
    cfg = _cfg(model, finetune={"epochs": 3})
    pre = _pretrained(cfg)
    x, y = _target()
    n_blocks = len(create_model(cfg.model, INPUT, 4).blocks)
    params = TrialParams(
        lambda_=0.01, lr=0.05, frozen_blocks=n_blocks, backbone_lr_mult=1.0, regularizer="l2sp"
    )
    tuned = finetune(pre, cfg, params, x, y, 4, INPUT, seed=0)
    for key, value in tuned.state_dict().items():
        if not key.startswith("head."):
            assert torch.equal(value, pre[key]), key


def test_backbone_lr_mult_zero_keeps_backbone_weights() -> None:
    cfg = _cfg({"name": "mlp", "hidden": [16, 8]}, finetune={"epochs": 3})
    pre = _pretrained(cfg)
    x, y = _target()
    params = TrialParams(
        lambda_=0.01, lr=0.05, frozen_blocks=0, backbone_lr_mult=0.0, regularizer="l2sp"
    )
    tuned = finetune(pre, cfg, params, x, y, 4, INPUT, seed=0)
    for name, p in tuned.blocks.named_parameters(prefix="blocks"):
        assert torch.equal(p.detach(), pre[name]), name
    assert not torch.equal(
        tuned.head.weight, finetune(pre, cfg, params, x, y, 4, INPUT, 1).head.weight
    )


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_same_seed_same_model(optimizer: str) -> None:
    cfg = _cfg(
        {"name": "mlp", "hidden": [16, 8], "dropout": 0.2},
        finetune={"epochs": 3, "batch_size": 8, "optimizer": optimizer},
    )
    pre = _pretrained(cfg)
    x, y = _target()
    params = TrialParams(
        lambda_=0.1, lr=0.01, frozen_blocks=1, backbone_lr_mult=1.0, regularizer="l2sp"
    )
    a = finetune(pre, cfg, params, x, y, 4, INPUT, seed=3).state_dict()
    b = finetune(pre, cfg, params, x, y, 4, INPUT, seed=3).state_dict()
    c = finetune(pre, cfg, params, x, y, 4, INPUT, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])


def test_training_lowers_the_loss() -> None:
    cfg = _cfg({"name": "mlp", "hidden": [16, 8]}, finetune={"epochs": 30})
    pre = _pretrained(cfg)
    x, y = _target()
    first = finetune(pre, cfg, TrialParams(0.0, 0.03, 0, 1.0, "none"), x, y, 4, INPUT, 0)
    cfg_short = _cfg({"name": "mlp", "hidden": [16, 8]}, finetune={"epochs": 1})
    short = finetune(pre, cfg_short, TrialParams(0.0, 0.03, 0, 1.0, "none"), x, y, 4, INPUT, 0)
    acc_long, loss_long = evaluate(first, x, y)
    acc_short, loss_short = evaluate(short, x, y)
    assert loss_long < loss_short
    assert 0.0 <= acc_short <= 1.0 and 0.0 <= acc_long <= 1.0


def test_non_finite_loss_raises_diverged() -> None:
    cfg = _cfg({"name": "mlp", "hidden": [16, 8]}, finetune={"epochs": 3, "optimizer": "sgd"})
    pre = _pretrained(cfg)
    x, y = _target()
    params = TrialParams(
        lambda_=1.0, lr=1e6, frozen_blocks=0, backbone_lr_mult=1.0, regularizer="l2"
    )
    with pytest.raises(DivergedError, match=r"^training loss became (nan|inf|-inf) in epoch \d+$"):
        finetune(pre, cfg, params, x, y, 4, INPUT, seed=0)


@pytest.mark.parametrize("regularizer", ["l2", "l2sp", "none"])
@pytest.mark.parametrize("head_warmup", [0, 2])
def test_closed_form_penalty_gradient_trains_the_autograd_model(
    monkeypatch: pytest.MonkeyPatch, regularizer: str, head_warmup: int
) -> None:
    """The loop's closed-form penalty gradient gives the model that backpropagating the penalty
    gives, up to float rounding, and the same divergence."""
    cfg = _cfg(
        {"name": "cnn", "channels": [4, 4], "fc": 16},
        finetune={"epochs": 5, "batch_size": 16, "head_warmup_epochs": head_warmup},
    )
    pre = _pretrained(cfg)
    x, y = _target()
    params = TrialParams(0.5, 0.01, 1, 0.1, regularizer)
    fast = finetune(pre, cfg, params, x, y, 4, INPUT, seed=2).state_dict()
    monkeypatch.setattr(REGULARIZERS.get(regularizer).load(), "closed_form_grad", False)
    slow = finetune(pre, cfg, params, x, y, 4, INPUT, seed=2).state_dict()
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-4, atol=1e-5, msg=k)
    sgd = _cfg({"name": "mlp", "hidden": [16, 8]}, finetune={"epochs": 3, "optimizer": "sgd"})
    huge = TrialParams(1.0, 1e6, 0, 1.0, regularizer)
    with pytest.raises(DivergedError) as autograd_error:
        finetune(_pretrained(sgd), sgd, huge, x, y, 4, INPUT, seed=0)
    monkeypatch.undo()
    with pytest.raises(DivergedError) as closed_form_error:
        finetune(_pretrained(sgd), sgd, huge, x, y, 4, INPUT, seed=0)
    assert str(closed_form_error.value) == str(autograd_error.value)


def test_lean_fused_adam_is_torch_fused_adam_bit_for_bit() -> None:
    """Fine-tuning calls the fused Adam kernel itself; it must update exactly as
    ``torch.optim.Adam(fused=True)`` does, over two groups with their own learning rates."""
    torch.manual_seed(0)
    cfg = _cfg({"name": "mlp", "hidden": [16, 8]})
    models = [create_model(cfg.model, INPUT, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = _target()

    def groups(model: torch.nn.Module) -> list[dict]:
        return [
            {"params": list(model.head.parameters())},
            {"params": list(model.blocks.parameters()), "lr": 1e-3},
        ]

    ours = FusedAdam(groups(models[0]), lr=0.05)
    torch_adam = torch.optim.Adam(groups(models[1]), lr=0.05, fused=True)
    for step in range(5):
        for model, opt in zip(models, (ours, torch_adam), strict=True):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x[step::5]), y[step::5]).backward()
            opt.step()
        for (name, a), b in zip(models[0].named_parameters(), models[1].parameters(), strict=True):
            assert torch.equal(a, b), (step, name)
            assert a.grad is not None
    ours.zero_grad()
    assert all(p.grad is None for p in models[0].parameters())


# ---------------------------------------------------------------------------------------------
# Data terms (DELTA, BSS) in training


def _feature_maps(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return block_outputs(model, x)[1]


def test_delta_and_bss_train_with_frozen_blocks() -> None:
    """With blocks frozen (and BatchNorm in them), DELTA + BSS leave the frozen blocks
    bit-identical, train the others, and change the result (the terms are in the loss)."""
    cfg = _cfg(MODELS["mlp"], finetune={"epochs": 4, "batch_size": 16}, regularizer={"bss_k": 2})
    pre = _pretrained(cfg)
    x, y = _target()
    delta = TrialParams(1.0, 0.05, 1, 1.0, "delta", {"bss_eta": 0.5})
    tuned = finetune(pre, cfg, delta, x, y, 4, INPUT, seed=0).state_dict()
    plain = finetune(pre, cfg, TrialParams(1.0, 0.05, 1, 1.0, "none"), x, y, 4, INPUT, 0)
    for key, value in tuned.items():
        if key.startswith("blocks.0."):
            assert torch.equal(value, pre[key]), key
        elif key.endswith("weight"):
            assert not torch.equal(value, pre[key]), f"{key} did not train"
            assert not torch.equal(value, plain.state_dict()[key]), f"{key}: no data term"


def test_delta_holds_the_trained_feature_maps_near_the_pretrained_ones() -> None:
    cfg = _cfg({"name": "mlp", "hidden": [16, 8]}, finetune={"epochs": 10, "batch_size": 10})
    pre = _pretrained(cfg)
    x, y = _target()
    start = create_model(cfg.model, INPUT, 4)
    start.load_state_dict(
        {k: v for k, v in pre.items() if not k.startswith("head.")}, strict=False
    )
    before = _feature_maps(start, x)

    def moved(lambda_: float) -> float:
        params = TrialParams(lambda_, 0.05, 0, 1.0, "delta")
        after = _feature_maps(finetune(pre, cfg, params, x, y, 4, INPUT, seed=0), x)
        return sum(float((a - b).square().sum()) for a, b in zip(after, before, strict=True))

    assert moved(100.0) < 0.1 * moved(0.0)


def test_bss_shrinks_the_smallest_singular_values() -> None:
    # BatchNorm before the ReLU keeps units alive: without it most of these random units output 0
    # on every sample, and the smallest singular values are 0 to begin with.
    cfg = _cfg(
        {"name": "mlp", "hidden": [16, 16], "batch_norm": True},
        finetune={"epochs": 10, "batch_size": 40},
        regularizer={"bss_k": 2},
    )
    pre = _pretrained(cfg)
    x, y = _target()

    def smallest(eta: float) -> float:
        params = TrialParams(0.0, 0.05, 0, 1.0, "none", {"bss_eta": eta})
        features = _feature_maps(finetune(pre, cfg, params, x, y, 4, INPUT, seed=0), x)[-1]
        return float(torch.linalg.svdvals(features)[-2:].square().sum())

    assert smallest(1.0) < 0.5 * smallest(0.0)


@pytest.mark.parametrize(
    ("regularizer", "bss_eta", "frozen", "maps"),
    [
        ("l2sp", 0.0, 0, False),  # the fast path: logits only, as before data terms existed
        ("l2", 0.0, 1, False),
        ("l2sp", 0.1, 1, True),
        ("delta", 0.0, 1, True),
        ("delta", 0.1, 2, False),  # every block frozen: nothing for either term to move
    ],
)
def test_block_outputs_are_kept_only_for_a_data_term(
    monkeypatch: pytest.MonkeyPatch, regularizer: str, bss_eta: float, frozen: int, maps: bool
) -> None:
    asked: set[bool] = set()
    real = trainer.block_outputs

    def spy(*args: object, **kwargs: object) -> object:
        asked.add(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "block_outputs", spy)
    cfg = _cfg({"name": "mlp", "hidden": [16, 8]}, finetune={"epochs": 1})
    pre = _pretrained(cfg)
    x, y = _target()
    params = TrialParams(0.5, 0.01, frozen, 1.0, regularizer, {"bss_eta": bss_eta})
    finetune(pre, cfg, params, x, y, 4, INPUT, seed=0)
    assert (True in asked) == maps


# ---------------------------------------------------------------------------------------------
# DELTA's channel attention (regularizer.delta_attention)


def _attention_by_hand(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, frozen: int, seed: int
) -> list[torch.Tensor]:
    """The weights written out: the head delta.channel_attention fits, then channel by channel,
    zero it, run the later blocks and the head, Δ = max(loss rise, 0), C · softmax(zscore(Δ)/5)."""
    model.eval()
    with torch.no_grad():
        maps = block_outputs(model, x)[1]
        z = maps[-1]
        mean, std = z.mean(0), z.std(0, correction=0)
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        weight, bias = delta._attention_head(((z - mean) / std)[None], y[None], 4, [seed])

        def loss(features: torch.Tensor) -> float:
            logits = (features - mean) / std @ weight[0].T + bias[0]
            return float(torch.nn.functional.cross_entropy(logits, y))

        base = loss(z)
        weights = []
        for j in range(frozen, len(model.blocks)):
            rise = []
            for c in range(maps[j].shape[1]):
                h = maps[j].clone()
                h[:, c] = 0
                rise.append(max(loss(model.features(h, j + 1)) - base, 0.0))
            d = torch.tensor(rise)
            scaled = (
                (d - d.mean()) / d.std(correction=0) if d.std() > 1e-6 else torch.zeros_like(d)
            )
            weights.append(len(d) * torch.softmax(scaled / 5.0, 0))
    return weights


@pytest.mark.parametrize("frozen", [0, 1])
def test_delta_attention_is_the_channel_loop(frozen: int) -> None:
    """One fold, and two folds stacked (each its own data and seed): the loop above."""
    cfg = _cfg({"name": "cnn", "channels": [3, 4], "fc": 6})
    torch.manual_seed(5)
    models = [create_model(cfg.model, INPUT, 4).eval() for _ in range(2)]
    x, y = _target(24)
    xs, ys = torch.stack([x, x.flip(0) * 0.5]), torch.stack([y, (y + 1) % 4])
    want = [_attention_by_hand(models[f], xs[f], ys[f], frozen, 10 + f) for f in range(2)]

    def refs(model: torch.nn.Module, xb: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return block_outputs(model, xb)[1][frozen:]

    alone = delta.channel_attention(models[0], refs(models[0], x), y, frozen, [10], stacked=False)
    for got, w in zip(alone, want[0], strict=True):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-5)
    stacked = stack_models(models)
    per_fold = [refs(m, xb) for m, xb in zip(models, xs, strict=True)]
    maps = [torch.stack(r) for r in zip(*per_fold, strict=True)]
    together = delta.channel_attention(stacked, maps, ys, frozen, [10, 11], stacked=True)
    for got, *each in zip(together, *want, strict=True):
        torch.testing.assert_close(got, torch.stack(each), rtol=1e-4, atol=1e-5)


def test_delta_attention_favours_the_channel_that_carries_the_signal() -> None:
    """Block 0 passes x0, x1, x2 through; block 1 gives x0 and x1 + x2; the label is x0 > 0.5.
    The weights average 1 in each block and are largest for the channels holding x0."""
    model = create_model(ModelConfig(name="mlp", hidden=[3, 2]), (4,), 2).eval()
    with torch.no_grad():
        model.blocks[0][1].weight.copy_(torch.eye(3, 4))
        model.blocks[1][0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 1]]))
        for block in model.blocks:
            block[-2].bias.zero_()
    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(0))
    y = (x[:, 0] > 0.5).long()
    with torch.no_grad():
        refs = block_outputs(model, x)[1]
    first, second = delta.channel_attention(model, refs, y, 0, [0], stacked=False)
    for a in (first, second):
        assert float(a.mean()) == pytest.approx(1.0, rel=1e-6)
    assert first[0] > 1.0 and first[0] > 1.2 * first[1:].max()
    assert second[0] > 1.0 > second[1]


def test_delta_attention_is_computed_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Off (the default), DELTA trains as before, with equal weights and no head fitted; on, the
    weights are computed once per fold, change the result and leave the global random stream as
    training without them does."""
    calls: list[int] = []
    real = delta.channel_attention

    def spy(*args: object, **kwargs: object) -> list[torch.Tensor]:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(delta, "channel_attention", spy)
    model = {"name": "mlp", "hidden": [16, 8]}
    pre = _pretrained(_cfg(model))
    x, y = _target()
    params = TrialParams(1.0, 0.05, 0, 1.0, "delta")

    def run(**regularizer: object) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        cfg = _cfg(model, finetune={"epochs": 3, "batch_size": 16}, regularizer=regularizer)
        state = finetune(pre, cfg, params, x, y, 4, INPUT, seed=0).state_dict()
        return state, torch.rand(3)

    default, after_default = run()
    off, after_off = run(delta_attention=False)
    assert not calls
    for key, value in default.items():
        assert torch.equal(off[key], value), key
    on, after_on = run(delta_attention=True)
    assert len(calls) == 1
    assert torch.equal(after_on, after_off) and torch.equal(after_off, after_default)
    assert not torch.equal(on["blocks.0.1.weight"], off["blocks.0.1.weight"])


def test_delta_attention_off_keeps_the_search_hash() -> None:
    """Added off: a study created before it existed keeps its hash; on, it is another search."""
    # tlsearch 0.2's defaults (the multiplier fixed at 0.1, the median pruner): the hash it stored.
    before = StudyConfig.model_validate(
        {
            "search": {"backbone_lr_mult": 0.1, "baselines": ["plain_finetuning", "scratch"]},
            "pruner": {"name": "median"},
        }
    )
    assert before.search_hash() == "2:63f479719eaa7cbd"
    on = config_from_dict(merge(TINY, {"regularizer": {"delta_attention": True}}))
    assert on.search_hash() != config_from_dict(TINY).search_hash()


def _runs(cfg: StudyConfig, folds: int = 3) -> list[trainer.Trainer]:
    pre = _pretrained(cfg)
    x, y = _target()
    params = TrialParams(
        lambda_=0.01, lr=0.05, frozen_blocks=0, backbone_lr_mult=1.0, regularizer="l2sp"
    )
    recipe = trainer.Recipe(pre, cfg, params, 4, INPUT)
    return [trainer.Trainer(recipe.job(x[f::folds], y[f::folds], (f,))) for f in range(folds)]


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["no-dropout", "dropout"])
def test_lanes_train_each_fold_as_it_trains_alone(
    dropout: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folds side by side on threads (or in turn, when their model draws from the global random
    stream) end bit for bit where each fold ends trained alone on one thread."""
    cfg = _cfg({**MODELS["cnn"], "batch_norm": False, "dropout": dropout}, finetune={"epochs": 6})
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # bit for bit: one thread alone, one thread per lane
        alone = []
        for run in _runs(cfg):
            while run.epoch():
                pass
            alone.append(run.results()[0])
        runs = _runs(cfg)
        threads: set[str] = set()
        epoch = trainer.Trainer.epoch

        def watched(run: trainer.Trainer) -> bool:
            threads.add(threading.current_thread().name)
            return epoch(run)

        monkeypatch.setattr(trainer.Trainer, "epoch", watched)
        with Lanes(runs, cores=2, min_seconds=0.0) as lanes:
            while lanes.advance(4):
                pass
            width = lanes.lanes()
        assert torch.get_num_threads() == 1  # the caller's count, after its lanes
    finally:
        torch.set_num_threads(before)
    assert [r.draws for r in runs] == [dropout > 0] * 3
    assert [r.epochs_trained for r in runs] == [6] * 3
    assert width == (1 if dropout else 2)
    assert any(name.startswith("tlsearch-lane") for name in threads) == (not dropout)
    for a, b in zip(alone, runs, strict=True):
        (trained,) = b.results()
        assert all(torch.equal(v, trained.state_dict()[k]) for k, v in a.state_dict().items())


def test_lanes_keep_short_epochs_in_turn() -> None:
    """Folds whose first epoch is shorter than ``min_seconds`` keep taking turns: threads would
    cost more than they save."""
    cfg = _cfg({**MODELS["cnn"], "batch_norm": False}, finetune={"epochs": 3})
    with Lanes(_runs(cfg), cores=2, min_seconds=60.0) as lanes:
        assert lanes.advance(2)
        assert lanes.lanes() == 1
    with Lanes(_runs(cfg), cores=2, min_seconds=0.0) as lanes:
        assert lanes.advance(2)
        assert lanes.lanes() == 2


def test_batchnorm_from_recomputes_the_trained_layers_and_restores_them() -> None:
    """Inside ``batchnorm_from`` a trained BatchNorm layer's running mean is its input's mean on
    the given images and a frozen block's layer is the pretrained one; after it, training goes
    on exactly as if nobody had looked (the curve's early points are scored so)."""
    cfg = _cfg(MODELS["cnn"], finetune={"epochs": 3})
    pre = _pretrained(cfg)
    x, y = _target()
    params = TrialParams(0.01, 0.05, frozen_blocks=1, backbone_lr_mult=1.0, regularizer="l2sp")
    recipe = trainer.Recipe(pre, cfg, params, 4, INPUT)
    watched, alone = (trainer.Trainer(recipe.job(x, y, (0,))) for _ in range(2))
    frozen_bn, trained_bn = (
        [m for m in watched.model.blocks[i].modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
        for i in (0, 1)
    )
    seen: list[torch.Tensor] = []
    hook = trained_bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    while watched.epoch():
        before = trained_bn.running_mean.clone()
        with batchnorm_from(watched.model, x) as model:
            assert torch.allclose(trained_bn.running_mean, seen[-1].mean((0, 2, 3)), atol=1e-6)
            assert not torch.equal(trained_bn.running_mean, before)
            assert torch.equal(frozen_bn.running_mean, pre["blocks.0.1.running_mean"])
            evaluate(model, x, y)
        assert torch.equal(trained_bn.running_mean, before)
    hook.remove()
    while alone.epoch():
        pass
    a, b = watched.results()[0].state_dict(), alone.results()[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
