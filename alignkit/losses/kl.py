"""KL divergence to a reference model: per-token estimators and the β controllers.

Estimators follow Schulman (2020), "Approximating KL divergence"
(http://joschu.net/blog/kl-approx.html). Tokens are sampled from the policy p and scored under the
reference q; with the log-ratio r = log p(x) − log q(x) each estimator is a per-token value whose
expectation under p is (or approximates) KL(p‖q).

The controllers set the KL coefficient β of the PPO reward −β·KL: ``AdaptiveKLController`` is
Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences", eq. (2);
``FixedKLController`` keeps β constant behind the same interface, so the stage code never
branches on which one it holds.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol

import torch

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor,
                estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(p‖q) from tokens sampled from the policy p.

    With r = logps − ref_logps = log p(x)/q(x), x ~ p:

    - ``k1`` = r. Unbiased, high variance, negative for about half of the tokens.
    - ``k2`` = ½ r². Biased (it is the f-divergence with f(u) = ½ log² u, which agrees with KL
      to second order as q → p), low variance, always ≥ 0.
    - ``k3`` = (e^{−r} − 1) + r = (q/p − 1) − log q/p. Unbiased (E_p[q/p − 1] = 0 is a control
      variate added to k1), always ≥ 0, low variance when p ≈ q. It is the estimator GRPO puts
      in its loss (DeepSeekMath eq. 4).

    All three are exactly 0 where logps == ref_logps. The estimate is differentiable; note that
    the gradient of an estimator's *value* is not in general the gradient of KL, which matters
    only when the estimate is put in the loss rather than in the reward.

    Shapes: logps (B, T), ref_logps (B, T) → (B, T) (any matching shape works).
    """
    log_ratio = logps - ref_logps
    match estimator:
        case "k1":
            return log_ratio
        case "k2":
            return 0.5 * log_ratio.square()
        case "k3":
            # expm1 keeps k3 accurate (and ≥ 0) for |r| ≪ 1, where exp(−r) − 1 would cancel.
            return torch.expm1(-log_ratio) + log_ratio
        case _:
            raise ValueError(f"unknown KL estimator {estimator!r}; expected one of k1, k2, k3")


class KLController(Protocol):
    """What the PPO stage needs from a β controller."""

    beta: float

    def update(self, current_kl: float, n_steps: int) -> float: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class AdaptiveKLController:
    """Proportional controller driving the measured KL towards a target (Ziegler et al. 2019, eq. 2).

        e_t     = clip(KL_t / KL_target − 1, −0.2, 0.2)
        β_{t+1} = β_t · (1 + K_β · e_t),   K_β = n_steps / horizon

    ``current_kl`` is the mean per-sequence KL of the batch just collected (a host float: the
    caller syncs once per rollout, at its log step), ``n_steps`` the number of samples (episodes)
    in it. The error clip bounds how fast β moves whatever the KL does.
    """

    def __init__(self, init_beta: float, target: float, horizon: float, *,
                 error_clip: float = 0.2) -> None:
        if init_beta < 0:
            raise ValueError(f"init_beta must be ≥ 0, got {init_beta}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.beta = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)
        self.error_clip = float(error_clip)

    def update(self, current_kl: float, n_steps: int) -> float:
        if n_steps < 0:
            raise ValueError(f"n_steps must be ≥ 0, got {n_steps}")
        error = float(current_kl) / self.target - 1.0
        error = min(max(error, -self.error_clip), self.error_clip)
        self.beta *= 1.0 + error * n_steps / self.horizon
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        # β is the only thing that changes; target and horizon come from the config, whose
        # schema is the one source of defaults.
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])


class FixedKLController:
    """Constant β, with the same interface as ``AdaptiveKLController``."""

    def __init__(self, beta: float) -> None:
        if beta < 0:
            raise ValueError(f"beta must be ≥ 0, got {beta}")
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.beta

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta = float(state["beta"])
