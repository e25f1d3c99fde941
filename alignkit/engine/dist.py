"""The only module that knows torch.distributed. Launch with torchrun; gloo on CPU, nccl on GPU."""

from __future__ import annotations

import os

import torch
import torch.distributed as td


def init() -> None:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or td.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("ALIGNKIT_DEVICE") != "cpu" \
        else "gloo"
    td.init_process_group(backend=backend)


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


def wrap_data_parallel(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if not td.is_initialized():
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, device_ids=ids)


def shutdown() -> None:
    if td.is_initialized():
        td.destroy_process_group()
