"""Programmatic rewards shipped with alignkit: ``--reward-fn alignkit.assets.rewards:NAME``.

A reward function takes the prompts (the last user turn of each) and the sampled responses
(decoded text, stop token left out) and returns one float per response. These are toys for
demos and smoke runs — a sentiment-word count is trivially gamed — not a substitute for a
reward model trained on human preferences (``alignkit reward``).
"""

from __future__ import annotations

import math
import re

POSITIVE = frozenset("""
amazing appreciate awesome beautiful best brilliant calm cheerful clear delight delighted
delightful enjoy enjoyed excellent fantastic fine friendly fun glad good grateful great happy
helpful hope joy kind love lovely nice perfect pleasant pleased positive safe smile splendid
success superb thank thanks thoughtful useful warm welcome wonderful yes
""".split())
NEGATIVE = frozenset("""
angry awful bad boring broken cruel dangerous disappointing disgusting dreadful fail failure
hate horrible hurt no never poor sad stupid terrible ugly unhappy useless worse worst wrong
""".split())
_WORD = re.compile(r"[a-z']+")


def positive_words(prompts: list[str], responses: list[str]) -> list[float]:
    """(#positive − #negative words) / sqrt(#words + 1) per response: a sentiment score that
    rises with positive wording and is damped for long responses, so padding a reply with
    filler does not pay. Case-insensitive; an empty response scores 0."""
    out = []
    for text in responses:
        words = _WORD.findall(text.lower())
        pos = sum(w in POSITIVE for w in words)
        neg = sum(w in NEGATIVE for w in words)
        out.append((pos - neg) / math.sqrt(len(words) + 1))
    return out


def brevity(prompts: list[str], responses: list[str], target_words: int = 30) -> list[float]:
    """−|#words − target| / target: 0 for a response of ``target_words`` words, lower either
    way."""
    return [-abs(len(r.split()) - target_words) / target_words for r in responses]
