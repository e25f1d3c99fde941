"""The training runs of tests/engine/test_distributed.py: configs shared by the one-process
baselines and the two-process runs, and a driver that torchrun starts once for all of them.

    python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        -m tests.engine.dist_runs ROOT NAME...

One launch runs every two-process case in turn (process start and imports cost more than the
tiny trainings themselves on a 2-core machine). Batch sizes and ``rollout.prompts`` are per
process: the two-process runs use half of what the one-process baselines use, so the global
batch is the same.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit.config import DPOConfig, SFTConfig, build_config
from alignkit.config.ppo import PPOConfig

SFT_DATA = [{"instruction": f"Add {a} and {b}.", "response": f"{a} plus {b} is {a + b}."}
            for a in range(8) for b in range(5)]  # 40
PAIRS = [{"prompt": f"Add {a} and {b}.", "chosen": f"{a} plus {b} is {a + b}.",
          "rejected": "No."} for a in range(6) for b in range(4)]  # 24
PROMPTS = [{"prompt": f"Say something about {w}."}
           for w in "cats dogs rain sun tea code bread rivers".split()]  # 8

COMMON = {"model.name_or_path": "tiny", "train.precision": "fp32", "train.device": "cpu",
          "train.progress": False, "train.num_threads": 1, "train.warmup_steps": 0}


def letters(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward with signal on a random byte-level model: the share of ASCII lowercase letters."""
    return [sum("a" <= c <= "z" for c in r) / (len(r) + 1) for r in responses]


def write_data(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, records in (("sft.jsonl", SFT_DATA), ("pairs.jsonl", PAIRS),
                          ("prompts.jsonl", PROMPTS)):
        (root / name).write_text("".join(json.dumps(r) + "\n" for r in records))


def sft_cfg(root: Path, name: str, procs: int, **over) -> SFTConfig:
    """6 steps of 8 examples (2 micro-batches each), a sharded or plain checkpoint every 2."""
    return build_config(SFTConfig, overrides=COMMON | {
        "data.path": str(root / "sft.jsonl"), "output": str(root / name),
        "data.template": "inst", "data.eval_fraction": 0.1, "train.batch_size": 8 // procs,
        "train.grad_accum": 2 if procs == 1 else 1, "train.lr": 3e-3, "train.max_steps": 6,
        "train.save_every": 2} | over)


def sft_lora_cfg(root: Path, name: str, procs: int, **over) -> SFTConfig:
    """LoRA adapters (frozen base weights in the same FSDP units) and activation checkpointing.
    No LoRA dropout: its masks are drawn per process, so they differ from one process's."""
    return sft_cfg(root, name, procs, **{"model.lora.enabled": True, "train.max_steps": 4,
                                         "model.lora.dropout": 0.0,
                                         "model.gradient_checkpointing": True,
                                         "train.save_every": None} | over)


def dpo_cfg(root: Path, name: str, procs: int, **over) -> DPOConfig:
    """4 steps of 8 pairs against the precomputed reference (computed over both processes)."""
    return build_config(DPOConfig, overrides=COMMON | {
        "data.path": str(root / "pairs.jsonl"), "output": str(root / name),
        "data.template": "inst", "data.eval_fraction": 0.0, "train.batch_size": 8 // procs,
        "train.lr": 5e-3, "train.max_steps": 4, "beta": 0.5} | over)


def ppo_cfg(root: Path, name: str, procs: int, **over) -> PPOConfig:
    """PPO with a critic and a frozen-copy reference: 2 rollouts of 4 prompts × 2 samples
    (temperature 1), each trained for 2 passes of 2 minibatches of 4 sequences. Generation
    chunks of 2 rows, so each process's share is whole chunks."""
    return build_config(PPOConfig, overrides=COMMON | {
        "data.path": str(root / "prompts.jsonl"), "output": str(root / name),
        "reward_fn": "tests.engine.dist_runs:letters", "rollout.prompts": 4 // procs,
        "rollout.group_size": 2, "rollout.batch_size": 2, "rollout.max_new_tokens": 8,
        "train.batch_size": 4 // procs, "ppo_epochs": 2, "train.max_steps": 8,
        "train.lr": 3e-3, "train.schedule": "constant"} | over)


class Interrupted(Exception):
    pass


def _interrupted_then_resumed(root: Path, name: str) -> None:
    """The sft-fsdp run, stopped before its 5th update (its last checkpoint is step 4), then
    started again in the same processes: the second start resumes from the sharded checkpoint."""
    from alignkit.engine import loop
    from alignkit.stages import sft
    cfg = sft_cfg(root, name, 2, **{"train.parallel": "fsdp"})
    real = loop._guard

    def stop_at_5(loss, grad_norm, step, *args, **kwargs):
        if step == 5:  # after the 5th backward, before its update
            raise Interrupted
        return real(loss, grad_norm, step, *args, **kwargs)

    loop._guard = stop_at_5
    try:
        sft.run(cfg, overwrite=True, log=lambda *_: None)
        raise AssertionError("the run was not interrupted")
    except Interrupted:
        pass
    finally:
        loop._guard = real
    sft.run(cfg, log=print)  # prints "resuming from …" on rank 0


def run(root: Path, name: str) -> None:
    from alignkit.stages import dpo, ppo, sft
    stage, parallel = name.rsplit("-", 1)
    if name == "sft-fsdp-resumed":
        return _interrupted_then_resumed(root, name)
    make, stage_run = {"sft": (sft_cfg, sft.run), "sftlora": (sft_lora_cfg, sft.run),
                       "dpo": (dpo_cfg, dpo.run), "ppo": (ppo_cfg, ppo.run)}[stage]
    procs = 1 if parallel == "one" else 2
    over = {} if procs == 1 else {"train.parallel": parallel}
    stage_run(make(root, name, procs, **over), overwrite=True, log=lambda *_: None)


def main(argv: list[str]) -> None:
    root = Path(argv[0])
    for name in argv[1:]:
        run(root, name)


if __name__ == "__main__":
    main(sys.argv[1:])
