"""LoRA adapters through PEFT: apply, merge, and switch off to get the reference model for free.

With LoRA the frozen base weights *are* the reference policy (DPO, PPO's KL penalty): inside
:func:`adapters_disabled` the model computes exactly the base model's outputs, so no second copy
of the weights is needed.
"""

from __future__ import annotations

import contextlib
import copy
import sys

from alignkit.config.schema import LoraConfig
from alignkit.errors import AlignkitError


def apply_lora(model, cfg: LoraConfig):
    """Wrap ``model`` in a PEFT ``PeftModel`` (task CAUSAL_LM) with fresh LoRA adapters.

    Returns ``model`` unchanged when ``cfg.enabled`` is false. Otherwise PEFT injects the adapter
    layers into ``model`` in place and freezes every base weight; only the adapters train. LoRA's
    B matrices start at zero, so the wrapped model first computes exactly what ``model`` did.
    ``target_modules="all-linear"`` means every linear layer except the output head.
    Raises :class:`AlignkitError` for a model that already carries an adapter.
    """
    if not cfg.enabled:
        return model
    if is_peft(model):
        raise AlignkitError("the model already has a LoRA adapter: start from the merged model "
                            "folder, or set lora.enabled: false to keep training this adapter")
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    peft_config = PeftLoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.r, lora_alpha=cfg.alpha,
                                 lora_dropout=cfg.dropout, target_modules=targets)
    return get_peft_model(model, peft_config)


def is_peft(model) -> bool:
    """True for a PEFT ``PeftModel``."""
    # No PeftModel can exist unless peft was imported, so this never pays for importing it.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def merge_lora(model):
    """A plain model with the adapters folded into the weights; ``model`` itself is unchanged.

    Merges a deep copy (PEFT's ``merge_and_unload`` rewrites the layers it is given), so it needs
    memory for a second copy of the model for a moment. Raises ``ValueError`` for a non-PEFT model.
    """
    if not is_peft(model):
        raise ValueError("merge_lora needs a PeftModel")
    return copy.deepcopy(model).merge_and_unload()


@contextlib.contextmanager
def adapters_disabled(model):
    """Inside the block the ``PeftModel`` computes exactly its base model (the reference policy).

    The adapters come back on leaving the block, also on error. Raises ``ValueError`` for a
    non-PEFT model: there the reference needs its own copy, and silently using the policy itself
    as its own reference would hide that.
    """
    if not is_peft(model):
        raise ValueError("adapters_disabled needs a PeftModel (the model has no LoRA adapter)")
    with model.disable_adapter():
        yield model


def trainable_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; tied weights count once."""
    trainable = total = 0
    for param in model.parameters():  # parameters() yields a shared (tied) tensor once
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total
