"""Reading a study: TOML in binary mode, paths resolved from the file, one line per problem.

:func:`config_from_dict` validates the schema (:mod:`tlsearch.config.schema`), then checks every
name against :mod:`tlsearch.registry` and fills in the model's options from its entry's schema.
The registries hold only what is registered (built-ins, installed plug-ins' entry points, modules
the user loaded with ``--plugin``): a name in a study file never imports anything.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tomllib
from pydantic import TypeAdapter, ValidationError

from tlsearch.config.schema import (
    CHANGED_DEFAULTS,
    LEGACY_VALUES,
    ModelConfig,
    Param,
    ParamRange,
    SearchSpace,
    StudyConfig,
)
from tlsearch.errors import ConfigError
from tlsearch.registry import (
    AUGMENTATIONS,
    MODELS,
    PRUNERS,
    REGULARIZERS,
    SAMPLERS,
    SELECTION_RULES,
    TASKS,
    TERMS,
    Hyperparameter,
)

__all__ = ["adopt_stored", "check_names", "config_from_dict", "load_config", "stored_config"]

_log = logging.getLogger(__name__)

_BRANCHES = {"range", "fixed", "str", "list[str]", "file", "folder"}


def _one_line(text: str) -> str:
    """``text`` with control characters escaped: a key or value holding a newline (TOML allows
    it in quoted keys and strings) must not split one problem over two lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        # Drop the union branch names pydantic puts in the location; users never wrote them.
        loc = [str(p) for p in e["loc"] if str(p) not in _BRANCHES]
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "fixed" in e["loc"] and e["type"] in {"float_type", "float_parsing"}:
            msg = (
                "must be a number (fixed) or a table {low, high, log, step} (searched), "
                f"got {e['input']!r}"
            )
        # Checks across sections name their field themselves ("search.frozen_blocks: ...").
        named = re.match(r"^([A-Za-z_][\w.]*): (.*)$", msg)
        if named and (not loc or named.group(1).startswith(".".join(loc) + ".")):
            loc, msg = [named.group(1)], named.group(2)
        line = _one_line(f"{source}: {'.'.join(loc) or '(top level)'}: {msg}")
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def config_from_dict(
    data: dict[str, Any], source: str = "config", *, names: bool = True
) -> StudyConfig:
    """Validate a config mapping; raise :class:`ConfigError` naming every bad field.

    The model's options come back complete (its entry's defaults filled in), so the stored config
    says exactly which network every trial trained. ``names=False`` checks the schema only: for a
    config stored with a study, read by commands that build no model (export, status), whose
    model or task may come from a plug-in this process has not loaded.
    """
    try:
        cfg = StudyConfig.model_validate(data)
    except ValidationError as err:
        # The names are checked too, so that every problem of the file shows at once.
        lines = _format_errors(err, source).splitlines()
        lines += [ln for ln in _unknown_names(data, source) if ln not in lines]
        raise ConfigError("\n".join(lines)) from None
    return check_names(cfg, source) if names else cfg


# Fields naming a registry entry: (section, key, registry).
_NAMED = (
    ("data", "task", TASKS),
    ("regularizer", "name", REGULARIZERS),
    ("sampler", "name", SAMPLERS),
    ("pruner", "name", PRUNERS),
    ("model", "name", MODELS),
    ("select", "rule", SELECTION_RULES),
)


def _unknown_names(data: Any, source: str) -> list[str]:
    """One line per name in a raw (invalid) config mapping that no registry holds."""
    lines = []
    for section, key, registry in _NAMED:
        table = data.get(section) if isinstance(data, dict) else None
        value = table.get(key) if isinstance(table, dict) else None
        names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        for name in names:
            if isinstance(name, str) and name not in registry:
                try:
                    registry.get(name)
                except ConfigError as e:
                    lines.append(_one_line(f"{source}: {e}"))
    search = data.get("search") if isinstance(data, dict) else None
    if isinstance(search, dict):
        fields = {f.alias or n for n, f in SearchSpace.model_fields.items()}
        fields |= set(SearchSpace.model_fields)
        keys = [str(k) for k in search if k not in fields]
        lines += [_one_line(f"{source}: {line}") for line in _unknown_search_keys(keys)]
    return lines


def _declared_in_search() -> dict[str, Hyperparameter]:
    """The hyperparameters registered penalties, loss terms and augmentations declare as
    ``search.<name>``."""
    return {
        h.name: h
        for registry in (REGULARIZERS, TERMS, AUGMENTATIONS)
        for name in registry.names()
        for h in registry.get(name).hyperparameters
        if h.field is None
    }


def _unknown_search_keys(keys: Iterable[str]) -> list[str]:
    declared = _declared_in_search()
    return [f"search.{key}: unknown key" for key in keys if key not in declared]


def _own_hyperparameters(cfg: StudyConfig) -> tuple[StudyConfig, list[str]]:
    """``cfg`` with the declared default of each hyperparameter its penalties and the loss terms
    bring that its file leaves unset (and that is not off: a term's), and the problems: a
    ``search.<name>`` no entry declares, a value below the declared minimum, a name two entries
    declare differently."""
    extra = cfg.search.model_extra or {}
    problems = _unknown_search_keys(extra)
    chosen = [REGULARIZERS.get(n) for n in cfg.regularizer.names if n in REGULARIZERS]
    augments = [AUGMENTATIONS.get(n) for n in cfg.search.augment_names() if n in AUGMENTATIONS]
    entries = [*chosen, *(TERMS.get(n) for n in TERMS.names()), *augments]
    seen: dict[str, tuple[str, Hyperparameter]] = {}
    filled: dict[str, Any] = {}
    for entry in entries:
        for h in entry.hyperparameters:
            first, other = seen.setdefault(h.name, (entry.name, h))
            if other != h:
                problems.append(f"{first} and {entry.name} both declare a parameter '{h.name}'")
            if h.field is not None:
                continue
            value = extra.get(h.name)
            if value is None and h.default != h.off:
                value = filled[h.name] = _param(h.default, f"search.{h.name}", entry.name)
            low = value.low if isinstance(value, ParamRange) else value
            if value is not None and h.minimum is not None and low < h.minimum:
                problems.append(f"search.{h.name}: must be >= {h.minimum:g}, got {low}")
    search = cfg.search.model_copy(update=filled)
    return _unused_strengths_dropped(cfg.model_copy(update={"search": search})), problems


def _unused_strengths_dropped(cfg: StudyConfig) -> StudyConfig:
    """``cfg`` without the strengths of augmentations it does not search: they change nothing
    its trials do, so they leave its hash alone (a study resumed without augmentation, whose
    file's "auto" would fill them in, keeps the hash it was made with)."""
    chosen = set(cfg.search.augment_names())
    unused = {
        h.name
        for name in AUGMENTATIONS.names()
        if name not in chosen
        for h in AUGMENTATIONS.get(name).hyperparameters
    }
    extra = cfg.search.model_extra or {}
    if not unused & set(extra):
        return cfg
    kept = {k: v for k, v in extra.items() if k not in unused}
    search = cfg.search.model_construct(
        _fields_set=cfg.search.model_fields_set - unused,
        **{n: getattr(cfg.search, n) for n in type(cfg.search).model_fields},
        **kept,
    )
    return cfg.model_copy(update={"search": search})


def _augment_problems(cfg: StudyConfig) -> list[str]:
    """An augmentation no registry entry holds, or a flip where the task's classes do not
    survive one."""
    problems = []
    for name in cfg.search.augment_names():
        if name != "none" and name not in AUGMENTATIONS:
            try:
                AUGMENTATIONS.get(name)
            except ConfigError as e:
                problems.append(str(e))
    if "hflip" in cfg.search.augment_names() and not cfg.data.flip_invariant:
        problems.append(
            "search.augment: 'hflip' mirrors images, but data.flip_invariant is false (set it "
            "where a mirrored image keeps its class)"
        )
    return problems


def _param(value: Any, field: str, entry: str) -> Any:
    """A declared default as a validated range or number."""
    try:
        return TypeAdapter(Param).validate_python(value)
    except ValidationError as e:
        raise ConfigError(f"{field}: the default '{entry}' declares is invalid: {e}") from None


def check_names(cfg: StudyConfig, source: str = "config") -> StudyConfig:
    """``cfg`` with its names checked against the registries and the model's options validated.

    Raises :class:`ConfigError` (one line per problem, prefixed by ``source``) for an unknown name,
    an unknown or invalid model option, a frozen depth past the model's blocks, or a ``search``
    key no registered penalty or loss term declares. The hyperparameters the chosen penalties
    declare come back with their defaults filled in, as the model's options do.
    """
    problems: list[str] = []

    def check(what: Any) -> Any:
        try:
            return what()
        except ConfigError as e:
            problems.extend(str(e).splitlines())
            return None

    if cfg.data.task is not None:
        check(lambda: TASKS.get(cfg.data.task))
    for name in cfg.regularizer.names:
        check(lambda name=name: REGULARIZERS.get(name))
    check(lambda: SAMPLERS.get(cfg.sampler.name))
    check(lambda: PRUNERS.get(cfg.pruner.name))
    check(lambda: SELECTION_RULES.get(cfg.select.rule))
    entry = check(lambda: MODELS.get(cfg.model.name))
    options = entry and check(lambda: entry.validate_options(cfg.model.options, "model"))
    if options is not None and entry.blocks is not None:
        n_blocks = entry.blocks(options)
        fb = cfg.search.frozen_blocks
        top = fb.high if isinstance(fb, ParamRange) else fb
        if top > n_blocks:
            problems.append(
                f"search.frozen_blocks: {int(top)} exceeds the {n_blocks} blocks of model "
                f"'{cfg.model.name}'"
            )
    problems += _augment_problems(cfg)
    cfg, own = _own_hyperparameters(cfg)
    problems += own
    if problems:
        raise ConfigError("\n".join(_one_line(f"{source}: {p}") for p in problems))
    model = ModelConfig.model_validate({"name": cfg.model.name, **(options or {})})
    return cfg.model_copy(update={"model": model})


def load_config(
    path: str | Path | None = None, *, names: bool = True, **overrides: Any
) -> StudyConfig:
    """Read a study file (or the defaults when ``path`` is None) and apply top-level overrides.

    Overrides are the CLI flags (``storage``, ``name``, ``n_trials``, ``timeout``); None values are
    ignored so an unset flag never clears the file's value. ``names=False`` checks the schema only
    (:func:`config_from_dict`): for a command that reads the file's storage and study name and
    builds nothing, whose model or task may come from a plug-in it has not loaded.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        # Relative data and cache paths are relative to the study file, not the working directory.
        _resolve_paths(data, path.resolve().parent, source)
        if overrides.get("storage") is None:
            _warn_relative_sqlite(data.get("storage"), path.resolve().parent, source)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return config_from_dict(data, source, names=names)


def _warn_relative_sqlite(url: Any, study_dir: Path, source: str) -> None:
    """A relative SQLite URL means the current directory (as in SQLAlchemy, and README's commands
    rely on it); when the study file sits elsewhere and a database of that name sits beside it,
    the user probably meant that one: say so, naming both."""
    prefix = "sqlite:///"
    if not isinstance(url, str) or not url.startswith(prefix):
        return
    name = url[len(prefix) :].split("?")[0]
    if not name or Path(name).is_absolute() or name.startswith("~"):
        return
    here, beside = Path.cwd() / name, study_dir / name
    if study_dir != Path.cwd().resolve() and beside.is_file():
        _log.warning(
            "%s: storage '%s' is relative to the current directory, so the study lives in %s; "
            "a database of that name is beside the study file: %s (run from there, or give "
            "--storage sqlite:///%s)",
            source,
            url,
            here.resolve(),
            beside,
            beside,
        )


def _resolve_paths(data: dict[str, Any], base: Path, source: str) -> None:
    def resolve(value: str, field: str) -> str:
        try:
            p = Path(value).expanduser()
        except RuntimeError:  # "~name/..." for a user this machine does not know
            raise ConfigError(
                _one_line(f"{source}: {field}: cannot expand '{value}': no such user")
            ) from None
        return str(p if p.is_absolute() else base / p)

    section = data.get("data")
    if isinstance(section, dict):
        for key in ("source", "target", "target_test"):
            entry = section.get(key)
            for field in ("path", "image_folder"):
                if isinstance(entry, dict) and isinstance(entry.get(field), str):
                    entry[field] = resolve(entry[field], f"data.{key}.{field}")
    pre = data.get("pretrain")
    for field in ("cache_dir", "checkpoint"):
        if isinstance(pre, dict) and isinstance(pre.get(field), str):
            pre[field] = resolve(pre[field], f"pretrain.{field}")


def stored_config(raw: dict[str, Any], source: str, *, names: bool = True) -> StudyConfig:
    """The config a study was stored with. A field it lacks was added to tlsearch later, and the
    study ran as if it held the value that behaves as before (``LEGACY_VALUES``), not today's
    default."""
    data = copy.deepcopy(raw)
    for key, legacy in LEGACY_VALUES.items():
        section, field = key.split(".")
        table = data.setdefault(section, {})
        if isinstance(table, dict) and field not in table:
            table[field] = copy.deepcopy(legacy)
    return config_from_dict(data, source, names=names)


def adopt_stored(cfg: StudyConfig, stored: dict[str, Any] | None) -> StudyConfig:
    """``cfg`` resuming a study stored as ``stored``: each field added since the study was made
    and not set in ``cfg``'s file keeps the value the study ran with (``LEGACY_VALUES``), and so
    does each field whose default changed since (``CHANGED_DEFAULTS``) when the study holds the
    old default."""
    if not stored:
        return cfg
    for key, legacy in LEGACY_VALUES.items():
        section, field = key.split(".")
        table = getattr(cfg, section)
        if field in (stored.get(section) or {}) or field in table.model_fields_set:
            continue
        if table.model_dump(mode="json")[field] == legacy:
            continue
        table = table.model_copy(update={field: copy.deepcopy(legacy)})
        cfg = cfg.model_copy(update={section: table})
    for key, old in CHANGED_DEFAULTS.items():
        section, field = key.split(".")
        table = getattr(cfg, section)
        alias = type(table).model_fields[field].alias or field
        held = (stored.get(section) or {}).get(alias, (stored.get(section) or {}).get(field))
        if field in table.model_fields_set or held != old:
            continue
        value = StudyConfig.model_validate({section: {alias: old}})
        table = table.model_copy(update={field: getattr(getattr(value, section), field)})
        cfg = cfg.model_copy(update={section: table})
    return _unused_strengths_dropped(cfg)
