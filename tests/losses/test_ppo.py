import math

import pytest
import torch

from alignkit.losses.kl import kl_estimate
from alignkit.losses.ppo import (
    entropy_from_logits,
    explained_variance,
    grpo_loss,
    policy_loss,
    value_loss,
)

F64 = torch.float64


# --------------------------------------------------------------------------- policy loss


def test_policy_loss_at_and_beyond_clip_edges():
    # ε = 0.2, old_logps = 0, logps = log ρ.  L = max(−Aρ, −A·clip(ρ, .8, 1.2))
    ratio = torch.tensor([[1.3, 0.7, 0.7, 1.3, 1.0, 1.1, 0.9]], dtype=F64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, 2.0, -3.0, 0.5]], dtype=F64)
    # ρ=1.3, A=+1: max(−1.3, −1.2) = −1.2   clipped (no incentive to push ρ further up)
    # ρ=0.7, A=+1: max(−0.7, −0.8) = −0.7   unclipped (pessimistic branch is the raw one)
    # ρ=0.7, A=−1: max(+0.7, +0.8) = +0.8   clipped
    # ρ=1.3, A=−1: max(+1.3, +1.2) = +1.3   unclipped
    # ρ=1.0, A=+2: −2                      unclipped
    # ρ=1.1, A=−3: +3.3 (inside the band)  unclipped
    # ρ=0.9, A=+.5: −0.45 (inside the band) unclipped
    logps = ratio.log().requires_grad_()
    out = policy_loss(logps, torch.zeros_like(logps), adv, torch.ones_like(adv, dtype=torch.bool))
    torch.testing.assert_close(out.losses.detach(),
                               torch.tensor([[-1.2, -0.7, 0.8, 1.3, -2.0, 3.3, -0.45]], dtype=F64),
                               rtol=0, atol=1e-12)
    assert out.clipped.tolist() == [[True, False, True, False, False, False, False]]
    torch.testing.assert_close(out.ratio, ratio, rtol=0, atol=1e-12)
    # ∂L/∂logp = −Aρ where unclipped, 0 where clipped:
    # [0, −0.7, 0, +1.3, −2, +3.3, −0.45]
    out.losses.sum().backward()
    torch.testing.assert_close(logps.grad,
                               torch.tensor([[0.0, -0.7, 0.0, 1.3, -2.0, 3.3, -0.45]], dtype=F64),
                               rtol=0, atol=1e-12)
    # approx_kl = (ρ − 1) − ln ρ: ρ=1.3 → 0.3 − 0.262364 = 0.037636; ρ=0.7 → −0.3 + 0.356675 = 0.056675
    expected_kl = [(r - 1) - math.log(r) for r in ratio[0].tolist()]
    torch.testing.assert_close(out.approx_kl, torch.tensor([expected_kl], dtype=F64),
                               rtol=0, atol=1e-12)
    assert out.approx_kl[0, 0].item() == pytest.approx(0.3 - math.log(1.3), abs=1e-12)
    for diag in (out.clipped, out.approx_kl, out.ratio):
        assert not diag.requires_grad


def test_policy_loss_clip_eps_and_mask():
    # ε = 0.1: ρ = 1.15, A = +1 → max(−1.15, −1.1) = −1.1, clipped
    logps = torch.tensor([[math.log(1.15), -float("inf")]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.0, float("nan")]], dtype=F64)
    adv = torch.tensor([[1.0, 5.0]], dtype=F64)
    mask = torch.tensor([[True, False]])
    out = policy_loss(logps, old, adv, mask, clip_eps=0.1)
    torch.testing.assert_close(out.losses.detach(), torch.tensor([[-1.1, 0.0]], dtype=F64),
                               rtol=0, atol=1e-12)
    assert out.clipped.tolist() == [[True, False]]
    assert out.approx_kl[0, 1].item() == 0.0 and out.ratio[0, 1].item() == 1.0
    out.losses.sum().backward()  # −inf / NaN under the mask must not poison the gradient
    assert torch.equal(logps.grad, torch.zeros_like(logps))


def test_policy_loss_broadcasts_sequence_advantage_and_detaches():
    logps = torch.zeros(2, 3, requires_grad=True)
    adv = torch.tensor([[2.0], [-1.0]], requires_grad=True)
    out = policy_loss(logps, torch.zeros(2, 3), adv, torch.ones(2, 3, dtype=torch.bool))
    # ρ = 1 everywhere → L = −A on every token
    torch.testing.assert_close(out.losses.detach(), torch.tensor([[-2.0] * 3, [1.0] * 3]))
    out.losses.sum().backward()
    assert adv.grad is None  # advantages are constants of the objective


# --------------------------------------------------------------------------- value loss


def test_value_loss_by_hand():
    # ε = 0.2. V_clip = clip(V, V_old − .2, V_old + .2); L = ½ max((V − R)², (V_clip − R)²)
    values = torch.tensor([[1.5, 1.1, 0.5, 2.5, 0.5]], dtype=F64, requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0]], dtype=F64)
    returns = torch.tensor([[2.0, 2.0, 0.0, 2.0, 2.0]], dtype=F64)
    # V=1.5,R=2: V_clip=1.2: (−.5)²=.25, (−.8)²=.64 → ½·.64 = .32    clipped
    # V=1.1,R=2: inside:     (−.9)²=.81 both      → ½·.81 = .405   unclipped
    # V=0.5,R=0: V_clip=0.8: (.5)²=.25, (.8)²=.64  → .32            clipped
    # V=2.5,R=2: V_clip=1.2: (.5)²=.25, (−.8)²=.64 → .32            clipped (overshot the return)
    # V=0.5,R=2: V_clip=0.8: (−1.5)²=2.25, (−1.2)²=1.44 → ½·2.25 = 1.125 unclipped
    out = value_loss(values, old, returns, torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(out.losses.detach(),
                               torch.tensor([[0.32, 0.405, 0.32, 0.32, 1.125]], dtype=F64),
                               rtol=0, atol=1e-12)
    assert out.clipped.tolist() == [[True, False, True, True, False]]
    # ∂L/∂V = V − R where unclipped, 0 where clipped: [0, −0.9, 0, 0, −1.5]
    out.losses.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.9, 0.0, 0.0, -1.5]], dtype=F64),
                               rtol=0, atol=1e-12)


def test_value_loss_mask():
    values = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    out = value_loss(values, torch.tensor([[1.0, 0.0]]), torch.tensor([[3.0, float("inf")]]),
                     torch.tensor([[True, False]]))
    # (1 − 3)² = 4 → ½·4 = 2 (V = V_old, so both branches agree)
    assert out.losses.tolist() == [[2.0, 0.0]] and out.clipped.tolist() == [[False, False]]
    out.losses.sum().backward()
    assert values.grad.tolist() == [[-2.0, 0.0]]


# --------------------------------------------------------------------------- entropy, EV


def test_entropy_from_logits():
    # uniform over 4 → ln 4; p = [.5, .25, .25] → .5 ln 2 + 2·.25 ln 4 = 1.5 ln 2 = 1.0397208
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                           [math.log(0.5), math.log(0.25), math.log(0.25), -float("inf")]],
                          requires_grad=True)
    h = entropy_from_logits(logits)
    assert h.shape == (2,)
    torch.testing.assert_close(h, torch.tensor([math.log(4), 1.5 * math.log(2)]),
                               rtol=0, atol=1e-6)
    h.sum().backward()  # the −inf logit must not produce a NaN gradient
    assert torch.isfinite(logits.grad).all()
    # low-precision logits come back as fp32 (uniform over 8 in bf16 → ln 8 exactly enough)
    h16 = entropy_from_logits(torch.zeros(3, 8, dtype=torch.bfloat16))
    assert h16.dtype == torch.float32
    torch.testing.assert_close(h16, torch.full((3,), math.log(8)), rtol=0, atol=1e-6)
    # a one-hot distribution (all other logits −inf) has entropy exactly 0
    one_hot = torch.tensor([0.0, -float("inf"), -float("inf")])
    assert entropy_from_logits(one_hot).item() == 0.0


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, float("nan")]], dtype=F64)
    mask = torch.tensor([[True, True, True, True, False]])
    # V = R → 1;  V = const → 1 − Var[R]/Var[R] = 0
    assert explained_variance(returns, returns, mask).item() == 1.0
    assert explained_variance(torch.full_like(returns, 7.0), returns, mask).item() == pytest.approx(
        0.0, abs=1e-15)
    # V = [1, 2, 3, 3]: R − V = [0, 0, 0, 1], Var = (3·.0625 + .5625)/3 = .25; Var[R] = 5/3
    # EV = 1 − .25/(5/3) = 1 − .15 = 0.85
    values = torch.tensor([[1.0, 2.0, 3.0, 3.0, 0.0]], dtype=F64)
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85, abs=1e-14)
    # constant returns → NaN, not a division error
    assert math.isnan(explained_variance(values, torch.ones_like(returns), mask).item())


# --------------------------------------------------------------------------- GRPO


def test_grpo_loss_by_hand():
    # ρ = 1 (logps == old_logps), ref − logp = ln .5 on every token:
    # k3 = e^{ln .5} − ln .5 − 1 = .5 + .693147 − 1 = 0.193147
    # L = −A + β·k3 = −A + .04 · 0.193147 = −A + 0.0077259
    logps = torch.full((2, 3), -1.0, dtype=F64, requires_grad=True)
    ref = logps.detach() + math.log(0.5)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = grpo_loss(logps, logps.detach(), ref, adv, mask, beta=0.04)
    k3 = 0.5 - math.log(0.5) - 1
    assert k3 == pytest.approx(0.19314718055994530, abs=1e-15)
    expected = torch.tensor([[-1 + 0.04 * k3] * 2 + [0.0], [2 + 0.04 * k3] * 3], dtype=F64)
    torch.testing.assert_close(out.losses.detach(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.kl, torch.where(mask, torch.tensor(k3, dtype=F64), 0.0),
                               rtol=0, atol=1e-12)
    # ∂L/∂logp = −Aρ + β·(1 − e^{ref − logp}) = −A + .04·(1 − .5) = −A + 0.02
    out.losses.sum().backward()
    expected_grad = torch.tensor([[-0.98, -0.98, 0.0], [2.02, 2.02, 2.02]], dtype=F64)
    torch.testing.assert_close(logps.grad, expected_grad, rtol=0, atol=1e-12)


def test_grpo_loss_is_surrogate_plus_k3():
    g = torch.Generator().manual_seed(0)
    logps = torch.randn(4, 6, generator=g, dtype=F64) * 0.3 - 2
    old = logps + torch.randn(4, 6, generator=g, dtype=F64) * 0.3
    ref = logps + torch.randn(4, 6, generator=g, dtype=F64) * 0.3
    adv = torch.randn(4, generator=g, dtype=F64)
    mask = torch.rand(4, 6, generator=g) < 0.7
    out = grpo_loss(logps, old, ref, adv, mask, clip_eps=0.2, beta=0.1)
    surrogate = policy_loss(logps, old, adv[:, None], mask, clip_eps=0.2)
    k3 = torch.where(mask, torch.exp(ref - logps) - (ref - logps) - 1, 0)
    torch.testing.assert_close(out.losses, surrogate.losses + 0.1 * k3, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.kl, torch.where(mask, kl_estimate(logps, ref, "k3"), 0),
                               rtol=0, atol=1e-12)
    assert torch.equal(out.clipped, surrogate.clipped)
    # With π = π_ref the KL term vanishes exactly.
    same = grpo_loss(logps, old, logps.clone(), adv, mask)
    assert torch.equal(same.losses, surrogate.losses)


def test_grpo_loss_rejects_token_advantages():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3),
                  torch.ones(2, 3, dtype=torch.bool))
