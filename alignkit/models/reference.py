"""The reference policy π_ref of DPO (and of PPO's KL penalty): one interface, three ways to get it.

- ``copy``: a frozen deep copy of the starting model (eval mode, ``requires_grad`` off). Costs a
  second model's memory and a second forward per batch.
- ``adapters``: with LoRA the frozen base weights *are* the starting model, so the policy itself
  inside :func:`~alignkit.models.lora.adapters_disabled` is the reference. No second copy.
- ``precomputed``: the reference is only ever evaluated on the fixed training and eval pairs, so
  its log-probabilities are computed once before training (batched, ``no_grad``, under the run's
  autocast), kept in a table, and cached on disk under ``$ALIGNKIT_CACHE/reference_logps/``. Per
  step this costs nothing, and it also serves a ``reference_model`` different from the policy.

Every reference answers :meth:`Reference.logps` for the rows of a batch, and
:meth:`Reference.batch_inputs` lets the task put precomputed values into the batch (keyed by the
examples' row positions), so the loss module's forward has one signature whichever is used.

A *row* is one sequence (prompt + one completion). A task lays each split's rows out in a flat
table — example i owns a contiguous run of rows (2 for a pair: chosen then rejected) — and tells
the reference which table entries a batch's rows are (:class:`RowSource`). A batch may hold its
rows plain or prefix-shared (:mod:`alignkit.models.logps`); a live reference computes them the
way the batch lays them out, so policy and reference always take the same path.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Callable, Literal, Protocol

import torch

from alignkit.config.schema import DPOConfig
from alignkit.engine import dist
from alignkit.engine.device import Runtime
from alignkit.errors import AlignkitError
from alignkit.models.logps import batch_logps
from alignkit.models.lora import adapters_disabled, is_peft

ReferenceKind = Literal["copy", "adapters", "precomputed"]
SPLITS = ("train", "eval")
_CACHE_VERSION = 1  # bump when the table layout or the log-prob computation changes


class RowSource(Protocol):
    """What precomputation needs from a task: its rows, batched, and a digest of its data."""

    def num_examples(self, split: str) -> int: ...
    def num_rows(self, split: str) -> int: ...
    def model_inputs(self, indices: list[int], split: str) -> tuple[dict[str, torch.Tensor],
                                                                     torch.Tensor]:
        """(the model inputs of the batch's R rows in either layout of :func:`batch_logps`,
        their (R,) table positions)."""
        ...
    def fingerprint(self, split: str) -> str: ...
    # optional: ``example_length(i, split) -> int`` lets precomputation batch by length


class Reference(Protocol):
    kind: str

    def batch_inputs(self, rows: torch.Tensor, split: str) -> dict[str, torch.Tensor]:
        """Extra inputs the task adds to a batch whose rows sit at ``rows`` of ``split``."""
        ...

    def logps(self, ref_logps: torch.Tensor | None = None,
              **inputs: torch.Tensor) -> torch.Tensor:
        """(R,) reference Σ log p per row, detached; ``inputs`` are the batch's model inputs
        in either layout of :func:`batch_logps` (other keys are ignored)."""
        ...


def reference_kind(cfg: DPOConfig) -> ReferenceKind | None:
    """Resolve ``cfg.reference``; None for the reference-free SimPO.

    auto → ``adapters`` with LoRA (the base weights are the reference for free), else
    ``precomputed``; also ``precomputed`` when ``reference_model`` names another model, which
    disabled adapters cannot give.
    """
    if cfg.loss_type == "simpo":
        return None
    lora, other = cfg.model.lora.enabled, cfg.reference_model is not None
    kind = cfg.reference
    if kind == "auto":
        return "adapters" if lora and not other else "precomputed"
    if kind == "adapters" and not lora:
        raise AlignkitError("reference 'adapters' needs LoRA (model.lora.enabled: true); "
                            "use reference copy or precomputed for full fine-tuning")
    if kind == "adapters" and other:
        raise AlignkitError("reference 'adapters' is the starting model itself and cannot be "
                            "reference_model; use reference copy or precomputed")
    return kind


# ---------------------------------------------------------------------------------------------
# Live references


class FrozenCopy:
    """A deep copy of ``model`` taken now (or ``model`` itself with ``clone=False``): eval
    mode, no gradients, never stepped.

    Held outside the loss module's ``nn.Module`` tree on purpose: DDP must not broadcast or
    reduce it and checkpoints must not save it.
    """

    kind = "copy"

    def __init__(self, model: torch.nn.Module, *, clone: bool = True) -> None:
        # clone=False takes ownership of a model loaded only to be the reference
        self.model = (copy.deepcopy(model) if clone else model).eval().requires_grad_(False)

    def batch_inputs(self, rows: torch.Tensor, split: str) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def logps(self, ref_logps=None, **inputs) -> torch.Tensor:
        return batch_logps(self.model, inputs).logps


class AdaptersDisabled:
    """The LoRA policy with its adapters switched off: exactly the frozen base model."""

    kind = "adapters"

    def __init__(self, policy: torch.nn.Module) -> None:
        if not is_peft(policy):
            raise AlignkitError("reference 'adapters' needs a LoRA model")
        self.policy = policy

    def batch_inputs(self, rows: torch.Tensor, split: str) -> dict[str, torch.Tensor]:
        return {}

    @torch.no_grad()
    def logps(self, ref_logps=None, **inputs) -> torch.Tensor:
        # eval(): the reference is the deterministic starting model, so no dropout in the base
        # (the policy's own forward keeps whatever the training mode gives it).
        with eval_mode(self.policy), adapters_disabled(self.policy):
            return batch_logps(self.policy, inputs).logps


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """``model.eval()`` for the block, the previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Precomputed reference


class Precomputed:
    """Per-split flat tables of reference log-probs; a batch gathers its rows by position."""

    kind = "precomputed"

    def __init__(self, tables: dict[str, torch.Tensor], path: Path | None = None) -> None:
        self.tables, self.path = tables, path  # (rows,) fp32 on the CPU, per split

    def batch_inputs(self, rows: torch.Tensor, split: str) -> dict[str, torch.Tensor]:
        return {"ref_logps": self.tables[split][rows]}  # (R,)

    def logps(self, ref_logps=None, **inputs) -> torch.Tensor:
        if ref_logps is None:
            raise ValueError("a precomputed reference needs ref_logps in the batch")
        return ref_logps


def precomputed_reference(model: torch.nn.Module, source: RowSource, rt: Runtime, *,
                          batch_size: int, salt: dict | None = None,
                          log: Callable[[str], None] = print) -> Precomputed:
    """Reference log-probs of every row of ``source``, from the cache or computed once.

    The cache key (:func:`cache_fingerprint`) covers the model's weights, the encoded data of
    both splits, ``salt`` (the template, …) and how the numbers are computed (device type,
    autocast dtype, attention kernel), so a different model, data set or precision never reads
    stale values. Rank 0 decides hit or miss for every rank; on a miss the batches are shared
    out over the ranks and summed (one all-reduce), and rank 0 writes the file atomically.
    """
    fp = cache_fingerprint(model, source, rt, salt or {})
    path = cache_dir() / f"{fp}.safetensors"
    hit = dist.broadcast_object(path.is_file() if dist.is_main() else None)
    tables = _read_tables(path, source) if hit else None
    # every rank must take the same branch (the compute below is collective)
    misses = dist.all_reduce_sum(torch.tensor([float(tables is None)]))
    if misses.item() == 0:
        log(f"reference log-probs: loaded from the cache {path}")
        return Precomputed(tables, path)
    t0 = time.perf_counter()
    tables = compute_tables(model, source, rt, batch_size=batch_size, log=log)
    if dist.is_main():
        _write_tables(path, tables, fp)
    dist.barrier()
    rows = sum(t.numel() for t in tables.values())
    log(f"reference log-probs: computed for {rows} sequences in "
        f"{time.perf_counter() - t0:.1f}s; cached at {path}")
    return Precomputed(tables, path)


@torch.no_grad()
def compute_tables(model: torch.nn.Module, source: RowSource, rt: Runtime, *,
                   batch_size: int, log: Callable[[str], None] | None = None,
                   every_s: float = 30.0) -> dict[str, torch.Tensor]:
    """{split: (rows,) fp32 CPU} — every row's Σ log p under ``model``, as training computes it.
    With ``log``, a progress line every ``every_s`` seconds (a long pass must not look hung)."""
    ws, rank = dist.world_size(), dist.rank()
    tables = {}
    last = time.perf_counter()
    with eval_mode(model):
        for split in SPLITS:
            table = torch.zeros(source.num_rows(split), dtype=torch.float32, device=rt.device)
            order = _length_order(source, split)
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            mine = batches[rank::ws]  # each rank its share of the batches
            for done, indices in enumerate(mine, 1):
                inputs, rows = source.model_inputs(indices, split)
                inputs = {k: v.to(rt.device) for k, v in inputs.items()}
                with rt.autocast():
                    out = batch_logps(model, inputs)
                table[rows.to(rt.device)] = out.logps.float()
                if log is not None and time.perf_counter() - last >= every_s:
                    last = time.perf_counter()
                    log(f"reference log-probs ({split}): {done}/{len(mine)} batches")
            # entries a rank did not compute are 0, so the sum over ranks is the full table
            tables[split] = dist.all_reduce_sum(table).cpu()
    return tables


def _length_order(source: RowSource, split: str) -> list[int]:
    """Training examples longest first when the source knows lengths: batches of similar length
    waste less compute on padding (HH-RLHF train pairs at max_length 128, 16 pairs a batch: half
    the padded positions of data order, 9% fewer positions in all), and the longest batch runs
    first, so a batch too large for memory fails at once rather than at the end.

    The eval split keeps data order: evaluation runs its batches in data order at the same
    size, and under bf16 a row's log-prob depends on the shape of the batch it is computed in
    (measured on SmolLM2-135M: up to ~0.01 nats per sequence). Same batches, same numbers: the
    eval before the first step shows rewards of exactly 0, as policy = reference implies."""
    n = source.num_examples(split)
    lengths = getattr(source, "example_length", None)
    if lengths is None or split != "train":
        return list(range(n))
    return sorted(range(n), key=lambda i: (-lengths(i, split), i))


def cache_dir() -> Path:
    """``$ALIGNKIT_CACHE/reference_logps`` (default ``~/.cache/alignkit/reference_logps``)."""
    from alignkit.models.load import _cache_root
    return _cache_root() / "reference_logps"


def cache_fingerprint(model: torch.nn.Module, source: RowSource, rt: Runtime, salt: dict) -> str:
    """sha256 over everything the cached numbers depend on (see :func:`precomputed_reference`)."""
    key = {
        "version": _CACHE_VERSION,
        "model": parameter_digest(model),
        "data": {s: [source.fingerprint(s), source.num_rows(s)] for s in SPLITS},
        "device": rt.device.type,
        "autocast": str(rt.autocast_dtype),
        "attn": getattr(getattr(model, "config", None), "_attn_implementation", None),
        "salt": salt,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def parameter_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer: name, dtype, shape and raw bytes, in name order.

    Identifies the weights themselves, wherever they were loaded from (hub, folder, GGUF, the
    in-code tiny model). Reads every byte once: about a second per 500 MB.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # uint8 view: raw bytes for every dtype (numpy has no bfloat16)
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _read_tables(path: Path, source: RowSource) -> dict[str, torch.Tensor] | None:
    """The cached tables, or None (recompute) when unreadable or of the wrong size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tables = load_file(str(path))
    except (OSError, SafetensorError):
        return None
    if any(s not in tables or tables[s].numel() != source.num_rows(s) for s in SPLITS):
        return None
    return {s: tables[s].float() for s in SPLITS}


def _write_tables(path: Path, tables: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Write to a unique sibling and rename: readers see no file or the whole file."""
    from safetensors.torch import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        save_file({s: t.contiguous() for s, t in tables.items()}, str(tmp),
                  metadata={"fingerprint": fingerprint, "version": str(_CACHE_VERSION)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
