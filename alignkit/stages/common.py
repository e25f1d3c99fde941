"""What every training stage shares: the run folder protocol and the token-level LM loss module.

Run folder ``<output>/``: ``config.yaml`` (resolved), ``metrics.jsonl``, ``checkpoints/``, the
final model in Hugging Face layout, ``data_report.json``, and ``DONE`` written last. A folder
without ``DONE`` is an unfinished run and is resumed, never taken for a result.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml
from pydantic import BaseModel

from alignkit.engine import dist
from alignkit.errors import AlignkitError
from alignkit.losses.logprobs import shifted_targets
from alignkit.losses.sft import sft_loss
from alignkit.models.logps import split_lm

DONE = "DONE"


class RunDir:
    def __init__(self, output: str | Path, cfg: BaseModel, *, overwrite: bool = False) -> None:
        self.path = Path(output)
        self.cfg = cfg
        if overwrite and dist.is_main() and self.path.exists():
            shutil.rmtree(self.path)
        dist.barrier()

    @property
    def done(self) -> bool:
        return (self.path / DONE).is_file()

    def prepare(self) -> None:
        """Create the folder and write the resolved config; refuse to mix two different runs.
        Rank 0 decides and every rank learns the verdict (no rank may skip the collective)."""
        problem = self._check_or_write() if dist.is_main() else None
        problem = dist.broadcast_object(problem)
        if problem:
            raise AlignkitError(problem)

    def _check_or_write(self) -> str | None:
        cfg_file = self.path / "config.yaml"
        if cfg_file.is_file():
            old = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
            key = _first_difference(old, self.cfg.model_dump(mode="json"))
            if key is not None:
                return (f"{self.path} holds a run with a different config (first difference: "
                        f"'{key}'); choose another --output or pass --overwrite")
            return None
        from alignkit.config.load import dump_config
        self.path.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, cfg_file)
        return None

    def write_json(self, name: str, data: dict) -> None:
        if dist.is_main():
            tmp = self.path / f".{name}.tmp"
            tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
            tmp.replace(self.path / name)

    def save_model(self, model, tokenizer) -> None:
        """Save the final model into the run folder itself (so ``from_pretrained(output)`` loads it),
        staged in a temporary folder first; ``DONE`` is what makes the run complete."""
        from alignkit.engine import sharded
        model = sharded.gathered(model)  # FSDP: every rank sends its shards; rank 0 saves
        if not dist.is_main():
            return
        from alignkit.models.load import save_model
        stage = self.path / ".model-tmp"
        shutil.rmtree(stage, ignore_errors=True)
        save_model(model, tokenizer, stage)
        for item in stage.iterdir():
            target = self.path / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
        stage.rmdir()

    def finish(self, summary: dict) -> None:
        self.write_json(DONE, summary)
        dist.barrier()


@dataclass
class Stage:
    """What a training stage's run() holds once the shared opening is done."""

    run_dir: RunDir
    rt: object  # engine.device.Runtime
    log: Callable[[str], None]
    t0: float
    done: bool = False


def begin(cfg, *, overwrite: bool, log) -> Stage:
    """The opening every training stage shares: join the process group, open the run folder,
    resolve device and precision, threads and the seed. ``done`` says the run is complete."""
    from alignkit.engine.device import resolve_runtime, set_num_threads
    dist.init()
    log = log if dist.is_main() else (lambda *_: None)
    run_dir = RunDir(cfg.output, cfg, overwrite=overwrite)
    if run_dir.done:
        log(f"{run_dir.path} is already complete (remove it or pass --overwrite to train again)")
        return Stage(run_dir, None, log, time.perf_counter(), done=True)
    rt = resolve_runtime(cfg.train.device, cfg.train.precision, local_rank=dist.local_rank())
    set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    return Stage(run_dir, rt, log, time.perf_counter())


def describe(cfg, model, rt, what: str = "model", extra: str = "") -> str:
    """One line: which model, how many parameters train, where, at which precision."""
    from alignkit.models.lora import trainable_parameters
    trainable, total = trainable_parameters(model)
    name = cfg.model.name_or_path or "embedded SmolLM2-135M-Instruct"
    return (f"{what} {name}: {trainable:,} of {total:,} parameters train; {extra}{rt.device}, "
            f"{'bf16 autocast' if rt.autocast_dtype else 'fp32'}")


def end(stage: Stage, model, tokenizer, result, summary: dict | None = None) -> Path:
    """Save the final model, then write DONE (last, so a kill never leaves a complete-looking
    folder)."""
    stage.run_dir.save_model(model, tokenizer)
    summary = dict(summary or {
        "steps": result.steps, "train": result.last, "eval": result.eval,
        "resumed_from": result.resumed_from, "wall_s": round(time.perf_counter() - stage.t0, 2)})
    summary.setdefault("throughput", result.throughput)
    summary.setdefault("peak_memory", peak_memory())
    stage.run_dir.finish(summary)
    stage.log(f"saved to {stage.run_dir.path}")
    return stage.run_dir.path


def peak_memory() -> dict:
    """This process's peak resident memory (GB; Linux reports KiB, macOS bytes) and, on CUDA,
    the peak memory PyTorch allocated on the current device."""
    import resource
    import sys
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"rss_gb": round(rss / (2**30 if sys.platform == "darwin" else 2**20), 3)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_allocated_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def _first_difference(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


class CausalLMLoss(torch.nn.Module):
    """forward(input_ids, attention_mask, loss_mask) → (Σ token NLL, {"token_acc": Σ correct}).

    The LM head runs only on positions that predict a target token: prompt and padding
    positions never pay for the (V × H) projection, and log-softmax runs in fp32.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, loss_mask):
        trunk, head = split_lm(self.model)
        hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                       use_cache=False).last_hidden_state  # (B, T, H)
        positions, labels = shifted_targets(input_ids, loss_mask)
        logits = head(hidden[positions])  # (N, V)
        out = sft_loss(logits, labels)
        return out.token_losses.sum(), {"token_acc": out.correct.sum()}
