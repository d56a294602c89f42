"""Helpers for the bad-input, fault and security tests.

A tiny study file, small and read-only filesystems, and a snapshot of a study's trials to prove
that nothing finished was lost.

Filesystem faults need root for ``mount -t tmpfs`` (CI runs as root). Without root a read-only
directory is a ``chmod 555`` one; a full disk cannot be made, and those tests skip, except under
``CI=true``, where they fail: CI must never pass by skipping them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import pytest
from conftest import FAST, Job, cli_env, merge, write_toml

# conftest's fast tiny study with a relative storage (the working directory of the command) and a
# cache beside the study file, so a directory copied elsewhere is a study of its own.
STUDY: dict[str, Any] = merge(
    FAST, {"n_trials": 2, "storage": "sqlite:///study.db", "pretrain": {"cache_dir": "cache"}}
)


def write_study(path: Path, **overrides: Any) -> Path:
    """The tiny study with ``overrides`` (sections merge) as a TOML file at ``path``."""
    return write_toml(path, merge(STUDY, overrides))


def make_study(d: Path) -> Path:
    """In ``d`` (in this process: no start-up cost): study.toml, its cache, study.db holding
    'tiny' (2 finished trials) and 'empty' (none), and best.json, the export of 'tiny'."""
    from tlsearch.config import load_config
    from tlsearch.export import write_export
    from tlsearch.study import run_study, setup_study

    path = write_study(d / "study.toml")
    url = f"sqlite:///{d / 'study.db'}"
    study = run_study(load_config(path, storage=url))
    setup_study(load_config(path, storage=url, name="empty"))[1].engine.dispose()
    write_export(study, d / "best.json")
    return d


# A process that imports the CLI and the modules its commands load, then forks one child per
# command: each child runs tlsearch.cli.main(ARGS) in its own directory and environment, with its
# own stdout and stderr, and exits with main's code as `python -m tlsearch.cli ARGS` does (a
# SystemExit as the interpreter handles it, anything else a traceback and 1). A config or usage
# error takes 0.2 s as a real command now (no torch), but a row that loads data, opens a storage
# or resumes a study imports torch: 3.5-4 s of CPU each. Measured on tests/test_bad_inputs.py's 47
# rows: 72 s of CPU as real commands, 7 s forked from here (issue 10). run_forked's callers check
# a few commands both ways.
_FORK_SERVER = """
import json, os, sys, traceback
import tlsearch.cli
import tlsearch.dashboard, tlsearch.export, tlsearch.final, tlsearch.report, tlsearch.status
import tlsearch.study, tlsearch.workers

def child(job):
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    try:
        code = tlsearch.cli.main(job["args"])
    except SystemExit as e:
        code = e.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
            code = 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)

jobs, limit, codes, running = json.load(sys.stdin), int(sys.argv[1]), {}, {}
for key, job in jobs.items():
    if len(running) >= limit:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    pid = os.fork()
    if pid == 0:
        child(job)
    running[pid] = key
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
json.dump(codes, sys.stdout)
"""


def run_forked(
    jobs: dict[str, Job], limit: int = 4
) -> dict[str, subprocess.CompletedProcess[str]]:
    """:func:`conftest.run_many`'s results, from children of one process that imported the CLI
    and torch once."""
    with tempfile.TemporaryDirectory() as streams:
        spec = {}
        for i, (key, (cwd, args, *extra)) in enumerate(jobs.items()):
            spec[key] = {
                "cwd": str(cwd),
                "args": list(args),
                "env": {**cli_env(cwd), **(extra[0] if extra else {})},
                "stdout": f"{streams}/{i}.out",
                "stderr": f"{streams}/{i}.err",
            }
        server = subprocess.run(
            [sys.executable, "-c", _FORK_SERVER, str(limit)],
            input=json.dumps(spec),
            env=cli_env(Path(streams)),
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        codes = json.loads(server.stdout)
        return {
            key: subprocess.CompletedProcess(
                job["args"],
                codes[key],
                Path(job["stdout"]).read_text(),
                Path(job["stderr"]).read_text(),
            )
            for key, job in spec.items()
        }


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` by relative path, with the SHA-256 of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def trials(url: str, name: str) -> list[tuple[Any, ...]]:
    """What must survive any fault: each trial's number, state, value, parameters, fold scores."""
    study = optuna.load_study(study_name=name, storage=url)
    return [
        (t.number, t.state.name, t.value, t.params, t.user_attrs.get("fold_scores"))
        for t in study.get_trials(deepcopy=False)
    ]


def finished(snapshot: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [t for t in snapshot if t[1] in ("COMPLETE", "PRUNED")]


_MOUNT_PROBLEM: list[str | None] = []


def mount_problem() -> str | None:
    """Why a tmpfs cannot be mounted here, or None when it can (tried once per session)."""
    if not _MOUNT_PROBLEM:
        problem = None
        if os.geteuid() != 0:
            problem = "mounting a tmpfs needs root"
        else:
            with tempfile.TemporaryDirectory() as d:
                result = subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d],
                    capture_output=True,
                    text=True,
                )
                if result.returncode == 0:
                    subprocess.run(["umount", d], check=True)
                else:
                    problem = f"cannot mount a tmpfs: {result.stderr.strip()}"
        _MOUNT_PROBLEM.append(problem)
    return _MOUNT_PROBLEM[0]


def require_tmpfs() -> None:
    """Skip the calling test (fail it under CI=true) when a tmpfs cannot be mounted."""
    problem = mount_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; CI=true needs it")
    pytest.skip(problem)


@contextmanager
def tmpfs(path: Path, size: str = "64k", readonly: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created), unmounted afterwards."""
    require_tmpfs()
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def remount_read_only(path: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)


def read_only_reason() -> str:
    """What writing into :func:`unwritable` fails with."""
    return "Read-only file system" if os.geteuid() == 0 else "Permission denied"


@contextmanager
def unwritable(path: Path) -> Iterator[Path]:
    """A directory at ``path`` that this user cannot write (root ignores modes: a read-only
    tmpfs then)."""
    if os.geteuid() == 0:
        with tmpfs(path, readonly=True):
            yield path
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


def fill(directory: Path) -> None:
    """Write into ``directory`` until its filesystem is full (``filler``)."""
    with (directory / "filler").open("wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):  # big blocks, then what is left of the last page
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError:
                pass
