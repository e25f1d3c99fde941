"""Log-probabilities of target tokens, computed only where they are needed.

A causal LM's position t predicts token t+1. ``shifted_targets`` turns a per-token
``loss_mask`` (True = this token is a target) into the positions whose hidden states must go
through the LM head, so prompt and padding positions never pay for a vocabulary projection.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Targets(NamedTuple):
    positions: torch.Tensor  # (B, T) bool: hidden state at t predicts a target at t+1
    labels: torch.Tensor  # (N,) the target token ids, N = positions.sum()


def shifted_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> Targets:
    """Shapes: input_ids (B, T) long, loss_mask (B, T) bool → positions (B, T), labels (N,)."""
    positions = torch.zeros_like(loss_mask)
    positions[:, :-1] = loss_mask[:, 1:]
    labels = input_ids[:, 1:][loss_mask[:, 1:]]
    return Targets(positions, labels)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) per row, with log-softmax in fp32 whatever the autocast dtype.

    Shapes: logits (N, V), labels (N,) → (N,).
    """
    return -F.cross_entropy(logits.float(), labels, reduction="none")


def naive_sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor,
                         loss_mask: torch.Tensor) -> torch.Tensor:
    """Reference implementation on full logits: Σ_t log p(x_t | x_<t) over masked t, per row.

    Shapes: logits (B, T, V), input_ids (B, T), loss_mask (B, T) → (B,).
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tok = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (tok * loss_mask[:, 1:]).sum(-1)
