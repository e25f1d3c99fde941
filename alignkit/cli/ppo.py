"""`alignkit ppo` (registered on the app in alignkit.cli.main): PPO, RLOO or GRPO."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from alignkit.cli.main import (AccumOpt, BatchOpt, ConfigOpt, DeviceOpt, EpochsOpt, LoraOpt,
                               LrOpt, MaxStepsOpt, ModelOpt, OutputOpt, OverwriteOpt,
                               PrecisionOpt, SeedOpt, SetOpt, TemplateOpt, _overrides, app)

PromptDataOpt = typer.Option(None, "--data", help="Prompts (required): a JSONL with 'prompt' "
                             "strings or message lists, or any SFT or preference file (e.g. "
                             "HH-RLHF transcripts) whose prompts are used.")
AlgoOpt = typer.Option(None, help="ppo (with a critic), rloo or grpo (critic-free, k samples "
                                  "per prompt).")
RewardModelOpt = typer.Option(None, help="Reward model run folder (written by alignkit reward).")
RewardFnOpt = typer.Option(None, help="Python reward module:function, called as "
                                      "reward(prompts, responses) -> list[float]; e.g. "
                                      "alignkit.assets.rewards:positive_words.")
KlCoefOpt = typer.Option(None, help="β of the KL penalty (initial β with --kl-target).")
KlTargetOpt = typer.Option(None, help="Adaptive β driving the KL towards this target.")
PromptsOpt = typer.Option(None, help="Prompts per rollout.")
GroupOpt = typer.Option(None, help="Samples per prompt (default 1 for ppo, 4 for rloo/grpo).")
MaxNewOpt = typer.Option(None, help="Most tokens per sampled response.")
PpoEpochsOpt = typer.Option(None, help="Passes over each rollout.")

_NAMED = {"algo": "algo", "reward_model": "reward_model", "reward_fn": "reward_fn",
          "kl_coef": "kl_coef", "kl_target": "kl_target", "rollout_prompts": "rollout.prompts",
          "group_size": "rollout.group_size", "max_new_tokens": "rollout.max_new_tokens",
          "ppo_epochs": "ppo_epochs"}


@app.command()
def ppo(config: Optional[Path] = ConfigOpt, model: Optional[str] = ModelOpt,
        data: Optional[str] = PromptDataOpt, output: Optional[str] = OutputOpt,
        algo: Optional[str] = AlgoOpt, reward_model: Optional[str] = RewardModelOpt,
        reward_fn: Optional[str] = RewardFnOpt, kl_coef: Optional[float] = KlCoefOpt,
        kl_target: Optional[float] = KlTargetOpt, rollout_prompts: Optional[int] = PromptsOpt,
        group_size: Optional[int] = GroupOpt, max_new_tokens: Optional[int] = MaxNewOpt,
        ppo_epochs: Optional[int] = PpoEpochsOpt,
        max_steps: Optional[int] = MaxStepsOpt, epochs: Optional[float] = EpochsOpt,
        batch_size: Optional[int] = BatchOpt, grad_accum: Optional[int] = AccumOpt,
        lr: Optional[float] = LrOpt, seed: Optional[int] = SeedOpt,
        lora: Optional[bool] = LoraOpt, template: Optional[str] = TemplateOpt,
        precision: Optional[str] = PrecisionOpt, device: Optional[str] = DeviceOpt,
        set: Optional[list[str]] = SetOpt, overwrite: bool = OverwriteOpt) -> None:
    """RLHF: sample responses, score them with a reward model or function, and train the policy
    with PPO (clipped surrogate, critic, GAE, KL penalty to the reference), RLOO or GRPO."""
    values = dict(locals())
    from alignkit.config.load import build_config
    from alignkit.config.ppo import PPOConfig
    from alignkit.stages import ppo as stage

    named = {dotted: values[k] for k, dotted in _NAMED.items() if values[k] is not None}
    flags = {k: v for k, v in values.items()
             if k not in _NAMED and k not in ("config", "overwrite")}
    # --set comes last so it wins over a named flag, as in the other stages
    overrides = named | _overrides(**flags)
    stage.run(build_config(PPOConfig, path=config, overrides=overrides), overwrite=overwrite)
