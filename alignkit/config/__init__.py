"""Config schemas and loading (no torch import)."""

from alignkit.config.load import build_config, dump_config, parse_override, read_yaml
from alignkit.config.schema import (DataConfig, DPOConfig, GenerateConfig, LoraConfig,
                                    ModelConfig, PreferenceDataConfig, PretrainConfig,
                                    RewardConfig, SFTConfig, TrainConfig)

from alignkit.config.ppo import PPOConfig, PromptDataConfig, RolloutConfig

__all__ = ["PPOConfig", "PromptDataConfig", "RolloutConfig", "build_config", "dump_config", "parse_override", "read_yaml", "DataConfig",
           "GenerateConfig", "LoraConfig", "ModelConfig", "PretrainConfig", "SFTConfig",
           "TrainConfig", "DPOConfig", "PreferenceDataConfig", "RewardConfig"]
