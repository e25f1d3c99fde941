"""Data: records -> conversations/documents -> token ids with loss masks -> batches.

Import-light: nothing here imports torch or transformers at import time.
"""

from alignkit.data.collate import collate, length_grouped_batches
from alignkit.data.formats import (
    FORMATS, Conversation, TextDoc, check_turns, detect_format, load_sft, load_text,
    split_train_eval, to_conversation)
from alignkit.data.prompts import LAB_PROMPTS
from alignkit.data.sources import Record, read_records
from alignkit.data.templates import (
    TEMPLATES, Encoded, TemplateName, encode_conversation, encode_prompt, resolve_template)
from alignkit.data.tokenize import TRUNCATIONS, TokenizeReport, pack_documents, tokenize_sft

__all__ = [
    "FORMATS", "LAB_PROMPTS", "TEMPLATES", "TRUNCATIONS", "Conversation", "Encoded", "Record",
    "TemplateName", "TextDoc", "TokenizeReport", "check_turns", "collate", "detect_format",
    "encode_conversation", "encode_prompt", "length_grouped_batches", "load_sft", "load_text",
    "pack_documents", "read_records", "resolve_template", "split_train_eval", "to_conversation",
    "tokenize_sft",
]
