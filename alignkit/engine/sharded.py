"""Fully sharded data parallelism (PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard``) and its
checkpoints (``torch.distributed.checkpoint``, DCP).

Sharding: every decoder layer (the classes a Hugging Face model lists in ``_no_split_modules``)
is one FSDP unit, and an engine root around the task's loss module holds the rest (embeddings,
final norm, LM or value heads), so a layer's parameters are gathered just before its forward
and freed after it. Parameters, gradients and AdamW state live as 1/N shards on each of N ranks;
the optimizer steps fp32 shards. Mixed precision (``MixedPrecisionPolicy``): by default the fp32
weights are gathered and the engine's bf16 autocast runs the matmuls, so FSDP computes the very
numbers DDP and one process compute; ``train.fsdp_param_dtype: bf16`` gathers bf16 copies
instead (half the traffic; bf16 residual stream). Gradients are reduced in
``train.reduce_dtype`` (fp32 by default). The loss module's own float inputs (reference
log-probs, advantages) are never cast: they are targets, not activations.

Each process loads the whole model before it is sharded (the stages load models as usual): the
fp32 weights must fit on one device once, at load time; from the first step on, weights,
gradients and AdamW state take 1/N of that each (frozen references stay whole on every rank).

Checkpoints: ``<output>/checkpoints/step-NNNNNN/`` holds DCP's files (``.metadata`` and one
``__R_0.distcp`` per rank: model and optimizer shards), ``rng-RRRRR.pt`` per rank,
``state.json`` and ``manifest.json`` (sha256 of every file) in the layout
:mod:`alignkit.engine.checkpoint` reads, so its ``latest_good`` finds, verifies and falls back
over sharded checkpoints too. Written into a hidden folder and renamed, like the plain ones.
Every rank writes its own shard: several nodes need a shared file system for ``output``.
DCP reshards on load, so a run may resume on another number of processes.

The final model: :func:`gathered` collects the full weights on rank 0 into a plain copy of the
model (made on the meta device before sharding, so it costs no memory until then), which the
stages save as a Hugging Face folder as usual; :func:`export` turns a sharded checkpoint into
such a folder offline, in one process.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import weakref
from pathlib import Path

import torch

from alignkit.engine import checkpoint, dist
from alignkit.errors import AlignkitError

# A sharded module (the trained model and each of its submodules) → its plain twin, whose
# parameters stay on the meta device until gathered() fills them. Weak: dies with the model.
_PLAIN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# The trained model → a weak reference to the FSDP root that shards it (for call_unsharded);
# weak, since the root holds the model and a strong value would keep its key alive forever.
_ROOT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

DCP_METADATA = ".metadata"


class ShardedRoot(torch.nn.Module):
    """The outermost FSDP unit: the task's loss module, plus :meth:`call` to run the model
    outside a training forward (PPO's generation) with FSDP's gathers in place."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **inputs):
        return self.inner(**inputs)

    def call(self, fn, *args, **kwargs):  # registered as an FSDP forward method in shard()
        return fn(*args, **kwargs)


def decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: instances of the classes that Hugging Face
    models name in ``_no_split_modules`` (LlamaDecoderLayer, …), innermost first."""
    names: set[str] = set()
    for m in module.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    return [m for m in reversed(list(module.modules())) if type(m).__name__ in names]


def shard(loss_module: torch.nn.Module, model: torch.nn.Module, *,
          param_dtype: torch.dtype | None, reduce_dtype: torch.dtype,
          reshard_after_forward: bool) -> ShardedRoot:
    """Shard ``model`` (the trained module, inside ``loss_module``) in place; returns the root
    to call instead of ``loss_module``. ``model``'s parameters become DTensor shards: build the
    optimizer over them afterwards."""
    from torch.distributed.fsdp import (MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    _remember_plain(model)
    root = ShardedRoot(loss_module)
    # Layers cast their (activation) inputs to the compute dtype; the root does not, since its
    # float inputs are fp32 targets (reference log-probs, advantages, returns).
    layer_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    root_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                                   cast_forward_inputs=False)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=layer_mp, reshard_after_forward=reshard_after_forward)
    fully_shard(root, mp_policy=root_mp, reshard_after_forward=reshard_after_forward)
    register_fsdp_forward_method(root, "call")
    _ROOT[model] = weakref.ref(root)
    return root


def is_sharded(model: torch.nn.Module) -> bool:
    return model in _PLAIN


def call_unsharded(model: torch.nn.Module, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, where ``fn`` runs ``model``'s modules outside the training
    forward (generation, a no-grad scoring pass). For a sharded model it runs as a forward of the
    FSDP root, so the root's parameters are gathered and each layer gathers its own; every rank
    must make the call. A plain call otherwise."""
    ref = _ROOT.get(model)
    root = ref() if ref is not None else None
    if root is None:
        return fn(*args, **kwargs)
    return root.call(fn, *args, **kwargs)


def _remember_plain(model: torch.nn.Module) -> None:
    """Deep-copy ``model`` with every parameter replaced by a meta tensor (no memory): the plain
    twin that gathered() fills. Buffers (rotary tables, …) are copied as they are."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                      requires_grad=p.requires_grad)
            for p in model.parameters()}
    twin = copy.deepcopy(model, memo)
    for original, plain in zip(model.modules(), twin.modules()):
        _PLAIN[original] = plain


def gathered(module: torch.nn.Module) -> torch.nn.Module | None:
    """The full weights of a sharded ``module`` (the trained model or a submodule of it) in a
    plain fp32 copy on rank 0's CPU, for ``save_pretrained``; None on the other ranks. Every rank
    must call it (one all-gather per tensor). An unsharded module is returned as it is."""
    plain = _PLAIN.get(module)
    if plain is None:
        return module
    from torch.distributed.tensor import DTensor
    main = dist.is_main()
    state = {}
    for name, t in module.state_dict().items():
        if isinstance(t, DTensor):
            t = t.full_tensor()  # collective: every rank, same order
        if main:
            state[name] = t.detach().to("cpu", torch.float32 if t.is_floating_point() else None,
                                        copy=True)
    if not main:
        return None
    plain.load_state_dict(state, assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()  # assign=True gave tied weights two Parameter objects
    return plain


# ---------------------------------------------------------------------------------------------
# Checkpoints


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_METADATA).is_file()


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
         keep: int) -> Path:
    """Write the sharded checkpoint ``step`` (every rank calls this), then keep the newest
    ``keep``. Each rank hashes the files it wrote; rank 0 writes the manifest and renames."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    rank = dist.rank()
    try:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / f"rng-{rank:05d}.pt")
        mine = [f.name for f in tmp.iterdir()
                if f.name.startswith(f"__{rank}_") or f.name == f"rng-{rank:05d}.pt"]
        digests = {name: checkpoint.sha256_file(tmp / name) for name in mine}
    except (OSError, RuntimeError) as e:
        raise AlignkitError(f"could not write sharded checkpoint {final}: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    everyone = dist.all_gather_objects(digests)
    if dist.is_main():
        files = {k: v for d in everyone for k, v in d.items()}
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        for name in (DCP_METADATA, "state.json"):
            files[name] = checkpoint.sha256_file(tmp / name)
        (tmp / "manifest.json").write_text(json.dumps({"step": step, "files": files}))
        _fsync_all(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _prune(root, keep)
    dist.barrier()
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore model and optimizer shards and this rank's RNG from the checkpoint at ``path``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except (RuntimeError, ValueError, KeyError) as e:
        raise AlignkitError(f"sharded checkpoint {path} does not match the model or optimizer: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    rng_file = Path(path) / f"rng-{dist.rank():05d}.pt"
    if rng_file.is_file():  # absent when resuming on more processes than wrote it
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def export(path: Path, model: torch.nn.Module, tokenizer, out_dir: Path) -> Path:
    """Gather a sharded checkpoint into one Hugging Face folder (safetensors), in one process and
    without a process group. ``model`` is a plain model of the trained structure (the starting
    model, with LoRA applied if the run used it); its weights are replaced by the checkpoint's."""
    import torch.distributed.checkpoint as dcp
    from alignkit.models.load import save_model
    if not is_sharded_checkpoint(path):
        raise AlignkitError(f"{path} is not a sharded checkpoint (no {DCP_METADATA})")
    import warnings
    state = model.state_dict()
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"model": state}, checkpoint_id=str(path), no_dist=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise AlignkitError(f"sharded checkpoint {path} does not match the model: "
                            f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    model.load_state_dict(state)
    save_model(model, tokenizer, out_dir)
    return Path(out_dir)


def _fsync_all(folder: Path) -> None:
    for f in folder.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    steps = sorted((p for p in root.glob("step-*") if p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
