"""Held-out preference accuracy: does a reward model, or a DPO policy's implicit reward, rank
the chosen response above the rejected one?

- Reward model: r(x, y) read at the last token; correct when r(x, y_c) > r(x, y_r).
- DPO implicit reward (Rafailov et al. 2023, eq. 5): r(x, y) = β·(log π(y|x) − log π_ref(y|x));
  correct when r_c > r_r. Ties (e.g. policy == reference) count as wrong.

Both tokenise pairs exactly as training does (same template, truncation, EOS).
"""

from __future__ import annotations

import torch

from alignkit.config.schema import ModelConfig


def _encoded_pairs(path: str, tokenizer, *, template: str, max_length: int,
                   max_examples: int | None):
    from alignkit.data import load_preferences, pairs_from_ranked, resolve_template
    from alignkit.data import tokenize_preferences
    items, report = load_preferences(path, max_examples=max_examples)
    pairs = [p for it in items for p in (pairs_from_ranked(it) if hasattr(it, "responses") else [it])]
    tmpl = resolve_template(template, tokenizer)
    enc, tok_report = tokenize_preferences(tokenizer, pairs, template=tmpl, max_length=max_length,
                                           truncation="truncate_left")
    return enc, {"data": report.summary(), "tokenize": tok_report.summary(), "template": tmpl}


def _summarise(chosen: torch.Tensor, rejected: torch.Tensor) -> dict:
    margins = chosen - rejected
    both = torch.cat([chosen, rejected])
    # accuracy counts strict wins: a tie (margin exactly 0, as for a policy equal to its
    # reference) is not a win, and ``ties`` says how many there were.
    return {"pairs": len(chosen), "accuracy": (margins > 0).float().mean().item(),
            "ties": int((margins == 0).sum()), "margin": margins.mean().item(), "reward_mean": both.mean().item(),
            "reward_std": both.std().item() if len(both) > 1 else 0.0}


@torch.no_grad()
def reward_model_accuracy(model_path: str, data: str, *, template: str = "auto",
                          max_length: int = 512, batch_size: int = 16,
                          max_examples: int | None = None, rt=None) -> dict:
    from alignkit.data.preference import collate_pairs
    from alignkit.engine.device import resolve_runtime
    from alignkit.models.heads import load_reward_model, reward_scores
    rt = rt or resolve_runtime("auto", "auto")
    model, tok = load_reward_model(ModelConfig(name_or_path=model_path), device=rt.device,
                                   require_head=True)
    enc, info = _encoded_pairs(data, tok, template=template, max_length=max_length,
                               max_examples=max_examples)
    chosen, rejected = [], []
    for i in range(0, len(enc), batch_size):
        b = collate_pairs(enc[i:i + batch_size], pad_id=tok.pad_token_id)
        with rt.autocast():
            r = reward_scores(model, b["input_ids"].to(rt.device),
                              b["attention_mask"].to(rt.device)).float().cpu()
        half = len(r) // 2
        chosen.append(r[:half])
        rejected.append(r[half:])
    return _summarise(torch.cat(chosen), torch.cat(rejected)) | info


@torch.no_grad()
def implicit_reward_accuracy(policy_path: str, reference_path: str | None, data: str, *,
                             beta: float = 0.1, template: str = "auto", max_length: int = 512,
                             batch_size: int = 16, max_examples: int | None = None,
                             rt=None) -> dict:
    """DPO implicit-reward accuracy of ``policy_path`` against ``reference_path`` (None: the
    embedded default)."""
    from alignkit.data.preference import collate_pairs
    from alignkit.engine.device import resolve_runtime
    from alignkit.models.load import load_causal_lm
    from alignkit.models.logps import sequence_logps
    rt = rt or resolve_runtime("auto", "auto")
    policy, tok = load_causal_lm(ModelConfig(name_or_path=policy_path), device=rt.device)
    ref, _ = load_causal_lm(ModelConfig(name_or_path=reference_path), device=rt.device)
    enc, info = _encoded_pairs(data, tok, template=template, max_length=max_length,
                               max_examples=max_examples)
    chosen, rejected = [], []
    for i in range(0, len(enc), batch_size):
        b = {k: v.to(rt.device) for k, v in collate_pairs(enc[i:i + batch_size],
                                                            pad_id=tok.pad_token_id).items()}
        args = (b["input_ids"], b["attention_mask"], b["loss_mask"])
        with rt.autocast():
            diff = (sequence_logps(policy, *args).logps - sequence_logps(ref, *args).logps)
        r = (beta * diff).float().cpu()
        half = len(r) // 2
        chosen.append(r[:half])
        rejected.append(r[half:])
    return _summarise(torch.cat(chosen), torch.cat(rejected)) | info | {"beta": beta}
