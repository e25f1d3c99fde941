"""Supervised fine-tuning / language-modelling loss.

Per target token: ℓ_t = −log p_θ(x_t | x_<t); the loss is Σ ℓ_t over target tokens divided by
the *global* number of target tokens (done by the engine), so examples weigh by their length,
exactly as one big batch would.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from alignkit.losses.logprobs import token_logps


class SFTLoss(NamedTuple):
    token_losses: torch.Tensor  # (N,) unreduced
    correct: torch.Tensor  # (N,) bool, detached: argmax equals the label (token accuracy)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> SFTLoss:
    """Shapes: logits (N, V) at target positions only, labels (N,) → SFTLoss of (N,)."""
    losses = -token_logps(logits, labels)
    correct = (logits.detach().argmax(-1) == labels)
    return SFTLoss(losses, correct)
