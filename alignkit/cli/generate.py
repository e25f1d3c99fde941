"""`alignkit generate`: prompts in, JSONL out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignkit.errors import InputError


def read_prompts(file: Path) -> list[str]:
    """.txt: one prompt per non-empty line; .jsonl: a 'prompt' (or 'instruction') field per line."""
    from alignkit.data.sources import read_records, read_text
    if file.suffix == ".txt":
        # read_text: the line of a bad byte in errors, and a byte-order mark not in the prompt
        lines = read_text(str(file)).splitlines()
        return [ln.strip() for ln in lines if ln.strip()]
    out = []
    for rec in read_records(str(file)):
        value = rec.data.get("prompt", rec.data.get("instruction"))
        if not isinstance(value, str) or not value.strip():
            raise InputError("needs a non-empty string", path=rec.path, line=rec.line,
                             field="prompt")
        out.append(value)
    return out


def answer(model, tokenizer, prompts: list[str], *, template: str, system: str | None,
           max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
           batch_size: int = 8, seed: int = 0, autocast_dtype=None):
    """Render each prompt with the template and generate; returns models.generate's results."""
    from alignkit.data.templates import encode_prompt, resolve_template
    from alignkit.models.generate import generate
    tmpl = resolve_template(template, tokenizer)
    ids = []
    for p in prompts:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": p}]
        ids.append(encode_prompt(tokenizer, msgs, tmpl))
    return generate(model, tokenizer, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, batch_size=batch_size, seed=seed, autocast_dtype=autocast_dtype)


def run_generate(*, prompts, file, model, template, system, max_new_tokens, temperature, top_p,
                 batch_size, seed, precision, output, lab) -> None:
    from alignkit.config.schema import ModelConfig
    from alignkit.data.prompts import LAB_PROMPTS
    from alignkit.engine.device import resolve_runtime
    from alignkit.models.load import load_causal_lm
    if file is not None:
        prompts = prompts + read_prompts(file)
    if lab:
        prompts = prompts + list(LAB_PROMPTS)
    if not prompts:
        raise InputError("no prompts: pass them as arguments, with --file, or --lab")
    rt = resolve_runtime("auto", precision)
    lm, tok = load_causal_lm(ModelConfig(name_or_path=model), device=rt.device)
    results = answer(lm, tok, prompts, template=template, system=system,
                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     batch_size=batch_size, seed=seed, autocast_dtype=rt.autocast_dtype)
    lines = [json.dumps({"prompt": p, "response": r.text.strip(), "tokens": len(r.completion_ids),
                         "finished": r.finished}, ensure_ascii=False)
             for p, r in zip(prompts, results)]
    if output is None:
        sys.stdout.write("".join(x + "\n" for x in lines))
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(output.suffix + ".tmp")
    tmp.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    tmp.replace(output)  # never a half-written output file
