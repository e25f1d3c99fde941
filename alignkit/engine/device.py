"""Device and precision, resolved once from config and passed down (never at import time)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32

    def autocast(self):
        """Mixed precision: weights and optimizer stay fp32, matmuls run in bf16."""
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def _cpu_has_fast_bf16() -> bool:
    # AMX (Sapphire Rapids and later) or AVX512-BF16 make bf16 autocast a clear win on the CPU;
    # elsewhere bf16 is emulated and slower than fp32.
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_runtime(device: str = "auto", precision: str = "auto", *,
                    local_rank: int = 0) -> Runtime:
    """``device`` auto → cuda if available; ``precision`` auto → bf16 where the hardware is fast at it."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            from alignkit.errors import AlignkitError
            raise AlignkitError("device 'cuda' requested but no CUDA GPU is available")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        fast_bf16 = torch.cuda.is_bf16_supported()
    else:
        dev = torch.device("cpu")
        fast_bf16 = _cpu_has_fast_bf16()
    if precision == "bf16" or (precision == "auto" and fast_bf16):
        return Runtime(dev, torch.bfloat16)
    return Runtime(dev, None)


def set_num_threads(n: int | None) -> None:
    """Intra-op threads; under torchrun on a CPU the cores are split between ranks."""
    if n is None:
        world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        n = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(n)
