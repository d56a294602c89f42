"""A copy of a study's source checkpoint in the study's own database.

A pretrained checkpoint's bytes depend on the CPU kind's matrix kernels, on the thread count
(1 thread sums one gradient in another order than 2 or more) and on GPU kernels, so a worker on
another host cannot be asked to pretrain the same bytes again. ``tlsearch create`` and ``run`` put
the checkpoint (at most :data:`MAX_SHARED_BYTES`) in the table ``tlsearch_checkpoints``, keyed by
its SHA-256, beside Optuna's tables; a worker whose host lacks the file takes it from there and
checks its hash. Optuna ignores tables it does not know, so the dashboard and Optuna's own tools
read the database as before.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import sqlalchemy
import sqlalchemy.exc

from tlsearch.storage.rdb import StudyStorage

__all__ = ["MAX_SHARED_BYTES", "fetch_checkpoint", "store_checkpoint"]

_log = logging.getLogger(__name__)

# Larger checkpoints (a user's big backbone) are not copied into the database: reading a few
# hundred MB on every worker's start costs more than sharing a file system.
MAX_SHARED_BYTES = 256 * 2**20

_META = sqlalchemy.MetaData()
_TABLE = sqlalchemy.Table(
    "tlsearch_checkpoints",
    _META,
    sqlalchemy.Column("sha256", sqlalchemy.String(64), primary_key=True),
    sqlalchemy.Column("data", sqlalchemy.LargeBinary, nullable=False),
)


def store_checkpoint(storage: StudyStorage, sha256: str, path: Path) -> bool:
    """Keep the checkpoint at ``path`` (hashing to ``sha256``) in the storage; True when the
    storage holds it afterwards. Larger than :data:`MAX_SHARED_BYTES`: not stored, logged."""
    size = path.stat().st_size
    if size > MAX_SHARED_BYTES:
        _log.info(
            "checkpoint %s (%d MB) is too large to keep in the study's database; workers on "
            "other hosts need a copy of the file (worker --checkpoint)",
            path,
            size >> 20,
        )
        return False
    for attempt in range(2):
        try:
            with storage.engine.begin() as conn:
                _TABLE.create(conn, checkfirst=True)
                there = conn.execute(
                    sqlalchemy.select(_TABLE.c.sha256).where(_TABLE.c.sha256 == sha256)
                ).first()
                if there is None:
                    conn.execute(_TABLE.insert().values(sha256=sha256, data=path.read_bytes()))
            return True
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Another process created the table or stored the same file at the same moment.
            if attempt:
                raise
    return True


def fetch_checkpoint(storage: StudyStorage, sha256: str) -> bytes | None:
    """The checkpoint bytes hashing to ``sha256`` kept in the storage, or None: not kept (a
    study made before copies were kept, or one too large), or kept with other bytes (then
    logged: a damaged copy is never used)."""
    if not sqlalchemy.inspect(storage.engine).has_table(_TABLE.name):
        return None
    with storage.engine.connect() as conn:
        row = conn.execute(
            sqlalchemy.select(_TABLE.c.data).where(_TABLE.c.sha256 == sha256)
        ).first()
    if row is None:
        return None
    data = bytes(row[0])
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        _log.warning(
            "the study's database keeps a checkpoint copy with SHA-256 %s…, not %s…; not used",
            actual[:12],
            sha256[:12],
        )
        return None
    return data
