"""Device choice (CUDA when there is one, or the one a worker is pinned to, else the CPU) and the
CPU threads of this process."""

from __future__ import annotations

import os

import torch

from tlsearch.errors import ConfigError

__all__ = ["available_cores", "default_threads", "resolve_device", "set_threads"]


def resolve_device(spec: str = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; anything else must exist here."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(
            f"finetune.device: '{spec}' is not a device (auto, cpu, cuda, cuda:N)"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"finetune.device: '{spec}' asked for, but no CUDA device is visible"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"finetune.device: '{spec}' asked for, but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible"
            )
    return device


def set_threads(threads: int | None) -> int:
    """Use ``threads`` torch CPU threads in this process (0 or None: leave them); return the count.

    Each process sets its count deliberately: small ops on many cores waste them, and workers side
    by side must not oversubscribe the host.
    """
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def available_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads(n_workers: int) -> int:
    """CPU threads per worker so that the workers together use each core once."""
    return max(1, available_cores() // n_workers)
