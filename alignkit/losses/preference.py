"""The DPO family: preference losses on sequence log-probabilities, with no reward model.

Each pair brings four summed sequence log-probabilities: the policy's and the frozen
reference's, for the chosen response y_c and the rejected one y_r. With

    h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r))

the implicit reward of a response is r = β·(log π − log π_ref) (DPO, Rafailov et al. 2023,
eq. 5), and the variants differ only in the function of βh they minimise (see ``dpo_loss``).
Every function returns one unreduced loss per pair plus the detached implicit rewards.

Where we depart from the papers or from TRL:

- Log-probabilities are taken as given. TRL averages them over tokens for IPO; pass
  length-normalised log-probabilities to get that behaviour.
- Reference log-probabilities are detached here: the reference is frozen, and a reference that
  shares weights with the policy (LoRA with adapters disabled) must not receive gradient.
- Python numbers are accepted, because the lesson's lab calls ``dpo_loss(-5.0, -5.2, -5.0,
  -5.2)``. When no argument is a tensor they become 0-d float64 tensors, so the lab's numbers
  come out exact; otherwise they take the dtype and device of the first tensor argument.
  fp16/bf16 inputs are computed in float32 (log σ of a small difference of large log-probs
  loses every digit in half precision); float32 and float64 stay as they are.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from alignkit.losses.reward import plackett_luce_loss

DPOLossType = Literal["sigmoid", "robust", "ipo", "hinge", "simpo"]
DPO_LOSS_TYPES: tuple[str, ...] = get_args(DPOLossType)

Logps = Tensor | float


class DPOLoss(NamedTuple):
    losses: Tensor  # (B,) unreduced
    chosen_rewards: Tensor  # (B,) detached: β·(log π − log π_ref)(y_c); simpo: β·log π(y_c)/|y_c|
    rejected_rewards: Tensor  # (B,) detached: the same for y_r


class PLDPOLoss(NamedTuple):
    losses: Tensor  # (B,) unreduced, summed over each list
    rewards: Tensor  # (B, K) detached β·(log π − log π_ref); absent entries hold whatever came in
    accuracies: Tensor  # (B,) detached: fraction of the list's valid pairs ordered correctly


def _compute_dtype(x: Tensor) -> torch.dtype:
    if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point():
        return torch.float32
    return x.dtype


def _as_tensors(*xs: Logps | None) -> list[Tensor | None]:
    """Tensors keep their dtype (half → float32); numbers follow the first tensor, else float64."""
    like = next((x for x in xs if isinstance(x, Tensor)), None)
    dtype = torch.float64 if like is None else _compute_dtype(like)
    device = None if like is None else like.device
    return [None if x is None
            else x.to(_compute_dtype(x)) if isinstance(x, Tensor)
            else torch.as_tensor(x, dtype=dtype, device=device)
            for x in xs]


def _check_dpo_args(loss_type: str, beta: float, label_smoothing: float, gamma: float,
                    has_refs: bool, has_lengths: tuple[bool, bool]) -> None:
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    max_eps = {"sigmoid": 0.5, "robust": 0.5}.get(loss_type)
    if max_eps is None and label_smoothing != 0:
        raise ValueError(f"label_smoothing applies to sigmoid and robust only, not {loss_type!r}")
    if max_eps is not None and not 0 <= label_smoothing <= max_eps:
        raise ValueError(f"label_smoothing must be in [0, 0.5]; got {label_smoothing}")
    if loss_type == "robust" and label_smoothing == 0.5:
        raise ValueError("robust DPO divides by 1 − 2ε: label_smoothing must be < 0.5")
    if loss_type != "simpo" and gamma != 0:
        raise ValueError(f"gamma applies to simpo only, not {loss_type!r}")
    if loss_type == "simpo" and not all(has_lengths):
        raise ValueError("simpo needs chosen_lengths and rejected_lengths (target token counts)")
    if loss_type != "simpo" and any(has_lengths):
        raise ValueError(f"chosen_lengths/rejected_lengths apply to simpo only, not {loss_type!r}; "
                         "length-normalise the log-probabilities before the call instead")
    if loss_type != "simpo" and not has_refs:
        raise ValueError(f"{loss_type!r} needs ref_chosen_logps and ref_rejected_logps")


def dpo_loss(policy_chosen_logps: Logps, policy_rejected_logps: Logps,
             ref_chosen_logps: Logps | None, ref_rejected_logps: Logps | None, *,
             beta: float = 0.1, loss_type: DPOLossType = "sigmoid", label_smoothing: float = 0.0,
             gamma: float = 0.0, chosen_lengths: Tensor | float | None = None,
             rejected_lengths: Tensor | float | None = None,
             labels: Tensor | None = None) -> DPOLoss:
    """Direct preference losses on one batch of pairs, unreduced.

    With h = (π_c − ref_c) − (π_r − ref_r) (sequence log-probs) and ε = ``label_smoothing``:

    - "sigmoid": −(1−ε)·log σ(βh) − ε·log σ(−βh). DPO (Rafailov et al. 2023, eq. 7); ε > 0 is
      conservative DPO (cDPO, Mitchell 2023): labels assumed flipped with probability ε ≤ 0.5.
    - "robust": [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε), ε < 0.5. The unbiased loss under
      label flips of rate ε (Chowdhury et al. 2024, "Provably Robust DPO"); ε = 0 is "sigmoid".
    - "ipo": (h − 1/(2β))², zero at h = 1/(2β) (IPO, Azar et al. 2023, eq. 17, with τ = β).
      The log-probs are used as given (TRL averages them per token for IPO).
    - "hinge": max(0, 1 − βh) (SLiC-HF, Zhao et al. 2023, the rank calibration loss on
      log-ratios, margin δ = 1/β).
    - "simpo": −log σ(β·π_c/|y_c| − β·π_r/|y_r| − γ), reference-free and length-normalised
      (SimPO, Meng et al. 2024, eq. 6); |y| = ``chosen_lengths`` / ``rejected_lengths`` (target
      token counts, > 0, not checked on the device), γ = ``gamma`` (the target reward margin,
      taken directly, not as γ/β). The ref log-probs are ignored and may be None.

    ``labels`` (sigmoid only): soft labels p = P(chosen ≻ rejected) per pair, e.g. an AI
    judge's order-averaged preference (RLAIF). The loss is then the cross-entropy against the
    smoothed label p' = p·(1−ε) + (1−p)·ε: −p'·log σ(βh) − (1−p')·log σ(−βh), so p = 1 is the
    hard-label loss above and p = 0.5 pulls h toward 0. Values in [0, 1] are not checked on
    the device.

    ``label_smoothing`` is rejected for ipo/hinge/simpo, ``gamma`` and the lengths for all but
    simpo, ``labels`` for all but sigmoid, rather than silently ignored. Rewards are β·(π − ref), detached; for simpo β·π/|y|.
    Python floats are accepted (see the module docstring for dtypes).

    Shapes: the four logps (B,) or scalars; lengths (B,) or scalars → DPOLoss of (B,).
    """
    _check_dpo_args(loss_type, beta, label_smoothing, gamma,
                    ref_chosen_logps is not None and ref_rejected_logps is not None,
                    (chosen_lengths is not None, rejected_lengths is not None))
    if labels is not None and loss_type != "sigmoid":
        raise ValueError(f"soft labels apply to the sigmoid loss only, not {loss_type!r}")
    if loss_type == "simpo":
        return _simpo_loss(policy_chosen_logps, policy_rejected_logps, chosen_lengths,
                           rejected_lengths, beta=beta, gamma=gamma)
    pc, pr, rc, rr = _as_tensors(policy_chosen_logps, policy_rejected_logps,
                                 ref_chosen_logps, ref_rejected_logps)
    chosen_logratios = pc - rc.detach()  # (B,)
    rejected_logratios = pr - rr.detach()  # (B,)
    z = beta * (chosen_logratios - rejected_logratios)  # βh
    eps = label_smoothing
    if labels is not None:  # the weight of the "rejected is better" term, per pair
        p = labels.to(z.dtype)
        eps = 1 - (p * (1 - label_smoothing) + (1 - p) * label_smoothing)  # (B,)
    match loss_type:
        case "sigmoid":
            losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
        case "robust":
            losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        case "ipo":
            # from h itself rather than z/β, which would round twice
            losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
        case "hinge":
            losses = torch.relu(1 - z)
    return DPOLoss(losses, (beta * chosen_logratios).detach(),
                   (beta * rejected_logratios).detach())


def _simpo_loss(policy_chosen_logps: Logps, policy_rejected_logps: Logps,
                chosen_lengths: Tensor | float, rejected_lengths: Tensor | float, *,
                beta: float, gamma: float) -> DPOLoss:
    pc, pr = _as_tensors(policy_chosen_logps, policy_rejected_logps)
    chosen_rewards = beta * pc / torch.as_tensor(chosen_lengths, dtype=pc.dtype, device=pc.device)
    rejected_rewards = beta * pr / torch.as_tensor(rejected_lengths, dtype=pr.dtype,
                                                   device=pr.device)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return DPOLoss(losses, chosen_rewards.detach(), rejected_rewards.detach())


def plackett_luce_dpo_loss(policy_logps: Tensor, ref_logps: Tensor, *, beta: float = 0.1,
                           mask: Tensor | None = None) -> PLDPOLoss:
    """DPO on rankings of K responses, under the Plackett–Luce model.

    With implicit rewards r_k = β·(log π(y_k) − log π_ref(y_k)) and responses ordered
    best → worst:

        ℓ = −Σ_{k=1}^{K−1} [ r_k − log Σ_{j≥k} exp(r_j) ]

    (Rafailov et al. 2023, appendix A.3). The loss is summed over the list, not averaged, as the
    likelihood of the whole ranking is. K = 2 is exactly "sigmoid" DPO. With a mask, absent
    entries are left out of both the numerators and every partition sum, so a list padded to K
    is the loss of its present entries; their values are never read.

    Shapes: policy_logps (B, K), ref_logps (B, K) best first, mask (B, K) bool (True = present)
    → PLDPOLoss: losses (B,), rewards (B, K), accuracies (B,).
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0; got {beta}")
    policy_logps, ref_logps = _as_tensors(policy_logps, ref_logps)
    rewards = beta * (policy_logps - ref_logps.detach())  # (B, K)
    out = plackett_luce_loss(rewards, mask=mask)
    return PLDPOLoss(out.losses, rewards.detach(), out.accuracies)


def preference_metrics(out: DPOLoss) -> dict[str, Tensor]:
    """TRL-named per-example diagnostics; the caller reduces them (at log steps only).

    "rewards/accuracies" is 1.0 where the chosen reward is strictly above the rejected one.

    Shapes: DPOLoss of (B,) → dict of (B,) tensors.
    """
    chosen, rejected = out.chosen_rewards, out.rejected_rewards
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).to(chosen.dtype),
    }
