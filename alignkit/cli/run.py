"""`alignkit run PIPELINE.yaml`: the stages of one pipeline file, in order, resumably
(registered on the app in alignkit.cli.main); the work lives in alignkit.pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from alignkit.cli.main import app


def _names(value: Optional[str]) -> Optional[list[str]]:
    return [n.strip() for n in value.split(",") if n.strip()] if value else None


@app.command("run")
def run_pipeline(
        pipeline: Path = typer.Argument(..., help="Pipeline YAML: named stages (kind, inputs, "
                                                  "config). See docs/stages.md."),
        output: Optional[str] = typer.Option(None, "--output", "-o",
                                             help="Run folder (default: the file's 'output', "
                                                  "else runs/<file name>)."),
        only: Optional[str] = typer.Option(None, help="Run only these stages (comma-separated); "
                                                      "what they take must have finished."),
        start: Optional[str] = typer.Option(None, "--from", help="Run this stage and every "
                                                                 "stage after it in the plan."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved plan and "
                                                              "validate every config; load no "
                                                              "model."),
        set: Optional[list[str]] = typer.Option(None, "--set", help="Override a key: "
                                                "STAGE.config.train.lr=1e-5, STAGE.model=tiny, "
                                                "defaults.train.precision=fp32 (repeatable)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Delete the selected "
                                                                  "stages' folders first and "
                                                                  "run them again.")) -> None:
    """Run a pipeline file: each stage writes <run>/<stage>/; finished stages are skipped and
    an interrupted one resumes from its last checkpoint."""
    run_file(pipeline, output=output, only=_names(only), start=start, dry_run=dry_run,
             overrides=list(set or []), overwrite=overwrite)


def run_file(pipeline: Path, *, output=None, only=None, start=None, dry_run=False,
             overrides=(), overwrite=False, log=print):
    """Plan (validating everything), then print it or run it; returns the plan."""
    from alignkit.pipeline.execute import describe_plan, run_plan
    from alignkit.pipeline.plan import load_plan, select
    plan = load_plan(pipeline, output=output, overrides=list(overrides))
    selected = select(plan, only=only, start=start)
    if dry_run:
        log(describe_plan(plan, selected))
        log(f"{len(plan.stages)} stages valid; {len(selected)} selected; nothing was run")
        return plan
    log(describe_plan(plan, selected))
    run_plan(plan, only=only, start=start, overwrite=overwrite, log=log)
    return plan
