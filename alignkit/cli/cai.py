"""`alignkit cai revise` and `alignkit cai feedback`: Constitutional AI data (registered on the
app in cli.main); the work lives in alignkit.stages.cai."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from alignkit.cli.main import app

cai_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                      help="Constitutional AI (Bai et al. 2022): critique → revision data for "
                           "SFT, and AI-labelled preference pairs (RLAIF) for reward/DPO.")
app.add_typer(cai_app, name="cai")

PromptsOpt = typer.Option(None, "--prompts", "-p",
                          help="Prompt file (repeatable): .txt (one per line) or .jsonl/.json/"
                               ".csv with 'prompt' and optional 'id', 'category'. Default: "
                               "the shipped red_team_v1 and helpful_v1 sets.")
ModelOpt = typer.Option("embedded", "--model", "-m",
                        help="Generating model: NAME=SOURCE or SOURCE (embedded, a hub id, a "
                             "folder or run folder, tiny, or http(s)://HOST/v1#MODEL).")
ConstitutionOpt = typer.Option(None, "--constitution",
                               help="Constitution YAML. Default: the shipped "
                                    "constitution_v1.yaml.")
TagOpt = typer.Option(None, "--tag", help="Use only principles with this tag (repeatable): "
                                          "harmless, honest, helpful.")
OutputOpt = typer.Option(..., "--output", "-o", help="Output folder (resumed if it holds an "
                                                     "unfinished run).")
MaxPromptsOpt = typer.Option(None, help="Use only the first N prompts.")
MaxTokensOpt = typer.Option(128, help="Most tokens per generated text.")
TopPOpt = typer.Option(1.0, help="Nucleus sampling mass.")
SeedOpt = typer.Option(0, help="Seed for principles and sampling.")
BatchOpt = typer.Option(8, help="Prompts per chunk (generated together; the unit of "
                                "resumption).")
TemplateOpt = typer.Option("auto", help="chat, inst, plain or auto (local models).")
SystemOpt = typer.Option(None, help="System prompt for every generation.")
PrecisionOpt = typer.Option("auto", help="auto, bf16 or fp32 (local models).")
KeyOpt = typer.Option("OPENAI_API_KEY", help="Environment variable holding the endpoints' API "
                                             "key (never written anywhere).")
TimeoutOpt = typer.Option(120.0, help="Seconds an endpoint request may take (each attempt).")
OverwriteOpt = typer.Option(False, "--overwrite", help="Start again: delete this command's "
                                                       "files in the output folder first.")
JsonOpt = typer.Option(False, "--json", help="Print the summary as JSON.")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout stays the summary


def _setup(prompts, constitution, tag, max_prompts, model, api_key_env, timeout, precision):
    """Everything checkable before a model loads: prompts, constitution, the model spec."""
    from alignkit.stages.cai.constitution import load_constitution
    from alignkit.stages.cai.revise import load_prompts
    from alignkit.engine.device import resolve_runtime
    from alignkit.models.endpoint import parse_model_spec
    items = load_prompts(prompts or None, max_prompts=max_prompts)
    rules = load_constitution(constitution).select(tag)
    spec = parse_model_spec(model, api_key_env=api_key_env, timeout=timeout)
    return items, rules, spec, resolve_runtime("auto", precision)


def _print(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    print(f"prompts: {summary['prompts']} ({summary['generated']} generated now, "
          f"{summary['resumed']} resumed)")
    if "sft_examples" in summary:
        print(f"sft examples: {summary['sft_examples']}")
    print(f"preference pairs: {summary['preference_pairs']}")
    left = {k: v for k, v in summary["left_out"].items() if v}
    if left:
        print("left out: " + ", ".join(f"{k} {v}" for k, v in left.items()))
    for kind, path in summary["outputs"].items():
        print(f"{kind}: {path}")


@cai_app.command()
def revise(prompts: Optional[list[Path]] = PromptsOpt, model: str = ModelOpt,
           constitution: Optional[Path] = ConstitutionOpt, tag: Optional[list[str]] = TagOpt,
           output: Path = OutputOpt,
           rounds: int = typer.Option(1, help="Critique → revision rounds per prompt."),
           few_shot: Optional[int] = typer.Option(
               None, help="Few-shot examples from the constitution shown before each request "
                          "(default: all; 0: none)."),
           max_prompts: Optional[int] = MaxPromptsOpt, max_new_tokens: int = MaxTokensOpt,
           temperature: float = typer.Option(0.7, help="Sampling temperature; 0 = greedy."),
           top_p: float = TopPOpt, seed: int = SeedOpt, batch_size: int = BatchOpt,
           template: str = TemplateOpt, system: Optional[str] = SystemOpt,
           precision: str = PrecisionOpt, api_key_env: str = KeyOpt, timeout: float = TimeoutOpt,
           overwrite: bool = OverwriteOpt, as_json: bool = JsonOpt) -> None:
    """Supervised CAI: answer each prompt, then critique and revise the answer under sampled
    principles; writes revisions.jsonl (every step), sft.jsonl (prompt, final revision) and
    preferences.jsonl (chosen = revision, rejected = initial answer)."""
    from alignkit.stages.cai.backends import Sampling, load_backends
    from alignkit.stages.cai.revise import ReviseSettings, run_revise
    items, rules, spec, rt = _setup(prompts, constitution, tag, max_prompts, model,
                                    api_key_env, timeout, precision)
    settings = ReviseSettings(rounds=rounds, few_shot=few_shot, seed=seed, batch_size=batch_size)
    settings.check()
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        system=system, template=template, batch_size=batch_size)
    generator, _ = load_backends(spec, sampling, runtime=rt, log=_log)
    summary = run_revise(generator, items, rules, output, settings=settings,
                         sampling=sampling.to_dict(), overwrite=overwrite, log=_log)
    _print(summary, as_json)


@cai_app.command()
def feedback(prompts: Optional[list[Path]] = PromptsOpt, model: str = ModelOpt,
             judge: Optional[str] = typer.Option(
                 None, "--judge", "-j", help="Feedback model (a model spec, local or "
                                             "endpoint). Default: the generating model."),
             constitution: Optional[Path] = ConstitutionOpt, tag: Optional[list[str]] = TagOpt,
             output: Path = OutputOpt,
             principles: int = typer.Option(4, help="Principles sampled per prompt; the "
                                                    "preference is their mean."),
             max_prompts: Optional[int] = MaxPromptsOpt, max_new_tokens: int = MaxTokensOpt,
             temperature: float = typer.Option(1.0, help="Sampling temperature of the two "
                                                         "answers (must be > 0)."),
             top_p: float = TopPOpt, seed: int = SeedOpt, batch_size: int = BatchOpt,
             template: str = TemplateOpt, system: Optional[str] = SystemOpt,
             precision: str = PrecisionOpt, api_key_env: str = KeyOpt,
             timeout: float = TimeoutOpt, overwrite: bool = OverwriteOpt,
             as_json: bool = JsonOpt) -> None:
    """RLAIF: sample two answers per prompt and ask a feedback model which is better under
    sampled principles, in both orders; writes feedback.jsonl (every judgement) and
    preferences.jsonl (chosen, rejected, soft label = P(chosen better)) for reward/DPO."""
    from alignkit.stages.cai.backends import Sampling, load_backends
    from alignkit.stages.cai.feedback import FeedbackSettings, check_temperature, run_feedback
    from alignkit.models.endpoint import parse_model_spec
    items, rules, spec, rt = _setup(prompts, constitution, tag, max_prompts, model,
                                    api_key_env, timeout, precision)
    judge_spec = (parse_model_spec(judge, api_key_env=api_key_env, timeout=timeout,
                                   field="judge") if judge else spec)
    settings = FeedbackSettings(principles=principles, seed=seed, batch_size=batch_size)
    settings.check()
    check_temperature(temperature)  # before any model loads
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        system=system, template=template, batch_size=batch_size)
    generator, choice_judge = load_backends(spec, sampling, judge=judge_spec, runtime=rt,
                                            log=_log)
    summary = run_feedback(generator, choice_judge, items, rules, output, settings=settings,
                           sampling=sampling.to_dict(), overwrite=overwrite, log=_log)
    _print(summary, as_json)
