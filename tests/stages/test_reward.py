"""Reward stage on the tiny model: it learns an obvious preference, ranked lists and soft labels
train, the loss module equals the loss functions it is built from, a resumed run is
bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import alignkit.engine.loop as loop
from alignkit.config import RewardConfig, build_config
from alignkit.config.schema import ModelConfig
from alignkit.data.preference import (EncodedPair, EncodedRanked, collate_pairs, collate_ranked,
                                      completions_of)
from alignkit.engine.metrics import read_metrics
from alignkit.errors import InputError
from alignkit.losses.reward import (bradley_terry_loss, centering_penalty, plackett_luce_loss,
                                    ranked_pairwise_loss)
from alignkit.models.heads import load_reward_model, reward_scores
from alignkit.stages import reward

WORDS = "apple river stone cloud paper music green quiet table window light over".split()


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def pair_records(n: int = 64, seed: int = 0, **extra) -> list[dict]:
    """Chosen always ends with "thank you"; rejected is random words of similar length."""
    rng = random.Random(seed)
    return [{"prompt": f"Question {i}: {_words(rng, 3)}?",
             "chosen": f"{_words(rng, 3)} thank you", "rejected": _words(rng, 5), **extra}
            for i in range(n)]


def ranked_records(n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": f"Question {i}?", "ranking": [2, 0, 1],
             "responses": [_words(rng, 4), _words(rng, 4), f"{_words(rng, 2)} thank you"]}
            for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cfg(data: Path, out: Path, **over) -> RewardConfig:
    base = {"model.name_or_path": "tiny", "data.path": str(data), "output": str(out),
            "data.max_length": 64, "data.template": "plain", "train.batch_size": 8,
            "train.lr": 3e-3,
            "train.max_steps": 20, "train.precision": "fp32", "train.progress": False,
            "train.warmup_steps": 0, "data.eval_fraction": 0.25, "train.num_threads": 1,
            "train.schedule": "constant"}
    return build_config(RewardConfig, overrides=base | over)


def quiet(*_):
    pass


def test_learns_an_obvious_preference(tmp_path):
    # A random head (not the probe), so that the run has to learn from chance.
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records())
    out = reward.run(cfg(data, tmp_path / "rm", head_init="random",
                         **{"train.eval_every": 5, "train.eval_on_start": True}), log=quiet)
    m = read_metrics(out / "metrics.jsonl")
    train = [r for r in m if "loss" in r]
    evals = [r for r in m if "eval/accuracy" in r]
    assert len(train) == 20 and {"accuracy", "margin", "reward_mean", "reward_sq"} <= set(train[0])
    first, last = sum(r["loss"] for r in train[:5]) / 5, sum(r["loss"] for r in train[-5:]) / 5
    assert last < 0.5 * first
    # 16 held-out pairs: near chance before training (step 0), (almost) all right at the end.
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 20
    assert evals[0]["eval/accuracy"] <= 0.75 and evals[-1]["eval/accuracy"] >= 0.9
    assert evals[-1]["eval/margin"] > 1.0
    done = json.loads((out / "DONE").read_text())
    assert done["eval"]["eval/reward_std"] > 0 and "reward_std" in done["train"]
    # Full fine-tuning: the trunk moved, not only the head.
    from alignkit.models.tiny import tiny_model
    base = tiny_model(seed=0).state_dict()
    saved = load_file(str(out / "model.safetensors"))
    assert "score.weight" in saved
    assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"],
                           base["model.layers.0.self_attn.q_proj.weight"])
    scores = reward.score(*load_reward_model(ModelConfig(name_or_path=str(out))),
                          [([{"role": "user", "content": "Question 99: hi?"}], a)
                           for a in ("stone paper thank you", "stone paper quiet over cloud")],
                          template="plain", max_length=64, batch_size=2)
    assert scores[0] > scores[1]


@pytest.mark.parametrize("ranked_loss", ["pairs", "plackett_luce"])
def test_ranked_lists_train(tmp_path, ranked_loss):
    data = write_jsonl(tmp_path / "ranked.jsonl", ranked_records())
    out = reward.run(cfg(data, tmp_path / ranked_loss, ranked_loss=ranked_loss,
                         **{"train.max_steps": 12, "train.batch_size": 4, "train.lr": 1e-3}),
                     log=quiet)
    m = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in m if "loss" in r]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3])
    assert any("eval/accuracy" in r for r in m)


def test_soft_labels_margins_and_centering_train(tmp_path):
    records = pair_records(32, margin=0.5, label=0.8)
    data = write_jsonl(tmp_path / "soft.jsonl", records)
    out = reward.run(cfg(data, tmp_path / "soft", center_rewards=0.01,
                         **{"train.max_steps": 12, "train.lr": 1e-3}), log=quiet)
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])


# --- the loss module against the loss functions --------------------------------------------

PROMPT = [1, 40, 41]
C1, R1, C2, R2 = [50, 51, 2], [60, 2], [52, 53, 54, 2], [61, 62, 2]


@pytest.fixture
def rm():
    torch.manual_seed(0)
    return load_reward_model(ModelConfig(name_or_path="tiny"))[0]


def test_pair_module_equals_bradley_terry_with_margin_label_and_centering(rm):
    pairs = [EncodedPair(PROMPT, C1, R1, margin=0.5, label=0.7), EncodedPair(PROMPT, C2, R2)]
    t = collate_pairs(pairs, pad_id=0)
    module = reward.RewardModelLoss(rm, center_rewards=0.1)
    with torch.no_grad():
        loss, metrics = module(t["input_ids"], t["attention_mask"], margin=t["margin"],
                               label=t["label"])
        r = reward_scores(rm, t["input_ids"], t["attention_mask"])
    rc, rr = r[:2], r[2:]
    expected = (bradley_terry_loss(rc, rr, margin=torch.tensor([0.5, 0.0]),
                                   label=torch.tensor([0.7, 1.0])).losses
                + centering_penalty(rc, rr, 0.1))
    torch.testing.assert_close(loss, expected.sum(), rtol=0, atol=1e-6)
    torch.testing.assert_close(metrics["margin"], (rc - rr).sum(), rtol=0, atol=1e-6)
    torch.testing.assert_close(metrics["reward_mean"], r.sum() / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(metrics["reward_sq"], (r ** 2).sum() / 2, rtol=0, atol=1e-6)
    assert metrics["accuracy"].item() == float((rc > rr).sum())


@pytest.mark.parametrize("ranked_loss", ["pairs", "plackett_luce"])
def test_ranked_module_scatters_rows_into_lists(rm, ranked_loss):
    items = [EncodedRanked(PROMPT, [C1, R1, C2]), EncodedRanked(PROMPT, [C2, R2])]
    t = collate_ranked(items, pad_id=0)
    module = reward.RewardModelLoss(rm, ranked_loss=ranked_loss)
    with torch.no_grad():
        loss, metrics = module(t["input_ids"], t["attention_mask"], list_index=t["list_index"],
                               rank=t["rank"], list_mask=t["list_mask"])
        r = reward_scores(rm, t["input_ids"], t["attention_mask"])  # rows: 3 then 2
    table = torch.tensor([[r[0], r[1], r[2]], [r[3], r[4], float("nan")]])
    fn = plackett_luce_loss if ranked_loss == "plackett_luce" else ranked_pairwise_loss
    torch.testing.assert_close(loss, fn(table, mask=t["list_mask"]).losses.sum(), rtol=0,
                               atol=1e-6)
    torch.testing.assert_close(metrics["reward_mean"], r[:3].mean() + r[3:].mean(), rtol=0,
                               atol=1e-6)


@pytest.mark.parametrize("ranked_loss", ["pairs", "plackett_luce"])
def test_a_list_of_two_is_a_pair(rm, ranked_loss):
    pair = collate_pairs([EncodedPair(PROMPT, C1, R1), EncodedPair(PROMPT, C2, R2)], pad_id=0)
    lists = collate_ranked([EncodedRanked(PROMPT, [C1, R1]), EncodedRanked(PROMPT, [C2, R2])],
                           pad_id=0)
    module = reward.RewardModelLoss(rm, ranked_loss=ranked_loss, center_rewards=0.3)
    with torch.no_grad():
        lp, mp = module(pair["input_ids"], pair["attention_mask"], margin=pair["margin"],
                        label=pair["label"])
        lr_, mr = module(lists["input_ids"], lists["attention_mask"],
                         list_index=lists["list_index"], rank=lists["rank"],
                         list_mask=lists["list_mask"])
    torch.testing.assert_close(lp, lr_, rtol=0, atol=1e-6)
    for k in mp:
        torch.testing.assert_close(mp[k], mr[k], rtol=0, atol=1e-6)


# --- run-level behaviour --------------------------------------------------------------------


def test_no_data_is_a_one_line_error_naming_data(tmp_path):
    c = build_config(RewardConfig, overrides={"model.name_or_path": "tiny",
                                              "output": str(tmp_path / "x")})
    with pytest.raises(InputError, match="--data"):
        reward.run(c, log=quiet)
    assert not (tmp_path / "x").exists()


def test_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(40))
    over = {"train.max_steps": 8, "train.save_every": 3, "train.schedule": "cosine",
            "train.warmup_steps": 2}
    ref = reward.run(cfg(data, tmp_path / "ref", **over), log=quiet)

    real_guard = loop._guard

    def crash_at_step_5(loss, grad_norm, step, *a, **k):
        if step == 5:  # after forward/backward of step 5, before its optimizer step
            raise KeyboardInterrupt
        return real_guard(loss, grad_norm, step, *a, **k)

    monkeypatch.setattr(loop, "_guard", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        reward.run(cfg(data, tmp_path / "cut", **over), log=quiet)
    monkeypatch.setattr(loop, "_guard", real_guard)
    said: list[str] = []
    cut = reward.run(cfg(data, tmp_path / "cut", **over), log=said.append)
    assert any("resuming from" in s and "step-000003" in s for s in said)
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(cut / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = [r.get("loss") for r in read_metrics(ref / "metrics.jsonl")]
    lb = [r.get("loss") for r in read_metrics(cut / "metrics.jsonl")]
    assert la == lb


def test_lora_reward_model_saves_merged(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(24))
    out = reward.run(cfg(data, tmp_path / "lora", **{"model.lora.enabled": True,
                                                     "train.max_steps": 2}), log=quiet)
    assert (out / "adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id == 0


@pytest.mark.parametrize("records,ranked_loss", [(pair_records, "pairs"),
                                                 (ranked_records, "pairs"),
                                                 (ranked_records, "plackett_luce")])
def test_probe_head_starts_from_the_best_linear_head_of_the_frozen_trunk(tmp_path, records,
                                                                         ranked_loss):
    data = write_jsonl(tmp_path / "d.jsonl", records(64))
    logs = []
    over = {"train.eval_on_start": True, "train.max_steps": 1, "ranked_loss": ranked_loss,
            "data.eval_fraction": 0.25}
    out = reward.run(cfg(data, tmp_path / "probe", **over), log=logs.append)
    rand = reward.run(cfg(data, tmp_path / "rand", head_init="random", **over), log=quiet)
    probe = json.loads((out / "data_report.json").read_text())["head_probe"]
    assert probe["examples"] > 0 and probe["l2"] in reward.PROBE_L2
    assert any("linear probe" in line for line in logs)
    # Step 0 (before any fine-tuning) on held-out data: the probe already separates the
    # obvious preference, the random head does not.
    first = lambda run: [r for r in read_metrics(run / "metrics.jsonl") if r["step"] == 0][0]
    assert first(out)["eval/accuracy"] >= 0.85 > first(rand)["eval/accuracy"]
    assert first(out)["eval/loss"] < 0.75 * first(rand)["eval/loss"]


def test_probe_minimises_the_stage_loss_on_the_frozen_features(tmp_path):
    # The probe's w minimises mean BT loss + l2·|w|² over the units' features: the gradient
    # there is ~0, and any perturbation raises the objective. Stacking units back into one
    # batch reproduces the collated batch's rows.
    from alignkit.data.preference import tokenize_preferences, load_preferences
    from alignkit.engine.device import Runtime
    from alignkit.stages.reward import (PreferenceTask, RewardModelLoss, _fit_probe,
                                        _probe_loss, _probe_units, _stack)
    path = write_jsonl(tmp_path / "d.jsonl", pair_records(24))
    torch.manual_seed(0)
    rm, tok = load_reward_model(ModelConfig(name_or_path="tiny"))
    items, _ = load_preferences(str(path))
    enc, _ = tokenize_preferences(tok, items, template="plain", max_length=64,
                                  truncation="truncate_left")
    task = PreferenceTask(rm, enc, [], tok.pad_token_id, ranked_loss="pairs",
                          center_rewards=0.0)
    units = _probe_units(task, list(range(24)), 8, Runtime(torch.device("cpu"), None))
    feats, aux = _stack(units)
    b = task.collate(list(range(24)), "train")
    with torch.no_grad():
        direct = reward_scores(rm, b.inputs["input_ids"], b.inputs["attention_mask"])
    head = rm.score.weight.detach().float().squeeze(0)
    torch.testing.assert_close(feats @ head, direct, atol=1e-4, rtol=1e-4)
    loss = RewardModelLoss(None)

    def objective(w):
        return _probe_loss(loss, feats @ w, aux)[0] / 24 + 0.01 * (w ** 2).sum()

    w = _fit_probe(feats, aux, 24, loss, 0.01).requires_grad_(True)
    value = objective(w)
    (grad,) = torch.autograd.grad(value, w)
    assert grad.abs().max() < 1e-3
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        assert objective(w.detach() + 0.05 * torch.randn(w.shape, generator=g)) > value


def test_length_grouped_batches_train(tmp_path):
    """Pairs and lists hand their padded widths to the engine (the order itself:
    tests/engine/test_loop.py)."""
    from alignkit.data.preference import EncodedPair, EncodedRanked, item_length
    assert item_length(EncodedPair([1, 2, 3], [4], [5, 6, 7])) == 6
    assert item_length(EncodedRanked([1], [[2], [3, 4, 5], [6, 7]])) == 4
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records())
    out = reward.run(cfg(data, tmp_path / "rm", **{"train.group_by_length": True,
                                                   "train.max_steps": 4}), log=quiet)
    assert len([r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]) == 4


# --- prefix sharing: [prompt | chosen | rejected] in one sequence ---------------------------

SHARED_PAIRS = [EncodedPair(PROMPT, C1, R1, margin=0.5, label=0.7),
                EncodedPair(PROMPT + [42, 43, 44, 45], C2, R2),
                EncodedPair([1], [70], [71, 72, 73, 2])]
SHARED_LISTS = [EncodedRanked(PROMPT, [C1, R1, [63, 2]]),
                EncodedRanked(PROMPT + [42, 43], [C2, R2])]


def _step(rm, items, setting: str, **task_kw):
    """(loss, metrics, rewards, grads) of one batch through the stage's own task and module."""
    task = reward.PreferenceTask(rm, items, [], 0, center_rewards=0.1, prefix_sharing=setting,
                                 **task_kw)
    batch = task.collate(list(range(len(items))), "train")
    rm.zero_grad()
    loss, metrics = task.module()(**batch.inputs)
    loss.backward()
    model_keys = ("input_ids", "attention_mask", "position_ids", "last_index")
    with torch.no_grad():
        rewards = reward_scores(rm, **{k: v for k, v in batch.inputs.items() if k in model_keys})
    grads = {n: p.grad.clone() for n, p in rm.named_parameters() if p.grad is not None}
    return batch, loss.detach(), metrics, rewards, grads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", ["pairs", "plackett_luce"])
def test_prefix_shared_rewards_loss_and_gradients_equal_plain(rm, attn, kind):
    """Same rewards (rows in the plain order), loss, metrics and gradients for every parameter,
    with prompts and replies of unequal lengths (so both layouts pad), in both attention
    kernels; the shared batch is one sequence per pair or list and counts the prompt once."""
    rm.set_attn_implementation(attn)
    items = SHARED_PAIRS if kind == "pairs" else SHARED_LISTS
    plain = _step(rm, items, "off", ranked_loss=kind)
    shared = _step(rm, items, "on", ranked_loss=kind)
    assert plain[0].inputs["input_ids"].shape[0] == sum(len(completions_of(i)) for i in items)
    assert shared[0].inputs["input_ids"].shape[0] == len(items)
    assert shared[0].inputs["attention_mask"].dim() == 4
    assert plain[0].tokens - shared[0].tokens == sum(  # the prompt copies saved
        (len(completions_of(i)) - 1) * len(i.prompt_ids) for i in items)
    assert plain[3].abs().min() > 0  # a random head: rewards are not all zero
    torch.testing.assert_close(shared[3], plain[3], rtol=0, atol=1e-5)
    torch.testing.assert_close(shared[1], plain[1], rtol=0, atol=1e-5)
    for key in plain[2]:
        torch.testing.assert_close(shared[2][key], plain[2][key], rtol=0, atol=1e-5)
    assert set(shared[4]) == set(plain[4]) and len(plain[4]) > 10  # trunk and head
    for name, g in plain[4].items():
        # fp32 rounding scales with the tensor, not the entry: an embedding row's gradient sums
        # cancelling terms (on an AVX2-only EPYC one entry of 0.009, in a tensor reaching 6.1,
        # differed by 2.9e-6)
        atol = 1e-6 * max(1.0, float(g.abs().max()))
        torch.testing.assert_close(shared[4][name], g, rtol=1e-4, atol=atol, msg=name)


def test_prefix_shared_rewards_agree_under_bf16_autocast(rm):
    """bf16 rounds the two layouts differently: they agree far inside bf16's own error."""
    def rewards(setting):
        batch = reward.PreferenceTask(rm, SHARED_PAIRS, [], 0, ranked_loss="pairs",
                                      center_rewards=0.0, prefix_sharing=setting).collate(
            [0, 1, 2], "train")
        keys = ("input_ids", "attention_mask", "position_ids", "last_index")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return reward_scores(rm, **{k: v for k, v in batch.inputs.items() if k in keys})
    with torch.no_grad():
        fp32 = reward_scores(rm, **{k: v for k, v in collate_pairs(SHARED_PAIRS, pad_id=0).items()
                                    if k in ("input_ids", "attention_mask")})
    plain, shared = rewards("off"), rewards("on")
    assert not torch.equal(plain, fp32)  # autocast did run in bf16
    scale = fp32.abs().max()
    assert (shared - plain).abs().max() < 0.25 * (plain - fp32).abs().max() + 1e-3 * scale


@pytest.mark.parametrize("data_kind", ["pairs", "ranked"])
def test_prefix_sharing_on_and_off_train_the_same(tmp_path, data_kind):
    """Whole runs, the linear-probe head included: same probe, same losses step by step. auto
    shares pairs and keeps ranked lists plain (the data report says which)."""
    records = pair_records(32) if data_kind == "pairs" else ranked_records(16)
    data = write_jsonl(tmp_path / "data.jsonl", records)
    over = {"train.max_steps": 4, "train.batch_size": 4, "train.lr": 1e-3, "probe_examples": 16}
    runs = {s: reward.run(cfg(data, tmp_path / s, prefix_sharing=s, **over), log=quiet)
            for s in ("off", "on", "auto")}
    losses = {s: [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
              for s, out in runs.items()}
    assert len(losses["on"]) == 4 and losses["on"][-1] != pytest.approx(losses["on"][0])
    assert losses["on"] == pytest.approx(losses["off"], rel=0, abs=1e-5)
    assert losses["auto"] == pytest.approx(losses["off"], rel=0, abs=1e-5)
    reports = {s: json.loads((out / "data_report.json").read_text()) for s, out in runs.items()}
    assert reports["on"]["head_probe"]["cv_accuracy"] == pytest.approx(
        reports["off"]["head_probe"]["cv_accuracy"], abs=1e-6)
    assert reports["on"]["prefix_sharing"] == {"train": True, "eval": True}
    assert reports["off"]["prefix_sharing"] == {"train": False, "eval": False}
    auto = data_kind == "pairs"
    assert reports["auto"]["prefix_sharing"] == {"train": auto, "eval": auto}
