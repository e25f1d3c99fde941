"""Preference data: records -> pairs or ranked lists -> token ids -> one batch per forward.

Formats, detected from the first record's keys (extra keys are ignored; every record of a
file must have the first record's format):

========= ===================================== ==============================================
format    keys                                  meaning
========= ===================================== ==============================================
pairs     prompt, chosen, rejected              prompt: a string (one user turn) or a list of
          [, margin] [, label | score]          messages ending with a user turn; chosen and
                                                rejected: strings, or (as TRL accepts) lists of
                                                messages whose last is the assistant reply
pairs     chosen, rejected (lists of messages)  TRL's implicit prompt: the prompt is every
                                                message of chosen but the last; rejected's
                                                must be the same
hh        chosen, rejected (strings)            Anthropic HH-RLHF: each a whole transcript
                                                ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
ranked    prompt, responses, ranking | scores   K >= 2 responses; ``ranking`` lists indices
                                                best -> worst, or ``scores`` (higher = better)
========= ===================================== ==============================================

``margin`` is a per-pair margin (Llama 2's reward-model loss); ``label`` (or ``score``) a soft
label, P(chosen is better) in [0, 1] (AI-labelled preferences, RLAIF).

Nothing is dropped silently: pairs whose sides are empty or identical, and ranked lists left
with fewer than two responses, are counted in :class:`PreferenceReport`. Structural problems
(a missing field, a wrong type, a malformed transcript) are one-line InputErrors naming the
path, line and field.

Tokenisation uses the SFT templates (:mod:`alignkit.data.templates`), so a pair is tokenised
the same way everywhere: ``prompt_ids`` is :func:`encode_prompt` of the prompt and each
completion is what follows it in :func:`encode_conversation` of prompt + reply, up to and
including the end-of-turn token.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from alignkit.data.formats import Conversation, _message_list, _source, check_turns
from alignkit.data.sources import Record, read_records
from alignkit.data.templates import encode_conversation, encode_prompt, resolve_template
from alignkit.data.tokenize import TokenizeReport, _count
from alignkit.errors import InputError

PREFERENCE_FORMATS = ("pairs", "hh", "ranked")
PREFERENCE_TRUNCATIONS = ("truncate_left", "drop")
# Reasons in PreferenceReport.dropped that count removed responses of a kept-or-dropped ranked
# list rather than whole records.
RESPONSE_REASONS = ("empty_response", "duplicate_response")

_EXPECTED = ("pairs (prompt, chosen, rejected), hh (chosen, rejected as Human/Assistant "
             "transcripts), ranked (prompt, responses, ranking or scores)")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages ending with a user turn, an optional system message first) and two
    replies, ``chosen`` preferred to ``rejected``."""

    prompt: tuple[dict, ...]
    chosen: str
    rejected: str
    margin: float | None = None
    label: float | None = None
    source: str = ""


@dataclass(frozen=True)
class RankedList:
    """A prompt and K >= 2 replies ordered best -> worst."""

    prompt: tuple[dict, ...]
    responses: tuple[str, ...]
    source: str = ""


@dataclass
class PreferenceReport:
    """What loading kept and dropped.

    ``dropped`` maps a reason to a count of records, except the reasons in
    ``RESPONSE_REASONS``, which count single responses removed from ranked lists (the list is
    kept while two responses remain). So ``total == kept + dropped_records``.
    ``prompt_mismatch`` counts kept HH pairs whose rejected transcript has another prompt (the
    prompt is taken from chosen); ``ties`` counts kept ranked lists with tied scores.
    """

    total: int
    kept: int
    dropped: dict[str, int] = field(default_factory=dict)
    prompt_mismatch: int = 0
    ties: int = 0

    @property
    def dropped_records(self) -> int:
        return sum(v for k, v in self.dropped.items() if k not in RESPONSE_REASONS)

    def summary(self) -> str:
        """One line, e.g. ``1312 records: 1309 kept, 3 dropped (empty_chosen: 3);
        2 prompt mismatches (kept)``."""
        records = {k: v for k, v in self.dropped.items() if k not in RESPONSE_REASONS}
        responses = {k: v for k, v in self.dropped.items() if k in RESPONSE_REASONS}
        text = f"{self.total} records: {self.kept} kept, {self.dropped_records} dropped"
        if records:
            text += f" ({_reasons(records)})"
        if responses:
            text += f"; {sum(responses.values())} responses removed ({_reasons(responses)})"
        if self.prompt_mismatch:
            text += f"; {self.prompt_mismatch} prompt mismatches (kept)"
        if self.ties:
            text += f"; {self.ties} ranked lists with ties (kept, input order among ties)"
        return text

    def count(self, reason: str, n: int = 1) -> None:
        if n:
            self.dropped[reason] = self.dropped.get(reason, 0) + n


def _reasons(counts: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items())


# ---------------------------------------------------------------- detection and loading


def detect_preference_format(data: dict) -> str:
    """``"pairs"``, ``"hh"`` or ``"ranked"`` from the keys of ``data`` (see the module table)."""
    return _detect(data, path=None, line=None)


def _detect(data: dict, *, path: str | None, line: int | None) -> str:
    matches = []
    if "chosen" in data and "rejected" in data:
        conversational = isinstance(data["chosen"], list)
        matches.append("pairs" if "prompt" in data or conversational else "hh")
    if "prompt" in data and "responses" in data:
        matches.append("ranked")
    if len(matches) == 1:
        return matches[0]
    found = ", ".join(sorted(map(str, data))) or "none"
    what = f"ambiguous ({' or '.join(matches)})" if matches else "unknown"
    raise InputError(f"{what} preference data format: keys found: {found}; expected one of: "
                     f"{_EXPECTED}; set data.format to choose", path=path, line=line)


def load_preferences(path: str, *, fmt: str = "auto", system_prompt: str | None = None,
                     max_examples: int | None = None, split: str = "train",
                     ) -> tuple[list[PreferencePair | RankedList], PreferenceReport]:
    """Read ``path`` (any source :func:`read_records` reads) and convert its first
    ``max_examples`` records; ``system_prompt`` is prepended to prompts that have none.

    With ``fmt="auto"`` the format is detected from the first record and every later record
    must have the same format (else an InputError naming its line).
    """
    records = read_records(path, split=split)[:max_examples]
    if fmt == "auto":
        fmt = _detect(records[0].data, path=records[0].path, line=records[0].line)
        for rec in records[1:]:
            _check_same_format(rec, fmt, records[0])
    elif fmt not in PREFERENCE_FORMATS:
        raise InputError(f"unknown preference format '{fmt}'; expected auto, "
                         f"{', '.join(PREFERENCE_FORMATS)}", field="format")
    report = PreferenceReport(total=len(records), kept=0)
    items = []
    for rec in records:
        match fmt:
            case "pairs":
                item = _pair_record(rec, report)
            case "hh":
                item = _hh_record(rec, report)
            case _:
                item = _ranked_record(rec, report)
        if item is not None:
            items.append(_with_system(item, system_prompt))
    report.kept = len(items)
    return items, report


def _check_same_format(rec: Record, fmt: str, first: Record) -> None:
    try:
        other = _detect(rec.data, path=rec.path, line=rec.line)
    except InputError:
        return  # matches no format: the converter names the missing field
    if other != fmt:
        raise InputError(f"mixed formats: this record is {other} but the first record "
                         f"(line {first.line}) is {fmt}", path=rec.path, line=rec.line)


def _with_system(item, system_prompt: str | None):
    if system_prompt is None or item.prompt[0]["role"] == "system":
        return item
    prompt = ({"role": "system", "content": system_prompt},) + item.prompt
    if isinstance(item, PreferencePair):
        return PreferencePair(prompt, item.chosen, item.rejected, item.margin, item.label,
                              item.source)
    return RankedList(prompt, item.responses, item.source)


# ---------------------------------------------------------------- pairs


def _pair_record(rec: Record, report: PreferenceReport) -> PreferencePair | None:
    data, where = rec.data, {"path": rec.path, "line": rec.line}
    chosen_v, rejected_v = _present(data, "chosen", where), _present(data, "rejected", where)
    if isinstance(chosen_v, list) != isinstance(rejected_v, list):
        raise InputError("chosen and rejected must both be strings or both be lists of "
                         "messages", field="rejected", **where)
    if isinstance(chosen_v, list):
        prompt, chosen, rejected = _conversational_pair(data, where)
    else:
        prompt = _prompt(data, where)
        chosen = _string(chosen_v, "chosen", where)
        rejected = _string(rejected_v, "rejected", where)
    margin = _number(data, "margin", where)
    label = _soft_label(data, where)
    if not _keep_pair(chosen, rejected, report):
        return None
    return PreferencePair(prompt, chosen, rejected, margin, label, _source(rec))


def _keep_pair(chosen: str, rejected: str, report: PreferenceReport) -> bool:
    """Count and refuse a pair with an empty side, or with sides equal up to surrounding
    whitespace (no preference signal)."""
    reason = None
    if not chosen.strip():
        reason = "empty_chosen"
    elif not rejected.strip():
        reason = "empty_rejected"
    elif chosen.strip() == rejected.strip():
        reason = "identical"
    if reason is None:
        return True
    report.count(reason)
    return False


def _conversational_pair(data: dict, where: dict) -> tuple[tuple[dict, ...], str, str]:
    """TRL's conversational pairs: prompt (optional) + chosen / rejected message lists."""
    head: list[tuple[dict, str]] = []
    if data.get("prompt") is not None:
        head = _prompt_messages(data["prompt"], where, final_role=None)
    sides = []
    for key in ("chosen", "rejected"):
        pairs = head + _messages(data[key], key, where)
        messages, names = [m for m, _ in pairs], [n for _, n in pairs]
        check_turns(messages, names=names, **where)
        _no_blank(pairs[:-1], where)
        sides.append(messages)
    chosen, rejected = sides
    if rejected[:-1] != chosen[:-1]:
        raise InputError("the conversation before the final reply differs from chosen's; a "
                         "pair must share its prompt", field="rejected", **where)
    return tuple(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def _prompt(data: dict, where: dict) -> tuple[dict, ...]:
    value = _present(data, "prompt", where)
    return tuple(m for m, _ in _prompt_messages(value, where, final_role="user"))


def _prompt_messages(value: object, where: dict,
                     final_role: str | None) -> list[tuple[dict, str]]:
    """A prompt string (one user turn) or message list -> (message, field name) pairs."""
    if isinstance(value, str):
        pairs = [({"role": "user", "content": value}, "prompt")]
    elif isinstance(value, list):
        pairs = _messages(value, "prompt", where)
    else:
        raise InputError(f"expected a string or a list of messages, got "
                         f"{type(value).__name__}", field="prompt", **where)
    _no_blank(pairs, where)
    if final_role is not None:
        check_turns([m for m, _ in pairs], final_role=final_role,
                    names=[n for _, n in pairs], **where)
    return pairs


def _messages(value: object, name: str, where: dict) -> list[tuple[dict, str]]:
    """``[{"role", "content"}, ...]`` -> (message, field name) pairs; content may be blank
    here (a blank reply is a counted drop, a blank prompt turn an error: see callers)."""
    if value is None:
        raise InputError("missing", field=name, **where)
    return _message_list(value, name, where, allow_blank=True)


def _no_blank(pairs: list[tuple[dict, str]], where: dict) -> None:
    for message, name in pairs:
        if not message["content"].strip():
            raise InputError("is empty", field=f"{name}.content" if "[" in name else name,
                             **where)


def _present(data: dict, key: str, where: dict) -> object:
    if key in data and data[key] is None:
        raise InputError("is null", field=key, **where)
    if data.get(key) is None:
        found = ", ".join(sorted(map(str, data))) or "none"
        raise InputError(f"missing (keys found: {found})", field=key, **where)
    return data[key]


def _string(value: object, name: str, where: dict) -> str:
    if value is None:
        raise InputError("missing", field=name, **where)
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {type(value).__name__}", field=name, **where)
    return value


def _number(data: dict, key: str, where: dict) -> float | None:
    """An optional finite number; a numeric string (CSV cells are strings) is read as one and
    an empty one as absent."""
    value = data.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise InputError(f"expected a number, got {value!r}", field=key, **where) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"expected a number, got {type(value).__name__}", field=key, **where)
    if not math.isfinite(value):
        raise InputError(f"expected a finite number, got {value}", field=key, **where)
    return float(value)


def _soft_label(data: dict, where: dict) -> float | None:
    label, score = _number(data, "label", where), _number(data, "score", where)
    if label is not None and score is not None:
        raise InputError("give the soft label as 'label' or 'score', not both", field="score",
                         **where)
    key, value = ("label", label) if label is not None else ("score", score)
    if value is not None and not 0.0 <= value <= 1.0:
        raise InputError(f"a soft label is P(chosen is better), in [0, 1]; got {value}",
                         field=key, **where)
    return value


# ---------------------------------------------------------------- HH-RLHF

_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def _hh_record(rec: Record, report: PreferenceReport) -> PreferencePair | None:
    where = {"path": rec.path, "line": rec.line}
    sides = {}
    for key in ("chosen", "rejected"):
        text = _string(_present(rec.data, key, where), key, where)
        sides[key] = split_hh_transcript(text, field=key, **where)
    (prompt, chosen), (rejected_prompt, rejected) = sides["chosen"], sides["rejected"]
    if not _keep_pair(chosen, rejected, report):
        return None
    report.prompt_mismatch += rejected_prompt != prompt
    return PreferencePair(prompt, chosen, rejected, source=_source(rec))


def split_hh_transcript(text: str, *, path: str | None, line: int | None,
                        field: str | None) -> tuple[tuple[dict, ...], str]:
    """An HH-RLHF transcript -> (prompt messages, final assistant response).

    The transcript is cut at the markers ``"\\n\\nHuman:"`` and ``"\\n\\nAssistant:"``; the
    response is the text after the last ``"\\n\\nAssistant:"`` and the prompt the turns before
    it, each stripped. Quirks of the real data are tolerated: whitespace around the transcript
    (one record starts ``"\\nHuman:"``), an empty turn inside the prompt (dropped), and two
    turns of one role in a row, which happen where a model wrote ``"Human:"`` inline or a
    worker typed ``"Humans:"`` — those are joined with a blank line, so a final assistant turn
    split that way is returned whole (the response is everything the assistant said after the
    last Human turn). An empty response is returned as ``""`` (callers count the drop).

    InputError (naming ``path``, ``line``, ``field``) if there is no Assistant turn, no Human
    turn before it, or text before the first marker.
    """
    where = {"path": path, "line": line, "field": field}
    body = text.strip()
    if body.startswith(("Human:", "Assistant:")):
        body = "\n\n" + body  # tolerate a missing or short separator before the first turn
    parts = _HH_MARKER.split(body)
    if parts[0].strip():
        raise InputError(f"text before the first 'Human:' turn: {parts[0][:40]!r}", **where)
    turns = [(_HH_ROLE[r], c.strip()) for r, c in zip(parts[1::2], parts[2::2], strict=True)]
    if not turns or turns[-1][0] != "assistant":
        raise InputError("no final 'Assistant:' turn (expected a transcript "
                         "'\\n\\nHuman: ...\\n\\nAssistant: ...')", **where)
    merged = _merge_turns([t for t in turns[:-1] if t[1]] + [turns[-1]])
    *prompt, (_, response) = merged
    if not prompt or prompt[0][0] != "user":
        raise InputError("the transcript must start with a 'Human:' turn before the final "
                         "'Assistant:' turn", **where)
    return tuple({"role": r, "content": c} for r, c in prompt), response


def _merge_turns(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    merged: list[tuple[str, str]] = []
    for role, content in turns:
        if merged and merged[-1][0] == role:
            joined = "\n\n".join(c for c in (merged[-1][1], content) if c)
            merged[-1] = (role, joined)
        else:
            merged.append((role, content))
    return merged


# ---------------------------------------------------------------- ranked lists


def _ranked_record(rec: Record, report: PreferenceReport) -> RankedList | None:
    data, where = rec.data, {"path": rec.path, "line": rec.line}
    prompt = _prompt(data, where)
    value = _present(data, "responses", where)
    if not isinstance(value, list):
        raise InputError(f"expected a list of strings, got {type(value).__name__}",
                         field="responses", **where)
    responses = [_string(r, f"responses[{i}]", where) for i, r in enumerate(value)]
    order, scores = _order(data, len(responses), where)
    kept: list[int] = []
    for i in order:
        if not responses[i].strip():
            report.count("empty_response")
        elif any(responses[i].strip() == responses[j].strip() for j in kept):
            report.count("duplicate_response")  # keeps its best-ranked copy
        else:
            kept.append(i)
    if len(kept) < 2:
        report.count("too_few_responses")
        return None
    if scores is not None:
        report.ties += len({scores[i] for i in kept}) < len(kept)
    return RankedList(prompt, tuple(responses[i] for i in kept), _source(rec))


def _order(data: dict, k: int, where: dict) -> tuple[list[int], list[float] | None]:
    """Indices best -> worst from ``ranking``, or from ``scores`` (stable: ties keep input
    order); the scores too when given."""
    has_ranking, has_scores = data.get("ranking") is not None, data.get("scores") is not None
    if has_ranking == has_scores:
        what = "both given; use one" if has_ranking else "missing (or give 'scores')"
        raise InputError(what, field="ranking", **where)
    if has_ranking:
        return _ranking(data["ranking"], k, where), None
    scores = data["scores"]
    if not isinstance(scores, list) or len(scores) != k:
        raise InputError(f"expected a list of {k} numbers (one per response)", field="scores",
                         **where)
    values = [_number({"scores": s}, "scores", where) for s in scores]
    if None in values:
        raise InputError("expected a number for every response", field="scores", **where)
    return sorted(range(k), key=lambda i: -values[i]), values


def _ranking(value: object, k: int, where: dict) -> list[int]:
    if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int)
                                          for i in value):
        raise InputError("expected a list of response indices (integers), best first",
                         field="ranking", **where)
    bad = [i for i in value if not 0 <= i < k]
    if bad:
        raise InputError(f"index {bad[0]} out of range for {k} responses (0-based)",
                         field="ranking", **where)
    if len(set(value)) != len(value):
        dup = next(i for i in value if value.count(i) > 1)
        raise InputError(f"index {dup} appears twice; a ranking is a permutation",
                         field="ranking", **where)
    if len(value) != k:
        raise InputError(f"ranks {len(value)} of {k} responses; a ranking must list every "
                         f"response once", field="ranking", **where)
    return list(value)


def pairs_from_ranked(item: RankedList) -> list[PreferencePair]:
    """All K(K-1)/2 pairs of a ranked list (InstructGPT), (i better than j) in the order
    (0,1), (0,2), ..., (0,K-1), (1,2), ...

    Tied scores were ordered by input order when loaded, so a tie becomes a pair here too.
    """
    k = len(item.responses)
    return [PreferencePair(item.prompt, item.responses[i], item.responses[j],
                           source=item.source)
            for i in range(k) for j in range(i + 1, k)]


# ---------------------------------------------------------------- tokenisation


@dataclass
class EncodedPair:
    """Token ids of a prompt and two completions; each completion ends with the end-of-turn
    token unless truncation cut it."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    margin: float | None = None
    label: float | None = None


@dataclass
class EncodedRanked:
    """Token ids of a prompt and K completions, best -> worst."""

    prompt_ids: list[int]
    completions: list[list[int]]


def encode_completion(tokenizer, prompt: tuple[dict, ...], response: str, template, *,
                      source: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt_ids, completion_ids) of ``prompt`` + an assistant ``response``.

    ``prompt_ids`` is :func:`encode_prompt` of ``prompt`` and must be the prefix of
    :func:`encode_conversation` of the whole; ``completion_ids`` are the tokens after it up to
    and including the last target (the end-of-turn token), so every completion token is a
    target and trailing template text (ChatML's ``"\\n"`` after ``<|im_end|>``) is left out.
    """
    messages = tuple(prompt) + ({"role": "assistant", "content": response},)
    full = encode_conversation(tokenizer, Conversation(messages, source), template)
    prompt_ids = encode_prompt(tokenizer, list(prompt), template)
    n = len(prompt_ids)
    if full.input_ids[:n] != prompt_ids:  # a real check, not an assert: -O must not skip it
        raise InputError("the prompt does not encode to a prefix of prompt + reply, so the "
                         "completion cannot be located; use template inst or plain",
                         path=source, field="template")
    end = max(i for i, t in enumerate(full.loss_mask) if t) + 1 if any(full.loss_mask) else n
    if end <= n or not all(full.loss_mask[n:end]):
        raise InputError("the template puts non-target tokens between the prompt and the "
                         "reply; use template inst or plain", path=source, field="template")
    return prompt_ids, full.input_ids[n:end]


def tokenize_preferences(tokenizer, items: Iterable[PreferencePair | RankedList], *,
                         template: str, max_length: int, truncation: str,
                         ) -> tuple[list[EncodedPair | EncodedRanked], TokenizeReport]:
    """Encode pairs and ranked lists so that prompt + its longest completion fits
    ``max_length`` tokens.

    ``truncation`` (for an item longer than that):

    - ``truncate_left``: drop tokens from the start of the prompt (a leading BOS stays first),
      but keep at least ``min(len(prompt), max_length // 2)`` of them; if that is not enough,
      cut each completion that is still too long at its end (it loses its end-of-turn token).
      A pair whose completions become equal that way has no signal left and is dropped
      (``identical_after_truncation``); in a ranked list later copies are removed and the list
      is dropped (same reason) if fewer than two completions remain.
    - ``drop``: drop the item (reason ``too_long``).

    Items built by hand (not by :func:`load_preferences`) whose completions encode equally are
    dropped too (reason ``identical``).
    """
    if truncation not in PREFERENCE_TRUNCATIONS:
        raise ValueError(f"truncation must be one of {PREFERENCE_TRUNCATIONS}, "
                         f"got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    template = resolve_template(template, tokenizer)
    report = TokenizeReport(total=0, kept=0, truncated=0)
    out: list[EncodedPair | EncodedRanked] = []
    for item in items:
        report.total += 1
        replies = ((item.chosen, item.rejected) if isinstance(item, PreferencePair)
                   else item.responses)
        encoded = [encode_completion(tokenizer, item.prompt, r, template, source=item.source)
                   for r in replies]
        prompt_ids, completions = encoded[0][0], [c for _, c in encoded]
        too_long = len(prompt_ids) + max(map(len, completions)) > max_length
        if too_long and truncation == "drop":
            _count(report, "too_long")
            continue
        if too_long:
            prompt_ids, completions = _fit(prompt_ids, completions, max_length,
                                           tokenizer.bos_token_id)
        result = _result(item, prompt_ids, completions)
        if result is None:
            _count(report, "identical_after_truncation" if too_long else "identical")
            continue
        report.truncated += too_long
        out.append(result)
    report.kept = len(out)
    return out, report


def _fit(prompt: list[int], completions: list[list[int]], max_length: int,
         bos_id: int | None) -> tuple[list[int], list[list[int]]]:
    """``truncate_left`` of one item (see :func:`tokenize_preferences`)."""
    longest = max(map(len, completions))
    keep = max(min(len(prompt), max_length // 2), max_length - longest)
    head = 1 if bos_id is not None and prompt and prompt[0] == bos_id else 0
    keep = max(keep, head)
    prompt = prompt[:head] + prompt[len(prompt) - (keep - head):]
    budget = max_length - len(prompt)
    return prompt, [c[:budget] for c in completions]


def _result(item, prompt_ids: list[int],
            completions: list[list[int]]) -> EncodedPair | EncodedRanked | None:
    """The encoded item, or None when truncation left no two distinct completions."""
    if isinstance(item, PreferencePair):
        chosen, rejected = completions
        if chosen == rejected:
            return None
        return EncodedPair(prompt_ids, chosen, rejected, item.margin, item.label)
    distinct: list[list[int]] = []
    for c in completions:  # best first, so a duplicate keeps its best rank
        if c not in distinct:
            distinct.append(c)
    return EncodedRanked(prompt_ids, distinct) if len(distinct) >= 2 else None


def pair_fingerprint(items_encoded: Iterable[EncodedPair | EncodedRanked]) -> str:
    """sha256 (hex) over the token ids of encoded items, in order: a cache key for
    precomputed reference log-probs. Margins and labels are left out (they do not change
    log-probs); the kind of each item and every length are hashed, so no two different
    sequences of items share the serialisation."""
    h = hashlib.sha256(b"alignkit-preferences-v1\n")
    for item in items_encoded:
        if isinstance(item, EncodedPair):
            row = ["pair", item.prompt_ids, item.chosen_ids, item.rejected_ids]
        else:
            row = ["ranked", item.prompt_ids, item.completions]
        h.update(json.dumps(row, separators=(",", ":")).encode("ascii") + b"\n")
    return h.hexdigest()


# ---------------------------------------------------------------- collation


def collate_pairs(pairs: list[EncodedPair], *, pad_id: int,
                  pad_to_multiple_of: int | None = None) -> dict:
    """One batch of 2B rows, so chosen and rejected go through one forward: rows 0..B-1 are
    prompt + chosen, rows B..2B-1 prompt + rejected, right-padded to T.

    Returns ``input_ids`` (2B, T) long, ``attention_mask`` (2B, T) long, ``loss_mask`` (2B, T)
    bool (True exactly on completion tokens), ``margin`` (B,) float (0 where none),
    ``label`` (B,) float (1.0 where none) and ``has_label`` (B,) bool.
    """
    if not pairs:
        raise ValueError("collate_pairs needs at least one pair")
    rows = ([(p.prompt_ids, p.chosen_ids) for p in pairs]
            + [(p.prompt_ids, p.rejected_ids) for p in pairs])
    return _pad_rows(rows, pad_id, pad_to_multiple_of) | _pair_fields(pairs)


def collate_ranked(items: list[EncodedRanked], *, pad_id: int,
                   pad_to_multiple_of: int | None = None) -> dict:
    """R = sum of K_i rows, list by list, each list's completions best -> worst (K may differ
    per list), right-padded to T.

    Returns ``input_ids``, ``attention_mask``, ``loss_mask`` as in :func:`collate_pairs` but
    (R, T); ``list_index`` (R,) long (the row's list), ``rank`` (R,) long (0 = best) and
    ``list_mask`` (B, Kmax) bool (True where list i has a completion of rank k).
    """
    if not items:
        raise ValueError("collate_ranked needs at least one ranked list")
    rows = [(it.prompt_ids, c) for it in items for c in it.completions]
    return _pad_rows(rows, pad_id, pad_to_multiple_of) | _list_fields(items)


def collate_pairs_shared(pairs: list[EncodedPair], *, pad_id: int,
                         pad_to_multiple_of: int | None = None) -> dict:
    """One row per pair, ``[prompt | chosen | rejected]``, so the prompt goes through the model
    once instead of twice (prefix sharing); right-padded to T.

    Both completions continue the prompt: their position ids both start at P (the prompt
    length), rejected tokens never attend to chosen tokens, and rejected's first token is
    predicted from the last prompt token's hidden state, as chosen's is. The row's log-probs
    are then those of the two rows of :func:`collate_pairs` (up to kernel rounding), and
    :func:`alignkit.models.logps.shared_prefix_logps` returns them in that layout: rows
    0..B-1 chosen, B..2B-1 rejected.

    Returns the keys of :func:`collate_shared` with R = 2B, and ``margin``, ``label``,
    ``has_label`` as :func:`collate_pairs` does.
    """
    if not pairs:
        raise ValueError("collate_pairs_shared needs at least one pair")
    b = len(pairs)
    items = [(p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in pairs]
    rows = [[i, b + i] for i in range(b)]
    return collate_shared(items, rows, pad_id=pad_id,
                          pad_to_multiple_of=pad_to_multiple_of) | _pair_fields(pairs)


def collate_ranked_shared(items: list[EncodedRanked], *, pad_id: int,
                          pad_to_multiple_of: int | None = None) -> dict:
    """One row per ranked list, ``[prompt | completion 0 | ... | completion K-1]`` (see
    :func:`collate_pairs_shared`): every completion continues the prompt and sees no other.

    Returns the keys of :func:`collate_shared`, whose R rows are those of
    :func:`collate_ranked` (list by list, best first), and ``list_index``, ``rank``,
    ``list_mask`` as :func:`collate_ranked` does.
    """
    if not items:
        raise ValueError("collate_ranked_shared needs at least one ranked list")
    starts = [0]
    for it in items:
        starts.append(starts[-1] + len(it.completions))
    rows = [list(range(starts[i], starts[i + 1])) for i in range(len(items))]
    batch = collate_shared([(it.prompt_ids, it.completions) for it in items], rows,
                           pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)
    return batch | _list_fields(items)


def collate_shared(items: list[tuple[list[int], list[list[int]]]], rows: list[list[int]], *,
                   pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Prefix-shared layout: item i = (prompt, completions) becomes one sequence, the prompt
    then each completion in turn; completion k of item i is output row ``rows[i][k]`` (the
    rows number all R completions 0..R-1).

    Positions: the prompt is 0..P-1 and every completion P..P+L-1 again. Attention (True =
    may attend): causal within the prompt and within prompt + each completion, never between
    completions; a padding position attends to itself alone, so no softmax row is empty (an
    all-masked row is NaN in SDPA) and nothing real ever sees padding. Targets: completion
    token j (at column s+j) is predicted from column s+j-1, except j = 0, which is predicted
    from the last prompt token (column P-1) for every completion.

    Returns ``input_ids`` (B, T) long (``pad_id`` on padding), ``position_ids`` (B, T) long
    (0 on padding), ``attention_mask`` (B, 1, T, T) bool, and for the N target tokens, in
    row-major order: ``target_index`` (N,) long and ``source_index`` (N,) long (flat indices
    b·T + t into (B, T) of the target token and of the position predicting it), ``target_row``
    (N,) long (its output row); ``n_tokens`` (R,) long (targets per output row; R = the
    number of completions); ``last_index`` (R,) long (flat index of each output row's last
    token: its completion's last, or the prompt's last for an empty completion: the position a
    reward head reads, as the plain row's last real token).
    """
    import torch

    if any(not prompt for prompt, _ in items):
        raise ValueError("prefix sharing needs a non-empty prompt: its last token predicts "
                         "the first token of every completion")
    width = max(len(p) + sum(map(len, cs)) for p, cs in items)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(items), width)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros(shape, dtype=torch.long)  # (B, T)
    segment = torch.full(shape, -1, dtype=torch.long)  # (B, T): -1 pad, 0 prompt, k+1 compl. k
    target, source, target_row = [], [], []
    n_tokens = [0] * sum(len(cs) for _, cs in items)
    last_index = [0] * len(n_tokens)
    for b, ((prompt, completions), row_ids) in enumerate(zip(items, rows, strict=True)):
        p, base = len(prompt), b * width
        seq = prompt + [t for c in completions for t in c]
        input_ids[b, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        position_ids[b, :p] = torch.arange(p)
        segment[b, :p] = 0
        start = p
        for k, (completion, row) in enumerate(zip(completions, row_ids, strict=True)):
            n = len(completion)
            position_ids[b, start:start + n] = torch.arange(p, p + n)
            segment[b, start:start + n] = k + 1
            target += range(base + start, base + start + n)
            if n:
                source += [base + p - 1, *range(base + start, base + start + n - 1)]
            target_row += [row] * n
            n_tokens[row] = n
            last_index[row] = base + (start + n - 1 if n else p - 1)
            start += n
    causal = torch.ones(width, width, dtype=torch.bool).tril()  # (T, T)
    seg_q, seg_kv = segment.unsqueeze(2), segment.unsqueeze(1)  # (B, T, 1), (B, 1, T)
    sees = causal & (seg_q >= 0) & (seg_kv >= 0) & ((seg_kv == 0) | (seg_kv == seg_q))
    sees |= torch.eye(width, dtype=torch.bool)  # (B, T, T)
    return {"input_ids": input_ids, "position_ids": position_ids,
            "attention_mask": sees.unsqueeze(1),
            "target_index": torch.tensor(target, dtype=torch.long),
            "source_index": torch.tensor(source, dtype=torch.long),
            "target_row": torch.tensor(target_row, dtype=torch.long),
            "n_tokens": torch.tensor(n_tokens, dtype=torch.long),
            "last_index": torch.tensor(last_index, dtype=torch.long)}


def _pair_fields(pairs: list[EncodedPair]) -> dict:
    """``margin`` (B,) float (0 where none), ``label`` (B,) float (1.0 where none) and
    ``has_label`` (B,) bool."""
    import torch

    return {"margin": torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float),
            "label": torch.tensor([1.0 if p.label is None else p.label for p in pairs],
                                  dtype=torch.float),
            "has_label": torch.tensor([p.label is not None for p in pairs], dtype=torch.bool)}


def _list_fields(items: list[EncodedRanked]) -> dict:
    """``list_index`` (R,) long, ``rank`` (R,) long and ``list_mask`` (B, Kmax) bool of
    :func:`collate_ranked`."""
    import torch

    sizes = [len(it.completions) for it in items]
    list_mask = torch.zeros((len(items), max(sizes)), dtype=torch.bool)  # (B, Kmax)
    for i, k in enumerate(sizes):
        list_mask[i, :k] = True
    return {"list_index": torch.tensor([i for i, k in enumerate(sizes) for _ in range(k)],
                                       dtype=torch.long),
            "rank": torch.tensor([r for k in sizes for r in range(k)], dtype=torch.long),
            "list_mask": list_mask}


def _pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int,
              pad_to_multiple_of: int | None) -> dict:
    """(prompt, completion) rows -> right-padded ids, attention and completion masks (the SFT
    collate, with the loss mask True exactly on the completion)."""
    from alignkit.data.collate import collate
    from alignkit.data.templates import Encoded
    examples = [Encoded(p + c, [False] * len(p) + [True] * len(c)) for p, c in rows]
    return collate(examples, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)


def completions_of(item: EncodedPair | EncodedRanked) -> list[list[int]]:
    """An encoded item's completions: [chosen, rejected] for a pair, best → worst for a list."""
    if isinstance(item, EncodedPair):
        return [item.chosen_ids, item.rejected_ids]
    return item.completions


def item_length(item: EncodedPair | EncodedRanked, *, shared: bool = False) -> int:
    """Tokens of an encoded pair's or list's widest sequence, the width its batch is padded to
    (what ``train.group_by_length`` sorts by): prompt + its longest completion, or with
    ``shared`` (prefix-shared layout, one sequence) prompt + every completion."""
    return len(item.prompt_ids) + (sum if shared else max)(map(len, completions_of(item)))


def item_tokens(item: EncodedPair | EncodedRanked, *, shared: bool = False) -> int:
    """Tokens the model computes for an encoded pair or list, padding excluded: the prompt once
    per completion, or once in all with ``shared`` (prefix-shared layout), plus every
    completion."""
    completions = completions_of(item)
    copies = 1 if shared else len(completions)
    return copies * len(item.prompt_ids) + sum(map(len, completions))


def shares_prefix(setting: str, *, ranked: bool) -> bool:
    """Resolve a ``prefix_sharing`` setting (auto, on, off) for pairs or ranked lists: auto
    shares a pair's prompt (same log-probs and rewards, the prompt computed once instead of
    twice) and keeps ranked lists plain, since K completions in one sequence make its attention
    grow as (P + Σ_k L_k)² instead of Σ_k (P + L_k)², which can cost more than the K − 1 prompt
    copies save; on shares both; off neither."""
    if setting == "auto":
        return not ranked
    return setting == "on"
