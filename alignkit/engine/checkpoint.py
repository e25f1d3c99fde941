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
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
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


def _sha256(path: Path) -> str:
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


def save(root: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         state: dict, *, keep: int) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically, then prune to the newest ``keep``."""
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
        manifest = {"step": step, "files": {f: _sha256(tmp / f) for f in _FILES}}
        (tmp / "manifest.json").write_text(json.dumps(manifest))
        for f in (*_FILES, "manifest.json"):
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        good = latest_good(root, quiet=True)
        kept = f"; the previous checkpoint {good.path} is intact" if good else ""
        raise AlignkitError(f"could not write checkpoint {final}: {e.strerror or e}{kept}") from None
    _prune(root, keep)
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted(root.glob("step-*"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None when the checkpoint is complete and every checksum matches; else what is wrong."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} is corrupted (checksum mismatch)"
    return None


def latest_good(root: Path, *, quiet: bool = False, log=print) -> Checkpoint | None:
    """The newest checkpoint whose checksums verify; corrupt ones are reported and skipped."""
    if not root.is_dir():
        return None
    for path in sorted(root.glob("step-*"), reverse=True):
        problem = verify(path)
        if problem is None:
            state = json.loads((path / "state.json").read_text())
            return Checkpoint(path, int(state["step"]), state)
        if not quiet:
            log(f"checkpoint {path} is unusable ({problem}); falling back to an earlier one")
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
            params[n].copy_(w)
    optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", weights_only=True))
    rng = torch.load(ckpt.path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate((3, tuple(rng["python"]), None))
