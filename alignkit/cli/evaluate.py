"""`alignkit eval`: the alignment-tax table of a policy against its reference (registered on the
app in cli.main)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from alignkit.cli.main import app

_EMBEDDED = "Default: the embedded SmolLM2-135M-Instruct."


@app.command("eval")
def evaluate(
        model: Optional[str] = typer.Option(None, help="The policy: HF hub id, local folder, "
                                                       ".gguf file, run folder or 'tiny'. "
                                                       + _EMBEDDED),
        reference: Optional[str] = typer.Option(None, help="The reference model (e.g. the SFT "
                                                           "model the policy started from). "
                                                           + _EMBEDDED),
        harmful: Optional[Path] = typer.Option(None, help="Harmful prompts to be refused "
                                                          "(.jsonl with a 'prompt' field, or "
                                                          ".txt). Default: the shipped set."),
        benign: Optional[Path] = typer.Option(None, help="Benign prompts that sound sensitive "
                                                         "(to measure over-refusal). Default: "
                                                         "the shipped set."),
        heldout: Optional[str] = typer.Option(None, help="Held-out instruction data for "
                                                         "perplexity (any SFT data format)."),
        preferences: Optional[str] = typer.Option(None, help="Held-out preference pairs for "
                                                             "preference accuracy."),
        reward_model: Optional[str] = typer.Option(None, help="A reward model folder (from "
                                                              "`alignkit reward`): mean reward "
                                                              "of the answers."),
        beta: float = typer.Option(0.1, help="β of the DPO implicit reward."),
        template: str = typer.Option("auto", help="chat, inst, plain or auto."),
        max_new_tokens: int = typer.Option(64, help="Most tokens per answer."),
        kl_samples: Optional[int] = typer.Option(None, help="Answers sampled from the policy "
                                                            "for the KL (default: one per "
                                                            "prompt)."),
        max_prompts: Optional[int] = typer.Option(None, help="Use only the first N prompts of "
                                                             "each set (quick runs)."),
        max_examples: Optional[int] = typer.Option(None, help="Use only the first N records "
                                                              "of --heldout and "
                                                              "--preferences."),
        batch_size: int = typer.Option(8, help="Prompts or examples per forward."),
        seed: int = typer.Option(0, help="Sampling seed (the KL's answers)."),
        precision: str = typer.Option("auto", help="auto, bf16 or fp32."),
        refusal_judge: Optional[str] = typer.Option(
            None, help="Decide refusals with a judge model (a model spec as for `compare`: "
                       "local, hub, run folder or http(s)://HOST/v1#MODEL) asked whether each "
                       "answer refuses, in both label orders, instead of the documented "
                       "patterns."),
        api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable holding "
                                        "an endpoint judge's API key (never written)."),
        output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o",
                                                  help="Write eval.json (every answer "
                                                       "included) and eval.md here."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """The alignment-tax table: refusal of harmful requests, over-refusal of benign ones,
    answer length, reward, held-out perplexity, preference accuracy and KL(policy‖reference),
    for the reference and the policy side by side."""
    from alignkit.eval import tax

    judge = None
    if refusal_judge is not None:
        from alignkit.eval.compare import load_judge
        from alignkit.models.endpoint import parse_model_spec
        name, source = parse_model_spec(refusal_judge, api_key_env=api_key_env,
                                        field="refusal_judge")
        judge = tax.model_refusal_judge(load_judge(name, source, template=template))
    result = tax.alignment_tax(
        model, reference, harmful=harmful or tax.HARMFUL_V1, benign=benign or tax.BENIGN_V1,
        heldout=heldout, reward_model=reward_model, preferences=preferences, beta=beta,
        template=template, max_new_tokens=max_new_tokens, kl_samples=kl_samples, seed=seed,
        max_prompts=max_prompts, max_examples=max_examples, batch_size=batch_size,
        precision=precision, judge=judge,
        log=lambda message: print(message, file=sys.stderr))
    paths = tax.write_outputs(result, output_dir) if output_dir is not None else None
    if as_json:
        print(json.dumps(result | ({"outputs": paths} if paths else {}), indent=2,
                         ensure_ascii=False))
        return
    print(tax.render_markdown(result), end="")
    if paths:
        print(f"\njson: {paths['json']}\nmarkdown: {paths['markdown']}")
