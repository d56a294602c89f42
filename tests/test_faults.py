"""Faults around a study that already has finished trials: none of them may lose one.

Each fault is injected into a copy of one finished study, then the real ``tlsearch`` command
runs into it (all side by side); afterwards the study's trials are compared with what they were.

- a truncated pretrained checkpoint: found by its hash, rebuilt (the log says so), the study
  goes on from its finished trials;
- a full disk under the checkpoint cache, the export, the report and ``final``'s results, and a
  read-only directory for the export and the report: one line naming the file and the reason,
  exit 1, the study untouched, no half-written file.

Elsewhere: a flipped byte in the checkpoint (tests/test_pretrain.py), a trial diverging to NaN
(tests/test_objective.py::test_diverged_trial_is_pruned_with_its_reason_and_the_study_goes_on),
kill -9 and SIGTERM/SIGINT of a worker, dropped PostgreSQL connections and a server restart
(tests/test_workers.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import run_many
from hostile import (
    fill,
    finished,
    make_study,
    mount_problem,
    read_only_reason,
    remount_read_only,
    require_tmpfs,
    tmpfs,
    trials,
    unwritable,
    write_study,
)

from tlsearch.config import config_from_dict
from tlsearch.data import load_task
from tlsearch.errors import CheckpointError
from tlsearch.pretrain import ensure_pretrained

pytestmark = pytest.mark.slow  # one fixture runs seven commands, one of them a resumed study

DB = ["--storage", "sqlite:///study.db", "--study-name", "tiny"]
ERR = "tlsearch: error: "
FULL = "No space left on device"


class Fault(NamedTuple):
    inject: Callable[[Path, ExitStack], None]
    args: list[str]
    needs_tmpfs: bool


def _checkpoint(d: Path) -> Path:
    (path,) = (d / "cache").glob("source-*.pt")
    return path


def _truncate_checkpoint(d: Path, stack: ExitStack) -> None:
    path = _checkpoint(d)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _full(d: Path, stack: ExitStack, keep: Callable[[Path], None] | None = None) -> Path:
    full = stack.enter_context(tmpfs(d / "full"))
    if keep is not None:
        keep(full)
    fill(full)
    return full


def _full_cache(d: Path, stack: ExitStack) -> None:
    # The checkpoint is gone and its cache is a full disk: pretraining cannot store it.
    name = _checkpoint(d).name
    shutil.rmtree(d / "cache")
    _full(d, stack, lambda full: (full / "cache").mkdir())
    write_study(d / "study.toml", pretrain={"cache_dir": "full/cache"})
    (d / "expected").write_text(str(d / "full" / "cache" / name))


def _full_disk(d: Path, stack: ExitStack) -> None:
    _full(d, stack)


def _full_disk_with_export(d: Path, stack: ExitStack) -> None:
    _full(d, stack, lambda full: shutil.copy(d / "best.json", full / "best.json"))


def _read_only(d: Path, stack: ExitStack) -> None:
    stack.enter_context(unwritable(d / "ro"))


FAULTS: dict[str, Fault] = {
    "truncated checkpoint": Fault(
        _truncate_checkpoint, ["run", "study.toml", "--n-trials", "4"], False
    ),
    "full disk under the checkpoint cache": Fault(
        _full_cache, ["-q", "run", "study.toml", "--n-trials", "4"], True
    ),
    "full disk under the export": Fault(
        _full_disk, ["export", *DB, "-o", "full/best.json", "--trials", "full/trials.csv"], True
    ),
    "read-only export directory": Fault(_read_only, ["export", *DB, "-o", "ro/best.json"], False),
    "full disk under the report": Fault(_full_disk, ["report", *DB, "-o", "full"], True),
    "read-only report directory": Fault(_read_only, ["report", *DB, "-o", "ro"], False),
    "full disk under final's results": Fault(
        _full_disk_with_export, ["final", "full/best.json"], True
    ),
}


class Outcome(NamedTuple):
    d: Path
    result: subprocess.CompletedProcess[str]
    before: list[tuple[Any, ...]]
    after: list[tuple[Any, ...]]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_study(tmp_path_factory.mktemp("made").resolve())


@pytest.fixture(scope="module")
def outcomes(made: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    root = tmp_path_factory.mktemp("faults").resolve()
    url = "sqlite:///{}/study.db"
    with ExitStack() as stack:
        jobs, before = {}, {}
        for i, (name, fault) in enumerate(FAULTS.items()):
            if fault.needs_tmpfs and mount_problem() is not None:
                continue  # its test skips (or fails under CI=true)
            d = root / f"fault{i}"
            shutil.copytree(made, d)
            fault.inject(d, stack)
            jobs[name] = (d, fault.args)
            before[name] = trials(url.format(d), "tiny")
        results = run_many(jobs)
        yield {
            k: Outcome(d, results[k], before[k], trials(url.format(d), "tiny"))
            for k, (d, _) in jobs.items()
        }


def _outcome(outcomes: dict[str, Outcome], name: str) -> Outcome:
    if FAULTS[name].needs_tmpfs:
        require_tmpfs()
    out = outcomes[name]
    assert "Traceback" not in out.result.stderr, out.result.stderr
    # Nothing finished is lost, whatever happened.
    assert finished(out.after)[: len(finished(out.before))] == finished(out.before)
    return out


def _one_line_error(out: Outcome, line: str) -> None:
    assert out.result.returncode == 1, out.result.stderr
    assert out.result.stderr.splitlines() == [ERR + line]
    assert out.after == out.before  # the study is untouched


def test_truncated_checkpoint_is_rebuilt_and_the_study_goes_on(
    outcomes: dict[str, Outcome], made: Path
) -> None:
    d, result, before, after = _outcome(outcomes, "truncated checkpoint")
    assert result.returncode == 0, result.stderr
    path = _checkpoint(d)
    log = result.stderr
    assert f"pretrained checkpoint {path} does not match its hash; retraining it" in log
    assert "pretraining the source model" in log
    # Pretraining on the CPU is deterministic: the rebuilt file is the one the trials used.
    assert path.read_bytes() == _checkpoint(made).read_bytes()
    assert "started from checkpoint" not in log
    assert len(finished(before)) == 2 and len(finished(after)) == 4


def test_full_disk_under_the_checkpoint_cache(outcomes: dict[str, Outcome]) -> None:
    out = _outcome(outcomes, "full disk under the checkpoint cache")
    expected = (out.d / "expected").read_text()
    _one_line_error(out, f"pretrain.cache_dir: cannot write {expected}: {FULL}")
    cache = out.d / "full" / "cache"
    # No checkpoint, no sidecar, no temporary file: at most the pretraining's lock file.
    assert [p.name for p in cache.iterdir() if p.name != ".locks"] == []
    assert all(p.suffix == ".lock" for p in cache.glob(".locks/*"))


def test_full_disk_under_the_export(outcomes: dict[str, Outcome]) -> None:
    out = _outcome(outcomes, "full disk under the export")
    _one_line_error(out, f"cannot write full/trials.csv: {FULL}")
    assert sorted(p.name for p in (out.d / "full").iterdir()) == ["filler"]


def test_read_only_export_directory(outcomes: dict[str, Outcome]) -> None:
    out = _outcome(outcomes, "read-only export directory")
    _one_line_error(out, f"cannot write ro/best.json: {read_only_reason()}")


def test_full_disk_under_the_report(outcomes: dict[str, Outcome]) -> None:
    out = _outcome(outcomes, "full disk under the report")
    _one_line_error(out, f"cannot write full/lambda_curve.png: {FULL}")
    assert sorted(p.name for p in (out.d / "full").iterdir()) == ["filler"]


def test_read_only_report_directory(outcomes: dict[str, Outcome]) -> None:
    out = _outcome(outcomes, "read-only report directory")
    _one_line_error(out, f"cannot write ro/lambda_curve.png: {read_only_reason()}")


def test_full_disk_under_final_is_found_before_training(outcomes: dict[str, Outcome]) -> None:
    out = _outcome(outcomes, "full disk under final's results")
    _one_line_error(out, f"cannot write in full: {FULL}")
    assert sorted(p.name for p in (out.d / "full").iterdir()) == ["best.json", "filler"]


# --- the checkpoint cache, in this process --------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "emptied", "sidecar garbled", "sidecar gone"])
def test_a_damaged_checkpoint_is_never_used(
    tiny, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config_from_dict(tiny())
    task = load_task(cfg.data)
    ckpt = ensure_pretrained(cfg, task)
    good = ckpt.path.read_bytes()
    meta = ckpt.path.with_suffix(".json")
    if damage == "truncated":
        ckpt.path.write_bytes(good[:-100])
    elif damage == "emptied":
        ckpt.path.write_bytes(b"")
    elif damage == "sidecar garbled":
        meta.write_text('{"sha256": ')
    else:
        meta.unlink()
    caplog.set_level(logging.INFO, logger="tlsearch")
    assert ensure_pretrained(cfg, task) == ckpt
    assert "pretraining the source model" in caplog.text
    assert ckpt.path.read_bytes() == good
    assert json.loads(meta.read_text())["sha256"] == ckpt.sha256


def test_a_read_only_cache_serves_its_checkpoint(tiny, tmp_path: Path) -> None:
    # A cache shared read-only (a volume mounted by many workers) holds a valid checkpoint.
    cfg = config_from_dict(tiny())
    task = load_task(cfg.data)
    ckpt = ensure_pretrained(cfg, task)
    with tmpfs(tmp_path / "shared", size="1m") as shared:
        for p in ckpt.path.parent.glob("source-*"):
            shutil.copy(p, shared)
        remount_read_only(shared)
        ro = config_from_dict(tiny(pretrain={"cache_dir": str(shared)}))
        got = ensure_pretrained(ro, task)
        assert got.path == shared / ckpt.path.name and got.sha256 == ckpt.sha256


def test_a_read_only_cache_without_the_checkpoint(tiny, tmp_path: Path) -> None:
    with unwritable(tmp_path / "ro") as ro:
        cfg = config_from_dict(tiny(pretrain={"cache_dir": str(ro)}))
        with pytest.raises(
            CheckpointError, match=rf"^pretrain\.cache_dir: cannot write in {ro}: "
        ):
            ensure_pretrained(cfg, load_task(cfg.data))
    assert not list((tmp_path / "ro").iterdir())
