"""`alignkit reward` and `alignkit score` (registered on the app in alignkit.cli.main)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from alignkit.cli.main import (AccumOpt, BatchOpt, ConfigOpt, DeviceOpt, EpochsOpt, LoraOpt,
                               LrOpt, MaxLenOpt, MaxStepsOpt, ModelOpt, OutputOpt, OverwriteOpt,
                               PrecisionOpt, SeedOpt, SetOpt, TemplateOpt, _train_stage, app)

# Not main's DataOpt: there is no shipped preference set to fall back on.
PreferenceDataOpt = typer.Option(None, "--data", help="Preference data (required): pairs "
                                 "(prompt, chosen, rejected[, margin, label]), HH-RLHF "
                                 "transcripts, or ranked lists (prompt, responses, ranking | "
                                 "scores); .jsonl/.json/.csv/.parquet, a saved HF dataset "
                                 "folder, hub:NAME, or a quoted glob (data/*/train.jsonl).")
RankedLossOpt = typer.Option(None, help="Ranked lists: 'pairs' (all K(K-1)/2 pairs, "
                                        "InstructGPT) or 'plackett_luce' (listwise).")


@app.command()
def reward(config: Optional[Path] = ConfigOpt, model: Optional[str] = ModelOpt,
           data: Optional[str] = PreferenceDataOpt, output: Optional[str] = OutputOpt,
           max_steps: Optional[int] = MaxStepsOpt, epochs: Optional[float] = EpochsOpt,
           batch_size: Optional[int] = BatchOpt, grad_accum: Optional[int] = AccumOpt,
           lr: Optional[float] = LrOpt, seed: Optional[int] = SeedOpt,
           lora: Optional[bool] = LoraOpt, template: Optional[str] = TemplateOpt,
           max_length: Optional[int] = MaxLenOpt, precision: Optional[str] = PrecisionOpt,
           device: Optional[str] = DeviceOpt, set: Optional[list[str]] = SetOpt,
           ranked_loss: Optional[str] = RankedLossOpt,
           overwrite: bool = OverwriteOpt) -> None:
    """Reward model: a scalar head on the last token, trained on preference pairs
    (Bradley-Terry) or ranked lists."""
    from alignkit.config.schema import RewardConfig
    from alignkit.stages.reward import run
    _train_stage(RewardConfig, config, overwrite, run, **{
        k: v for k, v in locals().items() if k not in ("config", "overwrite", "RewardConfig",
                                                       "run")})


@app.command()
def score(model: str = typer.Option(..., help="Reward model folder (written by alignkit reward)."),
          data: str = typer.Option(..., help="JSONL (or .json/.csv/.parquet) of records with "
                                             "'prompt' and 'response', or 'messages' ending "
                                             "with an assistant turn."),
          output: str = typer.Option(..., "--output", "-o", help="JSONL: each record plus "
                                                                 "'score'."),
          template: str = typer.Option("auto", help="chat, inst, plain or auto; use the "
                                                    "template the model was trained with."),
          batch_size: int = typer.Option(8, min=1, help="Records scored together."),
          max_length: Optional[int] = typer.Option(
              None, help="Most tokens per record (default 512); a longer prompt loses its "
                         "start, then the response its end."),
          precision: str = typer.Option("auto", help="auto (bf16 where fast), bf16 or fp32."),
          device: str = typer.Option("auto", help="auto, cpu or cuda.")) -> None:
    """Score (prompt, response) records with a trained reward model."""
    from alignkit.stages.reward import score_file
    score_file(model=model, data=data, output=output, template=template, batch_size=batch_size,
               max_length=max_length, device=device, precision=precision)
