"""Batches: right-padded tensors, and length-grouped batch order for less padding."""

from __future__ import annotations

import random

from alignkit.data.templates import Encoded


def collate(examples: list[Encoded], *, pad_id: int,
            pad_to_multiple_of: int | None = None) -> dict:
    """Right-pad ``examples`` to a common length T (rounded up to ``pad_to_multiple_of``).

    Returns ``input_ids`` (B, T) long (``pad_id`` on padding), ``attention_mask`` (B, T) long
    (1 = real token) and ``loss_mask`` (B, T) bool (False on padding).
    """
    import torch

    if not examples:
        raise ValueError("collate needs at least one example")
    width = max(len(ex.input_ids) for ex in examples)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(examples), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros(shape, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros(shape, dtype=torch.bool)  # (B, T)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        input_ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = torch.tensor(ex.loss_mask, dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def length_grouped_batches(lengths: list[int], batch_size: int, *, seed: int,
                           shuffle: bool = True) -> list[list[int]]:
    """Batches of example indices with similar lengths; every index appears exactly once.

    Indices are shuffled (``random.Random(seed)``), split into mega-chunks of
    ``50 * batch_size``, each sorted by length (longest first) and cut into batches of
    ``batch_size`` (a chunk's last batch may be smaller); then the batch order is shuffled.
    Sorting only within chunks keeps batches random across the epoch while padding stays low.
    ``shuffle=False`` keeps the original order and skips both shuffles.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    chunk = 50 * batch_size
    batches = []
    for c in range(0, len(order), chunk):
        # stable sort: equal lengths keep their (shuffled) order, so the result depends on seed only
        group = sorted(order[c:c + chunk], key=lambda i: -lengths[i])
        batches += [group[b:b + batch_size] for b in range(0, len(group), batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches
