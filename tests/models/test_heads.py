"""alignkit.models.heads: the reward read at the last real token, padding-invariant, saved so
that Hugging Face's own forward agrees (also when the tokenizer pads with EOS), LoRA merged."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from alignkit.config.schema import LoraConfig, ModelConfig
from alignkit.errors import InputError
from alignkit.models.heads import (apply_reward_lora, last_token_index, load_reward_model,
                                   reward_scores, save_reward_model)
from alignkit.models.load import save_model
from alignkit.models.lora import is_peft
from alignkit.models.tiny import tiny_model, tiny_tokenizer

EOS = 2  # the tiny tokenizer's <|im_end|>
# Right padded with id 0; the rows end with EOS at positions 3, 5 and 4.
IDS = torch.tensor([[1, 40, 50, EOS, 0, 0], [1, 41, 51, 61, 71, EOS], [1, 42, 52, 62, EOS, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])
TEXTS = ["Hello there<|im_end|>", "Hi<|im_end|>", "A longer answer, still short.<|im_end|>"]


@pytest.fixture
def rm():
    torch.manual_seed(0)
    model, tokenizer = load_reward_model(ModelConfig(name_or_path="tiny"))
    return model, tokenizer


def test_last_token_index_right_and_left_padding():
    assert last_token_index(MASK).tolist() == [3, 5, 4]
    assert last_token_index(torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])).tolist() == [3, 0]


def test_reward_scores_read_the_last_real_token(rm):
    model, _ = rm
    with torch.no_grad():
        got = reward_scores(model, IDS, MASK)
        hidden = model.model(input_ids=IDS, attention_mask=MASK).last_hidden_state  # (3, 6, H)
        manual = model.score(hidden[[0, 1, 2], [3, 5, 4]]).squeeze(-1)
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, manual, rtol=0, atol=1e-7)


def test_right_padding_does_not_change_a_rows_score(rm):
    model, _ = rm
    with torch.no_grad():
        batch = reward_scores(model, IDS, MASK)
        alone = torch.stack([reward_scores(model, IDS[i:i + 1, :n], MASK[i:i + 1, :n])[0]
                             for i, n in enumerate([4, 6, 5])])
        extra = torch.cat([IDS, torch.full((3, 7), 0)], 1), torch.cat([MASK, torch.zeros(3, 7,
                                                                      dtype=torch.long)], 1)
        wider = reward_scores(model, *extra)
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-6)
    torch.testing.assert_close(batch, wider, rtol=0, atol=1e-6)


def test_trunk_is_the_lm_and_head_is_small_and_seeded(rm):
    model, tokenizer = rm
    lm = tiny_model(seed=0).state_dict()
    trunk = model.model.state_dict()
    assert all(torch.equal(v, lm["model." + k]) for k, v in trunk.items() if "rotary" not in k)
    w = model.score.weight
    assert w.shape == (1, 64) and model.config.num_labels == 1
    # N(0, 1/(H+1)) with H = 64: the sample std of 64 draws is within ~35% of 1/sqrt(65).
    assert abs(w.std().item() * math.sqrt(65) - 1) < 0.35
    torch.manual_seed(0)
    again, _ = load_reward_model(ModelConfig(name_or_path="tiny"))
    assert torch.equal(again.score.weight, w)
    assert tokenizer.pad_token_id == model.config.pad_token_id == 0 != EOS


def _pad_is_eos_folder(tmp_path):
    """The tiny LM saved with a tokenizer that pads with EOS, as SmolLM2's does."""
    tok = tiny_tokenizer()
    tok.pad_token = tok.eos_token
    lm = tiny_model(seed=0)
    lm.config.pad_token_id = EOS
    folder = tmp_path / "lm"
    save_model(lm, tok, folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token_id == EOS
    return folder


def test_saved_model_gives_hf_forward_the_same_scores_when_pad_was_eos(tmp_path):
    torch.manual_seed(0)
    folder = _pad_is_eos_folder(tmp_path)
    model, tokenizer = load_reward_model(ModelConfig(name_or_path=str(folder)))
    assert tokenizer.pad_token == "<|endoftext|>" and model.config.pad_token_id == 0
    out = tmp_path / "rm"
    save_reward_model(model, tokenizer, out)

    hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    assert (enc["input_ids"][enc["attention_mask"].bool()] == 0).sum() == 0  # pad ≠ any real token
    with torch.no_grad():
        hf_scores = hf(**enc).logits.squeeze(-1)
        ours = reward_scores(model, enc["input_ids"], enc["attention_mask"])
        reloaded = reward_scores(hf, enc["input_ids"], enc["attention_mask"])
        # The bug this guards against: with pad == EOS, HF scores the token before the EOS.
        hf.config.pad_token_id = EOS
        wrong = hf(**enc).logits.squeeze(-1)
    torch.testing.assert_close(hf_scores, ours, rtol=0, atol=1e-5)  # SDPA there, eager here
    torch.testing.assert_close(reloaded, ours, rtol=0, atol=1e-5)
    assert (wrong - ours).abs().min() > 1e-4


def test_a_saved_reward_model_loads_as_is_and_require_head(rm, tmp_path):
    model, tokenizer = rm
    out = tmp_path / "rm"
    save_reward_model(model, tokenizer, out)
    torch.manual_seed(123)  # a fresh head would differ: the saved one must be kept
    again, _ = load_reward_model(ModelConfig(name_or_path=str(out)), require_head=True)
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(again, IDS, MASK), reward_scores(model, IDS, MASK),
                                   rtol=0, atol=1e-6)
    with pytest.raises(InputError, match="not a reward model"):
        load_reward_model(ModelConfig(name_or_path="tiny"), require_head=True)


def test_lora_trains_adapters_and_the_whole_head_and_saves_merged(rm, tmp_path):
    model, tokenizer = rm
    peft_model = apply_reward_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    assert is_peft(peft_model)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    heads = [n for n in names if "score" in n]
    assert heads and all("modules_to_save" in n and "lora_" not in n for n in heads)
    assert all("lora_" in n for n in names if n not in heads)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # make the adapters and the head differ from the start
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        expected = reward_scores(peft_model, IDS, MASK)
    save_reward_model(peft_model, tokenizer, tmp_path / "rm")
    assert is_peft(peft_model)  # merged on a copy
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reward_scores(merged, IDS, MASK), expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=IDS, attention_mask=MASK).logits.squeeze(-1),
                                   expected, rtol=0, atol=1e-5)
