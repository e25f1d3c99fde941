"""`alignkit report` and `alignkit plot`: a run folder's curves and its HTML/markdown report
(registered on the app in cli.main)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from alignkit.cli.main import app


@app.command()
def report(run: Path = typer.Argument(..., help="A stage's run folder, or a folder of them "
                                                "(a pipeline run)."),
           output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o",
                                                     help="Where to write report.html, "
                                                          "report.md and plots/ (default: "
                                                          "the run folder)."),
           as_json: bool = typer.Option(False, "--json", help="Print the report's data as "
                                                              "JSON instead of the paths."),
           ) -> None:
    """Write a self-contained HTML report (images inlined) and a markdown summary of a run:
    each stage's headline figures, training curves, data report and config."""
    from alignkit.eval.report import write_report
    out = write_report(run, output_dir)
    if as_json:
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return
    print(f"report: {out['html']}\nmarkdown: {out['markdown']}")


@app.command()
def plot(run: Path = typer.Argument(..., help="A stage's run folder."),
         output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o",
                                                   help="Where to write the PNGs (default: "
                                                        "RUN/plots)."),
         as_json: bool = typer.Option(False, "--json", help="Print {name: path} as JSON."),
         ) -> None:
    """Draw a run's training curves from metrics.jsonl (and, for PPO, rollouts.jsonl: the
    reward, KL and reward-vs-KL plots)."""
    from alignkit.errors import InputError
    from alignkit.eval.plots import plot_run
    if not (run / "metrics.jsonl").is_file():
        raise InputError("no metrics.jsonl here: not a training run folder", path=str(run))
    made = plot_run(run, output_dir)
    if as_json:
        print(json.dumps({k: str(v) for k, v in made.items()}, indent=2))
        return
    for name, path in made.items():
        print(f"{name}: {path}")
