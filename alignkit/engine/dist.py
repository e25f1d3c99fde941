"""The process group and data parallelism: the only modules that know torch.distributed are this
one and :mod:`alignkit.engine.sharded` (FSDP2 and its checkpoints).

Launch with torchrun; gloo on CPU, nccl on GPU. ``train.parallel`` picks how the trained model
is spread over the processes: ``ddp`` replicates it and all-reduces gradients, ``fsdp`` shards
parameters, gradients and optimizer state (see sharded.py); ``auto`` is ddp with several
processes and nothing with one.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as td


def _backend(device: torch.device | None = None) -> str:
    if device is not None:
        return "nccl" if device.type == "cuda" else "gloo"
    return "nccl" if torch.cuda.is_available() and os.environ.get("ALIGNKIT_DEVICE") != "cpu" \
        else "gloo"


def init() -> None:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or td.is_initialized():
        return
    td.init_process_group(backend=_backend())


def init_single(device: torch.device) -> None:
    """A process group of this process alone. FSDP2 shards over a device mesh, so even one
    process needs a group; torchrun's environment is used when it is there, an in-process store
    otherwise (plain ``python``)."""
    if td.is_initialized():
        return
    if "MASTER_ADDR" in os.environ:
        td.init_process_group(backend=_backend(device))
    else:
        td.init_process_group(backend=_backend(device), store=td.HashStore(), rank=0,
                              world_size=1)


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place, and returned). A sync point: call once per step, not per metric."""
    if not td.is_initialized():
        return t
    if td.get_backend() == "nccl" and t.device.type != "cuda":
        # NCCL reduces GPU tensors only; host-side counts take a round trip.
        on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
        td.all_reduce(on_gpu, op=td.ReduceOp.SUM)
        t.copy_(on_gpu.cpu())
        return t
    td.all_reduce(t, op=td.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable: CPU tensors, lists, numbers), in rank order."""
    if not td.is_initialized() or td.get_world_size() == 1:
        return [obj]
    out = [None] * td.get_world_size()
    td.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if td.is_initialized():
        td.barrier()


def broadcast_object(obj):
    """Rank 0's value on every rank."""
    if not td.is_initialized():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def resolve_parallel(choice: str) -> str:
    """``train.parallel`` → "none", "ddp" or "fsdp" for this launch."""
    if choice == "fsdp":
        return "fsdp"  # also in one process: the same sharded code path and checkpoints
    return "ddp" if world_size() > 1 else "none"


def wrap_data_parallel(module: torch.nn.Module, device: torch.device, *,
                       reduce_dtype: str = "fp32") -> torch.nn.Module:
    """DDP over the loss module (one process: the module itself). Gradients are averaged over
    ranks in fp32, or sent as bf16 with ``reduce_dtype`` bf16 (half the traffic)."""
    if world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    net = DDP(module, device_ids=ids)
    if reduce_dtype == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook
        net.register_comm_hook(None, bf16_compress_hook)
    return net


def gradient_sync(net: torch.nn.Module, enabled: bool):
    """Context for one micro-batch's backward: ``enabled`` False skips the gradient all-reduce
    (DDP) or reduce-scatter (FSDP), which then happens once, on the step's last micro-batch."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(net, "no_sync"):  # DDP
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(net)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(net):
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def local_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor for a reduced DTensor (FSDP's gradient norm is one); others unchanged."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()
