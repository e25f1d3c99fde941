"""`alignkit analyze`: what a preference file teaches (registered on the app in cli.main)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from alignkit.cli.main import app


@app.command()
def analyze(data: str = typer.Argument(..., help="Preference data: .jsonl/.json/.csv/.parquet, "
                                                 "a saved HF dataset folder, hub:NAME, or a quoted glob."),
            model: Optional[str] = typer.Option(None, help="Model whose tokenizer measures "
                                                "tokens ('tiny' for tests). Default: the "
                                                "embedded SmolLM2-135M-Instruct."),
            template: str = typer.Option("auto", help="chat, inst, plain or auto."),
            max_length: int = typer.Option(512, help="Count the pairs this many tokens would "
                                                     "truncate (prompt + longer completion)."),
            output_dir: Optional[Path] = typer.Option(None, help="Write analysis.json, "
                                                      "analysis.md and PNG plots here."),
            as_json: bool = typer.Option(False, "--json", help="Print the JSON summary only."),
            ) -> None:
    """Analyse preference data: length bias, token lengths and truncation, duplicates,
    structure / nuance / refusal rates, and a template audit of one sample."""
    from alignkit.config.schema import ModelConfig
    from alignkit.errors import InputError
    from alignkit.eval.analyze import analyze_file, render_markdown, write_outputs
    from alignkit.models.load import load_tokenizer

    if max_length < 2:
        raise InputError(f"must be at least 2, got {max_length}", field="max_length")
    tokenizer = load_tokenizer(ModelConfig(name_or_path=model))
    analysis = analyze_file(data, tokenizer, template=template, max_length=max_length)
    if output_dir is not None:
        paths = write_outputs(analysis, output_dir)
    if as_json:
        print(json.dumps(analysis.summary, indent=2, ensure_ascii=False))
        return
    print(render_markdown(analysis.summary), end="")
    if output_dir is not None:
        print("\nwrote: " + ", ".join(str(p) for p in paths.values()))
