"""Raw records -> typed examples: conversations for SFT, documents for pre-training.

Formats, detected from a record's keys (extra keys are ignored):

===================== ============================== ===========================================
format                keys                           conversation
===================== ============================== ===========================================
alpaca                instruction, output[, input]   user: instruction + "\\n\\n" + input (if
                                                     non-empty); assistant: output
instruction_response  instruction, response[, input] the lesson's format; same as alpaca
prompt_completion     prompt, completion             strings -> user/assistant; or (as TRL
                                                     accepts) two lists of messages, joined
messages              messages                       [{"role", "content"}, ...] as given
text                  text                           pre-training documents (not a conversation)
===================== ============================== ===========================================

A conversation is: an optional system message first, then user and assistant turns alternating,
starting with user and ending with assistant. Content is kept as given (not stripped) but must
not be blank. Every problem is an InputError naming the path, line and field.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from alignkit.data.sources import Record, read_records, read_text
from alignkit.errors import EmptyFieldError, InputError

FORMATS = ("alpaca", "prompt_completion", "instruction_response", "messages", "text")
ROLES = ("system", "user", "assistant")

# Keys that identify each conversation format; "text" is tried only when none of these match,
# because datasets such as tatsu-lab/alpaca carry a rendered "text" column next to the fields.
_FORMAT_KEYS = {
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "instruction_response": ("instruction", "response"),
    "messages": ("messages",),
}
_EXPECTED = ("alpaca (instruction, output[, input]), prompt_completion (prompt, completion), "
             "instruction_response (instruction, response), messages (messages), text (text)")


@dataclass(frozen=True)
class Conversation:
    """Validated turns, each ``{"role": "system"|"user"|"assistant", "content": str}``.

    ``source`` is ``"path:line"`` of the record it came from (for messages in errors and reports).
    """

    messages: tuple[dict, ...]
    source: str


@dataclass(frozen=True)
class TextDoc:
    """One pre-training document."""

    text: str
    source: str


def detect_format(data: dict) -> str:
    """The format whose keys ``data`` has (see the module table); InputError if none or several."""
    return _detect(data, path=None, line=None)


def _detect(data: dict, *, path: str | None, line: int | None) -> str:
    matches = [f for f, keys in _FORMAT_KEYS.items() if all(k in data for k in keys)]
    if not matches and "text" in data:
        matches = ["text"]
    if len(matches) == 1:
        return matches[0]
    found = ", ".join(sorted(map(str, data))) or "none"
    what = f"ambiguous ({' or '.join(matches)})" if matches else "unknown"
    raise InputError(f"{what} data format: keys found: {found}; expected one of: {_EXPECTED}; "
                     f"set data.format to choose", path=path, line=line)


def to_conversation(rec: Record, fmt: str, *, system_prompt: str | None = None) -> Conversation:
    """Convert one record of format ``fmt``; ``system_prompt`` is prepended when none is given."""
    data, where = rec.data, {"path": rec.path, "line": rec.line}
    match fmt:
        case "alpaca" | "instruction_response":
            answer_key = "output" if fmt == "alpaca" else "response"
            user = _text(data, "instruction", **where)
            extra = data.get("input")
            if extra is not None and not isinstance(extra, str):
                raise InputError(f"expected a string, got {type(extra).__name__}",
                                 field="input", **where)
            if extra and extra.strip():
                user = user + "\n\n" + extra
            pairs = [({"role": "user", "content": user}, "instruction"),
                     ({"role": "assistant", "content": _text(data, answer_key, **where)},
                      answer_key)]
        case "prompt_completion":
            pairs = _prompt_completion(data, where)
        case "messages":
            pairs = _message_list(data.get("messages"), "messages", where)
        case "text":
            raise InputError("format 'text' holds pre-training documents, not conversations",
                             field="format", **where)
        case _:
            raise InputError(f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}",
                             field="format", **where)
    messages = [m for m, _ in pairs]
    names = [n for _, n in pairs]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
        names.insert(0, "system_prompt")
    check_turns(messages, names=names, **where)
    return Conversation(tuple(messages), _source(rec))


def _prompt_completion(data: dict, where: dict) -> list[tuple[dict, str]]:
    prompt, completion = data.get("prompt"), data.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return (_message_list(prompt, "prompt", where)
                + _message_list(completion, "completion", where))
    if isinstance(prompt, list) or isinstance(completion, list):
        raise InputError("prompt and completion must both be strings or both be lists of "
                         "messages", field="completion" if isinstance(prompt, list) else "prompt",
                         **where)
    return [({"role": "user", "content": _text(data, "prompt", **where)}, "prompt"),
            ({"role": "assistant", "content": _text(data, "completion", **where)}, "completion")]


def _message_list(value: object, field: str, where: dict, *,
                  allow_blank: bool = False) -> list[tuple[dict, str]]:
    """``[{"role", "content"}, ...]`` -> (message, field name) pairs, each item checked. With
    ``allow_blank`` a blank content passes (preference data counts a blank reply as a drop)."""
    if value is None:
        raise InputError("missing", field=field, **where)
    if not isinstance(value, list) or not value:
        raise InputError("expected a non-empty list of {role, content} objects", field=field,
                         **where)
    pairs = []
    for i, item in enumerate(value):
        name = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise InputError(f"expected an object, got {type(item).__name__}", field=name, **where)
        role = item.get("role")
        if role not in ROLES:
            raise InputError(f"role must be one of {', '.join(ROLES)}, got {role!r}",
                             field=f"{name}.role", **where)
        if allow_blank and isinstance(item.get("content"), str):
            content = item["content"]
        else:
            content = _text(item, "content", field_name=f"{name}.content", **where)
        pairs.append(({"role": role, "content": content}, name))
    return pairs


def check_turns(messages: list[dict] | tuple[dict, ...], *, final_role: str = "assistant",
                names: list[str] | None = None, path: str | None = None,
                line: int | None = None) -> None:
    """Check the turn order: [system], user, assistant, user, ..., ending with ``final_role``.

    Strict alternation is what every template here (and Llama-2's) can represent; a system
    message anywhere but first has no place in the inst/plain layouts.
    """
    names = names or [f"messages[{i}]" for i in range(len(messages))]
    if not messages:
        raise InputError("a conversation needs at least one message", path=path, line=line)
    roles = [m.get("role") for m in messages]
    start = 1 if roles[0] == "system" else 0
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            raise InputError(f"expected role '{expected}' here (turns are an optional system "
                             f"message, then user and assistant alternating), got {roles[i]!r}",
                             path=path, line=line, field=f"{names[i]}.role")
    if roles[-1] != final_role:
        raise InputError(f"the last turn must be {final_role}, got {roles[-1]!r}",
                         path=path, line=line, field=f"{names[-1]}.role")


def _text(data: dict, key: str, *, path: str | None, line: int | None,
          field_name: str | None = None) -> str:
    """``data[key]`` as a non-blank string, else InputError naming the field."""
    field = field_name or key
    if key in data and data[key] is None:
        raise InputError("is null", path=path, line=line, field=field)
    if key not in data:
        found = ", ".join(sorted(map(str, data))) or "none"
        raise InputError(f"missing (keys found: {found})", path=path, line=line, field=field)
    value = data[key]
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {type(value).__name__}", path=path, line=line,
                         field=field)
    if not value.strip():
        raise EmptyFieldError("is empty", path=path, line=line, field=field)
    return value


def _source(rec: Record) -> str:
    return rec.path if rec.line is None else f"{rec.path}:{rec.line}"


def load_sft(path: str, *, fmt: str = "auto", system_prompt: str | None = None,
             max_examples: int | None = None, split: str = "train",
             skipped: list[str] | None = None) -> list[Conversation]:
    """Read ``path`` and convert each record (the first ``max_examples``) to a Conversation.

    With ``fmt="auto"`` the format is detected from the first record and every later record
    must have the same format; a record that matches another format is an error naming its line.
    A record with an empty text field is an error, unless ``skipped`` is given: then it is left
    out and its one-line reason appended there, for the caller to count and report.
    """
    records = read_records(path, split=split)[:max_examples]
    if fmt == "auto":
        fmt = _detect(records[0].data, path=records[0].path, line=records[0].line)
        for rec in records[1:]:
            _check_same_format(rec, fmt, records[0])
    if fmt == "text":
        raise InputError("this data is plain text (pre-training documents); SFT needs "
                         "conversations", path=records[0].path, line=records[0].line,
                         field="text")
    out = []
    for rec in records:
        try:
            out.append(to_conversation(rec, fmt, system_prompt=system_prompt))
        except EmptyFieldError as e:
            if skipped is None:
                raise
            skipped.append(str(e))
    if not out:
        raise InputError("no usable records (every record has an empty field)", path=str(path))
    return out


def _check_same_format(rec: Record, fmt: str, first: Record) -> None:
    try:
        other = _detect(rec.data, path=rec.path, line=rec.line)
    except InputError:
        return  # matches no format: to_conversation names the missing field
    if other != fmt:
        raise InputError(f"mixed formats: this record is {other} but the first record "
                         f"(line {first.line}) is {fmt}", path=rec.path, line=rec.line)


def load_text(path: str, *, max_examples: int | None = None,
              split: str = "train") -> list[TextDoc]:
    """Pre-training documents: the ``text`` field of each record, or for a ``.txt`` file each
    block of lines separated by one or more blank lines (stripped)."""
    if str(path).lower().endswith(".txt"):
        docs = _txt_documents(str(path))
        if not docs:
            raise InputError("no documents found (the file is empty)", path=str(path))
        return docs[:max_examples]
    records = read_records(path, split=split)[:max_examples]
    return [TextDoc(_text(r.data, "text", path=r.path, line=r.line), _source(r)) for r in records]


def _txt_documents(path: str) -> list[TextDoc]:
    docs, block, start = [], [], 0
    # A trailing "" closes the last block; a line of only whitespace counts as blank.
    for n, line in enumerate(read_text(path).split("\n") + [""], start=1):
        if line.strip():
            start = start if block else n
            block.append(line.rstrip("\r"))
        elif block:
            docs.append(TextDoc("\n".join(block).strip(), f"{path}:{start}"))
            block = []
    return docs


def split_train_eval(items: list, *, eval_fraction: float, seed: int,
                     max_eval: int) -> tuple[list, list]:
    """Deterministic held-out split: ``(train, eval)``, each in the original order.

    The indices are shuffled with ``random.Random(seed)``; eval takes the first
    ``k = min(max_eval, round(n * eval_fraction))`` of them. When ``eval_fraction > 0``,
    ``max_eval > 0`` and ``n >= 2``, k is clamped to ``[1, n - 1]`` so both sides are non-empty.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    n = len(items)
    k = min(max_eval, round(n * eval_fraction))
    if eval_fraction > 0 and max_eval > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    eval_idx = set(order[:k])
    train = [x for i, x in enumerate(items) if i not in eval_idx]
    held = [x for i, x in enumerate(items) if i in eval_idx]
    return train, held
