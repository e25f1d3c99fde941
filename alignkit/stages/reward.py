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
engine's unit count). With ``prefix_sharing`` (default for pairs) that forward holds one
sequence per pair, ``[prompt | chosen | rejected]`` with rejected masked from chosen, so the
prompt is computed once instead of twice.

The head starts as a linear probe of the frozen trunk (``head_init: probe``, LP-FT: Kumar et
al. 2022): fitted by L-BFGS on pooled features of up to ``probe_examples`` training examples
with the same loss, then everything fine-tunes. A random head at a pretrained trunk's learning
rate barely moves in an epoch (Adam moves a weight by about lr per step), so the trunk has to turn
its features towards a random direction; on 2,660 HH-RLHF pairs that left the embedded model at
chance (held-out 0.517 / 0.519) where the probe alone reaches about 0.55.

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
import time
from dataclasses import asdict
from pathlib import Path

import torch

from alignkit.config.schema import ModelConfig, PreferenceDataConfig, RewardConfig
from alignkit.engine import checkpoint
from alignkit.engine.loop import Batch, fit
from alignkit.errors import InputError
from alignkit.losses.reward import (bradley_terry_loss, centering_penalty, plackett_luce_loss,
                                    ranked_pairwise_loss, ranking_to_pairs)
from alignkit.stages.common import begin, describe, end

NO_DATA = ("reward modelling needs preference data: pass --data FILE (pairs with prompt/chosen/"
           "rejected, HH-RLHF transcripts, or ranked lists), e.g. the demo set "
           "alignkit/assets/data/preferences_demo.jsonl")
SCORE_KEY = "score"

_PAIR_FIELDS = ("margin", "label")
_RANKED_FIELDS = ("list_index", "rank", "list_mask")
_PLAIN_KEYS = ("input_ids", "attention_mask")  # loss_mask is not needed: one position per row
_SHARED_KEYS = ("input_ids", "attention_mask", "position_ids", "last_index")


# ---------------------------------------------------------------------------------------------
# Batches and loss


class PreferenceTask:
    """Encoded pairs or ranked lists for the train and eval splits → one batch per forward.

    A split holds one kind (a file has one format); the eval file may be of the other kind.
    ``Batch.count`` is the number of pairs or lists: the loss's normalisation unit;
    ``Batch.tokens`` the tokens the trunk computes (padding excluded).

    ``prefix_sharing`` (:func:`alignkit.data.preference.shares_prefix`): "auto" lays pairs
    out prefix-shared, ``[prompt | chosen | rejected]`` in one sequence
    (:func:`alignkit.data.preference.collate_pairs_shared`), so the prompt goes through the
    trunk once instead of twice, and keeps ranked lists plain; "on" shares lists' prompts too;
    "off" keeps every completion a row of its own. The rewards are the same up to kernel
    rounding.
    """

    def __init__(self, model, train: list, eval_: list, pad_id: int, *, ranked_loss: str,
                 center_rewards: float, prefix_sharing: str = "off") -> None:
        self.model, self.splits, self.pad_id = model, {"train": train, "eval": eval_}, pad_id
        self.ranked_loss, self.center_rewards = ranked_loss, center_rewards
        self.prefix_sharing = prefix_sharing

    def num_examples(self, split: str) -> int:
        return len(self.splits[split])

    def shared(self, item) -> bool:
        """Is this item's kind (pair or ranked list) laid out prefix-shared?"""
        from alignkit.data.preference import EncodedPair, shares_prefix
        return shares_prefix(self.prefix_sharing, ranked=not isinstance(item, EncodedPair))

    def lengths(self, split: str) -> list[int]:
        from alignkit.data.preference import item_length
        return [item_length(it, shared=self.shared(it)) for it in self.splits[split]]

    def collate(self, indices: list[int], split: str) -> Batch:
        from alignkit.data import preference as pref
        items = [self.splits[split][i] for i in indices]
        pairs = isinstance(items[0], pref.EncodedPair)
        if any(isinstance(it, pref.EncodedPair) != pairs for it in items):
            raise ValueError("a batch mixes pairs and ranked lists")
        shared = self.shared(items[0])
        if pairs:
            make = pref.collate_pairs_shared if shared else pref.collate_pairs
        else:
            make = pref.collate_ranked_shared if shared else pref.collate_ranked
        t = make(items, pad_id=self.pad_id)
        keys = (_SHARED_KEYS if shared else _PLAIN_KEYS) + (_PAIR_FIELDS if pairs
                                                            else _RANKED_FIELDS)
        tokens = sum(pref.item_tokens(it, shared=shared) for it in items)
        return Batch(inputs={k: t[k] for k in keys}, count=len(items), tokens=tokens,
                     ids=indices)

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
                rank=None, list_mask=None, position_ids=None, last_index=None):
        from alignkit.models.heads import reward_scores
        rewards = reward_scores(self.model, input_ids, attention_mask, position_ids,
                                last_index)  # (R,) fp32, plain or prefix-shared
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


# ---------------------------------------------------------------------------------------------
# Linear-probe head initialisation (LP-FT)

PROBE_L2 = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # on standardised features, per unit; chosen by CV
PROBE_FOLDS = 5


@torch.no_grad()
def _probe_units(task: PreferenceTask, indices: list[int], micro: int, rt) -> list:
    """One (features (R, H) fp32 on the CPU, its non-model inputs) per example: a pair's two
    rows (chosen, rejected) or a list's K rows, with the batch inputs that belong to it."""
    from alignkit.models.heads import pooled_features
    device = next(task.model.parameters()).device
    units = []
    for start in range(0, len(indices), micro):
        b = task.collate(indices[start:start + micro], "train")
        model_inputs = {k: b.inputs[k].to(device) for k in _SHARED_KEYS if k in b.inputs}
        with rt.autocast():
            feats = pooled_features(task.model, **model_inputs).float().cpu()
        if "list_mask" in b.inputs:
            li, rank, lm = b.inputs["list_index"], b.inputs["rank"], b.inputs["list_mask"]
            for i in range(lm.shape[0]):
                rows = li == i
                units.append((feats[rows], {"rank": rank[rows], "list_mask": lm[i]}))
        else:
            B = feats.shape[0] // 2
            for i in range(B):
                units.append((feats[[i, B + i]], {"margin": b.inputs["margin"][i],
                                                  "label": b.inputs["label"][i]}))
    return units


def _stack(units: list) -> tuple[torch.Tensor, dict]:
    """Many units as one batch laid out as the training loss expects."""
    feats = [f for f, _ in units]
    if "list_mask" in units[0][1]:
        k = max(aux["list_mask"].shape[0] for _, aux in units)
        mask = torch.zeros(len(units), k, dtype=torch.bool)
        for i, (_, aux) in enumerate(units):
            mask[i, :aux["list_mask"].shape[0]] = aux["list_mask"]
        aux = {"list_index": torch.cat([torch.full((len(f),), i) for i, f in enumerate(feats)]),
               "rank": torch.cat([a["rank"] for _, a in units]), "list_mask": mask}
        return torch.cat(feats), aux
    rows = torch.cat([torch.stack([f[0] for f in feats]), torch.stack([f[1] for f in feats])])
    return rows, {"margin": torch.stack([a["margin"] for _, a in units]),
                  "label": torch.stack([a["label"] for _, a in units])}


def _probe_loss(loss: "RewardModelLoss", rewards: torch.Tensor, aux: dict):
    """(Σ loss, Σ accuracy) of the training objective for a stacked batch's rewards."""
    if "list_mask" in aux:
        total, ms = loss._lists(rewards, aux["list_index"], aux["rank"], aux["list_mask"])
    else:
        total, ms = loss._pairs(rewards, aux["margin"], aux["label"])
    return total, ms["accuracy"]


def _fit_probe(feats: torch.Tensor, aux: dict, n: int, loss: "RewardModelLoss",
               l2: float) -> torch.Tensor:
    """w minimising (1/n)·Σ training loss of rewards feats·w + l2·|w|², by L-BFGS."""
    w = torch.zeros(feats.shape[1], dtype=torch.float32, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = _probe_loss(loss, feats @ w, aux)[0] / n + l2 * (w ** 2).sum()
        value.backward()
        return value

    opt.step(closure)
    return w.detach()


def probe_head(task: PreferenceTask, model, rt, *, max_examples: int, micro: int, seed: int,
               log=print) -> dict:
    """Set the score head to a linear probe of the frozen trunk, before fine-tuning (LP-FT).

    A fresh random head beside a pretrained trunk learns slowly at the trunk's learning rate, and
    its first gradients push the trunk's features towards a random direction (Kumar et al. 2022,
    "Fine-Tuning can Distort Pretrained Features"). Instead: pool the frozen trunk's features of
    up to ``max_examples`` training pairs or lists (one forward each), standardise them, fit w by
    L-BFGS on the stage's own loss (Bradley–Terry with margins and soft labels, ranked pairs or
    Plackett–Luce, centering up to a constant offset) plus l2·|w|², with l2 chosen by
    ``PROBE_FOLDS``-fold cross-validated loss, refit on all and write w / σ into the head.
    Returns what it did, with the cross-validated accuracy: an honest estimate of what the
    frozen features know before any fine-tuning.
    """
    t0 = time.perf_counter()
    n = task.num_examples("train")
    gen = torch.Generator().manual_seed(seed * 7_919 + 1)
    picked = torch.randperm(n, generator=gen)[:max_examples].tolist()
    was_training = model.training
    model.eval()
    units = _probe_units(task, picked, micro, rt)
    model.train(was_training)
    rows = torch.cat([f for f, _ in units])
    mu, sd = rows.mean(0), rows.std(0).clamp(min=1e-6)
    units = [((f - mu) / sd, aux) for f, aux in units]
    loss = RewardModelLoss(None, ranked_loss=task.ranked_loss, center_rewards=task.center_rewards)
    folds = PROBE_FOLDS if len(units) >= 2 * PROBE_FOLDS else 0
    cv: dict[float, tuple[float, float]] = {}
    for l2 in PROBE_L2 if folds else ():
        total_loss = total_acc = 0.0
        for k in range(folds):
            train_u = [u for i, u in enumerate(units) if i % folds != k]
            val_u = [u for i, u in enumerate(units) if i % folds == k]
            w = _fit_probe(*_stack(train_u), len(train_u), loss, l2)
            feats, aux = _stack(val_u)
            with torch.no_grad():
                lsum, asum = _probe_loss(loss, feats @ w, aux)
            total_loss, total_acc = total_loss + lsum.item(), total_acc + asum.item()
        cv[l2] = (total_loss / len(units), total_acc / len(units))
    l2 = min(cv, key=lambda k: cv[k][0]) if cv else 0.1
    w = _fit_probe(*_stack(units), len(units), loss, l2) / sd  # back to the raw features' scale
    from alignkit.models.heads import head_linears
    with torch.no_grad():
        for linear in head_linears(model):
            linear.weight.copy_(w.to(linear.weight.dtype).reshape(linear.weight.shape))
    info = {"examples": len(units), "l2": l2, "seconds": round(time.perf_counter() - t0, 1)}
    if cv:
        info |= {"cv_loss": round(cv[l2][0], 4), "cv_accuracy": round(cv[l2][1], 4),
                 "cv": {f"{k:g}": [round(v[0], 4), round(v[1], 4)] for k, v in cv.items()}}
    log("head initialised by a linear probe of the frozen trunk on "
        f"{info['examples']} training examples (L2 {l2:g}"
        + (f"; {folds}-fold cross-validated accuracy {info['cv_accuracy']:.3f}, "
           f"loss {info['cv_loss']:.4f}" if cv else "") + f") in {info['seconds']:.0f} s")
    return info


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
    from alignkit.models.heads import apply_reward_lora, load_reward_model, split_reward_model
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
    task = PreferenceTask(model, train, evals, tokenizer.pad_token_id,
                          ranked_loss=cfg.ranked_loss, center_rewards=cfg.center_rewards,
                          prefix_sharing=cfg.prefix_sharing)
    report["prefix_sharing"] = {split: task.shared(items[0]) if items else None
                                for split, items in task.splits.items()}
    st.run_dir.write_json("data_report.json", report)
    fresh_head = not _is_saved_reward_model(cfg.model)
    resuming = checkpoint.latest_good(st.run_dir.path / "checkpoints", quiet=True) is not None
    if fresh_head and cfg.head_init == "probe" and not resuming:
        micro = cfg.train.batch_size // cfg.train.grad_accum
        info = probe_head(task, model, st.rt, max_examples=cfg.probe_examples, micro=micro,
                          seed=cfg.train.seed, log=st.log)
        report["head_probe"] = info
        st.run_dir.write_json("data_report.json", report)
    head = split_reward_model(model)[1]
    lr_groups = [(list(head.parameters()), cfg.head_lr)] if cfg.head_lr else []
    result = fit(task, model, cfg.train, st.rt, output=st.run_dir.path, log=st.log,
                 lr_groups=lr_groups)
    summary = _summary(result, st.t0)
    if summary["eval"]:
        e = summary["eval"]
        st.log(f"held-out: accuracy {e['eval/accuracy']:.3f}, margin {e['eval/margin']:.3f}, "
               f"reward {e['eval/reward_mean']:.3f} ± {e['eval/reward_std']:.3f}")
    # merges LoRA; the pad token was made distinct on load
    return end(st, model, tokenizer, result, summary)


def _is_saved_reward_model(cfg: ModelConfig) -> bool:
    """Does the run start from a trained reward model (whose head must be kept)?"""
    from alignkit.models.heads import _is_reward_model
    from alignkit.models.load import resolve_model_path
    return _is_reward_model(resolve_model_path(cfg.name_or_path), cfg)


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
    from alignkit.io import atomic_path
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for (record, _, _), s in zip(items, scores):
            f.write(json.dumps({**record, SCORE_KEY: s}, ensure_ascii=False) + "\n")
    log(f"scored {len(scores)} records → {out}")
    return out
