"""Command line: argument parsing only; the work lives in stages/ and models/.

Every user-facing failure is one line on stderr and exit code 2 — never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from alignkit.errors import AlignkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="alignkit: align language models (SFT, reward models, PPO, DPO, "
                       "Constitutional AI) and measure what alignment did.")

# Shared options of every training stage (typer reads the defaults; None = "not given").
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file; flags override it.")
ModelOpt = typer.Option(None, help="HF hub id, local folder, .gguf file, run folder or 'tiny'. "
                                   "Default: the embedded SmolLM2-135M-Instruct.")
DataOpt = typer.Option(None, help="Training data: .jsonl/.json/.csv/.parquet, a saved HF dataset "
                                  "folder, hub:NAME, or a quoted glob. Default: the shipped demo set.")
OutputOpt = typer.Option(None, "--output", "-o", help="Run folder to write (resumed if unfinished).")
MaxStepsOpt = typer.Option(None, help="Optimizer steps (overrides --epochs).")
EpochsOpt = typer.Option(None, help="Passes over the training data.")
BatchOpt = typer.Option(None, help="Examples per optimizer step per process.")
AccumOpt = typer.Option(None, help="Micro-batches per optimizer step (gradient accumulation).")
LrOpt = typer.Option(None, help="Peak learning rate.")
SeedOpt = typer.Option(None, help="Random seed (data order, initialisation, sampling).")
LoraOpt = typer.Option(None, "--lora/--no-lora", help="Train LoRA adapters instead of all weights.")
TemplateOpt = typer.Option(None, help="chat (the tokenizer's chat template), inst "
                                      "([INST] … [/INST]), plain, or auto.")
MaxLenOpt = typer.Option(None, help="Maximum tokens per example (longer ones are truncated "
                                    "per data.truncation).")
PrecisionOpt = typer.Option(None, help="auto (bf16 where fast), bf16 or fp32.")
DeviceOpt = typer.Option(None, help="auto, cpu or cuda.")
SetOpt = typer.Option(None, "--set", help="Any config key: --set train.warmup_ratio=0.1 (repeatable).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Delete the output folder first.")


def _overrides(**flags: Any) -> dict[str, Any]:
    mapping = {"model": "model.name_or_path", "data": "data.path", "output": "output",
               "max_steps": "train.max_steps", "epochs": "train.epochs",
               "batch_size": "train.batch_size", "grad_accum": "train.grad_accum",
               "lr": "train.lr", "seed": "train.seed", "lora": "model.lora.enabled",
               "template": "data.template", "max_length": "data.max_length",
               "precision": "train.precision", "device": "train.device",
               # stage-level keys (reward, dpo, ppo) keep their names
               "beta": "beta", "loss_type": "loss_type", "reference": "reference",
               "ranked_loss": "ranked_loss"}
    out = {mapping[k]: v for k, v in flags.items() if k in mapping and v is not None}
    from alignkit.config.load import parse_override
    for item in flags.get("set") or []:
        key, value = parse_override(item)
        out[key] = value
    return out


def _train_stage(schema, config, overwrite, run=None, **flags) -> None:
    """Config = schema ← YAML ← flags (--set last, so it wins), then the stage's run()."""
    from alignkit.config.load import build_config
    if run is None:
        from alignkit.stages.sft import run
    run(build_config(schema, path=config, overrides=_overrides(**flags)), overwrite=overwrite)


@app.command()
def sft(config: Optional[Path] = ConfigOpt, model: Optional[str] = ModelOpt,
        data: Optional[str] = DataOpt, output: Optional[str] = OutputOpt,
        max_steps: Optional[int] = MaxStepsOpt, epochs: Optional[float] = EpochsOpt,
        batch_size: Optional[int] = BatchOpt, grad_accum: Optional[int] = AccumOpt,
        lr: Optional[float] = LrOpt, seed: Optional[int] = SeedOpt,
        lora: Optional[bool] = LoraOpt, template: Optional[str] = TemplateOpt,
        max_length: Optional[int] = MaxLenOpt, precision: Optional[str] = PrecisionOpt,
        device: Optional[str] = DeviceOpt, set: Optional[list[str]] = SetOpt,
        overwrite: bool = OverwriteOpt) -> None:
    """Supervised fine-tuning: loss on the response tokens only."""
    from alignkit.config.schema import SFTConfig
    _train_stage(SFTConfig, config, overwrite, **{k: v for k, v in locals().items()
                                                  if k not in ("config", "overwrite")})


@app.command()
def pretrain(config: Optional[Path] = ConfigOpt, model: Optional[str] = ModelOpt,
             data: Optional[str] = DataOpt, output: Optional[str] = OutputOpt,
             max_steps: Optional[int] = MaxStepsOpt, epochs: Optional[float] = EpochsOpt,
             batch_size: Optional[int] = BatchOpt, grad_accum: Optional[int] = AccumOpt,
             lr: Optional[float] = LrOpt, seed: Optional[int] = SeedOpt,
             lora: Optional[bool] = LoraOpt, max_length: Optional[int] = MaxLenOpt,
             precision: Optional[str] = PrecisionOpt, device: Optional[str] = DeviceOpt,
             set: Optional[list[str]] = SetOpt, overwrite: bool = OverwriteOpt) -> None:
    """(Continued) pre-training: next-token loss on raw text packed into fixed blocks."""
    from alignkit.config.schema import PretrainConfig
    _train_stage(PretrainConfig, config, overwrite, **{k: v for k, v in locals().items()
                                                       if k not in ("config", "overwrite")})


@app.command()
def generate(prompts: Optional[list[str]] = typer.Argument(None, help="Prompts (or use --file)."),
             file: Optional[Path] = typer.Option(None, help="Prompts: .txt (one per line) or "
                                                 ".jsonl with a 'prompt' field."),
             model: Optional[str] = ModelOpt, template: str = typer.Option("auto", help="chat, inst, plain or auto."),
             system: Optional[str] = typer.Option(None, help="System prompt."),
             max_new_tokens: int = typer.Option(128, help="Most tokens per answer."),
             temperature: float = typer.Option(0.0, help="Sampling temperature; 0 = greedy."),
             top_p: float = typer.Option(1.0, help="Nucleus sampling: keep the smallest set of "
                                                   "tokens with this much probability."),
             batch_size: int = typer.Option(8, help="Prompts generated together."),
             seed: int = typer.Option(0, help="Sampling seed."),
             precision: str = typer.Option("auto", help="auto, bf16 or fp32."),
             output: Optional[Path] = typer.Option(None, "--output", "-o",
                                                   help="JSONL file (default: stdout)."),
             lab: bool = typer.Option(False, "--lab", help="Use the lesson's five lab prompts.")
             ) -> None:
    """Generate answers (batched, KV cache); JSONL out."""
    from alignkit.cli.generate import run_generate
    run_generate(prompts=list(prompts or []), file=file, model=model, template=template,
                 system=system, max_new_tokens=max_new_tokens, temperature=temperature,
                 top_p=top_p, batch_size=batch_size, seed=seed, precision=precision,
                 output=output, lab=lab)


@app.command()
def demo(output: str = typer.Option("runs/demo", "--output", "-o"),
         quick: bool = typer.Option(False, help="A tiny random model and a few steps (for tests)."),
         max_steps: Optional[int] = typer.Option(None, help="SFT steps (default: 40, as in "
                                                            "configs/demo.yaml)."),
         overwrite: bool = OverwriteOpt) -> None:
    """The main job: the whole pipeline on the embedded SmolLM2-135M (SFT, reward model, DPO,
    PPO, Constitutional AI, evaluation) and an HTML report with base / aligned answers side by
    side (configs/demo.yaml; under 15 minutes on a 2-core CPU)."""
    from alignkit.cli.demo import run_demo
    run_demo(output=output, quick=quick, max_steps=max_steps, overwrite=overwrite)


# Stage commands that live in their own modules register themselves on `app` when imported.
from alignkit.cli import dpo as _dpo  # noqa: E402,F401
from alignkit.cli import reward as _reward  # noqa: E402,F401
from alignkit.cli import ppo as _ppo  # noqa: E402,F401
from alignkit.cli import analyze as _analyze  # noqa: E402,F401
from alignkit.cli import report as _report  # noqa: E402,F401
from alignkit.cli import evaluate as _evaluate  # noqa: E402,F401
from alignkit.cli import compare as _compare  # noqa: E402,F401
from alignkit.cli import cai as _cai  # noqa: E402,F401
from alignkit.cli import serve as _serve  # noqa: E402,F401
from alignkit.cli import run as _run  # noqa: E402,F401


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    try:
        app(args=argv, standalone_mode=False)
    except AlignkitError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click's usage errors arrive here with standalone_mode=False
        import click
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


def _quiet_libraries() -> None:
    """Our own progress line is the one that matters; the libraries' load/save bars are noise."""
    import os
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    # Run as `python -m alignkit.cli.main`, this file is `__main__`, and the stage modules
    # register their commands on the importable `alignkit.cli.main`: call that one.
    from alignkit.cli.main import main as _main
    _main()
