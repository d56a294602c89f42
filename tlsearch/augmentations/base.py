"""The contract every augmentation keeps, and the helpers they share: the image's background and
a Beta draw from the fold's own generator."""

from __future__ import annotations

import abc
import math

import torch
from scipy.special import betaincinv
from torch import Tensor

from tlsearch.errors import ConfigError
from tlsearch.registry import AUGMENTATIONS

__all__ = ["Augmentation", "background", "draw_beta"]


class Augmentation(abc.ABC):
    """A random transformation of a minibatch of images (and, for mixup and cutmix, of their
    targets), applied while a fold trains; its strength is a hyperparameter searched beside λ.

    Contract (what the trainer relies on; each subclass implements :meth:`augment`):

    * ``name`` is the entry's name in :data:`tlsearch.registry.AUGMENTATIONS`; the class is built
      with each hyperparameter the entry declares as a keyword (``Translate(translate=0.1)``),
      a number in ``[0, maximum]`` (a :class:`~tlsearch.errors.ConfigError` names the field
      otherwise), kept as an attribute of that name and in :attr:`strength`.
    * ``augmentation(x, y, generator)`` takes ``x``, a batch of images ``(B, C, H, W)``, floating
      point, normalized, on any device; ``y``, the batch's targets: soft targets ``(B, K)`` for an
      augmentation that ``mixes_labels``, anything (passed through as it is) for the others; and
      ``generator``, a CPU :class:`torch.Generator`, the fold's own.
    * Every random number is drawn from ``generator``, on the CPU (then moved to ``x.device``),
      in an order and a count that depend on the batch's shape alone. So the same generator state
      gives the same transformation on any device, however the caller schedules folds (in turn,
      stacked, in lanes) and after a resume; torch's global random stream is never touched.
    * It returns new tensors, of ``x``'s shape, dtype and device (and targets of ``y``'s form),
      and never writes into ``x`` or ``y``. It is batched: no Python loop over the images.
    * At strength 0 it is the identity and draws nothing (a copy of ``x``; ``y`` as it is).
    """

    name: str
    # True where the targets are mixed too (mixup, cutmix): the trainer passes soft targets.
    mixes_labels: bool = False
    # The largest strength that means something (a probability: 1).
    maximum: float = math.inf

    def __init__(self, **strength: float) -> None:
        declared = sorted(h.name for h in AUGMENTATIONS.get(self.name).hyperparameters)
        assert sorted(strength) == declared, (
            f"augmentation '{self.name}' takes {declared}, got {sorted(strength)}"
        )
        for key, value in strength.items():
            if not 0.0 <= value <= self.maximum:  # NaN fails too
                within = "≥ 0" if self.maximum == math.inf else f"within [0, {self.maximum:g}]"
                raise ConfigError(f"search.{key}: {value} must be {within}")
            setattr(self, key, float(value))
        self.strength = {key: float(value) for key, value in strength.items()}

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The augmented batch and its targets (see the class's contract)."""
        assert x.dim() == 4 and x.is_floating_point(), (self.name, x.shape, x.dtype)
        assert generator.device.type == "cpu", (self.name, generator.device)
        if self.mixes_labels:
            assert y.dim() == 2 and y.is_floating_point() and len(y) == len(x), (y.shape, y.dtype)
        if not any(self.strength.values()):
            return x.clone(), y
        out, targets = self.augment(x, y, generator)
        assert (out.shape, out.dtype, out.device) == (x.shape, x.dtype, x.device), (
            self.name,
            out.shape,
            out.dtype,
            out.device,
        )
        return out, targets

    @abc.abstractmethod
    def augment(self, x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The transformation at a strength above 0, keeping the contract above."""

    def __repr__(self) -> str:
        strength = ", ".join(f"{k}={v:g}" for k, v in self.strength.items())
        return f"{type(self).__name__}({strength})"


def background(x: Tensor) -> Tensor:
    """Each image's background, per channel: the median of its border pixels, ``(B, C, 1, 1)``.

    What a shift, a rotation or an erased patch uncovers is filled with it. Not 0: normalized
    images' background is not 0 (MNIST's black is −0.42 after its mean and std; an inverted
    digit's white is well above 0), so a zero fill would paint a frame the data never shows. The median (the
    lower middle value, a pixel of the image) rather than the mean, so that a stroke reaching the
    edge does not shift it.
    """
    h, w = x.shape[-2:]
    border = torch.ones(h, w, dtype=torch.bool, device=x.device)
    border[1:-1, 1:-1] = False
    return x[..., border].median(dim=-1).values[..., None, None]


def draw_beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(α, α) from ``generator`` alone: the inverse CDF of one uniform.

    ``torch.distributions.Beta`` draws from the global stream; the private
    ``torch._standard_gamma`` takes a generator, but its rejection sampling takes a varying count
    of numbers from it. The inverse CDF (scipy's ``betaincinv``, in float64) takes exactly one,
    whatever α, so the draws that follow (the permutation) depend on the batch's shape alone.
    """
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return float(betaincinv(alpha, alpha, u))
