"""Models: load (hub id, folder, GGUF, the embedded default, tiny test models), LoRA, generation.

Names are re-exported lazily: ``import alignkit.models`` (and ``alignkit.models.tiny``) does not
import torch or transformers; the first use of a name below imports the module that defines it.
The ``generate`` function is not re-exported: its name is the submodule's, and Python binds
``alignkit.models.generate`` to the module once it is imported. Use
``from alignkit.models.generate import generate``.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EMBEDDED_NAME": "load",
    "embedded_model_dir": "load",
    "resolve_model_path": "load",
    "load_tokenizer": "load",
    "load_causal_lm": "load",
    "save_model": "load",
    "apply_lora": "lora",
    "is_peft": "lora",
    "merge_lora": "lora",
    "adapters_disabled": "lora",
    "trainable_parameters": "lora",
    "Generation": "generate",
    "tiny_model": "tiny",
    "tiny_tokenizer": "tiny",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
