"""Every example config in configs/ validates against its stage's schema (a pipeline file:
every stage's)."""

from pathlib import Path

import pytest
import yaml

from alignkit.config import DPOConfig, PPOConfig, RewardConfig, SFTConfig, build_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SCHEMAS = {"sft": SFTConfig, "reward": RewardConfig, "dpo": DPOConfig, "ppo": PPOConfig}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_config_validates(path):
    data = yaml.safe_load(path.read_text())
    if "stages" in data:  # a pipeline file: every stage's config validated (nothing loaded)
        from alignkit.pipeline.plan import load_plan
        assert load_plan(path).stages
        return
    stage = data["stage"]
    cfg = build_config(SCHEMAS[stage], path=path)
    assert cfg.stage == stage
