import pytest

from alignkit.data.formats import (
    Conversation, TextDoc, detect_format, load_sft, load_text, split_train_eval, to_conversation)
from alignkit.data.sources import Record
from alignkit.errors import InputError

from .helpers import assert_error, write_jsonl


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize("data,fmt", [
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"instruction": "i", "input": "x", "output": "o"}, "alpaca"),
    # tatsu-lab/alpaca ships a rendered "text" column: the structured fields win.
    ({"instruction": "i", "input": "", "output": "o", "text": "rendered"}, "alpaca"),
    ({"instruction": "i", "response": "r"}, "instruction_response"),
    ({"prompt": "p", "completion": "c", "id": 7}, "prompt_completion"),
    ({"messages": []}, "messages"),
    ({"text": "t", "meta": 1}, "text"),
])
def test_detect_format(data, fmt):
    assert detect_format(data) == fmt


@pytest.mark.parametrize("data,words", [
    ({"question": "q", "answer": "a"}, ["unknown", "answer, question", "alpaca", "messages"]),
    ({"instruction": "i", "output": "o", "response": "r"},
     ["ambiguous", "alpaca or instruction_response", "instruction, output, response"]),
])
def test_detect_format_errors_name_keys_and_formats(data, words):
    with pytest.raises(InputError) as e:
        detect_format(data)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def _rec(data):
    return Record(data, "f.jsonl", 4)


@pytest.mark.parametrize("data,fmt,messages", [
    ({"instruction": "Sum", "input": "1 2", "output": "3"}, "alpaca", [_u("Sum\n\n1 2"), _a("3")]),
    ({"instruction": "Sum", "input": "  ", "output": "3"}, "alpaca", [_u("Sum"), _a("3")]),
    ({"instruction": "Sum", "output": "3"}, "alpaca", [_u("Sum"), _a("3")]),
    ({"instruction": "Poem", "response": "Leaves"}, "instruction_response",
     [_u("Poem"), _a("Leaves")]),
    ({"prompt": "Hi", "completion": " there"}, "prompt_completion", [_u("Hi"), _a(" there")]),
    ({"prompt": [{"role": "system", "content": "S"}, _u("Hi")], "completion": [_a("Yo")]},
     "prompt_completion", [{"role": "system", "content": "S"}, _u("Hi"), _a("Yo")]),
    ({"messages": [_u("a"), {"role": "assistant", "content": "b", "extra": 1}, _u("c"), _a("d")]},
     "messages", [_u("a"), _a("b"), _u("c"), _a("d")]),
])
def test_to_conversation(data, fmt, messages):
    conv = to_conversation(_rec(data), fmt)
    assert conv == Conversation(tuple(messages), "f.jsonl:4")


def test_system_prompt_is_prepended_only_when_missing():
    conv = to_conversation(_rec({"prompt": "Hi", "completion": "Yo"}), "prompt_completion",
                           system_prompt="Be kind.")
    assert conv.messages == ({"role": "system", "content": "Be kind."}, _u("Hi"), _a("Yo"))
    own = {"messages": [{"role": "system", "content": "Own."}, _u("Hi"), _a("Yo")]}
    conv = to_conversation(_rec(own), "messages", system_prompt="Be kind.")
    assert conv.messages[0] == {"role": "system", "content": "Own."}


@pytest.mark.parametrize("row,field,words", [
    ({"instruction": "i", "note": "n"}, "output", ["missing", "instruction, note"]),
    ({"instruction": "i", "output": "  \n"}, "output", ["empty"]),
    ({"instruction": 5, "output": "o"}, "instruction", ["expected a string", "int"]),
    ({"instruction": "i", "input": ["x"], "output": "o"}, "input", ["expected a string"]),
])
def test_alpaca_field_errors(tmp_path, row, field, words):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "ok", "output": "ok"}, row])
    with pytest.raises(InputError) as e:
        load_sft(path)
    assert_error(e, path, 2, field, *words)


@pytest.mark.parametrize("row,field,words", [
    ({"messages": "hi"}, "messages", ["list"]),
    ({"messages": [_u("a"), {"role": "bot", "content": "b"}]}, "messages[1].role", ["'bot'"]),
    ({"messages": [_u("a"), {"role": "assistant"}]}, "messages[1].content", ["missing"]),
    ({"messages": [_u("a"), _a(" ")]}, "messages[1].content", ["empty"]),
    ({"messages": [_u("a"), _a(3)]}, "messages[1].content", ["expected a string"]),
    ({"messages": [_u("a")]}, "messages[0].role", ["last turn must be assistant"]),
    ({"messages": [_u("a"), _u("b"), _a("c")]}, "messages[1].role", ["expected role 'assistant'"]),
    ({"messages": [_u("a"), _a("b"), {"role": "system", "content": "s"}, _a("c")]},
     "messages[2].role", ["expected role 'user'"]),
    ({"messages": [_a("b")]}, "messages[0].role", ["expected role 'user'"]),
    ({"messages": ["hi"]}, "messages[0]", ["expected an object"]),
])
def test_messages_errors(tmp_path, row, field, words):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [_u("q"), _a("r")]}, row])
    with pytest.raises(InputError) as e:
        load_sft(path)
    assert_error(e, path, 2, field, *words)


def test_prompt_completion_mixed_string_and_list(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "completion": [_a("c")]}])
    with pytest.raises(InputError) as e:
        load_sft(path)
    assert_error(e, path, 1, "prompt", "both be strings or both be lists")


def test_mixed_formats_name_the_line(tmp_path):
    rows = [{"instruction": "i", "output": "o"}] * 2 + [{"prompt": "p", "completion": "c"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(InputError) as e:
        load_sft(path)
    assert_error(e, path, 3, None, "mixed formats", "prompt_completion", "alpaca", "line 1")


def test_explicit_format_is_checked_record_by_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "i", "output": "o"}])
    with pytest.raises(InputError) as e:
        load_sft(path, fmt="instruction_response")
    assert_error(e, path, 1, "response", "missing")


def test_load_sft_from_csv_with_max_examples_and_system_prompt(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("instruction,response\nq1,a1\nq2,a2\nq3,a3\n", encoding="utf-8")
    convs = load_sft(str(p), max_examples=2, system_prompt="S")
    assert [c.source for c in convs] == [f"{p}:2", f"{p}:3"]
    assert convs[1].messages == ({"role": "system", "content": "S"}, _u("q2"), _a("a2"))


def test_load_sft_rejects_text_data(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a document"}])
    with pytest.raises(InputError) as e:
        load_sft(path)
    assert_error(e, path, 1, "text", "pre-training")


def test_load_text_records_and_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": "two"}, {"text": ""}])
    assert load_text(path, max_examples=2) == [TextDoc("one", f"{path}:1"),
                                               TextDoc("two", f"{path}:2")]
    with pytest.raises(InputError) as e:
        load_text(path)
    assert_error(e, path, 3, "text", "empty")


def test_load_text_txt_splits_on_blank_lines(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text("\ufeffFirst para\nstill first.\n\n  \nSecond.\r\n\r\n\nThird\n", encoding="utf-8")
    assert load_text(str(p)) == [TextDoc("First para\nstill first.", f"{p}:1"),
                                 TextDoc("Second.", f"{p}:5"), TextDoc("Third", f"{p}:8")]
    p.write_text(" \n\n", encoding="utf-8")
    with pytest.raises(InputError) as e:
        load_text(str(p))
    assert_error(e, p, None, None, "no documents")


def test_split_is_deterministic_disjoint_and_complete():
    items = list(range(100))
    train, held = split_train_eval(items, eval_fraction=0.1, seed=3, max_eval=256)
    assert len(held) == 10 and len(train) == 90
    assert sorted(train + held) == items
    assert (train, held) == split_train_eval(items, eval_fraction=0.1, seed=3, max_eval=256)
    assert held != split_train_eval(items, eval_fraction=0.1, seed=4, max_eval=256)[1]
    assert train == sorted(train) and held == sorted(held)  # original order kept


@pytest.mark.parametrize("n,fraction,max_eval,n_eval", [
    (100, 0.1, 3, 3),    # capped by max_eval
    (10, 0.01, 256, 1),  # round(0.1) = 0, but a positive fraction keeps one eval example
    (2, 0.5, 256, 1),
    (3, 0.9, 256, 2),    # round(2.7) = 3 would leave no training data
    (1, 0.5, 256, 0),    # one example: it trains
    (50, 0.0, 256, 0),
    (50, 0.2, 0, 0),     # max_eval 0 turns eval off
])
def test_split_sizes(n, fraction, max_eval, n_eval):
    train, held = split_train_eval(list(range(n)), eval_fraction=fraction, seed=0,
                                   max_eval=max_eval)
    assert (len(train), len(held)) == (n - n_eval, n_eval)
