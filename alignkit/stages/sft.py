"""Supervised fine-tuning (and continued pre-training) of a causal LM.

SFT: each example is a conversation; the loss is the next-token NLL on the assistant turns and
their end-of-turn token only (prompt tokens are context, not targets), normalised by the global
number of target tokens. Pre-training: raw documents packed into fixed blocks, every token a
target. Both share one task and one loss module; they differ only in how tokens are made.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from alignkit.config.schema import DataConfig, PretrainConfig, SFTConfig
from alignkit.engine.loop import Batch, fit
from alignkit.stages.common import CausalLMLoss, begin, describe, end

DEMO_SFT_DATA = Path(__file__).resolve().parent.parent / "assets" / "data" / "sft_demo.jsonl"
DEMO_PRETRAIN_DATA = Path(__file__).resolve().parent.parent / "assets" / "data" / "pretrain_demo.jsonl"


class TokenTask:
    """Pre-tokenised examples (``Encoded``) for the train and eval splits → padded batches."""

    def __init__(self, model, train: list, eval_: list, pad_id: int) -> None:
        self.model, self.splits, self.pad_id = model, {"train": train, "eval": eval_}, pad_id

    def num_examples(self, split: str) -> int:
        return len(self.splits[split])

    def lengths(self, split: str) -> list[int]:
        return [len(ex.input_ids) for ex in self.splits[split]]

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
    # an empty path (a variable that did not expand) is an error, not the demo data
    path = cfg.path if cfg.path is not None else str(DEMO_SFT_DATA)
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
    # an empty path (a variable that did not expand) is an error, not the demo data
    path = cfg.path if cfg.path is not None else str(DEMO_PRETRAIN_DATA)
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
    from alignkit.models.lora import apply_lora

    st = begin(cfg, overwrite=overwrite, log=log)
    if st.done:
        return st.run_dir.path
    tokenizer = load_tokenizer(cfg.model)  # data errors surface before the model loads
    make = _pretrain_examples if cfg.stage == "pretrain" else _sft_examples
    train, evals, report = make(cfg.data, tokenizer, cfg.train.seed, st.log)
    st.run_dir.prepare()
    model, tokenizer = load_causal_lm(cfg.model, device=st.rt.device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_lora(model, cfg.model.lora)
    st.log(describe(cfg, model, st.rt))
    st.run_dir.write_json("data_report.json", report)
    task = TokenTask(model, train, evals, tokenizer.pad_token_id)
    result = fit(task, model, cfg.train, st.rt, output=st.run_dir.path, log=st.log)
    return end(st, model, tokenizer, result)
