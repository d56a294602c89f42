"""The study config: its schema (:mod:`~tlsearch.config.schema`) and how a study file is read
(:mod:`~tlsearch.config.load`)."""

from tlsearch.config.load import check_names, config_from_dict, load_config
from tlsearch.config.schema import (
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
    StudyConfig,
    parse_duration,
)

__all__ = [
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
    "StudyConfig",
    "check_names",
    "config_from_dict",
    "load_config",
    "parse_duration",
]
