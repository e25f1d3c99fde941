"""Direct Preference Optimization (Rafailov et al. 2023) and its variants.

For a pair (x, y_c ≻ y_r), with sequence log-probabilities of the policy π_θ and of the frozen
reference π_ref (the starting model), DPO minimises (eq. 7)

    L = −log σ( β·[(log π_θ(y_c|x) − log π_ref(y_c|x)) − (log π_θ(y_r|x) − log π_ref(y_r|x))] )

and ``loss_type`` picks a variant (cDPO/robust label smoothing, IPO, SLiC hinge, reference-free
SimPO: see :func:`alignkit.losses.preference.dpo_loss`). Ranked lists are expanded into all
their pairs, or trained with the Plackett–Luce objective (appendix A.3) with
``ranked_loss: plackett_luce``. Each unit (a pair, or a list) weighs the same; the engine
divides the summed loss by the global number of units.

Logged with TRL's names: ``rewards/chosen`` and ``rewards/rejected`` (the implicit reward
β·(log π_θ − log π_ref), eq. 5, averaged over units), ``rewards/margins``,
``rewards/accuracies`` (chosen reward strictly above rejected: the held-out implicit-reward
accuracy is ``eval/rewards/accuracies``), ``logps/chosen``, ``logps/rejected``.

What we do differently from the paper's code and from TRL:

- The reference is precomputed by default: with full fine-tuning its log-probs are computed
  once over the training and eval pairs before training and cached on disk, so training holds
  one model in memory and runs one forward per batch. With LoRA the reference is the policy
  with its adapters disabled (no copy). A frozen copy remains available (``reference: copy``).
- The LM head and the fp32 log-softmax run only on completion tokens (never on the prompt or
  padding), through :mod:`alignkit.models.logps`.
- Chosen and rejected go through one forward, not two, and by default share their prompt's
  computation (``prefix_sharing``): each pair is one sequence ``[prompt | chosen | rejected]``
  whose attention mask keeps rejected from seeing chosen, so the prompt is computed once
  (:func:`alignkit.models.logps.shared_prefix_logps`); off, a batch is 2B rows prompt + reply.
  The reference computes its log-probs the same way as the policy. A batch's ``tokens`` (and so
  the logged tokens/s) count the prompt once when shared: compare layouts by pairs/s.
- Soft labels in the data (``label`` = P(chosen ≻ rejected), as `alignkit cai feedback`
  writes them) are the sigmoid loss's per-pair targets (``soft_labels: use``, the default; see
  :func:`alignkit.losses.preference.dpo_loss`); margins are not used (reward modelling uses them).
- For Plackett–Luce lists, ``rewards/chosen`` is the best response's reward and
  ``rewards/rejected`` the mean over the others; ``rewards/accuracies`` is the fraction of the
  list's pairs in the right order.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from alignkit.config.schema import DPOConfig, PreferenceDataConfig
from alignkit.engine.device import Runtime
from alignkit.engine.loop import Batch, fit
from alignkit.errors import AlignkitError
from alignkit.losses.preference import dpo_loss, plackett_luce_dpo_loss, preference_metrics
from alignkit.models.logps import PLAIN_KEYS, SHARED_KEYS, batch_logps
from alignkit.models.reference import (AdaptersDisabled, FrozenCopy, Reference, ReferenceKind,
                                       precomputed_reference, reference_kind)
from alignkit.stages.common import begin, describe, end

_LIST_KEYS = ("list_index", "rank", "list_mask")


# ---------------------------------------------------------------------------------------------
# Rows: encoded pairs or ranked lists → batches, laid out for the reference table


class PreferenceRows:
    """The encoded examples of both splits as model rows (see :class:`RowSource`).

    Pairs: example i owns table rows 2i (chosen) and 2i+1 (rejected); a batch of B pairs is
    2B rows, chosen first (:func:`collate_pairs`). Ranked lists: list i owns K_i consecutive
    rows, best first, and a batch is its lists' rows in order (:func:`collate_ranked`).
    With ``shared`` the batch holds the same rows prefix-shared, one sequence per example
    (:func:`collate_pairs_shared`, :func:`collate_ranked_shared`).
    """

    def __init__(self, train: list, eval_: list, *, pad_id: int, ranked: bool,
                 labels: bool = False, shared: bool = False) -> None:
        self.splits = {"train": train, "eval": eval_}
        self.pad_id, self.ranked, self.labels, self.shared = pad_id, ranked, labels, shared
        self.offsets = {s: self._offsets(items) for s, items in self.splits.items()}

    def _offsets(self, items: list) -> list[int]:
        sizes = [len(it.completions) if self.ranked else 2 for it in items]
        out = [0]
        for k in sizes:
            out.append(out[-1] + k)
        return out  # example i's rows: offsets[i] .. offsets[i+1]-1

    def num_examples(self, split: str) -> int:
        return len(self.splits[split])

    def num_rows(self, split: str) -> int:
        return self.offsets[split][-1]

    def example_length(self, i: int, split: str) -> int:
        """Tokens in example i's longest sequence (its batch's padded width)."""
        from alignkit.data.preference import item_length
        return item_length(self.splits[split][i], shared=self.shared)

    def tokens(self, indices: list[int], split: str) -> int:
        """Tokens the model computes for these examples (padding excluded)."""
        from alignkit.data.preference import item_tokens
        return sum(item_tokens(self.splits[split][i], shared=self.shared) for i in indices)

    def fingerprint(self, split: str) -> str:
        from alignkit.data.preference import pair_fingerprint
        return pair_fingerprint(self.splits[split])

    def model_inputs(self, indices: list[int], split: str):
        """(batch tensors, (R,) table rows of the batch's rows in batch order)."""
        from alignkit.data import preference as pref
        items = [self.splits[split][i] for i in indices]
        off = self.offsets[split]
        keys = SHARED_KEYS if self.shared else PLAIN_KEYS
        if self.ranked:
            collate = pref.collate_ranked_shared if self.shared else pref.collate_ranked
            t = collate(items, pad_id=self.pad_id)
            rows = [r for i in indices for r in range(off[i], off[i + 1])]
            return {k: t[k] for k in keys + _LIST_KEYS}, torch.tensor(rows, dtype=torch.long)
        collate = pref.collate_pairs_shared if self.shared else pref.collate_pairs
        t = collate(items, pad_id=self.pad_id)
        rows = [off[i] for i in indices] + [off[i] + 1 for i in indices]
        keys += ("label",) if self.labels else ()  # label: 1.0 where none
        return {k: t[k] for k in keys}, torch.tensor(rows, dtype=torch.long)


class DPOTask:
    """The engine's view: batches of preference units and the DPO loss module."""

    def __init__(self, rows: PreferenceRows, model: torch.nn.Module,
                 reference: Reference | None, cfg: DPOConfig) -> None:
        self.rows, self.model, self.reference, self.cfg = rows, model, reference, cfg

    def num_examples(self, split: str) -> int:
        return self.rows.num_examples(split)

    def lengths(self, split: str) -> list[int]:
        """Each example's padded width in the batch layout (``train.group_by_length``)."""
        return [self.rows.example_length(i, split) for i in range(self.num_examples(split))]

    def collate(self, indices: list[int], split: str) -> Batch:
        inputs, rows = self.rows.model_inputs(indices, split)
        if self.reference is not None:
            inputs |= self.reference.batch_inputs(rows, split)
        return Batch(inputs=inputs, count=len(indices), tokens=self.rows.tokens(indices, split),
                     ids=indices)

    def module(self) -> torch.nn.Module:
        cls = RankedDPOLoss if self.rows.ranked else PairDPOLoss
        return cls(self.model, self.reference, self.cfg)


# ---------------------------------------------------------------------------------------------
# Loss modules: forward(**batch.inputs) → (Σ unit losses, {metric: Σ over units})


class PairDPOLoss(torch.nn.Module):
    """2B rows (B chosen, then B rejected) → Σ_pairs dpo_loss and TRL-named metric sums.

    ``inputs``: the rows plain or prefix-shared (see :func:`batch_logps`).
    """

    def __init__(self, model, reference: Reference | None, cfg: DPOConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.reference = reference  # a plain object, not a submodule: DDP must not touch it

    def forward(self, ref_logps=None, label=None, **inputs):
        policy = batch_logps(self.model, inputs)
        b = policy.logps.shape[0] // 2
        pc, pr = policy.logps[:b], policy.logps[b:]  # (B,), (B,)
        rc = rr = None
        if self.reference is not None:
            ref = self.reference.logps(ref_logps, **inputs)
            rc, rr = ref[:b], ref[b:]
        cfg, simpo = self.cfg, self.cfg.loss_type == "simpo"
        out = dpo_loss(pc, pr, rc, rr, beta=cfg.beta, loss_type=cfg.loss_type,
                       label_smoothing=cfg.label_smoothing,
                       gamma=cfg.simpo_gamma if simpo else 0.0,
                       chosen_lengths=policy.n_tokens[:b] if simpo else None,
                       rejected_lengths=policy.n_tokens[b:] if simpo else None,
                       labels=label)
        metrics = {k: v.sum() for k, v in preference_metrics(out).items()}
        metrics["logps/chosen"] = pc.detach().sum()
        metrics["logps/rejected"] = pr.detach().sum()
        return out.losses.sum(), metrics


class RankedDPOLoss(torch.nn.Module):
    """R rows of B ranked lists → Σ_lists Plackett–Luce DPO loss and metric sums."""

    def __init__(self, model, reference: Reference, cfg: DPOConfig) -> None:
        super().__init__()
        self.model, self.cfg = model, cfg
        self.reference = reference  # not a submodule (see PairDPOLoss)

    def forward(self, list_index, rank, list_mask, ref_logps=None, **inputs):
        policy = batch_logps(self.model, inputs).logps  # (R,)
        ref = self.reference.logps(ref_logps, **inputs)  # (R,)
        pol = _to_lists(policy, list_index, rank, list_mask)  # (B, K)
        out = plackett_luce_dpo_loss(pol, _to_lists(ref, list_index, rank, list_mask),
                                     beta=self.cfg.beta, mask=list_mask)
        return out.losses.sum(), _ranked_metrics(out.rewards, pol.detach(), out.accuracies,
                                                 list_mask)


def _ranked_metrics(rewards, policy_logps, accuracies, list_mask) -> dict[str, torch.Tensor]:
    """Sums over lists: the best response plays "chosen", the mean of the others "rejected".

    Shapes: rewards (B, K), policy_logps (B, K), accuracies (B,), list_mask (B, K).
    """
    rest = list_mask.clone()
    rest[:, 0] = False  # every present response but the best
    n_rest = rest.sum(-1).clamp(min=1)

    def best_and_rest(v):  # (B, K) → (B,) best, (B,) mean of the rest
        return v[:, 0], (v * rest).sum(-1) / n_rest

    chosen, rejected = best_and_rest(rewards)
    lp_chosen, lp_rejected = best_and_rest(policy_logps)
    return {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
            "rewards/margins": (chosen - rejected).sum(), "rewards/accuracies": accuracies.sum(),
            "logps/chosen": lp_chosen.sum(), "logps/rejected": lp_rejected.sum()}


def _to_lists(values: torch.Tensor, list_index: torch.Tensor, rank: torch.Tensor,
              list_mask: torch.Tensor) -> torch.Tensor:
    """(R,) row values → (B, K) by (list, rank); absent entries 0 (masked out by the loss)."""
    out = torch.zeros(list_mask.shape, dtype=values.dtype, device=values.device)
    return out.index_put((list_index, rank), values)  # out of place: gradients flow to values


# ---------------------------------------------------------------------------------------------
# Data


def preference_rows(cfg: DPOConfig, tokenizer, log) -> tuple[PreferenceRows, dict]:
    """Load, split, (expand ranked lists,) tokenise; returns the rows and the data report."""
    from alignkit.data import resolve_template, split_train_eval
    from alignkit.data.preference import RankedList, tokenize_preferences
    data = cfg.data
    template = resolve_template(data.template, tokenizer)
    items, load_rep = _load(data, data.path, data.max_examples)
    if data.eval_path:
        train, evals = items, _load(data, data.eval_path, None)[0][: data.eval_max_examples]
    else:
        train, evals = split_train_eval(items, eval_fraction=data.eval_fraction,
                                        seed=cfg.train.seed, max_eval=data.eval_max_examples)
    # Split before expanding, so pairs of one ranked list never sit on both sides.
    ranked = cfg.ranked_loss == "plackett_luce" and any(isinstance(x, RankedList) for x in train)
    kw = dict(template=template, max_length=data.max_length, truncation=data.truncation)
    train_enc, train_rep = tokenize_preferences(tokenizer, _units(train, ranked), **kw)
    eval_enc, eval_rep = tokenize_preferences(tokenizer, _units(evals, ranked), **kw)
    unit = "ranked lists" if ranked else "pairs"
    shared = prefix_sharing(cfg, ranked)
    log(f"template: {template}; {load_rep.summary()}; {unit}: train {train_rep.summary()}; "
        f"eval {eval_rep.summary()}; prefix sharing: {'on' if shared else 'off'}")
    labelled = sum(getattr(x, "label", None) is not None for x in items)
    use_labels = bool(labelled) and cfg.soft_labels == "use"
    if use_labels and (ranked or cfg.loss_type != "sigmoid"):
        what = "ranked_loss plackett_luce" if ranked else f"loss_type {cfg.loss_type}"
        raise AlignkitError(f"{data.path}: {labelled} pairs carry a soft label, which only the "
                            f"sigmoid pair loss can use, not {what}; set soft_labels: ignore "
                            "to treat every pair as certain")
    if labelled:
        log(f"{labelled} pairs carry a soft label: " + (
            "the loss targets P(chosen ≻ rejected) per pair" if use_labels
            else "ignored (soft_labels: ignore), every pair is taken as chosen ≻ rejected"))
    report = {"path": data.path, "template": template, "units": unit, "load": asdict(load_rep),
              "train": asdict(train_rep), "eval": asdict(eval_rep), "prefix_sharing": shared}
    rows = PreferenceRows(train_enc, eval_enc, pad_id=tokenizer.pad_token_id, ranked=ranked,
                          labels=use_labels, shared=shared)
    return rows, report


def prefix_sharing(cfg: DPOConfig, ranked: bool) -> bool:
    """Resolve ``cfg.prefix_sharing`` (:func:`alignkit.data.preference.shares_prefix`): auto
    is on for pairs, every loss type (the shared layout gives the same summed log-probs and
    token counts), and off for Plackett–Luce lists."""
    from alignkit.data.preference import shares_prefix
    return shares_prefix(cfg.prefix_sharing, ranked=ranked)


def _load(data: PreferenceDataConfig, path: str, max_examples: int | None):
    from alignkit.data.preference import load_preferences
    return load_preferences(path, fmt=data.format, system_prompt=data.system_prompt,
                            max_examples=max_examples, split=data.split)


def _units(items: list, ranked: bool) -> list:
    """Pairs mode: ranked lists become their K(K−1)/2 pairs. Ranked mode: a pair is a list of 2
    (Plackett–Luce with K = 2 is exactly sigmoid DPO)."""
    from alignkit.data.preference import PreferencePair, RankedList, pairs_from_ranked
    out = []
    for x in items:
        if ranked and isinstance(x, PreferencePair):
            out.append(RankedList(x.prompt, (x.chosen, x.rejected), x.source))
        elif not ranked and isinstance(x, RankedList):
            out.extend(pairs_from_ranked(x))
        else:
            out.append(x)
    return out


# ---------------------------------------------------------------------------------------------
# Run


def check_loss_config(cfg: DPOConfig) -> None:
    """Refuse a loss setting that ``dpo_loss`` would refuse, before any data or model loads."""
    simpo = cfg.loss_type == "simpo"
    try:  # the loss validates its own arguments; one call on numbers asks it
        dpo_loss(0.0, 0.0, None if simpo else 0.0, None if simpo else 0.0, beta=cfg.beta,
                 loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                 gamma=cfg.simpo_gamma if simpo else 0.0, chosen_lengths=1.0 if simpo else None,
                 rejected_lengths=1.0 if simpo else None)
    except ValueError as err:
        raise AlignkitError(f"loss_type {cfg.loss_type}: {err}") from None


def build_reference(cfg: DPOConfig, kind: ReferenceKind | None, model, tokenizer,
                    rows: PreferenceRows, rt: Runtime, log) -> Reference | None:
    """The copy or precomputed reference, from the starting model (call before LoRA and before
    a checkpoint is loaded) or from ``cfg.reference_model``. Adapters: see :func:`run`."""
    if kind is None or kind == "adapters":
        return None
    other = cfg.reference_model is not None
    source = _load_reference_model(cfg, tokenizer, rt) if other else model
    if kind == "copy":
        return FrozenCopy(source, clone=not other)  # a model loaded for the purpose is not copied
    micro = cfg.train.batch_size // cfg.train.grad_accum
    salt = {"template": cfg.data.template, "reference_model": cfg.reference_model}
    if rows.shared:
        # The shared forward's numbers equal the plain one's only up to rounding (under bf16 a
        # row's log-prob already moves with its batch's shape: ~0.01 nats on SmolLM2-135M, see
        # reference._length_order), and a table must match the training forward bit for bit
        # (step 0: policy = reference exactly). Salting only this layout keeps the plain keys.
        salt["prefix_sharing"] = True
    return precomputed_reference(source, rows, rt, batch_size=micro, salt=salt, log=log)


def _load_reference_model(cfg: DPOConfig, tokenizer, rt: Runtime):
    from alignkit.config.schema import ModelConfig
    from alignkit.models.load import load_causal_lm
    mcfg = ModelConfig(name_or_path=cfg.reference_model,
                       trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation)
    ref, ref_tokenizer = load_causal_lm(mcfg, device=rt.device)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        # log-probs of the same token ids under another vocabulary would mean nothing
        raise AlignkitError(f"reference_model {cfg.reference_model} has another tokenizer "
                            "than the policy; both must share one vocabulary")
    return ref


def run(cfg: DPOConfig, *, overwrite: bool = False, log=print) -> Path:
    """Train with DPO and save the policy; returns the run folder. Reruns resume."""
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.models.lora import apply_lora

    if cfg.data.path is None:
        raise AlignkitError("dpo needs preference data: --data FILE (records with prompt, "
                            "chosen, rejected; HH-RLHF transcripts; or ranked lists)")
    check_loss_config(cfg)
    kind = reference_kind(cfg)
    st = begin(cfg, overwrite=overwrite, log=log)
    if st.done:
        return st.run_dir.path
    tokenizer = load_tokenizer(cfg.model)  # data errors surface before the model loads
    rows, report = preference_rows(cfg, tokenizer, st.log)
    if rows.ranked and kind is None:
        raise AlignkitError("ranked_loss plackett_luce needs a reference; simpo has none "
                            "(use ranked_loss pairs)")
    st.run_dir.prepare()
    model, tokenizer = load_causal_lm(cfg.model, device=st.rt.device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    reference = build_reference(cfg, kind, model, tokenizer, rows, st.rt, st.log)
    model = apply_lora(model, cfg.model.lora)
    if kind == "adapters":
        reference = AdaptersDisabled(model)
    st.log(describe(cfg, model, st.rt, extra=f"reference: {kind or 'none (simpo)'}; "))
    st.run_dir.write_json("data_report.json", report | {"reference": kind})
    task = DPOTask(rows, model, reference, cfg)
    result = fit(task, model, cfg.train, st.rt, output=st.run_dir.path, log=st.log)
    return end(st, model, tokenizer, result)
