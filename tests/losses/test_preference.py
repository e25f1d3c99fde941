import math

import numpy as np
import pytest
import torch

from alignkit.losses.preference import (
    DPO_LOSS_TYPES,
    dpo_loss,
    plackett_luce_dpo_loss,
    preference_metrics,
)


def nls(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x}), in plain Python for the expected values."""
    return math.log1p(math.exp(-x))


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# ---------------------------------------------------------------- the lesson's lab


def lab_dpo_loss(log_prob_chosen, log_prob_rejected, log_prob_ref_chosen, log_prob_ref_rejected,
                 beta=0.1):
    """The lab's own numpy formula, verbatim in substance."""
    reward_chosen = beta * (log_prob_chosen - log_prob_ref_chosen)
    reward_rejected = beta * (log_prob_rejected - log_prob_ref_rejected)
    return -np.log(1 / (1 + np.exp(-(reward_chosen - reward_rejected))))


def test_lab_start_is_log_2():
    # policy == reference: h = (−5.0 − −5.0) − (−5.2 − −5.2) = 0, loss = −log σ(0) = log 2
    out = dpo_loss(-5.0, -5.2, -5.0, -5.2)
    assert out.losses.dtype == torch.float64 and out.losses.shape == ()
    assert out.losses.item() == pytest.approx(math.log(2), rel=1e-12)  # 0.6931471805599453
    assert out.chosen_rewards.item() == 0.0 and out.rejected_rewards.item() == 0.0


def test_lab_100_steps_match_the_lab_formula_and_end_at_minus_log_sigmoid_0_3():
    chosen, rejected = -5.0, -5.2
    for _ in range(100):
        ours = dpo_loss(chosen, rejected, -5.0, -5.2).losses.item()
        assert ours == pytest.approx(float(lab_dpo_loss(chosen, rejected, -5.0, -5.2)), rel=1e-12)
        chosen += 0.02
        rejected -= 0.01
    # chosen = −5.0 + 100·0.02 = −3.0, rejected = −5.2 − 100·0.01 = −6.2
    # h = (−3.0 − −5.0) − (−6.2 − −5.2) = 2.0 − (−1.0) = 3.0, βh = 0.3
    # loss = −log σ(0.3) = log(1 + e^{−0.3}) = log(1.7408182…) = 0.5543552444685271
    final = dpo_loss(chosen, rejected, -5.0, -5.2)
    assert final.losses.item() == pytest.approx(0.5543552444685271, rel=1e-9)  # float drift of +=
    assert final.chosen_rewards.item() == pytest.approx(0.2, rel=1e-9)  # 0.1·2.0
    assert final.rejected_rewards.item() == pytest.approx(-0.1, rel=1e-9)  # 0.1·(−1.0)


# ---------------------------------------------------------------- every loss type by hand

# β = 0.5; π_c = −4, ref_c = −5 → chosen log-ratio +1; π_r = −6, ref_r = −5.5 → −0.5
# h = 1 − (−0.5) = 1.5, βh = 0.75; rewards 0.5·1 = 0.5 and 0.5·(−0.5) = −0.25
PAIR = (t(-4.0), t(-6.0), t(-5.0), t(-5.5))
NLS_075 = 0.38687100611489994  # −log σ(0.75) = log(1 + e^{−0.75})
NLS_M075 = 1.1368710061148999  # −log σ(−0.75) = log(1 + e^{0.75}) = NLS_075 + 0.75


def test_sigmoid_by_hand():
    out = dpo_loss(*PAIR, beta=0.5)
    assert out.losses.item() == pytest.approx(NLS_075, rel=1e-12)
    assert out.chosen_rewards.item() == 0.5 and out.rejected_rewards.item() == -0.25


def test_cdpo_label_smoothing_by_hand():
    # ε = 0.1: 0.9·0.386871006… + 0.1·1.136871006… = 0.348183905… + 0.113687100… = 0.461871006…
    out = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(0.9 * NLS_075 + 0.1 * NLS_M075, rel=1e-12)
    assert out.losses.item() == pytest.approx(0.46187100611489994, rel=1e-12)
    # ε = 0.5: the label is a coin flip, ½(softplus(−z) + softplus(z)), symmetric in chosen/rejected
    half = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.5).losses.item()
    swapped = dpo_loss(PAIR[1], PAIR[0], PAIR[3], PAIR[2], beta=0.5, label_smoothing=0.5)
    assert half == pytest.approx(swapped.losses.item(), rel=1e-12)


def test_soft_labels_by_hand():
    # z = 0.75. p = 0.8: 0.8·softplus(−0.75) + 0.2·softplus(0.75) = 0.8·0.386871006… + 0.2·1.136871006…
    #                    = 0.309496805… + 0.227374201… = 0.536871006…
    pc, pr, rc, rr = (torch.tensor([v, v], dtype=torch.float64) for v in PAIR)
    out = dpo_loss(pc, pr, rc, rr, beta=0.5, labels=torch.tensor([0.8, 1.0], dtype=torch.float64))
    assert out.losses[0].item() == pytest.approx(0.8 * NLS_075 + 0.2 * NLS_M075, rel=1e-12)
    assert out.losses[0].item() == pytest.approx(0.5368710061148999, rel=1e-12)
    assert out.losses[1].item() == pytest.approx(NLS_075, rel=1e-12)  # p = 1: the hard label
    # with smoothing ε = 0.1 on top: p' = 0.8·0.9 + 0.2·0.1 = 0.74
    both = dpo_loss(*PAIR, beta=0.5, label_smoothing=0.1, labels=torch.tensor(0.8))
    assert both.losses.item() == pytest.approx(0.74 * NLS_075 + 0.26 * NLS_M075, rel=1e-6)
    # p = 0 is the pair read the other way round
    flipped = dpo_loss(*PAIR, beta=0.5, labels=torch.tensor(0.0, dtype=torch.float64))
    swapped = dpo_loss(PAIR[1], PAIR[0], PAIR[3], PAIR[2], beta=0.5)
    assert flipped.losses.item() == pytest.approx(swapped.losses.item(), rel=1e-12)
    with pytest.raises(ValueError, match="sigmoid"):
        dpo_loss(*PAIR, beta=0.5, loss_type="ipo", labels=torch.tensor(0.8))


def test_robust_by_hand_and_equal_to_sigmoid_at_zero():
    # ε = 0.1: (0.9·0.386871006… − 0.1·1.136871006…) / 0.8 = (0.348183905… − 0.113687100…) / 0.8
    #        = 0.234496804… / 0.8 = 0.293121006…
    out = dpo_loss(*PAIR, beta=0.5, loss_type="robust", label_smoothing=0.1)
    assert out.losses.item() == pytest.approx((0.9 * NLS_075 - 0.1 * NLS_M075) / 0.8, rel=1e-12)
    assert out.losses.item() == pytest.approx(0.2931210061148999, rel=1e-12)
    g = torch.Generator().manual_seed(0)
    batch = [torch.randn(5, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    robust = dpo_loss(*batch, beta=0.3, loss_type="robust").losses
    sigmoid = dpo_loss(*batch, beta=0.3, loss_type="sigmoid").losses
    torch.testing.assert_close(robust, sigmoid, rtol=0, atol=0)


def test_ipo_by_hand_and_zero_at_its_target():
    # (h − 1/(2β))² = (1.5 − 1/(2·0.5))² = 0.5² = 0.25
    out = dpo_loss(*PAIR, beta=0.5, loss_type="ipo")
    assert out.losses.item() == pytest.approx(0.25, rel=1e-12)
    # β = 0.1 → target h = 1/(2·0.1) = 5: chosen log-ratio +3, rejected −2 → h = 5 → loss 0
    at_target = dpo_loss(t(-2.0), t(-7.0), t(-5.0), t(-5.0), beta=0.1, loss_type="ipo")
    assert at_target.losses.item() == pytest.approx(0.0, abs=1e-24)
    # overshooting is penalised too: h = 7 → (7 − 5)² = 4
    over = dpo_loss(t(0.0), t(-7.0), t(-5.0), t(-5.0), beta=0.1, loss_type="ipo")
    assert over.losses.item() == pytest.approx(4.0, rel=1e-12)


def test_hinge_below_at_and_beyond_one():
    # max(0, 1 − βh): βh = 0.75 → 0.25
    assert dpo_loss(*PAIR, beta=0.5, loss_type="hinge").losses.item() == pytest.approx(0.25,
                                                                                         rel=1e-12)
    # β = 0.5, ref = −5 throughout; π_c = −3, −2, −6 and π_r = −5, −5, −4
    # → h = 2 − 0, 3 − 0, −1 − 1 = 2, 3, −2 → βh = 1, 1.5, −1 → losses 0, 0, 2
    out = dpo_loss(t(-3.0, -2.0, -6.0), t(-5.0, -5.0, -4.0), t(-5.0, -5.0, -5.0),
                   t(-5.0, -5.0, -5.0), beta=0.5, loss_type="hinge")
    torch.testing.assert_close(out.losses, t(0.0, 0.0, 2.0), rtol=0, atol=1e-15)


def test_simpo_with_lengths_and_gamma():
    # β = 2, γ = 0.5; π_c = −6 over 3 tokens → β·π_c/|y_c| = 2·(−2) = −4
    #                  π_r = −12 over 4 tokens → β·π_r/|y_r| = 2·(−3) = −6
    # z = −4 − (−6) − 0.5 = 1.5, loss = −log σ(1.5) = log(1 + e^{−1.5}) = 0.2014132779827524
    out = dpo_loss(t(-6.0), t(-12.0), None, None, beta=2.0, loss_type="simpo", gamma=0.5,
                   chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([4]))
    assert out.losses.item() == pytest.approx(0.2014132779827524, rel=1e-12)
    assert out.chosen_rewards.item() == -4.0 and out.rejected_rewards.item() == -6.0
    # the reference is ignored when given
    with_ref = dpo_loss(t(-6.0), t(-12.0), t(-1.0), t(-9.0), beta=2.0, loss_type="simpo",
                        gamma=0.5, chosen_lengths=3, rejected_lengths=4)
    assert with_ref.losses.item() == pytest.approx(0.2014132779827524, rel=1e-12)
    # γ = 0: z = 2, loss = log(1 + e^{−2}) = 0.1269280110429725
    no_gamma = dpo_loss(t(-6.0), t(-12.0), None, None, beta=2.0, loss_type="simpo",
                        chosen_lengths=3, rejected_lengths=4)
    assert no_gamma.losses.item() == pytest.approx(0.1269280110429725, rel=1e-12)


def test_batch_float32_is_per_example_and_unreduced():
    # rows: the PAIR above (βh = 0.75) and the lab start (h = 0 → log 2), β = 0.5
    out = dpo_loss(torch.tensor([-4.0, -5.0]), torch.tensor([-6.0, -5.2]),
                   torch.tensor([-5.0, -5.0]), torch.tensor([-5.5, -5.2]), beta=0.5)
    assert out.losses.dtype == torch.float32 and out.losses.shape == (2,)
    torch.testing.assert_close(out.losses, torch.tensor([NLS_075, math.log(2)]), rtol=1e-6, atol=0)


def test_dtypes_numbers_follow_tensors_and_half_is_upcast():
    out = dpo_loss(torch.tensor([-4.0]), -6.0, -5.0, -5.5, beta=0.5)
    assert out.losses.dtype == torch.float32
    assert out.losses.item() == pytest.approx(NLS_075, rel=1e-6)
    bf = dpo_loss(*(x.to(torch.bfloat16) for x in PAIR), beta=0.5)
    assert bf.losses.dtype == torch.float32
    assert bf.losses.item() == pytest.approx(NLS_075, rel=1e-6)  # these values are exact in bf16


# ---------------------------------------------------------------- gradients


def test_gradients_reach_the_policy_only_and_match_the_analytic_derivative():
    # L = −log σ(βh) → ∂L/∂π_c = −β·σ(−βh), ∂L/∂π_r = +β·σ(−βh)
    beta = 0.5
    pc = t(-4.0, -5.0, -1.0).requires_grad_()
    pr = t(-6.0, -5.2, -9.0).requires_grad_()
    rc = t(-5.0, -5.0, -3.0).requires_grad_()  # a reference that (wrongly) tracks grad
    rr = t(-5.5, -5.2, -4.0).requires_grad_()
    dpo_loss(pc, pr, rc, rr, beta=beta).losses.sum().backward()
    h = (pc - rc - (pr - rr)).detach()  # 1.5, 0, −3
    expected = beta * torch.sigmoid(-beta * h)  # 0.5·σ(−0.75), 0.5·σ(0) = 0.25, 0.5·σ(1.5)
    torch.testing.assert_close(pc.grad, -expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(pr.grad, expected, rtol=1e-12, atol=0)
    assert rc.grad is None and rr.grad is None


def test_inputs_are_not_mutated():
    args = [x.clone() for x in PAIR]
    dpo_loss(*args, beta=0.5, label_smoothing=0.2)
    for a, b in zip(args, PAIR):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- validation


def test_unknown_loss_type_names_the_allowed_ones():
    with pytest.raises(ValueError) as e:
        dpo_loss(*PAIR, loss_type="kto")
    for name in DPO_LOSS_TYPES:
        assert name in str(e.value)
    assert set(DPO_LOSS_TYPES) == {"sigmoid", "robust", "ipo", "hinge", "simpo"}


@pytest.mark.parametrize("kwargs", [
    dict(beta=0.0),
    dict(beta=-0.1),
    dict(label_smoothing=0.6),
    dict(label_smoothing=-0.1),
    dict(loss_type="robust", label_smoothing=0.5),
    dict(loss_type="ipo", label_smoothing=0.1),
    dict(loss_type="hinge", label_smoothing=0.1),
    dict(loss_type="sigmoid", gamma=0.5),
    dict(loss_type="simpo"),  # no lengths
    dict(loss_type="simpo", chosen_lengths=3),  # one length only
    dict(loss_type="ipo", chosen_lengths=3, rejected_lengths=4),
])
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        dpo_loss(*PAIR, **kwargs)


def test_missing_reference_raises_except_for_simpo():
    with pytest.raises(ValueError, match="ref_chosen_logps"):
        dpo_loss(t(-4.0), t(-6.0), None, None)


# ---------------------------------------------------------------- metrics


def test_preference_metrics_names_and_values():
    # chosen rewards 0.5, 0.0; rejected −0.25, 0.0 (the PAIR row and a tie)
    out = dpo_loss(t(-4.0, -5.0), t(-6.0, -5.2), t(-5.0, -5.0), t(-5.5, -5.2), beta=0.5)
    m = preference_metrics(out)
    assert set(m) == {"rewards/chosen", "rewards/rejected", "rewards/margins",
                      "rewards/accuracies"}
    torch.testing.assert_close(m["rewards/chosen"], t(0.5, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(m["rewards/rejected"], t(-0.25, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(m["rewards/margins"], t(0.75, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(m["rewards/accuracies"], t(1.0, 0.0), rtol=0, atol=0)  # tie → 0
    assert not any(v.requires_grad for v in m.values())


# ---------------------------------------------------------------- Plackett–Luce DPO


def test_pl_dpo_k3_by_hand():
    # β = 0.5, policy − ref = 4, 2, 0 → r = 2, 1, 0 (best first)
    # ℓ = −[(2 − log(e² + e¹ + e⁰)) + (1 − log(e¹ + e⁰))]
    #   = −[(2 − 2.407605964…) + (1 − 1.313261687…)] = 0.407605964… + 0.313261687… = 0.720867652…
    policy, ref = t(-1.0, -3.0, -5.0)[None], t(-5.0, -5.0, -5.0)[None]
    out = plackett_luce_dpo_loss(policy, ref, beta=0.5)
    e = math.e
    expected = -((2 - math.log(e**2 + e + 1)) + (1 - math.log(e + 1)))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.losses.item() == pytest.approx(0.7208676519626029, rel=1e-12)
    torch.testing.assert_close(out.rewards, t(2.0, 1.0, 0.0)[None], rtol=0, atol=0)
    assert out.accuracies.item() == 1.0


def test_pl_dpo_k4_by_hand():
    # β = 1, ref = 0, r = policy = 1, 3, 0, −1 (a ranking the policy partly disagrees with)
    # k=1: 1 − log(e¹ + e³ + e⁰ + e⁻¹); k=2: 3 − log(e³ + e⁰ + e⁻¹); k=3: 0 − log(e⁰ + e⁻¹)
    policy = t(1.0, 3.0, 0.0, -1.0)[None]
    out = plackett_luce_dpo_loss(policy, torch.zeros_like(policy), beta=1.0)
    e = math.exp
    expected = -((1 - math.log(e(1) + e(3) + e(0) + e(-1)))
                 + (3 - math.log(e(3) + e(0) + e(-1)))
                 + (0 - math.log(e(0) + e(-1))))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): 1<3 wrong, the other five right → 5/6
    assert out.accuracies.item() == pytest.approx(5 / 6, rel=1e-12)


def test_pl_dpo_k2_is_sigmoid_dpo():
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(6, generator=g, dtype=torch.float64) * 4 for _ in range(4))
    pl = plackett_luce_dpo_loss(torch.stack([pc, pr], 1), torch.stack([rc, rr], 1), beta=0.2)
    dpo = dpo_loss(pc, pr, rc, rr, beta=0.2)
    torch.testing.assert_close(pl.losses, dpo.losses, rtol=1e-12, atol=1e-15)


def test_pl_dpo_mask_to_k2_equals_k2_and_ignores_padding():
    # K = 4 slots, the first list has 2 present (NaN padding), the second all 4
    policy = t(-1.0, -3.0, float("nan"), float("nan"), 1.0, 3.0, 0.0, -1.0).view(2, 4)
    ref = torch.zeros_like(policy)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    policy.requires_grad_()
    out = plackett_luce_dpo_loss(policy, ref, beta=0.5, mask=mask)
    k2 = dpo_loss(t(-1.0), t(-3.0), t(0.0), t(0.0), beta=0.5)  # βh = 0.5·2 = 1 → 0.3132616875…
    assert out.losses[0].item() == pytest.approx(k2.losses.item(), rel=1e-12)
    assert out.losses[0].item() == pytest.approx(0.31326168751822286, rel=1e-12)
    full = plackett_luce_dpo_loss(policy[1:].detach(), ref[1:], beta=0.5)
    assert out.losses[1].item() == pytest.approx(full.losses.item(), rel=1e-12)
    out.losses.sum().backward()
    assert torch.isfinite(policy.grad).all()
    assert policy.grad[0, 2:].eq(0).all()
