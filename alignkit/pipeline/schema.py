"""What a pipeline stage of each kind takes: its inputs and its config schema.

A stage in a pipeline file is ``kind`` + inputs (models and data, each an earlier stage's name or
a path) + ``config`` (the stage's own settings) + optional ``after`` (stages to wait for). The
training kinds (pretrain, sft, reward, dpo, ppo) use the stage schemas of :mod:`alignkit.config`;
the kinds that have no schema elsewhere (their CLI commands take flags) get one here, with the
same defaults as those commands. No torch import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from alignkit.config.ppo import PPOConfig
from alignkit.config.schema import (DPOConfig, PretrainConfig, RewardConfig, SFTConfig,
                                    _Strict)


class CaiStageConfig(_Strict):
    """``alignkit cai revise`` (critique → revision: an SFT set and preference pairs) or
    ``alignkit cai feedback`` (AI-labelled preference pairs)."""

    mode: Literal["revise", "feedback"] = "revise"
    tags: list[Literal["harmless", "honest", "helpful"]] = []  # empty: every principle
    rounds: int = Field(1, gt=0)  # revise: critique → revision rounds
    few_shot: int | None = Field(None, ge=0)  # revise: constitution examples shown (None: all)
    principles: int = Field(4, gt=0)  # feedback: principles sampled per prompt
    max_prompts: int | None = Field(None, gt=0)
    max_new_tokens: int = Field(128, gt=0)
    temperature: float | None = Field(None, ge=0)  # None: 0.7 (revise), 1.0 (feedback)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0)  # prompts per chunk: the unit of resumption
    template: Literal["auto", "chat", "inst", "plain"] = "auto"
    system: str | None = None
    precision: Literal["auto", "bf16", "fp32"] = "auto"

    @property
    def sampling_temperature(self) -> float:
        if self.temperature is not None:
            return self.temperature
        return 0.7 if self.mode == "revise" else 1.0


class EvalStageConfig(_Strict):
    """``alignkit eval``: the alignment-tax table of a policy against its reference."""

    beta: float = Field(0.1, gt=0)  # β of the DPO implicit reward (preference accuracy)
    template: Literal["auto", "chat", "inst", "plain"] = "auto"
    max_new_tokens: int = Field(64, gt=0)
    kl_samples: int | None = Field(None, gt=0)  # None: one per prompt
    max_prompts: int | None = Field(None, gt=0)  # first N of each prompt set
    max_examples: int | None = Field(None, gt=0)  # first N records of heldout / preferences
    max_length: int = Field(512, gt=8)
    batch_size: int = Field(8, gt=0)
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"


class CompareStageConfig(_Strict):
    """``alignkit compare``: several models' answers to one prompt set, side by side."""

    template: Literal["auto", "chat", "inst", "plain"] = "auto"
    system: str | None = None
    max_new_tokens: int = Field(128, gt=0)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(8, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"


class ReportStageConfig(_Strict):
    """``alignkit report`` over the whole run folder (nothing to set yet)."""


Kind = Literal["pretrain", "sft", "reward", "dpo", "ppo", "cai", "eval", "compare", "report"]
KINDS: tuple[str, ...] = Kind.__args__  # type: ignore[attr-defined]
TRAINING_KINDS = ("pretrain", "sft", "reward", "dpo", "ppo")

SCHEMAS = {"pretrain": PretrainConfig, "sft": SFTConfig, "reward": RewardConfig,
           "dpo": DPOConfig, "ppo": PPOConfig, "cai": CaiStageConfig, "eval": EvalStageConfig,
           "compare": CompareStageConfig, "report": ReportStageConfig}


@dataclass(frozen=True)
class Input:
    """One input of a stage kind.

    ``what`` says what it must be and what an earlier stage named there stands for:

    - ``model``: a causal LM: ``embedded``, ``tiny``, a hub id, a folder, a ``.gguf``, or a
      pretrain / sft / dpo / ppo stage (its run folder);
    - ``reward_model``: a reward stage or a reward-model folder;
    - ``sft_data`` / ``preference_data`` / ``prompt_data``: a data file (``hub:NAME`` and
      globs included) or a cai stage (its ``sft.jsonl`` / ``preferences.jsonl``);
    - ``file`` / ``files``: one or several local files (no stage);
    - ``models``: a mapping ``name: model`` (compare).

    ``key`` is where a training stage's config takes it (dotted); None for the other kinds.
    """

    what: str
    required: bool = False
    key: str | None = None


INPUTS: dict[str, dict[str, Input]] = {
    "pretrain": {"model": Input("model", key="model.name_or_path"),
                 "data": Input("file", key="data.path")},
    "sft": {"model": Input("model", key="model.name_or_path"),
            "data": Input("sft_data", key="data.path"),
            "eval_data": Input("sft_data", key="data.eval_path")},
    "reward": {"model": Input("model", key="model.name_or_path"),
               "data": Input("preference_data", True, key="data.path"),
               "eval_data": Input("preference_data", key="data.eval_path")},
    "dpo": {"model": Input("model", key="model.name_or_path"),
            "data": Input("preference_data", True, key="data.path"),
            "eval_data": Input("preference_data", key="data.eval_path"),
            "reference": Input("model", key="reference_model")},
    "ppo": {"model": Input("model", key="model.name_or_path"),
            "data": Input("prompt_data", True, key="data.path"),
            "reward_model": Input("reward_model", key="reward_model")},
    "cai": {"model": Input("model"), "judge": Input("model"), "prompts": Input("files"),
            "constitution": Input("file")},
    "eval": {"model": Input("model", True), "reference": Input("model"),
             "reward_model": Input("reward_model"), "heldout": Input("sft_data"),
             "preferences": Input("preference_data"), "harmful": Input("file"),
             "benign": Input("file")},
    "compare": {"models": Input("models", True), "reward_model": Input("reward_model"),
                "judge": Input("model"), "prompts": Input("file")},
    "report": {},
}

# Stage kinds whose run folder can stand for each kind of input.
PROVIDES = {"model": ("pretrain", "sft", "dpo", "ppo"), "reward_model": ("reward",),
            "sft_data": ("cai",), "preference_data": ("cai",), "prompt_data": ("cai",)}
# The file of a cai stage's folder that stands for a data input.
CAI_FILES = {"sft_data": "sft.jsonl", "preference_data": "preferences.jsonl",
             "prompt_data": "preferences.jsonl"}

STAGE_KEYS = ("kind", "config", "after")  # besides the kind's inputs
TOP_KEYS = ("name", "description", "output", "defaults", "stages")
# Names that are models, never stage names.
MODEL_WORDS = ("embedded", "default", "tiny")
