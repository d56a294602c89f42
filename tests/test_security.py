"""What tlsearch must never do with what it reads: run code, write outside the places it was
given, or show a database password.

- The package source: every ``torch.load`` passes ``weights_only=True``, every ``np.load``
  ``allow_pickle=False``; no pickle, eval or exec anywhere, and a module imported by name only in
  the lazy public API (its own table) and the registry (entry points, ``--plugin`` modules and
  registered builders; tests/test_plugins.py checks that a name read from a study file or a
  database is never imported).
- A checkpoint or a data file carrying a pickled payload is refused with one line; the payload
  never runs.
- A study name is never a path: outputs go where the user pointed them, under fixed names, and
  the checkpoint's file name is a hash.
- A password in a PostgreSQL URL (a real role on the local server) never reaches a log, an
  export, a trials table, the report, the dashboard's output or note, the status output, an
  error message, or any file the commands write.

Elsewhere: the dashboard binds 127.0.0.1 unless --host says otherwise
(tests/test_dashboard.py, and its CLI line below); an unreachable PostgreSQL URL with a password
is one masked line (tests/test_storage.py::test_unreachable_database_is_one_clear_line).
"""

from __future__ import annotations

import ast
import json
import re
import signal
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import optuna_dashboard
import psycopg
import pytest
import torch
from conftest import run_many, start_cli
from hostile import write_study
from pg import admin, require_postgres
from psycopg import sql

from tlsearch._io import sha256_file
from tlsearch.config import config_from_dict, load_config
from tlsearch.data import load_task
from tlsearch.errors import CheckpointError, DataError
from tlsearch.export import write_export
from tlsearch.pretrain import ensure_pretrained, load_checkpoint
from tlsearch.report import write_report
from tlsearch.study import run_study

PACKAGE = Path(__file__).resolve().parents[1] / "tlsearch"
SECRET = "s3cret-XYZ"


# --- the source ------------------------------------------------------------------------------


def _calls(tree: ast.AST, owner: str, name: str) -> list[ast.Call]:
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == owner
    ]


def _keyword(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name and isinstance(kw.value, ast.Constant):
            return kw.value.value
    return None


SOURCES = sorted(PACKAGE.rglob("*.py"))
IDS = [str(p.relative_to(PACKAGE)) for p in SOURCES]
# The modules that may import a module by name (importlib's import_module, a spec's exec_module).
IMPORTS_BY_NAME = {"__init__.py", "registry.py"}
_BY_NAME = {"import_module", "exec_module"}


@pytest.mark.parametrize("path", SOURCES, ids=IDS)
def test_source_loads_no_code(path: Path) -> None:
    where = str(path.relative_to(PACKAGE))
    tree = ast.parse(path.read_text(), str(path))
    for call in _calls(tree, "torch", "load"):
        assert _keyword(call, "weights_only") is True, f"{where}:{call.lineno}"
    for call in _calls(tree, "np", "load"):
        assert _keyword(call, "allow_pickle") is False, f"{where}:{call.lineno}"
    for call in _calls(tree, "pd", "read_pickle") + _calls(tree, "yaml", "load"):
        raise AssertionError(f"{where}:{call.lineno}: deserializes code")
    banned = {"pickle", "cPickle", "dill", "shelve", "marshal", "runpy"}
    if where not in IMPORTS_BY_NAME:
        banned |= _BY_NAME
    for node in ast.walk(tree):
        names: set[str] = set()
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names = {(node.module or "").split(".")[0], *(a.name for a in node.names)}
        assert not names & banned, f"{where}:{node.lineno}: imports {names & banned}"
        if isinstance(node, ast.Call):  # the builtins (model.eval() and re.compile are fine)
            called = getattr(node.func, "id", None)
            assert called not in {"eval", "exec", "compile", "__import__"}, (
                f"{where}:{node.lineno}: calls {called}"
            )
            assert getattr(node.func, "attr", None) not in banned, f"{where}:{node.lineno}"
        if isinstance(node, ast.keyword) and node.arg == "shell":
            raise AssertionError(f"{where}:{node.lineno}: a shell command")


def test_the_scan_sees_every_load() -> None:
    # Not vacuous: the package does call both loaders, every subpackage is scanned, and each
    # module allowed to import by name does.
    text = "".join(p.read_text() for p in SOURCES)
    assert "torch.load(" in text and "np.load(" in text
    assert {"config", "models", "regularizers", "storage", "study", "training"} <= {
        p.parent.name for p in SOURCES
    }
    for name in IMPORTS_BY_NAME:
        assert "import_module(" in (PACKAGE / name).read_text(), name


# --- payloads ---------------------------------------------------------------------------------


class Payload:
    """Pickled, it creates ``marker`` when unpickled (as any pickle can run code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_with_code_is_refused_and_never_run(tiny, tmp_path: Path) -> None:
    cfg = config_from_dict(tiny())
    ckpt = ensure_pretrained(cfg, load_task(cfg.data))
    marker = tmp_path / "pwned"
    state = torch.load(ckpt.path, weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, ckpt.path)
    # Someone who can write the cache can write the sidecar too: the hash matches.
    meta = ckpt.path.with_suffix(".json")
    sidecar = json.loads(meta.read_text())
    meta.write_text(json.dumps({**sidecar, "sha256": sha256_file(ckpt.path)}))
    forged = ensure_pretrained(cfg, load_task(cfg.data))
    assert forged.path == ckpt.path  # served from the cache: the hash cannot tell
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(forged)
    assert str(info.value) == (
        f"pretrained checkpoint {ckpt.path} is not a plain state dict (UnpicklingError); "
        "delete it and its .json to pretrain again"
    )
    assert not marker.exists()
    # The payload is real: a plain torch.load would have run it.
    torch.load(ckpt.path, weights_only=False)
    assert marker.exists()


def test_a_data_file_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    from tlsearch.config import DataConfig, FileSource

    marker = tmp_path / "pwned"
    x = np.empty(4, dtype=object)
    x[:] = [Payload(marker)] * 4
    np.savez(tmp_path / "src.npz", x=x, y=np.arange(4))
    np.savez(tmp_path / "tgt.npz", x=np.zeros((4, 64)), y=np.arange(4))
    data = DataConfig(
        source=FileSource(path=tmp_path / "src.npz"), target=FileSource(path=tmp_path / "tgt.npz")
    )
    with pytest.raises(DataError) as info:
        load_task(data)
    assert str(info.value) == (
        f"data.source.path: cannot read {tmp_path / 'src.npz'}: Object arrays cannot be loaded "
        "when allow_pickle=False"
    )
    assert not marker.exists()


# --- names and paths --------------------------------------------------------------------------


def test_a_study_name_never_becomes_a_path(tiny, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    name = "../../escape/<script>alert(1)</script>"
    cfg = config_from_dict(
        tiny(name=name, n_trials=1, pretrain={"cache_dir": str(work / "cache")})
    )
    cfg = cfg.model_copy(update={"storage": f"sqlite:///{work / 'study.db'}"})
    study = run_study(cfg)
    write_export(study, work / "best.json")
    write_report(study, work / "report")
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    key = ensure_pretrained(cfg, load_task(cfg.data)).key
    assert set(key) <= set("0123456789abcdef")
    figures = [
        "lambda_curve",
        "history",
        "importances",
        "frozen_blocks",
        "lr_vs_lambda",
        "learning_curves",
    ]
    # The lock file this process held while it ran trials is named by a hash of host and study.
    (slot,) = [w for w in written if w.startswith("work/cache/.locks/workers-")]
    assert re.fullmatch(r"work/cache/\.locks/workers-[0-9a-f]{16}\.0\.lock", slot)
    assert written - {"work/study.db-wal", "work/study.db-shm", slot} == {
        f"work/cache/source-{key}.pt",
        f"work/cache/source-{key}.json",
        f"work/cache/.locks/source-{key}.pt.lock",
        "work/study.db",
        "work/best.json",
        "work/report/report.html",
        *(f"work/report/{f}.png" for f in figures),
    }
    assert not list(tmp_path.parent.glob("**/escape"))
    html = (work / "report" / "report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_paths_in_a_study_file_resolve_from_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "../" is allowed on purpose (a study file beside its data), and means the same from any
    # working directory: the file's own directory is the base, never the caller's.
    (tmp_path / "studies").mkdir()
    path = tmp_path / "studies" / "s.toml"
    path.write_text(
        '[data]\nsource = {path = "../data/src.npz"}\ntarget = {path = "../data/t.csv"}\n'
        '[pretrain]\ncache_dir = "../cache"\n'
    )
    monkeypatch.chdir(tmp_path / "studies")
    cfg = load_config("s.toml")
    assert cfg.data.source.path.resolve() == tmp_path / "data" / "src.npz"
    assert cfg.data.target.path.resolve() == tmp_path / "data" / "t.csv"
    assert cfg.pretrain.cache_dir.resolve() == tmp_path / "cache"


# --- passwords --------------------------------------------------------------------------------


@pytest.fixture
def pg_role_url() -> Iterator[str]:
    """A database owned by a new role with a password; both dropped afterwards."""
    require_postgres()
    tag = uuid.uuid4().hex[:10]
    role, db = f"tl_role_{tag}", f"tlsearch_test_{tag}"
    with admin() as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(SECRET)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(role))
        )
    try:
        yield f"postgresql+psycopg://{role}:{SECRET}@127.0.0.1:5432/{db}"
    finally:
        with admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(db)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _database_text(url: str) -> str:
    """Every row of every table of the database: what anyone who can read the study sees."""
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(host="127.0.0.1", user="postgres", dbname=dbname) as conn:
        tables = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
        assert len(tables) > 5  # Optuna's schema
        return "".join(
            str(conn.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(t))).fetchall())
            for (t,) in tables
        )


def _non_loopback_address() -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this picks the route's address
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.slow
@pytest.mark.postgres
def test_a_password_in_the_storage_url_is_never_shown(pg_role_url: str, tmp_path: Path) -> None:
    url = pg_role_url
    masked = url.replace(SECRET, "***")
    without = url.replace(f":{SECRET}", "")
    write_study(tmp_path / "study.toml", storage=url)
    shown: list[str] = []

    ran = run_many({"run": (tmp_path, ["run", "study.toml"])})["run"]
    assert ran.returncode == 0, ran.stderr
    assert f"study 'tiny' in {masked}: 2 trials" in ran.stderr
    shown += [ran.stdout, ran.stderr]

    flags = ["--storage", url, "--study-name", "tiny"]
    results = run_many(
        {
            "export": (tmp_path, ["export", *flags, "-o", "best.json", "--trials", "trials.csv"]),
            "status": (tmp_path, ["status", *flags]),
            "status of the study file": (tmp_path, ["status", "study.toml"]),
            "report": (tmp_path, ["report", *flags, "-o", "report"]),
            "worker": (tmp_path, ["worker", *flags]),
            "no such study": (tmp_path, ["export", "--storage", url, "--study-name", "nope"]),
            "password from the environment": (
                tmp_path,
                ["status", "--storage", without, "--study-name", "tiny"],
                {"TLSEARCH_DB_PASSWORD": SECRET},
            ),
        }
    )
    for key, result in results.items():
        assert "Traceback" not in result.stderr, (key, result.stderr)
        shown += [result.stdout, result.stderr]
    assert results["export"].returncode == 0 and results["report"].returncode == 0
    assert results["status"].stdout.startswith(f"study 'tiny' in {masked}\n")
    from_file = results["status of the study file"]
    assert from_file.stdout == results["status"].stdout
    assert from_file.stderr == f"reading study 'tiny' in {masked}\n"
    assert results["password from the environment"].stdout.startswith(
        f"study 'tiny' in {without}\n"
    )
    assert results["worker"].returncode == 0, results["worker"].stderr
    assert results["no such study"].returncode == 1
    assert results["no such study"].stderr == (
        f"tlsearch: error: no study 'nope' in {masked} (studies there: tiny)\n"
    )

    # The dashboard: its lines, the study page's data (the note with it), and where it listens.
    proc = start_cli("dashboard", "--storage", url, "--port", "0", cwd=tmp_path)
    try:
        assert proc.stdout is not None
        first, second = proc.stdout.readline(), proc.stdout.readline()
        assert first.startswith(f"optuna-dashboard for {masked} at http://127.0.0.1:"), first
        page = second.split(": ", 1)[1].strip()
        port = int(page.split(":")[2].split("/")[0])
        api = page.replace("/dashboard/studies/", "/api/studies/")
        with urllib.request.urlopen(api, timeout=30) as response:
            shown.append(response.read().decode())
        address = _non_loopback_address()
        if address is not None:
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=5):
                pass
        shown += [first, second]
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    shown += [out, err]

    study = optuna.load_study(study_name="tiny", storage=url)
    note = optuna_dashboard.get_note(study)
    assert note.startswith("## tlsearch study `tiny`")
    assert study.user_attrs["tlsearch_config"]["storage"] == masked
    shown += [note, _database_text(url)]

    # Every file a command wrote (the study file is the user's): export, trials, report, cache.
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "study.toml"]
    assert {"best.json", "trials.csv", "report.html"} <= {p.name for p in files}
    assert json.loads((tmp_path / "best.json").read_text())["config"]["storage"] == masked
    for p in files:
        assert SECRET.encode() not in p.read_bytes(), p
    for text in shown:
        assert SECRET not in text, text
