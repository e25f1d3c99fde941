"""Examples -> fixed-budget token sequences: SFT truncation policies and pre-training packing.

Invariant of every sequence produced here: ``loss_mask[0]`` is False, because no token precedes
position 0 to predict it (the engine's shift never reads it either; keeping it False makes
``loss_mask.sum()`` the true number of predicted tokens whichever way it is counted).

Nothing is dropped silently: every example dropped is counted in the report under a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Iterable

from alignkit.data.formats import Conversation, TextDoc
from alignkit.data.templates import Encoded, encode_conversation, resolve_template

TRUNCATIONS = ("truncate_left", "truncate_right", "drop")


@dataclass
class TokenizeReport:
    """What tokenisation kept and dropped. ``unit`` is "examples" for SFT and "tokens" for
    packing (there ``total`` tokens = ``kept`` + ``dropped["partial_block"]``)."""

    total: int
    kept: int
    truncated: int
    dropped: dict[str, int] = field(default_factory=dict)
    unit: str = "examples"

    def summary(self) -> str:
        """One line, e.g. ``1000 examples: 990 kept (12 truncated), 10 dropped (too_long: 6)``."""
        n_dropped = sum(self.dropped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in self.dropped.items())
        text = f"{self.total} {self.unit}: {self.kept} kept"
        if self.unit == "examples":
            text += f" ({self.truncated} truncated)"
        text += f", {n_dropped} dropped"
        return text + (f" ({reasons})" if reasons else "")


def tokenize_sft(tokenizer, convs: Iterable[Conversation], *, template: str, max_length: int,
                 truncation: str) -> tuple[list[Encoded], TokenizeReport]:
    """Encode conversations and fit each into ``max_length`` tokens.

    ``truncation`` (for an example longer than ``max_length``):

    - ``truncate_left``: drop tokens from the start of the prompt (BOS, if the example starts
      with it, stays first) so the final assistant turn fits whole; earlier turns go first.
      If the final turn alone (with BOS) exceeds the budget, no prompt is kept and the turn's
      end is cut (so it has no EOS: the model is not taught to stop there).
    - ``truncate_right``: keep the first ``max_length`` tokens.
    - ``drop``: drop the example (reason ``too_long``).

    An example left with no target tokens is dropped (reason ``no_target_tokens``).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    template = resolve_template(template, tokenizer)
    kept: list[Encoded] = []
    report = TokenizeReport(total=0, kept=0, truncated=0)
    for conv in convs:
        report.total += 1
        enc = encode_conversation(tokenizer, conv, template)
        too_long = len(enc.input_ids) > max_length
        if too_long and truncation == "drop":
            _count(report, "too_long")
            continue
        if too_long:
            enc = (_truncate_left(enc, max_length, tokenizer.bos_token_id)
                   if truncation == "truncate_left" else _truncate_right(enc, max_length))
        if enc.loss_mask:
            enc.loss_mask[0] = False  # see the module docstring
        if not any(enc.loss_mask):
            _count(report, "no_target_tokens")
            continue
        report.truncated += too_long
        kept.append(enc)
    report.kept = len(kept)
    return kept, report


def _count(report: TokenizeReport, reason: str) -> None:
    report.dropped[reason] = report.dropped.get(reason, 0) + 1


def _truncate_right(enc: Encoded, max_length: int) -> Encoded:
    return Encoded(enc.input_ids[:max_length], enc.loss_mask[:max_length])


def _truncate_left(enc: Encoded, max_length: int, bos_id: int | None) -> Encoded:
    """``head + prompt[-budget:] + final`` where ``final`` starts at the last target run."""
    ids, mask = enc.input_ids, enc.loss_mask
    head = 1 if bos_id is not None and ids and ids[0] == bos_id else 0
    start = _last_target_start(mask)
    if start is None:  # no targets at all: nothing worth keeping whole, keep the end
        start = len(ids)
    start = max(start, head)
    budget = max_length - head - (len(ids) - start)
    if budget >= 0:
        keep = list(range(head)) + list(range(start - budget, len(ids)))
    else:  # the final turn alone is too long: no prompt, cut its end
        keep = list(range(head)) + list(range(start, start + max_length - head))
    return Encoded([ids[i] for i in keep], [mask[i] for i in keep])


def _last_target_start(mask: list[bool]) -> int | None:
    """Index where the last run of True in ``mask`` starts, or None if there is none."""
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    if i < 0:
        return None
    while i > 0 and mask[i - 1]:
        i -= 1
    return i


def pack_documents(tokenizer, docs: Iterable[TextDoc], *,
                   block_size: int) -> tuple[list[Encoded], TokenizeReport]:
    """Pre-training blocks: ``[BOS] text EOS`` per document (BOS only if the tokenizer has one),
    all concatenated into one stream and cut into blocks of exactly ``block_size`` tokens.

    ``loss_mask`` is True everywhere but position 0 of each block (see the module docstring).
    The final partial block is dropped; the report counts in tokens:
    ``total = kept + dropped["partial_block"]``, ``kept = len(blocks) * block_size``.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("packing needs a tokenizer with an EOS token to separate documents")
    stream: list[int] = []
    for doc in docs:
        if bos is not None:
            stream.append(bos)
        stream += tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        stream.append(eos)
    n_blocks = len(stream) // block_size
    mask = [False] + [True] * (block_size - 1)
    blocks = [Encoded(stream[b * block_size:(b + 1) * block_size], list(mask))
              for b in range(n_blocks)]
    leftover = len(stream) - n_blocks * block_size
    report = TokenizeReport(total=len(stream), kept=n_blocks * block_size, truncated=0,
                            dropped={"partial_block": leftover} if leftover else {},
                            unit="tokens")
    return blocks, report
