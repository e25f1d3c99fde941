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
amazing appreciate awesome beautiful best brilliant bright calm charming cheerful clean clear
comfortable cosy cozy delicious delight delighted delightful enjoy enjoyable enjoyed exciting
excellent fantastic favourite favorite fine fresh friendly fun gentle glad good gorgeous
grateful great happy helpful hope inspiring joy kind love lovely magical memorable nice peaceful
perfect pleasant pleased pleasure positive refreshing relaxing rewarding safe smile splendid
success sunny superb sweet tasty thank thanks thoughtful useful warm welcome wonderful yes
""".split())
NEGATIVE = frozenset("""
angry annoying awful bad boring broken cruel dangerous depressing dirty disappointing
disgusting dreadful dull exhausting fail failure frustrating gloomy hate horrible hurt lonely
mediocre miserable no never noisy painful poor sad stressful stupid tedious terrible tired
ugly uncomfortable unhappy unpleasant useless worse worst wrong
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
