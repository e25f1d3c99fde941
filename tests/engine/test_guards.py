"""Numerical guards: NaN/inf in the loss, a gradient or a reward stops the run naming the step,
the examples and the last good checkpoint, with nothing applied; an exploding KL is reported."""

import json
import math

import pytest
import torch

from alignkit.engine import guards
from alignkit.engine.loop import fit
from alignkit.errors import TrainingError
from tests.engine.test_loop import CPU32, ToyTask, cfg

QUIET = {"log": lambda *_: None}


def test_nan_loss_names_step_examples_and_the_last_good_checkpoint(tmp_path):
    t = ToyTask(bad_at=5)
    with pytest.raises(TrainingError) as e:
        fit(t, t.model, cfg(max_steps=8, save_every=1), CPU32, output=tmp_path, **QUIET)
    msg = str(e.value)
    step = int(msg.split("at step ")[1].split()[0])
    assert msg.startswith("non-finite loss at step") and "\n" not in msg
    examples = json.loads(msg.split("(examples ")[1].split("]")[0] + "]")
    assert 5 in examples and len(examples) == 8  # the whole batch of the failing step
    if step > 1:  # a checkpoint per step: the one before the failure is named
        assert f"last good checkpoint: {tmp_path / 'checkpoints' / f'step-{step - 1:06d}'}" in msg
    else:
        assert "no checkpoint was written yet" in msg
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_inf_loss_is_caught_too(tmp_path):
    t = ToyTask()
    t.x[3] = float("inf")
    with pytest.raises(TrainingError, match=r"non-finite loss at step"):
        fit(t, t.model, cfg(max_steps=8), CPU32, output=tmp_path, **QUIET)


def test_a_non_finite_gradient_with_a_finite_loss_names_the_parameter(tmp_path):
    t = ToyTask()
    before = t.model.weight.detach().clone()
    t.model.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    with pytest.raises(TrainingError) as e:
        fit(t, t.model, cfg(max_steps=3), CPU32, output=tmp_path, **QUIET)
    msg = str(e.value)
    assert "non-finite gradient norm (first in weight) at step 1" in msg
    assert "no checkpoint was written yet" in msg and "was not applied" in msg
    assert torch.equal(t.model.weight, before)  # the update never happened


def test_many_examples_are_shown_in_part(tmp_path):
    t = ToyTask(n=32, bad_at=0)
    with pytest.raises(TrainingError, match=r"\(examples \[[^\]]*\] and 16 more\)"):
        fit(t, t.model, cfg(batch_size=32, max_steps=2), CPU32, output=tmp_path, **QUIET)


def test_a_healthy_step_passes(tmp_path):
    guards.check_step(torch.tensor(3.0), torch.tensor(1.0), step=1, ids=[0],
                      ckpt_root=tmp_path)


# ---------------------------------------------------------------------------------------------
# Rollouts

def _samples(scores):
    return [{"prompt": f"Tell me about cats {i}.", "score": s} for i, s in enumerate(scores)]


def test_a_nan_reward_stops_before_the_rollout_is_trained_on(tmp_path):
    from tests.engine.test_checkpoint import _model_opt
    from alignkit.engine import checkpoint
    m, opt = _model_opt()
    checkpoint.save(tmp_path, 12, m, opt, {}, keep=1)
    with pytest.raises(TrainingError) as e:
        guards.check_rollout({"kl": 0.1, "response_length": 8.0},
                             _samples([0.5, math.nan, 1.0, math.inf]), rollout=3, step=12,
                             ckpt_root=tmp_path, log=pytest.fail)
    msg = str(e.value)
    assert "non-finite reward at rollout 3 (before step 13): rollout rows [1, 3] of 4" in msg
    assert "'Tell me about cats 1.'" in msg and "\n" not in msg
    assert f"last good checkpoint: {tmp_path / 'step-000012'}" in msg


def test_a_nan_kl_stops(tmp_path):
    with pytest.raises(TrainingError, match="non-finite KL to the reference"):
        guards.check_rollout({"kl": math.nan, "response_length": 8.0}, _samples([0.0]),
                             rollout=0, step=0, ckpt_root=tmp_path, log=pytest.fail)


@pytest.mark.parametrize("kl, length, reported", [
    (0.0, 10.0, False), (5.0, 10.0, False), (10.0, 10.0, False),  # ≤ 1 nat per token
    (10.5, 10.0, True), (-12.0, 10.0, True),  # a large negative k1 mean is broken too
    (2.0, 0.0, True)])  # empty responses: per token = per response
def test_an_exploding_kl_is_reported_in_one_line(tmp_path, kl, length, reported):
    said = []
    guards.check_rollout({"kl": kl, "response_length": length}, _samples([0.0]), rollout=7,
                         step=40, ckpt_root=tmp_path, log=said.append)
    assert bool(said) == reported
    if reported:
        assert len(said) == 1 and "\n" not in said[0]
        assert said[0].startswith("warning: the KL to the reference is exploding at rollout 7")


def test_ppo_stops_on_a_nan_reward_and_reports_kl(tmp_path, monkeypatch):
    """Through the PPO stage: the guard sits between scoring and training."""
    from alignkit.stages import ppo, rollout
    from tests.stages.test_ppo import WORDS, cfg_for

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {w}."}) + "\n"
                               for w in WORDS))
    real, calls = rollout.Models.score, []

    def third_rollout_nan(self, *a):
        scores = real(self, *a)
        calls.append(1)
        if len(calls) == 3:
            scores[2] = math.nan
        return scores

    monkeypatch.setattr(rollout.Models, "score", third_rollout_nan)
    monkeypatch.setattr(guards, "EXPLODING_KL_PER_TOKEN", 0.0)  # any KL above 0 is reported
    said = []
    # recomputed old log-probs: the first rollout's KL is exactly 0, so it reports nothing
    cfg = cfg_for(prompts, tmp_path / "run", **{"train.max_steps": 12, "train.save_every": 4,
                                                "rollout.old_logps": "recompute"})
    with pytest.raises(TrainingError) as e:
        ppo.run(cfg, log=said.append)
    msg = str(e.value)
    # a rollout of 4 rows serves 2 updates (2 ppo epochs of one batch of 4): rollout 2 is
    # made for step 5, after step 4 was saved
    assert "non-finite reward at rollout 2 (before step 5): rollout rows [2] of 4" in msg
    assert "last good checkpoint" in msg and "step-000004" in msg
    kl_lines = [s for s in said if "exploding" in s]
    assert kl_lines and "rollout 1" in kl_lines[0]  # rollout 0 has KL exactly 0
