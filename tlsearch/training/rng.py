"""A training run's own global random stream, kept apart from other runs' (:class:`RandomStream`).

Dropout draws its masks from torch's global generator (and the device's). Folds that advance in
turn, epoch by epoch, would otherwise draw from one shared stream in an order that depends on how
they are scheduled; each keeps its own instead, so that a fold trains as it would alone.
"""

from __future__ import annotations

from types import TracebackType

import torch

__all__ = ["RandomStream"]

_State = tuple[torch.Tensor, torch.Tensor | None]


class RandomStream:
    """The global random state of one run: captured when it is made (right after the run's
    model drew its initial weights), swapped in for each ``with`` block and out after it.

    :attr:`draws` tells, after the first block, whether that block drew from the stream at all;
    a run that drew nothing has nothing to keep apart, and later blocks swap nothing (so such
    runs may train on other threads at once).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.state = self._now()
        # Whether the first block drew from the stream (None: no block has run yet).
        self.draws: bool | None = None
        self._outside: _State | None = None

    def __enter__(self) -> RandomStream:
        if self.draws is not False:
            self._outside = self._now()
            self._set(self.state)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._outside is None:
            return
        state = self._now()
        if self.draws is None:
            self.draws = not all(map(_same, state, self.state))
        self.state = state
        self._set(self._outside)
        self._outside = None

    def _now(self) -> _State:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _set(self, state: _State) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], self.device)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
