import json

import pytest

from alignkit.eval.preference import implicit_reward_accuracy, reward_model_accuracy


@pytest.fixture
def pairs(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f"A careful answer {i}.",
             "rejected": f"no {i * 7}"} for i in range(12)]
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("".join(json.dumps(r | {"chosen": r["rejected"], "rejected": r["chosen"]})
                               + "\n" for r in rows))
    return p, swapped


def test_policy_equal_to_reference_has_zero_implicit_rewards(pairs, tmp_path):
    from alignkit.config.schema import ModelConfig
    from alignkit.models.load import load_causal_lm, save_model
    m, tok = load_causal_lm(ModelConfig(name_or_path="tiny"))
    save_model(m, tok, tmp_path / "policy")
    out = implicit_reward_accuracy(str(tmp_path / "policy"), "tiny", str(pairs[0]),
                                   template="inst", batch_size=5)
    # log π − log π_ref = 0 for every response: margins 0, and ties count as wrong
    assert out["pairs"] == 12 and out["accuracy"] == 0.0 and out["margin"] == 0.0
    assert out["ties"] == 12


def test_reward_model_accuracy_flips_when_sides_swap(pairs, tmp_path):
    import torch
    from alignkit.config.schema import ModelConfig
    from alignkit.models.heads import load_reward_model, save_reward_model
    torch.manual_seed(3)
    rm, tok = load_reward_model(ModelConfig(name_or_path="tiny"))
    save_reward_model(rm, tok, tmp_path / "rm")
    a = reward_model_accuracy(str(tmp_path / "rm"), str(pairs[0]), template="inst", batch_size=4)
    b = reward_model_accuracy(str(tmp_path / "rm"), str(pairs[1]), template="inst", batch_size=7)
    assert a["pairs"] == b["pairs"] == 12
    assert a["ties"] == b["ties"] == 0
    assert a["accuracy"] + b["accuracy"] == pytest.approx(1.0)
    assert a["margin"] == pytest.approx(-b["margin"], abs=1e-5)
