import statistics

import pytest
import torch

from alignkit.losses.advantages import (
    gae,
    grpo_advantages,
    masked_mean,
    masked_var,
    per_token_rewards,
    rloo_advantages,
    whiten,
)

F64 = torch.float64


def _mask(rows):
    return torch.tensor(rows, dtype=torch.bool)


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_and_var_by_hand():
    x = torch.tensor([[1.0, 2.0, float("nan")], [float("inf"), 5.0, 6.0]], dtype=F64)
    mask = _mask([[1, 1, 0], [0, 1, 1]])
    # counted: 1, 2, 5, 6 → mean 14/4 = 3.5 (the NaN and inf under the mask never count)
    assert masked_mean(x, mask).item() == 3.5
    # per row: (1+2)/2 = 1.5, (5+6)/2 = 5.5
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 5.5], dtype=F64))
    # Σ(x − 3.5)² = 6.25 + 2.25 + 2.25 + 6.25 = 17 → unbiased 17/3, biased 17/4
    assert masked_var(x, mask).item() == pytest.approx(17 / 3, rel=1e-15)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(17 / 4, rel=1e-15)


def test_masked_stats_empty_is_zero_not_nan():
    x = torch.ones(2, 3)
    mask = _mask([[0, 0, 0], [0, 1, 0]])
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([0.0, 1.0]))
    assert masked_var(x, mask).item() == 0.0  # one counted entry, unbiased → 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whiten(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 9, generator=g, dtype=F64) * 3 + 2
    mask = torch.rand(4, 9, generator=g) < 0.6
    x_poisoned = torch.where(mask, x, float("nan"))  # padding must not leak
    w = whiten(x_poisoned, mask)
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
    assert abs(masked_mean(w, mask).item()) < 1e-12
    # var(w) = var(x) / (var(x) + 1e-8) = 1 − O(1e-9)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-8)
    # shift_mean=False keeps the mean, rescales the spread
    w2 = whiten(x_poisoned, mask, shift_mean=False)
    assert masked_mean(w2, mask).item() == pytest.approx(masked_mean(x, mask).item(), abs=1e-12)
    assert masked_var(w2, mask).item() == pytest.approx(1.0, abs=1e-8)
    assert torch.equal(w2[~mask], torch.zeros_like(w2[~mask]))


# --------------------------------------------------------------------------- reward shaping


def test_per_token_rewards_score_on_last_response_token():
    mask = _mask([[1, 1, 1, 0, 0],   # right padded, last response token at t=2
                  [0, 0, 1, 1, 1],   # prompt first, last at t=4
                  [0, 1, 0, 0, 0],   # single token at t=1
                  [0, 0, 0, 0, 0]])  # no response: no reward at all
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64)
    kl = torch.full((4, 5), 0.5, dtype=F64)
    # −β·kl = −0.1·0.5 = −0.05 on response tokens; + score on the last one
    r = per_token_rewards(scores, kl, mask, beta=0.1)
    expected = torch.tensor([[-0.05, -0.05, 0.95, 0, 0],
                             [0, 0, -0.05, -0.05, 1.95],
                             [0, 2.95, 0, 0, 0],
                             [0, 0, 0, 0, 0]], dtype=F64)
    torch.testing.assert_close(r, expected, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, mask, gamma, lam):
    """Plain double loop: per row, run GAE on the compacted response tokens, scatter back."""
    B, T = len(rewards), len(rewards[0])
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        idx = [t for t in range(T) if mask[b][t]]
        next_v, next_a = 0.0, 0.0
        for t in reversed(idx):
            delta = rewards[b][t] + gamma * next_v - values[b][t]
            a = delta + gamma * lam * next_a
            adv[b][t], ret[b][t] = a, a + values[b][t]
            next_v, next_a = values[b][t], a
    return torch.tensor(adv, dtype=F64), torch.tensor(ret, dtype=F64)


def _ragged_masks(g, B, T, holes=False):
    rows = []
    for _ in range(B):
        start = int(torch.randint(0, T // 2, (1,), generator=g))  # leading prompt zeros
        end = int(torch.randint(start, T + 1, (1,), generator=g))  # right padding
        row = [start <= t < end for t in range(T)]
        if holes:
            row = [m and bool(torch.rand(1, generator=g) < 0.8) for m in row]
        rows.append(row)
    rows[0] = [True] * T  # always one full row
    return torch.tensor(rows)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.95), (0.9, 0.0), (1.0, 1.0),
                                       (0.5, 0.7)])
def test_gae_matches_double_loop(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 11
    mask = _ragged_masks(g, B, T, holes=seed % 2 == 1)
    rewards = torch.randn(B, T, generator=g, dtype=F64)
    values = torch.randn(B, T, generator=g, dtype=F64)
    ref_adv, ref_ret = gae_reference(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    # Garbage outside the mask must not matter.
    adv, ret = gae(torch.where(mask, rewards, float("nan")), torch.where(mask, values, 1e9), mask,
                   gamma=gamma, lam=lam)
    torch.testing.assert_close(adv, ref_adv, rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, ref_ret, rtol=0, atol=1e-12)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=F64)
    values = torch.tensor([[0.5, 0.6, 0.7]], dtype=F64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    # γ = 1, λ = 0.5, V after the end = 0:
    # δ2 = 1 + 0 − .7 = .3;  A2 = .3
    # δ1 = 0 + .7 − .6 = .1; A1 = .1 + .5·.3 = .25
    # δ0 = 0 + .6 − .5 = .1; A0 = .1 + .5·.25 = .225
    # returns = A + V = [.725, .85, 1.0]
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3]], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0]], dtype=F64), rtol=0, atol=1e-15)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(7)
    B, T = 5, 8
    mask = _ragged_masks(g, B, T)
    rewards = torch.where(mask, torch.randn(B, T, generator=g, dtype=F64), 0)
    values = torch.where(mask, torch.randn(B, T, generator=g, dtype=F64), 0)
    # With γ = λ = 1 the δ's telescope: A_t = Σ_{s≥t} r_s − V_t.
    reward_to_go = rewards.flip(-1).cumsum(-1).flip(-1)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.where(mask, reward_to_go - values, 0), rtol=0, atol=1e-12)
    torch.testing.assert_close(ret, torch.where(mask, reward_to_go, 0), rtol=0, atol=1e-12)


def test_gae_upcasts_low_precision():
    mask = torch.ones(2, 4, dtype=torch.bool)
    adv, ret = gae(torch.ones(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.bfloat16),
                   mask)
    assert adv.dtype == torch.float32 and ret.dtype == torch.float32


# --------------------------------------------------------------------------- RLOO / GRPO


def test_rloo_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 4.0], dtype=F64)
    # group 1: 1 − (2+3)/2 = −1.5; 2 − (1+3)/2 = 0; 3 − (1+2)/2 = 1.5. group 2: all 0.
    torch.testing.assert_close(rloo_advantages(scores, 3),
                               torch.tensor([-1.5, 0.0, 1.5, 0.0, 0.0, 0.0], dtype=F64),
                               rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_rloo_matches_loop_and_sums_to_zero(k):
    scores = torch.randn(4 * k, generator=torch.Generator().manual_seed(k), dtype=F64)
    s = scores.tolist()
    expected = []
    for g in range(0, len(s), k):
        group = s[g:g + k]
        for i in range(k):
            expected.append(group[i] - sum(group[j] for j in range(k) if j != i) / (k - 1))
    adv = rloo_advantages(scores, k)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(adv.view(-1, k).sum(-1), torch.zeros(4, dtype=F64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("fn", [rloo_advantages, grpo_advantages])
def test_group_validation(fn):
    with pytest.raises(ValueError, match="≥ 2"):
        fn(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="multiple"):
        fn(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="1-D"):
        fn(torch.zeros(2, 2), 2)


def test_grpo_by_hand():
    scores = torch.tensor([0.0, 1.0, 2.0, 2.0], dtype=F64)
    # group [0, 1]: mean .5, population std .5 → ±.5/(.5 + 1e-4) = ±0.99980003999...
    # group [2, 2]: std 0 → 0/(0 + 1e-4) = 0
    a = 0.5 / 0.5001
    torch.testing.assert_close(grpo_advantages(scores, 2),
                               torch.tensor([-a, a, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-15)
    # Dr. GRPO: no division → ±0.5
    torch.testing.assert_close(grpo_advantages(scores, 2, scale=False),
                               torch.tensor([-0.5, 0.5, 0.0, 0.0], dtype=F64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("scale", [True, False])
def test_grpo_matches_loop_and_centres(k, scale):
    scores = torch.randn(3 * k, generator=torch.Generator().manual_seed(k), dtype=F64)
    s = scores.tolist()
    expected = []
    for g in range(0, len(s), k):
        group = s[g:g + k]
        mu, sd = statistics.fmean(group), statistics.pstdev(group)
        expected += [(x - mu) / (sd + 1e-4) if scale else x - mu for x in group]
    adv = grpo_advantages(scores, k, scale=scale)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(adv.view(-1, k).mean(-1), torch.zeros(3, dtype=F64),
                               rtol=0, atol=1e-12)
