"""alignkit.models.generate: our batched KV-cache sampler against transformers and a full forward."""

from __future__ import annotations

import pytest
import torch

from alignkit.config.schema import LoraConfig
from alignkit.models.generate import Generation, generate, nucleus
from alignkit.models.lora import apply_lora, merge_lora

TEXTS = ["hello", "a much longer prompt, with more tokens", "x", "mid-sized one", "ok then"]


@pytest.fixture
def setup(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer.encode(t) for t in TEXTS]
    # The random tiny model rarely emits EOS; stop at a token it does produce, so rows finish at
    # different steps and the batch has to keep finished rows padded.
    stop = generate(model, tokenizer, prompts[:1], max_new_tokens=8)[0].completion_ids[2]
    return model, tokenizer, prompts, stop


def hf_greedy(model, tokenizer, prompts, max_new_tokens, stop):
    """transformers' own greedy search on a left-padded batch, cut at the first stop token."""
    tokenizer.padding_side = "left"
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=[stop])
    rows = out[:, batch["input_ids"].shape[1]:].tolist()
    return [row[:row.index(stop) + 1] if stop in row else row for row in rows]


def test_greedy_matches_transformers(setup):
    model, tokenizer, prompts, stop = setup
    ours = generate(model, tokenizer, prompts, max_new_tokens=12, stop_token_ids=[stop], batch_size=8)
    ours_ids = [g.completion_ids for g in ours]
    assert ours_ids == hf_greedy(model, tokenizer, prompts, 12, stop)
    assert ours_ids == [hf_greedy(model, tokenizer, [p], 12, stop)[0] for p in prompts]
    finished = [g.finished for g in ours]
    assert any(finished) and not all(finished)  # the test covers both kinds of rows
    for g in ours:
        assert len(g.completion_ids) == (g.completion_ids.index(stop) + 1 if g.finished else 12)


def test_results_in_input_order_and_batch_size_invariant(setup):
    model, tokenizer, prompts, stop = setup
    runs = [generate(model, tokenizer, prompts, max_new_tokens=10, stop_token_ids=[stop],
                     batch_size=b) for b in (1, 2, 8)]
    for gens in runs:
        assert [g.prompt_ids for g in gens] == prompts
        assert all(isinstance(g, Generation) for g in gens)
    assert [g.completion_ids for g in runs[0]] == [g.completion_ids for g in runs[1]]
    assert [g.completion_ids for g in runs[0]] == [g.completion_ids for g in runs[2]]


def test_stop_token_in_ids_not_in_text(setup):
    model, tokenizer, prompts, stop = setup
    [g] = generate(model, tokenizer, prompts[:1], max_new_tokens=8, stop_token_ids=[stop])
    assert g.finished and g.completion_ids[-1] == stop and stop not in g.completion_ids[:-1]
    assert g.text == tokenizer.decode(g.completion_ids[:-1])
    [g] = generate(model, tokenizer, prompts[:1], max_new_tokens=5, stop_token_ids=[])
    assert not g.finished and len(g.completion_ids) == 5
    [g] = generate(model, tokenizer, prompts[:1], max_new_tokens=0)
    assert g.completion_ids == [] and g.text == "" and not g.finished


def favour(model, token_id: int):
    """Make ``token_id`` the model's every greedy choice (a large bias on the LM head's output)."""
    bias = torch.zeros(model.config.vocab_size)
    bias[token_id] = 100.0
    return model.lm_head.register_forward_hook(lambda module, args, out: out + bias)


def test_default_stops_are_eos_and_generation_config_eos(tiny):
    model, tokenizer = tiny
    hook = favour(model, tokenizer.eos_token_id)
    [g] = generate(model, tokenizer, [[1, 40]], max_new_tokens=5)
    assert g.completion_ids == [2] and g.finished and g.text == ""
    [g] = generate(model, tokenizer, [[1, 40]], max_new_tokens=5, stop_token_ids=[])
    assert g.completion_ids == [2] * 5 and not g.finished
    hook.remove()
    favour(model, 7)
    model.generation_config.eos_token_id = [7, 2]
    [g] = generate(model, tokenizer, [[1, 40]], max_new_tokens=5)
    assert g.completion_ids == [7] and g.finished


def test_sampling_is_reproducible(setup):
    model, tokenizer, prompts, _ = setup
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, batch_size=2, stop_token_ids=[])
    first = generate(model, tokenizer, prompts, seed=3, **kwargs)
    again = generate(model, tokenizer, prompts, seed=3, **kwargs)
    other = generate(model, tokenizer, prompts, seed=4, **kwargs)
    assert [g.completion_ids for g in first] == [g.completion_ids for g in again]
    assert [g.completion_ids for g in first] != [g.completion_ids for g in other]


def test_tiny_top_p_is_greedy(setup):
    model, tokenizer, prompts, _ = setup
    greedy = generate(model, tokenizer, prompts, max_new_tokens=8, stop_token_ids=[])
    nucleus_of_one = generate(model, tokenizer, prompts, max_new_tokens=8, temperature=1.5,
                              top_p=1e-6, stop_token_ids=[])
    assert [g.completion_ids for g in nucleus_of_one] == [g.completion_ids for g in greedy]


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    probs = torch.tensor([[0.1, 0.5, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]])
    # Row 0 sorted: 0.5, 0.2, 0.2, 0.1 -> cumulative 0.5, 0.7, 0.9: top_p 0.7 keeps the first two
    # (mass above the third is 0.7 >= 0.7). Which 0.2 survives is the sort's tie-break: either.
    kept = nucleus(probs, 0.7)
    assert kept[0, 1] == 0.5 and kept[0, 0] == 0 and (kept[0, 2:] > 0).sum() == 1
    # Row 1: 0.25 each; mass above the 3rd is 0.5 < 0.7 (kept), above the 4th 0.75 (dropped).
    assert (kept[1] > 0).sum() == 3
    assert torch.equal(nucleus(probs, 1.0), probs)


def test_logps_and_entropies_equal_a_full_forward(setup):
    # both of the raw (temperature 1, no top-p) distribution, whatever sampled the token
    model, tokenizer, prompts, _ = setup
    gens = generate(model, tokenizer, prompts, max_new_tokens=6, temperature=0.8, top_p=0.9,
                    batch_size=3, return_logps=True, return_entropy=True, stop_token_ids=[])
    for g in gens:
        ids = torch.tensor([g.prompt_ids + g.completion_ids])
        with torch.no_grad():
            logps = torch.log_softmax(model(ids).logits[0].float(), dim=-1)  # (T, V)
        n = len(g.prompt_ids)
        positions = torch.arange(n - 1, n - 1 + len(g.completion_ids))
        expected = logps[positions, torch.tensor(g.completion_ids)]
        assert len(g.logps) == len(g.entropies) == len(g.completion_ids)
        torch.testing.assert_close(torch.tensor(g.logps), expected, rtol=0, atol=1e-5)
        entropy = -(logps[positions].exp() * logps[positions]).sum(-1)
        torch.testing.assert_close(torch.tensor(g.entropies), entropy, rtol=0, atol=1e-5)
    plain = generate(model, tokenizer, prompts[:1], max_new_tokens=3)[0]
    assert plain.logps is None and plain.entropies is None and plain.values is None
    only = generate(model, tokenizer, prompts[:1], max_new_tokens=3, return_entropy=True)[0]
    assert only.logps is None and len(only.entropies) == len(only.completion_ids)


def test_value_head_values_equal_a_full_forward_and_change_no_sample(setup):
    # a value head on the trunk (PPO's shared critic): V at the state choosing each token, and
    # the model run as trunk + LM head samples exactly what the whole model samples
    model, tokenizer, prompts, _ = setup
    torch.manual_seed(0)
    head = torch.nn.Linear(model.config.hidden_size, 1)
    kwargs = dict(max_new_tokens=6, temperature=1.0, batch_size=3, seed=4, stop_token_ids=[],
                  return_logps=True)
    with_values = generate(model, tokenizer, prompts, value_head=head, **kwargs)
    plain = generate(model, tokenizer, prompts, **kwargs)
    for g, p in zip(with_values, plain):
        assert g.completion_ids == p.completion_ids
        torch.testing.assert_close(torch.tensor(g.logps), torch.tensor(p.logps), rtol=0,
                                   atol=1e-6)
        ids = torch.tensor([g.prompt_ids + g.completion_ids])
        with torch.no_grad():
            hidden = model.get_decoder()(ids).last_hidden_state[0]  # (T, H)
            n = len(g.prompt_ids)
            expected = head(hidden[n - 1:n - 1 + len(g.completion_ids)]).squeeze(-1)
        assert len(g.values) == len(g.completion_ids)
        torch.testing.assert_close(torch.tensor(g.values), expected, rtol=0, atol=1e-5)


def test_peft_model_and_train_mode_restored(setup):
    model, tokenizer, prompts, stop = setup
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4, dropout=0.5))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.fill_(0.05)
    peft_model.train()
    peft_model.base_model.model.model.layers[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in peft_model.modules()]
    ours = generate(peft_model, tokenizer, prompts, max_new_tokens=8, stop_token_ids=[stop])
    assert [m.training for m in peft_model.modules()] == modes
    merged = merge_lora(peft_model).eval()
    # Dropout was off while generating: the PEFT model generates what its merged copy does.
    assert ([g.completion_ids for g in ours]
            == [g.completion_ids for g in generate(merged, tokenizer, prompts, max_new_tokens=8,
                                                   stop_token_ids=[stop])])


def test_bf16_autocast_runs(setup):
    model, tokenizer, prompts, _ = setup
    gens = generate(model, tokenizer, prompts, max_new_tokens=4, autocast_dtype=torch.bfloat16,
                    return_logps=True, stop_token_ids=[])
    assert all(len(g.completion_ids) == 4 and all(lp <= 0 for lp in g.logps) for g in gens)


def test_bad_arguments(tiny):
    model, tokenizer = tiny
    with pytest.raises(ValueError):
        generate(model, tokenizer, [[]])
    with pytest.raises(ValueError):
        generate(model, tokenizer, [[1]], top_p=0.0)
    with pytest.raises(ValueError):
        generate(model, tokenizer, [[1]], temperature=-1.0)


def test_categorical_draws_follow_the_weights_and_never_pick_a_zero():
    """The inverse-CDF sampler is an exact categorical draw: frequencies over 200k draws
    match the weights within 5 standard errors; zero-weight tokens (first, inner, last) never
    come up; unnormalised weights (a nucleus) give the normalised distribution."""
    from alignkit.models.generate import sample_categorical
    weights = torch.tensor([0.0, 0.1, 0.0, 0.6, 0.25, 0.05, 0.0]) * 3.0  # sums to 3
    n = 200_000
    draws = sample_categorical(weights.expand(n, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=7).double() / n
    p = (weights / weights.sum()).double()
    assert (freq[p == 0] == 0).all()
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all()
    again = sample_categorical(weights.expand(n, -1), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    one_hot = torch.zeros(3, 5)
    one_hot[torch.arange(3), torch.tensor([0, 2, 4])] = 0.5
    assert sample_categorical(one_hot, torch.Generator().manual_seed(1)).tolist() == [0, 2, 4]


def test_a_shared_prompt_runs_once(setup, monkeypatch):
    """Rows with the same prompt (an RL group) prefill it once and copy its cache: greedy rows
    equal the prompt generated alone, sampled rows differ from each other and log-probs match
    a full forward; the prefill forward holds the distinct prompts only."""
    from alignkit.models import generate as gen_module
    model, tokenizer, prompts, stop = setup
    seen = []
    forward = gen_module._Forward.__call__

    def spy(self, input_ids, *a):
        seen.append(tuple(input_ids.shape))
        return forward(self, input_ids, *a)

    monkeypatch.setattr(gen_module._Forward, "__call__", spy)
    group = [prompts[1]] * 3 + [prompts[3]] * 2 + [prompts[0]]
    greedy = generate(model, tokenizer, group, max_new_tokens=6, stop_token_ids=[stop],
                      batch_size=8)
    assert seen[0] == (3, len(prompts[1]))  # three distinct prompts, left padded to the longest
    alone = {i: generate(model, tokenizer, [prompts[i]], max_new_tokens=6,
                         stop_token_ids=[stop])[0].completion_ids for i in (0, 1, 3)}
    assert [g.completion_ids for g in greedy] == [alone[i] for i in (1, 1, 1, 3, 3, 0)]
    sampled = generate(model, tokenizer, [prompts[2]] * 4, max_new_tokens=8, temperature=1.0,
                       stop_token_ids=[], seed=5, return_logps=True)
    assert len({tuple(g.completion_ids) for g in sampled}) > 1
    for g in sampled:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([g.prompt_ids + g.completion_ids])).logits[0]
        lp = logits[len(g.prompt_ids) - 1:-1].float().log_softmax(-1)
        expected = lp.gather(-1, torch.tensor(g.completion_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(g.logps), expected, atol=1e-4)


def test_a_cache_that_cannot_copy_rows_runs_every_prompt(setup, monkeypatch):
    from alignkit.models import generate as gen_module
    model, tokenizer, prompts, stop = setup
    group = [prompts[1]] * 2 + [prompts[4]]
    shared = generate(model, tokenizer, group, max_new_tokens=6, stop_token_ids=[stop])
    monkeypatch.setattr(gen_module._Forward, "select_rows", lambda self, index: False)
    plain = generate(model, tokenizer, group, max_new_tokens=6, stop_token_ids=[stop])
    assert [g.completion_ids for g in plain] == [g.completion_ids for g in shared]


def test_sampling_with_another_attention_kernel_restores_the_models_own(setup):
    from alignkit.models.generate import attention
    model, tokenizer, prompts, stop = setup
    model.set_attn_implementation("eager")
    try:
        eager = generate(model, tokenizer, prompts, max_new_tokens=8, stop_token_ids=[stop])
        with pytest.raises(RuntimeError):
            with attention(model, "sdpa"):
                assert model.config._attn_implementation == "sdpa"
                assert model.model.layers[0].self_attn.config._attn_implementation == "sdpa"
                raise RuntimeError("boom")
        assert model.config._attn_implementation == "eager"
        sdpa = generate(model, tokenizer, prompts, max_new_tokens=8, stop_token_ids=[stop],
                        attn_implementation="sdpa")
        assert model.config._attn_implementation == "eager"
        # fp32: the two kernels agree to rounding, so greedy picks the same tokens
        assert [g.completion_ids for g in sdpa] == [g.completion_ids for g in eager]
        with attention(model, "no-such-kernel"):  # unsupported: the model keeps its own
            assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
