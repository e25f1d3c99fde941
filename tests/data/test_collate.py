import random
import subprocess
import sys

import pytest
import torch

from alignkit.data.collate import collate, length_grouped_batches
from alignkit.data.templates import Encoded


def test_collate_right_pads():
    batch = collate([Encoded([5, 6, 7], [False, True, True]), Encoded([8], [False])], pad_id=0)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].tolist() == [
        [5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].dtype == torch.long and batch["attention_mask"].tolist() == [
        [1, 1, 1], [1, 0, 0]]
    assert batch["loss_mask"].dtype == torch.bool and batch["loss_mask"].tolist() == [
        [False, True, True], [False, False, False]]


def test_collate_pad_to_multiple_and_pad_id():
    batch = collate([Encoded([5, 6, 7], [False, True, True])], pad_id=9, pad_to_multiple_of=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0]]
    assert batch["loss_mask"].tolist() == [[False, True, True, False]]


def test_collate_needs_examples():
    with pytest.raises(ValueError):
        collate([], pad_id=0)


_rng = random.Random(1)
LENGTHS = [_rng.randint(1, 500) for _ in range(1000)]


def test_length_grouped_batches_cover_every_index_once_and_are_seeded():
    batches = length_grouped_batches(LENGTHS, 8, seed=0)
    assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
    assert all(1 <= len(batch) <= 8 for batch in batches)
    assert batches == length_grouped_batches(LENGTHS, 8, seed=0)
    assert batches != length_grouped_batches(LENGTHS, 8, seed=1)


def _padded_tokens(batches):
    return sum(len(batch) * max(LENGTHS[i] for i in batch) for batch in batches)


def test_length_grouping_reduces_padding():
    order = list(range(len(LENGTHS)))
    random.Random(0).shuffle(order)
    plain = [order[i:i + 8] for i in range(0, len(order), 8)]
    grouped = length_grouped_batches(LENGTHS, 8, seed=0)
    # Lengths 1..500 in chunks of 400: sorted neighbours differ by ~1.25, so padding ~2%;
    # random batches of 8 pad to the expected max, ~8/9 * 500 per row (~75% overhead).
    assert _padded_tokens(grouped) < 0.6 * _padded_tokens(plain)
    assert _padded_tokens(grouped) < 1.05 * sum(LENGTHS)


def test_no_shuffle_sorts_within_chunks_in_order():
    lengths = [3, 1, 2, 5, 4]
    assert length_grouped_batches(lengths, 2, seed=0, shuffle=False) == [[3, 4], [0, 2], [1]]


def test_package_import_does_not_import_torch():
    code = ("import sys, alignkit.data; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
