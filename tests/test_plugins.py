"""Plug-ins as users add them: an installed distribution's entry point, and ``--plugin`` modules.

Real processes and real entry points, nothing mocked. ``tests/plugins/site`` holds a plug-in
distribution as ``pip install`` would leave it (a package and its ``.dist-info`` with
``entry_points.txt``); a test puts that folder on the subprocess's ``PYTHONPATH``, never into this
environment. ``tests/plugins/myplug.py`` is a user's own module, copied into the working directory.

And the one rule: code is imported only from entry points and from modules the user names on the
command line or in ``$TLSEARCH_PLUGINS`` — never because a study file or a database names something.
``tests/plugins/tlsearch_evil.py`` leaves a marker file when imported; it never may be.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import TINY, merge, start_cli, write_toml
from optuna.trial import TrialState

from tlsearch.config import config_from_dict
from tlsearch.errors import ConfigError
from tlsearch.registry import MODELS, Registry, load_plugins, loaded_plugins
from tlsearch.storage import ATTR_CHECKPOINT, ATTR_CONFIG, ATTR_SOURCE

PLUGINS = Path(__file__).parent / "plugins"
SITE = PLUGINS / "site"  # the installed distribution tlsearch-tinyplug 0.1: model "tinyplug"
BROKEN_SITE = PLUGINS / "broken-site"  # tlsearch-brokenplug 0.1, whose import fails
LEGACY = Path(__file__).parent / "fixtures" / "v0_1"  # a finished study 'legacy', model mlp

HOW_TO_ADD = "a plug-in adds more: install its package, or pass --plugin MODULE"
# frozen_blocks up to 3: valid for a model of 3 blocks or more.
FROZEN_3 = merge(TINY["search"], {"frozen_blocks": {"low": 0, "high": 3}})
# The commands that read a study's results, and take no --plugin: command → its other arguments.
READERS = {"export": ["-o", "best.json"], "status": []}


def _study(tmp: Path, model: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The tiny study with ``model`` as its whole [model] table, storage and cache in ``tmp``."""
    data = merge(
        TINY,
        {
            "n_trials": 2,
            "storage": f"sqlite:///{tmp / 'study.db'}",
            "pretrain": {"epochs": 1, "cache_dir": "cache"},
            "finetune": {"epochs": 2},
            **overrides,
        },
    )
    data["model"] = model
    return data


def _installed(*sites: Path) -> dict[str, str]:
    """The environment of a process that has these plug-in distributions installed."""
    paths = [str(s) for s in sites] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def _run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    proc = start_cli(*args, cwd=cwd, env=env)
    return _wait(proc, args)


def _wait(proc: subprocess.Popen[str], args: Any) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"tlsearch {' '.join(args)} timed out:\n{err}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr


def _one_error(result: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single ``tlsearch: error:`` line a failed command printed (and nothing else)."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tlsearch: error: "), lines
    return lines[0].removeprefix("tlsearch: error: ")


def _complete(tmp: Path) -> list[optuna.trial.FrozenTrial]:
    """The study's complete trials; every other one is still waiting (queued), none failed."""
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp / 'study.db'}")
    trials = study.get_trials(deepcopy=False)
    others = [t.state for t in trials if t.state != TrialState.COMPLETE]
    assert set(others) <= {TrialState.WAITING}, others
    return [t for t in trials if t.state == TrialState.COMPLETE]


def _builders(log: Path, model: str) -> set[int]:
    """The processes that built ``model``, from the log the test plug-ins append to."""
    lines = log.read_text().splitlines() if log.exists() else []
    return {int(line.split()[1]) for line in lines if line.split()[0] == model}


def _pid(trial: optuna.trial.FrozenTrial) -> int:
    return int(trial.user_attrs["worker"].rpartition(":")[2])


# --- an installed distribution's entry point ------------------------------------------------------


def test_an_installed_plugin_model_runs_in_tlsearch_worker_and_spawned_workers(
    tmp_path: Path,
) -> None:
    builds = tmp_path / "builds.txt"
    env = {**_installed(SITE), "TLSEARCH_TEST_BUILDS": str(builds)}
    write_toml(
        tmp_path / "study.toml", _study(tmp_path, {"name": "tinyplug", "width": 8}, n_trials=3)
    )

    # `create` pretrains the plug-in's model; a `tlsearch worker` then runs one trial of it.
    _ok(_run("-q", "create", "study.toml", cwd=tmp_path, env=env))
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert study.user_attrs[ATTR_CONFIG]["model"] == {"name": "tinyplug", "width": 8}
    state = torch.load(study.user_attrs[ATTR_CHECKPOINT]["path"], weights_only=True)
    assert state["blocks.0.1.weight"].shape == (8, 64), "the plug-in's network, 8 units wide"
    url = f"sqlite:///{tmp_path / 'study.db'}"
    worker = ("-q", "worker", "--storage", url, "--study-name", "tiny")
    _ok(_run(*worker, "--n-trials", "1", cwd=tmp_path, env=env))
    (first,) = _complete(tmp_path)
    assert _pid(first) in _builders(builds, "tinyplug")

    # `run --workers 2`: each spawned worker finds the entry point itself and builds the model.
    _ok(_run("-q", "run", "study.toml", "--workers", "2", cwd=tmp_path, env=env))
    trials = _complete(tmp_path)
    assert len(trials) == 3 and len(study.get_trials(deepcopy=False)) == 3
    spawned = {_pid(t) for t in trials[1:]}
    assert spawned <= _builders(builds, "tinyplug"), builds.read_text()

    # Without the distribution, a worker cannot build the study's model: one line says so.
    line = _one_error(_run(*worker, cwd=tmp_path))
    assert line == (
        f"study 'tiny': model.name: unknown model 'tinyplug' (choose from cnn, mlp; {HOW_TO_ADD})"
    )
    assert len(_complete(tmp_path)) == 3


# --- a --plugin module ----------------------------------------------------------------------------


def test_a_plugin_module_named_on_the_command_line_or_in_the_environment(tmp_path: Path) -> None:
    builds = tmp_path / "builds.txt"
    env = {"TLSEARCH_TEST_BUILDS": str(builds)}
    shutil.copy(PLUGINS / "myplug.py", tmp_path)
    # Three blocks, so frozen_blocks may reach 3: the plug-in's own block count is used.
    model = {"name": "myplug", "depth": 3, "width": 4}
    write_toml(tmp_path / "study.toml", _study(tmp_path, model, search=FROZEN_3))

    # A dotted name, from the working directory; spawned workers import it again themselves.
    args = ("-q", "run", "study.toml")
    _ok(_run(*args, "--plugin", "myplug", "--workers", "2", cwd=tmp_path, env=env))
    trials = _complete(tmp_path)
    assert len(trials) == 2
    assert {_pid(t) for t in trials} <= _builders(builds, "myplug"), builds.read_text()

    # A path; then $TLSEARCH_PLUGINS. Each resumes the same study (same config, same hash).
    _ok(_run(*args, "--n-trials", "3", "--plugin", "./myplug.py", cwd=tmp_path, env=env))
    env_plugin = {**env, "TLSEARCH_PLUGINS": "myplug"}
    _ok(_run(*args, "--n-trials", "4", cwd=tmp_path, env=env_plugin))
    trials = _complete(tmp_path)
    assert len(trials) == 4
    assert {_pid(t) for t in trials} <= _builders(builds, "myplug")

    # Reading the results needs no plug-in: export and status take no --plugin.
    url = f"sqlite:///{tmp_path / 'study.db'}"
    where = ("--storage", url, "--study-name", "tiny")
    started = [start_cli(c, *where, *extra, cwd=tmp_path) for c, extra in READERS.items()]
    export, status = (_wait(proc, "export or status") for proc in started)
    assert (export.returncode, status.returncode) == (0, 0), export.stderr + status.stderr
    assert json.loads((tmp_path / "best.json").read_text())["config"]["model"] == model
    assert "trials: 4 complete" in status.stdout


# --- faults: one line, exit 2, nothing created ----------------------------------------------------


def _copy(*names: str) -> Any:
    def setup(d: Path) -> None:
        for name in names:
            shutil.copy(PLUGINS / name, d)

    return setup


def _legacy_naming(**names: str) -> Any:
    """The legacy study's database with its stored config naming ``names`` (field → name)."""

    def setup(d: Path) -> None:
        shutil.copy(LEGACY / "study.db", d)
        study = optuna.load_study(study_name="legacy", storage=f"sqlite:///{d / 'study.db'}")
        config = study.user_attrs[ATTR_CONFIG]
        for field, name in names.items():
            section, key = field.split(".")
            config[section][key] = name
        study.set_user_attr(ATTR_CONFIG, config)

    return setup


EVIL = "tlsearch_evil"
EVIL_NAMES = {
    "model.name": f"{EVIL}:build",
    "regularizer.name": EVIL,
    "data.task": EVIL,
    "sampler.name": f"{EVIL}:build",
    "pruner.name": EVIL,
}
LEGACY_WHERE = ("--storage", "sqlite:///study.db", "--study-name", "legacy")


class _Payload:
    """Pickled into a checkpoint: ``weights_only=True`` must refuse it, never run it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("a pickled payload ran",))


def _checkpoint(content: Any) -> Any:
    """Writes ``source.pt`` (``pretrain.checkpoint`` of the case's study): ``content()`` saved."""

    def setup(d: Path) -> None:
        torch.save(content(), d / "source.pt")

    return setup


def _mlp_state(hidden: list[int], prefix: str = "") -> dict[str, torch.Tensor]:
    from tlsearch.models import mlp

    return {prefix + k: v for k, v in mlp((1, 8, 8), 5, hidden).state_dict().items()}


def _legacy_source(**record: Any) -> Any:
    """The legacy study's database with a source record (``ATTR_SOURCE``) of ``record``."""

    def setup(d: Path) -> None:
        shutil.copy(LEGACY / "study.db", d)
        study = optuna.load_study(study_name="legacy", storage=f"sqlite:///{d / 'study.db'}")
        study.set_user_attr(ATTR_SOURCE, record)

    return setup


FROM_CHECKPOINT = {"pretrain": {"epochs": 1, "cache_dir": "cache", "checkpoint": "source.pt"}}

# id → (the tiny study's [model] table or other overrides, working-directory setups, arguments,
# environment, the one error line expected or None when several are).
CASES: dict[str, tuple[dict[str, Any], list[Any], list[str], dict[str, str], str | None]] = {
    "unknown model, installed and --plugin names offered": (
        {"model": {"name": "resnet"}},
        [_copy("myplug.py")],
        ["run", "study.toml", "--plugin", "myplug"],
        _installed(SITE),
        "study.toml: model.name: unknown model 'resnet' (choose from cnn, mlp, myplug, tinyplug; "
        f"{HOW_TO_ADD})",
    ),
    "unknown option of a plug-in model": (
        {"model": {"name": "tinyplug", "hidden": [32, 16]}},
        [],
        ["run", "study.toml", "--workers", "2"],
        _installed(SITE),
        "study.toml: model.hidden: unknown option for model 'tinyplug'",
    ),
    "frozen_blocks beyond a plug-in model's blocks": (
        {"model": {"name": "myplug", "depth": 2}, "search": FROZEN_3},
        [_copy("myplug.py")],
        ["run", "study.toml", "--plugin", "./myplug.py"],
        {},
        "study.toml: search.frozen_blocks: 3 exceeds the 2 blocks of model 'myplug'",
    ),
    "a --plugin module that raises on import": (
        {},
        [_copy("broken_plugin.py")],
        ["run", "study.toml", "--plugin", "broken_plugin"],
        {},
        "--plugin: broken_plugin: failed to import: RuntimeError: myplug's settings are "
        "missing; set MYPLUG_HOME first",
    ),
    "a --plugin path that does not exist": (
        {},
        [],
        ["create", "study.toml", "--plugin", "./nowhere.py"],
        {},
        "--plugin: ./nowhere.py: file not found",
    ),
    "a --plugin module that does not exist": (
        {},
        [],
        ["run", "study.toml"],
        {"TLSEARCH_PLUGINS": "nowhere"},
        "--plugin: nowhere: failed to import: ModuleNotFoundError: No module named 'nowhere'",
    ),
    "an installed plug-in whose import fails": (
        {},
        [],
        ["run", "study.toml"],
        _installed(BROKEN_SITE),
        "study.toml: plug-in tlsearch-brokenplug 0.1: entry point 'brokenplug' in group "
        "tlsearch.models failed to import: ModuleNotFoundError: No module named "
        "'tlsearch_brokenplug_missing_dependency'",
    ),
    "a checkpoint whose names do not fit the model": (
        FROM_CHECKPOINT,
        [_checkpoint(lambda: _mlp_state([32, 16], prefix="module."))],
        ["run", "study.toml", "-q"],
        {},
        "pretrain.checkpoint: no parameter of model 'mlp' matches the file in name and shape: "
        "4 missing (blocks.0.1.weight, blocks.0.1.bias, blocks.1.0.weight, blocks.1.0.bias); "
        "6 unexpected (module.blocks.0.1.weight, module.blocks.0.1.bias, "
        "module.blocks.1.0.weight, module.blocks.1.0.bias, … 2 more)",
    ),
    "a checkpoint whose shapes do not fit the model": (
        FROM_CHECKPOINT,
        [_checkpoint(lambda: _mlp_state([32, 8]))],
        ["create", "study.toml"],
        {},
        "pretrain.checkpoint: the file does not fit model 'mlp': 2 shape mismatch "
        "(blocks.1.0.weight [8, 32] ≠ [16, 32], blocks.1.0.bias [8] ≠ [16]); fix the model "
        "options or the key names, or set pretrain.strict = false to load what matches",
    ),
    "a checkpoint that is not a state dict": (
        FROM_CHECKPOINT,
        [_checkpoint(lambda: {"model": _mlp_state([32, 16]), "epoch": 3})],
        ["run", "study.toml", "-q"],
        {},
        "pretrain.checkpoint: {d}/source.pt is not a state dict: 2 of its entries are not "
        "name → tensor (model, epoch); if the state dict is under 'model', save that entry alone",
    ),
    "a checkpoint holding a pickled payload": (
        FROM_CHECKPOINT,
        [_checkpoint(lambda: {"blocks.0.1.weight": _Payload()})],
        ["run", "study.toml", "-q"],
        {},
        "pretrain.checkpoint: {d}/source.pt is not a plain PyTorch state dict (it holds pickled "
        "objects, which weights_only=True refuses to run)",
    ),
    "a worker lacking the study's plug-in": (
        {},
        [_legacy_naming(**{"model.name": "tinyplug"})],
        ["worker", *LEGACY_WHERE],
        {},
        "study 'legacy': model.name: unknown model 'tinyplug' (choose from cnn, mlp; "
        f"{HOW_TO_ADD})",
    ),
    "a worker holding another version of the study's plug-in": (
        {},
        [_legacy_source(model="mlp", model_origin="tlsearch-mlp 0.0.9", checkpoint=None)],
        ["worker", *LEGACY_WHERE],
        {},
        "model.name: the study's model 'mlp' came from tlsearch-mlp 0.0.9; this worker has it "
        "from tlsearch (install the study's version on this host)",
    ),
    # The working directory is on the path (--plugin myplug), and holds tlsearch_evil.py.
    "a study file naming an importable module": (
        {
            "model": {"name": EVIL_NAMES["model.name"]},
            "regularizer": {"name": EVIL},
            "data": {"task": EVIL},
            "sampler": {"name": EVIL_NAMES["sampler.name"]},
            "pruner": {"name": EVIL},
        },
        [_copy("myplug.py", f"{EVIL}.py")],
        ["run", "study.toml", "--plugin", "myplug"],
        {},
        None,
    ),
    "a database naming an importable module, opened by worker": (
        {},
        [_copy(f"{EVIL}.py"), _legacy_naming(**EVIL_NAMES)],
        ["worker", *LEGACY_WHERE],
        {},
        None,
    ),
    **{
        f"a database naming an importable module, opened by {command}": (
            {},
            [_copy(f"{EVIL}.py"), _legacy_naming(**EVIL_NAMES)],
            [command, *LEGACY_WHERE, *extra],
            {},
            None,
        )
        for command, extra in READERS.items()
    },
}


@pytest.fixture(scope="module")
def faults(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every case of :data:`CASES`, started at once (each process imports torch: seconds)."""
    root = tmp_path_factory.mktemp("plugin-faults")
    started = {}
    for i, (case_id, (overrides, setups, args, env, _)) in enumerate(CASES.items()):
        d = root / f"case{i}"
        d.mkdir()
        others = {k: v for k, v in overrides.items() if k != "model"}
        write_toml(d / "study.toml", _study(d, overrides.get("model", TINY["model"]), **others))
        for setup in setups:
            setup(d)
        started[case_id] = (d, args, start_cli(*args, cwd=d, env=env))
    return {case_id: (d, _wait(proc, args)) for case_id, (d, args, proc) in started.items()}


@pytest.mark.parametrize("case_id", [c for c, case in CASES.items() if case[4] is not None])
def test_a_plugin_fault_is_one_line(faults, case_id: str) -> None:
    d, result = faults[case_id]
    assert _one_error(result) == CASES[case_id][4].replace("{d}", str(d))
    assert "a pickled payload ran" not in result.stdout + result.stderr
    if case_id.startswith("a worker"):  # the study is there; nothing is added to it
        study = optuna.load_study(study_name="legacy", storage=f"sqlite:///{d / 'study.db'}")
        assert len(study.trials) == 2
        return
    assert not (d / "study.db").exists(), "no database is created"
    assert not (d / "cache").exists(), "nothing is pretrained"


def test_a_study_file_never_imports_what_it_names(faults) -> None:
    d, result = faults["a study file naming an importable module"]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    for field, name in EVIL_NAMES.items():
        kind = field.split(".")[0].replace("data", "task")
        assert f"tlsearch: error: study.toml: {field}: unknown {kind} '{name}' (choose from" in (
            "\n".join(lines)
        ), lines
    assert not (d / "evil-was-imported").exists()
    assert not (d / "study.db").exists()


@pytest.mark.parametrize("command", ["worker", *READERS])
def test_a_database_never_imports_what_it_names(faults, command: str) -> None:
    d, result = faults[f"a database naming an importable module, opened by {command}"]
    assert "Traceback" not in result.stderr
    assert not (d / "evil-was-imported").exists()
    if command == "worker":
        assert result.returncode == 2, result.stderr
        assert f"model.name: unknown model '{EVIL}:build'" in result.stderr


def test_checking_names_imports_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registries only look names up: validating a study file calls no import machinery."""
    MODELS.names()  # installed entry points load here, before the names are looked up
    calls: list[str] = []
    real = importlib.import_module

    def recording(name: str, package: str | None = None) -> Any:
        calls.append(name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", recording)
    data = merge(
        TINY,
        {
            "data": {"task": "os:system"},
            "regularizer": {"name": "tlsearch_evil"},
            "sampler": {"name": "subprocess:run"},
            "pruner": {"name": "shutil:rmtree"},
        },
    )
    data["model"] = {"name": "os:system", "hidden": [1]}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data, "study.toml")
    assert calls == []
    assert len(str(err.value).splitlines()) == 5
    assert "study.toml: model.name: unknown model 'os:system'" in str(err.value)


def test_a_plugin_cannot_take_a_built_in_name(tmp_path: Path) -> None:
    plugin = tmp_path / "takes_mlp.py"
    plugin.write_text(
        "from tlsearch.registry import MODELS\n"
        "MODELS.register('mlp', 'takes_mlp:build', blocks=lambda options: 1)\n"
    )
    with pytest.raises(ConfigError) as err:
        load_plugins([str(plugin)], environ={})
    assert str(err.value) == f"model 'mlp' is registered twice (tlsearch; plug-in {plugin})"
    assert MODELS.get("mlp").origin == "tlsearch"
    assert str(plugin) not in loaded_plugins()


def test_an_entry_point_naming_a_builder_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its object must be an Entry or a module that registers entries; a function is a slip that
    would otherwise surface only as an unknown model."""
    monkeypatch.syspath_prepend(str(PLUGINS / "wrong-site"))
    models = Registry("model", "model.name", group="tlsearch.models")
    with pytest.raises(ConfigError) as err:
        models.names()
    assert str(err.value) == (
        "plug-in tlsearch-wrongplug 0.1: entry point 'wrongplug' in group tlsearch.models: "
        "tlsearch_wrongplug:build is a function, not a tlsearch.registry.Entry or a module that "
        "registers its entries"
    )
