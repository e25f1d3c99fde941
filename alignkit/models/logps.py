"""Summed sequence log-probabilities of a causal LM: the quantity every preference loss consumes.

For row r with target tokens t ∈ S_r (``loss_mask`` True, never position 0)::

    logps[r] = Σ_{t ∈ S_r} log p_θ(x_t | x_<t),        n_tokens[r] = |S_r|

The trunk runs once over all rows; the (V × H) LM head and the fp32 log-softmax run only on the
N positions that predict a target (the prompt of a preference pair is often most of its tokens,
and the head is the largest matmul of a small model). Per-row sums are one ``index_add`` over the
N token values: no Python loop over rows, no (R, T, V) tensor.

Two batch layouts give the same rows:

- plain (:func:`sequence_logps`): one sequence per row, prompt + completion, a 2-D padding mask;
- prefix-shared (:func:`shared_prefix_logps`): one sequence per prompt, ``[prompt | completion
  1 | completion 2 ...]`` with a 4-D attention mask that keeps completions apart, so a
  preference pair computes its prompt once instead of twice (built by
  :func:`alignkit.data.preference.collate_shared`).

:func:`batch_logps` takes either; the row order is the plain layout's in both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from alignkit.losses.logprobs import shifted_targets, token_logps


def split_lm(model: torch.nn.Module):
    """(trunk, lm_head) of a Hugging Face causal LM, also through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


# The model inputs of each layout, in the argument order of its function.
PLAIN_KEYS = ("input_ids", "attention_mask", "loss_mask")
SHARED_KEYS = ("input_ids", "position_ids", "attention_mask", "target_index", "source_index",
               "target_row", "n_tokens")


class SeqLogps(NamedTuple):
    logps: torch.Tensor  # (R,) fp32: Σ log p over each row's target tokens
    n_tokens: torch.Tensor  # (R,) long: how many target tokens each row has


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   loss_mask: torch.Tensor) -> SeqLogps:
    """Σ_t log p(x_t | x_<t) over each row's target tokens, and the target counts.

    ``model`` is a Hugging Face causal LM, also wrapped by PEFT (adapters on or disabled);
    gradients flow when called with grad enabled, and it runs under the caller's autocast (the
    log-softmax itself is fp32). A row with no target gets logps 0 and n_tokens 0.

    Shapes: input_ids (R, T) long, attention_mask (R, T), loss_mask (R, T) bool, right padded
    → SeqLogps of (R,) and (R,).
    """
    trunk, head = split_lm(model)
    hidden = trunk_states(trunk, input_ids, attention_mask)  # (R, T, H)
    positions, labels = shifted_targets(input_ids, loss_mask.bool())  # (R, T), (N,)
    tok = token_logps(head(hidden[positions]), labels)  # (N,) fp32
    # hidden[positions] and labels both enumerate targets in row-major order, so the row of the
    # n-th target is the n-th entry of the row index broadcast over the same mask.
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    row_of_target = rows.unsqueeze(1).expand_as(positions)[positions]  # (N,)
    logps = torch.zeros(input_ids.shape[0], dtype=tok.dtype, device=tok.device)
    logps = logps.index_add(0, row_of_target, tok)  # (R,)
    return SeqLogps(logps, positions.sum(-1))


def shared_prefix_logps(model: torch.nn.Module, input_ids: torch.Tensor,
                        position_ids: torch.Tensor, attention_mask: torch.Tensor,
                        target_index: torch.Tensor, source_index: torch.Tensor,
                        target_row: torch.Tensor, n_tokens: torch.Tensor) -> SeqLogps:
    """:func:`sequence_logps` of R completions laid out prefix-shared (several completions
    after one prompt in one sequence): the trunk runs once over the B sequences, the head and
    the fp32 log-softmax on the N targets alone, and the sums land in the R output rows.

    The batch is :func:`alignkit.data.preference.collate_shared`'s; the model must use eager
    or SDPA attention (see :func:`_attention_bias`). Gradients, autocast and PEFT as in
    :func:`sequence_logps`.

    Shapes: input_ids (B, T) long, position_ids (B, T) long, attention_mask (B, 1, T, T) bool,
    target_index (N,), source_index (N,), target_row (N,) long, n_tokens (R,) long
    → SeqLogps of (R,) and (R,).
    """
    trunk, head = split_lm(model)
    hidden = trunk_states(trunk, input_ids, attention_mask, position_ids)  # (B, T, H)
    sources = hidden.reshape(-1, hidden.shape[-1])[source_index]  # (N, H)
    tok = token_logps(head(sources), input_ids.reshape(-1)[target_index])  # (N,) fp32
    logps = torch.zeros(n_tokens.shape[0], dtype=tok.dtype, device=tok.device)
    return SeqLogps(logps.index_add(0, target_row, tok), n_tokens)  # (R,), (R,)


def trunk_states(trunk: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The decoder trunk's final hidden states for either batch layout: a 2-D padding mask
    (plain rows), or the prefix-shared layout's 4-D mask (B, 1, T, T) with its position ids,
    which goes to the attention kernel in the form it takes (:func:`_attention_bias`).

    Shapes: input_ids (B, T) long → (B, T, H) in the trunk's compute dtype.
    """
    if attention_mask.dim() == 4:
        attention_mask = _attention_bias(trunk, attention_mask)
    extra = {"position_ids": position_ids} if position_ids is not None else {}
    return trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                 **extra).last_hidden_state


def _attention_bias(trunk: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """The 4-D mask (True = may attend) in the form the trunk's attention kernel takes.

    transformers (5.x, ``masking_utils._preprocess_mask_arguments``) hands a 4-D mask to the
    attention function unchanged, whatever the implementation. SDPA reads a boolean mask as
    True = attend. Eager *adds* the mask to the scores, so a boolean would add 0/1 and mask
    nothing: it gets 0 where True and the dtype's minimum elsewhere, in the dtype of the
    embeddings, as transformers' own ``eager_mask`` builds it for a 2-D mask. Other kernels
    (flash attention, flex) take no 4-D tensor mask.
    """
    impl = trunk.config._attn_implementation
    match impl:
        case "sdpa":
            return mask
        case "eager":
            dtype = trunk.get_input_embeddings().weight.dtype
            zero = torch.zeros((), dtype=dtype, device=mask.device)
            return torch.where(mask, zero, torch.finfo(dtype).min)
        case _:
            raise ValueError(f"prefix sharing needs eager or sdpa attention, not {impl!r}")


def batch_logps(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor]) -> SeqLogps:
    """:func:`sequence_logps` or :func:`shared_prefix_logps`, whichever layout ``inputs``
    holds (the prefix-shared one has ``target_row``); other keys (``ref_logps``, ``label``…)
    are ignored. The rows come out in the plain layout's order either way."""
    if "target_row" in inputs:
        return shared_prefix_logps(model, *(inputs[k] for k in SHARED_KEYS))
    return sequence_logps(model, *(inputs[k] for k in PLAIN_KEYS))
