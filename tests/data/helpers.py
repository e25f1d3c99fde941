"""Shared test helpers: byte ids of the tiny tokenizer, one-line error checks, file writers."""

from __future__ import annotations

import json

import pytest

from alignkit.errors import InputError

PAD, BOS, EOS = 0, 1, 2  # <|endoftext|>, <|im_start|>, <|im_end|>


def b(text: str) -> list[int]:
    """The tiny tokenizer's ids for plain text: byte b -> id 3 + b."""
    return [3 + x for x in text.encode("utf-8")]


def assert_error(excinfo: pytest.ExceptionInfo, path, line: int | None = None,
                 field: str | None = None, *words: str) -> str:
    """The error is an InputError, one line, naming the path, line and field (and ``words``)."""
    err = excinfo.value
    assert isinstance(err, InputError)
    msg = str(err)
    assert "\n" not in msg
    where = f"{path}:{line}: " if line is not None else f"{path}: "
    assert msg.startswith(where), msg
    if field is not None:
        assert f"field '{field}'" in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)
