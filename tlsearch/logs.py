"""Logging and the one-line error boundary, shared by the CLI and spawned worker processes."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from tlsearch.errors import TlsearchError

__all__ = ["guarded", "quiet_optuna", "setup_logging"]


def setup_logging(quiet: bool = False, prefix: str = "") -> None:
    """tlsearch's messages on stderr, one per line, after ``prefix`` (which tells workers apart);
    only warnings when ``quiet``. Optuna's own log is quieted by :func:`quiet_optuna`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
    root = logging.getLogger("tlsearch")
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


def quiet_optuna() -> None:
    """Optuna logs warnings only: tlsearch prints its own progress line per trial, which Optuna's
    would repeat. Called once a command is past its config checks (importing optuna takes a
    second a typo should not wait for)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def guarded(command: Callable[[], int]) -> int:
    """Run ``command`` and return its exit code; a user's error is one line on stderr.

    A :class:`~tlsearch.errors.TlsearchError` exits with its ``exit_code`` (2 for config and usage
    errors), a database error outside the trial loop (which retries them) with 1, Ctrl-C with 130.
    Anything else is a bug and keeps its traceback.
    """
    try:
        return command()
    except TlsearchError as e:
        for line in str(e).splitlines() or [type(e).__name__]:
            print(f"tlsearch: error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if "sqlalchemy" not in sys.modules:
            raise
        from tlsearch.storage import STORAGE_ERRORS, describe_error

        if not isinstance(e, STORAGE_ERRORS):
            raise
        print(f"tlsearch: error: storage: {describe_error(e)}", file=sys.stderr)
        return 1
