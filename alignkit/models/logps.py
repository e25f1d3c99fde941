"""Summed sequence log-probabilities of a causal LM: the quantity every preference loss consumes.

For row r with target tokens t ∈ S_r (``loss_mask`` True, never position 0)::

    logps[r] = Σ_{t ∈ S_r} log p_θ(x_t | x_<t),        n_tokens[r] = |S_r|

The trunk runs once over all rows; the (V × H) LM head and the fp32 log-softmax run only on the
N positions that predict a target (the prompt of a preference pair is often most of its tokens,
and the head is the largest matmul of a small model). Per-row sums are one ``index_add`` over the
N token values: no Python loop over rows, no (R, T, V) tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from alignkit.losses.logprobs import shifted_targets, token_logps


def split_lm(model: torch.nn.Module):
    """(trunk, lm_head) of a Hugging Face causal LM, also through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


class SeqLogps(NamedTuple):
    logps: torch.Tensor  # (R,) fp32: Σ log p over each row's target tokens
    n_tokens: torch.Tensor  # (R,) long: how many target tokens each row has


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor) -> SeqLogps:
    """Σ_t log p(x_t | x_<t) over each row's target tokens, and the target counts.

    ``model`` is a Hugging Face causal LM, also wrapped by PEFT (adapters on or disabled);
    gradients flow when called with grad enabled, and it runs under the caller's autocast (the
    log-softmax itself is fp32). A row with no target gets logps 0 and n_tokens 0.

    Shapes: input_ids (R, T) long, attention_mask (R, T), loss_mask (R, T) bool, right padded
    → SeqLogps of (R,) and (R,).
    """
    trunk, head = split_lm(model)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                   use_cache=False).last_hidden_state  # (R, T, H)
    positions, labels = shifted_targets(input_ids, loss_mask.bool())  # (R, T), (N,)
    tok = token_logps(head(hidden[positions]), labels)  # (N,) fp32
    # hidden[positions] and labels both enumerate targets in row-major order, so the row of the
    # n-th target is the n-th entry of the row index broadcast over the same mask.
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    row_of_target = rows.unsqueeze(1).expand_as(positions)[positions]  # (N,)
    logps = torch.zeros(input_ids.shape[0], dtype=tok.dtype, device=tok.device)
    logps = logps.index_add(0, row_of_target, tok)  # (R,)
    return SeqLogps(logps, positions.sum(-1))
