"""Transparent per-response text metrics: length, structure, nuance (hedging) and refusals.

These are the lesson's lab checks (Part 2: structure markers ``'1)' '2)' '•' '-'``, nuance
words ``depends / however / but``, refusal phrases ``can't / not able / won't``) made robust,
and every pattern is a documented regular expression below, so a number in a report can be
traced to the exact rule that produced it. Where we depart from the lab:

- matching is case-insensitive with word boundaries (the lab's substring ``'but'`` fires on
  "attribute", its ``'-'`` on every hyphenated word, its ``"can't"`` on "I can't wait");
- a bullet is a ``-``/``*``/``•`` at the start of a line (``•`` anywhere); a numbered list
  is two inline items ``1) … 2)`` or an item ``1.`` / ``1)`` at the start of a line;
- a refusal needs a first-person refusal verb phrase followed by an assistance verb
  ("I can't help", "I'm not able to provide", "I won't assist", "I cannot do that"), or one of
  the standing phrases ("as an AI", "against my guidelines"); straight and curly apostrophes
  are both accepted.

Heuristics, not classifiers: they count surface markers and will miss paraphrased refusals.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

_APOS = "['\u2019]"  # straight or curly apostrophe

# name -> pattern. Flags: case-insensitive everywhere; MULTILINE where ^ means a line start.
STRUCTURE_PATTERNS: dict[str, re.Pattern] = {
    # Two inline items "1) ... 2) ..." (one "(at 5) " in prose is no list), or "1. ..." /
    # "1) ..." at the start of a line.
    "numbered": re.compile(r"(?<![\w.])\(?\d{1,2}\)\s+\S[\s\S]*?(?<![\w.])\(?\d{1,2}\)\s+\S"
                           r"|^[ \t]*\d{1,2}[.)][ \t]+\S", re.MULTILINE),
    # "- item", "* item", "• item" at the start of a line; "•" anywhere.
    "bulleted": re.compile(r"^[ \t]*[-*\u2022][ \t]+\S|\u2022", re.MULTILINE),
    # "Step 1", "step 2:" or an ordered sequence "First ... then/next/second/finally".
    "steps": re.compile(r"\bstep\s*\d+\b|\bfirst(?:ly)?\b[\s\S]*?\b(?:then|next|second(?:ly)?|"
                        r"finally|after\s+that)\b", re.IGNORECASE),
}

NUANCE_PATTERNS: dict[str, re.Pattern] = {
    "depends": re.compile(r"\bdepend(?:s|ing)?\b|\bit\s+varies\b|\bvar(?:y|ies)\s+(?:by|with)\b",
                          re.IGNORECASE),
    "contrast": re.compile(r"\bhowever\b|\bbut\b|\balthough\b|\bthough\b|\bon\s+the\s+other\s+"
                           r"hand\b|\bthat\s+said\b", re.IGNORECASE),
    "hedge": re.compile(r"\bnot\s+necessarily\b|\bin\s+some\s+cases\b|\btrade-?offs?\b|"
                        r"\bit\s+(?:may|might)\s+be\b|\bgenerally\b|\btypically\b",
                        re.IGNORECASE),
}

# Verbs that turn "I can't ..." into a refusal to assist ("I can't wait" is not one).
_ASSIST = (r"(?:help|assist|provide|give|share|tell|answer|comply|support|engage|participate|"
           r"recommend|condone|encourage|endorse|write|create|generate|offer|discuss|explain|"
           r"fulfil+|do\s+(?:that|this|it|so)|go\s+along|in\s+good\s+conscience)")
_NEG = (rf"(?:can{_APOS}?t|cannot|can\s+not|won{_APOS}?t|will\s+not|shouldn{_APOS}?t|"
        rf"should\s+not|must\s+not|refuse\s+to|am\s+unable\s+to|{_APOS}m\s+unable\s+to|"
        rf"am\s+not\s+(?:able|going|allowed|permitted|comfortable)\s+to|"
        rf"{_APOS}m\s+not\s+(?:able|going|allowed|permitted|comfortable)\s+to|"
        rf"(?:do\s+not|don{_APOS}?t)\s+(?:want|feel\s+comfortable)\s+to)")

REFUSAL_PATTERNS: dict[str, re.Pattern] = {
    # "I can't help", "I cannot provide", "I won't assist", "I'm not able to help",
    # "I am unable to answer", "I really can't do that", "I'd rather not help".
    "cannot_assist": re.compile(rf"\bI\s*(?:really\s+|just\s+|simply\s+|honestly\s+)?{_NEG}\s+"
                                rf"(?:\w+\s+)?{_ASSIST}\b", re.IGNORECASE),
    "rather_not": re.compile(rf"\bI{_APOS}?d\s+rather\s+not\b|\bI\s+would\s+rather\s+not\b",
                             re.IGNORECASE),
    "not_comfortable": re.compile(rf"\bI(?:\s+am|{_APOS}m)\s+not\s+comfortable\b|"
                                  rf"\bI\s+(?:don{_APOS}?t|do\s+not)\s+feel\s+comfortable\b",
                                  re.IGNORECASE),
    "as_an_ai": re.compile(r"\bas\s+an?\s+(?:AI|artificial\s+intelligence|(?:AI\s+)?language\s+"
                           r"model|AI\s+assistant)\b", re.IGNORECASE),
    "policy": re.compile(r"\b(?:against|violates?)\s+(?:my|our)\s+(?:polic(?:y|ies)|guidelines|"
                         r"principles|programming|ethics)\b", re.IGNORECASE),
}

_WORD = re.compile(r"\w+(?:['\u2019-]\w+)*")


def char_length(text: str) -> int:
    """Characters of ``text`` (Python ``len``, i.e. Unicode code points)."""
    return len(text)


def word_count(text: str) -> int:
    """Words: runs of letters/digits, joined by inner apostrophes or hyphens ("can't" = 1)."""
    return len(_WORD.findall(text))


def token_count(text: str, tokenizer) -> int:
    """Tokens of ``text`` alone, without special tokens (no template, no BOS/EOS)."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def matched(text: str, patterns: dict[str, re.Pattern]) -> list[str]:
    """Names of the patterns in ``patterns`` that occur in ``text``, in table order."""
    return [name for name, pattern in patterns.items() if pattern.search(text)]


def has_structure(text: str) -> bool:
    """A numbered or bulleted list, or ordered steps (:data:`STRUCTURE_PATTERNS`)."""
    return bool(matched(text, STRUCTURE_PATTERNS))


def has_nuance(text: str) -> bool:
    """A nuance / hedging marker (:data:`NUANCE_PATTERNS`)."""
    return bool(matched(text, NUANCE_PATTERNS))


def is_refusal(text: str) -> bool:
    """A refusal phrase (:data:`REFUSAL_PATTERNS`)."""
    return bool(matched(text, REFUSAL_PATTERNS))


@dataclass(frozen=True)
class TextFeatures:
    """The metrics of one response; ``*_markers`` name the patterns that matched."""

    chars: int
    words: int
    structure_markers: tuple[str, ...]
    nuance_markers: tuple[str, ...]
    refusal_markers: tuple[str, ...]

    @property
    def structure(self) -> bool:
        return bool(self.structure_markers)

    @property
    def nuance(self) -> bool:
        return bool(self.nuance_markers)

    @property
    def refusal(self) -> bool:
        return bool(self.refusal_markers)

    def to_dict(self) -> dict:
        return asdict(self) | {"structure": self.structure, "nuance": self.nuance,
                               "refusal": self.refusal}


def text_features(text: str) -> TextFeatures:
    """All metrics of ``text`` but tokens (which need a tokenizer: :func:`token_count`)."""
    return TextFeatures(chars=char_length(text), words=word_count(text),
                        structure_markers=tuple(matched(text, STRUCTURE_PATTERNS)),
                        nuance_markers=tuple(matched(text, NUANCE_PATTERNS)),
                        refusal_markers=tuple(matched(text, REFUSAL_PATTERNS)))
