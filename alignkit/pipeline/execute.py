"""Run a plan: each stage in order, in one process, through the stages' Python entry points.

A stage whose folder holds ``DONE`` is skipped; a stage that was interrupted is resumed — the
training stages from their last checkpoint, ``cai`` from its record log (both already do this
when their folder is reused with the same config); ``eval``, ``compare`` and ``report`` are
short and run again whole. A finished stage whose recorded config differs from the file's is
an error, not a silent skip: its results would not be what the file says.

The training stages write their own ``config.yaml`` and ``DONE``; for the other kinds the
resolved settings go to ``stage.yaml`` and ``DONE`` is written here, last. The run folder also
gets ``pipeline.yaml`` (the resolved plan) and ``timings.jsonl`` (one line per stage run).
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import yaml

from alignkit.errors import AlignkitError, InputError
from alignkit.io import atomic_write_text
from alignkit.pipeline.plan import DONE, Plan, PlannedStage, select
from alignkit.pipeline.schema import TRAINING_KINDS

Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# What the plan looks like


def resolved(stage: PlannedStage) -> dict:
    """The stage's config as it is recorded in its folder (JSON types)."""
    cfg = stage.config.model_dump(mode="json")
    if stage.kind in TRAINING_KINDS:
        return cfg
    return {"kind": stage.kind, "inputs": stage.inputs, "config": cfg}


def _recorded(stage: PlannedStage) -> dict | None:
    name = "config.yaml" if stage.kind in TRAINING_KINDS else "stage.yaml"
    path = stage.folder / name
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None


def first_difference(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


def status(stage: PlannedStage) -> str:
    """done | done, other config (KEY) | unfinished | pending."""
    if stage.done:
        recorded = _recorded(stage)
        diff = first_difference(recorded, resolved(stage)) if recorded is not None else None
        return f"done, with another config ('{diff}')" if diff else "done"
    return "unfinished" if stage.folder.exists() else "pending"


def describe_plan(plan: Plan, selected: list[PlannedStage]) -> str:
    """The plan as text: order, kind, inputs, folder, status."""
    chosen = {s.name for s in selected}
    lines = [f"pipeline {plan.name} ({plan.path}) → {plan.output}"]
    for i, s in enumerate(plan.stages, 1):
        mark = "" if s.name in chosen else "  (not selected)"
        lines.append(f"{i:>2}. {s.name} [{s.label}] → {s.folder}: {status(s)}{mark}")
        for key, value in s.inputs.items():
            ref = s.refs.get(key)
            shown = _show(value)
            lines.append(f"      {key}: {shown}" + (f"  (stage {ref})" if ref else ""))
        extra = [d for d in s.deps if d not in s.refs.values()]
        if extra:
            lines.append(f"      after: {', '.join(extra)}")
    return "\n".join(lines)


def _show(value) -> str:
    if value is None:
        return "embedded SmolLM2-135M-Instruct"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_show(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)


# ---------------------------------------------------------------------------------------------
# Running


def run_plan(plan: Plan, *, only: list[str] | None = None, start: str | None = None,
             overwrite: bool = False, log: Log = print) -> list[dict]:
    """Run the selected stages (all, ``only`` these, or from ``start`` on); returns one timing
    record per selected stage."""
    selected = select(plan, only=only, start=start)
    chosen = {s.name for s in selected}
    for s in selected:
        if overwrite:
            continue
        state = status(s)
        if state.startswith("done, with another config"):
            raise AlignkitError(
                f"stage '{s.name}' finished with another config (first difference: "
                f"{state.split('(')[1].rstrip(')')}); to redo it and what follows: alignkit "
                f"run {plan.path} --from {s.name} --overwrite")
    for s in selected:  # a stage left out must already have made what the others take
        for dep in s.deps:
            if dep not in chosen and not plan.stage(dep).done:
                raise InputError(f"stage '{s.name}' needs '{dep}', which has not finished; "
                                 f"run it too", path=plan.path)
    plan.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.output / "pipeline.yaml", yaml.safe_dump(
        {"pipeline": plan.path, "order": [s.name for s in plan.stages],
         "stages": {s.name: resolved(s) | {"after": list(s.deps)} for s in plan.stages}},
        sort_keys=False, allow_unicode=True))
    timings = []
    for i, s in enumerate(selected, 1):
        head = f"[{i}/{len(selected)}] {s.name} ({s.label})"
        if overwrite and s.folder.exists():
            shutil.rmtree(s.folder)
        if s.done:
            log(f"== {head}: already done, skipped ==")
            timings.append({"stage": s.name, "kind": s.kind, "status": "skipped"})
            continue
        log(f"== {head} → {s.folder} ==")
        t0 = time.perf_counter()
        run_stage(s, plan, log)
        gc.collect()  # the stage's models go before the next stage loads its own
        record = {"stage": s.name, "kind": s.kind, "status": "ran",
                  "wall_s": round(time.perf_counter() - t0, 1)}
        timings.append(record)
        with open(plan.output / "timings.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        log(f"== {s.name} done in {record['wall_s']:.0f}s ==")
    return timings


def run_stage(s: PlannedStage, plan: Plan, log: Log) -> None:
    """One stage through its Python entry point."""
    match s.kind:
        case "pretrain" | "sft":
            from alignkit.stages import sft
            sft.run(s.config, log=log)
        case "reward":
            from alignkit.stages import reward
            reward.run(s.config, log=log)
        case "dpo":
            from alignkit.stages import dpo
            dpo.run(s.config, log=log)
        case "ppo":
            from alignkit.stages import ppo
            ppo.run(s.config, log=log)
        case _:
            _begin(s)
            summary = {"cai": _run_cai, "eval": _run_eval, "compare": _run_compare,
                       "report": _run_report}[s.kind](s, plan, log)
            atomic_write_text(s.folder / DONE, json.dumps(summary, indent=2, default=str))


def _begin(s: PlannedStage) -> None:
    s.folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(s.folder / "stage.yaml", yaml.safe_dump(resolved(s), sort_keys=False,
                                                              allow_unicode=True))


def _model_spec(label: str, value):
    """(name, source) as alignkit.eval.compare takes it; an http(s) value is an endpoint."""
    from alignkit.models.endpoint import parse_model_spec
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return parse_model_spec(f"{label}={value}")
    return label, value


def _run_cai(s: PlannedStage, plan: Plan, log: Log) -> dict:
    from alignkit.engine.device import resolve_runtime
    from alignkit.stages.cai.backends import Sampling, load_backends
    from alignkit.stages.cai.constitution import load_constitution
    from alignkit.stages.cai.revise import load_prompts
    cfg = s.config
    items = load_prompts(s.inputs.get("prompts"), max_prompts=cfg.max_prompts)
    rules = load_constitution(s.inputs.get("constitution")).select(cfg.tags or None)
    sampling = Sampling(max_new_tokens=cfg.max_new_tokens, temperature=cfg.sampling_temperature,
                        top_p=cfg.top_p, system=cfg.system, template=cfg.template,
                        batch_size=cfg.batch_size)
    model = _model_spec(s.refs.get("model", "model"), s.inputs.get("model"))
    judge = (_model_spec(s.refs.get("judge", "judge"), s.inputs["judge"])
             if "judge" in s.inputs else model)
    rt = resolve_runtime("auto", cfg.precision)
    if cfg.mode == "revise":
        from alignkit.stages.cai.revise import ReviseSettings, run_revise
        generator, _ = load_backends(model, sampling, runtime=rt, log=log)
        settings = ReviseSettings(rounds=cfg.rounds, few_shot=cfg.few_shot, seed=cfg.seed,
                                  batch_size=cfg.batch_size)
        summary = run_revise(generator, items, rules, s.folder, settings=settings,
                             sampling=sampling.to_dict(), log=log)
    else:
        from alignkit.stages.cai.feedback import FeedbackSettings, run_feedback
        generator, choice = load_backends(model, sampling, judge=judge, runtime=rt, log=log)
        settings = FeedbackSettings(principles=cfg.principles, seed=cfg.seed,
                                    batch_size=cfg.batch_size)
        summary = run_feedback(generator, choice, items, rules, s.folder, settings=settings,
                               sampling=sampling.to_dict(), log=log)
    log(f"cai {cfg.mode}: {summary.get('sft_examples', 0)} SFT examples, "
        f"{summary['preference_pairs']} preference pairs")
    return {k: summary[k] for k in ("prompts", "preference_pairs", "left_out", "outputs")}


def _run_eval(s: PlannedStage, plan: Plan, log: Log) -> dict:
    from alignkit.eval import tax
    cfg, inp = s.config, s.inputs
    result = tax.alignment_tax(
        inp["model"], inp.get("reference"), harmful=inp.get("harmful") or tax.HARMFUL_V1,
        benign=inp.get("benign") or tax.BENIGN_V1, heldout=inp.get("heldout"),
        reward_model=inp.get("reward_model"), preferences=inp.get("preferences"),
        beta=cfg.beta, template=cfg.template, max_new_tokens=cfg.max_new_tokens,
        kl_samples=cfg.kl_samples, seed=cfg.seed, max_prompts=cfg.max_prompts,
        max_examples=cfg.max_examples, max_length=cfg.max_length, batch_size=cfg.batch_size,
        precision=cfg.precision, log=log)
    paths = tax.write_outputs(result, s.folder)
    log(tax.render_markdown(result).rstrip())
    return {"outputs": paths, "kl": result["kl"].get("mean")}


def _run_compare(s: PlannedStage, plan: Plan, log: Log) -> dict:
    from alignkit.data.prompts import LAB_PROMPTS
    from alignkit.engine.device import resolve_runtime
    from alignkit.eval import compare as cmp
    cfg, inp = s.config, s.inputs
    models = [_model_spec(label, v) for label, v in inp["models"].items()]
    if "prompts" in inp:
        from alignkit.cli.generate import read_prompts
        prompts, source = read_prompts(Path(inp["prompts"])), inp["prompts"]
        if not prompts:
            raise InputError("no prompts in this file", path=inp["prompts"], field="prompts")
    else:
        prompts, source = list(LAB_PROMPTS), "lab prompts"
    judge = _model_spec(s.refs.get("judge", "judge"), inp["judge"]) if "judge" in inp else None
    result = cmp.run_compare(models, prompts, template=cfg.template, system=cfg.system,
                             max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                             top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
                             reward_model=inp.get("reward_model"), judge=judge,
                             runtime=resolve_runtime("auto", cfg.precision),
                             prompts_source=source, log=log)
    paths = cmp.write_outputs(result, s.folder)
    return {"outputs": {k: str(v) for k, v in paths.items()}, "models": result.models}


def _run_report(s: PlannedStage, plan: Plan, log: Log) -> dict:
    from alignkit.eval.report import write_report
    order = [plan.stage(d).folder for d in s.deps]
    out = write_report(plan.output, s.folder, stages=[f for f in order if f.is_dir()])
    log(f"report: {out['html']}")
    return {"html": out["html"], "markdown": out["markdown"]}
