"""`alignkit demo`: the README's main job — the built-in pipeline on the embedded model.

The pipeline file ships in the package (``alignkit/assets/pipelines/demo.yaml``, the same text as
``configs/demo.yaml``): SFT → reward model → DPO and PPO → supervised Constitutional AI →
evaluations → the lab prompts side by side → the HTML report, each stage sized so the whole
demo stays under 15 minutes on a 2-core CPU. It runs through :mod:`alignkit.pipeline` like any
``alignkit run``, so a rerun skips finished stages and resumes an interrupted one. ``--quick``
runs the same file on the tiny in-code model with a few steps (for tests).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from alignkit.assets import ASSETS_DIR

DEMO_PIPELINE = ASSETS_DIR / "pipelines" / "demo.yaml"

# --quick: the same stages on the random tiny model, a few steps each, fp32, one thread.
QUICK = [
    "sft.model=tiny", "compare.models.base=tiny",
    "defaults.train.precision=fp32", "defaults.train.num_threads=1",
    "defaults.train.progress=false",
    "sft.config.train.max_steps=3", "sft.config.train.save_every=2",
    "reward.config.train.max_steps=2", "reward.config.probe_examples=16",
    "dpo.config.train.max_steps=2",
    "ppo.config.train.max_steps=2", "ppo.config.train.batch_size=4",
    "ppo.config.rollout.prompts=4", "ppo.config.rollout.max_new_tokens=8", "ppo.config.ppo_epochs=1",
    "cai.config.max_prompts=2", "cai.config.max_new_tokens=8", "cai.config.batch_size=2",
    "cai.config.precision=fp32",
    "cai_sft.config.train.max_steps=1", "cai_sft.config.train.batch_size=1",
    "compare.config.max_new_tokens=8", "compare.config.precision=fp32",
] + [f"{e}.config.{k}" for e in ("eval_dpo", "eval_ppo", "eval_cai")
     for k in ("max_new_tokens=8", "max_prompts=2", "kl_samples=2", "precision=fp32")]


def run_demo(*, output: str, quick: bool, max_steps: int | None, overwrite: bool,
             log=print) -> Path:
    """Run the demo pipeline into ``output``; print the side-by-side answers and where the
    report is; return the report's path."""
    from alignkit.cli.run import run_file
    overrides = list(QUICK) if quick else []
    if max_steps is not None:
        overrides.append(f"sft.config.train.max_steps={max_steps}")
    t0 = time.perf_counter()
    plan = run_file(DEMO_PIPELINE, output=output, overrides=overrides, overwrite=overwrite,
                    log=log)
    compare = plan.stage("compare").folder / "compare.json"
    if compare.is_file():
        _print_side_by_side(json.loads(compare.read_text(encoding="utf-8")))
    report = plan.stage("report").folder / "report.html"
    log(f"demo finished in {time.perf_counter() - t0:.0f}s; run folder: {plan.output}; "
        f"per-stage wall times: {plan.output / 'timings.jsonl'}")
    log(f"report: {report}")
    return report


def _print_side_by_side(result: dict) -> None:
    """The lab prompts' answers of every model, one row per prompt (rich wraps the columns)."""
    from rich.console import Console
    from rich.table import Table
    models = result["models"]
    table = Table(title="The lesson's lab prompts: " + " / ".join(models), show_lines=True)
    table.add_column("prompt", ratio=1)
    for name in models:
        table.add_column(name, ratio=2)
    for p, prompt in enumerate(result["prompts"]):
        table.add_row(prompt, *[result["answers"][n][p].strip()
                                or "(no answer: it ended its turn at once)" for n in models])
    Console().print(table)
