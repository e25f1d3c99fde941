"""THE training loop. Every stage supplies a :class:`Task` (batches + a loss module); the engine
owns ordering, accumulation, autocast, clipping, the schedule, checkpoints, logging and data
parallelism (``train.parallel``: DDP replicas, or FSDP2 shards with sharded checkpoints; see
:mod:`alignkit.engine.dist` and :mod:`alignkit.engine.sharded`).

Loss normalisation: a task's module returns the *sum* of its per-unit losses (units are loss
tokens for SFT, pairs for DPO) and every batch states its unit ``count``. Each optimizer step
divides by the count over all micro-batches and all ranks, so 1×8 equals 8×1 and two ranks
equal one rank with the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from alignkit.config.schema import TrainConfig
from alignkit.data.collate import length_grouped_batches
from alignkit.engine import checkpoint, dist, guards, sharded
from alignkit.engine.device import Runtime
from alignkit.engine.metrics import MetricsLog, Progress
from alignkit.errors import AlignkitError


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of the task module's forward
    count: int  # normalisation units in this batch (loss tokens, pairs, …)
    tokens: int  # non-pad tokens, for throughput
    ids: list[int] = field(default_factory=list)  # example indices, named when a loss goes NaN


class Task(Protocol):
    """What :func:`fit` trains on. A task may also define ``lengths(split) -> list[int]`` (the
    token length of each example: what its batches are padded to), which
    ``train.group_by_length`` needs."""

    def num_examples(self, split: str) -> int: ...
    def collate(self, indices: list[int], split: str) -> Batch: ...
    def module(self) -> torch.nn.Module:
        """forward(**batch.inputs) -> (loss_sum: scalar tensor, metric_sums: dict[str, tensor])."""
        ...


@dataclass
class FitResult:
    steps: int
    last: dict
    eval: dict | None
    resumed_from: int
    # Throughput of the optimizer steps this call ran (evals and saves excluded), all processes
    # together: examples (pairs, lists, sequences) and tokens per second.
    throughput: dict = field(default_factory=dict)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based): linear warmup, then decay."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                    lr_groups: Sequence[tuple[Sequence[torch.nn.Parameter], float]] = ()):
    """Fused AdamW over ``model``'s trainable parameters.

    ``lr_groups``: (parameters, peak lr) pairs that train at their own peak learning rate instead
    of ``cfg.lr`` (a freshly initialised head beside a pretrained trunk). Every group keeps its
    peak in ``base_lr``; the schedule scales each group's own peak.
    """
    special = {id(p): lr for params, lr in lr_groups for p in params}
    buckets: dict[tuple[float, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            # Norm gains and biases are not decayed (standard practice since BERT).
            key = (special.get(id(p), cfg.lr), p.ndim >= 2)
            buckets.setdefault(key, []).append(p)
    if not buckets:
        raise AlignkitError("the model has no trainable parameters")
    # The cfg.lr groups come first, so param_groups[0] carries the main learning rate.
    order = sorted(buckets, key=lambda k: (k[0] != cfg.lr, not k[1]))
    groups = [{"params": buckets[k], "lr": k[0], "base_lr": k[0],
               "weight_decay": cfg.weight_decay if k[1] else 0.0} for k in order]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
                             fused=device.type in ("cpu", "cuda"))


class _Order:
    """Which examples each rank takes at each step: a seeded permutation per epoch, cut into
    global batches (the partial tail is dropped so every step has the same global batch).

    With ``lengths`` (``train.group_by_length``) the epoch's order comes from
    :func:`alignkit.data.collate.length_grouped_batches` (sorted chunks of 50 global batches,
    shuffled batches) seeded by (seed, epoch), so a resumed run takes the same batches; the one
    partial batch goes last, where the tail is dropped."""

    def __init__(self, n: int, global_batch: int, seed: int,
                 lengths: Sequence[int] | None = None) -> None:
        self.n, self.g, self.seed = n, global_batch, seed
        self.lengths = None if lengths is None else list(lengths)
        self.steps_per_epoch = n // global_batch
        self._epoch, self._perm = -1, None

    def indices(self, step: int, rank: int, per_rank: int) -> list[int]:
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            seed = self.seed * 100_003 + epoch
            if self.lengths is None:
                gen = torch.Generator().manual_seed(seed)
                perm = torch.randperm(self.n, generator=gen).tolist()
            else:
                batches = length_grouped_batches(self.lengths, self.g, seed=seed)
                perm = [i for b in sorted(batches, key=lambda b: len(b) < self.g) for i in b]
            self._epoch, self._perm = epoch, perm
        start = pos * self.g + rank * per_rank
        return self._perm[start:start + per_rank]


def fit(task: Task, model: torch.nn.Module, cfg: TrainConfig, rt: Runtime, *, output: Path,
        log: Callable[[str], None] = print,
        lr_groups: Sequence[tuple[Sequence[torch.nn.Parameter], float]] = ()) -> FitResult:
    """Train ``model`` (its ``requires_grad`` parameters) on ``task``; resume from ``output``.

    ``lr_groups`` gives some parameters their own peak learning rate (:func:`build_optimizer`).
    """
    ws = dist.world_size()
    n = task.num_examples("train")
    lengths = None
    if cfg.group_by_length:
        if not hasattr(task, "lengths"):
            raise AlignkitError("train.group_by_length is not supported by this stage")
        lengths = task.lengths("train")
    order = _Order(n, cfg.batch_size * ws, cfg.seed, lengths)
    if order.steps_per_epoch == 0:
        raise AlignkitError(f"{n} training examples are fewer than one global batch "
                            f"({cfg.batch_size} × {ws} processes); lower --batch-size")
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * order.steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total)

    net, lr_groups = _parallel(task, model, cfg, rt, lr_groups)
    # After wrapping: FSDP replaces the parameters by their shards, which the optimizer steps.
    optimizer = build_optimizer(model, cfg, rt.device, lr_groups)
    compiled = compile_layers(model, log) if cfg.compile else []
    try:
        return _train(task, model, net, optimizer, order, cfg, rt, output=output, log=log,
                      total=total, warmup=warmup)
    finally:
        uncompile(compiled)  # whatever runs after training (saving, sampling) runs eagerly


def compile_layers(model: torch.nn.Module, log: Callable[[str], None] = print
                   ) -> list[torch.nn.Module]:
    """``torch.compile`` every decoder layer of ``model`` in place (regional compilation).

    In place (``Module.compile``), so parameter names, ``state_dict`` and checkpoints are those
    of the eager model; every layer runs the same code, so one graph serves them all (compiled
    on the first step, again at most once for a new kind of input such as the eval's no-grad
    pass); ``dynamic=True`` so new sequence lengths do not recompile. Returns the layers.
    """
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    on_cpu = any(p.device.type == "cpu" for p in model.parameters())
    if on_cpu and not cxx_compiler():
        raise AlignkitError("train.compile on the CPU needs a C++ compiler (g++, c++ or "
                            "clang++ on PATH, or $CXX) for torch.compile's generated kernels")
    if not layers:
        raise AlignkitError("train.compile: found no decoder layers (modules named "
                            "…DecoderLayer) to compile in this model")
    for layer in layers:
        layer.compile(dynamic=True)
    log(f"compiling {len(layers)} decoder layers with torch.compile (the first steps pay it)")
    return layers


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU kernels would be built with, if there is one."""
    import os
    import shutil
    names = [os.environ["CXX"]] if os.environ.get("CXX") else []
    return next((path for n in names + ["g++", "c++", "clang++"] if (path := shutil.which(n))),
                None)


def uncompile(layers: Sequence[torch.nn.Module]) -> None:
    """Undo :func:`compile_layers`: the layers run eagerly again."""
    for layer in layers:
        layer._compiled_call_impl = None


@contextlib.contextmanager
def eager(model: torch.nn.Module):
    """Run a block with every in-place compiled module of ``model`` eager (as
    :func:`compile_layers` left them, compiled again after). Sampling needs it: a decoding step
    feeds one token and a growing KV cache, shapes and cache objects a training graph would
    recompile for, and on a CPU a compiled decoding step ran slower than the eager one."""
    stashed = [(m, m._compiled_call_impl) for m in model.modules()
               if getattr(m, "_compiled_call_impl", None) is not None]
    for m, _ in stashed:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in stashed:
            m._compiled_call_impl = impl


def _train(task: Task, model: torch.nn.Module, net, optimizer, order: "_Order",
           cfg: TrainConfig, rt: Runtime, *, output: Path, log: Callable[[str], None],
           total: int, warmup: int) -> FitResult:
    """The loop of :func:`fit`, from resuming to the final evaluation."""
    ws, rank = dist.world_size(), dist.rank()
    micro = cfg.batch_size // cfg.grad_accum
    ckpt_root = output / "checkpoints"
    start = 0
    ck = checkpoint.latest_good(ckpt_root, log=log)
    if ck is not None:
        _load(ck, model, optimizer)
        start = ck.step
        log(f"resuming from {ck.path} (step {start}/{total})")
    if start >= total:
        log("training already reached its last step")

    params = [p for p in model.parameters() if p.requires_grad]
    metrics = MetricsLog(output / "metrics.jsonl", enabled=dist.is_main(), resume_step=start)
    bar = Progress(total, enabled=cfg.progress and dist.is_main(), start_step=start)
    last: dict = {}
    eval_result = None
    if cfg.eval_on_start and start == 0 and task.num_examples("eval") > 0:
        metrics.write({"step": 0, **evaluate(task, net, cfg, rt)})
    window = _Window()  # throughput counts training time only: evals and saves are excluded
    run_s, run_examples, run_tokens = 0.0, 0, 0
    model.train()
    for step in range(start, total):
        t_step = time.perf_counter()
        ids = order.indices(step, rank, cfg.batch_size)
        batches = [task.collate(ids[i:i + micro], "train") for i in range(0, len(ids), micro)]
        loss_sum, metric_sums, grad_norm = _step(net, batches, params, cfg, rt, ws)
        _guard(loss_sum, grad_norm, step + 1, ids, ckpt_root, rt, model)
        for group in optimizer.param_groups:
            peak = group.get("base_lr", cfg.lr)
            group["lr"] = peak * lr_factor(step, total, warmup, cfg.schedule)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.add(batches, loss_sum, metric_sums, grad_norm)
        run_examples += len(ids) * ws
        run_tokens += sum(b.tokens for b in batches) * ws  # an estimate: ranks' token counts differ
        done = step + 1
        if done % cfg.log_every == 0 or done == total:
            last = window.flush(rt.device) | {
                "step": done, "epoch": round(done / order.steps_per_epoch, 4),
                "lr": optimizer.param_groups[0]["lr"]}
            metrics.write(last)
            bar.update(done, {"loss": last["loss"], "tok/s": round(last["tokens_per_s"])})
        t_aside = time.perf_counter()
        if cfg.eval_every and done % cfg.eval_every == 0 and done != total:
            metrics.write({"step": done, **evaluate(task, net, cfg, rt)})
        if cfg.save_every and done % cfg.save_every == 0 and done != total:
            _save(ckpt_root, done, model, optimizer, cfg)
        window.t0 += time.perf_counter() - t_aside
        run_s += t_aside - t_step
    bar.close()
    if task.num_examples("eval") > 0:
        eval_result = evaluate(task, net, cfg, rt)
        metrics.write({"step": total, **eval_result})
    model.eval()
    throughput = {"train_s": round(run_s, 2), "steps": total - start,
                  "examples_per_s": run_examples / run_s if run_s > 0 else 0.0,
                  "tokens_per_s": run_tokens / run_s if run_s > 0 else 0.0}
    return FitResult(steps=total, last=last, eval=eval_result, resumed_from=start,
                     throughput=throughput)


def _parallel(task: Task, model: torch.nn.Module, cfg: TrainConfig, rt: Runtime,
              lr_groups: Sequence[tuple[Sequence[torch.nn.Parameter], float]]):
    """The module the loop calls (the task's loss module, as DDP or an FSDP root, or as it
    is) and ``lr_groups`` with the parameters as the optimizer must see them."""
    mode = dist.resolve_parallel(cfg.parallel)
    if mode != "fsdp":
        return dist.wrap_data_parallel(task.module(), rt.device,
                                       reduce_dtype=cfg.reduce_dtype), lr_groups
    dist.init_single(rt.device)  # FSDP needs a process group even for one process
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: lr for ps, lr in lr_groups for p in ps}
    gather_bf16 = cfg.fsdp_param_dtype == "bf16" and rt.autocast_dtype == torch.bfloat16
    net = sharded.shard(task.module(), model,
                        param_dtype=torch.bfloat16 if gather_bf16 else None,
                        reduce_dtype=torch.bfloat16 if cfg.reduce_dtype == "bf16"
                        else torch.float32, reshard_after_forward=cfg.reshard_after_forward)
    # fully_shard made new (DTensor) parameter objects: find the special ones again by name.
    now = dict(model.named_parameters())
    groups = [([now[n] for n, v in by_name.items() if v == lr], lr)
              for lr in sorted(set(by_name.values()))]
    return net, groups


def _load(ck: checkpoint.Checkpoint, model, optimizer) -> None:
    if sharded.is_sharded(model) != sharded.is_sharded_checkpoint(ck.path):
        kind = "sharded (fsdp)" if sharded.is_sharded_checkpoint(ck.path) else "unsharded"
        raise AlignkitError(f"checkpoint {ck.path} is {kind}; resume it with the "
                            f"train.parallel it was written with")
    if sharded.is_sharded(model):
        sharded.load(ck.path, model, optimizer)
    else:
        checkpoint.load(ck, model, optimizer)


def _step(net, batches: list[Batch], params, cfg: TrainConfig, rt: Runtime, ws: int):
    """Forward/backward over the micro-batches of one optimizer step; returns detached sums."""
    # One all-reduce per step gives every rank the global unit count before any backward.
    count = dist.all_reduce_sum(torch.tensor(float(sum(b.count for b in batches))))
    # DDP and FSDP average gradients over ranks; multiplying by ws undoes that.
    denom = max(count.item(), 1.0) / ws
    loss_total = torch.zeros((), device=rt.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for i, b in enumerate(batches):
        sync = ws == 1 or i == len(batches) - 1
        with dist.gradient_sync(net, sync):
            inputs = {k: v.to(rt.device, non_blocking=True) for k, v in b.inputs.items()}
            with rt.autocast():
                loss_sum, ms = net(**inputs)
            (loss_sum / denom).backward()
        loss_total += loss_sum.detach().float()
        for k, v in ms.items():
            metric_sums[k] = metric_sums.get(k, 0) + v.detach().float()
    if cfg.max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return loss_total, metric_sums, dist.local_value(grad_norm)


def _guard(loss_sum, grad_norm, step: int, ids: list[int], ckpt_root: Path, rt: Runtime,
           model=None) -> None:
    """Stop on NaN/inf before the optimizer applies it (alignkit.engine.guards); one function
    here so tests can hook the moment between backward and update."""
    guards.check_step(loss_sum, grad_norm, step=step, ids=ids, ckpt_root=ckpt_root,
                      params=model.named_parameters() if model is not None else ())


def _save(root: Path, step: int, model, optimizer, cfg: TrainConfig) -> None:
    if sharded.is_sharded(model):  # every rank writes its shard
        sharded.save(root, step, model, optimizer, keep=cfg.keep_checkpoints)
        return
    if dist.is_main():
        checkpoint.save(root, step, model, optimizer, {}, keep=cfg.keep_checkpoints)
    dist.barrier()


class _Window:
    """Sums since the last log line; reduced over ranks and moved to the host only when logged."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss, self.count, self.tokens, self.steps = 0.0, 0, 0, 0
        self.metrics: dict[str, torch.Tensor] = {}
        self.grad_norm = 0.0
        self.t0 = time.perf_counter()

    def add(self, batches, loss_sum, metric_sums, grad_norm) -> None:
        self.loss = self.loss + loss_sum
        self.count += sum(b.count for b in batches)
        self.tokens += sum(b.tokens for b in batches)
        for k, v in metric_sums.items():
            self.metrics[k] = self.metrics.get(k, 0) + v
        self.grad_norm, self.steps = grad_norm, self.steps + 1

    def flush(self, device) -> dict:
        keys = sorted(self.metrics)
        loss = torch.as_tensor(self.loss, device=device, dtype=torch.float32).reshape(())
        vec = torch.stack([loss,
                           torch.tensor(float(self.count), device=device),
                           torch.tensor(float(self.tokens), device=device)]
                          + [self.metrics[k].reshape(()).to(device) for k in keys])
        vec = dist.all_reduce_sum(vec).tolist()
        elapsed = time.perf_counter() - self.t0
        count = max(vec[1], 1.0)
        out = {"loss": vec[0] / count, "grad_norm": float(self.grad_norm),
               "tokens": int(vec[2]), "tokens_per_s": vec[2] / elapsed if elapsed > 0 else 0.0}
        out |= {k: v / count for k, v in zip(keys, vec[3:])}
        self.reset()
        return out


@torch.no_grad()
def evaluate(task: Task, net, cfg: TrainConfig, rt: Runtime) -> dict:
    """Held-out loss over the whole eval split (sharded over ranks), normalised by its unit count."""
    ws, rank = dist.world_size(), dist.rank()
    micro = cfg.batch_size // cfg.grad_accum
    n = task.num_examples("eval")
    mine = list(range(rank, n, ws))
    was_training = net.training
    net.eval()
    sums: dict[str, torch.Tensor] = {}
    loss, count = torch.zeros((), device=rt.device), 0
    for i in range(0, len(mine), micro):
        b = task.collate(mine[i:i + micro], "eval")
        inputs = {k: v.to(rt.device) for k, v in b.inputs.items()}
        with rt.autocast():
            ls, ms = net(**inputs)
        loss += ls.float()
        count += b.count
        for k, v in ms.items():
            sums[k] = sums.get(k, 0) + v.float()
    keys = sorted(sums)
    vec = torch.stack([loss, torch.tensor(float(count), device=rt.device)]
                      + [sums[k].reshape(()) for k in keys])
    vec = dist.all_reduce_sum(vec).tolist()
    net.train(was_training)
    denom = max(vec[1], 1.0)
    out = {"eval/loss": vec[0] / denom}
    out |= {f"eval/{k}": v / denom for k, v in zip(keys, vec[2:])}
    return out
