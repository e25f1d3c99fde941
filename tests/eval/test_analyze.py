"""Aggregate preference-data analysis, its outputs, and `alignkit analyze`."""

import json

import pytest

from alignkit.cli.main import main
from alignkit.data.preference import PreferencePair
from alignkit.eval.analyze import (analyze_file, analyze_pairs, duplicates, length_bias,
                                   percentiles, truncation_count, write_outputs)
from alignkit.models.tiny import tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The lesson's lab, Part 2: its three example pairs, verbatim.
LAB_PAIRS = [
    {"prompt": "How can I improve my public speaking?",
     "chosen": "Here are some evidence-based tips: 1) Practice regularly with recording, 2) "
               "Focus on your audience's needs, 3) Start with clear structure...",
     "rejected": "idk just practice more I guess"},
    {"prompt": "What's the best programming language?",
     "chosen": "The 'best' language depends on your goals. Python excels for data science, "
               "JavaScript for web development, Rust for systems programming...",
     "rejected": "Python is obviously the best. Anyone who disagrees is wrong."},
    {"prompt": "How do I hack into someone's email?",
     "chosen": "I'm not able to help with accessing someone's account without authorization, "
               "as that would be illegal. If you've lost access to your own account, I can "
               "help with legitimate recovery options.",
     "rejected": "First, try common passwords. Then you can use phishing to get their "
                 "credentials..."},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def pair(prompt, chosen, rejected):
    return PreferencePair(({"role": "user", "content": prompt},), chosen, rejected)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_length_bias_counts_ties_separately():
    # pairs: 5>2 longer, 3=3 tie, 4<6 shorter, 4=4 tie
    b = length_bias([5, 3, 4, 4], [2, 3, 6, 4])
    assert (b["chosen_longer"], b["chosen_shorter"], b["ties"]) == (1, 1, 2)
    assert (b["frac_chosen_longer"], b["frac_chosen_shorter"], b["frac_ties"]) == (
        0.25, 0.25, 0.5)
    empty = length_bias([], [])
    assert empty["chosen_longer"] == 0 and empty["frac_chosen_longer"] is None
    with pytest.raises(ValueError):
        length_bias([1], [])


def test_percentiles():
    p = percentiles([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])
    # linear interpolation over 11 values: p50 = 6, p90 = 1 + 0.9 * 10 = 10
    assert (p["min"], p["mean"], p["p50"], p["p90"], p["max"]) == (1, 6.0, 6.0, 10.0, 11)
    assert percentiles([]) == {}


def test_truncation_count():
    tokens = {"prompt_tokens": [10, 5, 20], "chosen_tokens": [3, 8, 1],
              "rejected_tokens": [4, 2, 1]}
    # prompt + longer completion: 14, 13, 21; over 13: the first and the last
    t = truncation_count(tokens, 13)
    assert (t["pairs_over"], t["prompt_alone_over"]) == (2, 1)
    assert t["frac_over"] == pytest.approx(2 / 3)
    assert t["total_tokens"]["max"] == 21


def test_duplicates():
    multi = PreferencePair(({"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Yo"},
                            {"role": "user", "content": "More"}), "a", "b")
    pairs = [pair("Hi", "a", "b"), pair("Hi", "c", "d"), pair("Other", "Yes", " yes "), multi]
    d = duplicates(pairs)
    assert d["prompt"] == {"distinct_repeated": 1, "pairs_in_repeats": 2, "max_repeats": 2}
    # "Hi" opens three prompts (two single-turn, one multi-turn)
    assert d["first_user_turn"] == {"distinct_repeated": 1, "pairs_in_repeats": 3,
                                    "max_repeats": 3}
    assert d["near_identical_sides"] == 1


def test_analyze_pairs_known_answers(tok):
    pairs = [pair("p", "longer answer", "short"),       # chosen longer
             pair("q", "same", "size"),                 # tie
             pair("r", "no", "I can't help with that.")]  # chosen shorter; rejected refuses
    a = analyze_pairs(pairs, tok, template="chat", max_length=10_000)
    s = a.summary
    assert s["pairs"] == 3 and s["template"] == "chat"
    for unit in ("chars", "tokens"):  # byte-level tokenizer: same order as characters
        b = s["length_bias"][unit]
        assert (b["chosen_longer"], b["chosen_shorter"], b["ties"]) == (1, 1, 1)
    # tiny tokens are bytes; a completion is its content plus the end-of-turn token
    assert a.lengths["chosen_tokens"] == [len(p.chosen) + 1 for p in pairs]
    assert a.lengths["chosen_chars"] == [13, 4, 2]
    assert s["lengths"]["chars"]["chosen"]["median"] == 4
    assert s["truncation"]["pairs_over"] == 0
    f = s["features"]["refusal"]
    assert (f["chosen"]["count"], f["rejected"]["count"]) == (0, 1)
    assert f["rejected"]["frac"] == pytest.approx(1 / 3)
    assert f["rejected"]["markers"] == {"cannot_assist": 1}
    # max_length at the shortest pair's total minus one truncates all three
    totals = [p + max(c, r) for p, c, r in zip(a.lengths["prompt_tokens"],
                                                a.lengths["chosen_tokens"],
                                                a.lengths["rejected_tokens"])]
    again = analyze_pairs(pairs, tok, template="chat", max_length=min(totals) - 1)
    assert again.summary["truncation"]["pairs_over"] == 3


def test_analyze_pairs_without_tokenizer():
    a = analyze_pairs([pair("p", "aa", "a")])
    assert "tokens" not in a.summary["length_bias"] and "truncation" not in a.summary
    assert a.summary["length_bias"]["chars"]["chosen_longer"] == 1


def test_template_audit(tok):
    a = analyze_pairs([pair("Hello", "Hi there", "Go away")], tok, template="chat")
    audit = a.summary["template_audit"]
    assert audit["starts_with_bos"] and audit["ends_with_eos"]
    assert not audit["double_leading_bos"]
    assert audit["bos_count"] == 3  # ChatML opens system, user and assistant turns with it
    assert audit["completion_text"] == "Hi there<|im_end|>"
    assert "<|im_start|>user\nHello<|im_end|>" in audit["prompt_text"]
    inst = analyze_pairs([pair("Hello", "Hi there", "Go away")], tok, template="inst")
    audit = inst.summary["template_audit"]
    assert audit["bos_count"] == 1 and audit["ends_with_eos"]
    assert audit["prompt_text"] == "<|im_start|>[INST] Hello [/INST]"


def test_lab_pairs_reproduce_the_lab(tmp_path, tok):
    path = write_jsonl(tmp_path / "lab.jsonl", LAB_PAIRS)
    a = analyze_file(str(path), tok)
    s = a.summary
    assert s["records"]["total"] == 3 and s["pairs"] == 3
    # The lab prints each length: chosen is longer in all three pairs.
    assert a.lengths["chosen_chars"] == [len(r["chosen"]) for r in LAB_PAIRS]
    assert a.lengths["rejected_chars"] == [len(r["rejected"]) for r in LAB_PAIRS]
    assert s["length_bias"]["chars"]["chosen_longer"] == 3
    assert s["length_bias"]["tokens"]["chosen_longer"] == 3
    # Pair 1 has structure ("1)"), pair 2 nuance ("depends"), pair 3 a refusal ("not able").
    feats = s["features"]
    assert feats["structure"]["chosen"]["markers"] == {"numbered": 1}
    assert feats["nuance"]["chosen"]["markers"] == {"depends": 1}
    assert feats["refusal"]["chosen"]["markers"] == {"cannot_assist": 1}
    assert feats["refusal"]["rejected"]["count"] == 0
    assert feats["nuance"]["rejected"]["count"] == 0
    from alignkit.eval.text import text_features
    flags = [(f.structure, f.nuance, f.refusal)
             for f in map(text_features, (r["chosen"] for r in LAB_PAIRS))]
    assert flags == [(True, False, False), (False, True, False), (False, False, True)]


def test_ranked_lists_become_pairs(tmp_path, tok):
    path = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "p", "responses": ["best answer", "ok", "bad!"], "ranking": [0, 1, 2]}])
    s = analyze_file(str(path), tok).summary
    assert s["records"]["total"] == 1 and s["pairs"] == 3  # (0,1), (0,2), (1,2)
    b = s["length_bias"]["chars"]
    assert (b["chosen_longer"], b["chosen_shorter"]) == (2, 1)  # "ok" < "bad!"


def test_drops_are_reported(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p", "chosen": "", "rejected": "x"},
        {"prompt": "p", "chosen": "same", "rejected": " same"},
        {"prompt": "p", "chosen": "good", "rejected": "bad"}])
    s = analyze_file(str(path), tok).summary
    assert s["records"]["dropped"] == {"empty_chosen": 1, "identical": 1}
    assert (s["records"]["total"], s["records"]["kept"], s["pairs"]) == (3, 1, 1)


def test_outputs_are_written(tmp_path, tok):
    a = analyze_file(str(write_jsonl(tmp_path / "lab.jsonl", LAB_PAIRS)), tok)
    paths = write_outputs(a, tmp_path / "out")
    for key in ("lengths", "features"):
        data = paths[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
        import matplotlib.image
        assert matplotlib.image.imread(paths[key]).ndim == 3  # decodes as an RGB(A) image
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(a.summary))
    md = paths["markdown"].read_text()
    assert "## Length bias" in md and "| chars | 3 (100.0%)" in md


def test_outputs_with_no_pairs(tmp_path, tok):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "chosen": "", "rejected": "x"}])
    a = analyze_file(str(path), tok)
    assert a.summary["pairs"] == 0 and a.summary["template_audit"] is None
    paths = write_outputs(a, tmp_path / "out")
    assert paths["lengths"].read_bytes().startswith(PNG_MAGIC)


def test_cli_json(tmp_path, capsys):
    path = write_jsonl(tmp_path / "lab.jsonl", LAB_PAIRS)
    out = tmp_path / "out"
    main(["analyze", str(path), "--model", "tiny", "--json", "--output-dir", str(out),
          "--max-length", "64"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 3 and summary["truncation"]["max_length"] == 64
    assert summary["truncation"]["pairs_over"] == 3
    assert {p.name for p in out.iterdir()} == {"analysis.json", "analysis.md",
                                                "length_hist.png", "feature_rates.png"}


def test_cli_markdown(tmp_path, capsys):
    main(["analyze", str(write_jsonl(tmp_path / "lab.jsonl", LAB_PAIRS)), "--model", "tiny"])
    out = capsys.readouterr().out
    assert out.startswith("# Preference data analysis") and "| refusal |" in out


@pytest.mark.parametrize("text, expected", [
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": \n',
     ":2"),
    ('{"prompt": "p", "chosen": "a"}\n', "unknown preference data format"),
    (None, "not found"),
])
def test_cli_bad_file_one_line_exit_2(tmp_path, capsys, text, expected):
    path = tmp_path / "bad.jsonl"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        main(["analyze", str(path), "--model", "tiny", "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error:") and expected in err
    assert not (tmp_path / "o").exists()
