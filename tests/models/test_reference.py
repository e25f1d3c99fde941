"""alignkit.models.reference: three references that agree, a frozen one that stays frozen, and a
precomputed table that is computed once, cached atomically and keyed by model and data."""

from __future__ import annotations

import pytest
import torch

from alignkit.config.schema import DPOConfig, LoraConfig
from alignkit.engine.device import Runtime
from alignkit.errors import AlignkitError
from alignkit.models import reference as ref_mod
from alignkit.models.logps import sequence_logps
from alignkit.models.lora import apply_lora
from alignkit.models.reference import (AdaptersDisabled, FrozenCopy, Precomputed,
                                       parameter_digest, precomputed_reference, reference_kind)

CPU = Runtime(torch.device("cpu"), None)


class Rows:
    """A RowSource of hand-made pairs: example i = rows 2i (chosen) and 2i+1 (rejected)."""

    def __init__(self, n_train=5, n_eval=2, seed=0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.data = {s: [self._pair(gen) for _ in range(n)]
                     for s, n in (("train", n_train), ("eval", n_eval))}

    @staticmethod
    def _pair(gen):
        prompt = torch.randint(3, 259, (int(torch.randint(2, 6, (1,), generator=gen)),),
                               generator=gen).tolist()
        return [(prompt, torch.randint(3, 259, (int(torch.randint(1, 5, (1,), generator=gen)),),
                                       generator=gen).tolist()) for _ in range(2)]

    def num_examples(self, split):
        return len(self.data[split])

    def num_rows(self, split):
        return 2 * len(self.data[split])

    def fingerprint(self, split):
        return str(self.data[split])

    def model_inputs(self, indices, split):
        seqs = [self.data[split][i][side] for side in (0, 1) for i in indices]  # chosen first
        width = max(len(p) + len(c) for p, c in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros(len(seqs), width, dtype=torch.bool)
        for r, (p, c) in enumerate(seqs):
            ids[r, :len(p) + len(c)] = torch.tensor(p + c)
            attn[r, :len(p) + len(c)] = 1
            mask[r, len(p):len(p) + len(c)] = True
        rows = [2 * i for i in indices] + [2 * i + 1 for i in indices]
        return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask}, torch.tensor(rows)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "reference_logps"


def perturbed_lora(model):
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=2, alpha=4, dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.05)
    return peft_model


def test_reference_kind_resolution():
    lora = {"model": {"lora": {"enabled": True}}}
    assert reference_kind(DPOConfig()) == "precomputed"
    assert reference_kind(DPOConfig(**lora)) == "adapters"
    assert reference_kind(DPOConfig(**lora, reference_model="other")) == "precomputed"
    assert reference_kind(DPOConfig(reference="copy")) == "copy"
    assert reference_kind(DPOConfig(loss_type="simpo", reference="copy")) is None
    with pytest.raises(AlignkitError, match="needs LoRA"):
        reference_kind(DPOConfig(reference="adapters"))
    with pytest.raises(AlignkitError, match="reference_model"):
        reference_kind(DPOConfig(**lora, reference="adapters", reference_model="other"))


def test_adapters_disabled_equals_frozen_copy(tiny):
    model, _ = tiny
    inputs, _ = Rows().model_inputs([0, 1, 2], "train")
    copy = FrozenCopy(model)
    assert not copy.model.training and not any(p.requires_grad for p in copy.model.parameters())
    policy = perturbed_lora(model).train()
    adapters = AdaptersDisabled(policy)
    ref_copy = copy.logps(**inputs)
    ref_off = adapters.logps(**inputs)
    assert policy.training  # the previous mode is restored
    torch.testing.assert_close(ref_off, ref_copy, rtol=0, atol=1e-6)
    assert not ref_off.requires_grad and adapters.batch_inputs(torch.tensor([0]), "train") == {}
    with torch.no_grad():  # the adapters do change the policy, so the test has teeth
        on = sequence_logps(policy, **inputs).logps
    assert (on - ref_copy).abs().max() > 1e-3


def test_adapters_reference_needs_peft(tiny):
    with pytest.raises(AlignkitError, match="LoRA"):
        AdaptersDisabled(tiny[0])


def test_precomputed_equals_live_and_gathers_rows(tiny):
    model, _ = tiny
    rows = Rows()
    ref = precomputed_reference(model, rows, CPU, batch_size=2, log=lambda *_: None)
    assert ref.tables["train"].shape == (10,) and ref.tables["eval"].shape == (4,)
    inputs, batch_rows = rows.model_inputs([3, 0], "train")
    gathered = ref.batch_inputs(batch_rows, "train")["ref_logps"]
    torch.testing.assert_close(gathered, FrozenCopy(model).logps(**inputs), rtol=0, atol=1e-5)
    assert ref.logps(**inputs, ref_logps=gathered) is gathered
    with pytest.raises(ValueError):
        ref.logps(**inputs)


def test_cache_is_written_once_reused_and_keyed_by_model(tiny, cache, monkeypatch):
    model, _ = tiny
    calls = []
    real = ref_mod.compute_tables
    monkeypatch.setattr(ref_mod, "compute_tables", lambda *a, **k: calls.append(1) or real(*a, **k))
    said = []
    first = precomputed_reference(model, Rows(), CPU, batch_size=4, log=said.append)
    second = precomputed_reference(model, Rows(), CPU, batch_size=3, log=said.append)
    assert len(calls) == 1 and "computed" in said[0] and "loaded from the cache" in said[1]
    assert [p.name for p in cache.iterdir()] == [first.path.name]  # no temporary file left
    assert all(torch.equal(first.tables[s], second.tables[s]) for s in ("train", "eval"))
    precomputed_reference(model, Rows(seed=1), CPU, batch_size=4, log=said.append)  # other data
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-3  # another model
    precomputed_reference(model, Rows(), CPU, batch_size=4, log=said.append)
    assert len(calls) == 3 and len(list(cache.iterdir())) == 3


def test_corrupt_cache_file_is_recomputed(tiny, cache):
    model, _ = tiny
    first = precomputed_reference(model, Rows(), CPU, batch_size=4, log=lambda *_: None)
    first.path.write_bytes(b"not safetensors")
    said = []
    again = precomputed_reference(model, Rows(), CPU, batch_size=4, log=said.append)
    assert "computed" in said[0]
    assert isinstance(again, Precomputed) and again.tables["train"].shape == (10,)


def test_ranks_share_the_batches_and_sum_to_the_whole_table(tiny, monkeypatch):
    """Rank r computes batches r, r+W, …; the others' entries stay 0, so the all-reduce sum
    is the full table. (Without a process group all_reduce_sum is the identity, so each
    simulated rank returns its own share.)"""
    model, _ = tiny
    rows = Rows(n_train=7, n_eval=3)
    whole = ref_mod.compute_tables(model, rows, CPU, batch_size=2)
    monkeypatch.setattr(ref_mod.dist, "world_size", lambda: 2)
    shares = []
    for r in (0, 1):
        monkeypatch.setattr(ref_mod.dist, "rank", lambda r=r: r)
        shares.append(ref_mod.compute_tables(model, rows, CPU, batch_size=2))
    for split in ("train", "eval"):
        a, b = shares[0][split], shares[1][split]
        assert not ((a != 0) & (b != 0)).any() and (a != 0).any() and (b != 0).any()
        torch.testing.assert_close(a + b, whole[split], rtol=0, atol=1e-6)


def test_parameter_digest(tiny):
    from alignkit.models.tiny import tiny_model
    model, _ = tiny
    assert parameter_digest(model) == parameter_digest(tiny_model(seed=0))
    assert parameter_digest(model) != parameter_digest(tiny_model(seed=1))
    assert parameter_digest(model) != parameter_digest(tiny_model(seed=0).to(torch.bfloat16))


def test_long_precomputation_reports_progress(tiny):
    model, _ = tiny
    said = []
    quiet = ref_mod.compute_tables(model, Rows(n_train=7, n_eval=3), CPU, batch_size=2)
    loud = ref_mod.compute_tables(model, Rows(n_train=7, n_eval=3), CPU, batch_size=2,
                                  log=said.append, every_s=0.0)
    # every batch is reported when the interval is 0: 4 train batches, 2 eval batches
    assert said[0] == "reference log-probs (train): 1/4 batches" and len(said) == 6
    assert said[-1] == "reference log-probs (eval): 2/2 batches"
    for split in quiet:
        assert torch.equal(quiet[split], loud[split])
