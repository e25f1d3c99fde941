"""`alignkit dpo` commands (registered on the app in alignkit.cli.main)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from alignkit.cli.main import (AccumOpt, BatchOpt, ConfigOpt, DeviceOpt, EpochsOpt, LoraOpt,
                               LrOpt, MaxLenOpt, MaxStepsOpt, ModelOpt, OutputOpt, OverwriteOpt,
                               PrecisionOpt, SeedOpt, SetOpt, TemplateOpt, _train_stage, app)

PreferenceDataOpt = typer.Option(None, help="Preference data (required): .jsonl/.json/.csv/"
                                            ".parquet, a saved HF dataset folder, hub:NAME or "
                                            "a glob; pairs (prompt, chosen, rejected), HH-RLHF "
                                            "transcripts, or ranked lists.")
BetaOpt = typer.Option(None, help="β: strength of the pull towards the reference "
                                  "(DPO's KL coefficient).")
LossTypeOpt = typer.Option(None, help="sigmoid (DPO), robust, ipo, hinge or simpo.")
ReferenceOpt = typer.Option(None, help="auto (adapters with LoRA, else precomputed), copy, "
                                       "adapters or precomputed.")


@app.command()
def dpo(config: Optional[Path] = ConfigOpt, model: Optional[str] = ModelOpt,
        data: Optional[str] = PreferenceDataOpt, output: Optional[str] = OutputOpt,
        max_steps: Optional[int] = MaxStepsOpt, epochs: Optional[float] = EpochsOpt,
        batch_size: Optional[int] = BatchOpt, grad_accum: Optional[int] = AccumOpt,
        lr: Optional[float] = LrOpt, seed: Optional[int] = SeedOpt,
        lora: Optional[bool] = LoraOpt, template: Optional[str] = TemplateOpt,
        max_length: Optional[int] = MaxLenOpt, precision: Optional[str] = PrecisionOpt,
        device: Optional[str] = DeviceOpt, beta: Optional[float] = BetaOpt,
        loss_type: Optional[str] = LossTypeOpt, reference: Optional[str] = ReferenceOpt,
        set: Optional[list[str]] = SetOpt, overwrite: bool = OverwriteOpt) -> None:
    """Direct Preference Optimization (and IPO, SLiC hinge, robust DPO, SimPO) on preference
    pairs or ranked lists: no reward model, no sampling."""
    from alignkit.config.schema import DPOConfig
    from alignkit.stages.dpo import run
    _train_stage(DPOConfig, config, overwrite, run, **{
        k: v for k, v in locals().items() if k not in ("config", "overwrite", "DPOConfig", "run")})
