"""Property-based tests (hypothesis) of the data path on the tiny byte-level tokenizer (byte b is
id 3 + b, BOS 1, EOS 2): label masks are True exactly on the assistant turns and their end
token, truncation keeps its promises, packing holds the same tokens as padding, and preference
pairs share their prompt and end every completion with EOS.

Each test keeps max_examples small so the file runs in seconds.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.data.collate import collate
from alignkit.data.formats import Conversation, TextDoc
from alignkit.data.preference import (EncodedPair, PreferencePair, RankedList, collate_pairs,
                                      pairs_from_ranked, tokenize_preferences)
from alignkit.data.templates import Encoded, encode_conversation, encode_prompt
from alignkit.data.tokenize import pack_documents, tokenize_sft

from .helpers import BOS, EOS, PAD, b

FAST = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TEMPLATES = st.sampled_from(["chat", "inst", "plain"])
# Printable text without the tiny tokenizer's special-token spellings ("<|im_end|>" typed by a
# user would be read as the token itself: a template's business, tested elsewhere).
_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                max_size=24).filter(lambda s: s.strip() and "<|" not in s)


@st.composite
def conversations(draw, max_turns: int = 3) -> Conversation:
    """[system] user assistant (user assistant)…: 1 to ``max_turns`` exchanges."""
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_text)})
    for _ in range(draw(st.integers(1, max_turns))):
        messages += [{"role": "user", "content": draw(_text)},
                     {"role": "assistant", "content": draw(_text)}]
    return Conversation(tuple(messages), "prop.jsonl:1")


def _runs(mask: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ---------------------------------------------------------------------------------------------
# Label masks


@FAST
@given(conv=conversations(), template=TEMPLATES)
def test_mask_is_true_exactly_on_each_assistant_turn_and_its_end_token(tok, conv, template):
    enc = encode_conversation(tok, conv, template)
    assert len(enc.input_ids) == len(enc.loss_mask)
    replies = [m["content"] for m in conv.messages if m["role"] == "assistant"]
    runs = _runs(enc.loss_mask)
    assert len(runs) == len(replies)  # one target run per assistant turn, none elsewhere
    for (start, end), reply in zip(runs, replies):
        # inst puts the space after [/INST] in the target (see templates' module docstring)
        expected = b(" " + reply if template == "inst" else reply) + [EOS]
        assert enc.input_ids[start:end] == expected


@FAST
@given(conv=conversations(), template=TEMPLATES)
def test_the_prompt_encodes_to_the_untargeted_prefix(tok, conv, template):
    prompt = encode_prompt(tok, list(conv.messages[:-1]), template)
    enc = encode_conversation(tok, conv, template)
    n = len(prompt)
    assert enc.input_ids[:n] == prompt
    last_start = _runs(enc.loss_mask)[-1][0]
    assert last_start == n  # the last reply's targets start right after its prompt


@FAST
@given(convs=st.lists(conversations(max_turns=2), min_size=1, max_size=4), template=TEMPLATES,
       max_length=st.integers(2, 120),
       truncation=st.sampled_from(["truncate_left", "truncate_right", "drop"]))
def test_truncation_keeps_its_promises(tok, convs, template, max_length, truncation):
    kept, report = tokenize_sft(tok, convs, template=template, max_length=max_length,
                                truncation=truncation)
    assert report.total == len(convs) == report.kept + sum(report.dropped.values())
    assert report.kept == len(kept) and report.truncated <= report.kept
    for enc in kept:
        assert 1 <= sum(enc.loss_mask) and len(enc.input_ids) <= max_length
        assert enc.loss_mask[0] is False  # nothing precedes position 0 to predict it
    if truncation == "truncate_left":
        for enc in kept:  # a BOS that opened the example still opens it
            assert enc.input_ids[0] == BOS
    if truncation == "drop":
        full = [encode_conversation(tok, c, template) for c in convs]
        assert report.kept == sum(len(e.input_ids) <= max_length for e in full)


# ---------------------------------------------------------------------------------------------
# Packing equals padding


@FAST
@given(texts=st.lists(_text, min_size=1, max_size=6), block=st.integers(2, 40))
def test_packing_holds_the_same_tokens_as_padding(tok, texts, block):
    blocks, report = pack_documents(tok, [TextDoc(t, f"d:{i}") for i, t in enumerate(texts)],
                                    block_size=block)
    # padding: each document alone, [BOS] text EOS, right-padded into one batch
    rows = [Encoded([BOS] + b(t) + [EOS], [True] * (len(b(t)) + 2)) for t in texts]
    padded = collate(rows, pad_id=PAD)
    unpadded = [i for row, m in zip(padded["input_ids"].tolist(),
                                    padded["attention_mask"].tolist())
                for i, keep in zip(row, m) if keep]
    packed = [i for blk in blocks for i in blk.input_ids]
    assert packed == unpadded[:len(packed)]  # same tokens, same order
    assert report.total == len(unpadded) == report.kept + report.dropped.get("partial_block", 0)
    assert report.dropped.get("partial_block", 0) < block
    for blk in blocks:
        assert len(blk.input_ids) == block and blk.loss_mask == [False] + [True] * (block - 1)


@FAST
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5),
       multiple=st.none() | st.integers(1, 8))
def test_collate_pads_without_touching_content(lengths, multiple):
    rows = [Encoded(list(range(3, 3 + n)), [i % 2 == 0 for i in range(n)]) for n in lengths]
    batch = collate(rows, pad_id=PAD, pad_to_multiple_of=multiple)
    width = batch["input_ids"].shape[1]
    assert width >= max(lengths) and (multiple is None or width % multiple == 0)
    for r, row in enumerate(rows):
        n = len(row.input_ids)
        assert batch["input_ids"][r, :n].tolist() == row.input_ids
        assert batch["loss_mask"][r, :n].tolist() == row.loss_mask
        assert batch["attention_mask"][r].sum() == n
        assert not batch["loss_mask"][r, n:].any() and (batch["input_ids"][r, n:] == PAD).all()


# ---------------------------------------------------------------------------------------------
# Pair construction


@st.composite
def pairs(draw) -> PreferencePair:
    conv = draw(conversations(max_turns=2))
    chosen, rejected = draw(_text), draw(_text)
    if chosen.strip() == rejected.strip():
        rejected = rejected + " not"
    return PreferencePair(conv.messages[:-1], chosen, rejected, source="prop.jsonl:1")


@FAST
@given(items=st.lists(pairs(), min_size=1, max_size=4), template=TEMPLATES)
def test_pairs_share_their_prompt_and_end_every_completion_with_eos(tok, items, template):
    encoded, report = tokenize_preferences(tok, items, template=template, max_length=10_000,
                                           truncation="truncate_left")
    assert report.kept == len(items) == len(encoded) and report.truncated == 0
    for pair, enc in zip(items, encoded):
        assert enc.prompt_ids == encode_prompt(tok, list(pair.prompt), template)
        for reply, ids in ((pair.chosen, enc.chosen_ids), (pair.rejected, enc.rejected_ids)):
            assert ids == b(" " + reply if template == "inst" else reply) + [EOS]
    batch = collate_pairs(encoded, pad_id=PAD)
    n = len(encoded)
    for i, enc in enumerate(encoded):  # row i: prompt + chosen, row n + i: prompt + rejected
        p = len(enc.prompt_ids)
        for row, completion in ((i, enc.chosen_ids), (n + i, enc.rejected_ids)):
            assert batch["input_ids"][row, :p].tolist() == enc.prompt_ids
            mask = batch["loss_mask"][row].tolist()
            assert mask == [False] * p + [True] * len(completion) + [False] * (
                len(mask) - p - len(completion))


@FAST
@given(items=st.lists(pairs(), min_size=1, max_size=3), template=TEMPLATES,
       max_length=st.integers(4, 60))
def test_truncated_pairs_fit_and_keep_their_bos(tok, items, template, max_length):
    encoded, report = tokenize_preferences(tok, items, template=template, max_length=max_length,
                                           truncation="truncate_left")
    assert report.total == len(items) == report.kept + sum(report.dropped.values())
    for enc in encoded:
        assert isinstance(enc, EncodedPair) and enc.chosen_ids != enc.rejected_ids
        assert enc.prompt_ids[0] == BOS
        longest = max(len(enc.chosen_ids), len(enc.rejected_ids))
        assert len(enc.prompt_ids) + longest <= max_length


@FAST
@given(conv=conversations(max_turns=1), replies=st.lists(_text, min_size=2, max_size=5,
                                                         unique_by=str.strip))
def test_ranked_lists_become_every_ordered_pair_with_one_prompt(conv, replies):
    item = RankedList(conv.messages[:-1], tuple(replies), "prop.jsonl:1")
    got = pairs_from_ranked(item)
    k = len(replies)
    assert len(got) == k * (k - 1) // 2
    assert all(p.prompt == item.prompt for p in got)
    assert [(replies.index(p.chosen), replies.index(p.rejected)) for p in got] == [
        (i, j) for i in range(k) for j in range(i + 1, k)]
