"""Config schema of the RLHF stage (PPO, RLOO, GRPO): the one source of its defaults.

No torch import."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignkit.config.schema import ModelConfig, TrainConfig, _Strict




class PromptDataConfig(_Strict):
    """Prompts to roll out: a JSONL of ``prompt`` strings or message lists, or the prompts of any
    SFT or preference file (HH-RLHF transcripts included). Repeated prompts are kept once."""

    path: str | None = None
    split: str = "train"
    # auto: "prompt" with no completion/chosen → prompts; a preference record → its prompt;
    # an SFT record → its messages before the last assistant turn.
    format: Literal["auto", "prompts", "preference", "sft"] = "auto"
    template: Literal["auto", "chat", "inst", "plain"] = "auto"
    max_prompt_length: int = Field(256, gt=0)  # longer prompts are dropped (counted)
    max_examples: int | None = Field(None, gt=0)
    system_prompt: str | None = None


class RolloutConfig(_Strict):
    """How responses are sampled (alignkit.models.generate: batched, KV cache)."""

    prompts: int = Field(16, gt=0)  # prompts per rollout
    # samples per prompt; None: 1 for ppo, 4 for rloo and grpo (which need >= 2)
    group_size: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(16, gt=0)  # generation batch
    # the attention kernel that samples (training keeps model.attn_implementation): auto = sdpa,
    # measured 1.4-1.8x faster than eager for a 32-row batch of the 135M model on the CPU
    attn_implementation: Literal["auto", "eager", "sdpa"] = "auto"
    # padded tokens per no-grad forward when the rollout is evaluated (old and reference
    # log-probs, values): rows go in length-sorted chunks of at most this many (a CPU is
    # fastest at about 1k; a GPU wants far more)
    forward_tokens: int = Field(1024, gt=0)
    # PPO's old log-probs (and the logged entropy): sampler = those the sampler computed as it
    # drew each token (same model, weights and precision; a full fp32 forward of the embedded
    # model differs by at most 3e-5, so the first update's ratio is 1 within that), which saves
    # one full policy forward per rollout; recompute = that extra forward, by the function the
    # updates use (the first update's ratio and the first rollout's KL exactly 1 and 0)
    old_logps: Literal["sampler", "recompute"] = "sampler"
    # subtracted from the score of a response cut at max_new_tokens without EOS
    missing_eos_penalty: float | None = Field(None, ge=0)


class PPOConfig(_Strict):
    """RLHF with a KL penalty to the reference: PPO with a critic, or critic-free RLOO / GRPO.

    One engine step is one optimizer update on ``train.batch_size`` rollout sequences; a rollout
    of ``rollout.prompts × group_size`` sequences serves ``ppo_epochs`` shuffled passes.
    ``train.max_steps`` counts updates; without it, ``train.epochs`` counts passes over the prompts.
    """

    stage: Literal["ppo"] = "ppo"
    algo: Literal["ppo", "rloo", "grpo"] = "ppo"
    model: ModelConfig = ModelConfig()
    data: PromptDataConfig = PromptDataConfig()
    # RLHF's own engine defaults; config.load merges overrides onto them key by key.
    train: TrainConfig = TrainConfig(lr=1e-6, batch_size=8, warmup_ratio=0.0)
    rollout: RolloutConfig = RolloutConfig()
    # The reward: exactly one of a reward model (run folder of `alignkit reward`) or a Python
    # function "module:function" with reward(prompts, responses) -> list[float].
    reward_model: str | None = None
    reward_fn: str | None = None
    reward_normalize: bool = False  # whiten the scores of each rollout (mean 0, std 1)
    reward_clip: float | None = Field(None, gt=0)  # clip scores to [-c, c] (after normalising)
    # KL to the reference: β fixed (kl_target None) or adaptive (Ziegler et al. 2019, eq. 2).
    kl_coef: float = Field(0.05, ge=0)  # β (initial β when adaptive); GRPO's β in its loss
    kl_estimator: Literal["k1", "k2", "k3"] | None = None  # None: k1 (ppo, rloo), k3 (grpo)
    kl_target: float | None = Field(None, gt=0)
    kl_horizon: float = Field(10000.0, gt=0)
    # PPO
    ppo_epochs: int = Field(4, gt=0)
    clip_eps: float = Field(0.2, gt=0)
    value_clip_eps: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True  # ppo only
    target_kl: float | None = Field(None, gt=0)  # stop a rollout's updates past this approx KL
    # padded tokens per forward in an update: a minibatch's rows go through the policy (and the
    # critic) in length-sorted chunks of at most this many, one loss and one backward over all
    # (the same gradient, less work on padding: rollout rows differ in prompt and response
    # length). null = auto: 512 on a CPU (an 8-row minibatch of HH prompts + 64 sampled tokens:
    # padded tokens 1.33x the real ones whole, 1.08x in chunks; an update 1.10x faster measured
    # in fp32), the whole minibatch in one forward on a GPU.
    update_forward_tokens: int | None = Field(None, gt=0)
    # critic (ppo): auto = from the reward model when there is one (InstructGPT), else the policy;
    # reward / policy = a separate network initialised from it (as large as the policy: twice
    # the update work, a third model in memory); shared = a value head on the policy's own trunk
    # (one network: the values come with the policy's forwards, sampling included; the value
    # loss also moves the policy's weights, which critic_lr cannot then set apart)
    critic_init: Literal["auto", "reward", "policy", "shared"] = "auto"
    # Peak learning rates of the critic's trunk (null: train.lr) and of its value head. The head
    # is new (critic_init policy) or must move from reward scale to return scale (critic_init
    # reward); at a policy's 1e-6 it would barely change in a run, and the critic's explained
    # variance would stay negative. Under Adam a head weight moves about value_head_lr per step.
    critic_lr: float | None = Field(None, gt=0)
    value_head_lr: float | None = Field(1e-4, gt=0)
    # reference: auto = adapters disabled with LoRA, else a frozen copy
    reference: Literal["auto", "copy", "adapters"] = "auto"
    sample_every: int = Field(10, ge=0)  # rollouts between samples.jsonl entries; 0 = never
    samples_logged: int = Field(4, gt=0)
    output: str = "runs/ppo"

    @model_validator(mode="after")
    def _consistent(self) -> "PPOConfig":
        if self.reward_model is not None and self.reward_fn is not None:
            raise ValueError("give reward_model or reward_fn, not both")
        if self.reward_fn is not None and ":" not in self.reward_fn:
            raise ValueError(f"reward_fn '{self.reward_fn}' must look like module:function")
        if self.algo != "ppo" and self.group_k < 2:
            raise ValueError(f"{self.algo} needs rollout.group_size >= 2 (a leave-one-out or "
                             f"group baseline), got {self.group_k}")
        if self.algo == "grpo" and self.kl_estimator not in (None, "k3"):
            raise ValueError("grpo puts the k3 KL estimate in its loss; kl_estimator must be k3")
        if self.algo == "grpo" and self.kl_target is not None:
            raise ValueError("grpo keeps β fixed (kl_coef); kl_target is for ppo and rloo")
        if self.critic_init == "reward" and self.reward_model is None and self.algo == "ppo":
            raise ValueError("critic_init reward needs a reward_model")
        return self

    @property
    def group_k(self) -> int:
        if self.rollout.group_size is not None:
            return self.rollout.group_size
        return 1 if self.algo == "ppo" else 4

    @property
    def estimator(self) -> str:
        return self.kl_estimator or ("k3" if self.algo == "grpo" else "k1")
