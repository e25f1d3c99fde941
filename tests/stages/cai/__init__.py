"""Helpers for the Constitutional AI tests: a stand-in LM with known option logits, and a
deterministic fake generator."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Callable

import torch

FLOOR = -10.0  # every other token's logit: A and B are the two most likely tokens


class _Trunk(torch.nn.Module):
    """Hidden state h = rule(text of the row's real tokens), at every position: (R, T, 1)."""

    def __init__(self, tokenizer, rule: Callable[[str], float]) -> None:
        super().__init__()
        self.tokenizer, self.rule = tokenizer, rule

    def forward(self, input_ids, attention_mask=None, use_cache=False, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        rows = []
        for ids, keep in zip(input_ids.tolist(), mask.tolist()):
            text = self.tokenizer.decode([i for i, k in zip(ids, keep) if k])
            rows.append([[float(self.rule(text))]] * len(ids))
        return SimpleNamespace(last_hidden_state=torch.tensor(rows))


class _Head(torch.nn.Module):
    """logits = FLOOR except logit[A] = h/2 and logit[B] = −h/2, so that
    P(A) / (P(A) + P(B)) = sigmoid(h) exactly, whatever the rest of the vocabulary holds."""

    def __init__(self, vocab: int, a_id: int, b_id: int) -> None:
        super().__init__()
        self.vocab, self.a_id, self.b_id = vocab, a_id, b_id

    def forward(self, h):  # (..., 1) -> (..., V)
        logits = torch.full((*h.shape[:-1], self.vocab), FLOOR)
        logits[..., self.a_id] = h[..., 0] / 2
        logits[..., self.b_id] = -h[..., 0] / 2
        return logits


class ScriptedLM(torch.nn.Module):
    """A causal LM whose next-token logits are known exactly (see :class:`_Head`): it serves
    both as a LocalJudge (``get_decoder`` / ``get_output_embeddings``) and, with a constant
    rule, as a model that ``generate`` and ``serve`` can run (``forward`` without a cache)."""

    def __init__(self, tokenizer, rule: Callable[[str], float]) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device
        ids = tokenizer.convert_tokens_to_ids
        self.trunk = _Trunk(tokenizer, rule)
        self.head = _Head(len(tokenizer), ids("A"), ids("B"))

    def get_decoder(self):
        return self.trunk

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False,
                past_key_values=None):
        hidden = self.trunk(input_ids, attention_mask).last_hidden_state
        return SimpleNamespace(logits=self.head(hidden), past_key_values=None)


def sigmoid(x: float) -> float:
    return float(torch.sigmoid(torch.tensor(x, dtype=torch.float64)))


class FakeGenerator:
    """Deterministic answers from (seed, row in the call, prompt), like a sampler whose rows
    share one random stream; every call is recorded; ``fail_after`` calls, it raises."""

    name = "fake"

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self.fail_after = fail_after

    def describe(self) -> str:
        return "fake"

    def generate(self, prompts: list[str], *, seed: int) -> list[str]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls.append((list(prompts), seed))
        return [self.reply(p, seed, i) for i, p in enumerate(prompts)]

    @staticmethod
    def reply(prompt: str, seed: int, row: int) -> str:
        digest = hashlib.sha256(f"{seed}|{row}|{prompt}".encode()).hexdigest()[:8]
        return f"reply-{digest}"
