"""tlsearch: cross-validated hyperparameter search for regularized transfer learning.

The library API the CLI is built on::

    import tlsearch
    cfg = tlsearch.load_config("studies/digits.toml", n_trials=10)
    study = tlsearch.run_study(cfg)
    tlsearch.write_export(study, "best.json")
"""

from __future__ import annotations

__version__ = "0.1.0"

from tlsearch.config import StudyConfig, config_from_dict, load_config  # noqa: E402
from tlsearch.errors import ConfigError, TlsearchError  # noqa: E402
from tlsearch.export import read_export, write_export  # noqa: E402
from tlsearch.study import open_study, run_study  # noqa: E402

__all__ = [
    "ConfigError",
    "StudyConfig",
    "TlsearchError",
    "__version__",
    "config_from_dict",
    "load_config",
    "open_study",
    "read_export",
    "run_study",
    "write_export",
]
