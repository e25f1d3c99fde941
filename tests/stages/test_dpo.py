"""DPO end to end on the tiny model: ln 2 and zero rewards at step 0 whichever reference, the
loss falls and the implicit-reward accuracy rises, the reference never moves, the precomputed
reference is computed once, resume equals an uninterrupted run, every loss type trains, ranked
lists work both ways, and the CLI runs and fails in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config import DPOConfig, build_config
from alignkit.engine.device import Runtime
from alignkit.engine.metrics import read_metrics
from alignkit.errors import AlignkitError
from alignkit.models import reference as ref_mod
from alignkit.stages import dpo

LN2 = math.log(2)
QUIET = {"log": lambda *_: None}
PAIRS = [{"prompt": f"Add {a} and {b}.", "chosen": f"{a} plus {b} is {a + b}.",
          "rejected": "No."} for a in range(6) for b in range(4)]  # 24 pairs
RANKED = [{"prompt": f"Name the number {n}.", "responses": ["No.", f"It is {n}.", "Maybe."],
           "ranking": [1, 2, 0]} for n in range(12)]  # 12 lists of 3, best "It is n."


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "cache"))


def write(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    return write(tmp_path / "pairs.jsonl", PAIRS)


def cfg_for(data, out, **over) -> DPOConfig:
    base = {"model.name_or_path": "tiny", "data.path": str(data), "output": str(out),
            "train.batch_size": 8, "train.lr": 2e-3, "train.max_steps": 8, "beta": 0.5,
            "train.precision": "fp32", "train.progress": False, "train.warmup_steps": 0,
            "train.schedule": "constant", "data.eval_fraction": 0.2, "train.num_threads": 1}
    return build_config(DPOConfig, overrides=base | over)


def train_metrics(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def capture_references(monkeypatch) -> list:
    """Every reference the stage builds, kept for inspection after training."""
    built = []
    real = dpo.build_reference
    monkeypatch.setattr(dpo, "build_reference", lambda *a, **k: built.append(real(*a, **k))
                        or built[-1])
    monkeypatch.setattr(dpo, "AdaptersDisabled",
                        lambda m: built.append(ref_mod.AdaptersDisabled(m)) or built[-1])
    return built


def pristine() -> dict[str, torch.Tensor]:
    from alignkit.models.tiny import tiny_model
    return tiny_model(seed=0).state_dict()


# ---------------------------------------------------------------------------------------------
# Step 0: policy == reference


def test_three_references_agree_at_step_zero(data, tmp_path):
    """Policy = reference ⇒ h = 0 ⇒ loss = −log σ(0) = ln 2 per pair, every reward 0."""
    from alignkit.config.schema import LoraConfig
    from alignkit.models.load import load_tokenizer
    from alignkit.models.lora import apply_lora
    from alignkit.models.tiny import tiny_model
    cfg = cfg_for(data, tmp_path / "unused")
    rows, _ = dpo.preference_rows(cfg, load_tokenizer(cfg.model), lambda *_: None)
    cpu = Runtime(torch.device("cpu"), None)
    full = tiny_model(seed=0)
    lora = apply_lora(tiny_model(seed=0), LoraConfig(enabled=True, r=2))
    refs = {"copy": (full, ref_mod.FrozenCopy(full)),
            "precomputed": (full, ref_mod.precomputed_reference(full, rows, cpu, batch_size=5,
                                                                log=lambda *_: None)),
            "adapters": (lora, ref_mod.AdaptersDisabled(lora))}
    ref_logps = {}
    for kind, (model, reference) in refs.items():
        task = dpo.DPOTask(rows, model.train(), reference, cfg)
        batch = task.collate([4, 0, 7, 3], "train")
        loss, metrics = task.module()(**batch.inputs)
        assert loss.item() / batch.count == pytest.approx(LN2, abs=1e-6), kind
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(metrics[key].item()) < 1e-5, (kind, key)
        ref_logps[kind] = reference.logps(**batch.inputs)
    torch.testing.assert_close(ref_logps["precomputed"], ref_logps["copy"], rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_logps["adapters"], ref_logps["copy"], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Smoke: full fine-tuning with a frozen copy, LoRA with adapters disabled


def test_full_finetune_with_frozen_copy(data, tmp_path, monkeypatch):
    built = capture_references(monkeypatch)
    out = dpo.run(cfg_for(data, tmp_path / "copy", reference="copy"), **QUIET)
    m = train_metrics(out)
    assert m[0]["loss"] == pytest.approx(LN2, abs=1e-6) and m[0]["rewards/accuracies"] == 0
    assert m[-1]["loss"] < 0.5 * LN2 and m[-1]["rewards/accuracies"] == 1.0
    assert m[-1]["rewards/margins"] > 0 and m[-1]["rewards/rejected"] < 0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval/loss" in r]
    assert evals and evals[-1]["eval/rewards/accuracies"] == 1.0
    assert evals[-1]["eval/rewards/margins"] > 0
    start = pristine()
    trained = load_file(str(out / "model.safetensors"))
    assert sum(not torch.equal(trained[k], start[k]) for k in trained) > len(trained) // 2
    (reference,) = built
    assert reference.kind == "copy"
    for name, w in reference.model.state_dict().items():  # the copy never moved
        assert torch.equal(w, start[name]), name
    assert json.loads((out / "data_report.json").read_text())["reference"] == "copy"


def test_lora_with_adapters_disabled(data, tmp_path, monkeypatch):
    built = capture_references(monkeypatch)
    cfg = cfg_for(data, tmp_path / "lora", **{"model.lora.enabled": True, "model.lora.r": 4,
                                              "model.lora.dropout": 0.0, "train.lr": 2e-2})
    out = dpo.run(cfg, **QUIET)
    m = train_metrics(out)
    assert m[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    assert m[-1]["loss"] < 0.8 * LN2 and m[-1]["rewards/accuracies"] > 0.8
    adapters = [r for r in built if r is not None]
    assert [r.kind for r in adapters] == ["adapters"]
    base = adapters[0].policy.get_base_model()
    start = pristine()
    for name, w in base.state_dict().items():
        if "lora_" not in name:  # PEFT names base weights "<layer>.base_layer.weight"
            assert torch.equal(w, start[name.replace(".base_layer", "")]), name
    assert (out / "adapter" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------
# Precomputed reference: computed once, reused; resume equals uninterrupted


class Stop(Exception):
    pass


def test_precomputed_once_and_resume_is_bit_identical(data, tmp_path, monkeypatch):
    calls = []
    real = ref_mod.compute_tables
    monkeypatch.setattr(ref_mod, "compute_tables",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    over = {"train.save_every": 2, "train.max_steps": 6, "train.eval_on_start": True}
    said = []
    whole = dpo.run(cfg_for(data, tmp_path / "whole", **over), log=said.append)
    assert len(calls) == 1 and any("computed for" in s for s in said)
    # The step-0 eval batches are the precomputation's batches (same rows, same padding), so
    # policy and reference agree bit for bit there: no noise in the baseline accuracy.
    baseline = read_metrics(whole / "metrics.jsonl")[0]
    assert baseline["step"] == 0 and baseline["eval/loss"] == pytest.approx(LN2, abs=1e-6)
    assert baseline["eval/rewards/accuracies"] == 0 and baseline["eval/rewards/margins"] == 0

    import alignkit.engine.loop as loop
    real_guard = loop._guard

    def guard(loss, grad_norm, step, *a, **k):
        if step == 5:  # after checkpoints 2 and 4, before step 5 is applied
            raise Stop
        return real_guard(loss, grad_norm, step, *a, **k)

    monkeypatch.setattr(loop, "_guard", guard)
    with pytest.raises(Stop):
        dpo.run(cfg_for(data, tmp_path / "split", **over), **QUIET)
    monkeypatch.setattr(loop, "_guard", real_guard)
    said.clear()
    split = dpo.run(cfg_for(data, tmp_path / "split", **over), log=said.append)
    assert len(calls) == 1  # both later runs read the cache
    assert any("loaded from the cache" in s for s in said)
    assert any("resuming from" in s and "step-000004" in s for s in said)
    a, b = (load_file(str(p / "model.safetensors")) for p in (whole, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_metrics(whole)] == [r["loss"] for r in train_metrics(split)]


def test_precompute_batches_train_by_length_and_eval_in_data_order():
    """Training rows are precomputed longest first (less padding); eval rows in data order, the
    batches evaluation itself runs: under bf16 a row's log-prob depends on its batch's shape
    (SmolLM2-135M: the step-0 eval margin was 0.0011 instead of 0 with eval sorted too)."""
    from alignkit.data.preference import EncodedPair
    pairs = [EncodedPair([1] * n, [2] * (n % 3 + 1), [3]) for n in (2, 9, 4, 9, 1)]
    rows = dpo.PreferenceRows(pairs, pairs, pad_id=0, ranked=False)
    assert ref_mod._length_order(rows, "train") == [1, 3, 2, 0, 4]  # ties keep data order
    assert ref_mod._length_order(rows, "eval") == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------------------------
# Variants


# Step-0 loss (h = 0, β = 0.5): sigmoid −log σ(0) = ln 2 whatever ε; robust
# [−(1−ε) + ε]·log σ(0)/(1−2ε) = ln 2; ipo (0 − 1/(2β))² = 1; hinge max(0, 1 − 0) = 1;
# simpo depends on the policy's own log-probs (reference-free), so only finiteness.
@pytest.mark.parametrize("loss_type,extra,step0", [
    ("sigmoid", {"label_smoothing": 0.1}, LN2), ("robust", {"label_smoothing": 0.1}, LN2),
    ("ipo", {}, 1.0), ("hinge", {}, 1.0), ("simpo", {"simpo_gamma": 0.3}, None)])
def test_every_loss_type_trains_one_step(data, tmp_path, loss_type, extra, step0):
    cfg = cfg_for(data, tmp_path / loss_type, loss_type=loss_type, reference="copy",
                  **{"train.max_steps": 2, "data.eval_fraction": 0.0, "train.lr": 1e-4},
                  **extra)
    out = dpo.run(cfg, **QUIET)
    m = train_metrics(out)
    assert len(m) == 2 and all(math.isfinite(r["loss"]) for r in m)
    if step0 is not None:
        assert m[0]["loss"] == pytest.approx(step0, abs=1e-6)
        assert m[0]["rewards/chosen"] == 0 and m[1]["rewards/chosen"] != 0
    else:  # reference-free: the reward is β × the mean token log-prob (< 0)
        assert m[0]["rewards/chosen"] < 0 and m[0]["loss"] > 0
    assert (out / "DONE").is_file()


@pytest.mark.parametrize("sharing", ["on", "off"])
def test_length_grouped_batches_train(data, tmp_path, sharing, monkeypatch):
    """DPO hands each pair's padded width in its layout to the engine (the order itself:
    tests/engine/test_loop.py); the step-0 loss is still ln 2 (the reference matches)."""
    seen = []
    real = dpo.DPOTask.lengths
    monkeypatch.setattr(dpo.DPOTask, "lengths",
                        lambda self, split: seen.append((self, real(self, split))) or seen[-1][1])
    cfg = cfg_for(data, tmp_path / sharing, prefix_sharing=sharing, reference="precomputed",
                  **{"train.group_by_length": True, "train.max_steps": 3})
    m = train_metrics(dpo.run(cfg, **QUIET))
    assert len(m) == 3 and m[0]["loss"] == pytest.approx(LN2, abs=1e-6)
    ((task, lengths),) = seen
    width = (lambda p: len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids)) \
        if sharing == "on" else \
        (lambda p: len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)))
    assert lengths == [width(p) for p in task.rows.splits["train"]]


def test_loss_settings_are_checked_before_anything_loads(data, tmp_path):
    with pytest.raises(AlignkitError, match="label_smoothing"):
        dpo.run(cfg_for(data, tmp_path / "x", loss_type="ipo", label_smoothing=0.1), **QUIET)
    with pytest.raises(AlignkitError, match="--data"):
        dpo.run(cfg_for(data, tmp_path / "x", **{"data.path": None}), **QUIET)
    assert not (tmp_path / "x").exists()


def test_soft_labels_are_the_targets(tmp_path):
    """label 0.1 on every pair says rejected is better: the model learns to prefer it; with
    soft_labels: ignore the same data trains the other way; a loss that cannot use them refuses."""
    data = write(tmp_path / "soft.jsonl", [p | {"label": 0.1} for p in PAIRS])
    use = train_metrics(dpo.run(cfg_for(data, tmp_path / "use"), **QUIET))
    ignore = train_metrics(dpo.run(cfg_for(data, tmp_path / "ignore", soft_labels="ignore"),
                                   **QUIET))
    assert use[0]["loss"] == pytest.approx(LN2, abs=1e-6)  # h = 0: ln 2 whatever the label
    assert use[-1]["rewards/margins"] < 0 < ignore[-1]["rewards/margins"]
    with pytest.raises(AlignkitError, match="24 pairs carry a soft label.*loss_type ipo"):
        dpo.run(cfg_for(data, tmp_path / "ipo", loss_type="ipo"), **QUIET)


def test_ranked_lists_plackett_luce_and_pairs(tmp_path):
    ranked = write(tmp_path / "ranked.jsonl", RANKED)
    pl = dpo.run(cfg_for(ranked, tmp_path / "pl", ranked_loss="plackett_luce",
                         **{"train.batch_size": 4, "train.max_steps": 3}), **QUIET)
    m = train_metrics(pl)
    # K = 3 equal rewards: ℓ = −[log(1/3) + log(1/2)] = ln 6 per list
    assert m[0]["loss"] == pytest.approx(math.log(6), abs=1e-5)
    assert m[-1]["loss"] < m[0]["loss"]
    assert json.loads((pl / "data_report.json").read_text())["units"] == "ranked lists"
    pairs = dpo.run(cfg_for(ranked, tmp_path / "pairs", **{"train.max_steps": 2}), **QUIET)
    report = json.loads((pairs / "data_report.json").read_text())
    # 12 lists → 2 held out; 10 train lists × 3 pairs each
    assert report["units"] == "pairs" and report["train"]["kept"] == 30
    assert train_metrics(pairs)[0]["loss"] == pytest.approx(LN2, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# CLI


def run_cli(capsys, args):
    from alignkit.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code, capsys.readouterr()


def test_cli_end_to_end_and_bad_data(data, tmp_path, capsys):
    from alignkit.cli.main import main
    out = tmp_path / "cli"
    main(["dpo", "--model", "tiny", "--data", str(data), "--output", str(out),
          "--max-steps", "2", "--batch-size", "4", "--beta", "0.2", "--loss-type", "ipo",
          "--reference", "precomputed", "--precision", "fp32", "--lr", "1e-3",
          "--set", "train.progress=false", "--set", "train.num_threads=1"])
    assert (out / "DONE").is_file() and (out / "model.safetensors").is_file()
    cfg = (out / "config.yaml").read_text()
    assert "beta: 0.2" in cfg and "loss_type: ipo" in cfg and "reference: precomputed" in cfg
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(PAIRS[0]) + "\n" + json.dumps({"prompt": "x", "chosen": 3,
                                                             "rejected": "y"}) + "\n")
    code, io = run_cli(capsys, ["dpo", "--model", "tiny", "--data", str(bad),
                                "--output", str(tmp_path / "bad")])
    err = io.err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert f"{bad}:2" in err and "chosen" in err
    assert not (tmp_path / "bad" / "DONE").exists()
    code, io = run_cli(capsys, ["dpo", "--model", "tiny", "--output", str(tmp_path / "n")])
    assert code == 2 and "--data" in io.err and "\n" not in io.err.strip()

