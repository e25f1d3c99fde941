import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.data.formats import Conversation
from alignkit.data.preference import (
    EncodedPair, EncodedRanked, PreferencePair, PreferenceReport, RankedList, collate_pairs,
    collate_ranked, detect_preference_format, encode_completion, load_preferences,
    pair_fingerprint, pairs_from_ranked, split_hh_transcript, tokenize_preferences)
from alignkit.data.templates import encode_conversation
from alignkit.errors import InputError

from .helpers import BOS, EOS, PAD, assert_error, b, write_jsonl



def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def _s(text):
    return {"role": "system", "content": text}


def _hh(*turns):
    """("Human", "hi"), ("Assistant", "yo") ... -> an HH transcript."""
    return "".join(f"\n\n{role}: {text}" for role, text in turns)


# ---- HH-RLHF transcripts ----

def test_hh_multi_turn_split_at_the_last_assistant_turn():
    text = "\n\nHuman: Hi there\n\nAssistant: Hello!  \n\nHuman:  What is 2+2? \n\nAssistant: 4\n"
    prompt, response = split_hh_transcript(text, path="f", line=1, field="chosen")
    assert prompt == (_u("Hi there"), _a("Hello!"), _u("What is 2+2?"))
    assert response == "4"


@pytest.mark.parametrize("text,prompt,response", [
    # whitespace oddities around the transcript (the real data has a record starting "\nHuman:")
    ("\nHuman: q\n\nAssistant: r", (_u("q"),), "r"),
    ("  Human: q\n\nAssistant:  r \n\n", (_u("q"),), "r"),
    # an empty final response is returned empty (load_preferences counts the drop)
    ("\n\nHuman: q\n\nAssistant: ", (_u("q"),), ""),
    # an empty turn inside the prompt is dropped and the two user turns around it joined
    ("\n\nHuman: q1\n\nAssistant:\n\nHuman: q2\n\nAssistant: r", (_u("q1\n\nq2"),), "r"),
    # "Human:" written inline by the model: the final assistant turn is returned whole
    ("\n\nHuman: q\n\nAssistant: a  Human: q2\n\nAssistant: b", (_u("q"),),
     "a  Human: q2\n\nb"),
    # a typo'd marker is content
    ("\n\nHuman: q\n\nAssistant: a\n\nHumans: thanks\n\nAssistant: ok", (_u("q"),),
     "a\n\nHumans: thanks\n\nok"),
])
def test_hh_quirks_are_tolerated(text, prompt, response):
    assert split_hh_transcript(text, path="f", line=1, field="chosen") == (prompt, response)


@pytest.mark.parametrize("text,words", [
    ("\n\nHuman: no answer here", ["Assistant"]),
    ("\n\nAssistant: only the assistant", ["Human"]),
    ("\n\nAssistant: hi\n\nHuman: q\n\nAssistant: r", ["start with", "Human"]),
    ("preamble\n\nHuman: q\n\nAssistant: r", ["text before", "preamble"]),
])
def test_hh_malformed_transcripts_are_one_line_errors(tmp_path, text, words):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": _hh(("Human", "q"), ("Assistant", "a")),
         "rejected": _hh(("Human", "q"), ("Assistant", "b"))},
        {"chosen": _hh(("Human", "q"), ("Assistant", "a")), "rejected": text}])
    with pytest.raises(InputError) as e:
        load_preferences(path)
    assert_error(e, path, 2, "rejected", *words)


def test_hh_prompt_from_chosen_and_mismatch_counted(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": _hh(("Human", "q"), ("Assistant", "a"), ("Human", "q2"),
                       ("Assistant", "good")),
         "rejected": _hh(("Human", "q"), ("Assistant", "a"), ("Human", "q2"),
                         ("Assistant", "bad"))},
        {"chosen": _hh(("Human", "q"), ("Assistant", "yes")),
         "rejected": _hh(("Human", "other q"), ("Assistant", "no"))},
        {"chosen": _hh(("Human", "q"), ("Assistant", "")),  # dropped: not a mismatch
         "rejected": _hh(("Human", "x"), ("Assistant", "no"))},
    ])
    items, report = load_preferences(path, system_prompt="Be kind.")
    assert items == [
        PreferencePair((_s("Be kind."), _u("q"), _a("a"), _u("q2")), "good", "bad",
                       source=f"{path}:1"),
        PreferencePair((_s("Be kind."), _u("q")), "yes", "no", source=f"{path}:2"),
    ]
    assert (report.total, report.kept, report.dropped, report.prompt_mismatch) == (
        3, 2, {"empty_chosen": 1}, 1)
    assert report.summary() == (
        "3 records: 2 kept, 1 dropped (empty_chosen: 1); 1 prompt mismatches (kept)")


@pytest.mark.parametrize("subset,lines", [("harmless-base", 1312), ("helpful-base", 1354)])
def test_real_hh_rlhf_every_line_accounted_for(shared_data, capsys, subset, lines):
    # shared_data (tests/conftest.py) is <repo>/../shared/data, skipped when absent
    items, report = load_preferences(str(shared_data / "hh-rlhf" / subset / "train.jsonl"))
    assert report.total == lines == report.kept + report.dropped_records
    assert len(items) == report.kept
    # the data README: 4 empty final responses and at most 2 identical pairs per subset
    assert set(report.dropped) <= {"empty_chosen", "empty_rejected", "identical"}
    assert report.dropped.get("identical", 0) <= 2 and report.dropped_records <= 6
    # every apparent prompt difference in these files is a "Human:" written inside a reply
    assert report.prompt_mismatch == 0
    assert all(p.prompt[-1]["role"] == "user" and p.chosen.strip() and p.rejected.strip()
               and p.chosen != p.rejected for p in items)
    assert capsys.readouterr() == ("", "")


# ---- pairs ----

def test_pairs_strings_messages_margin_and_soft_label(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "good", "rejected": "bad", "margin": 2, "id": 7},
        {"prompt": [_s("sys"), _u("q")], "chosen": "good", "rejected": "bad", "label": 0.8},
        # TRL conversational, explicit prompt
        {"prompt": [_u("q")], "chosen": [_a("good")], "rejected": [_a("bad")], "score": 0.25},
        # TRL conversational, implicit prompt: all but the last message of chosen
        {"chosen": [_u("q"), _a("a"), _u("q2"), _a("good")],
         "rejected": [_u("q"), _a("a"), _u("q2"), _a("bad")]},
    ])
    items, report = load_preferences(path)
    assert [(i.prompt, i.chosen, i.rejected, i.margin, i.label) for i in items] == [
        ((_u("q"),), "good", "bad", 2.0, None),
        ((_s("sys"), _u("q")), "good", "bad", None, 0.8),
        ((_u("q"),), "good", "bad", None, 0.25),
        ((_u("q"), _a("a"), _u("q2")), "good", "bad", None, None),
    ]
    assert (report.total, report.kept, report.dropped) == (4, 4, {})


@pytest.mark.parametrize("row,field,words", [
    ({"prompt": "q", "chosen": "a"}, "rejected", ["missing"]),
    ({"prompt": "q", "chosen": 3, "rejected": "b"}, "chosen", ["string"]),
    ({"prompt": "q", "chosen": [_a("a")], "rejected": "b"}, "rejected", ["both"]),
    ({"prompt": [_u("q"), _a("a")], "chosen": "a", "rejected": "b"}, "prompt[1].role", ["user"]),
    ({"prompt": " ", "chosen": "a", "rejected": "b"}, "prompt", ["empty"]),
    ({"chosen": [_u("q"), _a("a")], "rejected": [_u("other"), _a("b")]}, "rejected",
     ["differs"]),
    ({"chosen": [_u("q"), _u("a")], "rejected": [_u("q"), _a("b")]}, "chosen[1].role",
     ["assistant"]),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": 1.5}, "label", ["[0, 1]"]),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin", ["number"]),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "label": 1, "score": 1}, "score",
     ["not both"]),
])
def test_pairs_structural_errors_name_the_field(tmp_path, row, field, words):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                              row])
    with pytest.raises(InputError) as e:
        load_preferences(path, fmt="pairs")
    assert_error(e, path, 2, field, *words)


def test_pairs_from_csv(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text('prompt,chosen,rejected,margin\nq,good,bad,0.5\n"q, two","x\ny",z,\n',
                    encoding="utf-8")
    items, report = load_preferences(str(path))
    assert items == [PreferencePair((_u("q"),), "good", "bad", 0.5, source=f"{path}:2"),
                     PreferencePair((_u("q, two"),), "x\ny", "z", source=f"{path}:3")]
    assert report.kept == 2


def test_drops_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "same", "rejected": " same "},
        {"prompt": "q", "chosen": "  ", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": ""},
        {"prompt": [_u("q")], "chosen": [_a("")], "rejected": [_a("b")]},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ])
    items, report = load_preferences(path)
    assert [i.source for i in items] == [f"{path}:5"]
    assert report.dropped == {"identical": 1, "empty_chosen": 2, "empty_rejected": 1}
    assert report.summary() == (
        "5 records: 1 kept, 4 dropped (identical: 1, empty_chosen: 2, empty_rejected: 1)")


# ---- ranked lists ----

def test_ranked_with_ranking_and_with_scores(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q", "responses": ["b", "c", "a"], "ranking": [2, 0, 1]},
        {"prompt": "q", "responses": ["w", "x", "y", "z"], "scores": [1, 3, 1, 2.5]},  # tie
        {"prompt": "q", "responses": ["lo", "hi"], "scores": [-1.0, 0.5]},
    ])
    items, report = load_preferences(path)
    assert [i.responses for i in items] == [("a", "b", "c"), ("x", "z", "w", "y"), ("hi", "lo")]
    assert items[0] == RankedList((_u("q"),), ("a", "b", "c"), f"{path}:1")
    assert (report.kept, report.ties, report.dropped) == (3, 1, {})


@pytest.mark.parametrize("extra,field,words", [
    ({"ranking": [0, 0, 1]}, "ranking", ["twice"]),
    ({"ranking": [0, 3, 1]}, "ranking", ["out of range"]),
    ({"ranking": [0, -1, 1]}, "ranking", ["out of range"]),
    ({"ranking": [0, 1]}, "ranking", ["every response"]),
    ({"ranking": [0, 1.0, 2]}, "ranking", ["integers"]),
    ({}, "ranking", ["missing"]),
    ({"ranking": [0, 1, 2], "scores": [1, 2, 3]}, "ranking", ["both"]),
    ({"scores": [1, 2]}, "scores", ["3 numbers"]),
])
def test_invalid_ranking_names_the_field(tmp_path, extra, field, words):
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "responses": ["a", "b", "c"],
                                               **extra}])
    with pytest.raises(InputError) as e:
        load_preferences(path)
    assert_error(e, path, 1, field, *words)


def test_ranked_empty_duplicate_and_too_few_responses(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q", "responses": ["a", " ", "b"], "ranking": [1, 0, 2]},
        {"prompt": "q", "responses": ["a", ""], "ranking": [0, 1]},
        {"prompt": "q", "responses": ["only"], "ranking": [0]},
        {"prompt": "q", "responses": ["a", "b", "a "], "scores": [1, 3, 2]},
    ])
    items, report = load_preferences(path)
    assert [i.responses for i in items] == [("a", "b"), ("b", "a ")]
    assert report.dropped == {"empty_response": 2, "too_few_responses": 2,
                              "duplicate_response": 1}
    assert report.total == report.kept + report.dropped_records == 4
    assert report.summary() == ("4 records: 2 kept, 2 dropped (too_few_responses: 2); "
                                "3 responses removed (empty_response: 2, duplicate_response: 1)")


def test_pairs_from_ranked_all_pairs_in_order():
    p = (_u("q"),)
    assert [(x.chosen, x.rejected) for x in pairs_from_ranked(RankedList(p, ("a", "b", "c")))] \
        == [("a", "b"), ("a", "c"), ("b", "c")]
    pairs = pairs_from_ranked(RankedList(p, ("a", "b", "c", "d"), "f:3"))
    assert [(x.chosen, x.rejected) for x in pairs] == [
        ("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")]
    assert all(x.prompt == p and x.source == "f:3" for x in pairs)


# ---- detection ----

@pytest.mark.parametrize("data,fmt", [
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "pairs"),
    ({"chosen": [_u("q"), _a("a")], "rejected": [_u("q"), _a("b")]}, "pairs"),
    ({"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "x"}, "hh"),
    ({"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]}, "ranked"),
])
def test_detect_preference_format(data, fmt):
    assert detect_preference_format(data) == fmt


def test_detect_unknown_and_mixed_formats(tmp_path):
    with pytest.raises(InputError, match="unknown preference data format: keys found: a, b"):
        detect_preference_format({"a": 1, "b": 2})
    path = write_jsonl(tmp_path / "m.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}])
    with pytest.raises(InputError) as e:
        load_preferences(path)
    assert_error(e, path, 3, None, "mixed formats", "hh", "pairs", "line 1")


def test_system_prompt_only_where_missing_and_max_examples(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [
        {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]},
        {"prompt": [_s("own"), _u("q")], "responses": ["a", "b"], "ranking": [1, 0]},
        {"prompt": "q", "responses": ["a", "b"], "ranking": [0, 1]}])
    items, report = load_preferences(path, system_prompt="S", max_examples=2)
    assert [i.prompt for i in items] == [(_s("S"), _u("q")), (_s("own"), _u("q"))]
    assert report.total == 2


# ---- tokenisation ----

@pytest.mark.parametrize("template", ["chat", "inst", "plain"])
def test_encode_completion_is_the_conversation_prefix_ending_in_eos(tok, template):
    prompt = (_s("Be brief."), _u("hi"), _a("yo"), _u("and?"))
    prompt_ids, completion = encode_completion(tok, prompt, "fine", template)
    full = encode_conversation(tok, Conversation(prompt + (_a("fine"),), "t:1"), template)
    n = len(prompt_ids) + len(completion)
    assert prompt_ids + completion == full.input_ids[:n]
    assert completion[-1] == EOS
    # every completion token is a target; no target is left after it
    assert all(full.loss_mask[len(prompt_ids):n]) and not any(full.loss_mask[n:])
    single = encode_completion(tok, (_u("hi"),), "yo", template)
    if template != "chat":  # ChatML uses <|im_start|> (the BOS) to open every turn
        assert (single[0] + single[1]).count(BOS) == 1 and single[0][0] == BOS
    assert {"chat": b("yo") + [EOS], "inst": b(" yo") + [EOS],
            "plain": b("yo") + [EOS]}[template] == single[1]


def test_encode_completion_exact_ids(tok):
    assert encode_completion(tok, (_u("hi"),), "yo", "plain") == ([BOS] + b("hi\n"),
                                                                  b("yo") + [EOS])
    prompt_ids, completion = encode_completion(tok, (_u("hi"),), "yo", "chat")
    assert prompt_ids[-len(b("assistant\n")) - 1:] == [BOS] + b("assistant\n")
    assert completion == b("yo") + [EOS]  # ChatML's trailing "\n" is not part of it


# plain: prompt BOS "abcdef\n" = 8 tokens; chosen "xyz" EOS = 4; rejected "pq" EOS = 3
PAIR = PreferencePair((_u("abcdef"),), "xyz", "pq", margin=1.5, label=0.9)
P_IDS, C_IDS, R_IDS = [BOS] + b("abcdef\n"), b("xyz") + [EOS], b("pq") + [EOS]


@pytest.mark.parametrize("max_length,prompt,chosen,rejected", [
    (12, P_IDS, C_IDS, R_IDS),  # fits: untouched
    (10, [BOS] + b("cdef\n"), C_IDS, R_IDS),  # prompt cut from the start, BOS kept
    (9, [BOS] + b("def\n"), C_IDS, R_IDS),
    # floor min(8, 6 // 2) = 3 prompt tokens, then only the too-long chosen is cut (no EOS)
    (6, [BOS] + b("f\n"), b("xyz"), R_IDS),
    (4, [BOS] + b("\n"), b("xy"), b("pq")),  # floor 2
])
def test_truncate_left_exact(tok, max_length, prompt, chosen, rejected):
    out, report = tokenize_preferences(tok, [PAIR], template="plain", max_length=max_length,
                                       truncation="truncate_left")
    assert out == [EncodedPair(prompt, chosen, rejected, 1.5, 0.9)]
    assert len(prompt) + max(len(chosen), len(rejected)) <= max_length
    assert (report.total, report.kept, report.truncated) == (1, 1, int(max_length < 12))


def test_drop_policy_and_identical_after_truncation(tok):
    items = [PAIR, PreferencePair((_u("a"),), "b", "c"),
             RankedList((_u("ab"),), ("r1", "longer", "x"))]
    out, report = tokenize_preferences(tok, items, template="plain", max_length=10,
                                       truncation="drop")
    # ranked: prompt BOS "ab\n" = 4 tokens, longest "longer" EOS = 7 -> 11 > 10
    assert out == [EncodedPair([BOS] + b("a\n"), b("b") + [EOS], b("c") + [EOS])]
    assert report.dropped == {"too_long": 2}
    assert report.summary() == "3 examples: 1 kept (0 truncated), 2 dropped (too_long: 2)"
    same = [PreferencePair((_u("q"),), "xyz1", "xyz2"),
            RankedList((_u("q"),), ("abc1", "abc2", "zz"))]
    out, report = tokenize_preferences(tok, same, template="plain", max_length=6,
                                       truncation="truncate_left")
    # prompt BOS "q\n" = 3 tokens (the floor), completions cut to 3: xyz / xyz; abc / abc / zzE
    assert out == [EncodedRanked([BOS] + b("q\n"), [b("abc"), b("zz") + [EOS]])]
    assert (report.kept, report.truncated, report.dropped) == (
        1, 1, {"identical_after_truncation": 1})


def test_tokenize_ranked_keeps_order(tok):
    out, report = tokenize_preferences(tok, [RankedList((_u("ab"),), ("r1", "longer", "x"))],
                                       template="plain", max_length=64,
                                       truncation="truncate_left")
    assert out == [EncodedRanked([BOS] + b("ab\n"),
                                 [b("r1") + [EOS], b("longer") + [EOS], b("x") + [EOS]])]
    assert report.summary() == "1 examples: 1 kept (0 truncated), 0 dropped"


def test_pair_fingerprint_is_stable_and_over_ids_only():
    a = [EncodedPair([1, 5], [6, 2], [7, 2], margin=1.0), EncodedRanked([1], [[3, 2], [4, 2]])]
    fp = pair_fingerprint(a)
    assert len(fp) == 64 and fp == pair_fingerprint(list(a))
    assert fp == pair_fingerprint([EncodedPair([1, 5], [6, 2], [7, 2], label=0.3), a[1]])
    assert fp != pair_fingerprint([EncodedPair([1, 5], [6, 2], [7, 2]),
                                   EncodedRanked([1], [[3, 2], [4]])])
    assert fp != pair_fingerprint(a[::-1])
    # fixed value: a change here invalidates users' cached reference log-probs
    assert pair_fingerprint([EncodedPair([1], [2], [3])]) == (
        "cebf156985b17bfe59f1bfda522cc2af18d68dbcb7863f5ca24cdd5bd5c250cf")


# ---- collation ----

def test_collate_pairs_layout_and_masks():
    pairs = [EncodedPair([1, 10], [20, 21, 2], [30, 2], margin=0.5),
             EncodedPair([1, 11, 12], [22, 2], [31, 32, 33, 2], label=0.7)]
    batch = collate_pairs(pairs, pad_id=PAD)
    F, T = False, True
    assert batch["input_ids"].tolist() == [
        [1, 10, 20, 21, 2, 0, 0],
        [1, 11, 12, 22, 2, 0, 0],
        [1, 10, 30, 2, 0, 0, 0],
        [1, 11, 12, 31, 32, 33, 2]]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert batch["loss_mask"].tolist() == [
        [F, F, T, T, T, F, F],
        [F, F, F, T, T, F, F],
        [F, F, T, T, F, F, F],
        [F, F, F, T, T, T, T]]
    assert batch["margin"].tolist() == [0.5, 0.0]
    assert batch["label"].tolist() == pytest.approx([1.0, 0.7])
    assert batch["has_label"].tolist() == [False, True]
    assert str(batch["input_ids"].dtype) == "torch.int64"
    assert str(batch["loss_mask"].dtype) == "torch.bool"
    assert str(batch["margin"].dtype) == "torch.float32"
    assert collate_pairs(pairs, pad_id=PAD, pad_to_multiple_of=4)["input_ids"].shape == (4, 8)


def test_collate_ranked_layout():
    items = [EncodedRanked([1, 10], [[20, 2], [21, 22, 2], [23]]),
             EncodedRanked([1], [[30, 2], [31, 2]])]
    batch = collate_ranked(items, pad_id=PAD)
    assert batch["input_ids"].tolist() == [
        [1, 10, 20, 2, 0], [1, 10, 21, 22, 2], [1, 10, 23, 0, 0], [1, 30, 2, 0, 0],
        [1, 31, 2, 0, 0]]
    assert batch["loss_mask"].sum(1).tolist() == [2, 3, 1, 2, 2]
    assert batch["loss_mask"][1].tolist() == [False, False, True, True, True]
    assert batch["attention_mask"].sum(1).tolist() == [4, 5, 3, 3, 3]
    assert batch["list_index"].tolist() == [0, 0, 0, 1, 1]
    assert batch["rank"].tolist() == [0, 1, 2, 0, 1]
    assert batch["list_mask"].tolist() == [[True, True, True], [True, True, False]]


def test_collate_rejects_an_empty_batch():
    with pytest.raises(ValueError):
        collate_pairs([], pad_id=PAD)
    with pytest.raises(ValueError):
        collate_ranked([], pad_id=PAD)


def test_report_summary_of_an_empty_report():
    assert PreferenceReport(total=0, kept=0).summary() == "0 records: 0 kept, 0 dropped"


def test_data_package_import_stays_torch_free():
    code = ("import sys, alignkit.data, alignkit.data.preference; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.fspath(Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == "False"
