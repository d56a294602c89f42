"""A trial's choices: what the search space says, what a trial suggests, what an export holds.

One name per thing. Files, the dashboard, exports and output say ``lambda``; Python says
``lambda_`` (``lambda`` is a keyword). The frozen depth is ``frozen_blocks`` everywhere.
:data:`SEARCHED` holds the parameters every trial has, from a user's name to its config field.

Beyond those, a penalty or a loss term brings its own hyperparameters: its registry entry declares
them (:class:`tlsearch.registry.Hyperparameter`: name, default range, config field), as a model's
entry declares its options, and this module asks for what the entries declare without naming any.
A trial asks for the shared parameters, then its penalty's own, then each loss term's; a penalty
whose λ scales something else than the others' (DELTA's: feature maps) declares a λ of its own,
which a trial with it asks for instead of ``lambda`` (TPE never mixes the two ranges). Either way
:attr:`TrialParams.lambda_` (``lambda`` in files) holds the λ the trial used.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tlsearch.config import ParamRange, StudyConfig
from tlsearch.errors import ConfigError
from tlsearch.registry import AUGMENTATIONS, REGULARIZERS, TERMS, Hyperparameter

__all__ = [
    "BASELINES",
    "REFERENCE_TRIALS",
    "STANDARD_AUGMENT",
    "PLAIN_FINETUNING",
    "REQUIRED",
    "SEARCHED",
    "TrialParams",
    "augment_choices",
    "augment_strength",
    "baseline_enqueue",
    "baseline_params",
    "fixed_params",
    "format_params",
    "lambda_range",
    "own_lambda",
    "resolve_params",
    "suggest_params",
]

# The parameters every trial has (λ: unless its penalty has a λ of its own), user-facing name →
# its config field (section.attribute), in the order a trial asks.
SEARCHED = {
    "lambda": "search.lambda_",
    "lr": "search.lr",
    "frozen_blocks": "search.frozen_blocks",
    "backbone_lr_mult": "search.backbone_lr_mult",
}
# What every TrialParams dict holds (an entry's own hyperparameter is left out when off).
REQUIRED = ("lambda", "lr", "frozen_blocks", "backbone_lr_mult", "regularizer")

# What a user fine-tunes with before any search: Adam's usual 1e-3, everything trainable, no
# backbone learning-rate cut, and a small λ (``tlsearch final``'s baseline).
PLAIN_FINETUNING = {"lambda": 0.01, "lr": 1e-3, "frozen_blocks": 0, "backbone_lr_mult": 1.0}

# The reference trials a study may enqueue (``search.baselines``): plain fine-tuning from the
# pretrained model, and the same settings from a random init (nothing to pull toward but zero, so
# L2) — ``tlsearch final``'s two baselines. Both train with every entry's own hyperparameter off.
BASELINES = ("plain_finetuning", "scratch")
# Plain fine-tuning with the standard augmentation: its settings, each minibatch's images shifted
# by up to a tenth of their side (28 px: 3 px; 8 px: 1 px). A study's third reference trial where
# it augments images, trained again in the confirmation round beside plain fine-tuning; `final`'s
# baselines stay the two above.
STANDARD_AUGMENT = {"augment": "translate", "translate": 0.1}
REFERENCE_TRIALS = (*BASELINES, "plain_augmented")


@dataclass(frozen=True)
class TrialParams:
    """What one trial fine-tunes with; :meth:`to_dict` gives the names files and output use.

    ``lambda_`` is the λ the trial's regularizer used (its own λ for a penalty that has one, as
    DELTA); ``hyperparameters`` the values of the other hyperparameters its penalty, the loss
    terms and its augmentation declare, by name (BSS's ``bss_eta``, translate's ``translate``):
    one at its off value is left out (BSS with η = 0 is no BSS); ``augment`` the augmentation
    its minibatches train with ("none": the images as they are).
    """

    lambda_: float
    lr: float
    frozen_blocks: int
    backbone_lr_mult: float
    regularizer: str
    # Out of the hash (a dict has none): TrialParams stay hashable, equal ones alike.
    hyperparameters: Mapping[str, float] = field(default_factory=dict, hash=False)
    augment: str = "none"

    def __post_init__(self) -> None:
        off = {h.name: h.off for h in _declared(self.regularizer, self.augment)}
        on = {k: v for k, v in self.hyperparameters.items() if k not in off or v != off[k]}
        object.__setattr__(self, "hyperparameters", on)

    def to_dict(self) -> dict[str, Any]:
        """The names files use; an entry's hyperparameter, and the augmentation, only when on, so
        that a trial without it reads as it did before the entry existed."""
        augment = {} if self.augment == "none" else {"augment": self.augment}
        return {
            "lambda": self.lambda_,
            "lr": self.lr,
            "frozen_blocks": self.frozen_blocks,
            "backbone_lr_mult": self.backbone_lr_mult,
            "regularizer": self.regularizer,
            **self.hyperparameters,
            **augment,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialParams:
        """From the names :meth:`to_dict` writes; :data:`REQUIRED` are required, an entry's own
        hyperparameter is off when absent (a trial stored before the entry existed has none)."""
        missing = [n for n in REQUIRED if n not in d]
        if missing:
            raise ConfigError(f"params: missing {', '.join(missing)}")
        try:
            regularizer, augment = str(d["regularizer"]), str(d.get("augment", "none"))
            own = {
                h.name: float(d[h.name])
                for h in _declared(regularizer, augment)
                if not h.is_lambda and h.name in d
            }
            return cls(
                lambda_=float(d["lambda"]),
                lr=float(d["lr"]),
                frozen_blocks=int(d["frozen_blocks"]),
                backbone_lr_mult=float(d["backbone_lr_mult"]),
                regularizer=regularizer,
                hyperparameters=own,
                augment=augment,
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

    Only those some trial of the study has (``lambda`` when one of its regularizers has no λ of
    its own, a penalty's own hyperparameters when it is one of them), and an entry's own only when
    on (BSS's η above 0).
    """
    fixed: dict[str, Any] = {}
    for name, value, off in _parameters(cfg, cfg.regularizer.names):
        if isinstance(value, ParamRange) or value == off:
            continue
        fixed[name] = int(value) if name == "frozen_blocks" else float(value)
    if isinstance(cfg.regularizer.name, str):
        fixed["regularizer"] = cfg.regularizer.name
    return fixed


def suggest_params(
    trial: Suggester,
    cfg: StudyConfig,
    only: Collection[str] | None = None,
    augment: Sequence[str] = ("none",),
) -> TrialParams:
    """Ask the trial for every searched parameter (or those in ``only``); the others come from
    the config (fixed ones; a parameter left out of ``only`` takes its range's low end, which
    the caller replaces).

    The order: the shared parameters, the penalty's own, each loss term's, then the augmentation
    (among ``augment``, :func:`augment_choices`) and its strength. A searched regularizer is asked
    last of the first four, as before penalties had hyperparameters of their own, unless one of
    its choices declares some (DELTA: its λ): then first, since which parameters a trial has
    depends on it. A study without augmentation asks for neither of the last two.
    """
    values = fixed_params(cfg)

    def ask_regularizer() -> None:
        if only is None or "regularizer" in only:
            values["regularizer"] = trial.suggest_categorical("regularizer", cfg.regularizer.names)
        else:
            values["regularizer"] = cfg.regularizer.names[0]

    searched = not isinstance(cfg.regularizer.name, str)
    if searched and any(_declared_by_penalty(r) for r in cfg.regularizer.names):
        ask_regularizer()
    for name, space, _ in _parameters(cfg, [values.get("regularizer")]):
        if not isinstance(space, ParamRange):
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
    values.update(_suggest_augment(trial, cfg, only, augment))
    return _from_values(values)


def _suggest_augment(
    trial: Suggester, cfg: StudyConfig, only: Collection[str] | None, choices: Sequence[str]
) -> dict[str, Any]:
    """The trial's augmentation among ``choices`` (asked when there are several) and its declared
    strength, searched or fixed (``search.<name>``, else the entry's default)."""
    if len(choices) > 1 and (only is None or "augment" in only):
        name = trial.suggest_categorical("augment", list(choices))
    else:
        name = "none" if "none" in choices and only is not None else choices[0]
    values: dict[str, Any] = {"augment": name}
    for h in _declared_by_augmentation(name):
        space = _value(cfg, h)
        if not isinstance(space, ParamRange):
            values[h.name] = float(space)
        elif only is not None and h.name not in only:
            values[h.name] = space.low
        else:
            values[h.name] = trial.suggest_float(
                h.name, space.low, space.high, log=space.log, step=space.step
            )
    return values


def augment_choices(cfg: StudyConfig, input_shape: Sequence[int]) -> list[str]:
    """The augmentations a trial of ``cfg`` may train with on inputs of ``input_shape``
    (``search.augment``; "auto": :data:`~tlsearch.config.schema.AUTO_AUGMENT` on images, none on
    flat features). Raises :class:`ConfigError` for an augmentation named for flat features."""
    images = len(input_shape) == 3 and min(input_shape[1:]) > 1
    choices = cfg.search.augment_names(images)
    if not images and choices != ["none"]:
        named = ", ".join(c for c in choices if c != "none")
        raise ConfigError(
            f"search.augment: {named} transform images (channels, height, width); this data's "
            f"inputs have shape {tuple(input_shape)}"
        )
    return choices


def baseline_params(cfg: StudyConfig, name: str) -> TrialParams:
    """Exactly what the reference trial ``name`` (one of :data:`REFERENCE_TRIALS`) fine-tunes
    with."""
    assert name in REFERENCE_TRIALS, name
    regularizer = "l2" if name == "scratch" else cfg.regularizer.names[0]
    augment = STANDARD_AUGMENT if name == "plain_augmented" else {}
    return TrialParams.from_dict({**PLAIN_FINETUNING, "regularizer": regularizer, **augment})


def baseline_enqueue(
    cfg: StudyConfig, name: str, augment: Sequence[str] = ("none",)
) -> dict[str, Any]:
    """The searched parameters a reference trial is enqueued with: those of its settings the
    search space holds (its augmentation among ``augment``'s choices), so the sampler learns the
    point where it really is. Nothing for ``scratch``, which is not a point of the pretrained
    space."""
    if name == "scratch":
        return {}
    values = baseline_params(cfg, name).to_dict()
    out: dict[str, Any] = {}
    for user, space, off in _parameters(cfg, [values["regularizer"]]):
        # Its λ under the name its regularizer asks for; every entry's own is off in a baseline.
        value = values.get(user, values["lambda"] if off is None else off)
        if isinstance(space, ParamRange) and space.low <= value <= space.high:
            out[user] = value
    if not isinstance(cfg.regularizer.name, str):
        out["regularizer"] = values["regularizer"]
    chosen = values.get("augment", "none")
    if len(augment) > 1 and chosen in augment:
        out["augment"] = chosen
    for h in _declared_by_augmentation(chosen):
        space = _value(cfg, h)
        if isinstance(space, ParamRange) and space.low <= values[h.name] <= space.high:
            out[h.name] = values[h.name]
    return out


def resolve_params(cfg: StudyConfig, params: Mapping[str, Any]) -> TrialParams:
    """A trial's ``params`` plus the fixed values: everything needed to fine-tune again."""
    return _from_values({**fixed_params(cfg), **params})


def augment_strength(augment: str) -> Hyperparameter | None:
    """The strength the augmentation ``augment`` declares (translate's ``translate``), or None
    for "none" or one not registered in this process."""
    return next(iter(_declared_by_augmentation(augment)), None)


def own_lambda(regularizer: str | None) -> Hyperparameter | None:
    """The λ of its own that the penalty ``regularizer`` declares (DELTA's ``delta_lambda``), or
    None when its trials ask for the shared ``lambda``."""
    return next((h for h in _declared_by_penalty(regularizer) if h.is_lambda), None)


def lambda_range(cfg: StudyConfig, regularizer: str | None) -> Any:
    """The range (or fixed value) the λ of a trial with ``regularizer`` comes from in ``cfg``."""
    own = own_lambda(regularizer)
    return _field(cfg, SEARCHED["lambda"]) if own is None else _value(cfg, own)


def format_params(params: Mapping[str, Any]) -> str:
    """``lambda=1.005 lr=0.00379 frozen_blocks=2``: four significant digits, so two trials'
    values that differ show differently."""
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _declared_by_penalty(regularizer: str | None) -> tuple[Hyperparameter, ...]:
    """What the penalty ``regularizer`` declares; nothing when not chosen yet (None) or not
    registered in this process (a plug-in's, read by a command that does not load it)."""
    if regularizer is None or regularizer not in REGULARIZERS:
        return ()
    return REGULARIZERS.get(regularizer).hyperparameters


def _declared_by_terms() -> list[Hyperparameter]:
    """What the loss terms declare, in the order of their names."""
    return [h for name in TERMS.names() for h in TERMS.get(name).hyperparameters]


def _declared_by_augmentation(augment: str) -> tuple[Hyperparameter, ...]:
    """What the augmentation ``augment`` declares (its strength); nothing for "none" or one not
    registered in this process."""
    if augment == "none" or augment not in AUGMENTATIONS:
        return ()
    return AUGMENTATIONS.get(augment).hyperparameters


def _declared(regularizer: str | None, augment: str = "none") -> list[Hyperparameter]:
    """A trial's hyperparameters beyond the shared ones: its penalty's own, each term's, then its
    augmentation's."""
    return [
        *_declared_by_penalty(regularizer),
        *_declared_by_terms(),
        *_declared_by_augmentation(augment),
    ]


def _parameters(
    cfg: StudyConfig, regularizers: Iterable[str | None]
) -> list[tuple[str, Any, float | None]]:
    """``(name, range or fixed value, off value)`` of every parameter a trial with one of
    ``regularizers`` has, in the order a trial asks for them. The off value is None for the
    shared parameters and a penalty's own λ."""
    regularizers = list(regularizers)
    shared = [
        (name, _field(cfg, path), None)
        for name, path in SEARCHED.items()
        if name != "lambda" or any(own_lambda(r) is None for r in regularizers)
    ]
    declared: dict[str, Hyperparameter] = {}
    for h in [*(h for r in regularizers for h in _declared_by_penalty(r)), *_declared_by_terms()]:
        declared.setdefault(h.name, h)
    return shared + [(h.name, _value(cfg, h), h.off) for h in declared.values()]


def _field(cfg: StudyConfig, path: str) -> Any:
    """The config's value at ``section.attribute``: a range, or the number that fixes it."""
    section, attr = path.split(".")
    return getattr(getattr(cfg, section), attr)


def _value(cfg: StudyConfig, h: Hyperparameter) -> Any:
    """An entry's hyperparameter in ``cfg``: its config field, ``search.<name>``, or its
    declared default (a config not checked against the registry, as ``StudyConfig()``)."""
    if h.field is not None:
        return _field(cfg, h.field)
    value = (cfg.search.model_extra or {}).get(h.name, h.default)
    return ParamRange.model_validate(value) if isinstance(value, Mapping) else value


def _from_values(values: Mapping[str, Any]) -> TrialParams:
    """TrialParams from user-facing names; a trial's λ is its penalty's own when it has one."""
    own = own_lambda(values.get("regularizer"))
    if own is not None and own.name in values:
        values = {**values, "lambda": values[own.name]}
    return TrialParams.from_dict(values)
