"""Advantages for policy-gradient RLHF: reward shaping, GAE, RLOO and GRPO baselines, whitening.

All functions are pure and work on whole rollout batches, computed under ``no_grad`` by the
caller (advantages and returns are targets; nothing here detaches for you). Masks are
``response_mask`` (B, T) bool, True = a generated response token that counts. Masks may be
right-padded with rows of different lengths and may start with prompt positions (False).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None,
                keepdim: bool = False) -> torch.Tensor:
    """Mean of x over the entries where mask is True (over ``dim``, or over everything).

    Masked-out entries never reach the arithmetic (a NaN in padding does not leak). A slice
    with no counted entry has mean 0 rather than NaN.

    Shapes: x (…), mask broadcastable to x → () if dim is None, else x reduced over dim.
    """
    mask = mask.expand_as(x)
    total = torch.where(mask, x, 0).sum(dim=dim, keepdim=keepdim)
    count = mask.sum(dim=dim, keepdim=keepdim)
    return total / count.clamp_min(1).to(total.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Variance of x over the entries where mask is True.

    unbiased=True divides by n − 1 (Bessel), else by n. With fewer counted entries than the
    divisor needs (n ≤ 1 unbiased, n = 0 biased) the variance is 0, not NaN.

    Shapes: as ``masked_mean``.
    """
    mask = mask.expand_as(x)
    mean = masked_mean(x, mask, dim=dim, keepdim=True)
    sq = torch.where(mask, (x - mean).square(), 0).sum(dim=dim, keepdim=keepdim)
    count = mask.sum(dim=dim, keepdim=keepdim)
    if unbiased:
        count = count - 1
    return sq / count.clamp_min(1).to(sq.dtype)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) with mean and (Bessel-corrected) variance over the masked entries.

    ``shift_mean=False`` rescales but adds the mean back (used for rewards, whose sign carries
    meaning). Positions where mask is False come back as 0.

    Shapes: x (B, T), mask (B, T) bool → (B, T).
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0)


def last_token_mask(response_mask: torch.Tensor) -> torch.Tensor:
    """True at the last True position of each row (none in a row with no True).

    Shapes: response_mask (B, T) bool → (B, T) bool.
    """
    T = response_mask.shape[-1]
    positions = torch.arange(T, device=response_mask.device)
    # argmax over position·mask finds the largest counted position (an all-False row picks 0,
    # which the final `& response_mask` then drops).
    last = (positions * response_mask).argmax(-1, keepdim=True)  # (B, 1)
    hit = torch.zeros_like(response_mask).scatter_(-1, last, True)
    return hit & response_mask


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor,
                      beta: float | torch.Tensor) -> torch.Tensor:
    """KL-shaped per-token rewards (Ziegler et al. 2019 §2.2; InstructGPT, Ouyang et al. 2022 eq. 2).

        r_t = −β · kl_t            on every response token
            + score                 added on the last response token of the row

    ``kl`` is a per-token KL estimate to the reference (``kl_estimate``). A row with no
    response token gets no reward at all.

    Shapes: scores (B,), kl (B, T), response_mask (B, T) bool → (B, T), 0 outside the mask.
    """
    rewards = torch.where(response_mask, -beta * kl, 0)
    last = last_token_mask(response_mask)
    return rewards + torch.where(last, scores.unsqueeze(-1).to(rewards.dtype), 0)


def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, *,
        gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional Continuous
    Control Using Generalized Advantage Estimation", eq. 16), backwards over response tokens.

        δ_t = r_t + γ V_{t+1} − V_t
        A_t = δ_t + γλ A_{t+1}                 (A and V after the last response token = 0)
        returns_t = A_t + V_t                   (the λ-return, the value-function target)

    Only positions where response_mask is True are timesteps; "t+1" is the next True position
    of the same row. Prompt positions before and padding after are skipped, and a hole inside
    a response (e.g. masked tool output) is stepped over, not treated as an episode end.
    Rewards and values outside the mask are ignored. Computed in at least fp32 (a long
    backward recursion in bf16 loses the small terms); vectorised over B, one step per T.

    Shapes: rewards (B, T), values (B, T), response_mask (B, T) bool
            → advantages (B, T), returns (B, T), both 0 outside the mask.
    """
    dtype = torch.promote_types(torch.promote_types(rewards.dtype, values.dtype), torch.float32)
    rewards = torch.where(response_mask, rewards.to(dtype), 0)
    values = torch.where(response_mask, values.to(dtype), 0)
    next_value = torch.zeros_like(values[:, 0])  # (B,) V of the next response token, 0 past the end
    next_adv = torch.zeros_like(values[:, 0])  # (B,)
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        m = response_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = torch.where(m, adv, 0)
        # Non-response positions leave the carried V_{t+1}, A_{t+1} untouched (skipped).
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, adv, next_adv)
    return advantages, advantages + values


def _groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if k < 2:
        raise ValueError(f"group size k must be ≥ 2 (a group of one has no baseline), got {k}")
    if scores.shape[0] % k:
        raise ValueError(f"batch size {scores.shape[0]} is not a multiple of group size {k}")
    return scores.view(-1, k)  # (B/k, k): prompts × samples, groups contiguous


def rloo_advantages(scores: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, "Back to Basics", §3.2).

        A_i = s_i − 1/(k−1) Σ_{j≠i} s_j          over the k samples of the same prompt

    Scores are laid out as B/k prompts × k samples, each prompt's samples contiguous. The
    advantages of a group sum to 0.

    Shapes: scores (B,) → (B,).
    """
    s = _groups(scores, k)
    others = (s.sum(-1, keepdim=True) - s) / (k - 1)
    return (s - others).reshape(-1)


def grpo_advantages(scores: torch.Tensor, k: int, eps: float = 1e-4,
                    scale: bool = True) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath, §4.1.2 outcome supervision).

        A_i = (s_i − mean(s_group)) / (std(s_group) + eps)

    std is the *population* standard deviation (divide by k). The paper writes std(r) without
    saying which; implementations that call ``torch.std`` use k − 1, which scales every
    advantage by sqrt((k−1)/k) relative to this one. ``scale=False`` drops the division (the
    Dr. GRPO variant, Liu et al. 2025, "Understanding R1-Zero-Like Training"), leaving
    A_i = s_i − mean. A group whose scores are all equal gets advantage 0 (eps guards 0/0).
    Each group's advantages have mean 0. Layout as ``rloo_advantages``.

    Shapes: scores (B,) → (B,).
    """
    s = _groups(scores, k)
    centred = s - s.mean(-1, keepdim=True)
    if scale:
        centred = centred / (s.std(-1, correction=0, keepdim=True) + eps)
    return centred.reshape(-1)
