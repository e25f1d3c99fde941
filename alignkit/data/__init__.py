"""Data: records -> conversations/documents -> token ids with loss masks -> batches.

Import-light: nothing here imports torch or transformers at import time.
"""

from alignkit.data.collate import collate, length_grouped_batches
from alignkit.data.formats import (
    FORMATS, Conversation, TextDoc, check_turns, detect_format, load_sft, load_text,
    split_train_eval, to_conversation)
from alignkit.data.preference import (
    PREFERENCE_FORMATS, EncodedPair, EncodedRanked, PreferencePair, PreferenceReport,
    RankedList, collate_pairs, collate_ranked, detect_preference_format, encode_completion,
    load_preferences, pair_fingerprint, pairs_from_ranked, split_hh_transcript,
    tokenize_preferences)
from alignkit.data.prompts import LAB_PROMPTS
from alignkit.data.sources import Record, read_records
from alignkit.data.templates import (
    TEMPLATES, Encoded, TemplateName, encode_conversation, encode_prompt, resolve_template)
from alignkit.data.tokenize import TRUNCATIONS, TokenizeReport, pack_documents, tokenize_sft

__all__ = [
    "FORMATS", "LAB_PROMPTS", "PREFERENCE_FORMATS", "TEMPLATES", "TRUNCATIONS", "Conversation",
    "Encoded", "EncodedPair", "EncodedRanked", "PreferencePair", "PreferenceReport",
    "RankedList", "Record", "TemplateName", "TextDoc", "TokenizeReport", "check_turns",
    "collate", "collate_pairs", "collate_ranked", "detect_format", "detect_preference_format",
    "encode_completion", "encode_conversation", "encode_prompt", "length_grouped_batches",
    "load_preferences", "load_sft", "load_text", "pack_documents", "pair_fingerprint",
    "pairs_from_ranked", "read_records", "resolve_template", "split_hh_transcript",
    "split_train_eval", "to_conversation", "tokenize_preferences", "tokenize_sft",
]
