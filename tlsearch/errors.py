"""One exception root for everything a user can cause, as ``optuna.exceptions`` does.

The CLI turns a :class:`TlsearchError` into one line on stderr and an exit code; anything else that
escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class TlsearchError(Exception):
    """Base class of every error a user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class ConfigError(TlsearchError):
    """The study file or a command-line flag is invalid (names the field or file)."""

    exit_code = 2


class DataError(TlsearchError):
    """A data file is missing, unreadable or holds arrays tlsearch cannot use."""

    exit_code = 2


class StorageError(TlsearchError):
    """The study storage cannot be reached or holds something unexpected."""

    exit_code = 1


class CheckpointError(TlsearchError):
    """A pretrained checkpoint is missing or does not match its recorded hash."""

    exit_code = 1


class DivergedError(TlsearchError):
    """Fine-tuning produced a non-finite loss; the trial is pruned with this reason."""
