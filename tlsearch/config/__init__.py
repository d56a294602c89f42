"""The study config: its schema (:mod:`~tlsearch.config.schema`) and how a study file is read
(:mod:`~tlsearch.config.load`)."""

from tlsearch.config.load import (
    adopt_stored,
    check_names,
    config_from_dict,
    load_config,
    stored_config,
)
from tlsearch.config.schema import (
    CHANGED_DEFAULTS,
    LEGACY_VALUES,
    CVConfig,
    DataConfig,
    FileSource,
    FinetuneConfig,
    ModelConfig,
    ParamRange,
    PretrainConfig,
    PrunerConfig,
    RegularizerConfig,
    SamplerConfig,
    SearchSpace,
    SelectConfig,
    StudyConfig,
    parse_duration,
)

__all__ = [
    "CHANGED_DEFAULTS",
    "LEGACY_VALUES",
    "CVConfig",
    "DataConfig",
    "FileSource",
    "FinetuneConfig",
    "ModelConfig",
    "ParamRange",
    "PretrainConfig",
    "PrunerConfig",
    "RegularizerConfig",
    "SamplerConfig",
    "SearchSpace",
    "SelectConfig",
    "StudyConfig",
    "adopt_stored",
    "check_names",
    "config_from_dict",
    "load_config",
    "parse_duration",
    "stored_config",
]
