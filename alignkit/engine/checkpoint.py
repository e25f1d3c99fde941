"""Atomic, verifiable, resumable checkpoints.

Layout: ``<output>/checkpoints/step-000120/`` holding

- ``trainable.safetensors``  the parameters that train (all of them, or only the LoRA adapters),
- ``optimizer.pt``           optimizer state (tensors and numbers only: loaded with weights_only=True),
- ``rng.pt``                 torch (and CUDA) RNG states,
- ``state.json``             step and data position,
- ``manifest.json``          sha256 of every file above, written last.

A checkpoint is written into a hidden temporary folder and renamed into place, so a kill at any
moment leaves either the previous checkpoint set or the new one, never a half-written one that
looks complete. Loading verifies the checksums and falls back to the previous good checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from alignkit.errors import AlignkitError

_FILES = ("trainable.safetensors", "optimizer.pt", "rng.pt", "state.json")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # safetensors refuses views of shared storage; named_parameters already lists a tied
    # weight once, so no copy is needed on the CPU (a GPU tensor is copied to the host).
    return {n: p.detach().to("cpu").contiguous()
            for n, p in model.named_parameters() if p.requires_grad}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (the manifest's checksums)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# What a failed write raises: OSError from Python's own writes, SafetensorError from
# safetensors' Rust writer and RuntimeError from torch.save's zip writer (a full disk reads
# "unexpected pos 576 vs 534" there, so the message adds the free space).
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         state: dict, *, keep: int) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, then prune to the newest ``keep``.

    A failed write (a full disk above all) removes the half-written folder, leaves every
    earlier checkpoint as it was, and raises an AlignkitError naming the newest good one.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}))
        manifest = {"step": step, "files": {f: sha256_file(tmp / f) for f in _FILES}}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        for f in (*_FILES, "manifest.json"):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        _replace_dir(tmp, final)
        _fsync_dir(root)
    except _WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AlignkitError(_write_failure(root, final, e)) from None
    _prune(root, keep)
    return final


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``. A folder cannot be renamed onto a non-empty one, so an
    existing ``final`` (the same step saved again after a fallback) is first moved aside under
    a hidden name: a kill in between loses only that step, never an earlier checkpoint."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _write_failure(root: Path, final: Path, e: BaseException) -> str:
    what = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)).splitlines()
    what = what[0] if what else type(e).__name__
    try:
        free = f"; {shutil.disk_usage(root).free / 2**20:.1f} MiB free there"
    except OSError:
        free = ""
    good = latest_good(root, quiet=True)
    kept = (f"; the previous checkpoint {good.path} is intact" if good
            else "; no earlier checkpoint exists")
    return f"could not write checkpoint {final}: {what}{free}{kept}"


def _steps(root: Path) -> list[Path]:
    """The checkpoint folders under ``root``, oldest first (by step number, not by name)."""
    found = []
    for p in root.glob("step-*"):
        number = p.name[len("step-"):]
        if p.is_dir() and number.isdigit():
            found.append((int(number), p))
    return [p for _, p in sorted(found)]


def _prune(root: Path, keep: int) -> None:
    for old in _steps(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # Half-written folders of a process killed mid-save: never complete, never read.
    for stale in (*root.glob(".tmp-step-*"), *root.glob(".old-step-*")):
        shutil.rmtree(stale, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and every checksum matches; else what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or "state.json" not in files:
        return "the manifest lists no state.json"
    step = manifest.get("step")
    if isinstance(step, int) and path.name != f"step-{step:06d}":
        return f"the manifest is for step {step}"  # a folder renamed or copied by hand
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if sha256_file(f) != digest:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def latest_good(root: Path, *, quiet: bool = False, log=print) -> Checkpoint | None:
    """The newest checkpoint whose checksums verify; corrupt ones are reported (one line each)
    and skipped, so a run resumes from the previous good one."""
    if not root.is_dir():
        return None
    candidates = _steps(root)
    for path in reversed(candidates):
        problem = verify(path)
        if problem is None:
            try:
                state = json.loads((path / "state.json").read_text())
                return Checkpoint(path, int(state["step"]), state)
            except (OSError, ValueError, KeyError, TypeError):
                problem = "state.json is unreadable"
        if not quiet:
            log(f"checkpoint {path} is unusable ({problem}); falling back to an earlier one")
    if candidates and not quiet:
        log(f"none of the {len(candidates)} checkpoints in {root} is usable; starting from "
            f"the beginning")
    return None


def load(ckpt: Checkpoint, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore trainable weights, optimizer state and RNG exactly as saved."""
    weights = load_file(str(ckpt.path / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    unknown = [n for n in weights if n not in params]
    if missing or unknown:
        raise AlignkitError(f"checkpoint {ckpt.path} does not match the model "
                            f"({len(missing)} missing, {len(unknown)} unexpected parameters)")
    with torch.no_grad():
        for n, w in weights.items():
            if params[n].shape != w.shape:
                raise AlignkitError(f"checkpoint {ckpt.path} does not match the model "
                                    f"(parameter {n}: {tuple(w.shape)} saved, "
                                    f"{tuple(params[n].shape)} in the model)")
            params[n].copy_(w)
    try:
        # weights_only=True: tensors, numbers and containers only; a file that needs anything
        # else (a pickle that would run code) is refused, not executed.
        optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", weights_only=True))
        rng = torch.load(ckpt.path / "rng.pt", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, KeyError) as e:
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise AlignkitError(f"checkpoint {ckpt.path} cannot be restored (the optimizer "
                            f"settings changed since it was written?): {first}") from None
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((3, tuple(rng["python"]), None))
