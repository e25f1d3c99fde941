"""Reward modelling: a scalar head on a causal-LM trunk, trained on preference comparisons.

What it implements:

- Pairs: the Bradley–Terry negative log-likelihood −log σ(r_c − r_r − m) (InstructGPT, Ouyang
  et al. 2022, eq. 1) with Llama 2's per-pair margin m (Touvron et al. 2023, eq. 2) and soft
  labels p = P(chosen is better) for AI-labelled preferences (RLAIF):
  ℓ = −[p·log σ(d) + (1 − p)·log σ(−d)].
- Ranked lists of K responses: all C(K, 2) pairs weighted 1/C(K, 2), so a ranking is one
  example (InstructGPT), or the listwise Plackett–Luce likelihood (``ranked_loss``).
- Reward centering (Eisenstein et al. 2023; TRL's ``center_rewards_coefficient``):
  c·(r_c + r_r)² added per pair when ``center_rewards`` = c > 0, since Bradley–Terry fixes only
  differences and the offset of r would otherwise drift.

The reward is the head's output at the last real token
(:func:`alignkit.models.heads.reward_scores`); chosen and rejected (or all K responses) go
through one forward, and the loss is normalised by the global number of pairs or lists (the
engine's unit count).

Where it departs from the papers:

- InstructGPT keeps all C(K, 2) comparisons of a prompt in one batch element; that holds for
  ranked lists here, but pairs that came from one ranking and are given as separate records are
  shuffled independently (the paper found that overfits): give such data as ranked lists.
- InstructGPT (and Ziegler et al. 2019) shift or rescale the trained reward so reference answers
  score 0 on average before RL; the saved head is not shifted here. The DONE record and the
  held-out metrics report the reward mean and std for that, and ``center_rewards`` keeps the
  offset near 0 during training.
- For ranked lists the centering term is the mean of c·(r_i + r_j)² over the list's pairs, so a
  list of two is exactly a pair.
- The reported ``reward_mean``/``reward_sq`` average each pair's (or list's) mean over pairs (or
  lists); with lists of unequal length that weights a response by 1/K of its list.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from alignkit.config.schema import ModelConfig, PreferenceDataConfig, RewardConfig
from alignkit.engine.loop import Batch, fit
from alignkit.errors import InputError
from alignkit.losses.reward import (bradley_terry_loss, centering_penalty, plackett_luce_loss,
                                    ranked_pairwise_loss, ranking_to_pairs)
from alignkit.stages.common import begin, describe, end

NO_DATA = ("reward modelling needs preference data: pass --data FILE (pairs with prompt/chosen/"
           "rejected, HH-RLHF transcripts, or ranked lists); alignkit ships no preference set yet")
SCORE_KEY = "score"

_PAIR_KEYS = ("input_ids", "attention_mask", "margin", "label")
_RANKED_KEYS = ("input_ids", "attention_mask", "list_index", "rank", "list_mask")


# ---------------------------------------------------------------------------------------------
# Batches and loss


class PreferenceTask:
    """Encoded pairs or ranked lists for the train and eval splits → one batch per forward.

    A split holds one kind (a file has one format); the eval file may be of the other kind.
    ``Batch.count`` is the number of pairs or lists: the loss's normalisation unit.
    """

    def __init__(self, model, train: list, eval_: list, pad_id: int, *, ranked_loss: str,
                 center_rewards: float) -> None:
        self.model, self.splits, self.pad_id = model, {"train": train, "eval": eval_}, pad_id
        self.ranked_loss, self.center_rewards = ranked_loss, center_rewards

    def num_examples(self, split: str) -> int:
        return len(self.splits[split])

    def collate(self, indices: list[int], split: str) -> Batch:
        from alignkit.data.preference import EncodedPair, collate_pairs, collate_ranked
        items = [self.splits[split][i] for i in indices]
        pairs = isinstance(items[0], EncodedPair)
        if any(isinstance(it, EncodedPair) != pairs for it in items):
            raise ValueError("a batch mixes pairs and ranked lists")
        make, keys = (collate_pairs, _PAIR_KEYS) if pairs else (collate_ranked, _RANKED_KEYS)
        t = make(items, pad_id=self.pad_id)
        # loss_mask is not needed: a reward reads one position per row, not a span.
        return Batch(inputs={k: t[k] for k in keys}, count=len(items),
                     tokens=int(t["attention_mask"].sum()), ids=indices)

    def module(self) -> torch.nn.Module:
        return RewardModelLoss(self.model, ranked_loss=self.ranked_loss,
                               center_rewards=self.center_rewards)


class RewardModelLoss(torch.nn.Module):
    """forward(batch) → (Σ losses over pairs or lists, metric sums), rewards from ONE forward.

    Metric sums, each per unit (the engine divides by the unit count): ``accuracy`` (pairs with
    r_c > r_r; for a list, its fraction of correctly ordered pairs), ``margin`` (r_c − r_r, or
    the list's mean r_i − r_j), ``reward_mean`` and ``reward_sq`` (the unit's mean of r and of r²:
    std = sqrt(E[r²] − E[r]²)).
    """

    def __init__(self, model: torch.nn.Module, *, ranked_loss: str = "pairs",
                 center_rewards: float = 0.0) -> None:
        super().__init__()
        self.model, self.ranked_loss, self.center_rewards = model, ranked_loss, center_rewards

    def forward(self, input_ids, attention_mask, margin=None, label=None, list_index=None,
                rank=None, list_mask=None):
        from alignkit.models.heads import reward_scores
        rewards = reward_scores(self.model, input_ids, attention_mask)  # (R,) fp32
        if list_mask is None:
            return self._pairs(rewards, margin, label)
        return self._lists(rewards, list_index, rank, list_mask)

    def _pairs(self, rewards, margin, label):
        B = rewards.shape[0] // 2
        chosen, rejected = rewards[:B], rewards[B:]  # rows 0..B-1 chosen, B..2B-1 rejected
        # collate_pairs gives margin 0 and label 1.0 where a pair has none: the hard BT loss.
        out = bradley_terry_loss(chosen, rejected, margin=margin, label=label)
        losses = out.losses
        if self.center_rewards > 0:
            losses = losses + centering_penalty(chosen, rejected, self.center_rewards)
        r = torch.stack([chosen, rejected]).detach()  # (2, B)
        return losses.sum(), {"accuracy": out.accuracies.sum(), "margin": out.margins.sum(),
                              "reward_mean": r.mean(0).sum(), "reward_sq": (r ** 2).mean(0).sum()}

    def _lists(self, rewards, list_index, rank, list_mask):
        # (R,) rows list by list → (B, Kmax) best → worst; absent slots stay 0 and are masked.
        table = rewards.new_zeros(list_mask.shape).index_put((list_index, rank), rewards)
        listwise = self.ranked_loss == "plackett_luce"
        loss_fn = plackett_luce_loss if listwise else ranked_pairwise_loss
        out = loss_fn(table, mask=list_mask)
        losses = out.losses
        if self.center_rewards > 0:
            losses = losses + self.center_rewards * _mean_pair_sum_sq(table, list_mask)
        k = list_mask.sum(-1).to(rewards.dtype)  # (B,)
        r = table.detach()
        return losses.sum(), {"accuracy": out.accuracies.sum(), "margin": out.margins.sum(),
                              "reward_mean": (r.sum(-1) / k).sum(),
                              "reward_sq": ((r ** 2).sum(-1) / k).sum()}


def _mean_pair_sum_sq(table: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per list, the mean of (r_i + r_j)² over its pairs of present responses. (B, K) → (B,)."""
    i, j = ranking_to_pairs(table.shape[1], device=table.device)
    valid = mask[:, i] & mask[:, j]  # (B, P)
    sq = torch.where(valid, (table[:, i] + table[:, j]) ** 2, 0.0)
    return sq.sum(-1) / valid.sum(-1).clamp(min=1)


def reward_std(metrics: dict | None, prefix: str = "") -> float | None:
    """sqrt(E[r²] − E[r]²) from averaged ``reward_sq`` and ``reward_mean`` (None if absent)."""
    if not metrics or f"{prefix}reward_sq" not in metrics:
        return None
    var = metrics[f"{prefix}reward_sq"] - metrics[f"{prefix}reward_mean"] ** 2
    return math.sqrt(max(var, 0.0))  # rounding can push a zero variance just below 0


# ---------------------------------------------------------------------------------------------
# Data


def preference_examples(cfg: PreferenceDataConfig, tokenizer, seed: int, log):
    """(train, eval, report): encoded pairs or ranked lists, split as SFT data is."""
    from alignkit.data import load_preferences, resolve_template, split_train_eval
    from alignkit.data import tokenize_preferences
    if cfg.path is None:
        raise InputError(NO_DATA, field="data.path")
    template = resolve_template(cfg.template, tokenizer)
    kw = dict(fmt=cfg.format, system_prompt=cfg.system_prompt, split=cfg.split)
    items, load_rep = load_preferences(cfg.path, max_examples=cfg.max_examples, **kw)
    if cfg.eval_path:
        train = items
        evals, eval_load = load_preferences(cfg.eval_path, **kw)
        evals = evals[: cfg.eval_max_examples]
    else:
        train, evals = split_train_eval(items, eval_fraction=cfg.eval_fraction, seed=seed,
                                        max_eval=cfg.eval_max_examples)
        eval_load = None
    tok = dict(template=template, max_length=cfg.max_length, truncation=cfg.truncation)
    train_enc, train_rep = tokenize_preferences(tokenizer, train, **tok)
    eval_enc, eval_rep = tokenize_preferences(tokenizer, evals, **tok)
    log(f"template: {template}; loaded {load_rep.summary()}; train {train_rep.summary()}; "
        f"eval {eval_rep.summary()}")
    return train_enc, eval_enc, {
        "template": template, "path": cfg.path, "load": asdict(load_rep),
        "eval_load": asdict(eval_load) if eval_load else None,
        "train": asdict(train_rep), "eval": asdict(eval_rep)}


# ---------------------------------------------------------------------------------------------
# Training


def run(cfg: RewardConfig, *, overwrite: bool = False, log=print) -> Path:
    """Train and save a reward model; returns the run folder. Reruns resume; a finished run is
    left as it is."""
    from alignkit.models.heads import apply_reward_lora, load_reward_model
    from alignkit.models.load import load_tokenizer

    st = begin(cfg, overwrite=overwrite, log=log)  # the seed also fixes the new head's init
    if st.done:
        return st.run_dir.path
    tokenizer = load_tokenizer(cfg.model)  # data errors surface before the model loads
    train, evals, report = preference_examples(cfg.data, tokenizer, cfg.train.seed, st.log)
    st.run_dir.prepare()
    model, tokenizer = load_reward_model(cfg.model, device=st.rt.device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model = apply_reward_lora(model, cfg.model.lora)
    st.log(describe(cfg, model, st.rt, what="reward model on"))
    st.run_dir.write_json("data_report.json", report)
    task = PreferenceTask(model, train, evals, tokenizer.pad_token_id,
                          ranked_loss=cfg.ranked_loss, center_rewards=cfg.center_rewards)
    result = fit(task, model, cfg.train, st.rt, output=st.run_dir.path, log=st.log)
    summary = _summary(result, st.t0)
    if summary["eval"]:
        e = summary["eval"]
        st.log(f"held-out: accuracy {e['eval/accuracy']:.3f}, margin {e['eval/margin']:.3f}, "
               f"reward {e['eval/reward_mean']:.3f} ± {e['eval/reward_std']:.3f}")
    # merges LoRA; the pad token was made distinct on load
    return end(st, model, tokenizer, result, summary)


def _summary(result, t0: float) -> dict:
    """The DONE record, with the reward std derived from the averaged first two moments."""
    train = dict(result.last)
    if (std := reward_std(train)) is not None:
        train["reward_std"] = std
    evals = dict(result.eval) if result.eval else None
    if evals and (std := reward_std(evals, "eval/")) is not None:
        evals["eval/reward_std"] = std
    return {"steps": result.steps, "train": train, "eval": evals,
            "resumed_from": result.resumed_from, "wall_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# Scoring


@torch.no_grad()
def score(model, tokenizer, records, *, template: str, max_length: int,
          batch_size: int) -> list[float]:
    """r(prompt, response) for each ``(prompt messages, response)`` of ``records``, in order.

    Encoded exactly as in training (:func:`alignkit.data.preference.encode_completion`: the
    response ends with the end-of-turn token) and cut as ``truncate_left`` cuts a pair. Rows are
    batched by length (less padding); runs under the caller's autocast on the model's device.
    """
    from alignkit.data.collate import collate
    from alignkit.data.preference import _fit, encode_completion
    from alignkit.data.templates import Encoded, resolve_template
    from alignkit.models.heads import reward_scores

    template = resolve_template(template, tokenizer)
    rows = []
    for prompt, response in records:
        prompt_ids, completion = encode_completion(tokenizer, tuple(prompt), response, template)
        prompt_ids, (completion,) = _fit(prompt_ids, [completion], max_length,
                                         tokenizer.bos_token_id)
        rows.append(prompt_ids + completion)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    scores = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        t = collate([Encoded(rows[i], [False] * len(rows[i])) for i in chunk],
                    pad_id=tokenizer.pad_token_id)
        r = reward_scores(model, t["input_ids"].to(device), t["attention_mask"].to(device))
        for i, value in zip(chunk, r.tolist()):
            scores[i] = value
    return scores


def read_score_records(path: str) -> list[tuple[dict, tuple[dict, ...], str]]:
    """(record, prompt messages, response) per record of ``path``.

    A record has ``prompt`` (a string, or messages ending with a user turn) and ``response``,
    or ``messages`` ending with an assistant turn. InputError naming path, line and field.
    """
    from alignkit.data.formats import _text, to_conversation
    from alignkit.data.preference import _prompt
    from alignkit.data.sources import read_records

    out = []
    for rec in read_records(path):
        where = {"path": rec.path, "line": rec.line}
        if "messages" in rec.data:
            messages = to_conversation(rec, "messages").messages
            out.append((rec.data, messages[:-1], messages[-1]["content"]))
        elif "prompt" in rec.data or "response" in rec.data:
            prompt = _prompt(rec.data, where)
            out.append((rec.data, prompt, _text(rec.data, "response", **where)))
        else:
            found = ", ".join(sorted(map(str, rec.data))) or "none"
            raise InputError(f"expected 'prompt' and 'response', or 'messages' ending with an "
                             f"assistant turn; keys found: {found}", **where)
    return out


def score_file(*, model: str, data: str, output: str, template: str = "auto",
               batch_size: int = 8, max_length: int | None = None, device: str = "auto",
               precision: str = "auto", log=print) -> Path:
    """Score every record of ``data`` with the reward model folder ``model``; write ``output``
    (JSONL: each input record plus ``"score"``) through a temporary file renamed into place."""
    from alignkit.engine.device import resolve_runtime
    from alignkit.models.heads import load_reward_model

    items = read_score_records(data)  # bad input fails before the model loads
    rt = resolve_runtime(device, precision)
    rm, tokenizer = load_reward_model(ModelConfig(name_or_path=model), device=rt.device,
                                      require_head=True)
    max_length = max_length or PreferenceDataConfig().max_length
    with rt.autocast():
        scores = score(rm, tokenizer, [(p, r) for _, p, r in items], template=template,
                       max_length=max_length, batch_size=batch_size)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for (record, _, _), s in zip(items, scores):
                f.write(json.dumps({**record, SCORE_KEY: s}, ensure_ascii=False) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"scored {len(scores)} records → {out}")
    return out
