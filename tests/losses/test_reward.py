import math

import pytest
import torch

from alignkit.losses.reward import (
    bradley_terry_loss,
    centering_penalty,
    plackett_luce_loss,
    ranked_pairwise_loss,
    ranking_to_pairs,
    scores_to_ranking,
)


def nls(x: float) -> float:
    """−log σ(x) = log(1 + e^{−x})."""
    return math.log1p(math.exp(-x))


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


# ---------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_by_hand_with_and_without_margin():
    # r_c = 2, r_r = 0.5 → d = 1.5 → log(1 + e^{−1.5}) = 0.2014132779827524
    # margin 1 → d = 0.5 → log(1 + e^{−0.5}) = 0.4740769841801067
    # second pair misordered: r_c = 0, r_r = 1 → d = −1 → log(1 + e¹) = 1.3132616875182228
    out = bradley_terry_loss(t(2.0, 0.0), t(0.5, 1.0))
    torch.testing.assert_close(out.losses, t(0.2014132779827524, 1.3132616875182228),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(out.accuracies, t(1.0, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(out.margins, t(1.5, -1.0), rtol=0, atol=0)
    m = bradley_terry_loss(t(2.0), t(0.5), margin=t(1.0))
    assert m.losses.item() == pytest.approx(0.4740769841801067, rel=1e-12)
    assert m.margins.item() == 1.5  # the diagnostic margin is r_c − r_r, without m
    assert bradley_terry_loss(t(2.0), t(0.5), margin=1.0).losses.item() == pytest.approx(
        0.4740769841801067, rel=1e-12)


def test_bradley_terry_gradient_is_minus_sigmoid_of_minus_d():
    # ℓ = −log σ(d) → ∂ℓ/∂r_c = −σ(−d), ∂ℓ/∂r_r = +σ(−d); d = 1.5, −1
    rc, rr = t(2.0, 0.0).requires_grad_(), t(0.5, 1.0).requires_grad_()
    bradley_terry_loss(rc, rr).losses.sum().backward()
    s = torch.sigmoid(-t(1.5, -1.0))
    torch.testing.assert_close(rc.grad, -s, rtol=1e-12, atol=0)
    torch.testing.assert_close(rr.grad, s, rtol=1e-12, atol=0)


def test_soft_label_one_is_hard_and_half_is_symmetric():
    g = torch.Generator().manual_seed(0)
    rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    hard = bradley_terry_loss(rc, rr, margin=0.3).losses
    soft = bradley_terry_loss(rc, rr, margin=0.3, label=torch.ones(5, dtype=torch.float64)).losses
    torch.testing.assert_close(soft, hard, rtol=1e-15, atol=0)
    a = bradley_terry_loss(rc, rr, label=0.5).losses
    b = bradley_terry_loss(rr, rc, label=0.5).losses
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # p = 0.3, d = 1.5: 0.3·log(1 + e^{−1.5}) + 0.7·log(1 + e^{1.5})
    #                 = 0.3·0.201413278 + 0.7·1.701413278 = 0.060423983 + 1.190989295 = 1.251413278
    p = bradley_terry_loss(t(2.0), t(0.5), label=0.3).losses.item()
    assert p == pytest.approx(1.2514132779827523, rel=1e-12)


def test_label_out_of_range_raises():
    with pytest.raises(ValueError, match="label"):
        bradley_terry_loss(t(1.0), t(0.0), label=1.5)


# ---------------------------------------------------------------- ranked lists, all pairs


def test_ranking_to_pairs():
    i, j = ranking_to_pairs(3)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 2)]
    i, j = ranking_to_pairs(4)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert ranking_to_pairs(2)[0].tolist() == [0] and ranking_to_pairs(1)[0].numel() == 0


def test_ranked_pairwise_k3_is_the_mean_over_its_three_pairs():
    # r = 3, 1, 0: pairs (0,1) d=2, (0,2) d=3, (1,2) d=1
    # mean(log(1+e⁻²), log(1+e⁻³), log(1+e⁻¹)) = (0.126928011 + 0.048587352 + 0.313261688) / 3
    #                                           = 0.162925683
    # a reversed list r = 0, 1, 3: d = −1, −3, −2 → accuracy 0, mean margin −2
    out = ranked_pairwise_loss(t(3.0, 1.0, 0.0, 0.0, 1.0, 3.0).view(2, 3))
    assert out.losses[0].item() == pytest.approx((nls(2) + nls(3) + nls(1)) / 3, rel=1e-12)
    assert out.losses[0].item() == pytest.approx(0.16292568337831248, rel=1e-12)
    assert out.losses[1].item() == pytest.approx((nls(-1) + nls(-3) + nls(-2)) / 3, rel=1e-12)
    torch.testing.assert_close(out.accuracies, t(1.0, 0.0), rtol=0, atol=0)
    torch.testing.assert_close(out.margins, t(2.0, -2.0), rtol=1e-15, atol=0)


def test_ranked_pairwise_k4_has_six_pairs_and_k2_is_bradley_terry():
    r = t(1.0, 3.0, 0.0, -1.0)
    # d: (0,1) −2, (0,2) 1, (0,3) 2, (1,2) 3, (1,3) 4, (2,3) 1
    expected = (nls(-2) + nls(1) + nls(2) + nls(3) + nls(4) + nls(1)) / 6
    out = ranked_pairwise_loss(r[None])
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.accuracies.item() == pytest.approx(5 / 6, rel=1e-12)
    two = ranked_pairwise_loss(t(2.0, 0.5)[None])
    assert two.losses.item() == pytest.approx(bradley_terry_loss(t(2.0), t(0.5)).losses.item(),
                                              rel=1e-12)


def test_ranked_pairwise_mask_drops_absent_entries():
    # K = 4 slots, 3 present, NaN padding: equals the K = 3 list 3, 1, 0
    r = t(3.0, 1.0, 0.0, float("nan"))[None].requires_grad_()
    mask = torch.tensor([[True, True, True, False]])
    out = ranked_pairwise_loss(r, mask=mask)
    assert out.losses.item() == pytest.approx(0.16292568337831248, rel=1e-12)
    out.losses.sum().backward()
    assert torch.isfinite(r.grad).all() and r.grad[0, 3] == 0
    # one present entry: no pairs, loss 0
    lone = ranked_pairwise_loss(t(1.0, 2.0)[None], mask=torch.tensor([[True, False]]))
    assert lone.losses.item() == 0.0


def test_ranked_losses_reject_bad_shapes_and_masks():
    with pytest.raises(ValueError):
        ranked_pairwise_loss(t(1.0, 2.0))  # 1-D
    with pytest.raises(ValueError):
        plackett_luce_loss(t(1.0)[None])  # K = 1
    with pytest.raises(ValueError, match="bool"):
        plackett_luce_loss(t(1.0, 2.0)[None], mask=torch.ones(1, 2))


# ---------------------------------------------------------------- Plackett–Luce


def test_plackett_luce_k3_by_hand():
    # r = 2, 1, 0: −[(2 − log(e² + e + 1)) + (1 − log(e + 1))]
    #            = −[(2 − 2.407605964) + (1 − 1.313261687)] = 0.407605964 + 0.313261687
    e = math.e
    out = plackett_luce_loss(t(2.0, 1.0, 0.0)[None])
    expected = -((2 - math.log(e**2 + e + 1)) + (1 - math.log(e + 1)))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.losses.item() == pytest.approx(0.7208676519626029, rel=1e-12)


def test_plackett_luce_k4_by_hand():
    # r = 0.5, −1, 2, 0:
    # k=1: 0.5 − log(e^0.5 + e^−1 + e² + e⁰); k=2: −1 − log(e^−1 + e² + e⁰); k=3: 2 − log(e² + e⁰)
    e = math.exp
    out = plackett_luce_loss(t(0.5, -1.0, 2.0, 0.0)[None])
    expected = -((0.5 - math.log(e(0.5) + e(-1) + e(2) + e(0)))
                 + (-1 - math.log(e(-1) + e(2) + e(0)))
                 + (2 - math.log(e(2) + e(0))))
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)


def test_plackett_luce_k2_is_bradley_terry_and_masking_to_k2_equals_k2():
    g = torch.Generator().manual_seed(2)
    rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 3 for _ in range(2))
    pl = plackett_luce_loss(torch.stack([rc, rr], 1))
    bt = bradley_terry_loss(rc, rr)
    torch.testing.assert_close(pl.losses, bt.losses, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(pl.accuracies, bt.accuracies, rtol=0, atol=0)
    torch.testing.assert_close(pl.margins, bt.margins, rtol=0, atol=0)
    padded = torch.cat([torch.stack([rc, rr], 1), torch.full((7, 2), float("nan"),
                                                             dtype=torch.float64)], 1)
    mask = torch.tensor([[True, True, False, False]]).expand(7, 4)
    masked = plackett_luce_loss(padded, mask=mask)
    torch.testing.assert_close(masked.losses, bt.losses, rtol=1e-12, atol=1e-15)


def test_plackett_luce_gradient_is_finite_with_padding():
    r = t(2.0, 1.0, float("nan"), 0.5, 0.0, -1.0).view(2, 3).requires_grad_()
    mask = torch.tensor([[True, True, False], [True, True, True]])
    plackett_luce_loss(r, mask=mask).losses.sum().backward()
    assert torch.isfinite(r.grad).all() and r.grad[0, 2] == 0
    # ∂ℓ/∂r_1 for the K = 2 list: −σ(−(r_1 − r_2)) = −σ(−1)
    assert r.grad[0, 0].item() == pytest.approx(-1 / (1 + math.e), rel=1e-12)


# ---------------------------------------------------------------- centering, ordering


def test_centering_penalty_per_pair():
    # 0.01·(2 + −1)² = 0.01, 0.01·(3 + 1)² = 0.16, 0.01·(1 + −1)² = 0
    out = centering_penalty(t(2.0, 3.0, 1.0), t(-1.0, 1.0, -1.0), 0.01)
    torch.testing.assert_close(out, t(0.01, 0.16, 0.0), rtol=1e-12, atol=0)


def test_scores_to_ranking_is_a_stable_descending_sort():
    assert scores_to_ranking([0.1, 0.9, 0.5]) == [1, 2, 0]
    assert scores_to_ranking([1.0, 2.0, 2.0, 0.0]) == [1, 2, 0, 3]  # tie keeps input order
    assert scores_to_ranking(torch.tensor([3.0, -1.0, 7.0])) == [2, 0, 1]
    assert scores_to_ranking([]) == []
    with pytest.raises(ValueError, match="NaN"):
        scores_to_ranking([1.0, float("nan")])
