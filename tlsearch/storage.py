"""Study storage: Optuna's ``RDBStorage`` with settings that suit several processes, and masked URLs.

SQLite gets a long busy timeout so parallel writers wait instead of failing with "database is locked";
PostgreSQL gets ``pool_pre_ping`` so a connection dropped by a server restart is replaced, not used.
Passwords never leave this module in clear: use :func:`mask_url` for anything shown to a person.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from sqlalchemy.engine import make_url

from tlsearch.errors import ConfigError, StorageError

__all__ = ["create_storage", "mask_url"]

_KNOWN = ("sqlite", "postgresql", "mysql")
# Seconds a SQLite writer waits for a lock before giving up.
SQLITE_BUSY_TIMEOUT = 60


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (unparseable URLs are not echoed at all)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL we cannot parse might still hold a secret
        return "<unparseable storage URL>"


def _engine_kwargs(url: str) -> dict[str, Any]:
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        return {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT}}
    return {"pool_pre_ping": True}


def _check_url(url: str) -> str:
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001
        raise ConfigError(f"storage: not a database URL: {mask_url(url)}") from None
    backend = parsed.get_backend_name()
    if backend not in _KNOWN:
        raise ConfigError(
            f"storage: unknown scheme '{parsed.drivername}' in {mask_url(url)} "
            "(use sqlite:///FILE or postgresql+psycopg://USER@HOST/DB)"
        )
    if backend == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise ConfigError("storage: an in-memory SQLite database cannot be shared; name a file")
        parent = Path(db).expanduser().resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"storage: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"storage: directory {parent} is not writable")
    # A password can come from the environment instead of the URL, so it never lands in a file.
    password = os.environ.get("TLSEARCH_DB_PASSWORD")
    if password and backend != "sqlite" and parsed.password is None:
        url = parsed.set(password=password).render_as_string(hide_password=False)
    return url


def create_storage(url: str) -> optuna.storages.RDBStorage:
    """Open (and create the tables of) the storage at ``url``; one clear error if it fails."""
    url = _check_url(url)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
    except (sqlalchemy.exc.SQLAlchemyError, OSError, ImportError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StorageError(f"storage {mask_url(url)}: cannot open: {reason}") from e
