import math

import pytest
import torch

from alignkit.losses.kl import AdaptiveKLController, FixedKLController, kl_estimate


def test_estimators_closed_form():
    logps = torch.tensor([-1.0, -2.0, -0.5], dtype=torch.float64)
    ref_logps = torch.tensor([-1.5, -1.0, -0.5], dtype=torch.float64)
    # r = logps − ref = [0.5, −1.0, 0.0]
    # k1 = r
    # k2 = ½r² = [0.125, 0.5, 0]
    # k3 = e^{−r} − 1 + r = [e^{−0.5} − 0.5, e − 2, 0] = [0.1065306597126334, 0.7182818284590452, 0]
    torch.testing.assert_close(kl_estimate(logps, ref_logps, "k1"),
                               torch.tensor([0.5, -1.0, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(kl_estimate(logps, ref_logps, "k2"),
                               torch.tensor([0.125, 0.5, 0.0], dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(kl_estimate(logps, ref_logps, "k3"),
                               torch.tensor([0.1065306597126334, 0.7182818284590452, 0.0],
                                            dtype=torch.float64),
                               rtol=0, atol=1e-15)
    # The default estimator is k1.
    assert torch.equal(kl_estimate(logps, ref_logps), logps - ref_logps)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_zero_when_policy_equals_reference(estimator):
    logps = torch.randn(4, 7, generator=torch.Generator().manual_seed(0)) - 3.0
    assert torch.equal(kl_estimate(logps, logps.clone(), estimator), torch.zeros(4, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_k3_is_nonnegative(dtype):
    g = torch.Generator().manual_seed(1)
    # Wide and tiny log-ratios both: expm1 keeps the tiny ones from cancelling below 0.
    r = torch.cat([torch.randn(10_000, generator=g) * 5, torch.randn(10_000, generator=g) * 1e-6,
                   torch.tensor([1e-30, -1e-30, 1e-8, -1e-8])]).to(dtype)
    k3 = kl_estimate(r, torch.zeros_like(r), "k3")
    assert (k3 >= 0).all()
    assert (kl_estimate(r, torch.zeros_like(r), "k2") >= 0).all()


def test_unknown_estimator():
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(torch.zeros(2), torch.zeros(2), "k4")


def test_k1_k3_unbiased_on_categoricals():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    # KL(p‖q) = .5 ln 2.5 + .3 ln .6 + .2 ln(2/3)
    #         = .458145 − .153248 − .081093 = 0.223805
    analytic = float((p * (p / q).log()).sum())
    assert analytic == pytest.approx(0.5 * math.log(2.5) + 0.3 * math.log(0.6)
                                     + 0.2 * math.log(2 / 3), rel=1e-12)
    n = 200_000
    x = torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(0))
    logps, ref_logps = p.log()[x], q.log()[x]
    stds = {}
    for est in ("k1", "k3"):
        k = kl_estimate(logps, ref_logps, est)
        stds[est] = float(k.std())
        # Tolerance from the sample size: 5 standard errors (k1: sd ≈ 0.69 → SE ≈ 0.0016).
        tol = 5 * stds[est] / math.sqrt(n)
        assert abs(float(k.mean()) - analytic) < tol, est
    # k3 is the low-variance one here: per-token values {0.316, 0.156, 0.095} vs k1's
    # {0.916, −0.511, −0.405}.
    assert stds["k3"] < stds["k1"] / 3


def test_adaptive_controller_by_hand():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # e = clip(9/6 − 1, −.2, .2) = clip(0.5) = 0.2; K = 256/10000 = 0.0256
    # β = 0.1 · (1 + 0.0256 · 0.2) = 0.1 · 1.00512 = 0.100512
    assert c.update(9.0, 256) == pytest.approx(0.100512, rel=1e-12)
    assert c.beta == pytest.approx(0.100512, rel=1e-12)


def test_adaptive_controller_error_clipping():
    # Below: e = clip(1/6 − 1 = −0.8333, ...) = −0.2 → β = 0.1 · (1 − 0.00512) = 0.099488
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(1.0, 256) == pytest.approx(0.099488, rel=1e-12)
    # KL = 0 also clips to −0.2 (no division by the KL)
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(0.0, 256) == pytest.approx(0.099488, rel=1e-12)
    # Inside the band: e = 6.6/6 − 1 = 0.1 → β = 0.1 · (1 + 0.0256 · 0.1) = 0.100256
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(6.6, 256) == pytest.approx(0.100256, rel=1e-12)
    # Far above: still +0.2
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(1e6, 256) == pytest.approx(0.100512, rel=1e-12)
    # On target: unchanged
    c = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert c.update(6.0, 256) == 0.1


def test_adaptive_controller_state_round_trip():
    a = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    for kl in (9.0, 3.0, 7.5):
        a.update(kl, 64)
    state = a.state_dict()
    b = AdaptiveKLController(0.2, target=6.0, horizon=10_000)
    b.load_state_dict(state)
    assert b.beta == a.beta
    for kl in (12.0, 5.0, 0.5):
        assert b.update(kl, 64) == a.update(kl, 64)  # bit-identical continuation


def test_adaptive_controller_validation():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10_000)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=6.0, horizon=0)
    with pytest.raises(ValueError):
        AdaptiveKLController(-0.1, target=6.0, horizon=10)


def test_fixed_controller():
    c = FixedKLController(0.05)
    assert c.update(100.0, 256) == 0.05
    assert c.update(0.0, 256) == 0.05
    d = FixedKLController(0.3)
    d.load_state_dict(c.state_dict())
    assert d.beta == 0.05 and d.update(1.0, 1) == 0.05
