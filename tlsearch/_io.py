"""Small file helpers every writer and reader shares: atomic writes, JSON files, SHA-256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tlsearch.errors import ConfigError, TlsearchError

__all__ = ["atomic_write", "read_json", "sha256_file", "write_json"]


def atomic_write(
    path: Path,
    write: Callable[[Path], None],
    error: type[TlsearchError] = TlsearchError,
    what: str = "",
) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    Readers see the old file or the new one, never half of one. A failed write (a full disk, a
    read-only directory) leaves no temporary file behind and raises ``error`` naming ``path``
    (after ``what``, e.g. the config field that chose the directory).
    """
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):  # on a read-only filesystem even this fails
            tmp.unlink(missing_ok=True)
        raise error(f"{what}cannot write {path}: {e.strerror}") from None


def write_json(path: Path, data: Any) -> None:
    """``data`` as indented JSON at ``path``, atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def read_json(path: str | Path, what: str) -> Any:
    """The JSON in ``path``; a missing or unreadable file is one :class:`ConfigError` line that
    says the file is not ``what`` (e.g. "a readable JSON export")."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not {what}: {e}") from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
