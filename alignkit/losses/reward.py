"""Reward-model losses: pairwise Bradley–Terry, ranked lists (all pairs or Plackett–Luce).

A reward model maps (prompt, response) to a scalar r. Human (or AI) labellers either pick the
better of two responses or rank K responses best → worst. The losses here turn those labels into
a negative log-likelihood under a choice model:

- Bradley–Terry, P(y_c ≻ y_r) = σ(r_c − r_r)  (InstructGPT, Ouyang et al. 2022, eq. 1), with an
  optional margin m subtracted inside the sigmoid (Llama 2, Touvron et al. 2023, eq. 2) and an
  optional soft label p = P(chosen is better) (RLAIF-style soft preferences).
- A ranking of K responses expanded into its C(K, 2) pairs, each pair weighted 1/C(K, 2) so that
  one ranking counts as one batch element (InstructGPT, eq. 1 and the text after it).
- Plackett–Luce, the listwise generalisation of Bradley–Terry: the best response is chosen from
  all K, the second from the remaining K − 1, and so on (Plackett 1975; Luce 1959).

Every function returns one unreduced loss per pair or per list; the engine divides by the global
count. Rewards are taken in whatever float dtype they arrive in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class RewardLoss(NamedTuple):
    losses: Tensor  # (B,) unreduced: one per pair (Bradley–Terry) or per list (ranked, PL)
    # (B,) float, detached: 1.0 where r_c > r_r; for a list, the fraction of its valid pairs
    # (i better than j, both present) with r_i > r_j
    accuracies: Tensor
    # (B,) detached: r_c − r_r (without the margin m); for a list, the mean of r_i − r_j over
    # its valid pairs
    margins: Tensor


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, *,
                       margin: Tensor | float | None = None,
                       label: Tensor | float | None = None) -> RewardLoss:
    """Pairwise Bradley–Terry negative log-likelihood.

    With d = r_c − r_r − m (m = ``margin``, 0 when None):

        hard label (``label`` None):  ℓ = −log σ(d)
        soft label p ∈ [0, 1]:        ℓ = −[p·log σ(d) + (1 − p)·log σ(−d)]

    InstructGPT (Ouyang et al. 2022) eq. 1; the margin is Llama 2's (Touvron et al. 2023, eq. 2),
    where m grows with how clearly the annotator preferred the chosen response. p = 1 is the
    hard loss; p = 0.5 ("no preference") gives a loss symmetric in chosen and rejected. A tensor
    ``label`` is not range-checked (that would sync the device); a Python number is.

    Shapes: chosen_rewards (B,), rejected_rewards (B,), margin and label (B,) or scalars
    → RewardLoss of (B,).
    """
    if isinstance(label, (int, float)) and not 0.0 <= label <= 1.0:
        raise ValueError(f"label must be a probability in [0, 1]; got {label}")
    diff = chosen_rewards - rejected_rewards
    d = diff if margin is None else diff - margin
    losses = -F.logsigmoid(d)
    if label is not None:
        losses = label * losses - (1 - label) * F.logsigmoid(-d)
    diff = diff.detach()
    return RewardLoss(losses, (diff > 0).to(diff.dtype), diff)


def ranking_to_pairs(K: int, *, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """All C(K, 2) = K(K−1)/2 pairs (i, j), i < j, of a list ordered best → worst, so i ≻ j.

    Pairs come in row-major order: K=3 → (0,1), (0,2), (1,2).

    Shapes: → i_idx (P,), j_idx (P,) long, P = K(K−1)/2.
    """
    if K < 0:
        raise ValueError(f"K must be >= 0; got {K}")
    idx = torch.triu_indices(K, K, offset=1, device=device)
    return idx[0], idx[1]


def _check_lists(rewards: Tensor, mask: Tensor | None) -> Tensor:
    """Validate (B, K) rewards and a bool mask; return the mask, all True when None."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (B, K) with K >= 2; got shape {tuple(rewards.shape)}")
    if mask is None:
        return torch.ones(rewards.shape, dtype=torch.bool, device=rewards.device)
    if mask.dtype != torch.bool or mask.shape != rewards.shape:
        raise ValueError("mask must be a bool tensor shaped like rewards (True = present); "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    return mask


def _pair_diffs(rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """r_i − r_j for every pair i ≻ j, and whether both are present. → (B, P), (B, P) bool."""
    i, j = ranking_to_pairs(rewards.shape[1], device=rewards.device)
    return rewards[:, i] - rewards[:, j], mask[:, i] & mask[:, j]


def _pair_stats(diffs: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-list pair count (clamped to 1), pairwise accuracy and mean margin (detached)."""
    diffs = diffs.detach()
    counts = valid.sum(-1).clamp(min=1).to(diffs.dtype)
    accuracies = ((diffs > 0) & valid).sum(-1).to(diffs.dtype) / counts
    margins = torch.where(valid, diffs, 0.0).sum(-1) / counts
    return counts, accuracies, margins


def ranked_pairwise_loss(rewards: Tensor, *, mask: Tensor | None = None) -> RewardLoss:
    """A ranking of K responses as the mean Bradley–Terry loss over its valid pairs.

        ℓ = 1/|P| · Σ_{(i, j) ∈ P} −log σ(r_i − r_j),   P = {(i, j): i < j, both present}

    InstructGPT (Ouyang et al. 2022) eq. 1: the 1/C(K, 2) weighting makes each ranking one batch
    element rather than C(K, 2) correlated ones, which the paper found to overfit. With a mask,
    |P| counts only pairs whose two entries are present; a list with fewer than two present
    entries has loss 0. Values at absent entries are never read (NaN padding is safe).

    Shapes: rewards (B, K) ordered best → worst, mask (B, K) bool (True = present)
    → RewardLoss of (B,).
    """
    mask = _check_lists(rewards, mask)
    rewards = torch.where(mask, rewards, 0.0)  # absent entries may hold NaN padding
    diffs, valid = _pair_diffs(rewards, mask)
    pair_losses = torch.where(valid, -F.logsigmoid(diffs), 0.0)  # (B, P)
    counts, accuracies, margins = _pair_stats(diffs, valid)
    return RewardLoss(pair_losses.sum(-1) / counts, accuracies, margins)


def plackett_luce_loss(rewards: Tensor, *, mask: Tensor | None = None) -> RewardLoss:
    """Listwise Plackett–Luce negative log-likelihood of a ranking best → worst.

        ℓ = −Σ_{k=1}^{K−1} [ r_k − log Σ_{j≥k} exp(r_j) ]

    P(ranking) = Π_k exp(r_k) / Σ_{j≥k} exp(r_j): pick the best of all, then the best of the rest
    (Plackett 1975; Luce 1959; the DPO paper, Rafailov et al. 2023, appendix A.3). The
    k = K term is log 1 = 0 so summing to K changes nothing. K = 2 is exactly Bradley–Terry.
    The loss is the sum over the list, not the mean, so longer rankings weigh more.

    With a mask, absent entries are dropped from both the numerators and every partition sum,
    so a list of K slots with k present is the plain k-item loss (the present entries keep their
    order). Values at absent entries are never read (NaN padding is safe).

    Shapes: rewards (B, K) ordered best → worst, mask (B, K) bool (True = present)
    → RewardLoss of (B,); accuracies and margins are pairwise, as in ranked_pairwise_loss.
    """
    mask = _check_lists(rewards, mask)
    B, K = rewards.shape
    rewards = torch.where(mask, rewards, 0.0)
    # partition[b, k, j]: is r_j in the k-th partition sum (j ≥ k and present)? The diagonal is
    # always in, so an absent row k still has a finite logsumexp; its term is zeroed below.
    # Without it, an all −inf row would turn the backward pass into NaN.
    suffix = torch.ones(K, K, dtype=torch.bool, device=rewards.device).triu()  # (K, K)
    diagonal = torch.eye(K, dtype=torch.bool, device=rewards.device)
    partition = suffix & (mask[:, None, :] | diagonal)  # (B, K, K)
    scores = rewards[:, None, :].expand(B, K, K).masked_fill(~partition, -math.inf)
    log_z = torch.logsumexp(scores, dim=-1)  # (B, K)
    losses = -torch.where(mask, rewards - log_z, 0.0).sum(-1)
    _, accuracies, margins = _pair_stats(*_pair_diffs(rewards, mask))
    return RewardLoss(losses, accuracies, margins)


def centering_penalty(chosen_rewards: Tensor, rejected_rewards: Tensor, coef: float) -> Tensor:
    """Reward centering: coef · (r_c + r_r)², per pair.

    Bradley–Terry only sees differences, so the reward's offset drifts freely; this auxiliary
    term pulls the mean reward of each pair towards 0 (Eisenstein et al. 2023, "Helping or
    Herding?"; TRL's ``center_rewards_coefficient``, which averages the same term over the
    batch). Add it to the Bradley–Terry losses before reduction.

    Shapes: chosen_rewards (B,), rejected_rewards (B,) → (B,).
    """
    return coef * (chosen_rewards + rejected_rewards) ** 2


def scores_to_ranking(scores: Sequence[float] | Tensor) -> list[int]:
    """Indices of ``scores`` from highest to lowest; ties keep their input order (stable sort).

    Turns per-response scores (a judge's, a reward model's) into the best → worst order the
    ranked losses expect. Ties are not an error here: a caller that cares can detect them.
    NaN has no place in an order and raises ValueError.

    Shapes: scores (K,) → list of K ints.
    """
    values = scores.tolist() if isinstance(scores, Tensor) else [float(s) for s in scores]
    if any(math.isnan(v) for v in values):
        raise ValueError(f"scores contain NaN: {values}")
    return sorted(range(len(values)), key=lambda k: -values[k])
