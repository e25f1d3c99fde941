"""`alignkit demo`: the README's main job.

SFT of the embedded SmolLM2-135M-Instruct on the instruction set alignkit ships, in the lesson's
``[INST] … [/INST]`` format with bf16 autocast, then the model's answers to the lesson's five lab
prompts before and after, side by side. Every step writes into the run folder and is skipped
when rerun, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from alignkit.config.schema import DataConfig, ModelConfig, SFTConfig, TrainConfig


def _answers(model_name: str | None, prompts: list[str], out: Path, *, template: str,
             max_new_tokens: int, log) -> list[str]:
    """Greedy answers, cached in ``out`` (JSONL) so a rerun does not generate them again."""
    if out.is_file():
        return [json.loads(x)["response"] for x in out.read_text(encoding="utf-8").splitlines()]
    from alignkit.cli.generate import answer
    from alignkit.engine.device import resolve_runtime
    from alignkit.models.load import load_causal_lm
    rt = resolve_runtime("auto", "auto")
    t0 = time.perf_counter()
    model, tok = load_causal_lm(ModelConfig(name_or_path=model_name), device=rt.device)
    res = answer(model, tok, prompts, template=template, system=None,
                 max_new_tokens=max_new_tokens, batch_size=len(prompts),
                 autocast_dtype=rt.autocast_dtype)
    n_tok = sum(len(r.completion_ids) for r in res)
    log(f"generated {n_tok} tokens for {len(prompts)} prompts in {time.perf_counter() - t0:.1f}s")
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"prompt": p, "response": r.text.strip()}, ensure_ascii=False) + "\n"
                           for p, r in zip(prompts, res)), encoding="utf-8")
    tmp.replace(out)
    return [r.text.strip() for r in res]


def demo_sft_config(output: Path, *, quick: bool, max_steps: int | None) -> SFTConfig:
    train = TrainConfig(epochs=3, batch_size=8, lr=5e-5, warmup_ratio=0.1, schedule="cosine",
                        eval_every=None, eval_on_start=True, save_every=20, keep_checkpoints=1, seed=0,
                        max_steps=max_steps)
    model = ModelConfig(name_or_path="tiny" if quick else None)
    if quick:
        train = train.model_copy(update={"max_steps": max_steps or 4, "save_every": 2,
                                         "lr": 1e-3, "progress": False})
    data = DataConfig(template="inst", max_length=384, eval_fraction=0.0,
                      eval_path=str(Path(__file__).resolve().parent.parent / "assets" / "data"
                                    / "sft_demo_eval.jsonl"))
    return SFTConfig(model=model, data=data, train=train, output=str(output / "sft"))


def run_demo(*, output: str, quick: bool, max_steps: int | None, overwrite: bool, log=print) -> None:
    import shutil
    from alignkit.data.prompts import LAB_PROMPTS
    from alignkit.stages import sft
    root = Path(output)
    if overwrite and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prompts = list(LAB_PROMPTS)
    new_tokens = 16 if quick else 96
    base = "tiny" if quick else None
    log("== answers before fine-tuning ==")
    before = _answers(base, prompts, root / "answers_before.jsonl", template="inst",
                      max_new_tokens=new_tokens, log=log)
    log("== supervised fine-tuning on the shipped instruction set ([INST] format) ==")
    sft_dir = sft.run(demo_sft_config(root, quick=quick, max_steps=max_steps), log=log)
    after = _answers(str(sft_dir), prompts, root / "answers_after.jsonl", template="inst",
                     max_new_tokens=new_tokens, log=log)
    _held_out_change(sft_dir, log)
    report = _side_by_side(prompts, before, after)
    (root / "answers.md").write_text(report, encoding="utf-8")
    _print_table(prompts, before, after)
    log(f"demo finished in {time.perf_counter() - t0:.0f}s; run folder: {root}, "
        f"side-by-side answers: {root / 'answers.md'}")


def _held_out_change(run: Path, log) -> None:
    from alignkit.engine.metrics import read_metrics
    evals = [r["eval/loss"] for r in read_metrics(run / "metrics.jsonl") if "eval/loss" in r]
    if len(evals) >= 2:
        log(f"held-out loss on the shipped eval set: {evals[0]:.3f} before SFT → "
            f"{evals[-1]:.3f} after")


def _side_by_side(prompts, before, after) -> str:
    rows = ["| prompt | before SFT | after SFT |", "| --- | --- | --- |"]
    cell = lambda s: s.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    rows += [f"| {cell(p)} | {cell(b)} | {cell(a)} |" for p, b, a in zip(prompts, before, after)]
    return "\n".join(rows) + "\n"


def _print_table(prompts, before, after) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title="The lesson's lab prompts: before and after SFT", show_lines=True)
    table.add_column("prompt", ratio=1)
    table.add_column("before", ratio=2)
    table.add_column("after", ratio=2)
    for p, b, a in zip(prompts, before, after):
        table.add_row(p, b.strip() or "(no answer: it ended its turn at once)",
                      a.strip() or "(no answer: it ended its turn at once)")
    Console().print(table)
