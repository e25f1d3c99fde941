"""Scalar reward models: a causal-LM trunk with a one-output linear head on the last real token.

    r(x, y) = w · h_T,   h_T = the trunk's final hidden state at the last real token of x ⊕ y

(InstructGPT, Ouyang et al. 2022, §3.5: "the SFT model with the final unembedding layer removed",
a scalar projection instead). The model is a Hugging Face ``…ForSequenceClassification`` with
``num_labels=1`` so a saved reward model loads with ``AutoModelForSequenceClassification``.

Where we depart from Hugging Face's own forward: :func:`reward_scores` locates the last real
token from the ``attention_mask``, never from ``pad_token_id``. HF takes "the rightmost token that
is not the pad token", which is wrong whenever the pad token is also the EOS token (SmolLM2's
tokenizer pads with ``<|im_end|>``) and rows end with EOS, as every reward-model input here does:
HF would score the token *before* the EOS. So that users who call HF's forward on a saved model
still get the right position, :func:`use_distinct_pad` gives the model and tokenizer a pad token
that is not EOS where the vocabulary has one (``<|endoftext|>``, id 0 for SmolLM2 and the tiny
tokenizer). No token is ever added: the embeddings keep their size.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from alignkit.config.schema import LoraConfig, ModelConfig
from alignkit.errors import InputError
from alignkit.models import lora as _lora
from alignkit.models.load import (TINY_NAME, _hub_kwargs, _load_errors, load_causal_lm,
                                  load_tokenizer, resolve_model_path, save_model)

SEQ_CLS_SUFFIX = "ForSequenceClassification"
HEAD_NAME = "score"  # the head's attribute in every decoder …ForSequenceClassification of HF
# Pad tokens to try, in order, when the tokenizer pads with EOS (besides its own unk token).
# <|end_of_text|> and <|finetune_right_pad_id|> are Llama-3's (whose chat turns end in <|eot_id|>).
_PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>",
                   "<|end_of_text|>")


# ---------------------------------------------------------------------------------------------
# Loading


def load_reward_model(cfg: ModelConfig, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32, require_head: bool = False):
    """``(model, tokenizer)``: a one-output ``…ForSequenceClassification``, in eval mode.

    ``cfg.name_or_path`` is resolved as :func:`alignkit.models.load.load_causal_lm` does. A model
    whose config names a ``…ForSequenceClassification`` architecture (a saved reward model) loads
    as it is; any other is loaded as a causal LM whose trunk becomes the reward model's trunk
    (the LM head is dropped) under a fresh head drawn from N(0, 1/(H + 1)) with torch's global
    generator, so ``torch.manual_seed`` fixes it. ``require_head=True`` refuses a plain LM
    (scoring with an untrained head would be meaningless). The pad token is made distinct from
    EOS where possible (:func:`use_distinct_pad`). Attention follows ``cfg.attn_implementation``
    (auto: eager on the CPU, SDPA elsewhere), as for causal LMs.
    """
    source = resolve_model_path(cfg.name_or_path)
    device = torch.device(device)
    if _is_reward_model(source, cfg):
        with _load_errors(source):
            from transformers import AutoModelForSequenceClassification
            model = AutoModelForSequenceClassification.from_pretrained(source, dtype=dtype,
                                                                       **_hub_kwargs(cfg))
        if model.config.num_labels != 1:
            raise InputError(f"a reward model has one output; this classifier has "
                             f"{model.config.num_labels}", path=cfg.name_or_path)
        tokenizer = load_tokenizer(cfg)
    elif require_head:
        raise InputError("not a reward model (its config names no …ForSequenceClassification "
                         "architecture); train one with `alignkit reward`", path=cfg.name_or_path)
    else:
        lm, tokenizer = load_causal_lm(cfg, dtype=dtype, device="cpu")
        model = reward_model_from_lm(lm)
    use_distinct_pad(model, tokenizer)
    attn = cfg.attn_implementation
    if attn == "auto":  # the same rule as load_causal_lm (see ModelConfig)
        attn = "eager" if device.type == "cpu" else "sdpa"
    model.set_attn_implementation(attn)
    return model.to(device).eval(), tokenizer


def _is_reward_model(source: str, cfg: ModelConfig) -> bool:
    """Does ``source`` hold a saved …ForSequenceClassification (per its config's architectures)?"""
    if source == TINY_NAME or source.endswith(".gguf") or cfg.gguf_file:
        return False
    path = Path(source)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():  # an adapter folder: its base is a causal LM
            return False
        try:
            archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        except ValueError as err:
            raise InputError(f"cannot read the model config: {err}", path=str(config)) from err
    else:
        from transformers import AutoConfig
        with _load_errors(source):
            archs = AutoConfig.from_pretrained(source, **_hub_kwargs(cfg)).architectures or []
    return any(a.endswith(SEQ_CLS_SUFFIX) for a in archs)


def reward_model_from_lm(lm):
    """A one-output ``…ForSequenceClassification`` that takes over ``lm``'s trunk and config.

    The classifier shell is built on the meta device so the trunk is never randomly initialised
    only to be replaced. A PEFT model is merged first. Raises InputError for an architecture that
    transformers has no sequence-classification class for.
    """
    from transformers import AutoModelForSequenceClassification

    if _lora.is_peft(lm):
        lm = lm.merge_and_unload()
    # The trunk's layers keep a reference to this very config (attention implementation, pad
    # id): the classifier must share it, not a copy. ``lm`` is given up to the new model.
    config = lm.config
    config.num_labels = 1
    try:
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(config)
    except ValueError as err:
        raise InputError(f"model type '{config.model_type}' has no sequence-classification "
                         f"class in transformers, so it cannot carry a reward head") from err
    setattr(model, model.base_model_prefix, lm.get_decoder())
    trunk_param = next(lm.get_decoder().parameters())
    hidden = config.get_text_config().hidden_size
    head = torch.nn.Linear(hidden, 1, bias=False, dtype=trunk_param.dtype)
    # std 1/sqrt(H + 1), as in OpenAI's lm-human-preferences (Ziegler et al. 2019): initial rewards
    # are O(1) whatever the width, so the first Bradley–Terry steps neither saturate nor vanish.
    torch.nn.init.normal_(head.weight, std=1.0 / math.sqrt(hidden + 1))
    setattr(model, HEAD_NAME, head)
    model.name_or_path = lm.name_or_path
    return model


def use_distinct_pad(model, tokenizer) -> int | None:
    """Make the pad token something other than EOS (and BOS); returns the pad id now in use.

    Rows end with EOS, and HF's sequence-classification forward scores the rightmost token that is
    not ``config.pad_token_id``: with pad == EOS it would score the token before the EOS. Tries the
    tokenizer's pad, its unk, then common pad names present in the vocabulary; sets both
    ``tokenizer.pad_token`` and ``config.pad_token_id``. Where none exists the pad stays EOS:
    :func:`reward_scores` (which reads the attention mask) is still right, HF's forward is not.
    """
    config = _base(model).config
    taken = {tokenizer.eos_token_id, tokenizer.bos_token_id}
    vocab = tokenizer.get_vocab()
    for token in (tokenizer.pad_token, tokenizer.unk_token, *_PAD_CANDIDATES):
        if token is not None and token in vocab and vocab[token] not in taken:
            tokenizer.pad_token = token
            break
    config.pad_token_id = tokenizer.pad_token_id
    return tokenizer.pad_token_id


# ---------------------------------------------------------------------------------------------
# LoRA and saving


def apply_reward_lora(model, cfg: LoraConfig):
    """PEFT LoRA (task SEQ_CLS) on the trunk; the score head trains in full (``modules_to_save``).

    Returns ``model`` unchanged when ``cfg.enabled`` is false. The head is new, so low-rank
    updates of it would make no sense; ``"all-linear"`` excludes it from the LoRA targets.
    """
    if not cfg.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    peft_config = PeftLoraConfig(task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.alpha,
                                 lora_dropout=cfg.dropout, target_modules=targets,
                                 modules_to_save=[HEAD_NAME])
    return get_peft_model(model, peft_config)


def save_reward_model(model, tokenizer, out_dir: str | Path) -> None:
    """Write a reward model loadable by ``AutoModelForSequenceClassification.from_pretrained``.

    Hugging Face layout, safetensors, written atomically (:func:`alignkit.models.load.save_model`);
    LoRA adapters are merged into the saved weights (the adapter is kept in ``adapter/``). The pad
    token is made distinct from EOS first, so HF's own forward finds the last real token.
    """
    use_distinct_pad(model, tokenizer)
    save_model(model, tokenizer, out_dir)


# ---------------------------------------------------------------------------------------------
# Scoring


def _base(model):
    return model.get_base_model() if _lora.is_peft(model) else model


def split_reward_model(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(trunk, score head) of a ``…ForSequenceClassification``, also through a PEFT wrapper."""
    base = _base(model)
    return getattr(base, base.base_model_prefix), getattr(base, HEAD_NAME)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token: max{t : mask[t] = 1} (0 for an empty row).

    Shapes: attention_mask (R, T) → (R,) long.
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def pooled_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    position_ids: torch.Tensor | None = None,
                    last_index: torch.Tensor | None = None) -> torch.Tensor:
    """The trunk's final hidden state at each row's last real token: what the head reads.

    Two batch layouts give the same rows (up to kernel rounding):

    - plain: one sequence per row, a 2-D padding mask; the row's last real token is read;
    - prefix-shared (``position_ids`` and ``last_index`` given, from
      :func:`alignkit.data.preference.collate_shared`): one sequence per prompt with all its
      completions after it and a 4-D mask that keeps them apart, so the prompt is computed once;
      output row r reads flat position ``last_index[r]`` of the (B·T) states.

    Shapes: plain input_ids (R, T) long, attention_mask (R, T); shared input_ids (B, T),
    position_ids (B, T), attention_mask (B, 1, T, T) bool, last_index (R,) long
    → (R, H) in the trunk's compute dtype.
    """
    from alignkit.models.logps import trunk_states
    trunk, _ = split_reward_model(model)
    hidden = trunk_states(trunk, input_ids, attention_mask, position_ids)  # (B or R, T, H)
    if last_index is None:
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_token_index(attention_mask)]
    return hidden.reshape(-1, hidden.shape[-1])[last_index]


def head_linears(model) -> list[torch.nn.Linear]:
    """The score head's Linear layer(s): one, or PEFT's original and trainable copies."""
    head = split_reward_model(model)[1]
    return [m for m in head.modules() if isinstance(m, torch.nn.Linear)]


def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor | None = None,
                  last_index: torch.Tensor | None = None) -> torch.Tensor:
    """r = w · h_t for each row, t = its last real token, in fp32.

    One trunk forward over all rows (plain or prefix-shared: see :func:`pooled_features`); the
    head sees only the R pooled states. The head runs with autocast off on an fp32 input, so
    rewards are fp32 even under bf16 autocast (for an fp32 model; a low-precision model's head
    runs in its own dtype). Gradients flow when enabled.

    Shapes: input_ids (R, T) long, attention_mask (R, T) (or the shared layout of
    :func:`pooled_features`) → (R,) float32.
    """
    head = split_reward_model(model)[1]
    pooled = pooled_features(model, input_ids, attention_mask, position_ids,
                             last_index)  # (R, H)
    return head_scalars(head, pooled)


def head_scalars(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """A one-output head (a reward or value head) on hidden states, with autocast off on an
    input cast to the head's dtype: fp32 scalars even under bf16 autocast. Gradients flow
    when enabled. Shapes: (N, H) → (N,) float32."""
    with torch.autocast(hidden.device.type, enabled=False):
        return head(hidden.to(next(head.parameters()).dtype)).float().squeeze(-1)
