"""tlsearch.pretrain: the source model trains once and is reused while its hash matches."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tlsearch.config import StudyConfig, config_from_dict
from tlsearch.data import load_task
from tlsearch.errors import CheckpointError
from tlsearch.models import create_model
from tlsearch.pretrain import (
    Checkpoint,
    cache_dir,
    checkpoint_key,
    ensure_pretrained,
    load_checkpoint,
)


@pytest.fixture
def cfg(tiny) -> StudyConfig:
    return config_from_dict(tiny())


def test_second_call_reuses_the_checkpoint(
    cfg: StudyConfig, caplog: pytest.LogCaptureFixture
) -> None:
    task = load_task(cfg.data)
    caplog.set_level(logging.INFO, logger="tlsearch")
    first = ensure_pretrained(cfg, task)
    assert "pretraining the source model" in caplog.text
    assert first.path.parent == cfg.pretrain.cache_dir
    mtime = first.path.stat().st_mtime_ns
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["sha256"] == first.sha256 and meta["key"] == first.key
    assert 0.0 <= meta["source_train_accuracy"] <= 1.0

    caplog.clear()
    second = ensure_pretrained(cfg, task)
    assert second == first
    assert first.path.stat().st_mtime_ns == mtime
    assert "pretraining the source model" not in caplog.text
    assert "pretrained checkpoint (cached)" in caplog.text

    state = load_checkpoint(second)
    model = create_model(cfg.model, task.input_shape, task.source_classes)
    model.load_state_dict(state)  # every key, right shapes


def test_corrupted_checkpoint_is_detected_and_retrained(
    cfg: StudyConfig, caplog: pytest.LogCaptureFixture
) -> None:
    task = load_task(cfg.data)
    ckpt = ensure_pretrained(cfg, task)
    good = ckpt.path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size, one byte different
    ckpt.path.write_bytes(bytes(bad))

    with pytest.raises(CheckpointError, match=r"has SHA-256 .*, expected "):
        load_checkpoint(ckpt)

    caplog.set_level(logging.INFO, logger="tlsearch")
    rebuilt = ensure_pretrained(cfg, task)
    assert "does not match its hash; retraining it" in caplog.text
    assert "pretraining the source model" in caplog.text
    # Pretraining is deterministic: the rebuilt file is byte for byte the original.
    assert ckpt.path.read_bytes() == good
    assert rebuilt == ckpt
    load_checkpoint(rebuilt)


def test_load_checkpoint_errors(cfg: StudyConfig, tmp_path: Path) -> None:
    ckpt = ensure_pretrained(cfg, load_task(cfg.data))
    with pytest.raises(
        CheckpointError,
        match=r"^pretrained checkpoint .* has SHA-256 \w+…, expected 000000000000…$",
    ):
        load_checkpoint(Checkpoint(ckpt.path, "0" * 64, ckpt.key))
    with pytest.raises(CheckpointError, match=r"^pretrained checkpoint not found: .*gone\.pt$"):
        load_checkpoint(Checkpoint(tmp_path / "gone.pt", ckpt.sha256, ckpt.key))
    assert isinstance(load_checkpoint(ckpt), dict)


def test_key_follows_what_changes_the_source_model(tiny) -> None:
    base = config_from_dict(tiny())
    task = load_task(base.data)
    key = checkpoint_key(base, task)
    same = [
        {"pretrain": {"cache_dir": "/elsewhere"}},
        {"finetune": {"epochs": 50}},
        {"search": {"lr": 0.01}},
        {"name": "other", "n_trials": 9},
    ]
    for overrides in same:
        assert checkpoint_key(config_from_dict(tiny(**overrides)), task) == key, overrides
    different = [
        {"pretrain": {"epochs": 6}},
        {"pretrain": {"seed": 1}},
        {"model": {"hidden": [32, 8]}},
        {"model": {"batch_norm": True}},
    ]
    for overrides in different:
        assert checkpoint_key(config_from_dict(tiny(**overrides)), task) != key, overrides
    # Other source images (another data seed) are another checkpoint too.
    other = config_from_dict(tiny(data={"seed": 1}))
    assert checkpoint_key(other, load_task(other.data)) != key


def test_cache_dir_defaults_to_the_environment(
    tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tiny()
    d["pretrain"].pop("cache_dir")
    cfg = config_from_dict(d)
    monkeypatch.setenv("TLSEARCH_CACHE", str(tmp_path / "env-cache"))
    assert cache_dir(cfg) == tmp_path / "env-cache"
    ckpt = ensure_pretrained(cfg, load_task(cfg.data))
    assert ckpt.path.parent == tmp_path / "env-cache"


def test_uncreatable_cache_dir(tiny, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = config_from_dict(tiny(pretrain={"cache_dir": str(blocker / "cache")}))
    with pytest.raises(CheckpointError, match=r"^pretrain\.cache_dir: cannot create "):
        ensure_pretrained(cfg, load_task(cfg.data))


def test_pretrained_model_learned_the_source(cfg: StudyConfig) -> None:
    task = load_task(cfg.data)
    meta = json.loads(ensure_pretrained(cfg, task).path.with_suffix(".json").read_text())
    # Ten balanced classes: chance is 0.1; five epochs on 1,078 digits get far above it.
    assert meta["source_train_accuracy"] > 0.5
    assert meta["source_samples"] == len(task.source)
    state = load_checkpoint(ensure_pretrained(cfg, task))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_lock_files_live_under_locks_and_stay(cfg: StudyConfig) -> None:
    """Deleting a lock file while another process holds it lets a third take the same lock: they
    live in <cache>/.locks, apart from the checkpoints, and are never removed."""
    task = load_task(cfg.data)
    ckpt = ensure_pretrained(cfg, task)
    root = cfg.pretrain.cache_dir
    assert not list(root.glob("*.lock"))
    assert (root / ".locks" / f"{ckpt.path.name}.lock").is_file()
