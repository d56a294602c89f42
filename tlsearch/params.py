"""A trial's choices: what the search space says, what a trial suggests, what an export holds.

One name per thing. Files, the dashboard, exports and output say ``lambda``; Python says
``lambda_`` (``lambda`` is a keyword). The frozen depth is ``frozen_blocks`` everywhere.
:data:`SEARCHED` is the one table from a user's parameter name to its config field.

DELTA's λ scales a distance between feature maps, not between weights, so it has a range of its
own (``search.delta_lambda``) and its own name in a study (``delta_lambda``: TPE never mixes the
two ranges); a trial that fine-tunes with DELTA asks for ``delta_lambda`` instead of ``lambda``.
Either way :attr:`TrialParams.lambda_` (``lambda`` in files) holds the λ the trial used.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tlsearch.config import ParamRange, StudyConfig
from tlsearch.errors import ConfigError

__all__ = [
    "BASELINES",
    "PLAIN_FINETUNING",
    "REQUIRED",
    "SEARCHED",
    "TrialParams",
    "baseline_enqueue",
    "baseline_params",
    "fixed_params",
    "format_params",
    "resolve_params",
    "suggest_params",
]

# User-facing parameter name → its config field (section.attribute), in the order a trial asks.
SEARCHED = {
    "lambda": "search.lambda_",
    "lr": "search.lr",
    "frozen_blocks": "search.frozen_blocks",
    "backbone_lr_mult": "search.backbone_lr_mult",
    "delta_lambda": "search.delta_lambda",
    "bss_eta": "regularizer.bss_eta",
}
# What every TrialParams dict holds (bss_eta is optional: 0, BSS off, when absent).
REQUIRED = ("lambda", "lr", "frozen_blocks", "backbone_lr_mult", "regularizer")

# What a user fine-tunes with before any search: Adam's usual 1e-3, everything trainable, no
# backbone learning-rate cut, and a small λ (``tlsearch final``'s baseline).
PLAIN_FINETUNING = {"lambda": 0.01, "lr": 1e-3, "frozen_blocks": 0, "backbone_lr_mult": 1.0}

# The reference trials a study may enqueue (``search.baselines``): plain fine-tuning from the
# pretrained model, and the same settings from a random init (nothing to pull toward but zero, so
# L2) — ``tlsearch final``'s two baselines.
BASELINES = ("plain_finetuning", "scratch")


@dataclass(frozen=True)
class TrialParams:
    """What one trial fine-tunes with; :meth:`to_dict` gives the names files and output use.

    ``lambda_`` is the λ the trial's regularizer used (from ``delta_lambda`` for DELTA);
    ``bss_eta`` the η of BSS, 0 when it is off.
    """

    lambda_: float
    lr: float
    frozen_blocks: int
    backbone_lr_mult: float
    regularizer: str
    bss_eta: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """The names files use; ``bss_eta`` only when BSS is on, so that a trial without it
        reads as it did before BSS existed."""
        d: dict[str, Any] = {
            "lambda": self.lambda_,
            "lr": self.lr,
            "frozen_blocks": self.frozen_blocks,
            "backbone_lr_mult": self.backbone_lr_mult,
            "regularizer": self.regularizer,
        }
        if self.bss_eta:
            d["bss_eta"] = self.bss_eta
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialParams:
        """From the names :meth:`to_dict` writes; all but ``bss_eta`` are required (a trial stored
        before BSS existed has none: 0)."""
        missing = [n for n in REQUIRED if n not in d]
        if missing:
            raise ConfigError(f"params: missing {', '.join(missing)}")
        try:
            return cls(
                lambda_=float(d["lambda"]),
                lr=float(d["lr"]),
                frozen_blocks=int(d["frozen_blocks"]),
                backbone_lr_mult=float(d["backbone_lr_mult"]),
                regularizer=str(d["regularizer"]),
                bss_eta=float(d.get("bss_eta", 0.0)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"params: invalid value: {e}") from None


class Suggester(Protocol):
    """The part of :class:`optuna.Trial` that :func:`suggest_params` uses."""

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = ..., log: bool = ...
    ) -> float: ...

    def suggest_int(self, name: str, low: int, high: int, *, step: int = ...) -> int: ...

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def fixed_params(cfg: StudyConfig) -> dict[str, Any]:
    """The parameters the config fixes rather than searches, under their user-facing names.

    Only those that apply to one of its regularizers (``delta_lambda`` with DELTA, ``lambda``
    with any other) and ``bss_eta`` only when BSS is on.
    """
    names = cfg.regularizer.names
    fixed: dict[str, Any] = {}
    for name in SEARCHED:
        value = _space(cfg, name)
        if isinstance(value, ParamRange) or not any(_applies(name, r) for r in names):
            continue
        if name == "bss_eta" and not value:
            continue
        fixed[name] = int(value) if name == "frozen_blocks" else float(value)
    if isinstance(cfg.regularizer.name, str):
        fixed["regularizer"] = cfg.regularizer.name
    return fixed


def suggest_params(
    trial: Suggester, cfg: StudyConfig, only: Collection[str] | None = None
) -> TrialParams:
    """Ask the trial for every searched parameter (or those in ``only``); the others come from
    the config (fixed ones; a parameter left out of ``only`` takes its range's low end, which
    the caller replaces).

    A searched regularizer is asked last, as before DELTA existed, unless DELTA is among its
    choices: then first, since whether λ is ``lambda`` or ``delta_lambda`` depends on it.
    """
    values = fixed_params(cfg)

    def ask_regularizer() -> None:
        if only is None or "regularizer" in only:
            values["regularizer"] = trial.suggest_categorical("regularizer", cfg.regularizer.names)
        else:
            values["regularizer"] = cfg.regularizer.names[0]

    searched = not isinstance(cfg.regularizer.name, str)
    if searched and "delta" in cfg.regularizer.names:
        ask_regularizer()
    for name in SEARCHED:
        space = _space(cfg, name)
        if not isinstance(space, ParamRange) or not _applies(name, values.get("regularizer")):
            continue
        if only is not None and name not in only:
            values[name] = int(space.low) if name == "frozen_blocks" else space.low
            continue
        if name == "frozen_blocks":
            values[name] = trial.suggest_int(
                name, int(space.low), int(space.high), step=int(space.step or 1)
            )
        else:
            values[name] = trial.suggest_float(
                name, space.low, space.high, log=space.log, step=space.step
            )
    if "regularizer" not in values:
        ask_regularizer()
    return _from_values(values)


def baseline_params(cfg: StudyConfig, name: str) -> TrialParams:
    """Exactly what the baseline ``name`` (one of :data:`BASELINES`) fine-tunes with."""
    assert name in BASELINES, name
    regularizer = cfg.regularizer.names[0] if name == "plain_finetuning" else "l2"
    return TrialParams.from_dict({**PLAIN_FINETUNING, "regularizer": regularizer})


def baseline_enqueue(cfg: StudyConfig, name: str) -> dict[str, Any]:
    """The searched parameters a baseline trial is enqueued with: those of its settings the search
    space holds, so the sampler learns the point where the baseline really is. Nothing for
    ``scratch``, which is not a point of the pretrained space."""
    if name == "scratch":
        return {}
    values = baseline_params(cfg, name).to_dict()
    # Its λ under the name its regularizer asks for; BSS is off (η = 0) in every baseline.
    values["delta_lambda"] = values["lambda"]
    values.setdefault("bss_eta", 0.0)
    out: dict[str, Any] = {}
    for user in SEARCHED:
        space = _space(cfg, user)
        if not _applies(user, values["regularizer"]):
            continue
        if isinstance(space, ParamRange) and space.low <= values[user] <= space.high:
            out[user] = values[user]
    if not isinstance(cfg.regularizer.name, str):
        out["regularizer"] = values["regularizer"]
    return out


def resolve_params(cfg: StudyConfig, params: Mapping[str, Any]) -> TrialParams:
    """A trial's ``params`` plus the fixed values: everything needed to fine-tune again."""
    return _from_values({**fixed_params(cfg), **params})


def format_params(params: Mapping[str, Any]) -> str:
    """``lambda=1.005 lr=0.00379 frozen_blocks=2``: four significant digits, so two trials'
    values that differ show differently."""
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _space(cfg: StudyConfig, name: str) -> Any:
    """The config's value for the parameter ``name``: a range, or the number that fixes it."""
    section, attr = SEARCHED[name].split(".")
    return getattr(getattr(cfg, section), attr)


def _applies(name: str, regularizer: str | None) -> bool:
    """Whether a trial with ``regularizer`` (None: not chosen yet, and not DELTA) has ``name``."""
    if name == "delta_lambda":
        return regularizer == "delta"
    if name == "lambda":
        return regularizer != "delta"
    return True


def _from_values(values: Mapping[str, Any]) -> TrialParams:
    """TrialParams from user-facing names; a DELTA trial's λ is its ``delta_lambda``."""
    if values.get("regularizer") == "delta" and "delta_lambda" in values:
        values = {**values, "lambda": values["delta_lambda"]}
    return TrialParams.from_dict(values)
