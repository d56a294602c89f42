"""Starting from the user's own checkpoint (``pretrain.checkpoint``) instead of pretraining.

The file is a state dict of the study's model, read with ``weights_only=True``; names go through
the model entry's key adapter, the head is replaced, and a file that does not fit is one
ConfigError line listing the first few missing, unexpected and mis-shaped keys. Its SHA-256 and
the model's origin are recorded with the study, and a worker checks both.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from conftest import FAST, merge

from tlsearch.config import config_from_dict
from tlsearch.data import load_task
from tlsearch.errors import ConfigError
from tlsearch.models import create_model
from tlsearch.pretrain import read_state_dict, user_checkpoint
from tlsearch.storage import ATTR_CHECKPOINT, ATTR_SOURCE
from tlsearch.study import run_study
from tlsearch.workers import join_study

MODEL = {"name": "mlp", "hidden": [16, 16]}


def _model_state(hidden: list[int], seed: int = 1) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    cfg = config_from_dict({"model": {"name": "mlp", "hidden": hidden}, "search": FAST["search"]})
    return create_model(cfg.model, (1, 8, 8), 3).state_dict()


def _cfg(tmp_path: Path, checkpoint: Path, **pretrain: Any) -> Any:
    return config_from_dict(
        merge(
            FAST,
            {
                "n_trials": 3,
                "storage": f"sqlite:///{tmp_path / 'study.db'}",
                "model": MODEL,
                "pretrain": {
                    "checkpoint": str(checkpoint),
                    "cache_dir": str(tmp_path / "cache"),
                    **pretrain,
                },
            },
        )
    )


def _pretrained_study(tmp_path: Path) -> tuple[Any, optuna.Study]:
    """A finished study of 2 trials that pretrained its own checkpoint, and its config."""
    cfg = config_from_dict(
        merge(
            FAST,
            {
                "n_trials": 2,
                "storage": f"sqlite:///{tmp_path / 'study.db'}",
                "pretrain": {"cache_dir": str(tmp_path / "cache")},
            },
        )
    )
    return cfg, run_study(cfg)


class _Payload:
    """A pickled object: ``weights_only=True`` must refuse it, never run it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("this must never print",))


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (lambda: torch.zeros(3), "holds a Tensor, not a state dict"),
        (lambda: {"state_dict": {}, "epoch": 3}, "if the state dict is under 'state_dict'"),
        (lambda: {"w": _Payload()}, "holds pickled objects, which weights_only=True refuses"),
        (None, "torch.load cannot read it"),
    ],
    ids=["tensor", "nested", "pickled", "not torch"],
)
def test_a_file_that_is_not_a_state_dict_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: Any, says: str
) -> None:
    path = tmp_path / "source.pt"
    if content is None:
        path.write_text("hello")
    else:
        torch.save(content(), path)
    with pytest.raises(ConfigError) as err:
        read_state_dict(path)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"pretrain.checkpoint: {path} ") and says in line, line
    assert "must never print" not in capsys.readouterr().out


def test_keys_and_shapes_that_do_not_fit_are_one_error_listing_them(tmp_path: Path) -> None:
    prefixed = tmp_path / "prefixed.pt"
    torch.save({f"module.{k}": v for k, v in _model_state([16, 16]).items()}, prefixed)
    cfg = _cfg(tmp_path, prefixed)
    task = load_task(cfg.data)
    with pytest.raises(ConfigError) as err:
        user_checkpoint(cfg, task)
    (line,) = str(err.value).splitlines()
    assert line.startswith(
        "pretrain.checkpoint: no parameter of model 'mlp' matches the file in name and shape: "
        "4 missing (blocks.0.1.weight, blocks.0.1.bias, blocks.1.0.weight, blocks.1.0.bias); "
        "6 unexpected (module.blocks.0.1.weight"
    ), line
    assert line.endswith("… 2 more)"), line

    narrow = tmp_path / "narrow.pt"
    torch.save(_model_state([16, 8]), narrow)
    with pytest.raises(ConfigError) as err:
        user_checkpoint(_cfg(tmp_path, narrow), task)
    assert str(err.value) == (
        "pretrain.checkpoint: the file does not fit model 'mlp': 2 shape mismatch "
        "(blocks.1.0.weight [8, 16] ≠ [16, 16], blocks.1.0.bias [8] ≠ [16]); fix the model "
        "options or the key names, or set pretrain.strict = false to load what matches"
    )
    assert not (tmp_path / "cache").exists(), "nothing written for a refused file"


def test_strict_false_loads_what_fits_and_says_what_starts_from_the_init(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    narrow = tmp_path / "narrow.pt"
    state = _model_state([16, 8])
    torch.save(state, narrow)
    cfg = _cfg(tmp_path, narrow, strict=False, seed=7)
    task = load_task(cfg.data)
    with caplog.at_level(logging.WARNING, logger="tlsearch"):
        ckpt, user_sha = user_checkpoint(cfg, task)
    fitted = torch.load(ckpt.path, weights_only=True)
    assert torch.equal(fitted["blocks.0.1.weight"], state["blocks.0.1.weight"]), "loaded"
    torch.manual_seed(7)
    init = create_model(cfg.model, task.input_shape, task.target_classes).state_dict()
    assert torch.equal(fitted["blocks.1.0.weight"], init["blocks.1.0.weight"]), "model's init"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 shape mismatch: blocks.1.0.weight [8, 16] ≠ [16, 16]" in warning
    assert "start from the model's own initialisation, which the penalties also pull" in warning
    assert user_sha == __import__("hashlib").sha256(narrow.read_bytes()).hexdigest()
    again, _ = user_checkpoint(cfg, task)
    assert again == ckpt, "fitted once, then read from the cache"


def test_a_study_records_the_file_and_a_worker_checks_its_copy(tmp_path: Path) -> None:
    source = tmp_path / "mine" / "source.pt"
    source.parent.mkdir()
    torch.save(_model_state([16, 16]), source)
    cfg = _cfg(tmp_path, source)
    study = run_study(cfg)
    assert len(study.trials) == 3
    record = study.user_attrs[ATTR_SOURCE]
    sha = record["checkpoint"]["sha256"]
    assert record["checkpoint"] == {"path": str(source), "sha256": sha, "strict": True}
    assert record["model"] == "mlp" and record["model_origin"] == "tlsearch"
    assert not list((tmp_path / "cache").glob("source-[!u]*.pt")), "nothing pretrained"

    # Another host: the study's fitted file is not there, its own cache is empty.
    url = cfg.storage
    recorded = study.user_attrs[ATTR_CHECKPOINT]
    gone = {**recorded, "path": str(tmp_path / "creating-host" / "x.pt")}
    optuna.load_study(study_name="tiny", storage=url).set_user_attr(ATTR_CHECKPOINT, gone)
    here = tmp_path / "other-cache"
    _, _, ctx = join_study(url, "tiny", cache_dir=here)
    assert ctx.checkpoint.sha256 == recorded["sha256"] and ctx.checkpoint.path.parent == here

    # The user's file is not on this host either: the fitted copy kept in the study's database.
    moved = tmp_path / "copy.pt"
    shutil.move(source, moved)
    shutil.rmtree(here)
    _, _, ctx = join_study(url, "tiny", cache_dir=here)
    assert ctx.checkpoint.sha256 == recorded["sha256"] and ctx.checkpoint.path.parent == here

    # A study made before the database kept copies: one line that says what to pass.
    shutil.rmtree(here)
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        db.execute("DELETE FROM tlsearch_checkpoints")
    with pytest.raises(ConfigError) as err:
        join_study(url, "tiny", cache_dir=here)
    assert str(err.value) == (
        f"pretrain.checkpoint: the study's source checkpoint {source} is not on this host; "
        "give this host's copy with `tlsearch worker --checkpoint PATH`"
    )
    _, _, ctx = join_study(url, "tiny", cache_dir=here, checkpoint=moved)
    assert ctx.checkpoint.sha256 == recorded["sha256"]

    # Another file under the same name: refused by its SHA-256.
    other = tmp_path / "other.pt"
    torch.save(_model_state([16, 16], seed=2), other)
    with pytest.raises(ConfigError) as err:
        join_study(url, "tiny", cache_dir=here, checkpoint=other)
    assert str(err.value).startswith(f"--checkpoint: {other} has SHA-256 ")
    assert str(err.value).endswith(f"the study was created from {sha[:12]}… ({source})")


def test_a_worker_with_another_version_of_the_model_stops(tmp_path: Path) -> None:
    cfg, study = _pretrained_study(tmp_path)
    record = study.user_attrs[ATTR_SOURCE]
    assert record["checkpoint"] is None and record["model_origin"] == "tlsearch"
    study.set_user_attr(ATTR_SOURCE, {**record, "model_origin": "tlsearch-mlp 0.3.0"})
    with pytest.raises(ConfigError) as err:
        join_study(cfg.storage, "tiny")
    assert str(err.value) == (
        "model.name: the study's model 'mlp' came from tlsearch-mlp 0.3.0; this worker has it "
        "from tlsearch (install the study's version on this host)"
    )


def test_a_worker_points_at_its_copy_of_a_pretrained_checkpoint(tmp_path: Path) -> None:
    cfg, study = _pretrained_study(tmp_path)
    recorded = study.user_attrs[ATTR_CHECKPOINT]
    copy = tmp_path / "copy.pt"
    shutil.copy(recorded["path"], copy)
    _, _, ctx = join_study(cfg.storage, "tiny", checkpoint=copy)
    assert ctx.checkpoint.path == copy and ctx.checkpoint.sha256 == recorded["sha256"]
    copy.write_bytes(copy.read_bytes() + b"\0")
    with pytest.raises(ConfigError) as err:
        join_study(cfg.storage, "tiny", checkpoint=copy)
    assert str(err.value).startswith(f"--checkpoint: {copy} has SHA-256 ")
