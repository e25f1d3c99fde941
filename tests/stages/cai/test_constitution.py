"""Constitution files: the shipped one, and one-line errors naming file, line and field."""

from __future__ import annotations

import textwrap

import pytest

from alignkit.stages.cai.constitution import (
    DEFAULT_CHOICE, TAGS, Constitution, Principle, load_constitution, parse_constitution,
    sample_principles)
from alignkit.errors import InputError

GOOD = """\
version: 1
name: mini
principles:
  - name: kind
    tags: [harmless]
    critique: Is the reply unkind?
    revision: Make it kind.
  - name: honest
    critique: Is anything false?
    revision: Fix what is false.
    choice: Choose the more truthful response.
examples:
  - principle: kind
    prompt: Hi
    response: Go away.
    critique: It is rude.
    revision: Hello! How can I help?
"""


def _write(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def test_shipped_constitution_is_valid_and_has_the_lessons_principle():
    c = load_constitution()
    assert c.name == "alignkit-v1" and 10 <= len(c.principles) <= 14
    assert len({p.name for p in c.principles}) == len(c.principles)
    assert any(p.choice == "Choose the response that is most helpful while being harmless."
               for p in c.principles)
    assert all(p.tags and set(p.tags) <= set(TAGS) for p in c.principles)
    assert {t for p in c.principles for t in p.tags} == set(TAGS)
    assert c.examples and all(c.principle(e.principle) for e in c.examples)


def test_a_small_file_parses_with_defaults(tmp_path):
    c = load_constitution(_write(tmp_path, GOOD))
    assert c.name == "mini" and c.source.endswith("c.yaml")
    assert c.principles[0] == Principle("kind", "Is the reply unkind?", "Make it kind.",
                                        DEFAULT_CHOICE, ("harmless",))
    assert c.principles[1].choice == "Choose the more truthful response."
    assert c.principles[1].tags == ()
    assert c.examples[0].revision == "Hello! How can I help?"


BAD = [
    # (file text, line, field, words in the message)
    ("principles:\n  - name: a\n    critique: c\n", 2, "principles[0].revision", "missing"),
    ("principles:\n  - name: a\n    critique: c\n    revision: r\n  - name: b\n"
     "    critique: c\n    revision: ''\n", 7, "principles[1].revision", "is empty"),
    ("principles:\n  - name: a\n    critique: c\n    revision: r\n    colour: red\n", 5,
     "principles[0].colour", "unknown key"),
    ("principles:\n  - name: a\n    critique: c\n    revision: r\n    tags: [harmless, nice]\n",
     5, "principles[0].tags[1]", "unknown tag 'nice'"),
    ("principles:\n  - name: a\n    critique: c\n    revision: r\n  - name: a\n"
     "    critique: c\n    revision: r\n", 5, "principles[1].name", "second principle"),
    ("principles:\n  - name: two words\n    critique: c\n    revision: r\n", 2,
     "principles[0].name", "not a plain name"),
    ("principles:\n  - name: a\n    critique: [c]\n    revision: r\n", 3,
     "principles[0].critique", "expected a string, got list"),
    ("principles: []\n", 1, "principles", "non-empty list"),
    ("name: x\n", 1, "principles", "missing"),
    ("principles:\n  - just a string\n", 2, "principles[0]", "must be a mapping"),
    ("version: 2\nprinciples:\n  - name: a\n    critique: c\n    revision: r\n", 1, "version",
     "unsupported version"),
    ("principles:\n  - name: a\n    critique: c\n    revision: r\nexamples:\n"
     "  - principle: zzz\n    prompt: p\n    response: x\n    critique: c\n    revision: r\n",
     6, "examples[0].principle", "no principle is named 'zzz'"),
]


@pytest.mark.parametrize("text, line, field, words", BAD)
def test_bad_files_fail_as_one_line_naming_file_line_and_field(tmp_path, text, line, field,
                                                                words):
    path = _write(tmp_path, text)
    with pytest.raises(InputError) as e:
        load_constitution(path)
    message = str(e.value)
    assert message.startswith(f"{path}:{line}: field '{field}': ")
    assert words in message and "\n" not in message
    assert e.value.field == field and e.value.line == line


def test_invalid_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "principles:\n  - name: a\n    critique: [unclosed\n")
    with pytest.raises(InputError) as e:
        load_constitution(path)
    assert str(e.value).startswith(f"{path}:") and "invalid YAML" in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(InputError, match="constitution file not found"):
        load_constitution(tmp_path / "nope.yaml")
    with pytest.raises(InputError, match="must be a mapping"):
        load_constitution(_write(tmp_path, "- a\n- b\n"))


def test_parse_without_a_file_names_the_field_only():
    with pytest.raises(InputError) as e:
        parse_constitution({"principles": [{"name": "a", "critique": "c"}]})
    assert str(e.value) == "field 'principles[0].revision': missing"


def test_select_by_tag_keeps_matching_principles_and_their_examples(tmp_path):
    c = load_constitution(_write(tmp_path, GOOD))
    only = c.select(["harmless"])
    assert [p.name for p in only.principles] == ["kind"] and len(only.examples) == 1
    assert c.select(None) is c
    with pytest.raises(InputError, match="no principle of this constitution is tagged honest"):
        c.select(["honest"])
    with pytest.raises(InputError, match="unknown tag 'rude'"):
        c.select(["rude"])


def test_sampled_principles_are_distinct_and_reproducible():
    c = load_constitution()
    first = sample_principles(c, 4, seed=0, key="p-1")
    assert len({p.name for p in first}) == 4
    assert sample_principles(c, 4, seed=0, key="p-1") == first
    assert sample_principles(c, 99, seed=0, key="p-1").__len__() == len(c.principles)
    draws = {tuple(p.name for p in sample_principles(c, 4, seed=s, key="p-1"))
             for s in range(5)}
    assert len(draws) > 1  # the seed matters


def test_fingerprint_follows_the_content_not_the_layout(tmp_path):
    a = load_constitution(_write(tmp_path, GOOD))
    b = load_constitution(_write(tmp_path, GOOD.replace("version: 1\n", "")))
    c = load_constitution(_write(tmp_path, GOOD.replace("Make it kind.", "Be kinder.")))
    assert isinstance(a, Constitution)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
