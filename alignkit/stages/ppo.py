"""RLHF: PPO with a critic (Schulman et al. 2017; InstructGPT, Ouyang et al. 2022), and the
critic-free RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024), on one rollout code path.

The policy maximises the score of a reward model (or a Python reward function) minus β·KL to
the frozen reference; the maths lives in ``alignkit.losses`` (KL estimators and controllers,
per-token rewards, GAE, whitening, RLOO/GRPO baselines, clipped policy and value losses). How a
rollout is made: :mod:`alignkit.stages.rollout`.

How it fits the engine (``alignkit.engine.loop.fit``):

- One engine step = one optimizer update on ``train.batch_size`` rollout sequences. The task
  keeps a rollout buffer and makes a new rollout (the next ``rollout.prompts`` prompts of a
  seeded order over the prompt set, each sampled ``group_size`` times) whenever the buffer is
  used up: after ``ppo_epochs`` passes, each a fresh seeded shuffle of the buffer cut into
  minibatches. The engine's own example indices are not used (the task owns the order).
- Units are response tokens for all three algorithms: the engine divides the summed per-token
  loss by the global response-token count (for GRPO that is the length-unbiased reduction of
  Dr. GRPO rather than DeepSeekMath's per-sequence mean; see ``grpo_loss``).
- Policy and critic live in one ``ActorCritic`` module, so the optimizer, checkpoints and data
  parallelism (DDP or FSDP) see both; the reference and the reward model are outside it, frozen,
  one whole copy on every process.
- Under torchrun each process rolls out its share of a rollout's prompts (``rollout.prompts``
  and ``train.batch_size`` are per process, like every batch size), then the rows are gathered:
  every process holds the whole rollout, score normalisation and advantage whitening run over
  all of it, and each update's minibatch is one slice of a shuffle of the whole rollout. Two
  processes therefore train exactly as one process with twice the prompts and batch (see
  :func:`alignkit.stages.rollout.make_rollout` for the sampling seeds).
- Exact resume: every rollout buffer is saved to ``<run>/rollouts/rollout-NNNNN.pt`` with its
  first step and the KL controller's β after it, and an early stop is recorded when it is
  decided; a resumed run reloads the buffer its checkpoint was in the middle of, so a
  checkpoint may fall anywhere. Logs: ``metrics.jsonl`` (per update: losses, clip fraction,
  approximate KL, entropy, value loss), ``rollouts.jsonl`` (per rollout: score, KL, β, total
  reward, response length, entropy, explained variance; generation, scoring, evaluation and
  optimisation seconds) and ``samples.jsonl`` (completions every ``sample_every`` rollouts).
  The engine's ``epoch`` counts passes over rollout buffers, and its ``tokens_per_s`` includes
  rollout time.
- ``train.max_steps`` counts updates; without it ``train.epochs`` is passes over the prompt set.
- Saved: the policy in the run folder (LoRA merged), the critic in ``<run>/critic/`` (a reward
  model folder, loadable by ``alignkit score``), or with ``critic_init: shared`` (a value head
  on the policy's trunk, no second network) that head in ``<run>/value_head.safetensors``.

Where we depart from the papers and common implementations:

- Every forward (rollout and update) runs the policy and critic in eval mode: no dropout, so the
  ratio is 1 up to floating-point noise at a rollout's first update (LoRA dropout would
  otherwise make it random).
- ``old_logps`` are the sampler's own (the same model and precision, KV-cached), one full policy
  forward per rollout saved; ``rollout.old_logps: recompute`` runs that forward instead, as
  most implementations do (see rollout.py).
- Reward normalisation whitens each rollout's scores (no running statistics).
- Early stop (``target_kl``): a minibatch whose mean approximate KL(π_old‖π) exceeds the target
  ends its rollout's updates; the next step starts a new rollout. It costs one host sync per
  micro-batch, and only when set.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from alignkit.config.ppo import PPOConfig
from alignkit.engine import checkpoint, dist, guards, sharded
from alignkit.engine.loop import Batch, compile_layers, fit, uncompile
from alignkit.errors import AlignkitError
from alignkit.losses.kl import AdaptiveKLController, FixedKLController
from alignkit.losses.ppo import grpo_loss, policy_loss, value_loss
from alignkit.stages.common import begin, describe, end
from alignkit.stages.rollout import (Models, Prompt, RewardFunction, RewardModelScorer,
                                     by_chunks, eval_mode, forward_chunks, load_prompts,
                                     make_rollout, token_outputs, token_values)

class ActorCritic(torch.nn.Module):
    """What trains: the policy LM and (PPO) the critic: a one-output value head on a trunk of
    its own (``critic``), or on the policy's (``value_head``, ``critic_init: shared``)."""

    def __init__(self, policy, critic=None, value_head=None) -> None:
        super().__init__()
        self.policy, self.critic, self.value_head = policy, critic, value_head


# ---------------------------------------------------------------------------------------------
# Loss module: forward(**batch.inputs) → (Σ token losses, {metric: Σ over tokens})


class PPOLoss(torch.nn.Module):
    def __init__(self, ac: ActorCritic, cfg: PPOConfig, observe_kl=None) -> None:
        super().__init__()
        self.ac, self.cfg, self.observe_kl = ac, cfg, observe_kl

    def forward(self, input_ids, attention_mask, response_mask, old_logps, ref_logps,
                advantages=None, returns=None, old_values=None, seq_advantages=None):
        cfg, resp = self.cfg, response_mask
        forward = self._chunked(input_ids, attention_mask, resp)
        with eval_mode(self.ac.policy, self.ac.critic):  # no dropout: see the module docstring
            logps, ent, values = forward(lambda i, a, r: token_outputs(
                self.ac.policy, i, a, r, entropy=True, entropy_grad=cfg.entropy_coef > 0,
                value_head=self.ac.value_head))
            if cfg.algo == "grpo":
                out = grpo_loss(logps, old_logps, ref_logps, seq_advantages, resp,
                                clip_eps=cfg.clip_eps, beta=cfg.kl_coef)
                metrics = {"kl_ref": out.kl.sum()}
            else:
                out = policy_loss(logps, old_logps, advantages, resp, clip_eps=cfg.clip_eps)
                metrics = {}
            losses = out.losses
            metrics["policy_loss"] = out.losses.detach().sum()
            if cfg.algo == "ppo":
                if self.ac.critic is not None:
                    (values,) = forward(lambda i, a, r: (token_values(self.ac.critic, i, a, r),))
                vl = value_loss(values, old_values, returns, resp, clip_eps=cfg.value_clip_eps)
                losses = losses + cfg.vf_coef * vl.losses
                metrics |= {"value_loss": vl.losses.detach().sum(),
                            "value_clip_frac": vl.clipped.sum().float()}
            if cfg.entropy_coef > 0:
                losses = losses - cfg.entropy_coef * ent
        log_ratio = torch.where(resp, out.ratio.log(), 0)
        approx_kl = torch.where(resp, torch.expm1(log_ratio) - log_ratio, 0)  # k3, KL(old‖new)
        metrics |= {"clip_frac": out.clipped.sum().float(), "approx_kl": approx_kl.sum(),
                    "entropy": ent.detach().sum(), "ratio": torch.where(resp, out.ratio, 0).sum()}
        if self.observe_kl is not None:
            self.observe_kl(approx_kl.sum(), resp.sum())
        return losses.sum(), metrics

    def _chunked(self, input_ids, attention_mask, response_mask):
        """``forward(fn)``: ``fn(ids, attn, resp)`` on the whole minibatch, or on length-sorted
        chunks of at most ``update_forward_tokens`` padded tokens put back in row order
        (:func:`alignkit.stages.rollout.by_chunks`)."""
        budget = self.cfg.update_forward_tokens
        if budget is None and input_ids.device.type == "cpu":
            budget = 512
        chunks = lengths = None
        if budget is not None:
            lengths = attention_mask.sum(-1).tolist()  # the host's own tensor on a CPU
            chunks = forward_chunks(lengths, budget)
        if chunks is None or len(chunks) == 1:
            return lambda fn: fn(input_ids, attention_mask, response_mask)
        return lambda fn: by_chunks(fn, chunks, lengths, input_ids, attention_mask,
                                    response_mask)


# ---------------------------------------------------------------------------------------------
# Task: the rollout buffer, its minibatches, and what a resume needs


class PPOTask:
    """The engine's view. ``collate`` makes a new rollout when the buffer is used up."""

    def __init__(self, models: Models, prompts: list[Prompt], cfg: PPOConfig, run: Path,
                 log) -> None:
        self.m, self.prompts, self.cfg, self.log = models, prompts, cfg, log
        self.ws, self.rank = dist.world_size(), dist.rank()
        self.n_rows = cfg.rollout.prompts * cfg.group_k * self.ws  # the whole rollout's rows
        tc = cfg.train
        self.micro, self.accum = tc.batch_size // tc.grad_accum, tc.grad_accum
        self.per_pass = self.n_rows // (tc.batch_size * self.ws)  # updates per pass over the buffer
        self.per_rollout = cfg.ppo_epochs * self.per_pass
        self.controller = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
                           if cfg.kl_target is not None else FixedKLController(cfg.kl_coef))
        self.dir = run / "rollouts"
        self.run = run
        self.served = 0  # micro-batches handed out
        self.buffer: dict | None = None
        self.index, self.start, self.stop_after = -1, 0, None
        self.t_last = time.perf_counter()

    # engine protocol ---------------------------------------------------------------------------

    def num_examples(self, split: str) -> int:
        return self.n_rows if split == "train" else 0

    def collate(self, indices: list[int], split: str) -> Batch:
        step, micro_i = divmod(self.served, self.accum)
        self.served += 1
        if self._rollout_due(step):
            self._new_rollout(step)
        rows = self._rows(step)[micro_i * self.micro:(micro_i + 1) * self.micro]
        b = {k: v[rows] for k, v in self.buffer.items()}
        width = int(b["attention_mask"].sum(-1).max())
        inputs = {k: v[:, :width] for k, v in b.items() if v.dim() == 2}
        inputs |= {k: v for k, v in b.items() if v.dim() == 1}
        return Batch(inputs=inputs, count=int(inputs["response_mask"].sum()),
                     tokens=int(inputs["attention_mask"].sum()), ids=rows.tolist())

    def module(self) -> torch.nn.Module:
        observe = self._observe_kl if self.cfg.target_kl is not None else None
        return PPOLoss(self.m.ac, self.cfg, observe)

    # rollouts -------------------------------------------------------------------------------------

    def _rollout_due(self, step: int) -> bool:
        return (self.buffer is None or step - self.start >= self.per_rollout
                or (self.stop_after is not None and step > self.stop_after))

    def _rows(self, step: int) -> torch.Tensor:
        """This process's rows of the update ``step``: pass p of the rollout is a seeded shuffle
        of the whole buffer cut into global minibatches, of which each process takes its slice."""
        pos = step - self.start
        p, j = divmod(pos, self.per_pass)
        seed = self.cfg.train.seed * 1_000_003 + self.index * 1_009 + p
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(self.n_rows, generator=gen)
        b = self.cfg.train.batch_size
        minibatch = perm[j * b * self.ws:(j + 1) * b * self.ws]
        return minibatch[self.rank * b:(self.rank + 1) * b]

    def _prompts_of(self, index: int) -> list[Prompt]:
        """This process's share of rollout ``index``: the rollout takes the next ``rollout.prompts``
        × processes of a seeded order (a new permutation of the prompt set per pass over it),
        and process r the r-th block of them."""
        n, mine = len(self.prompts), self.cfg.rollout.prompts
        k = mine * self.ws
        out = []
        for q in range(index * k + self.rank * mine, index * k + (self.rank + 1) * mine):
            epoch, i = divmod(q, n)
            gen = torch.Generator().manual_seed(self.cfg.train.seed * 100_003 + epoch)
            out.append(self.prompts[int(torch.randperm(n, generator=gen)[i])])
        return out

    def _new_rollout(self, step: int) -> None:
        t0 = time.perf_counter()
        opt_s = t0 - self.t_last
        index = self.index + 1
        beta = self.controller.beta
        seed = self.cfg.train.seed * 1_000_003 + index
        first_row = self.rank * self.cfg.rollout.prompts * self.cfg.group_k
        # FSDP: the policy runs outside the training forward here, with its shards gathered.
        res = sharded.call_unsharded(self.m.ac, make_rollout, self.m, self._prompts_of(index),
                                     beta=beta, seed=seed, first_row=first_row)
        guards.check_rollout(res.stats, res.samples, rollout=index, step=step,
                             ckpt_root=self.run / "checkpoints", log=self.log)
        self.controller.update(res.stats["kl"], self.n_rows)
        self.buffer = {k: v for k, v in res.buffer.items()}
        self.index, self.start, self.stop_after = index, step, None
        # Logs first, buffer last: a kill in between leaves log lines past the newest saved
        # rollout, which a resume trims (the other order would lose this rollout's lines).
        record = {"rollout": index, "step": step, **res.stats,
                  "beta_next": self.controller.beta,
                  "opt_s": round(opt_s, 4) if index > 0 else 0.0}
        self._append("rollouts.jsonl", [record])
        every = self.cfg.sample_every
        if every and index % every == 0:
            self._append("samples.jsonl", [{"rollout": index, "step": step, **s}
                                           for s in res.samples[: self.cfg.samples_logged]])
        self._save_buffer()
        self.t_last = time.perf_counter()

    def _observe_kl(self, kl_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        """Early stop on the micro-batch's mean approximate KL over all processes (one
        all-reduce), so every process decides alike."""
        step = (self.served - 1) // self.accum
        both = dist.all_reduce_sum(torch.stack([kl_sum.detach().float(), tokens.float()]))
        approx_kl = both[0] / both[1].clamp(min=1)
        if self.stop_after is None and approx_kl.item() > self.cfg.target_kl:  # host sync
            self.stop_after = step
            self.log(f"rollout {self.index}: approximate KL {approx_kl.item():.3g} > target_kl "
                     f"after update {step + 1}; its remaining updates are skipped")
            if dist.is_main():
                _write_json(self.dir / f"stop-{self.index:05d}.json", {"after_step": step})

    # persistence ----------------------------------------------------------------------------

    def _save_buffer(self) -> None:
        if not dist.is_main():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"rollout-{self.index:05d}-step-{self.start:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"buffer": self.buffer, "index": self.index, "start": self.start,
                    "controller": self.controller.state_dict()}, tmp)
        tmp.replace(path)
        self._prune()

    def _prune(self) -> None:
        """Drop rollouts no kept checkpoint can resume into: keep, per file name order, those
        from the one in use at the oldest checkpoint on."""
        ckpts = sorted(int(p.name.split("-")[1]) for p in (self.run / "checkpoints").glob("step-*")
                       if p.name.split("-")[1].isdigit())
        oldest = ckpts[0] if ckpts else 0
        files = sorted(self.dir.glob("rollout-*.pt"))
        starts = [_start_of(f) for f in files]
        first = max([i for i, s in enumerate(starts) if s <= oldest], default=0)
        for f in files[:first]:
            f.unlink(missing_ok=True)

    def resume(self, step: int) -> None:
        """Continue after ``step`` updates: reload the rollout that step was in (and its
        controller state), forget rollouts and logs made after it."""
        self.served = step * self.accum
        saved = []
        for path in sorted(self.dir.glob("rollout-*.pt")) if self.dir.is_dir() else []:
            if _start_of(path) <= step:
                saved.append(path)
            elif dist.is_main():
                path.unlink()
        if step > 0 and not saved:
            raise AlignkitError(f"cannot resume at step {step}: no saved rollout in {self.dir}")
        if saved:
            state = torch.load(saved[-1], weights_only=True)
            if step - state["start"] > self.per_rollout:
                raise AlignkitError(f"cannot resume at step {step}: the rollout it needs is "
                                    f"not in {self.dir}")
            self.buffer, self.index, self.start = state["buffer"], state["index"], state["start"]
            self.controller.load_state_dict(state["controller"])
            stop = self.dir / f"stop-{self.index:05d}.json"
            if stop.is_file():
                after = json.loads(stop.read_text())["after_step"]
                self.stop_after = after if after < step else None
        for stop in self.dir.glob("stop-*.json") if dist.is_main() else []:
            index = int(stop.stem.split("-")[1])
            if index > self.index or (index == self.index and self.stop_after is None):
                stop.unlink()  # decided after the checkpoint: the replay decides again
        for name in ("rollouts.jsonl", "samples.jsonl"):
            self._trim(name, self.index)

    def _append(self, name: str, records: list[dict]) -> None:
        if dist.is_main():
            with open(self.run / name, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))

    def _trim(self, name: str, last_index: int) -> None:
        path = self.run / name
        if not dist.is_main() or not path.is_file():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["rollout"] <= last_index:
                    kept.append(line + "\n")
            except (ValueError, KeyError):
                continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


def _start_of(path: Path) -> int:
    return int(path.stem.rsplit("-", 1)[1])  # rollout-00003-step-00000024.pt → 24


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# Run


def check_config(cfg: PPOConfig) -> None:
    if cfg.reward_model is None and cfg.reward_fn is None:
        raise AlignkitError("ppo needs a reward: --reward-model RUN_FOLDER (from `alignkit "
                            "reward`) or --reward-fn module:function")
    rows = cfg.rollout.prompts * cfg.group_k
    if rows % cfg.train.batch_size:
        raise AlignkitError(f"a rollout has {rows} sequences (rollout.prompts × group_size), "
                            f"not a multiple of train.batch_size {cfg.train.batch_size}")
    if cfg.reference == "adapters" and not cfg.model.lora.enabled:
        raise AlignkitError("reference 'adapters' needs LoRA (model.lora.enabled: true)")


def _reward(cfg: PPOConfig, tokenizer, rt):
    """The scorer: a checked reward function, or the frozen reward model."""
    if cfg.reward_fn is not None:
        return RewardFunction(cfg.reward_fn)
    model, rm_tok = _load_reward_model(cfg, rt)
    model.requires_grad_(False)
    return RewardModelScorer(model, rm_tok, tokenizer, cfg.data.template, rt)


def _load_reward_model(cfg: PPOConfig, rt):
    from alignkit.config.schema import ModelConfig
    from alignkit.models.heads import load_reward_model
    mcfg = ModelConfig(name_or_path=cfg.reward_model, trust_remote_code=cfg.model.trust_remote_code,
                       attn_implementation=cfg.model.attn_implementation)
    return load_reward_model(mcfg, device=rt.device, require_head=True)


def _critic(cfg: PPOConfig, policy, tokenizer, rt):
    """The value model (PPO): the reward model's weights (InstructGPT) or the policy's trunk
    under a fresh head; None for critic_init shared (see :func:`_value_head`). Built before
    LoRA is applied to the policy."""
    if cfg.algo != "ppo" or cfg.critic_init == "shared":
        return None
    init = cfg.critic_init
    if init == "auto":
        init = "reward" if cfg.reward_model is not None else "policy"
    if init == "policy":
        from alignkit.models.heads import head_linears, reward_model_from_lm
        critic = reward_model_from_lm(copy.deepcopy(policy))
        # A value head drawn at reward-model scale predicts values of O(1) for returns that are
        # often O(0.01) (explained variance −8 to −25 on the embedded model): start it at zero,
        # so the first values are 0 and the head grows towards the returns' scale.
        with torch.no_grad():
            for linear in head_linears(critic):
                linear.weight.zero_()
        return critic.to(rt.device)
    critic, rm_tok = _load_reward_model(cfg, rt)
    if rm_tok.get_vocab() != tokenizer.get_vocab():
        raise AlignkitError("critic_init reward needs a reward model with the policy's "
                            "vocabulary (values are read on the policy's tokens); use "
                            "critic_init policy")
    return critic


def _value_head(cfg: PPOConfig, policy, rt) -> torch.nn.Linear | None:
    """critic_init shared: PPO's value head on the policy's own final hidden state, fp32, at
    zero (first values 0, as a critic_init policy head starts)."""
    if cfg.algo != "ppo" or cfg.critic_init != "shared":
        return None
    head = torch.nn.Linear(policy.config.hidden_size, 1, device=rt.device)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    return head


def critic_lr_groups(critic, cfg: PPOConfig, value_head=None) -> list:
    """(parameters, peak lr) of the critic's trunk and value head where they differ from
    train.lr (:func:`alignkit.engine.loop.build_optimizer`). A value head on the policy's
    trunk takes value_head_lr; the trunk is the policy's (train.lr)."""
    if value_head is not None:
        lr = cfg.value_head_lr
        return [(list(value_head.parameters()), lr)] if lr is not None else []
    if critic is None:
        return []
    from alignkit.models.heads import split_reward_model
    head = list(split_reward_model(critic)[1].parameters())
    ids = {id(p) for p in head}
    groups = []
    if cfg.critic_lr is not None:
        groups.append(([p for p in critic.parameters() if id(p) not in ids], cfg.critic_lr))
    if cfg.value_head_lr is not None:
        groups.append((head, cfg.value_head_lr))
    return groups


def run(cfg: PPOConfig, *, overwrite: bool = False, log=print) -> Path:
    """Train the policy with PPO / RLOO / GRPO and save it; returns the run folder. Reruns
    resume."""
    from alignkit.models.heads import apply_reward_lora
    from alignkit.models.load import load_causal_lm, load_tokenizer
    from alignkit.models.lora import apply_lora
    from alignkit.models.reference import AdaptersDisabled, FrozenCopy

    check_config(cfg)
    st = begin(cfg, overwrite=overwrite, log=log)
    if st.done:
        return st.run_dir.path
    tokenizer = load_tokenizer(cfg.model)  # data and reward errors surface before the model loads
    prompts, report = load_prompts(cfg.data, tokenizer, st.log)
    reward = _reward(cfg, tokenizer, st.rt)
    st.run_dir.prepare()
    policy, tokenizer = load_causal_lm(cfg.model, device=st.rt.device)
    critic = _critic(cfg, policy, tokenizer, st.rt)
    value_head = _value_head(cfg, policy, st.rt)
    kind = cfg.reference if cfg.reference != "auto" else (
        "adapters" if cfg.model.lora.enabled else "copy")
    reference = FrozenCopy(policy) if kind == "copy" else None
    policy = apply_lora(policy, cfg.model.lora)
    if critic is not None:
        critic = apply_reward_lora(critic, cfg.model.lora).train()
    if kind == "adapters":
        reference = AdaptersDisabled(policy)
    ac = ActorCritic(policy, critic, value_head)
    what = (f"{cfg.algo}: policy + critic" if critic is not None else
            f"{cfg.algo}: policy + value head on its trunk" if value_head is not None else cfg.algo)
    st.log(describe(cfg, ac, st.rt, what=what, extra=f"reference: {kind}; "))
    st.run_dir.write_json("data_report.json", report | {"reference": kind})
    task = PPOTask(Models(cfg, ac, reference, reward, tokenizer, st.rt), prompts, cfg,
                   st.run_dir.path, st.log)
    train = cfg.train
    if train.max_steps is None:
        rollouts = max(1, int(train.epochs * len(prompts))
                       // (cfg.rollout.prompts * dist.world_size()))
        train = train.model_copy(update={"max_steps": rollouts * task.per_rollout})
    ck = checkpoint.latest_good(st.run_dir.path / "checkpoints", quiet=True)
    task.resume(ck.step if ck is not None else 0)
    # train.compile: fit compiles the policy's and critic's layers; the frozen copy's forwards
    # (the reference log-probs of every rollout) reuse the no-grad graph of the same layer code.
    frozen = (compile_layers(reference.model, lambda *_: None)
              if train.compile and isinstance(reference, FrozenCopy) else [])
    try:
        result = fit(task, ac, train, st.rt, output=st.run_dir.path, log=st.log,
                     lr_groups=critic_lr_groups(critic, cfg, value_head))
    finally:
        uncompile(frozen)
    if critic is not None:
        from alignkit.models.heads import save_reward_model
        critic = sharded.gathered(critic)  # FSDP: every rank sends its shards to rank 0
        if dist.is_main():
            save_reward_model(critic, copy.deepcopy(tokenizer), st.run_dir.path / "critic")
    if value_head is not None:
        from safetensors.torch import save_file
        head = sharded.gathered(value_head)  # FSDP: every rank takes part
        if dist.is_main():
            save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                      str(st.run_dir.path / "value_head.safetensors"))
    return end(st, policy, tokenizer, result)
