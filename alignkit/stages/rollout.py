"""RLHF rollouts: prompts in, a buffer of scored, KL-shaped, advantage-carrying sequences out.

One rollout (all under ``no_grad``, models in eval mode):

1. sample ``group_size`` responses for each of its prompts with :func:`alignkit.models.generate.
   generate` (KV cache, temperature / top-p, stops at EOS; a prompt's cache computed once for
   its whole group; ``rollout.attn_implementation``, SDPA by default, whatever kernel training
   uses), in chunks of ``rollout.batch_size`` rows each seeded from the rollout's seed and the
   chunk's place in the whole rollout;
2. score each response: a reward model trained by ``alignkit reward`` (token ids reused when it
   shares the policy's vocabulary, else the text re-tokenised with its own tokenizer) or a Python
   function ``reward(prompts, responses) -> list[float]``; then the missing-EOS penalty,
   per-rollout normalisation and clipping;
3. one forward each of the reference (``ref_logps``) and the critic (``old_values``). The
   policy's ``old_logps`` (and entropy) are by default those the sampler computed as it drew
   each token (``rollout.old_logps: sampler``): the same model, weights and precision, whose
   cached incremental forward differs from a full forward by floating-point noise only (≤ 3e-5
   in fp32 on the embedded model), and a full policy forward saved. ``recompute`` runs that
   forward with the very function training uses, so the first update's ratio is exactly 1;
4. advantages: PPO folds −β·KL per token into the reward with the score on the last token
   (:func:`per_token_rewards`), then GAE and whitening; RLOO uses the sequence reward
   score − β·ΣKL with the leave-one-out baseline; GRPO the group-normalised score (its KL is in
   the loss).

Under data parallelism each process samples, scores and evaluates its share (steps 1–3), then
the rows of all processes are gathered and step 4 runs on the whole rollout on every process.
Because a chunk's seed does not depend on which process draws it, two processes whose shares
are whole chunks draw exactly the samples one process draws.

Sequences are laid out prompt-major (a prompt's k samples contiguous), right padded; every
per-token tensor is aligned on ``input_ids`` positions (value at t belongs to token t), and
``response_mask`` is True on generated tokens (the stop token included).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from alignkit.errors import AlignkitError, InputError
from alignkit.losses.advantages import (gae, grpo_advantages, masked_mean, per_token_rewards,
                                        rloo_advantages, whiten)
from alignkit.losses.kl import kl_estimate
from alignkit.losses.logprobs import shifted_targets
from alignkit.losses.ppo import entropy_from_logp, explained_variance
from alignkit.models.heads import head_scalars, split_reward_model
from alignkit.models.lora import adapters_disabled
from alignkit.models.logps import split_lm

# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class Prompt:
    messages: tuple[dict, ...]  # ending with a user turn
    ids: list[int]  # the generation prompt, encoded with the template

    @property
    def text(self) -> str:  # what a reward function sees: the last user turn
        return self.messages[-1]["content"]


def load_prompts(data, tokenizer, log) -> tuple[list[Prompt], dict]:
    """The distinct prompts of ``data.path`` (PromptDataConfig), encoded; and a small report."""
    from alignkit.data.sources import read_records
    from alignkit.data.templates import encode_prompt, resolve_template
    if data.path is None:
        raise AlignkitError("ppo needs prompts: --data FILE (a JSONL with 'prompt' strings or "
                            "message lists, or an SFT or preference file)")
    records = read_records(data.path, split=data.split)[: data.max_examples]
    if not records:
        raise InputError("no records", path=data.path)
    fmt = data.format if data.format != "auto" else _detect(records[0].data)
    match fmt:
        case "prompts":
            convs = [_prompt_record(r) for r in records]
        case "preference":
            from alignkit.data.preference import load_preferences
            items, _ = load_preferences(data.path, split=data.split, max_examples=data.max_examples)
            convs = [tuple(x.prompt) for x in items]
        case _:
            from alignkit.data.formats import load_sft
            convs = [_before_last_answer(c.messages) for c in
                     load_sft(data.path, split=data.split, max_examples=data.max_examples)]
    template = resolve_template(data.template, tokenizer)
    seen, prompts, too_long = set(), [], 0
    for msgs in convs:
        if data.system_prompt is not None and msgs[0]["role"] != "system":
            msgs = ({"role": "system", "content": data.system_prompt},) + tuple(msgs)
        key = tuple((m["role"], m["content"]) for m in msgs)
        if key in seen:
            continue
        seen.add(key)
        ids = encode_prompt(tokenizer, list(msgs), template)
        if len(ids) > data.max_prompt_length:
            too_long += 1
            continue
        prompts.append(Prompt(tuple(msgs), ids))
    report = {"path": data.path, "format": fmt, "template": template, "records": len(records),
              "prompts": len(prompts), "duplicates": len(convs) - len(seen),
              "too_long": too_long}
    log(f"prompts: {len(prompts)} distinct from {len(records)} {fmt} records (template "
        f"{template}; {too_long} longer than {data.max_prompt_length} tokens dropped)")
    if not prompts:
        raise InputError("no usable prompt", path=data.path)
    return prompts, report


def _detect(data: dict) -> str:
    if "chosen" in data or "responses" in data:
        return "preference"
    if "prompt" in data and "completion" not in data:
        return "prompts"
    return "sft"


def _prompt_record(rec) -> tuple[dict, ...]:
    from alignkit.data.formats import check_turns
    value = rec.data.get("prompt")
    if isinstance(value, str) and value.strip():
        return ({"role": "user", "content": value},)
    if isinstance(value, list) and value:
        msgs = tuple(value)
        if all(isinstance(m, dict) and isinstance(m.get("content"), str)
               and m.get("role") in ("system", "user", "assistant") for m in msgs):
            check_turns(list(msgs), final_role="user", path=rec.path, line=rec.line)
            return tuple({"role": m["role"], "content": m["content"]} for m in msgs)
    raise InputError("needs a non-empty string or a list of {role, content} messages ending with "
                     "a user turn", path=rec.path, line=rec.line, field="prompt")


def _before_last_answer(messages) -> tuple[dict, ...]:
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return tuple(messages[:last])


# ---------------------------------------------------------------------------------------------
# Rewards


def resolve_reward_fn(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """``"module:function"`` → the function, checked; one-line errors for every way it fails.
    The current directory is importable, so a local ``my_rewards.py`` works."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise AlignkitError(f"reward_fn '{spec}' must look like module:function")
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raises at import
        raise AlignkitError(f"reward_fn '{spec}': cannot import module '{module_name}' "
                            f"({type(err).__name__}: {err})".replace("\n", " ")) from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise AlignkitError(f"reward_fn '{spec}': module '{module_name}' has no '{attr}'")
    if not callable(fn):
        raise AlignkitError(f"reward_fn '{spec}': '{attr}' is a {type(fn).__name__}, not a "
                            "function")
    return fn


def call_reward_fn(fn, spec: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """(R,) fp32 scores from ``fn``; its answer must be R finite numbers."""
    try:
        out = fn(list(prompts), list(responses))
    except Exception as err:
        raise AlignkitError(f"reward_fn '{spec}' raised {type(err).__name__}: {err}"
                            .replace("\n", " ")) from None
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError):
        raise AlignkitError(f"reward_fn '{spec}' must return a list of numbers, got "
                            f"{type(out).__name__}") from None
    if len(values) != len(responses):
        raise AlignkitError(f"reward_fn '{spec}' returned {len(values)} scores for "
                            f"{len(responses)} responses")
    if not all(math.isfinite(v) for v in values):
        raise AlignkitError(f"reward_fn '{spec}' returned a non-finite score")
    return torch.tensor(values, dtype=torch.float32)


class RewardFunction:
    """Scores with a Python function ``reward(prompts, responses) -> list[float]`` given the
    last user turn of each prompt and the decoded responses (stop token left out)."""

    def __init__(self, spec: str) -> None:
        self.spec, self.fn = spec, resolve_reward_fn(spec)

    def __call__(self, prompts: list[Prompt], completions, texts: list[str], finished,
                 batch_size: int) -> torch.Tensor:
        return call_reward_fn(self.fn, self.spec, [p.text for p in prompts], texts)


class RewardModelScorer:
    """Scores with a frozen reward model. Same vocabulary as the policy: the sampled ids are
    scored as they are (prompt + completion, ending at the stop token as the reward model's
    training rows end at the end-of-turn token). Another vocabulary: prompt messages + response
    text are re-encoded with the reward model's tokenizer and template (a response cut without
    EOS loses the end-of-turn token the template adds)."""

    def __init__(self, model, tokenizer, policy_tokenizer, template: str, rt) -> None:
        from alignkit.data.templates import resolve_template
        self.model, self.tokenizer, self.rt = model, tokenizer, rt
        self.same_vocab = tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        self.template = resolve_template(template, tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], completions: list[list[int]], texts: list[str],
                 finished: list[bool], batch_size: int) -> torch.Tensor:
        from alignkit.data.preference import encode_completion
        from alignkit.models.heads import reward_scores
        rows = []
        for p, ids, text, done in zip(prompts, completions, texts, finished):
            if self.same_vocab:
                rows.append(p.ids + ids)
            else:
                pi, ci = encode_completion(self.tokenizer, p.messages, text, self.template)
                rows.append(pi + (ci if done else ci[:-1]))
        out = []
        for i in range(0, len(rows), batch_size):
            ids, mask = right_pad(rows[i:i + batch_size], 0)
            with self.rt.autocast():
                out.append(reward_scores(self.model, ids.to(self.rt.device),
                                         mask.to(self.rt.device)).float().cpu())
        return torch.cat(out)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Per-token forwards shared by the rollout and the loss


def token_logps_entropy(model, input_ids, attention_mask, response_mask, *, entropy: bool,
                        entropy_grad: bool = False):
    """log π(x_t | x_<t) at every response token t, and (optionally) the policy's entropy there.

    The LM head and fp32 log-softmax run only on the N positions that predict a response token,
    and the log-softmax runs once for both the log-probs and the entropy.
    Shapes: (B, T) each → logps (B, T) fp32 (0 off the mask), entropy (B, T) or None.
    """
    logps, ent, _ = token_outputs(model, input_ids, attention_mask, response_mask,
                                  entropy=entropy, entropy_grad=entropy_grad)
    return logps, ent


def token_outputs(model, input_ids, attention_mask, response_mask, *, entropy: bool,
                  entropy_grad: bool = False, value_head=None):
    """:func:`token_logps_entropy`, and with ``value_head`` (PPO's critic on the policy's own
    trunk) V(s_t) for each response token t from the same trunk forward: the head on the hidden
    state at t − 1, as :func:`token_values` reads a separate critic.
    Shapes: (B, T) each → logps, entropy | None, values | None, each (B, T) fp32, 0 off the mask.
    """
    trunk, head = split_lm(model)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                   use_cache=False).last_hidden_state  # (B, T, H)
    positions, labels = shifted_targets(input_ids, response_mask)  # (B, T), (N,)
    pooled = hidden[positions]  # (N, H)
    logps, ent = logps_entropy(head(pooled), labels, entropy=entropy,
                               entropy_grad=entropy_grad)  # (N,), (N,) | None
    target = response_mask.clone()
    target[:, 0] = False  # shifted_targets never targets position 0
    values = head_scalars(value_head, pooled) if value_head is not None else None
    return tuple(_scatter(x, target) if x is not None else None for x in (logps, ent, values))


def logps_entropy(logits: torch.Tensor, labels: torch.Tensor, *, entropy: bool,
                  entropy_grad: bool = False):
    """log p(label) per row and (optionally) the entropy of each row's distribution, from one
    fp32 log-softmax. The log-probs equal :func:`alignkit.losses.logprobs.token_logps` (the
    same log-softmax, the label's entry), the entropy
    :func:`alignkit.losses.ppo.entropy_from_logits`. The entropy carries a gradient only with
    ``entropy_grad`` (an entropy bonus in the loss), else it is computed from the detached
    log-softmax, so it adds no (N, V) graph.

    Shapes: logits (N, V), labels (N,) → (N,) fp32, (N,) fp32 or None.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
    tok = logp.gather(-1, labels[:, None]).squeeze(-1)  # (N,)
    if not entropy:
        return tok, None
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        ent = entropy_from_logp(logp if entropy_grad else logp.detach())
    return tok, ent


def token_values(critic, input_ids, attention_mask, response_mask) -> torch.Tensor:
    """V(s_t) for each response token t, from the critic's hidden state at t − 1 (the state in
    which token t is chosen). Shapes: (B, T) each → (B, T) fp32, 0 off the mask."""
    trunk, head = split_reward_model(critic)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask,
                   use_cache=False).last_hidden_state  # (B, T, H)
    positions, _ = shifted_targets(input_ids, response_mask)
    values = head_scalars(head, hidden[positions])  # (N,)
    target = response_mask.clone()
    target[:, 0] = False
    return _scatter(values, target)


def _scatter(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N,) values in row-major order of mask's True entries → (B, T), 0 elsewhere
    (differentiable)."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values)


def forward_chunks(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices in chunks for no-grad forwards: rows sorted by length (stable), each chunk
    as many consecutive rows as fit ``max_tokens`` padded tokens (rows × its longest row; at
    least one row). Every row is in exactly one chunk."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[i] <= max_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def by_chunks(fn, chunks: list[list[int]], lengths: list[int], input_ids: torch.Tensor,
              attention_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple:
    """``fn(ids, attn, resp)`` run on each chunk of rows (a list of row indices, as
    :func:`forward_chunks` makes them), trimmed to its longest row (``lengths``: each row's
    real tokens, on the host), and its outputs put back in row order: a tuple, per output of
    ``fn`` (a tensor (b, w), 0 past each row's length, or None), a (B, T) tensor — what one call
    on all rows gives — or None. Differentiable: gradients flow back into every chunk."""
    B, T = input_ids.shape
    device = input_ids.device
    parts = []
    for rows in chunks:
        index = torch.tensor(rows, device=device)
        width = max(lengths[i] for i in rows)
        parts.append(fn(input_ids[index, :width], attention_mask[index, :width],
                        response_mask[index, :width]))
    order = torch.tensor([i for rows in chunks for i in rows], device=device)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(B, device=device)  # row r sits at inverse[r] of the concat
    outputs = []
    for k, first in enumerate(parts[0]):
        if first is None:
            outputs.append(None)
            continue
        stacked = torch.cat([torch.nn.functional.pad(p[k], (0, T - p[k].shape[1]))
                             for p in parts])  # (B, T), rows in chunk order
        outputs.append(stacked[inverse])
    return tuple(outputs)


@contextlib.contextmanager
def eval_mode(*models):
    modes = [(m, m.training) for m in models if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.train(was)


# ---------------------------------------------------------------------------------------------
# The models of a rollout


class Models:
    """Everything a rollout needs: policy, reference, critic, reward, tokenizer, runtime."""

    def __init__(self, cfg, ac, reference, reward, tokenizer, rt) -> None:
        self.cfg, self.ac, self.reference, self.reward = cfg, ac, reference, reward
        self.tokenizer, self.rt = tokenizer, rt
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @property
    def policy(self):
        return self.ac.policy

    def score(self, prompts: list[Prompt], completions, texts, finished) -> torch.Tensor:
        """(R,) raw scores from the reward function or model."""
        return self.reward(prompts, completions, texts, finished, self.cfg.rollout.batch_size)

    @torch.no_grad()
    def forward_all(self, buf: dict[str, torch.Tensor], *,
                    policy: bool = True) -> dict[str, torch.Tensor]:
        """old_logps, ref_logps, old_values (PPO) and entropy of every buffer row, on the CPU;
        without ``policy`` no policy forward runs, and old_logps and entropy are None.

        The rows run in chunks of similar length (:func:`forward_chunks`), each trimmed to its
        longest row and holding at most ``rollout.forward_tokens`` padded tokens: a few large
        forwards are slower on a CPU than several of a cache-friendly size (eager attention's
        (rows, heads, T, T) scores), and sorting by length leaves little padding.
        """
        lengths = buf["attention_mask"].sum(-1).tolist()
        inputs = [buf[k].to(self.rt.device)
                  for k in ("input_ids", "attention_mask", "response_mask")]

        shared = self.ac.value_head

        def evaluate(ids, attn, resp):
            lp = ent = vals = None
            if policy:
                lp, ent, vals = token_outputs(self.policy, ids, attn, resp, entropy=True,
                                              value_head=shared)
            with self.reference_ctx() as ref_model:
                ref, _ = token_logps_entropy(ref_model, ids, attn, resp, entropy=False)
            if self.ac.critic is not None:
                vals = token_values(self.ac.critic, ids, attn, resp)
            return lp, ref, vals, ent

        with eval_mode(self.ac.policy, self.ac.critic), self.rt.autocast():
            outs = by_chunks(evaluate, forward_chunks(lengths, self.cfg.rollout.forward_tokens),
                             lengths, *inputs)
        zeros = torch.zeros(buf["input_ids"].shape)
        out = {k: v.float().cpu() if v is not None else zeros.clone() for k, v in
               zip(("old_logps", "ref_logps", "old_values", "entropy"), outs)}
        if not policy:
            out["old_logps"] = out["entropy"] = None
            if shared is not None:
                out["old_values"] = None
        return out

    def reference_ctx(self):
        """The reference model for a block: the frozen copy, or the policy, adapters disabled."""
        from alignkit.models.reference import FrozenCopy
        if isinstance(self.reference, FrozenCopy):
            return contextlib.nullcontext(self.reference.model)
        return adapters_disabled(self.reference.policy)


# ---------------------------------------------------------------------------------------------
# One rollout


@dataclass
class RolloutResult:
    buffer: dict[str, torch.Tensor]  # CPU tensors, (R, T) / (R,)
    stats: dict  # host numbers for rollouts.jsonl
    samples: list[dict]  # a few (prompt, response, score) for samples.jsonl


def make_rollout(ctx, prompts: list[Prompt], *, beta: float, seed: int,
                 first_row: int = 0) -> RolloutResult:
    """Generate, score, evaluate and compute advantages for ``prompts`` (each ``group_k`` times).

    ``ctx`` (:class:`Models`) holds the policy, reference, critic,
    reward, tokenizer, runtime and config. Under data parallelism ``prompts`` is this process's
    share and ``first_row`` the index of its first row in the whole rollout; the buffer, stats
    and samples returned are the whole rollout's, the same on every process.
    """
    cfg = ctx.cfg
    k = cfg.group_k
    group = [p for p in prompts for _ in range(k)]  # prompt-major
    t0 = time.perf_counter()
    from_sampler = cfg.rollout.old_logps == "sampler"
    gens = _sample(ctx, group, seed, first_row, with_logps=from_sampler)
    t_gen = time.perf_counter() - t0
    completions = [g.completion_ids for g in gens]
    finished = torch.tensor([g.finished for g in gens])
    raw = ctx.score(group, completions, [g.text for g in gens], finished.tolist())  # (R,)
    t_score = time.perf_counter() - t0 - t_gen

    ids, attn = right_pad([p.ids + c for p, c in zip(group, completions)], ctx.pad_id)
    resp = torch.zeros_like(attn, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(group, completions)):
        resp[i, len(p.ids):len(p.ids) + len(c)] = True
    buf = {"input_ids": ids, "attention_mask": attn, "response_mask": resp}
    t1 = time.perf_counter()
    fwd = ctx.forward_all(buf, policy=not from_sampler)  # ref_logps, old_values, … on the CPU
    t_eval = time.perf_counter() - t1
    if from_sampler:
        fwd["old_logps"] = _scatter(torch.tensor([x for g in gens for x in g.logps]), resp)
        fwd["entropy"] = _scatter(torch.tensor([x for g in gens for x in g.entropies]), resp)
        if ctx.ac.value_head is not None:
            fwd["old_values"] = _scatter(torch.tensor([x for g in gens for x in g.values]), resp)
    samples = [{"prompt": p.text, "response": g.text, "score": float(s), "finished": g.finished}
               for p, g, s in zip(group, gens, raw.tolist())]
    buf, fwd, raw, finished, samples = _gather(buf, fwd, raw, finished, samples, ctx.pad_id)
    resp = buf["response_mask"]
    scores = shape_scores(raw, finished, cfg)  # over the whole rollout
    buf |= {"old_logps": fwd["old_logps"], "ref_logps": fwd["ref_logps"]}
    kl = torch.where(resp, kl_estimate(fwd["old_logps"], fwd["ref_logps"], cfg.estimator), 0)
    seq_kl = kl.sum(-1)  # (R,)
    stats = {"score": raw.mean().item(), "score_shaped": scores.mean().item(),
             "kl": seq_kl.mean().item(), "beta": beta,
             "response_length": resp.sum(-1).float().mean().item(),
             "finished": finished.float().mean().item(),
             "entropy": masked_mean(fwd["entropy"], resp).item(),
             "gen_s": round(t_gen, 4), "score_s": round(t_score, 4), "eval_s": round(t_eval, 4)}
    match cfg.algo:
        case "ppo":
            rewards = per_token_rewards(scores, kl, resp, beta)
            adv, returns = gae(rewards, fwd["old_values"], resp, gamma=cfg.gamma, lam=cfg.lam)
            stats["explained_variance"] = explained_variance(fwd["old_values"], returns,
                                                             resp).item()
            stats["value_mean"] = masked_mean(fwd["old_values"], resp).item()
            if cfg.whiten_advantages:
                adv = whiten(adv, resp)
            buf |= {"advantages": adv, "returns": returns, "old_values": fwd["old_values"]}
            stats["total_reward"] = rewards.sum(-1).mean().item()
        case "rloo":
            seq_reward = scores - beta * seq_kl
            a = rloo_advantages(seq_reward, k)
            buf["advantages"] = torch.where(resp, a[:, None], 0)
            stats["total_reward"] = seq_reward.mean().item()
        case "grpo":
            buf["seq_advantages"] = grpo_advantages(scores, k)
            stats["total_reward"] = (scores - beta * seq_kl).mean().item()
    return RolloutResult(buf, stats, samples)


def _sample(ctx, group: list[Prompt], seed: int, first_row: int, *, with_logps: bool = False):
    """Generations for ``group`` (rows ``first_row``… of the whole rollout), one ``generate``
    call per chunk of ``rollout.batch_size`` rollout rows, chunk c seeded from (seed, c);
    ``with_logps``: with each token's log-prob and entropy (and, with a critic sharing the
    policy's trunk, its value).
    Under ``train.compile`` the layers sample eagerly: their graphs serve the full forwards."""
    from alignkit.engine.loop import eager
    from alignkit.models.generate import generate
    ro, bs = ctx.cfg.rollout, ctx.cfg.rollout.batch_size
    gens, i = [], 0
    with eager(ctx.policy):
        while i < len(group):
            chunk = (first_row + i) // bs
            j = min(len(group), (chunk + 1) * bs - first_row)
            gens += generate(ctx.policy, ctx.tokenizer, [p.ids for p in group[i:j]],
                             max_new_tokens=ro.max_new_tokens, temperature=ro.temperature,
                             top_p=ro.top_p, batch_size=bs,
                             seed=(seed * 1_000_003 + chunk) % 2**63,
                             return_logps=with_logps, return_entropy=with_logps,
                             value_head=ctx.ac.value_head if with_logps else None,
                             autocast_dtype=ctx.rt.autocast_dtype,
                             attn_implementation=("sdpa" if ro.attn_implementation == "auto"
                                                  else ro.attn_implementation))
            i = j
    return gens


def _gather(buf: dict, fwd: dict, raw: torch.Tensor, finished: torch.Tensor, samples: list,
            pad_id: int):
    """Every process's rows, in process order, right padded to the longest (one all-gather)."""
    from alignkit.engine import dist
    parts = dist.all_gather_objects((buf, fwd, raw, finished, samples))
    if len(parts) == 1:
        return buf, fwd, raw, finished, samples
    width = max(b["input_ids"].shape[1] for b, *_ in parts)

    def cat(tensors: list[torch.Tensor], value) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)
                          for t in tensors])

    buf = {k: cat([b[k] for b, *_ in parts], pad_id if k == "input_ids" else 0) for k in buf}
    fwd = {k: cat([f[k] for _, f, *_ in parts], 0.0) for k in fwd}
    raw = torch.cat([r for _, _, r, _, _ in parts])
    finished = torch.cat([f for *_, f, _ in parts])
    return buf, fwd, raw, finished, [s for *_, ss in parts for s in ss]


def shape_scores(raw: torch.Tensor, finished: torch.Tensor, cfg) -> torch.Tensor:
    """Missing-EOS penalty, then per-rollout normalisation, then clipping. Shapes: (R,) → (R,)."""
    s = raw.float().clone()
    if cfg.rollout.missing_eos_penalty is not None:
        s = torch.where(finished, s, s - cfg.rollout.missing_eos_penalty)
    if cfg.reward_normalize and s.numel() > 1:
        s = (s - s.mean()) / (s.std() + 1e-8)
    if cfg.reward_clip is not None:
        s = s.clamp(-cfg.reward_clip, cfg.reward_clip)
    return s
