"""The training config: typed sections of the reference recipe's YAML.

    schema.py      the dataclasses, one docstring per field: the documentation of every key
    compat.py      the reference's `_target_` classes mapped to ours, and the keys accepted only
                   so that its YAML runs as it is (values accepted, notices when one is ignored)
    loading.py     YAML + `--dotted.key value` overrides -> typed dataclass, errors naming the key
                   (load_config for the trainer, load_yaml_with_overrides for any CLI)
    validation.py  checks across keys, and those that need the number of ranks

`load_config(path, overrides)` reads a YAML file, applies dotted command-line overrides
(`--step_scheduler.max_steps 20`), builds `TrainConfig` and checks it.
"""
from embedcore.errors import ConfigError
from embedcore.train.config.compat import COMPAT, KNOWN_TARGETS, check_compat, compat_notices, resolve_target
from embedcore.train.config.loading import (apply_overrides, build_section, config_from_dict, load_config,
                                            load_yaml_with_overrides, parse_override_value, read_yaml,
                                            split_overrides, to_dict)
from embedcore.train.config.schema import (DEFAULT_EVAL_METRICS, EVAL_METRIC_KINDS, CheckpointConfig,
                                           CollatorConfig, DataLoaderConfig, DatasetConfig, DistEnvConfig,
                                           DistributedConfig, DivergenceConfig, EvaluationConfig, LRSchedulerConfig,
                                           ModelConfig, OptimizerConfig, PeftConfig, StepSchedulerConfig,
                                           TinyModelConfig, TokenizerConfig, TrainConfig)
from embedcore.train.config.validation import accumulation_steps, validate, validate_world

__all__ = [
    "ConfigError", "COMPAT", "KNOWN_TARGETS", "check_compat", "compat_notices", "resolve_target",
    "apply_overrides", "build_section", "config_from_dict", "load_config", "load_yaml_with_overrides",
    "parse_override_value", "read_yaml", "split_overrides", "to_dict",
    "DEFAULT_EVAL_METRICS", "EVAL_METRIC_KINDS", "CheckpointConfig", "CollatorConfig", "DataLoaderConfig",
    "DatasetConfig", "DistEnvConfig", "DistributedConfig", "DivergenceConfig", "EvaluationConfig",
    "LRSchedulerConfig", "ModelConfig", "OptimizerConfig", "PeftConfig", "StepSchedulerConfig", "TinyModelConfig",
    "TokenizerConfig", "TrainConfig", "accumulation_steps", "validate", "validate_world",
]
