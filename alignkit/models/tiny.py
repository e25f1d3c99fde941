"""Tiny random models and a byte-level tokenizer built in code, for tests and `--quick` runs.

The tokenizer mirrors the embedded SmolLM2 model's conventions (ChatML chat template,
``<|im_start|>`` as BOS, ``<|im_end|>`` as EOS and end of turn) over a 256-symbol byte alphabet,
so every string round-trips, nothing is downloaded, and masks can be checked token by token.
"""

from __future__ import annotations

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
TINY_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# ChatML, as SmolLM2-Instruct uses it (a default system turn only when the user gave none).
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer (no merges): token id = 3 + byte value, plus three specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    # Sort by the byte each symbol stands for, so ids are stable across tokenizers versions.
    byte_to_symbol = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[byte_to_symbol[b]] = len(SPECIAL_TOKENS) + b
    assert set(byte_to_symbol.values()) == set(byte_alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>", model_max_length=4096)
    fast.add_special_tokens({"additional_special_tokens": []})
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_model(*, seed: int = 0, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int = 128, max_positions: int = 1024,
               vocab_size: int = TINY_VOCAB_SIZE, tie_word_embeddings: bool = True):
    """A random Llama-architecture causal LM (the embedded model's family), deterministic in ``seed``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, max_position_embeddings=max_positions,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=tie_word_embeddings)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte→printable-character table that the ByteLevel pre-tokenizer uses."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}
