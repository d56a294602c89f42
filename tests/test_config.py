"""tlsearch.config: every bad field is a ConfigError that names it; good files load as written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import tomllib
from conftest import TINY, merge, write_toml

from tlsearch.config import (
    ParamRange,
    StudyConfig,
    adopt_stored,
    config_from_dict,
    load_config,
    parse_duration,
)
from tlsearch.errors import ConfigError
from tlsearch.registry import BlockNetOptions

REPO = Path(__file__).resolve().parents[1]
# The end of every "unknown name" error: where more names come from.
ADD_MORE = "a plug-in adds more: install its package, or pass --plugin MODULE"

# (overrides of the tiny study, a line the error must hold). The tiny model has 2 blocks.
BAD = {
    "unknown top-level key": ({"n_trails": 5}, "cfg.toml: n_trails: unknown key"),
    "unknown key in a section": (
        {"data": {"tsk": "digits-noisy"}},
        "cfg.toml: data.tsk: unknown key",
    ),
    "unknown key in search": ({"search": {"lamda": 1.0}}, "cfg.toml: search.lamda: unknown key"),
    "wrong type": ({"n_trials": "ten"}, "cfg.toml: n_trials: Input should be a valid integer"),
    "number written as a string": (
        {"cv": {"k": "3"}},
        "cfg.toml: cv.k: Input should be a valid integer",
    ),
    "float where an integer belongs": (
        {"finetune": {"epochs": 2.5}},
        "cfg.toml: finetune.epochs: Input should be a valid integer",
    ),
    "wrong type in a section": (
        {"finetune": {"epochs": [5]}},
        "cfg.toml: finetune.epochs: Input should be a valid integer",
    ),
    "negative lambda range": (
        {"search": {"lambda": {"low": -1.0, "high": 1.0, "log": False}}},
        "cfg.toml: search.lambda: must be >= 0, got -1.0",
    ),
    "negative fixed lambda": (
        {"search": {"lambda": -0.5}},
        "cfg.toml: search.lambda: must be >= 0",
    ),
    "empty range": (
        {"search": {"lr": {"low": 0.1, "high": 0.01}}},
        "cfg.toml: search.lr: empty range: low 0.1 > high 0.01",
    ),
    "log scale with low 0": (
        {"search": {"lambda": {"low": 0.0, "high": 1.0, "log": True}}},
        "cfg.toml: search.lambda: log scale needs low > 0, got 0.0",
    ),
    "log scale with negative low": (
        {"search": {"lr": {"low": -1.0, "high": 1.0, "log": True}}},
        "cfg.toml: search.lr: log scale needs low > 0, got -1.0",
    ),
    "zero lr": ({"search": {"lr": 0.0}}, "cfg.toml: search.lr: must be > 0, got 0.0"),
    "fractional frozen_blocks": (
        {"search": {"frozen_blocks": {"low": 0, "high": 1.5}}},
        "cfg.toml: search.frozen_blocks: must be whole numbers >= 0",
    ),
    "cv.k below 2": (
        {"cv": {"k": 1}},
        "cfg.toml: cv.k: Input should be greater than or equal to 2",
    ),
    "unknown regularizer": (
        {"regularizer": {"name": "l3"}},
        "cfg.toml: regularizer.name: unknown regularizer 'l3' (choose from delta, l2, l2sp, none; "
        f"{ADD_MORE})",
    ),
    "unknown regularizer in a list": (
        {"regularizer": {"name": ["l2", "bss"]}},
        "cfg.toml: regularizer.name: unknown regularizer 'bss'",
    ),
    "empty regularizer list": (
        {"regularizer": {"name": []}},
        "cfg.toml: regularizer.name: must name at least one regularizer",
    ),
    "unknown model": (
        {"model": {"name": "resnet"}},
        f"cfg.toml: model.name: unknown model 'resnet' (choose from cnn, mlp; {ADD_MORE})",
    ),
    "unknown model option": (
        {"model": {"widht": 3}},
        "cfg.toml: model.widht: unknown option for model 'mlp'",
    ),
    "bad model option": (
        {"model": {"hidden": [16, 0]}},
        "cfg.toml: model.hidden.1: Input should be greater than 0",
    ),
    "model option of the wrong type": (
        {"model": {"batch_norm": "yes"}},
        "cfg.toml: model.batch_norm: Input should be a valid boolean",
    ),
    "frozen_blocks beyond the model": (
        {"search": {"frozen_blocks": {"low": 0, "high": 3}}},
        "search.frozen_blocks: 3 exceeds the 2 blocks of model 'mlp'",
    ),
    "fixed frozen_blocks beyond the model": (
        {"search": {"frozen_blocks": 5}},
        "search.frozen_blocks: 5 exceeds the 2 blocks of model 'mlp'",
    ),
    "unknown pruner": (
        {"pruner": {"name": "bohb"}},
        "cfg.toml: pruner.name: unknown pruner 'bohb' "
        "(choose from hyperband, median, none, percentile, successive_halving, wilcoxon; "
        f"{ADD_MORE})",
    ),
    "unknown sampler": (
        {"sampler": {"name": "bohb"}},
        f"cfg.toml: sampler.name: unknown sampler 'bohb' (choose from cmaes, gp, qmc, random, tpe; "
        f"{ADD_MORE})",
    ),
    "unknown task": (
        {"data": {"task": "cifar"}},
        "cfg.toml: data.task: unknown task 'cifar' (choose from digits-noisy, digits-split, "
        "mnist-inverted, mnist-noisy, mnist-occluded, mnist-rotated, mnist-split; "
        f"{ADD_MORE})",
    ),
    "source without target": (
        {"data": {"source": {"path": "a.npz"}}},
        "cfg.toml: data: set 'target' too: a source alone has nothing to transfer to",
    ),
    "data file of unknown kind": (
        {"data": {"source": {"path": "/d/a.txt"}, "target": {"path": "/d/b.npz"}}},
        "cfg.toml: data.source.path: '/d/a.txt' must end in .npz, .csv or .parquet",
    ),
    "negative shots": ({"data": {"shots": -1}}, "cfg.toml: data.shots: Input should be greater"),
    "no n_trials and no timeout": (
        {"n_trials": None},
        "n_trials: set n_trials or timeout, or the study never ends",
    ),
}


@pytest.mark.parametrize("overrides, line", BAD.values(), ids=BAD.keys())
def test_bad_field_is_named(overrides: dict, line: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(merge(TINY, overrides), "cfg.toml")
    lines = str(info.value).splitlines()
    assert any(line in ln for ln in lines), lines
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "overrides, line",
    [v for k, v in BAD.items() if k != "no n_trials and no timeout"],
    ids=[k for k in BAD if k != "no n_trials and no timeout"],
)
def test_bad_field_in_a_file(tmp_path: Path, overrides: dict, line: str) -> None:
    path = write_toml(tmp_path / "cfg.toml", merge(TINY, overrides))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # The file is named by the path the user gave.
    expected = line.replace("cfg.toml", str(path))
    assert any(expected in ln for ln in str(info.value).splitlines()), str(info.value)


def test_every_problem_gets_its_own_line() -> None:
    data = {"nme": "x", "data": {"tsk": 1}, "cv": {"k": 0}, "regularizer": {"name": "l3"}}
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "s.toml")
    lines = str(info.value).splitlines()
    assert "s.toml: nme: unknown key" in lines
    assert "s.toml: data.tsk: unknown key" in lines
    assert "s.toml: cv.k: Input should be greater than or equal to 2" in lines
    assert any(ln.startswith("s.toml: regularizer.name: unknown regularizer 'l3'") for ln in lines)
    assert len(lines) == len(set(lines)) == 4


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found$"):
        load_config(path)


def test_malformed_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[data\ntask = 1\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: invalid TOML: .*line 2"):
        load_config(path)


@pytest.mark.parametrize("kind", ["directory", "not utf-8"])
def test_unreadable_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "study.toml"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_bytes(b'name = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match=r"study\.toml: cannot read: "):
        load_config(path)


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    cfg = load_config(path)
    assert cfg == load_config() == config_from_dict({})
    # The schema's defaults, and the default model's options filled in from its registry entry
    # (a bare StudyConfig() leaves them unvalidated).
    assert {**cfg.to_dict(), "model": None} == {**StudyConfig().to_dict(), "model": None}
    assert cfg.model.name == StudyConfig().model.name == "cnn"
    assert cfg.model.options == BlockNetOptions().model_dump()


def test_shipped_study_file_loads() -> None:
    cfg = load_config(REPO / "studies" / "digits.toml")
    assert cfg.name == "digits"
    assert cfg.regularizer.names == ["l2sp"]
    assert cfg.search.lambda_ == ParamRange(low=1e-4, high=100.0, log=True)
    assert cfg.cv.k == 5
    # README's first command runs today's defaults where they changed: the file leaves them unset,
    # so a digits study made before keeps its own when resumed (CHANGED_DEFAULTS).
    assert cfg.search.backbone_lr_mult == StudyConfig().search.backbone_lr_mult
    assert cfg.pruner.name == StudyConfig().pruner.name == "successive_halving"
    old = adopt_stored(cfg, {"search": {"backbone_lr_mult": 0.1}, "pruner": {"name": "median"}})
    assert (old.search.backbone_lr_mult, old.pruner.name) == (0.1, "median")


def test_overrides_win_and_none_is_ignored(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "s.toml", {"name": "a", "n_trials": 7})
    cfg = load_config(path, name="b", n_trials=None, storage="sqlite:///x.db", timeout=None)
    assert (cfg.name, cfg.n_trials, cfg.storage) == ("b", 7, "sqlite:///x.db")
    with pytest.raises(ConfigError, match=r"n_trials: Input should be greater than or equal to 1"):
        load_config(path, n_trials=0)


def test_relative_paths_are_relative_to_the_study_file(tmp_path: Path) -> None:
    sub = tmp_path / "studies"
    sub.mkdir()
    path = write_toml(
        sub / "s.toml",
        {
            "data": {"source": {"path": "src.npz"}, "target": {"path": "/abs/tgt.csv"}},
            "pretrain": {"cache_dir": "cache"},
        },
    )
    cfg = load_config(path)
    assert cfg.data.source.path == sub / "src.npz"
    assert cfg.data.target.path == Path("/abs/tgt.csv")
    assert cfg.data.task is None
    assert cfg.pretrain.cache_dir == sub / "cache"


def test_paths_of_a_study_file_named_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The resolved config is stored with the study and in exports, and read by `tlsearch final`
    # and by workers in other directories: its paths must not depend on the working directory.
    write_toml(
        tmp_path / "s.toml",
        {
            "data": {"source": {"path": "src.npz"}, "target": {"path": "t.npz"}},
            "pretrain": {"cache_dir": "cache"},
        },
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config("s.toml")
    assert cfg.pretrain.cache_dir == tmp_path / "cache"
    assert cfg.data.source.path == tmp_path / "src.npz"


def test_to_dict_round_trips_with_user_names() -> None:
    cfg = config_from_dict(TINY)
    d = cfg.to_dict()
    assert "lambda" in d["search"] and "lambda_" not in d["search"]
    assert config_from_dict(d) == cfg


def test_search_hash_ignores_budget_and_storage_only() -> None:
    base = config_from_dict(TINY).search_hash()
    same = config_from_dict(
        merge(
            TINY,
            {
                "name": "other",
                "n_trials": 99,
                "storage": "sqlite:///o.db",
                "finetune": {"threads": 2},
                "pretrain": {"cache_dir": "/elsewhere"},
            },
        )
    )
    assert same.search_hash() == base
    for changed in (
        {"cv": {"k": 3}},
        {"finetune": {"epochs": 6}},
        {"regularizer": {"name": "l2"}},
    ):
        assert config_from_dict(merge(TINY, changed)).search_hash() != base, changed


def test_every_name_problem_gets_its_own_line() -> None:
    data = merge(
        TINY,
        {
            "model": {"widht": 3},
            "regularizer": {"name": ["l2", "l3"]},
            "sampler": {"name": "bohb"},
        },
    )
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, "s.toml")
    lines = str(info.value).splitlines()
    assert "s.toml: model.widht: unknown option for model 'mlp'" in lines
    assert any(ln.startswith("s.toml: regularizer.name: unknown regularizer 'l3'") for ln in lines)
    assert any(ln.startswith("s.toml: sampler.name: unknown sampler 'bohb'") for ln in lines)
    assert len(lines) == 3, lines


def test_loaded_model_options_are_complete() -> None:
    # The stored config says exactly which network every trial trained.
    cfg = config_from_dict(merge(TINY, {"model": {"hidden": [8, 4]}}))
    assert cfg.model.options == {**BlockNetOptions().model_dump(), "hidden": [8, 4]}
    assert config_from_dict(cfg.to_dict()) == cfg


# ---------------------------------------------------------------------------------------------
# The search hash: which stored study a config may resume

V0_1 = REPO / "tests" / "fixtures" / "v0_1" / "study.toml"
# The hash tlsearch 0.1 stored with the study in study.db beside V0_1 (its user attribute
# tlsearch_search_hash), computed by that version's code.
V0_1_HASH = "064500ba2b382ef9"


def test_search_hash_is_versioned() -> None:
    cfg = config_from_dict(TINY)
    version, _, digest = cfg.search_hash().partition(":")
    assert version == "2"
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert cfg.hash_matches(cfg.search_hash())
    assert not cfg.hash_matches(f"3:{digest}")
    assert not cfg.hash_matches(digest)  # the same digits unversioned are another formula


def test_search_hash_ignores_speed_only_settings() -> None:
    base = config_from_dict(TINY)
    for speed in (
        {"finetune": {"cache_frozen": False}},
        {"finetune": {"fold_batching": "off"}},
        {"finetune": {"cache_frozen": False, "fold_batching": "off"}},
    ):
        cfg = config_from_dict(merge(TINY, speed))
        assert cfg.search_hash() == base.search_hash(), speed
        assert cfg.hash_matches(base.search_hash()), speed


# What tlsearch 0.1 stored with a study: none of the fields added since.
# What the 0.1 study stored (tests/fixtures/v0_1/study.db holds all of it), as far as resuming
# reads it: the backbone's learning-rate multiplier was fixed at 0.1 then.
V0_1_STORED = {"name": "legacy", "cv": {"k": 2}, "search": {"backbone_lr_mult": 0.1}}


def _resumed(path: Path, **overrides: Any) -> StudyConfig:
    """The study file's config as it resumes the 0.1 study (the fields added since keep 0.1's
    behaviour for it)."""
    return adopt_stored(load_config(path, **overrides), V0_1_STORED)


def test_hash_of_tlsearch_0_1_is_accepted() -> None:
    cfg = _resumed(V0_1)
    assert cfg.hash_matches(V0_1_HASH)
    assert (cfg.cv.metric, cfg.cv.repeats, cfg.search.baselines) == ("accuracy", 1, [])
    # Where the study runs and for how long is not part of it, in either version.
    moved = _resumed(V0_1, name="elsewhere", storage="sqlite:///other.db", n_trials=9)
    assert moved.hash_matches(V0_1_HASH)
    # Today's defaults for the new fields are another study.
    assert not load_config(V0_1).hash_matches(V0_1_HASH)


@pytest.mark.parametrize(
    "changed",
    [
        {"finetune": {"epochs": 3}},
        {"cv": {"k": 3}},
        {"model": {"hidden": [16, 8]}},
        {"regularizer": {"name": "l2"}},
        {"search": {"lr": 0.01}},
        # Version 1 covered the speed-only settings too: a 0.1 study changed there was another.
        {"finetune": {"cache_frozen": False}},
    ],
    ids=["epochs", "k", "model", "regularizer", "search", "speed-only (v1)"],
)
def test_changed_config_does_not_match_the_0_1_hash(tmp_path: Path, changed: dict) -> None:
    with V0_1.open("rb") as f:
        data = tomllib.load(f)
    path = write_toml(tmp_path / "study.toml", merge(data, changed))
    assert _resumed(V0_1).hash_matches(V0_1_HASH)  # the unchanged file does
    assert not _resumed(path).hash_matches(V0_1_HASH)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("45", 45.0)]
)
def test_timeout_takes_a_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert config_from_dict({"timeout": text}).timeout == seconds


def test_timeout_that_is_no_duration_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"timeout": "ten minutes"})
    assert str(err.value) == (
        "config: timeout: expected seconds or a duration such as 90s, 10m, 2h; got 'ten minutes'"
    )


def test_relative_sqlite_beside_the_study_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "own").mkdir()
    study_file = tmp_path / "own" / "own.toml"
    study_file.write_text('storage = "sqlite:///own.db"\n')
    (tmp_path / "own" / "own.db").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.WARNING, logger="tlsearch")
    cfg = load_config("own/own.toml")
    assert cfg.storage == "sqlite:///own.db"  # SQLAlchemy's meaning is kept
    (message,) = caplog.messages
    assert str(tmp_path / "own.db") in message and str(tmp_path / "own" / "own.db") in message
    # From the study's own folder, or with --storage, nothing to say.
    caplog.clear()
    monkeypatch.chdir(tmp_path / "own")
    load_config("own.toml")
    monkeypatch.chdir(tmp_path)
    load_config("own/own.toml", storage="sqlite:///other.db")
    assert not caplog.messages
