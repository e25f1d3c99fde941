"""alignkit.models.lora: LoRA through PEFT, merged == unmerged, adapters off == base."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignkit.config.schema import LoraConfig, ModelConfig
from alignkit.errors import AlignkitError
from alignkit.models.load import load_causal_lm, save_model
from alignkit.models.lora import (adapters_disabled, apply_lora, is_peft, merge_lora,
                                  trainable_parameters)

IDS = torch.tensor([[1, 40, 50, 60, 70, 2], [1, 41, 51, 61, 71, 81]])
LORA = LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def perturbed_lora(model, cfg=LORA, seed=1):
    """A LoRA model whose adapters change the output (B starts at zero, so LoRA starts as a no-op)."""
    peft_model = apply_lora(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return peft_model.eval()


def test_disabled_returns_the_model_itself(tiny):
    model = tiny[0]
    assert apply_lora(model, LoraConfig(enabled=False)) is model
    assert not is_peft(model)


def test_only_adapters_train_and_start_as_a_no_op(tiny):
    model, _ = tiny
    before = logits(model)
    _, total_before = trainable_parameters(model)
    peft_model = apply_lora(model, LORA)
    assert is_peft(peft_model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    trainable, total = trainable_parameters(peft_model)
    assert trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert total == total_before + trainable
    # "all-linear": the 7 projections of each of the 2 layers, not the LM head.
    assert {n.split(".lora_")[0].split(".")[-1] for n in names} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n in names)
    assert torch.equal(logits(peft_model), before)


def test_named_target_modules(tiny):
    peft_model = apply_lora(tiny[0], LoraConfig(enabled=True, r=2, target_modules=["q_proj", "v_proj"]))
    targets = {n.split(".lora_")[0].split(".")[-1]
               for n, p in peft_model.named_parameters() if p.requires_grad}
    assert targets == {"q_proj", "v_proj"}


def test_merged_equals_unmerged(tiny):
    peft_model = perturbed_lora(tiny[0])
    unmerged = logits(peft_model)
    merged = merge_lora(peft_model)
    assert not is_peft(merged)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged), unmerged, rtol=0, atol=1e-5)
    assert is_peft(peft_model)  # merging worked on a copy
    assert torch.equal(logits(peft_model), unmerged)


def test_adapters_disabled_is_exactly_the_base(tiny):
    base = logits(tiny[0])
    peft_model = perturbed_lora(tiny[0])
    with_adapters = logits(peft_model)
    assert not torch.allclose(with_adapters, base)
    with adapters_disabled(peft_model) as reference:
        assert torch.equal(logits(reference), base)
    assert torch.equal(logits(peft_model), with_adapters)  # back on afterwards
    with pytest.raises(RuntimeError), adapters_disabled(peft_model):
        raise RuntimeError("boom")
    assert torch.equal(logits(peft_model), with_adapters)  # back on after an error too


def test_adapters_disabled_needs_peft(tiny):
    with pytest.raises(ValueError):
        with adapters_disabled(tiny[0]):
            pass
    with pytest.raises(ValueError):
        merge_lora(tiny[0])


def test_applying_lora_twice_is_refused(tiny):
    with pytest.raises(AlignkitError, match="already has a LoRA adapter"):
        apply_lora(apply_lora(tiny[0], LORA), LORA)


def test_save_model_writes_adapter_and_merged_model(tmp_path):
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path="tiny"))
    peft_model = perturbed_lora(model)
    expected = logits(peft_model)
    out = tmp_path / "sft"
    save_model(peft_model, tokenizer, out)
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # The folder itself is a plain merged model that transformers loads without peft.
    merged = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-5)
    assert is_peft(peft_model) and torch.equal(logits(peft_model), expected)  # not mutated
    # The adapter folder loads back as a trainable PeftModel over its recorded base ("tiny").
    again, tok = load_causal_lm(ModelConfig(name_or_path=str(out / "adapter")))
    assert is_peft(again) and trainable_parameters(again)[0] > 0
    assert torch.equal(logits(again), expected)
    assert tok.eos_token == "<|im_end|>"


def test_save_model_without_merging(tmp_path):
    model, tokenizer = load_causal_lm(ModelConfig(name_or_path="tiny"))
    peft_model = perturbed_lora(model)
    save_model(peft_model, tokenizer, tmp_path / "m", merge_lora=False)
    assert not (tmp_path / "m" / "config.json").exists()
    again, _ = load_causal_lm(ModelConfig(name_or_path=str(tmp_path / "m")))
    assert is_peft(again)
    assert torch.equal(logits(again), logits(peft_model))
