"""PPO and GRPO losses for RLHF: clipped policy surrogate, clipped value loss, entropy, diagnostics.

PPO: Schulman et al. (2017), "Proximal Policy Optimization Algorithms", eq. 7, written as a loss
to minimise. The value clip follows the OpenAI baselines / lm-human-preferences implementation
(it is not in the paper). GRPO: Shao et al. (2024), DeepSeekMath, eq. 3, with the KL to the
reference inside the loss through the k3 estimator (eq. 4).

Every function returns per-token, unreduced values (0 where ``response_mask`` is False); the
engine divides the sum by the global token count. Advantages, returns and the ``old_`` tensors
are constants of the objective: they are detached here, so a caller who forgot ``no_grad``
during the rollout cannot leak gradient through them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from alignkit.losses.advantages import masked_var
from alignkit.losses.kl import kl_estimate


class PolicyLoss(NamedTuple):
    losses: torch.Tensor  # (B, T) unreduced, 0 outside the mask
    clipped: torch.Tensor  # (B, T) bool, detached: the clipped branch set the loss (clip fraction)
    approx_kl: torch.Tensor  # (B, T) detached: k3 estimate of KL(old‖new), 0 outside the mask
    ratio: torch.Tensor  # (B, T) detached: π/π_old, 1 outside the mask


class ValueLoss(NamedTuple):
    losses: torch.Tensor  # (B, T) unreduced, 0 outside the mask
    clipped: torch.Tensor  # (B, T) bool, detached: the clipped branch set the loss


class GRPOLoss(NamedTuple):
    losses: torch.Tensor  # (B, T) unreduced: clipped surrogate + β·k3, 0 outside the mask
    kl: torch.Tensor  # (B, T) detached: k3 estimate of KL(π‖π_ref), 0 outside the mask
    clipped: torch.Tensor  # (B, T) bool, detached
    ratio: torch.Tensor  # (B, T) detached


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, *, clip_eps: float = 0.2) -> PolicyLoss:
    """PPO clipped surrogate as a per-token loss (Schulman et al. 2017, eq. 7, negated).

        ρ_t = exp(logp_t − old_logp_t)
        L_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1 − ε, 1 + ε))

    The max of the two losses is the min of the two objectives: the pessimistic bound. Where
    the clipped branch is strictly larger (ρ beyond 1 + ε with A > 0, below 1 − ε with A < 0)
    the gradient is 0, and ``clipped`` is True. ``approx_kl`` = (ρ − 1) − log ρ, the k3
    estimate of KL(π_old‖π) from tokens sampled under π_old.

    Shapes: logps (B, T), old_logps (B, T), advantages (B, T) or (B, 1) to broadcast a
            sequence advantage, response_mask (B, T) bool → PolicyLoss of (B, T).
    """
    advantages = advantages.detach()
    # Zero the log-ratio outside the mask *before* exp: padding may hold −inf or garbage, and
    # exp of it would put inf/NaN into the backward pass even where the loss is masked to 0.
    log_ratio = torch.where(response_mask, logps - old_logps.detach(), 0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped_branch = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    losses = torch.where(response_mask, torch.maximum(unclipped, clipped_branch), 0)
    clipped = (clipped_branch > unclipped).detach() & response_mask
    # k3 with samples from π_old: r = log π_old/π = −log ρ, so k3 = (ρ − 1) − log ρ.
    lr = log_ratio.detach()
    approx_kl = torch.expm1(lr) - lr
    return PolicyLoss(losses, clipped, approx_kl, ratio.detach())


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               response_mask: torch.Tensor, *, clip_eps: float = 0.2) -> ValueLoss:
    """Clipped value loss per token.

        V_clip = clip(V, V_old − ε, V_old + ε)
        L_t    = ½ · max((V − R)², (V_clip − R)²)

    Like the policy clip, the max keeps the pessimistic branch: a value that moved more than ε
    from V_old gets no gradient when moving it back would not reduce the loss. Note ε is in
    the units of the returns, so it interacts with reward scale.

    Shapes: values (B, T), old_values (B, T), returns (B, T), response_mask (B, T) bool
            → ValueLoss of (B, T).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    # Same guard as in policy_loss: keep padding out of the arithmetic, not just the result.
    diff = torch.where(response_mask, values - old_values, 0)
    target = torch.where(response_mask, returns - old_values, 0)  # R − V_old
    unclipped = (diff - target).square()  # (V − R)²
    clipped_branch = (torch.clamp(diff, -clip_eps, clip_eps) - target).square()  # (V_clip − R)²
    losses = torch.where(response_mask, 0.5 * torch.maximum(unclipped, clipped_branch), 0)
    clipped = (clipped_branch > unclipped).detach() & response_mask
    return ValueLoss(losses, clipped)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution, H = −Σ_v p_v log p_v, in fp32.

    Vocabulary entries with logit −inf (p = 0) contribute 0, in the value and the gradient.

    Shapes: logits (…, V) → (…,) float32.
    """
    return entropy_from_logp(torch.log_softmax(logits.float(), dim=-1))


def entropy_from_logp(logp: torch.Tensor) -> torch.Tensor:
    """Entropy −Σ_v p_v log p_v of a distribution given as log-probabilities (a log-softmax);
    entries at −inf (p = 0) contribute 0, in the value and the gradient.

    Shapes: logp (…, V) → (…,) in logp's dtype.
    """
    # 0·(−inf) is NaN; p·log p → 0 as p → 0, so drop those terms before the product.
    return -(logp.exp() * logp.masked_fill(torch.isneginf(logp), 0)).sum(-1)


def explained_variance(values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor) -> torch.Tensor:
    """1 − Var[R − V] / Var[R] over the masked entries: 1 = perfect value function, 0 = no
    better than a constant, < 0 = worse. NaN when the returns have no variance.

    Shapes: values (B, T), returns (B, T), mask (B, T) bool → () detached.
    """
    values, returns = values.detach(), returns.detach()
    var_r = masked_var(returns, mask)
    var_d = masked_var(returns - values, mask)
    return torch.where(var_r > 0, 1 - var_d / var_r, torch.nan)


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, ref_logps: torch.Tensor,
              advantages: torch.Tensor, response_mask: torch.Tensor, *,
              clip_eps: float = 0.2, beta: float = 0.04) -> GRPOLoss:
    """GRPO per-token loss (Shao et al. 2024, DeepSeekMath, eqs. 3–4, negated).

        L_t = max(−A ρ_t, −A clip(ρ_t, 1 − ε, 1 + ε)) + β · D_t
        D_t = exp(ref_logp_t − logp_t) − (ref_logp_t − logp_t) − 1      (k3, ≥ 0)

    A is the sequence's group-relative advantage (``grpo_advantages``) broadcast over its
    tokens. The KL term is in the loss, differentiated through logps, not in the reward.
    The paper averages over each sequence's tokens (1/|o_i|) before averaging over the group;
    here, as everywhere in alignkit, the engine divides by the global token count instead
    (the length-unbiased choice Dr. GRPO argues for).

    Shapes: logps (B, T), old_logps (B, T), ref_logps (B, T), advantages (B,),
            response_mask (B, T) bool → GRPOLoss of (B, T).
    """
    if advantages.dim() != 1:
        raise ValueError(f"grpo_loss takes one advantage per sequence, shape (B,); "
                         f"got {tuple(advantages.shape)}")
    surrogate = policy_loss(logps, old_logps, advantages.unsqueeze(-1), response_mask,
                            clip_eps=clip_eps)
    # Same padding guard as policy_loss: exp(ref − logp) of garbage must not reach backward.
    kl = kl_estimate(torch.where(response_mask, logps, 0),
                     torch.where(response_mask, ref_logps.detach(), 0), "k3")
    losses = surrogate.losses + beta * kl
    return GRPOLoss(losses, kl.detach(), surrogate.clipped, surrogate.ratio)
