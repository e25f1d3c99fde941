"""Read raw records (one dict per example) from files, saved Hugging Face datasets, or the hub.

Supported sources, chosen by the path:

- ``*.jsonl``   one JSON object per line; blank lines are skipped.
- ``*.json``    one JSON array of objects (``{"data": [...]}`` or a single object is an error).
- ``*.csv``     a header row, then one record per row; every value is a string.
- ``*.parquet`` read with pyarrow.
- a folder written by ``datasets.Dataset.save_to_disk`` (needs ``pip install datasets``).
- ``hub:NAME``  ``datasets.load_dataset(NAME, split=split)`` (needs ``pip install datasets``).
- a glob (``data/*/train.jsonl``): every matching file in sorted order, records concatenated,
  each still naming its own file and line.

Every problem is an :class:`~alignkit.errors.InputError` naming the path and, where there is
one, the line. Text files must be UTF-8; a leading byte-order mark is tolerated.
"""

from __future__ import annotations

import bisect
import csv
import glob
import io
import json
import os
from dataclasses import dataclass

from alignkit.errors import InputError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
# json's parser recurses once per nesting level: thousands of "[" exhaust the stack.
_TOO_DEEP = "malformed JSON: nested too deeply (thousands of levels of arrays or objects)"


@dataclass(frozen=True)
class Record:
    """One raw example and where it came from.

    ``line`` is the 1-based file line where the record starts for JSONL, JSON and CSV (the CSV
    header is line 1), and the 1-based record index for parquet and HF datasets, which have no
    lines. ``None`` only when no position is known.
    """

    data: dict
    path: str
    line: int | None


def read_records(path: str, *, split: str = "train") -> list[Record]:
    """All records of ``path`` in order; raises InputError on anything unreadable or empty."""
    path = str(path)
    if not path.strip():
        raise InputError("the data path is empty", field="data.path")
    if glob.has_magic(path) and not path.startswith("hub:") and not os.path.exists(path):
        matches = sorted(m for m in glob.glob(path) if not os.path.isdir(m))
        if not matches:
            raise InputError("no file matches this pattern", path=path)
        return [rec for match in matches for rec in read_records(match, split=split)]
    if path.startswith("hub:"):
        records = _read_hub(path, split)
    elif os.path.isdir(path):
        records = _read_saved_dataset(path, split)
    elif not os.path.exists(path):
        raise InputError("file not found", path=path)
    else:
        suffix = os.path.splitext(path)[1].lower()
        match suffix:
            case ".jsonl":
                records = _read_jsonl(path)
            case ".json":
                records = _read_json(path)
            case ".csv":
                records = _read_csv(path)
            case ".parquet":
                records = _read_parquet(path)
            case _:
                raise InputError(
                    f"unknown file type '{suffix or '(none)'}'; expected one of "
                    f"{', '.join(FILE_SUFFIXES)}, a saved HF dataset folder, or hub:NAME",
                    path=path)
    if not records:
        raise InputError("no records found (the file is empty)", path=path)
    return records


def read_text(path: str) -> str:
    """The file as text: UTF-8 (BOM stripped), with the line of the first bad byte on error."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError("file not found", path=path) from None
    except OSError as e:
        raise InputError(f"cannot read file: {e.strerror}", path=path) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise InputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8",
                         path=path, line=line) from None
    nul = text.find("\x00")
    if nul >= 0:  # never in text: a UTF-16 file without its byte-order mark, or a binary file
        raise InputError("holds a NUL byte: not a UTF-8 text file (UTF-16? binary?)", path=path,
                         line=text.count("\n", 0, nul) + 1)
    return text[1:] if text.startswith("\ufeff") else text


def _read_jsonl(path: str) -> list[Record]:
    records = []
    # split("\n"), not splitlines(): U+2028 and friends may legally appear inside JSON strings.
    for n, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"malformed JSON: {e.msg} (column {e.colno})",
                             path=path, line=n) from None
        except RecursionError:
            raise InputError(_TOO_DEEP, path=path, line=n) from None
        if not isinstance(value, dict):
            raise InputError(f"expected a JSON object, got {_json_type(value)}", path=path, line=n)
        if "\\u" in line:
            _check_text(value, path, n)
        records.append(Record(value, path, n))
    return records


def _read_json(path: str) -> list[Record]:
    text = read_text(path)
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"malformed JSON: {e.msg} (column {e.colno})",
                         path=path, line=e.lineno) from None
    except RecursionError:
        raise InputError(_TOO_DEEP, path=path) from None
    if not isinstance(value, list):
        raise InputError(f"expected a JSON array of objects at the top level, got "
                         f"{_json_type(value)} (for one object per line use .jsonl)", path=path)
    records = []
    for item, line in zip(value, _array_item_lines(text), strict=True):
        if not isinstance(item, dict):
            raise InputError(f"expected a JSON object, got {_json_type(item)}",
                             path=path, line=line)
        if "\\u" in text:
            _check_text(item, path, line)
        records.append(Record(item, path, line))
    return records


def _check_text(value: object, path: str, line: int | None) -> None:
    """JSON may escape half of a UTF-16 pair (``"\\ud800"``) alone: Python keeps it as a lone
    surrogate, which is no text (tokenizers fail on it deep inside). Only called for lines
    holding a ``\\u`` escape, so clean data pays nothing."""
    try:
        _check_surrogates(value, path, line)
    except RecursionError:
        raise InputError(_TOO_DEEP, path=path, line=line) from None


def _check_surrogates(value: object, path: str, line: int | None, field: str = "") -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            code = ord(value[e.start])
            raise InputError(f"holds an unpaired UTF-16 surrogate (\\u{code:04x}), which is "
                             f"not text", path=path, line=line, field=field or None) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_surrogates(v, path, line, f"{field}.{k}" if field else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_surrogates(v, path, line, f"{field}[{i}]")


def _array_item_lines(text: str) -> list[int]:
    """The 1-based line where each element of a (known valid) top-level JSON array starts.

    A second, scanning pass so errors in pretty-printed files point at the record's own line.
    """
    newlines = [i for i, c in enumerate(text) if c == "\n"]
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    i = text.index("[") + 1
    lines = []
    while True:
        while text[i] in ws or text[i] == ",":
            i += 1
        if text[i] == "]":
            return lines
        lines.append(bisect.bisect_left(newlines, i) + 1)
        _, i = decoder.raw_decode(text, i)


def _read_csv(path: str) -> list[Record]:
    reader = csv.reader(io.StringIO(read_text(path), newline=""))
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise InputError(f"malformed CSV: {e}", path=path, line=1) from None
    if header is None:
        return []
    if any(not h.strip() for h in header) or len(set(header)) != len(header):
        raise InputError(f"the CSV header needs unique, non-empty column names, got {header}",
                         path=path, line=1)
    records, previous_end = [], reader.line_num
    while True:
        start = previous_end + 1  # a quoted field may span lines: report where the row starts
        try:
            row = next(reader, None)
        except csv.Error as e:
            raise InputError(f"malformed CSV: {e}", path=path, line=start) from None
        if row is None:
            return records
        previous_end = reader.line_num
        if not row:  # a blank line
            continue
        if len(row) != len(header):
            raise InputError(f"row has {len(row)} fields but the header has {len(header)}",
                             path=path, line=start)
        records.append(Record(dict(zip(header, row, strict=True)), path, start))


def _read_parquet(path: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"not a readable parquet file: {e}", path=path) from None
    return [Record(row, path, i) for i, row in enumerate(rows, start=1)]


def _import_datasets(path: str):
    try:
        import datasets
    except ImportError:
        raise InputError("reading Hugging Face datasets needs the 'datasets' package: "
                         "pip install datasets", path=path) from None
    return datasets


def _read_saved_dataset(path: str, split: str) -> list[Record]:
    datasets = _import_datasets(path)
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise InputError("this folder is not a dataset saved with datasets' save_to_disk",
                         path=path) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise InputError(f"split '{split}' not found; available: {', '.join(ds)}",
                             path=path, field="split")
        ds = ds[split]
    return [Record(dict(row), path, i) for i, row in enumerate(ds, start=1)]


def _read_hub(path: str, split: str) -> list[Record]:
    name = path[len("hub:"):]
    if not name:
        raise InputError("hub: needs a dataset name, e.g. hub:tatsu-lab/alpaca", path=path)
    datasets = _import_datasets(path)
    try:
        ds = datasets.load_dataset(name, split=split)
    # Unknown dataset (a FileNotFoundError), no network (ConnectionError), unknown split.
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load from the hub: {e}", path=path) from None
    return [Record(dict(row), path, i) for i, row in enumerate(ds, start=1)]


def _json_type(value: object) -> str:
    match value:
        case dict():
            return "an object"
        case list():
            return "an array"
        case str():
            return "a string"
        case bool():
            return "a boolean"
        case int() | float():
            return "a number"
        case None:
            return "null"
    return type(value).__name__
