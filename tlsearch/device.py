"""Device choice: CUDA when there is one (or the one a worker is pinned to), else the CPU."""

from __future__ import annotations

import torch

from tlsearch.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; anything else must exist here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"finetune.device: '{spec}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"finetune.device: '{spec}' asked for, but no CUDA device is visible")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"finetune.device: '{spec}' asked for, but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
    return device
