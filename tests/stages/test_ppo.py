"""RLHF (PPO, RLOO, GRPO) end to end on the tiny model: losses finite, the policy moves while the
reference and the reward model stay bit-identical, KL and the ratio start exactly at 0 and 1,
a resumed run equals an uninterrupted one bit for bit, early stop and the adaptive β work, and
every way a reward function can be wrong is one line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.config.load import build_config
from alignkit.config.ppo import PPOConfig
from alignkit.engine.loop import cxx_compiler
from alignkit.engine.metrics import read_metrics
from alignkit.errors import AlignkitError
from alignkit.models.tiny import tiny_model
from alignkit.stages import ppo, rollout

QUIET = {"log": lambda *_: None}
WORDS = "cats dogs rain sun tea code bread rivers".split()


def letter_a(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward with signal on a random byte-level model: the share of ASCII lowercase letters."""
    return [sum("a" <= c <= "z" for c in r) / (len(r) + 1) for r in responses]


def wrong_length(prompts, responses):
    return [0.0] * (len(responses) + 1)


NOT_CALLABLE = 3


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                            for w in WORDS))
    return path


def cfg_for(data: Path, out: Path, **over) -> PPOConfig:
    base = {"model.name_or_path": "tiny", "data.path": str(data), "output": str(out),
            "reward_fn": "tests.stages.test_ppo:letter_a", "rollout.prompts": 4,
            "rollout.max_new_tokens": 10, "train.batch_size": 4, "train.max_steps": 4,
            "ppo_epochs": 2, "train.progress": False, "train.device": "cpu",
            "train.precision": "fp32", "train.num_threads": 1, "train.lr": 3e-3,
            "train.schedule": "constant"}
    return build_config(PPOConfig, overrides=base | over)


def trained(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def initial() -> dict[str, torch.Tensor]:
    return {k: v for k, v in tiny_model().state_dict().items()}


def finite_metrics(run: Path) -> list[dict]:
    rows = read_metrics(run / "metrics.jsonl")
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    return rows


def rollouts(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]


@pytest.fixture
def spy(monkeypatch):
    """The Models object run() builds (policy, reference, reward)."""
    seen = []

    class Spy(ppo.Models):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.append(self)

    monkeypatch.setattr(ppo, "Models", Spy)
    return seen


# ---------------------------------------------------------------------------------------------
# Smoke: PPO with a reward model and a critic from it; frozen models stay frozen


@pytest.fixture
def reward_dir(tmp_path) -> Path:
    from alignkit.models.heads import reward_model_from_lm, save_reward_model
    from alignkit.models.tiny import tiny_tokenizer
    torch.manual_seed(7)
    path = tmp_path / "rm"
    save_reward_model(reward_model_from_lm(tiny_model(seed=3)), tiny_tokenizer(), path)
    return path


def test_ppo_with_reward_model(prompts_file, reward_dir, tmp_path, spy):
    saved_rm = load_file(str(reward_dir / "model.safetensors"))
    cfg = cfg_for(prompts_file, tmp_path / "run", reward_fn=None, reward_model=str(reward_dir))
    run = ppo.run(cfg, **QUIET)
    rows = finite_metrics(run)
    assert len(rows) == 4 and all("value_loss" in r for r in rows)
    # old log-probs from the sampler: KL is 0 at the first rollout (policy == reference) and the
    # first update's ratio is 1, up to the KV-cached forward's rounding
    first = rollouts(run)[0]
    assert first["kl"] == pytest.approx(0, abs=1e-5)
    assert first["total_reward"] == pytest.approx(first["score"], abs=1e-5)
    assert rows[0]["approx_kl"] == pytest.approx(0, abs=1e-6)
    assert rows[0]["ratio"] == pytest.approx(1, abs=1e-5) and rows[0]["clip_frac"] == 0
    # the policy moved; the reference did not (bit for bit)
    start, after = initial(), trained(run)
    assert any(not torch.equal(start[k], after[k]) for k in after)
    models = spy[0]
    for k, v in models.reference.model.state_dict().items():
        assert torch.equal(v, start[k]), k
    # the reward model did not move either; the critic (initialised from it) did
    rm = {k: v for k, v in models.reward.model.state_dict().items()}
    assert rm.keys() == saved_rm.keys()
    assert all(torch.equal(rm[k], saved_rm[k]) for k in rm)
    critic = load_file(str(run / "critic" / "model.safetensors"))
    assert any(not torch.equal(critic[k], saved_rm[k]) for k in critic)
    assert all(not p.requires_grad for p in models.reward.model.parameters())


def test_lora_reference_is_the_base_and_kl_starts_at_zero(prompts_file, tmp_path, spy):
    # also: a LoRA critic from the policy, the entropy bonus, k2, reward shaping options
    cfg = cfg_for(prompts_file, tmp_path / "run", **{
        "model.lora.enabled": True, "model.lora.r": 4, "train.max_steps": 2,
        "entropy_coef": 0.01, "kl_estimator": "k2", "reward_normalize": True,
        "reward_clip": 1.0, "rollout.missing_eos_penalty": 0.5, "rollout.old_logps": "recompute"})
    run = ppo.run(cfg, **QUIET)
    rows = finite_metrics(run)
    # recomputed old log-probs: KL exactly 0 at the first rollout, the first ratio exactly 1
    assert rollouts(run)[0]["kl"] == 0.0
    assert rows[0]["approx_kl"] == 0.0 and rows[0]["ratio"] == 1.0
    assert spy[0].reference.kind == "adapters"
    assert (run / "critic" / "model.safetensors").is_file()
    # adapters trained, and the base weights (the reference) are untouched
    base = initial()
    for name, p in spy[0].ac.policy.named_parameters():
        if "lora_" not in name:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p.detach(), base[key]), name


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_critic_free_algorithms(algo, prompts_file, tmp_path, spy):
    cfg = cfg_for(prompts_file, tmp_path / algo, algo=algo, **{"rollout.prompts": 2,
                                                               "rollout.group_size": 4})
    run = ppo.run(cfg, **QUIET)
    rows = finite_metrics(run)
    assert spy[0].ac.critic is None and "value_loss" not in rows[0]
    assert rows[0]["approx_kl"] == pytest.approx(0, abs=1e-6)
    if algo == "grpo":
        assert rows[0]["kl_ref"] == pytest.approx(0, abs=1e-5)
    start, after = initial(), trained(run)
    assert any(not torch.equal(start[k], after[k]) for k in after)
    assert not (run / "critic").exists()
    # group layout: each prompt sampled group_size times, contiguously
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert len({s["prompt"] for s in samples}) == 1


def test_accumulation_matches_one_batch(prompts_file, tmp_path):
    runs = [ppo.run(cfg_for(prompts_file, tmp_path / f"acc{n}", **{"train.grad_accum": n}),
                    **QUIET) for n in (1, 2)]
    a, b = trained(runs[0]), trained(runs[1])
    # The same samples and losses (to 6 digits); Adam at lr 3e-3 turns the last-bit difference
    # of a summed gradient into up to ~3e-5 on a parameter whose gradient is near 0.
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    losses = [[r["loss"] for r in finite_metrics(run)] for run in runs]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


@pytest.mark.skipif(cxx_compiler() is None,
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_layers_train_like_eager_and_sample_eagerly(prompts_file, reward_dir,
                                                             tmp_path, spy, monkeypatch):
    """train.compile with PPO: the policy's, critic's and reference's layers run compiled in the
    full forwards (rollout evaluation and updates) and eagerly while sampling; the samples,
    rollout statistics and losses equal the eager run's within fp32 kernel rounding, and every
    layer is eager again after the run."""
    from torch._dynamo.utils import counters
    from alignkit.models import generate as gen_module
    real_generate = gen_module.generate
    compiled_while_sampling = []

    def generate(model, *a, **k):
        compiled_while_sampling.append(any(getattr(m, "_compiled_call_impl", None) is not None
                                           for m in model.modules()))
        return real_generate(model, *a, **k)

    monkeypatch.setattr(gen_module, "generate", generate)
    over = {"reward_fn": None, "reward_model": str(reward_dir)}
    eager = ppo.run(cfg_for(prompts_file, tmp_path / "eager", **over), **QUIET)
    counters.clear()
    comp = ppo.run(cfg_for(prompts_file, tmp_path / "compiled", **over,
                           **{"train.compile": True}), **QUIET)
    assert counters["stats"]["unique_graphs"] >= 2  # a training and a no-grad graph
    assert compiled_while_sampling and not any(compiled_while_sampling)
    models = spy[1]
    for model in (models.policy, models.ac.critic, models.reference.model):
        assert all(getattr(m, "_compiled_call_impl", None) is None for m in model.modules())
    a, b = rollouts(eager), rollouts(comp)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("score", "response_length", "kl", "entropy", "total_reward"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key
    assert b[0]["kl"] == pytest.approx(0, abs=1e-5)  # policy == reference, up to rounding
    ma, mb = finite_metrics(eager), finite_metrics(comp)
    for key in ("loss", "policy_loss", "value_loss", "ratio"):
        assert [r[key] for r in mb] == pytest.approx([r[key] for r in ma], rel=1e-4, abs=1e-6)
    assert mb[0]["ratio"] == pytest.approx(1.0, abs=1e-6)
    wa, wb = trained(eager), trained(comp)
    assert wa.keys() == wb.keys()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-4) for k in wa)


# ---------------------------------------------------------------------------------------------
# Resume, adaptive β, early stop


class Stop(Exception):
    pass


def interrupted_then_resumed(prompts_file, tmp_path, monkeypatch, over, kill_at):
    """(uninterrupted run, run killed while computing update ``kill_at`` then rerun)."""
    whole = ppo.run(cfg_for(prompts_file, tmp_path / "whole", **over), **QUIET)
    import alignkit.engine.loop as loop
    real_guard = loop._guard

    def guard(loss, grad_norm, step, *a, **k):
        if step == kill_at:
            raise Stop
        return real_guard(loss, grad_norm, step, *a, **k)

    part_cfg = cfg_for(prompts_file, tmp_path / "part", **over)
    monkeypatch.setattr(loop, "_guard", guard)
    with pytest.raises(Stop):
        ppo.run(part_cfg, **QUIET)
    monkeypatch.setattr(loop, "_guard", real_guard)
    return whole, ppo.run(part_cfg, **QUIET)


def assert_same_runs(whole: Path, part: Path, resumed_from: int) -> None:
    a, b = trained(whole), trained(part)
    assert all(torch.equal(a[k], b[k]) for k in a)
    def strip(rows):  # timings differ
        return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]
    assert strip(rollouts(whole)) == strip(rollouts(part))
    ma, mb = read_metrics(whole / "metrics.jsonl"), read_metrics(part / "metrics.jsonl")
    assert [r["loss"] for r in ma] == [r["loss"] for r in mb]
    assert json.loads((part / "DONE").read_text())["resumed_from"] == resumed_from


def test_resume_equals_uninterrupted(prompts_file, tmp_path, monkeypatch):
    # 2 updates per rollout; checkpoints every 3 updates fall mid-rollout, so the buffer and
    # the adaptive controller's β must come back from disk. Killed computing update 5; the
    # rerun resumes from the checkpoint at 3, mid-way through the rollout of updates 3–4.
    over = {"train.max_steps": 8, "train.save_every": 3, "kl_target": 0.01, "kl_coef": 0.2,
            "kl_horizon": 10.0}
    whole, part = interrupted_then_resumed(prompts_file, tmp_path, monkeypatch, over, kill_at=5)
    betas = [r["beta"] for r in rollouts(whole)]
    assert betas[0] == 0.2 and len(set(betas)) > 1  # the controller moved β
    assert_same_runs(whole, part, resumed_from=3)


def test_a_critic_on_the_policys_trunk_trains_saves_and_resumes(prompts_file, tmp_path,
                                                                 monkeypatch, spy):
    # critic_init shared: no second network; the value head trains (value loss logged, saved
    # non-zero), the policy moves, and a run killed mid-rollout resumes bit for bit.
    over = {"critic_init": "shared", "train.max_steps": 6, "train.save_every": 3}
    whole, part = interrupted_then_resumed(prompts_file, tmp_path, monkeypatch, over, kill_at=4)
    assert_same_runs(whole, part, resumed_from=3)
    models = spy[0]
    assert models.ac.critic is None and isinstance(models.ac.value_head, torch.nn.Linear)
    rows = finite_metrics(whole)
    assert all("value_loss" in r for r in rows) and rows[0]["value_loss"] > 0
    assert "explained_variance" in rollouts(whole)[0] and not (whole / "critic").exists()
    head = load_file(str(whole / "value_head.safetensors"))
    assert set(head) == {"weight", "bias"} and torch.count_nonzero(head["weight"]) > 0
    assert torch.equal(head["weight"], load_file(str(part / "value_head.safetensors"))["weight"])
    start, after = initial(), trained(whole)
    assert any(not torch.equal(start[k], after[k]) for k in after)


def test_resume_after_an_early_stop(prompts_file, tmp_path, monkeypatch):
    # Every rollout stops after its 2nd update (see below); the checkpoint at 2 comes right
    # after the stop was decided, so the resumed run must start a new rollout at once.
    over = {"train.max_steps": 6, "train.save_every": 2, "target_kl": 1e-12, "ppo_epochs": 4,
            "rollout.old_logps": "recompute"}
    whole, part = interrupted_then_resumed(prompts_file, tmp_path, monkeypatch, over, kill_at=4)
    assert [r["step"] for r in rollouts(whole)] == [0, 2, 4]
    assert_same_runs(whole, part, resumed_from=2)


def test_early_stop_on_approx_kl(prompts_file, tmp_path):
    # 4 updates per rollout without a stop. The first update of a rollout has approx KL exactly 0
    # (ratio 1, old log-probs recomputed); a tiny target stops the rollout after the second: a
    # new rollout every 2 steps.
    cfg = cfg_for(prompts_file, tmp_path / "run", target_kl=1e-12, ppo_epochs=4,
                  **{"train.max_steps": 4, "rollout.old_logps": "recompute"})
    run = ppo.run(cfg, **QUIET)
    assert [r["step"] for r in rollouts(run)] == [0, 2]
    assert sorted(p.name for p in (run / "rollouts").glob("stop-*.json"))[:2] == [
        "stop-00000.json", "stop-00001.json"]


# ---------------------------------------------------------------------------------------------
# Prompts and rewards


def test_prompts_from_preference_and_sft_files(tmp_path):
    from alignkit.models.tiny import tiny_tokenizer
    from alignkit.config.ppo import PromptDataConfig
    tok = tiny_tokenizer()
    pref = tmp_path / "pref.jsonl"
    pref.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "Hi?", "chosen": "Hello!", "rejected": "No."},
        {"prompt": "Hi?", "chosen": "Hey!", "rejected": "Go."},
        {"prompt": "Bye?", "chosen": "Bye!", "rejected": "No."}]))
    got, report = rollout.load_prompts(PromptDataConfig(path=str(pref)), tok, lambda *_: None)
    assert [p.text for p in got] == ["Hi?", "Bye?"] and report["duplicates"] == 1
    hh = tmp_path / "hh.jsonl"
    hh.write_text(json.dumps({"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: And?"
                                        "\n\nAssistant: Fine.",
                              "rejected": "\n\nHuman: Hi?\n\nAssistant: Hello!\n\nHuman: "
                                          "And?\n\nAssistant: No."}) + "\n")
    got, _ = rollout.load_prompts(PromptDataConfig(path=str(hh)), tok, lambda *_: None)
    assert [(m["role"], m["content"]) for m in got[0].messages] == [
        ("user", "Hi?"), ("assistant", "Hello!"), ("user", "And?")]
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"messages": [
        {"role": "user", "content": "A?"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "B?"}, {"role": "assistant", "content": "b"}]}) + "\n")
    got, _ = rollout.load_prompts(PromptDataConfig(path=str(sft)), tok, lambda *_: None)
    assert [m["content"] for m in got[0].messages] == ["A?", "a", "B?"]
    msgs = tmp_path / "msgs.jsonl"
    msgs.write_text(json.dumps({"prompt": [{"role": "system", "content": "Be kind."},
                                           {"role": "user", "content": "C?"}]}) + "\n"
                    + json.dumps({"prompt": [{"role": "assistant", "content": "x"}]}) + "\n")
    with pytest.raises(AlignkitError, match=r"msgs.jsonl:2: field 'messages\[0\].role'"):
        rollout.load_prompts(PromptDataConfig(path=str(msgs)), tok, lambda *_: None)


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("tests.stages.test_ppo:missing", "has no 'missing'"),
    ("tests.stages.test_ppo:NOT_CALLABLE", "is a int, not a function"),
])
def test_reward_fn_resolution_errors(spec, message, prompts_file, tmp_path):
    with pytest.raises(AlignkitError, match=message) as err:
        ppo.run(cfg_for(prompts_file, tmp_path / "run", reward_fn=spec), **QUIET)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "config.yaml").exists()  # failed before the run folder


def test_reward_fn_wrong_length_is_one_line(prompts_file, tmp_path):
    cfg = cfg_for(prompts_file, tmp_path / "run", reward_fn="tests.stages.test_ppo:wrong_length")
    with pytest.raises(AlignkitError, match=r"returned 5 scores for 4 responses") as err:
        ppo.run(cfg, **QUIET)
    assert "\n" not in str(err.value)
    fn = rollout.resolve_reward_fn("tests.stages.test_ppo:letter_a")
    with pytest.raises(AlignkitError, match="non-finite"):
        rollout.call_reward_fn(lambda p, r: [math.nan] * len(r), "x:y", ["p"], ["r"])
    assert rollout.call_reward_fn(fn, "x:y", ["p"], ["aB"]).tolist() == [pytest.approx(1 / 3)]


def test_shipped_rewards():
    from alignkit.assets.rewards import brevity, positive_words
    s = positive_words(["", "", ""], ["What a wonderful, happy day!", "bad and awful", ""])
    assert s[0] == pytest.approx(2 / math.sqrt(6)) and s[1] == pytest.approx(-2 / 2) and s[2] == 0
    assert brevity([""], ["one two three"], target_words=3) == [0.0]


def test_shape_scores_order():
    cfg = build_config(PPOConfig, overrides={"reward_normalize": True, "reward_clip": 0.5,
                                             "rollout.missing_eos_penalty": 1.0})
    raw, finished = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([True, False, True])
    # penalty first: [1, 1, 3] → whitened [-0.577, -0.577, 1.155] → clipped to ±0.5
    out = rollout.shape_scores(raw, finished, cfg)
    assert out.tolist() == pytest.approx([-0.5, -0.5, 0.5])


def test_config_validation():
    with pytest.raises(AlignkitError, match="group_size >= 2"):
        build_config(PPOConfig, overrides={"algo": "rloo", "rollout.group_size": 1})
    with pytest.raises(AlignkitError, match="kl_estimator must be k3"):
        build_config(PPOConfig, overrides={"algo": "grpo", "kl_estimator": "k1"})
    with pytest.raises(AlignkitError, match="not both"):
        build_config(PPOConfig, overrides={"reward_fn": "a:b", "reward_model": "x"})
    assert build_config(PPOConfig, overrides={"train.compile": True}).train.compile
    assert build_config(PPOConfig, overrides={"algo": "grpo"}).group_k == 4
    # a train.* override keeps RLHF's own defaults for the other train keys
    train = build_config(PPOConfig, overrides={"train.max_steps": 3}).train
    assert (train.lr, train.batch_size, train.warmup_ratio, train.max_steps) == (1e-6, 8, 0.0, 3)
    with pytest.raises(AlignkitError, match="not a multiple of train.batch_size"):
        ppo.check_config(build_config(PPOConfig, overrides={
            "reward_fn": "a:b", "rollout.prompts": 3, "train.batch_size": 2}))


def test_reward_model_retokenises_text_like_its_own_ids():
    """A reward model with another vocabulary sees the text re-encoded with its own tokenizer;
    with the same tokenizer both routes give the same rows, hence the same scores."""
    from alignkit.data.templates import encode_prompt
    from alignkit.engine.device import Runtime
    from alignkit.models.heads import reward_model_from_lm
    from alignkit.models.tiny import tiny_tokenizer
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    rm = reward_model_from_lm(tiny_model(seed=1)).eval()
    rt = Runtime(torch.device("cpu"), None)
    msgs = ({"role": "user", "content": "Hi?"},)
    prompt = rollout.Prompt(msgs, encode_prompt(tok, list(msgs), "chat"))
    texts = ["Hello there.", "Fine"]
    comps = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    comps[1] = comps[1][:-1]  # cut without EOS
    scorer = rollout.RewardModelScorer(rm, tok, tok, "chat", rt)
    assert scorer.same_vocab
    direct = scorer([prompt, prompt], comps, texts, [True, False], 2)
    scorer.same_vocab = False
    again = scorer([prompt, prompt], comps, texts, [True, False], 2)
    assert torch.equal(direct, again) and direct[0] != direct[1]


def test_critic_trunk_and_value_head_train_at_their_own_learning_rates():
    from alignkit.config import build_config
    from alignkit.models.heads import reward_model_from_lm
    from alignkit.models.tiny import tiny_model
    from alignkit.stages.ppo import critic_lr_groups
    critic = reward_model_from_lm(tiny_model(seed=0))
    head = {id(p) for p in critic.score.parameters()}
    over = {"reward_fn": "tests.stages.test_ppo:letter_a", "train.lr": 1e-6}
    groups = critic_lr_groups(critic, build_config(PPOConfig, overrides=over | {
        "critic_lr": 1e-5, "value_head_lr": 1e-3}))
    (trunk, trunk_lr), (head_params, head_lr) = groups
    assert (trunk_lr, head_lr) == (1e-5, 1e-3)
    assert {id(p) for p in head_params} == head
    assert {id(p) for p in trunk} | head == {id(p) for p in critic.parameters()}
    assert not {id(p) for p in trunk} & head
    # Defaults: the trunk at train.lr (no group), the head at value_head_lr; no critic, none.
    default = critic_lr_groups(critic, build_config(PPOConfig, overrides=over))
    assert [lr for _, lr in default] == [PPOConfig().value_head_lr]
    assert critic_lr_groups(None, build_config(PPOConfig, overrides=over)) == []
    # A head on the policy's trunk: only the head has a learning rate of its own.
    shared = build_config(PPOConfig, overrides=over | {"critic_init": "shared"})
    value_head = torch.nn.Linear(8, 1)
    ((params, lr),) = critic_lr_groups(None, shared, value_head)
    assert lr == PPOConfig().value_head_lr and len(params) == 2


def test_a_critic_from_the_policy_starts_with_a_zero_value_head():
    from alignkit.config import build_config
    from alignkit.engine.device import Runtime
    from alignkit.models.tiny import tiny_model, tiny_tokenizer
    from alignkit.stages.ppo import _critic
    cfg = build_config(PPOConfig, overrides={"reward_fn": "tests.stages.test_ppo:letter_a"})
    critic = _critic(cfg, tiny_model(seed=0), tiny_tokenizer(), Runtime(torch.device("cpu"), None))
    assert torch.count_nonzero(critic.score.weight) == 0
    assert any(torch.count_nonzero(p) for p in critic.model.parameters())  # the trunk is kept


# ---------------------------------------------------------------------------------------------
# Evaluating a rollout: chunking and the fused log-softmax change no number


@pytest.mark.parametrize("lengths,budget", [([5, 3, 9, 3, 1, 7], 12), ([4] * 5, 4),
                                            ([2, 8, 6], 1), ([3, 3, 3, 3], 100)])
def test_forward_chunks_cover_every_row_once_within_the_budget(lengths, budget):
    chunks = rollout.forward_chunks(lengths, budget)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    flat = [lengths[i] for c in chunks for i in c]
    assert flat == sorted(lengths)  # length order: little padding
    for c in chunks:
        assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= budget
    if budget >= len(lengths) * max(lengths):
        assert len(chunks) == 1


def test_fused_logps_and_entropy_equal_the_separate_ones():
    from alignkit.losses.logprobs import token_logps
    from alignkit.losses.ppo import entropy_from_logits
    torch.manual_seed(0)
    logits = torch.randn(7, 33, dtype=torch.bfloat16).float().requires_grad_()
    logits.data[2, 5] = -math.inf  # a token the distribution excludes
    labels = torch.randint(0, 33, (7,))
    labels[2] = 6
    lp, ent = rollout.logps_entropy(logits, labels, entropy=True, entropy_grad=True)
    assert torch.equal(lp, token_logps(logits, labels))  # bit for bit: the same log-softmax
    assert torch.allclose(ent, entropy_from_logits(logits), atol=1e-6)
    (g1,) = torch.autograd.grad((lp * 0.3 + ent).sum(), logits)
    (g2,) = torch.autograd.grad((token_logps(logits, labels) * 0.3
                                 + entropy_from_logits(logits)).sum(), logits)
    assert torch.allclose(g1, g2, atol=1e-6)
    lp2, ent2 = rollout.logps_entropy(logits, labels, entropy=True)  # no entropy gradient
    assert torch.equal(lp2, lp) and not ent2.requires_grad and lp2.requires_grad
    assert rollout.logps_entropy(logits, labels, entropy=False)[1] is None


@pytest.mark.parametrize("algo", ["ppo", "rloo"])
def test_rollout_evaluation_does_not_depend_on_its_chunking(algo, tmp_path):
    """forward_all in length-sorted chunks of any size gives every row the numbers it gets
    alone; the first rollout's KL is exactly 0 whatever the chunks (policy = reference)."""
    from alignkit.engine.device import Runtime
    from alignkit.models.reference import FrozenCopy
    from alignkit.models.heads import reward_model_from_lm
    from alignkit.models.tiny import tiny_tokenizer
    torch.manual_seed(0)
    policy = tiny_model(seed=2)
    critic = reward_model_from_lm(tiny_model(seed=3)) if algo == "ppo" else None
    rows = [[5, 9, 11, 4, 60, 61, 62], [5, 9, 11, 4, 70], [8, 3, 2, 90, 91, 92, 93, 94, 95],
            [8, 3, 2, 96], [7, 100, 101]]
    prompt_len = [4, 4, 3, 3, 1]
    ids, attn = rollout.right_pad(rows, 0)
    resp = torch.zeros_like(attn, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, prompt_len)):
        resp[i, p:len(r)] = True
    buf = {"input_ids": ids, "attention_mask": attn, "response_mask": resp}
    out = {}
    for budget in (1, 14, 10_000):
        cfg = build_config(PPOConfig, overrides={"algo": algo, "reward_fn": "x:y",
                                                 "rollout.forward_tokens": budget})
        models = rollout.Models(cfg, ppo.ActorCritic(policy, critic), FrozenCopy(policy),
                                None, tiny_tokenizer(), Runtime(torch.device("cpu"), None))
        out[budget] = models.forward_all(buf)
    for budget in (14, 10_000):
        for k, v in out[budget].items():
            assert torch.allclose(v, out[1][k], atol=1e-5), (budget, k)
    for fwd in out.values():
        assert torch.equal(fwd["old_logps"], fwd["ref_logps"])
        assert (fwd["old_logps"][~resp] == 0).all() and (fwd["old_logps"][resp] < 0).all()
        assert (fwd["entropy"][resp] > 0).all()
        if algo == "ppo":
            assert (fwd["old_values"][resp] != 0).all()
        assert (fwd["old_values"][~resp] == 0).all()


@pytest.mark.parametrize("dtype,atol,shared", [(None, 1e-5, False), (torch.bfloat16, 0.01, False),
                                               (None, 1e-5, True)])
def test_sampler_old_logps_equal_a_recomputing_forward(dtype, atol, shared):
    """rollout.old_logps sampler (the default) and recompute: the same samples, and old
    log-probs, entropy, KL, values and advantages equal within the precision's rounding. With
    a critic sharing the policy's trunk, the sampler's values too."""
    from alignkit.engine.device import Runtime
    from alignkit.models.heads import reward_model_from_lm
    from alignkit.models.reference import FrozenCopy
    from alignkit.models.tiny import tiny_tokenizer
    policy = tiny_model(seed=2)
    critic = reward_model_from_lm(tiny_model(seed=3)) if not shared else None
    torch.manual_seed(5)
    value_head = torch.nn.Linear(policy.config.hidden_size, 1) if shared else None
    prompts = [rollout.Prompt(({"role": "user", "content": str(i)},), ids)
               for i, ids in enumerate([[5, 9, 11, 4], [8, 3, 2], [7, 100, 101, 40, 41]])]
    out = {}
    for mode in ("sampler", "recompute"):
        cfg = build_config(PPOConfig, overrides={
            "algo": "ppo", "reward_fn": "tests.stages.test_ppo:letter_a",
            "rollout.max_new_tokens": 12, "rollout.group_size": 2, "rollout.batch_size": 4,
            "rollout.old_logps": mode})
        models = rollout.Models(cfg, ppo.ActorCritic(policy, critic, value_head),
                                FrozenCopy(policy), rollout.RewardFunction(cfg.reward_fn),
                                tiny_tokenizer(), Runtime(torch.device("cpu"), dtype))
        out[mode] = rollout.make_rollout(models, prompts, beta=0.1, seed=3)
    a, b = out["sampler"], out["recompute"]
    assert torch.equal(a.buffer["input_ids"], b.buffer["input_ids"])
    resp = a.buffer["response_mask"]
    assert torch.equal(resp, b.buffer["response_mask"]) and resp.sum() > 20
    for key in ("old_logps", "ref_logps", "advantages", "returns", "old_values"):
        assert torch.allclose(a.buffer[key], b.buffer[key], atol=atol, rtol=0), key
    assert (a.buffer["old_logps"][~resp] == 0).all() and (a.buffer["old_logps"][resp] < 0).all()
    assert (a.buffer["old_values"][resp] != 0).all() and (a.buffer["old_values"][~resp] == 0).all()
    for key in ("entropy", "kl", "score", "total_reward"):
        assert a.stats[key] == pytest.approx(b.stats[key], abs=atol), key
    assert b.stats["kl"] == 0.0  # recomputed: the policy's and the reference's own forward


def test_updates_in_chunks_equal_one_forward():
    """by_chunks (the updates' length-sorted chunks) gives the policy's log-probs and entropy,
    the critic's values and every parameter's gradient that one forward on the padded
    minibatch gives."""
    from alignkit.models.heads import reward_model_from_lm
    policy, critic = tiny_model(seed=2), reward_model_from_lm(tiny_model(seed=3))
    rows = [[5, 9, 11, 4, 60, 61, 62], [5, 9, 11, 4, 70], [8, 3, 2, 90, 91, 92, 93, 94, 95],
            [7, 100, 101], [8, 3, 2, 96, 97]]
    prompt_len = [4, 4, 3, 1, 3]
    ids, attn = rollout.right_pad(rows, 0)
    resp = torch.zeros_like(attn, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, prompt_len)):
        resp[i, p:len(r)] = True
    lengths = attn.sum(-1).tolist()
    weights = torch.randn(resp.shape)

    def run(chunks):
        policy.zero_grad(), critic.zero_grad()
        fns = (lambda i, a, r: rollout.token_logps_entropy(policy, i, a, r, entropy=True,
                                                           entropy_grad=True),
               lambda i, a, r: (rollout.token_values(critic, i, a, r),))
        outs = [o for fn in fns for o in (rollout.by_chunks(fn, chunks, lengths, ids, attn, resp)
                                          if chunks else fn(ids, attn, resp))]
        sum((o * weights).sum() for o in outs).backward()
        grads = {n: p.grad.clone() for m in (policy, critic) for n, p in m.named_parameters()}
        return [o.detach() for o in outs], grads

    whole, whole_grads = run(None)
    for budget in (1, 10, 20):
        chunks = rollout.forward_chunks(lengths, budget)
        assert 1 < len(chunks) <= len(rows)
        outs, grads = run(chunks)
        for a, b in zip(whole, outs):
            assert torch.allclose(a, b, atol=1e-6), budget
        for n, g in whole_grads.items():
            # fp32 summation order: the embedding's gradient (tied to the LM head, entries
            # up to ~40) differs in the 7th digit
            assert torch.allclose(g, grads[n], rtol=1e-5, atol=1e-5), (budget, n)


def test_a_run_with_chunked_updates_equals_one_with_whole_minibatches(prompts_file, reward_dir,
                                                                      tmp_path):
    over = {"reward_fn": None, "reward_model": str(reward_dir)}
    runs = [ppo.run(cfg_for(prompts_file, tmp_path / f"u{n}", **over,
                            update_forward_tokens=n), **QUIET) for n in (12, 100_000)]
    a, b = (finite_metrics(run) for run in runs)
    for key in ("loss", "policy_loss", "value_loss", "entropy", "ratio"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], rel=1e-5, abs=1e-7)
    wa, wb = trained(runs[0]), trained(runs[1])
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
