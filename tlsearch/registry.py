"""One registry for every extension point: models, regularizers, loss terms, augmentations, tasks,
samplers, pruners and selection rules.

A registry maps a name to an :class:`Entry`, in the style of timm's ``_registry.py``: register,
list the names, create by name, and fail loudly (:class:`~tlsearch.errors.ConfigError`, naming the
choices) on an unknown one. An entry says what a name *is* without importing the code that builds
it: its options schema (a pydantic model, validated after the study file loads), its block count for
given options (models), a key adapter for checkpoints saved under another naming (models), the
hyperparameters it brings to the search (penalties, loss terms, augmentations:
:class:`Hyperparameter`), and its builder as ``"module:attribute"``, imported only by
:meth:`Registry.create`. So checking a study file, listing names, counting blocks or asking a
trial for its parameters never imports torch.

Where code comes from — one rule: the built-in entries below, installed distributions' entry points
(groups ``tlsearch.models``, ``tlsearch.regularizers``, ``tlsearch.tasks``), and modules the user
names on the command line (``--plugin``) or in ``$TLSEARCH_PLUGINS`` (:func:`load_plugins`). Never a
name read from a study file or a database: those only select among what is already registered.

An entry point's object is an :class:`Entry` (registered under its own name) or a module whose
import registers its entries itself::

    [project.entry-points."tlsearch.models"]
    resnet = "tlsearch_resnet:ENTRY"
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tlsearch.errors import ConfigError

__all__ = [
    "AUGMENTATIONS",
    "MODELS",
    "PLUGINS_ENV",
    "PRUNERS",
    "REGULARIZERS",
    "SAMPLERS",
    "SELECTION_RULES",
    "TASKS",
    "TERMS",
    "BlockNetOptions",
    "Entry",
    "Hyperparameter",
    "Registry",
    "load_plugins",
    "loaded_plugins",
]

# Named in every "unknown name" error: where more names come from.
_HOW_TO_ADD = "a plug-in adds more: install its package, or pass --plugin MODULE"
PLUGINS_ENV = "TLSEARCH_PLUGINS"


@dataclass(frozen=True)
class Hyperparameter:
    """A hyperparameter an entry brings to the search: searched or fixed like ``lr``, under its own
    name, in a trial that trains with the entry (a penalty: when the trial's regularizer is it; a
    loss term: in every trial; an augmentation: when the trial's augmentation is it).

    Attributes:
        name: its name in a trial's parameters, exports and reports (``"bss_eta"``); no other
            parameter of the study has it.
        default: what the study file does not set: a number (fixed) or a range
            ``{"low", "high", "log", "step"}`` (searched), as a ``[search]`` value is written.
            A loss term's must be ``off``: a term is on only where a study turns it on.
        field: the config field that holds it instead (``"search.delta_lambda"``), for those the
            schema had before entries declared them; its default is the field's. None: the study
            file sets it as ``search.<name>``.
        is_lambda: it is the penalty's λ, in a range and under a name of its own (a penalty whose λ
            scales something else than the others'): a trial with the penalty asks for it instead
            of ``lambda``, and the penalty receives it as its λ.
        off: the value at which it does nothing (BSS's η = 0), required but for a λ of its own:
            baselines train with it, and a trial's record leaves it out, so that a trial without
            it reads as it did before the entry existed.
        minimum: the least value it may take (None: any), checked where the study file sets it.
        label: how figures and tables name it ("DELTA's λ"); its name by default.
    """

    name: str
    default: float | Mapping[str, Any] | None = None
    field: str | None = None
    is_lambda: bool = False
    off: float | None = None
    minimum: float | None = 0.0
    label: str = ""

    def __post_init__(self) -> None:
        assert (self.default is None) != (self.field is None), (
            f"hyperparameter '{self.name}': give a default or a config field, one of them"
        )
        assert self.is_lambda != (self.off is not None), (
            f"hyperparameter '{self.name}': a λ of its own has no off value; any other has one"
        )


@dataclass(frozen=True)
class Entry:
    """What a registered name is.

    Attributes:
        name: the name a study file uses (``model.name = "cnn"``).
        target: the builder, as ``"module:attribute"`` (imported by :meth:`load`) or the object.
        options: the pydantic model of the entry's options (``[model]`` keys besides ``name``);
            None: it takes none.
        blocks: for models, the number of blocks given the validated options (a dict; what
            ``frozen_blocks`` may reach), computed without building the model.
        key_adapter: for models, ``"module:attribute"`` or a function mapping a checkpoint's state
            dict saved under another naming to the model's own parameter names.
        hyperparameters: for penalties, loss terms and augmentations, the hyperparameters it
            brings to the search, in the order a trial asks for them (see
            :class:`Hyperparameter`). A penalty or an augmentation receives each one, but an
            ``is_lambda`` one, as a keyword argument of its class.
        origin: who registered it: "tlsearch", a distribution ("name version"), or a
            ``--plugin`` module ("plug-in FILE"); filled in while a plug-in's code runs.
    """

    name: str
    target: str | Callable[..., Any]
    options: type[BaseModel] | None = None
    blocks: Callable[[Any], int] | None = None
    key_adapter: str | Callable[[dict[str, Any]], dict[str, Any]] | None = None
    hyperparameters: tuple[Hyperparameter, ...] = ()
    origin: str = "tlsearch"
    _loaded: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def load(self) -> Callable[..., Any]:
        """The builder, importing its module on first use."""
        if "target" not in self._loaded:
            self._loaded["target"] = _resolve(self.target, f"{self.name} ({self.origin})")
        return self._loaded["target"]

    def adapt_keys(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` under the model's own parameter names (unchanged without a key adapter)."""
        if self.key_adapter is None:
            return state
        return _resolve(self.key_adapter, f"{self.name} key adapter")(state)

    def validate_options(self, options: Mapping[str, Any], section: str) -> dict[str, Any]:
        """The options with defaults filled in; one line per bad option, naming it."""
        if self.options is None:
            if options:
                raise ConfigError(
                    f"{section}.{next(iter(options))}: unknown option ('{self.name}' takes none)"
                )
            return {}
        try:
            return self.options.model_validate(dict(options)).model_dump(mode="json")
        except ValidationError as err:
            lines = []
            for e in err.errors():
                loc = ".".join(str(p) for p in e["loc"])
                msg = e["msg"].removeprefix("Value error, ")
                if e["type"] == "extra_forbidden":
                    msg = f"unknown option for {section.split('.')[-1]} '{self.name}'"
                lines.append(f"{section}.{loc}: {msg}")
            raise ConfigError("\n".join(lines)) from None


def _resolve(target: str | Callable[..., Any], what: str) -> Any:
    if not isinstance(target, str):
        return target
    module, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except Exception as e:  # noqa: BLE001 - a plug-in's failure is one line for the user
        raise ConfigError(f"{what}: cannot load {target}: {_describe(e)}") from None
    return obj


def _describe(e: BaseException) -> str:
    """``e`` as one line: a plug-in's exception message may span several, the user sees one."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {'; '.join(lines)}" if lines else type(e).__name__


# Who is registering while a plug-in's code runs: its distribution, while its entry point loads, or
# its module, while load_plugins imports it. An entry registered then without an origin of its own
# gets this one, so a plug-in that reuses a built-in's name is an error, never a silent swap.
_registering: list[str] = []


@contextmanager
def _registering_as(origin: str) -> Iterator[None]:
    _registering.append(origin)
    try:
        yield
    finally:
        _registering.pop()


class Registry:
    """Names → :class:`Entry`, with entry points of ``group`` loaded on first look-up.

    Args:
        kind: what the entries are, in messages ("model").
        field: the study-file field that names one ("model.name").
        group: the entry-point group plug-in distributions register under, if any.
    """

    def __init__(self, kind: str, field: str, group: str | None = None) -> None:
        self.kind = kind
        self.field = field
        self.group = group
        self._entries: dict[str, Entry] = {}
        self._scanned = group is None

    def register(
        self,
        name: str,
        target: str | Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Register ``target`` under ``name``; without a target, a decorator that registers the
        decorated object and returns it unchanged. Other keywords are :class:`Entry` fields."""
        if target is None:

            def deco(obj: Any) -> Any:
                self.add(Entry(name, obj, **kwargs))
                return obj

            return deco
        self.add(Entry(name, target, **kwargs))
        return target

    def add(self, entry: Entry) -> Entry:
        """Register ``entry``; a name taken by another origin is an error, never a silent swap."""
        if entry.origin == "tlsearch" and _registering:
            entry = _with_origin(entry, _registering[-1])
        old = self._entries.get(entry.name)
        if old is not None and old.origin != entry.origin:
            raise ConfigError(
                f"{self.kind} '{entry.name}' is registered twice ({old.origin}; {entry.origin})"
            )
        self._entries[entry.name] = entry
        return entry

    def names(self) -> list[str]:
        self._scan()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        self._scan()
        return name in self._entries

    def get(self, name: str) -> Entry:
        self._scan()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"{self.field}: unknown {self.kind} '{name}' (choose from "
                f"{', '.join(self.names())}; {_HOW_TO_ADD})"
            ) from None

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the builder of ``name`` (importing it now) with the given arguments."""
        return self.get(name).load()(*args, **kwargs)

    def _scan(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        for ep in metadata.entry_points(group=self.group):
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else ep.value
            where = f"plug-in {dist}: entry point '{ep.name}' in group {self.group}"
            try:
                with _registering_as(dist):
                    obj = ep.load()
            except Exception as e:  # noqa: BLE001 - a broken plug-in is one line for the user
                self._scanned = False
                raise ConfigError(f"{where} failed to import: {_describe(e)}") from None
            if isinstance(obj, Entry):
                self.add(obj if obj.origin != "tlsearch" else _with_origin(obj, dist))
            elif not isinstance(obj, ModuleType):
                # Most likely the builder itself: silently skipping it would leave only an
                # "unknown model" error, far from the mistake.
                self._scanned = False
                raise ConfigError(
                    f"{where}: {ep.value} is a {type(obj).__name__}, not a tlsearch.registry.Entry "
                    "or a module that registers its entries"
                )


def _with_origin(entry: Entry, origin: str) -> Entry:
    return replace(entry, origin=origin, _loaded={})


_plugins: dict[str, str] = {}


def loaded_plugins() -> dict[str, str]:
    """The ``--plugin`` / ``$TLSEARCH_PLUGINS`` modules loaded in this process: spec → module."""
    return dict(_plugins)


def load_plugins(specs: Iterable[str] = (), *, environ: Mapping[str, str] = os.environ) -> None:
    """Import the plug-in modules the user named: each of ``specs`` and of ``$TLSEARCH_PLUGINS``
    (separated by ``os.pathsep`` or commas).

    A spec is a dotted module name (the current directory is on the path) or the path of a
    ``.py`` file. Importing it registers its entries (``MODELS.register(...)``). A plug-in that
    fails to import is one :class:`~tlsearch.errors.ConfigError` naming it.
    """
    env = environ.get(PLUGINS_ENV, "")
    extra = [s for part in env.split(os.pathsep) for s in part.split(",")]
    for spec in [*specs, *extra]:
        spec = spec.strip()
        if spec and spec not in _plugins:
            _plugins[spec] = _import_plugin(spec).__name__


def _import_plugin(spec: str) -> ModuleType:
    path = None
    if spec.endswith(".py"):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"--plugin: {spec}: file not found")
    elif "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        # Entries are registered as coming from the module's file, however it was named: the
        # same file named twice (a dotted name, a path) may register its entries twice.
        if path is None:
            found = importlib.util.find_spec(spec)
            with _registering_as(f"plug-in {found and found.origin or spec}"):
                return importlib.import_module(spec)
        with _registering_as(f"plug-in {path}"):
            return _exec_file(path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a broken plug-in is one line for the user
        raise ConfigError(f"--plugin: {spec}: failed to import: {_describe(e)}") from None


def _exec_file(path: Path) -> ModuleType:
    name = f"tlsearch_plugin_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None, path
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)  # as a failed `import` leaves no half-run module behind
        raise
    return module


# --- the built-in entries ------------------------------------------------------------------------


class BlockNetOptions(BaseModel):
    """Options of the built-in ``mlp`` and ``cnn`` (``[model]`` in a study file).

    Both accept every field, as tlsearch 0.1 did, so a study stored by it still validates.
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # MLP hidden sizes; [128] is the classic 784-128-10 network.
    hidden: list[Annotated[int, Field(gt=0)]] = [256, 128]
    # CNN channels per conv block, then the width of its fully connected block.
    channels: list[Annotated[int, Field(gt=0)]] = [16, 32]
    fc: int = Field(128, gt=0)
    # BatchNorm after each conv/linear layer; frozen blocks keep theirs in eval mode.
    batch_norm: bool = False
    dropout: float = Field(0.0, ge=0.0, lt=1.0)


MODELS = Registry("model", "model.name", group="tlsearch.models")
# "mlp": one block per hidden size. "cnn": conv16-pool-conv32-pool-fc128, three blocks.
MODELS.register(
    "mlp",
    "tlsearch.models.blocknet:mlp",
    options=BlockNetOptions,
    blocks=lambda o: len(o["hidden"]),
)
MODELS.register(
    "cnn",
    "tlsearch.models.blocknet:cnn",
    options=BlockNetOptions,
    blocks=lambda o: len(o["channels"]) + 1,
)

REGULARIZERS = Registry("regularizer", "regularizer.name", group="tlsearch.regularizers")
REGULARIZERS.register("none", "tlsearch.regularizers.none:NoPenalty")
REGULARIZERS.register("l2", "tlsearch.regularizers.l2:L2")
REGULARIZERS.register("l2sp", "tlsearch.regularizers.l2sp:L2SP")
# DELTA's λ scales a distance between feature maps, not between weights: a range of its own, and a
# name of its own in a study (TPE never mixes the two ranges).
REGULARIZERS.register(
    "delta",
    "tlsearch.regularizers.delta:Delta",
    hyperparameters=(
        Hyperparameter(
            "delta_lambda", field="search.delta_lambda", is_lambda=True, label="DELTA's λ"
        ),
    ),
)

# Loss terms added on top of whichever penalty trains (tlsearch.regularizers.base.DataTerm): a
# class whose from_settings(regularizer settings, trial params) gives the term, or None when off.
TERMS = Registry("loss term", "regularizer", group="tlsearch.terms")
TERMS.register(
    "bss",
    "tlsearch.regularizers.bss:BSS",
    hyperparameters=(
        Hyperparameter("bss_eta", field="regularizer.bss_eta", off=0.0, label="BSS's η"),
    ),
)

# Augmentations of a minibatch's images (tlsearch.augmentations): each a class built with its
# declared strength as a keyword (Augmentation.__init__), a searched regularizer beside λ. "none"
# is no entry: the absence of one. hflip is on only where the task's classes survive a mirror
# image (data.flip_invariant), so it never joins search.augment = "auto".
AUGMENTATIONS = Registry("augmentation", "search.augment", group="tlsearch.augmentations")
for _name, _class, _default, _label in (
    # the largest shift, as a fraction of the image's side (28 px: 1-4 px; 8 px: 1 px)
    ("translate", "Translate", {"low": 0.04, "high": 0.15}, "translation"),
    # rotation up to ±60° × s, scale within 1 ± s/2, shear up to ±30° × s
    ("affine", "Affine", {"low": 0.05, "high": 0.3}, "affine"),
    # the share of images given one erased rectangle (4-25 % of their area)
    ("erase", "Erase", {"low": 0.1, "high": 0.6}, "erasing"),
    # α of the Beta(α, α) that mixes two images and their labels
    ("mixup", "Mixup", {"low": 0.05, "high": 1.0, "log": True}, "mixup α"),
    ("cutmix", "CutMix", {"low": 0.05, "high": 1.0, "log": True}, "cutmix α"),
    # the share of images mirrored left to right
    ("hflip", "HorizontalFlip", 0.5, "flip"),
):
    AUGMENTATIONS.register(
        _name,
        f"tlsearch.augmentations.{_name}:{_class}",
        hyperparameters=(Hyperparameter(_name, default=_default, off=0.0, label=_label),),
    )

TASKS = Registry("task", "data.task", group="tlsearch.tasks")
for _name in (
    "mnist-noisy",
    "mnist-rotated",
    "mnist-split",
    "mnist-inverted",
    "mnist-occluded",
    "digits-noisy",
    "digits-split",
):
    TASKS.register(_name, f"tlsearch.data:{_name.replace('-', '_')}")

SAMPLERS = Registry("sampler", "sampler.name")
for _name in ("tpe", "random", "gp", "cmaes", "qmc"):
    SAMPLERS.register(_name, f"tlsearch.samplers:{_name}")

PRUNERS = Registry("pruner", "pruner.name")
for _name in ("median", "percentile", "wilcoxon", "successive_halving", "hyperband", "none"):
    PRUNERS.register(_name, f"tlsearch.samplers:{_name}_pruner")

# What `tlsearch export` takes as a study's answer (select.rule, export --select): see
# tlsearch.selection for each rule; the two that read the confirmation round live with it.
SELECTION_RULES = Registry("selection rule", "select.rule")
for _name in ("best", "loss", "one_se", "gate"):
    SELECTION_RULES.register(_name, f"tlsearch.selection:{_name}")
for _name in ("confirm", "confirm_gate"):
    SELECTION_RULES.register(_name, f"tlsearch.confirmation:{_name}")
