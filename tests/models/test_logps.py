"""alignkit.models.logps: the head-on-targets-only sum equals the full-logits reference."""

from __future__ import annotations

import torch

from alignkit.config.schema import LoraConfig
from alignkit.losses.logprobs import naive_sequence_logps
from alignkit.models.logps import sequence_logps
from alignkit.models.lora import adapters_disabled, apply_lora


def ragged_batch():
    """Three right-padded rows of different lengths; targets start after a short "prompt".

    Row 0: 9 tokens, targets 4..8 (5); row 1: 6 tokens, targets 2..5 (4); row 2: 12 tokens,
    targets 7..11 (5). Padding (id 0) and prompt tokens are never targets.
    """
    gen = torch.Generator().manual_seed(3)
    lengths, starts = [9, 6, 12], [4, 2, 7]
    ids = torch.zeros(3, 12, dtype=torch.long)
    attn = torch.zeros(3, 12, dtype=torch.long)
    mask = torch.zeros(3, 12, dtype=torch.bool)
    for r, (n, s) in enumerate(zip(lengths, starts)):
        ids[r, :n] = torch.randint(3, 259, (n,), generator=gen)
        attn[r, :n] = 1
        mask[r, s:n] = True
    return ids, attn, mask


def test_equals_naive_on_full_logits(tiny):
    model, _ = tiny
    ids, attn, mask = ragged_batch()
    with torch.no_grad():
        out = sequence_logps(model, ids, attn, mask)
        full = model(input_ids=ids, attention_mask=attn).logits  # (3, 12, V)
    want = naive_sequence_logps(full, ids, mask)
    assert out.logps.dtype == torch.float32
    torch.testing.assert_close(out.logps, want, rtol=0, atol=1e-5)
    assert out.n_tokens.tolist() == [5, 4, 5]
    assert (out.logps < 0).all()


def test_row_without_targets_is_zero_and_rows_are_independent(tiny):
    model, _ = tiny
    ids, attn, mask = ragged_batch()
    mask[1] = False
    with torch.no_grad():
        out = sequence_logps(model, ids, attn, mask)
        alone = sequence_logps(model, ids[2:], attn[2:], mask[2:])
    assert out.logps[1] == 0 and out.n_tokens[1] == 0
    # right padding: a row's value does not depend on its neighbours (up to kernel rounding)
    torch.testing.assert_close(out.logps[2:], alone.logps, rtol=0, atol=1e-5)


def test_gradient_flows_and_works_through_peft(tiny):
    model, _ = tiny
    ids, attn, mask = ragged_batch()
    with torch.no_grad():
        base = sequence_logps(model, ids, attn, mask).logps
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    out = sequence_logps(peft_model, ids, attn, mask)
    out.logps.sum().backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not torch.allclose(out.logps.detach(), base, atol=1e-4)
    with torch.no_grad(), adapters_disabled(peft_model):
        off = sequence_logps(peft_model, ids, attn, mask).logps
    torch.testing.assert_close(off, base, rtol=0, atol=1e-6)


def test_under_bf16_autocast_sums_in_fp32(tiny):
    model, _ = tiny
    ids, attn, mask = ragged_batch()
    with torch.no_grad():
        exact = sequence_logps(model, ids, attn, mask).logps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = sequence_logps(model, ids, attn, mask).logps
    assert low.dtype == torch.float32
    # bf16 matmuls: ~3 significant digits per logit; 5 tokens of ~ -5.6 each
    torch.testing.assert_close(low, exact, rtol=2e-2, atol=0.2)
