"""Prefix sharing (alignkit.models.logps.shared_prefix_logps, collate_pairs_shared): one sequence
[prompt | chosen | rejected] gives the log-probs, token counts and gradients of the two plain
rows, in eager and SDPA attention, through LoRA, under bf16 autocast, and in whole DPO runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.config import DPOConfig, build_config
from alignkit.config.schema import LoraConfig
from alignkit.data.preference import (EncodedPair, EncodedRanked, collate_pairs,
                                      collate_pairs_shared, collate_ranked,
                                      collate_ranked_shared)
from alignkit.engine.loop import cxx_compiler
from alignkit.engine.metrics import read_metrics
from alignkit.models import reference as ref_mod
from alignkit.models.logps import batch_logps
from alignkit.models.lora import apply_lora
from alignkit.models.reference import AdaptersDisabled
from alignkit.models.tiny import tiny_model
from alignkit.stages import dpo

ATTN = ("eager", "sdpa")


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 259, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ragged_pairs() -> list[EncodedPair]:
    """Prompts of 7, 2, 11 and 4 tokens; a 1-token chosen and a 1-token rejected; pair 0's
    replies start with the same token (so rejected's first target must come from the prompt,
    not from chosen); the lengths differ, so rows are padded."""
    return [EncodedPair(ids(7, 0), [40] + ids(4, 1), [40] + ids(2, 2)),
            EncodedPair(ids(2, 3), [17], ids(9, 4)),
            EncodedPair(ids(11, 5), ids(3, 6), [99]),
            EncodedPair(ids(4, 7), ids(6, 8), ids(5, 9))]


def model_for(attn: str, **kw):
    model = tiny_model(seed=0, **kw).eval()
    model.set_attn_implementation(attn)
    return model


def test_layout_of_one_pair():
    """prompt (10, 11, 12), chosen (20, 21), rejected (30,), padded to 8 columns."""
    t = collate_pairs_shared([EncodedPair([10, 11, 12], [20, 21], [30], margin=0.5)],
                             pad_id=0, pad_to_multiple_of=8)
    assert t["input_ids"].tolist() == [[10, 11, 12, 20, 21, 30, 0, 0]]
    assert t["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 0, 0]]  # rejected restarts at P = 3
    assert t["attention_mask"].shape == (1, 1, 8, 8)
    assert t["attention_mask"][0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen: the prompt and itself
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected: the prompt and itself, never chosen
        [0, 0, 0, 0, 0, 0, 1, 0],  # padding: itself alone (no empty softmax row)
        [0, 0, 0, 0, 0, 0, 0, 1]]
    # targets 20, 21 from columns 2, 3; 30 from column 2 (the last prompt token) as well
    assert t["target_index"].tolist() == [3, 4, 5]
    assert t["source_index"].tolist() == [2, 3, 2]
    assert t["target_row"].tolist() == [0, 0, 1] and t["n_tokens"].tolist() == [2, 1]
    assert t["last_index"].tolist() == [4, 5]  # where a reward head reads each reply
    # second row: an empty reply ends at the prompt's last token, as its plain row does
    two = collate_pairs_shared([EncodedPair([10, 11, 12], [20, 21], [30]),
                                EncodedPair([13, 14], [], [31, 32])], pad_id=0)
    assert two["input_ids"].shape == (2, 6)
    assert two["last_index"].tolist() == [4, 6 + 1, 5, 6 + 3]
    assert t["margin"].tolist() == [0.5] and t["label"].tolist() == [1.0]
    assert t["has_label"].tolist() == [False]
    with pytest.raises(ValueError, match="non-empty prompt"):
        collate_pairs_shared([EncodedPair([], [20], [30])], pad_id=0)


@pytest.mark.parametrize("attn", ATTN)
def test_shared_equals_plain_rows(attn):
    model, pairs = model_for(attn), ragged_pairs()
    with torch.no_grad():
        plain = batch_logps(model, collate_pairs(pairs, pad_id=0))
        shared = batch_logps(model, collate_pairs_shared(pairs, pad_id=0, pad_to_multiple_of=8))
    assert shared.n_tokens.tolist() == plain.n_tokens.tolist() == [5, 1, 3, 6, 3, 9, 1, 5]
    torch.testing.assert_close(shared.logps, plain.logps, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn", ATTN)
def test_rejected_never_sees_chosen(attn):
    """Another chosen reply changes chosen's log-prob and leaves rejected's alone."""
    model, pairs = model_for(attn), ragged_pairs()[:2]
    other = [EncodedPair(p.prompt_ids, ids(len(p.chosen_ids), 50 + i), p.rejected_ids)
             for i, p in enumerate(pairs)]
    with torch.no_grad():
        a, b = (batch_logps(model, collate_pairs_shared(x, pad_id=0)).logps
                for x in (pairs, other))
    assert (a[:2] - b[:2]).abs().min() > 1e-2  # chosen rows moved
    torch.testing.assert_close(a[2:], b[2:], rtol=0, atol=1e-5)


def test_ranked_lists_shared_equal_plain():
    """Lists of 3 and 2 completions in one sequence each, rows list by list as collate_ranked."""
    lists = [EncodedRanked(ids(5, 20), [ids(3, 21), [7], ids(6, 22)]),
             EncodedRanked(ids(9, 23), [ids(2, 24), ids(4, 25)])]
    model = model_for("eager")
    with torch.no_grad():
        plain = batch_logps(model, collate_ranked(lists, pad_id=0))
        shared_batch = collate_ranked_shared(lists, pad_id=0)
        shared = batch_logps(model, shared_batch)
    assert shared.n_tokens.tolist() == plain.n_tokens.tolist() == [3, 1, 6, 2, 4]
    torch.testing.assert_close(shared.logps, plain.logps, rtol=0, atol=1e-5)
    assert shared_batch["list_index"].tolist() == [0, 0, 0, 1, 1]


def perturbed_lora(attn: str):
    """A LoRA model whose adapters already change the outputs (B ≠ 0), so the policy differs
    from its adapters-disabled reference and every LoRA matrix gets a gradient."""
    model = apply_lora(model_for(attn), LoraConfig(enabled=True, r=2, alpha=4, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.train()


@pytest.mark.parametrize("attn", ATTN)
def test_lora_dpo_gradients_equal_plain(attn):
    model, pairs = perturbed_lora(attn), ragged_pairs()
    loss_module = dpo.PairDPOLoss(model, AdaptersDisabled(model), DPOConfig(beta=0.5))
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    results = []
    for batch in (collate_pairs(pairs, pad_id=0), collate_pairs_shared(pairs, pad_id=0)):
        model.zero_grad()
        loss, metrics = loss_module(**{k: v for k, v in batch.items()
                                       if k not in ("margin", "label", "has_label")})
        loss.backward()
        results.append((loss.detach(), metrics, {n: p.grad.clone() for n, p in trainable}))
    (loss_a, m_a, g_a), (loss_b, m_b, g_b) = results
    assert abs(m_a["rewards/margins"].item()) > 1e-3  # the adapters matter: not the h = 0 case
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-5)
    for key in m_a:
        torch.testing.assert_close(m_b[key], m_a[key], rtol=0, atol=1e-5)
    assert all(g.abs().max() > 0 for g in g_a.values())
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("attn", ATTN)
def test_bf16_autocast_agrees(attn):
    """Under bf16 autocast both paths round differently; they agree to 1e-3 of the sequence
    log-prob (measured on the tiny model: 0 with eager, 2e-6 with SDPA), far inside bf16's own
    error against fp32 (6e-5 here, and one bf16 rounding is 4e-3 relative)."""
    model, pairs = model_for(attn), ragged_pairs()
    with torch.no_grad():
        fp32 = batch_logps(model, collate_pairs(pairs, pad_id=0)).logps
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = batch_logps(model, collate_pairs(pairs, pad_id=0)).logps
            shared = batch_logps(model, collate_pairs_shared(pairs, pad_id=0)).logps
    assert not torch.equal(plain, fp32)  # autocast did run in bf16
    assert ((shared - plain).abs() / plain.abs()).max() < 1e-3


# ---------------------------------------------------------------------------------------------
# DPO runs: on and off train the same


PAIRS = [{"prompt": f"Add {a} and {b}.", "chosen": f"{a} plus {b} is {a + b}.",
          "rejected": "No."} for a in range(4) for b in range(4)]  # 16 pairs
RANKED = [{"prompt": f"Name the number {n}.", "responses": ["No.", f"It is {n}.", "Maybe."],
           "ranking": [1, 2, 0]} for n in range(8)]  # 8 lists of 3


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "reference_logps"


def run_dpo(tmp_path: Path, records: list[dict], name: str, **over) -> Path:
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    base = {"model.name_or_path": "tiny", "data.path": str(data), "output": str(tmp_path / name),
            "train.batch_size": 4, "train.lr": 2e-3, "train.max_steps": 4, "beta": 0.5,
            "train.precision": "fp32", "train.progress": False, "train.warmup_steps": 0,
            "train.schedule": "constant", "data.eval_fraction": 0.25, "train.num_threads": 1}
    return dpo.run(build_config(DPOConfig, overrides=base | over), log=lambda *_: None)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_dpo_run_on_equals_off(tmp_path, cache, loss_type):
    """sigmoid with the default (precomputed) reference, and the reference-free simpo, whose
    loss reads the token counts: same losses step by step. Each layout keeps its own reference
    cache entry, and the two tables agree."""
    outs = {mode: run_dpo(tmp_path, PAIRS, mode, loss_type=loss_type, prefix_sharing=mode)
            for mode in ("off", "on")}
    on, off = losses(outs["on"]), losses(outs["off"])
    assert len(on) == 4 and all(math.isfinite(x) for x in on)
    assert on == pytest.approx(off, rel=0, abs=1e-5)
    assert on[-1] != pytest.approx(on[0], abs=1e-3)  # it trained
    for mode, out in outs.items():
        report = json.loads((out / "data_report.json").read_text())
        assert report["prefix_sharing"] is (mode == "on")
    if loss_type == "sigmoid":
        from safetensors.torch import load_file
        tables = [load_file(str(p)) for p in sorted(cache.iterdir())]
        assert len(tables) == 2  # one per layout
        for split in ("train", "eval"):
            torch.testing.assert_close(tables[0][split], tables[1][split], rtol=0, atol=1e-5)


def test_plackett_luce_run_on_equals_off(tmp_path):
    """auto keeps ranked lists plain; on shares their prompt across the K completions."""
    over = {"ranked_loss": "plackett_luce", "reference": "copy"}
    off = losses(run_dpo(tmp_path, RANKED, "auto", **over))
    on = losses(run_dpo(tmp_path, RANKED, "on", prefix_sharing="on", **over))
    assert off[0] == pytest.approx(math.log(6), abs=1e-5)  # K = 3 equal rewards: ln 3! per list
    assert on == pytest.approx(off, rel=0, abs=1e-5)
    assert dpo.prefix_sharing(DPOConfig(), ranked=True) is False
    assert dpo.prefix_sharing(DPOConfig(), ranked=False) is True
    assert dpo.prefix_sharing(DPOConfig(prefix_sharing="off"), ranked=False) is False


def test_precompute_batches_by_shared_width():
    """Training rows are precomputed longest first by the width of the sequence the layout
    builds: P + C + R shared, P + max(C, R) plain; tokens count the prompt once when shared."""
    pairs = [EncodedPair([1] * 6, [2], [3]), EncodedPair([1], [2] * 4, [3] * 4)]
    plain = dpo.PreferenceRows(pairs, pairs, pad_id=0, ranked=False)
    shared = dpo.PreferenceRows(pairs, pairs, pad_id=0, ranked=False, shared=True)
    assert ref_mod._length_order(plain, "train") == [0, 1]  # 7 vs 5
    assert ref_mod._length_order(shared, "train") == [1, 0]  # 9 vs 8
    assert plain.tokens([0, 1], "train") == 14 + 10
    assert shared.tokens([0, 1], "train") == 8 + 9


@pytest.mark.skipif(cxx_compiler() is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_layers_take_the_shared_layout(tmp_path):
    """train.compile with prefix-shared pairs (a 4-D mask, two position runs per sequence):
    the same losses as the eager run, within fp32 kernel rounding."""
    eager = losses(run_dpo(tmp_path, PAIRS, "eager", loss_type="simpo"))
    comp = losses(run_dpo(tmp_path, PAIRS, "compiled", loss_type="simpo",
                          **{"train.compile": True}))
    assert comp == pytest.approx(eager, rel=1e-4)
