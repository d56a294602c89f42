"""tlsearch.augmentations: each augmentation on planted images (a shift moves a pixel by exactly its
shift, erasing fills one rectangle of the stated area with the background, mixup and cutmix mix
images and targets by the same weight...), and every registered one keeps the contract the trainer
relies on (parametrized over the registry: a plug-in's entry is tested for free): shape, dtype and
device kept, inputs untouched, the output a function of the fold's generator alone."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from scipy import stats

from tlsearch.augmentations import (
    Affine,
    Augmentation,
    CutMix,
    Erase,
    HorizontalFlip,
    Mixup,
    Translate,
    background,
    create_augmentation,
    draw_beta,
)
from tlsearch.augmentations.affine import ROTATION, SCALE, SHEAR
from tlsearch.errors import ConfigError
from tlsearch.registry import AUGMENTATIONS, Hyperparameter

NAMES = AUGMENTATIONS.names()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(b: int = 8, c: int = 2, h: int = 12, w: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (every pixel distinct) and soft one-hot targets over b classes."""
    x = torch.randn(b, c, h, w, generator=_gen(100))
    return x, torch.eye(b)[torch.arange(b).flip(0)]


def _strong(name: str) -> dict[str, float]:
    """Each declared strength at the top of its default range (or its fixed default)."""
    values = {}
    for h in AUGMENTATIONS.get(name).hyperparameters:
        value = h.default["high"] if isinstance(h.default, dict) else h.default
        values[h.name] = float(value) if value else 0.5
    return values


# ---------------------------------------------------------------------------------------------
# The contract, for every registered augmentation


@pytest.mark.parametrize("name", NAMES)
def test_every_entry_builds_its_class_with_its_declared_strength(name: str) -> None:
    aug = create_augmentation(name, {**_strong(name), "bss_eta": 3.0})  # others' are ignored
    assert isinstance(aug, Augmentation) and aug.name == name
    assert aug.strength == _strong(name)
    for key, value in _strong(name).items():
        assert getattr(aug, key) == value


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_augmentation_keeps_shape_dtype_and_device_and_never_writes_its_inputs(
    name: str, dtype: torch.dtype
) -> None:
    x, y = _batch()
    x = x.to(dtype)
    x0, y0 = x.clone(), y.clone()
    aug = create_augmentation(name, _strong(name))
    out, targets = aug(x, y, _gen(0))
    assert (out.shape, out.dtype, out.device) == (x.shape, x.dtype, x.device)
    assert out.data_ptr() != x.data_ptr()
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert torch.isfinite(out).all()
    if aug.mixes_labels:
        assert targets.shape == y.shape and targets.data_ptr() != y.data_ptr()
        torch.testing.assert_close(targets.sum(1), torch.ones(len(y)))
    else:
        assert targets is y


@pytest.mark.parametrize("name", NAMES)
def test_every_augmentation_is_a_function_of_the_generator_alone(name: str) -> None:
    """Same seed, same output, whatever torch's global stream holds, which it leaves as it was;
    another seed, another output."""
    x, y = _batch(b=16)
    aug = create_augmentation(name, _strong(name))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = aug(x, y, _gen(1))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(12345)
    again = aug(x, y, _gen(1))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = aug(x, y, _gen(2))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_every_augmentation_draws_as_many_numbers_whatever_the_images_and_strength(
    name: str,
) -> None:
    """The generator's state after a batch depends on the batch's shape alone, so the next
    batch's draws are the same however the images or the strength differ."""
    x, y = _batch()
    states = []
    for images, scale in ((x, 1.0), (-3 * x, 1.0), (x, 0.3)):
        g = _gen(7)
        strength = {k: v * scale for k, v in _strong(name).items()}
        create_augmentation(name, strength)(images, y, g)
        states.append(g.get_state())
    assert all(torch.equal(states[0], s) for s in states[1:])


@pytest.mark.parametrize("name", NAMES)
def test_every_augmentation_at_strength_zero_is_the_identity_and_draws_nothing(
    name: str,
) -> None:
    x, y = _batch()
    aug = create_augmentation(name, {})  # absent: at its off value
    assert aug.strength == {h.name: h.off for h in AUGMENTATIONS.get(name).hyperparameters}
    g = _gen(3)
    state = g.get_state()
    out, targets = aug(x, y, g)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr() and targets is y
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [-0.1, math.nan])
def test_every_augmentation_refuses_a_negative_strength_naming_its_field(
    name: str, bad: float
) -> None:
    (key,) = _strong(name)
    with pytest.raises(ConfigError) as info:
        create_augmentation(name, {key: bad})
    assert str(info.value).startswith(f"search.{key}: {bad} must be ")


@pytest.mark.parametrize(("cls", "key"), [(Erase, "erase"), (HorizontalFlip, "hflip")])
def test_a_probability_above_one_is_refused(cls: type[Augmentation], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**{key: 1.5})
    assert str(info.value) == f"search.{key}: 1.5 must be within [0, 1]"


def test_an_unknown_augmentation_is_a_config_error_naming_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"^search\.augment: unknown augmentation 'blur' "):
        create_augmentation("blur", {})


def test_a_plugin_adds_an_augmentation_with_a_subclass_and_an_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Dim(Augmentation):
        name = "dim"
        dim: float

        def augment(self, x: torch.Tensor, y: Any, generator: torch.Generator) -> Any:
            return x * (1 - self.dim * torch.rand((), generator=generator).item()), y

    monkeypatch.setattr(AUGMENTATIONS, "_entries", dict(AUGMENTATIONS._entries))
    AUGMENTATIONS.register(
        "dim", Dim, hyperparameters=(Hyperparameter("dim", default=0.5, off=0.0),)
    )
    x, y = _batch()
    aug = create_augmentation("dim", {"dim": 0.5})
    assert isinstance(aug, Dim) and "dim" in AUGMENTATIONS.names()
    out, _ = aug(x, y, _gen(0))
    assert torch.equal(out, aug(x, y, _gen(0))[0]) and not torch.equal(out, x)

    AUGMENTATIONS.register(
        "notone",
        "builtins:dict",
        hyperparameters=(Hyperparameter("notone", default=0.5, off=0.0),),
    )
    with pytest.raises(ConfigError, match="^augmentation 'notone' .* builds a dict, not a"):
        create_augmentation("notone", {})


# ---------------------------------------------------------------------------------------------
# The background


def test_background_is_the_median_of_each_images_border_per_channel() -> None:
    """Normalized MNIST's black is −0.42, not 0; a stroke reaching the edge does not move it."""
    x = torch.full((2, 2, 9, 9), -0.42)
    x[:, 1] = 2.8  # an inverted channel: white
    x[0, :, 2:6, 0] = 1.5  # a stroke touching the left edge: 4 of the 32 border pixels
    x[:, :, 3:6, 3:6] = 7.0  # content inside never counts
    bg = background(x)
    assert bg.shape == (2, 2, 1, 1)
    assert torch.equal(bg.flatten(), torch.tensor([-0.42, 2.8, -0.42, 2.8]))


# ---------------------------------------------------------------------------------------------
# Translate


def _shifted(image: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``image`` (H, W) with every pixel moved dy rows down and dx columns right, ``fill`` in
    what is uncovered: the definition, written with slices."""
    h, w = image.shape
    out = torch.full_like(image, fill)
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def test_a_translation_moves_every_pixel_by_exactly_its_shift_and_fills_the_background() -> None:
    b, h, w = 300, 16, 20
    image = torch.full((h, w), -0.42)
    image[2:7, 0] = 1.5  # a stroke at the edge: the background stays −0.42
    image[5:11, 6:14] = torch.rand(6, 8, generator=_gen(5)) + 2  # content, every pixel distinct
    image[8, 9] = 9.0  # the planted pixel
    x = image.expand(b, 1, h, w)
    out, _ = Translate(translate=0.15)(x, None, _gen(0))  # m = round(2.4) = 2 rows, 3 columns
    shifts = set()
    for i in range(b):
        (row, col), *rest = (out[i, 0] == 9.0).nonzero().tolist()
        assert not rest
        dy, dx = row - 8, col - 9
        assert abs(dy) <= 2 and abs(dx) <= 3
        assert torch.equal(out[i, 0], _shifted(image, dy, dx, -0.42))
        shifts.add((dy, dx))
    assert shifts == {(dy, dx) for dy in range(-2, 3) for dx in range(-3, 4)}


def test_a_small_translation_still_shifts_by_one_pixel() -> None:
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 4, 4] = 1.0
    out, _ = Translate(translate=0.01)(x, None, _gen(0))  # 0.08 px rounds to 0: m = 1
    where = out[:, 0].flatten(1).argmax(1)
    moves = {(int(p) // 8 - 4, int(p) % 8 - 4) for p in where}
    assert moves == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


# ---------------------------------------------------------------------------------------------
# Erase


def test_erasing_fills_one_rectangle_of_the_stated_area_with_the_background() -> None:
    b, h, w = 100, 32, 24
    x = torch.randn(b, 3, h, w, generator=_gen(1))  # every pixel distinct
    out, _ = Erase(erase=1.0)(x, None, _gen(0))
    bg = background(x)
    for i in range(b):
        # The changed pixels' bounding box is the rectangle (a pixel already equal to the
        # background may stay unchanged inside it, never outside).
        changed = (out[i] != x[i]).any(0).nonzero()
        top, left = changed.min(0).values.tolist()
        bottom, right = (changed.max(0).values + 1).tolist()
        height, width = bottom - top, right - left
        inside = torch.zeros(h, w, dtype=torch.bool)
        inside[top:bottom, left:right] = True
        assert torch.equal(out[i][:, inside], bg[i, :, :, 0].expand(3, int(inside.sum())))
        assert torch.equal(out[i][:, ~inside], x[i][:, ~inside])
        # Area s·H·W with s in [0.04, 0.25], up to the rounding of the two sides.
        slack = 0.5 * (height + width) + 0.75
        assert 0.04 * h * w - slack <= height * width <= 0.25 * h * w + slack
        assert 0.3 / 1.5 <= height / width <= 3.3 * 1.5


def test_erasing_reaches_the_share_of_images_its_strength_says() -> None:
    x = torch.randn(400, 1, 16, 16, generator=_gen(1))
    out, _ = Erase(erase=0.3)(x, None, _gen(0))
    erased = (out != x).flatten(1).any(1)
    assert 0.22 <= erased.float().mean().item() <= 0.38
    assert torch.equal(out[~erased], x[~erased])


# ---------------------------------------------------------------------------------------------
# Affine


def test_affine_at_strength_zero_is_exactly_the_identity_and_near_zero_the_grid_is_too() -> None:
    """Strength 0 is a copy (no resampling, no draw); the resampling itself at a vanishing
    strength gives the image back to float rounding: no flip, transposition or half-pixel shift."""
    x, y = _batch(h=11, w=17)
    assert torch.equal(Affine(affine=0.0)(x, y, _gen(0))[0], x)
    out, _ = Affine(affine=1e-12)(x, y, _gen(0))
    # float32 sampling positions ((2j + 1)/W − 1, back to pixels) are off by ~1e-6 px.
    torch.testing.assert_close(out, x, atol=2e-5, rtol=0)
    assert not torch.equal(out, x)


def test_affine_moves_planted_blobs_where_its_drawn_rotation_scale_and_shear_say() -> None:
    """The draws' order is the contract's: three uniforms per image (rotation, shear, scale). A
    blob's centre of mass lands on A·p, A = σ·R(θ)·Sh(φ), in pixels about the image's centre; two
    blobs (one per channel) pin A down."""
    b, h, w, s = 40, 30, 44, 0.8
    x = torch.zeros(b, 2, h, w)
    x[:, 0, 8:11, 28:31] = 1.0  # 3×3 blobs centred on (row 9, column 29) and (row 11, column 16)
    x[:, 1, 10:13, 15:18] = 1.0
    out, _ = Affine(affine=s)(x, None, _gen(4))
    u = 2 * torch.rand(b, 3, generator=_gen(4), dtype=torch.float64) - 1
    theta, shear = torch.deg2rad(u[:, 0] * ROTATION * s), torch.deg2rad(u[:, 1] * SHEAR * s)
    scale = 1 + u[:, 2] * SCALE * s
    centre = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    p = torch.tensor([[29.5, 9.5], [16.5, 11.5]], dtype=torch.float64) - centre  # (x, y) rows
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for i in range(b):
        c, sn, t = theta[i].cos(), theta[i].sin(), shear[i].tan()
        a = scale[i] * torch.tensor([[c, -sn], [sn, c]]) @ torch.tensor([[1, t], [0, 1]])
        mass = out[i].double()
        moved = torch.stack([(mass * cols).sum((1, 2)), (mass * rows).sum((1, 2))], 1)
        moved = moved / mass.sum((1, 2))[:, None] + 0.5 - centre
        torch.testing.assert_close(moved, p @ a.T, atol=0.3, rtol=0)


def test_affine_fills_what_it_uncovers_with_the_background() -> None:
    x = torch.full((16, 2, 12, 12), -0.42)
    x[:, 1] = 2.8
    out, _ = Affine(affine=1.0)(x, None, _gen(0))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Mixup and CutMix


def _partner(targets: torch.Tensor, i: int) -> int:
    """The image that image ``i`` (of class i, one-hot targets) was mixed with: the other class in
    its mixed targets, or itself."""
    others = [j for j in targets[i].nonzero().flatten().tolist() if j != i]
    assert len(others) <= 1, targets[i]
    return others[0] if others else i


def test_mixup_is_a_convex_combination_of_two_images_with_their_targets_weight() -> None:
    b = 10
    x = torch.randn(b, 1, 6, 6, generator=_gen(9), dtype=torch.float64)
    y = torch.eye(b, dtype=torch.float64)
    for seed in range(5):
        out, targets = Mixup(mixup=0.4)(x, y, _gen(seed))
        torch.testing.assert_close(targets.sum(1), torch.ones(b, dtype=torch.float64))
        lam = draw_beta(0.4, _gen(seed))  # the generator's first draw: one λ for the batch
        assert 0 < lam < 1
        partners = [_partner(targets, i) for i in range(b)]
        assert sorted(partners) == list(range(b))  # a permutation
        for i, j in enumerate(partners):
            if j != i:
                assert targets[i, i].item() == pytest.approx(lam)
                assert targets[i, j].item() == pytest.approx(1 - lam)
            torch.testing.assert_close(out[i], lam * x[i] + (1 - lam) * x[j])


def test_cutmix_pastes_one_box_and_weights_the_targets_by_its_area() -> None:
    b, h, w = 8, 20, 16
    x = torch.randn(b, 2, h, w, generator=_gen(9), dtype=torch.float64)
    y = torch.eye(b, dtype=torch.float64)
    boxes = set()
    for seed in range(8):
        out, targets = CutMix(cutmix=1.0)(x, y, _gen(seed))
        lam = draw_beta(1.0, _gen(seed))
        changed = (out != x).any(1)  # (B, H, W)
        box = changed.any(0).nonzero()
        if len(box) == 0:
            assert torch.equal(targets, y)
            continue
        top, left = box.min(0).values.tolist()
        bottom, right = (box.max(0).values + 1).tolist()
        area = (bottom - top) * (right - left)
        assert area <= (1 - lam) * h * w + 1e-9  # the clipped box: at most 1 − λ of the image
        boxes.add((top, left, bottom, right))
        for i in range(b):
            j = _partner(targets, i)
            if j == i:  # paired with itself: unchanged
                assert torch.equal(out[i], x[i]) and torch.equal(targets[i], y[i])
                continue
            assert targets[i, j].item() == pytest.approx(area / (h * w))
            assert targets[i, i].item() == pytest.approx(1 - area / (h * w))
            assert torch.equal(out[i, :, top:bottom, left:right], x[j, :, top:bottom, left:right])
            outside = torch.ones(h, w, dtype=torch.bool)
            outside[top:bottom, left:right] = False
            assert torch.equal(out[i][:, outside], x[i][:, outside])
    assert len(boxes) >= 4


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_draw_beta_follows_beta_alpha_alpha(alpha: float) -> None:
    g = _gen(0)
    draws = [draw_beta(alpha, g) for _ in range(3000)]
    assert stats.kstest(draws, stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_draw_beta_at_a_small_alpha_keeps_both_tails() -> None:
    """At α = 0.05 most of the mass lies within 1e-6 of 0 or of 1, evenly."""
    g = _gen(0)
    draws = torch.tensor([draw_beta(0.05, g) for _ in range(3000)], dtype=torch.float64)
    low, high = (draws < 1e-6).double().mean().item(), (draws > 1 - 1e-6).double().mean().item()
    expected = stats.beta(0.05, 0.05).cdf(1e-6)
    assert low == pytest.approx(expected, abs=0.04) and high == pytest.approx(expected, abs=0.04)
    assert ((draws >= 0) & (draws <= 1)).all()


# ---------------------------------------------------------------------------------------------
# Horizontal flip


def test_a_flip_mirrors_left_to_right_the_share_of_images_its_strength_says() -> None:
    x = torch.randn(300, 2, 5, 7, generator=_gen(1))
    assert torch.equal(HorizontalFlip(hflip=1.0)(x, None, _gen(0))[0], x.flip(-1))
    out, _ = HorizontalFlip(hflip=0.5)(x, None, _gen(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.equal(out[~flipped], x[~flipped])
    assert 0.4 <= flipped.float().mean().item() <= 0.6
    assert torch.equal(out[:, :, :, 0][flipped], x[:, :, :, -1][flipped])
