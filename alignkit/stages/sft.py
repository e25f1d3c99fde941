"""Supervised fine-tuning (and continued pre-training) of a causal LM.

SFT: each example is a conversation; the loss is the next-token NLL on the assistant turns and
their end-of-turn token only (prompt tokens are context, not targets), normalised by the global
number of target tokens. Pre-training: raw documents packed into fixed blocks, every token a
target. Both share one task and one loss module; they differ only in how tokens are made.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from alignkit.config.schema import DataConfig, PretrainConfig, SFTConfig
from alignkit.engine import dist
from alignkit.engine.device import resolve_runtime, set_num_threads
from alignkit.engine.loop import Batch, fit
from alignkit.stages.common import CausalLMLoss, RunDir

DEMO_SFT_DATA = Path(__file__).resolve().parent.parent / "assets" / "data" / "sft_demo.jsonl"
DEMO_PRETRAIN_DATA = Path(__file__).resolve().parent.parent / "assets" / "data" / "pretrain_demo.jsonl"


class TokenTask:
    """Pre-tokenised examples (``Encoded``) for the train and eval splits → padded batches."""

    def __init__(self, model, train: list, eval_: list, pad_id: int) -> None:
        self.model, self.splits, self.pad_id = model, {"train": train, "eval": eval_}, pad_id

    def num_examples(self, split: str) -> int:
        return len(self.splits[split])

    def collate(self, indices: list[int], split: str) -> Batch:
        from alignkit.data.collate import collate
        examples = [self.splits[split][i] for i in indices]
        t = collate(examples, pad_id=self.pad_id)
        count = int(t["loss_mask"][:, 1:].sum())
        return Batch(inputs=t, count=count, tokens=int(t["attention_mask"].sum()), ids=indices)

    def module(self) -> torch.nn.Module:
        return CausalLMLoss(self.model)


def _sft_examples(cfg: DataConfig, tokenizer, seed: int, log):
    from alignkit.data import load_sft, resolve_template, split_train_eval, tokenize_sft
    path = cfg.path or str(DEMO_SFT_DATA)
    if cfg.path is None:
        log(f"no --data given: using the demo instruction set shipped with alignkit ({path})")
    template = resolve_template(cfg.template, tokenizer)
    skipped: list[str] | None = [] if cfg.on_empty == "skip" else None
    convs = load_sft(path, fmt=cfg.format, system_prompt=cfg.system_prompt,
                     max_examples=cfg.max_examples, split=cfg.split, skipped=skipped)
    if cfg.eval_path:
        train = convs
        evals = load_sft(cfg.eval_path, fmt=cfg.format, system_prompt=cfg.system_prompt,
                         split=cfg.split, skipped=skipped)[: cfg.eval_max_examples]
    else:
        train, evals = split_train_eval(convs, eval_fraction=cfg.eval_fraction, seed=seed,
                                        max_eval=cfg.eval_max_examples)
    kw = dict(template=template, max_length=cfg.max_length, truncation=cfg.truncation)
    train_enc, train_rep = tokenize_sft(tokenizer, train, **kw)
    eval_enc, eval_rep = tokenize_sft(tokenizer, evals, **kw)
    if skipped:
        log(f"skipped {len(skipped)} records with an empty field (data.on_empty=skip): "
            + "; ".join(skipped[:5]) + (" …" if len(skipped) > 5 else ""))
    log(f"template: {template}; train {train_rep.summary()}; eval {eval_rep.summary()}")
    return train_enc, eval_enc, {"template": template, "train": asdict(train_rep),
                                 "eval": asdict(eval_rep), "path": path,
                                 "skipped_empty": skipped or []}


def _pretrain_examples(cfg: DataConfig, tokenizer, seed: int, log):
    from alignkit.data import load_text, pack_documents, split_train_eval
    path = cfg.path or str(DEMO_PRETRAIN_DATA)
    if cfg.path is None:
        log(f"no --data given: using the demo text shipped with alignkit ({path})")
    docs = load_text(path, max_examples=cfg.max_examples, split=cfg.split)
    train, evals = (docs, load_text(cfg.eval_path)) if cfg.eval_path else split_train_eval(
        docs, eval_fraction=cfg.eval_fraction, seed=seed, max_eval=cfg.eval_max_examples)
    train_enc, train_rep = pack_documents(tokenizer, train, block_size=cfg.max_length)
    eval_enc, eval_rep = pack_documents(tokenizer, evals, block_size=cfg.max_length)
    log(f"packed into blocks of {cfg.max_length}: train {train_rep.summary()}; "
        f"eval {eval_rep.summary()}")
    return train_enc, eval_enc, {"train": asdict(train_rep), "eval": asdict(eval_rep), "path": path}


def run(cfg: SFTConfig | PretrainConfig, *, overwrite: bool = False, log=print) -> Path:
    """Train and save; returns the run folder. Reruns resume; a finished run is left as it is."""
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.models.lora import apply_lora, trainable_parameters

    dist.init()
    log = log if dist.is_main() else (lambda *_: None)
    run_dir = RunDir(cfg.output, cfg, overwrite=overwrite)
    if run_dir.done:
        log(f"{run_dir.path} is already complete (remove it or pass --overwrite to train again)")
        return run_dir.path
    rt = resolve_runtime(cfg.train.device, cfg.train.precision, local_rank=dist.local_rank())
    set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)  # data errors surface before the model loads
    make = _pretrain_examples if cfg.stage == "pretrain" else _sft_examples
    train, evals, report = make(cfg.data, tokenizer, cfg.train.seed, log)
    run_dir.prepare()
    model, tokenizer = load_causal_lm(cfg.model, device=rt.device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_lora(model, cfg.model.lora)
    trainable, total = trainable_parameters(model)
    log(f"model {cfg.model.name_or_path or 'embedded SmolLM2-135M-Instruct'}: "
        f"{trainable:,} of {total:,} parameters train; {rt.device}, "
        f"{'bf16 autocast' if rt.autocast_dtype else 'fp32'}")
    run_dir.write_json("data_report.json", report)
    task = TokenTask(model, train, evals, tokenizer.pad_token_id)
    result = fit(task, model, cfg.train, rt, output=run_dir.path, log=log)
    run_dir.save_model(model, tokenizer)
    run_dir.finish({"steps": result.steps, "train": result.last, "eval": result.eval,
                    "resumed_from": result.resumed_from,
                    "wall_s": round(time.perf_counter() - t0, 2)})
    log(f"saved to {run_dir.path}")
    return run_dir.path
