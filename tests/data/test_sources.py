import csv
import json
import sys

import pytest

from alignkit.data.sources import Record, read_records
from alignkit.errors import InputError

from .helpers import assert_error, write_jsonl

ROWS = [
    {"instruction": "Write a poem", "response": "Leaves fall,\n\"gold\", slowly."},
    {"instruction": "Café, naïve — ünïcode", "response": "ok, fine"},
    {"instruction": "3", "response": ""},
]


def _write_all(tmp_path) -> dict[str, str]:
    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS)}
    (tmp_path / "d.json").write_text(json.dumps(ROWS, indent=2), encoding="utf-8")
    paths["json"] = str(tmp_path / "d.json")
    with open(tmp_path / "d.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "response"])
        w.writeheader()
        w.writerows(ROWS)
    paths["csv"] = str(tmp_path / "d.csv")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    paths["parquet"] = str(tmp_path / "d.parquet")
    return paths


def test_all_readers_give_the_same_records(tmp_path):
    paths = _write_all(tmp_path)
    for kind, path in paths.items():
        recs = read_records(path)
        assert [r.data for r in recs] == ROWS, kind
        assert all(r.path == path for r in recs)


def test_positions_are_file_lines_or_record_indices(tmp_path):
    paths = _write_all(tmp_path)
    assert [r.line for r in read_records(paths["jsonl"])] == [1, 2, 3]
    # json.dumps(indent=2): "[" on line 1, each 2-key object takes 4 lines, the first opens on 2.
    assert [r.line for r in read_records(paths["json"])] == [2, 6, 10]
    # header is line 1; row 1's response holds a newline, so it spans lines 2-3.
    assert [r.line for r in read_records(paths["csv"])] == [2, 4, 5]
    assert [r.line for r in read_records(paths["parquet"])] == [1, 2, 3]


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('\n{"a": 1}\n   \n\n{"a": 2}\n\n', encoding="utf-8")
    assert read_records(str(p)) == [Record({"a": 1}, str(p), 2), Record({"a": 2}, str(p), 5)]


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    # U+2028 is legal unescaped in JSON; str.splitlines() would split the record in two.
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": "x\u2028y"}\n{"a": "z"}\n', encoding="utf-8")
    assert [r.data["a"] for r in read_records(str(p))] == ["x\u2028y", "z"]


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv"])
def test_utf8_bom_is_tolerated(tmp_path, kind):
    path = _write_all(tmp_path)[kind]
    raw = open(path, "rb").read()
    open(path, "wb").write(b"\xef\xbb\xbf" + raw)
    assert [r.data for r in read_records(path)] == ROWS


def test_csv_crlf_and_blank_rows(tmp_path):
    p = tmp_path / "d.csv"
    p.write_bytes(b"prompt,completion\r\n\r\nhi,there\r\nq,a\r\n")
    recs = read_records(str(p))
    assert [(r.data, r.line) for r in recs] == [({"prompt": "hi", "completion": "there"}, 3),
                                                ({"prompt": "q", "completion": "a"}, 4)]


# ---- errors: one line, naming path, line (and field) ----

def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(InputError) as e:
        read_records(path)
    assert_error(e, path, None, None, "not found")


def test_unknown_extension(tmp_path):
    p = tmp_path / "d.xlsx"
    p.write_text("x", encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_records(str(p))
    assert_error(e, p, None, None, ".xlsx", ".jsonl", ".parquet")


@pytest.mark.parametrize("name,content", [
    ("d.jsonl", ""), ("d.jsonl", "\n  \n\n"), ("d.json", ""), ("d.json", "[]"),
    ("d.csv", ""), ("d.csv", "prompt,completion\n")])
def test_empty_file(tmp_path, name, content):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_records(str(p))
    assert_error(e, p, None, None, "no records")


def test_malformed_jsonl_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3,, }\n{"a": 4}\n', encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_records(str(p))
    assert_error(e, p, 3, None, "malformed JSON", "column")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n["a", 2]\n', encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_records(str(p))
    assert_error(e, p, 2, None, "expected a JSON object", "array")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_not_utf8_names_the_line(tmp_path, suffix):
    p = tmp_path / f"d{suffix}"
    body = {".jsonl": b'{"a": "ok"}\n{"a": "caf\xe9"}\n',
            ".json": b'[\n{"a": "ok"},\n{"a": "caf\xe9"}]',
            ".csv": b"a\nok\ncaf\xe9\n"}[suffix]
    p.write_bytes(body)
    line = 3 if suffix != ".jsonl" else 2
    with pytest.raises(InputError) as e:
        read_records(str(p))
    assert_error(e, p, line, None, "UTF-8", "0xe9")


def test_json_top_level_must_be_an_array(tmp_path):
    for content in ('{"data": [{"a": 1}]}', '{"a": 1}'):
        p = tmp_path / "d.json"
        p.write_text(content, encoding="utf-8")
        with pytest.raises(InputError) as e:
            read_records(str(p))
        assert_error(e, p, None, None, "JSON array", ".jsonl")


def test_json_syntax_error_and_non_object_item(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"a": 1},\n  {"a": }\n]', encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_records(str(p))
    assert_error(e, p, 3, None, "malformed JSON")
    p.write_text('[\n  {"a": 1},\n\n  "oops"\n]', encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_records(str(p))
    assert_error(e, p, 4, None, "a string")


def test_csv_row_with_wrong_field_count(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\n1,2\n1,2,3\n", encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_records(str(p))
    assert_error(e, p, 3, None, "3 fields", "header has 2")


def test_bad_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(InputError) as e:
        read_records(str(p))
    assert_error(e, p, None, None, "parquet")


@pytest.mark.parametrize("kind", ["folder", "hub"])
def test_hf_sources_without_datasets_say_how_to_install(tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    path = str(tmp_path) if kind == "folder" else "hub:tatsu-lab/alpaca"
    with pytest.raises(InputError) as e:
        read_records(path)
    assert_error(e, path, None, None, "pip install datasets")


def test_saved_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    recs = read_records(str(tmp_path / "ds"))
    assert [r.data for r in recs] == ROWS and [r.line for r in recs] == [1, 2, 3]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(
        str(tmp_path / "dd"))
    assert [r.data for r in read_records(str(tmp_path / "dd"))] == ROWS[:1]
    with pytest.raises(InputError) as e:
        read_records(str(tmp_path / "dd"), split="test")
    assert_error(e, tmp_path / "dd", None, "split", "train")


def test_a_glob_concatenates_matching_files_in_order_and_errors_name_each_file(tmp_path):
    for sub, rows in (("b", [{"a": 3}]), ("a", [{"a": 1}, {"a": 2}])):
        (tmp_path / sub).mkdir()
        write_jsonl(tmp_path / sub / "train.jsonl", rows)
    recs = read_records(str(tmp_path / "*" / "train.jsonl"))
    assert [r.data["a"] for r in recs] == [1, 2, 3]
    assert [(r.path, r.line) for r in recs] == [
        (str(tmp_path / "a" / "train.jsonl"), 1), (str(tmp_path / "a" / "train.jsonl"), 2),
        (str(tmp_path / "b" / "train.jsonl"), 1)]
    (tmp_path / "b" / "train.jsonl").write_text('{"a": 3}\n{"a": \n', encoding="utf-8")
    with pytest.raises(InputError) as e:
        read_records(str(tmp_path / "*" / "train.jsonl"))
    assert_error(e, tmp_path / "b" / "train.jsonl", 2, None, "malformed JSON")
    with pytest.raises(InputError) as e:
        read_records(str(tmp_path / "*" / "eval.jsonl"))
    assert_error(e, tmp_path / "*" / "eval.jsonl", None, None, "no file matches")
