"""Every example config in configs/ validates against its stage's schema."""

from pathlib import Path

import pytest
import yaml

from alignkit.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, build_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SCHEMAS = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "ppo": PPOConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_validates(path):
    stage = yaml.safe_load(path.read_text())["stage"]
    cfg = build_config(SCHEMAS[stage], path=path)
    assert cfg.stage == stage
