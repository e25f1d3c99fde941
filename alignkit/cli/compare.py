"""`alignkit compare`: several models side by side on a prompt set (registered on the app in
cli.main); the work lives in alignkit.eval.compare."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from alignkit.cli.main import app


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout stays the table or the JSON


@app.command()
def compare(model: Optional[list[str]] = typer.Option(
                None, "--model", "-m",
                help="A model to compare (repeatable): NAME=SOURCE or SOURCE, where SOURCE is "
                     "embedded, a hub id, a folder or run folder, tiny, or an OpenAI-compatible "
                     "endpoint http(s)://HOST/v1#MODEL. Default: the embedded model."),
            prompts: Optional[Path] = typer.Option(
                None, "--prompts", help="Prompts: .txt (one per line) or .jsonl with 'prompt' "
                                        "or 'instruction'. Default: the lesson's five lab "
                                        "prompts."),
            template: str = typer.Option("auto", help="chat, inst, plain or auto."),
            system: Optional[str] = typer.Option(None, help="System prompt for every model."),
            max_new_tokens: int = typer.Option(128, help="Most tokens per answer."),
            temperature: float = typer.Option(0.0, help="Sampling temperature; 0 = greedy."),
            top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
            seed: int = typer.Option(0, help="Sampling seed."),
            batch_size: int = typer.Option(8, help="Prompts generated (or scored) together."),
            reward_model: Optional[str] = typer.Option(
                None, help="Reward-model folder (from `alignkit reward`): score every answer "
                           "and give win rates by score."),
            judge: Optional[str] = typer.Option(
                None, help="AI judge (a model spec, local or endpoint): asked which of two "
                           "answers is better, in both orders; gives win rates."),
            api_key_env: str = typer.Option(
                "OPENAI_API_KEY", help="Environment variable holding the endpoints' API key "
                                       "(never written anywhere)."),
            tokenizer: Optional[str] = typer.Option(
                None, help="Model whose tokenizer counts every answer's tokens. Default: the "
                           "first local model's, else the embedded model's."),
            output_dir: Optional[Path] = typer.Option(
                None, "--output-dir", "-o", help="Write compare.json, compare.md and "
                                                 "compare.html here."),
            as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
            ) -> None:
    """Compare models side by side on a prompt set: answers, length, refusals, structure,
    hedging, reward-model scores, and pairwise win rates (reward model or AI judge)."""
    from alignkit.eval import compare as cmp
    from alignkit.models.endpoint import parse_model_spec

    specs = model or ["embedded"]
    models = [parse_model_spec(s, api_key_env=api_key_env) for s in specs]
    judge_spec = (parse_model_spec(judge, api_key_env=api_key_env, field="judge")
                  if judge else None)
    prompt_list, source = _prompts(prompts)
    tok = _tokenizer(tokenizer)
    result = cmp.run_compare(models, prompt_list, template=template, system=system,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             seed=seed, batch_size=batch_size, reward_model=reward_model,
                             judge=judge_spec, tokenizer=tok, tokenizer_name=tokenizer,
                             prompts_source=source, log=_log)
    paths = cmp.write_outputs(result, output_dir) if output_dir is not None else None
    if as_json:
        data = result.to_dict()
        if paths is not None:
            data["outputs"] = {k: str(v) for k, v in paths.items()}
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return
    sys.stdout.write(cmp.render_terminal(result))
    for kind, path in (paths or {}).items():
        print(f"{kind}: {path}")


def _prompts(file: Optional[Path]) -> tuple[list[str], str]:
    from alignkit.cli.generate import read_prompts
    from alignkit.data.prompts import LAB_PROMPTS
    from alignkit.errors import InputError
    if file is None:
        return list(LAB_PROMPTS), "lab prompts"
    prompts = read_prompts(file)
    if not prompts:
        raise InputError("no prompts in this file", path=str(file), field="prompts")
    return prompts, str(file)


def _tokenizer(spec: Optional[str]):
    if spec is None:
        return None
    from alignkit.config.schema import ModelConfig
    from alignkit.models.load import load_tokenizer
    return load_tokenizer(ModelConfig(name_or_path=None if spec in ("embedded", "default")
                                      else spec))
