"""Conversations -> token ids with a loss mask, in one of three layouts.

``chat``  the tokenizer's own chat template (``apply_chat_template``, e.g. ChatML).
``inst``  the lesson's Llama-2 layout, one exchange per user/assistant pair::

              BOS "[INST] " user " [/INST]" | " " assistant EOS
              (a system message: "[INST] <<SYS>>\\n" system "\\n<</SYS>>\\n\\n" user " [/INST]")

``plain`` BOS [system "\\n\\n"] user "\\n" | assistant EOS ["\\n\\n" user "\\n" | assistant EOS ...]

``|`` marks where a generation prompt ends. ``loss_mask[i]`` is True exactly when token ``i`` is
a target (the engine shifts: position i is predicted from tokens < i): the tokens of every
assistant turn's content and its end-of-turn token. Everything else — BOS, system and user
text, role headers, ``[INST]`` markers, ChatML's newline after ``<|im_end|>`` — is False.

Every layout is built as a list of segments (text or a token id, and a mask flag); text segments
are tokenised one by one (``add_special_tokens=False``), so token boundaries fall on segment
boundaries and a prompt encodes to exactly the prefix of its conversation's encoding.

Where the space after ``[/INST]`` goes: the prompt ends at ``"[/INST]"`` and the target is
``" " + answer``. With BPE tokenizers a space belongs to the word after it ("Ġanswer"), so a
prompt ending in a bare space token would ask the model for a token sequence it never saw in
pre-training. The cost: a generated inst answer begins with a space, which callers strip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alignkit.data.formats import Conversation, check_turns
from alignkit.errors import InputError

TemplateName = Literal["chat", "inst", "plain"]
TEMPLATES = ("chat", "inst", "plain")

Segment = tuple[str | int, bool]  # (text or token id, is target)


@dataclass
class Encoded:
    """``input_ids`` and a same-length ``loss_mask`` (True = token is a target)."""

    input_ids: list[int]
    loss_mask: list[bool]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.loss_mask):
            raise ValueError(f"input_ids ({len(self.input_ids)}) and loss_mask "
                             f"({len(self.loss_mask)}) differ in length")


def resolve_template(name: str, tokenizer) -> TemplateName:
    """``auto`` -> ``chat`` if the tokenizer has a chat template, else ``inst``."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    match name:
        case "auto":
            return "chat" if has_chat else "inst"
        case "chat" if not has_chat:
            raise InputError("template 'chat' needs a tokenizer with a chat template and this "
                             "one has none; use template inst or plain", field="template")
        case "chat" | "inst" | "plain":
            return name
    raise InputError(f"unknown template '{name}'; expected auto, {', '.join(TEMPLATES)}",
                     field="template")


def encode_conversation(tokenizer, conv: Conversation, template: TemplateName) -> Encoded:
    """The full (untruncated) token ids and loss mask of ``conv`` in ``template``."""
    check_turns(conv.messages, path=conv.source)
    return _encode(tokenizer, _segments(tokenizer, list(conv.messages), template, conv.source))


def encode_prompt(tokenizer, messages: list[dict], template: TemplateName) -> list[int]:
    """Token ids of a generation prompt: ``messages`` (ending with a user turn) followed by the
    start of an assistant turn (chat: ``add_generation_prompt=True``; inst: up to ``[/INST]``;
    plain: up to the ``"\\n"`` after the user text).

    Equals the prefix of ``encode_conversation`` of ``messages`` plus an assistant reply.
    """
    check_turns(messages, final_role="user")
    return _encode(tokenizer, _segments(tokenizer, list(messages), template, None)).input_ids


def _segments(tokenizer, messages: list[dict], template: str, source: str | None) -> list[Segment]:
    match template:
        case "chat":
            return _chat_segments(tokenizer, messages, source)
        case "inst":
            return _inst_segments(tokenizer, messages)
        case "plain":
            return _plain_segments(tokenizer, messages)
    raise InputError(f"unknown template '{template}'; expected {', '.join(TEMPLATES)}",
                     field="template")


def _encode(tokenizer, segments: list[Segment]) -> Encoded:
    ids: list[int] = []
    mask: list[bool] = []
    for piece, target in segments:
        if isinstance(piece, int):
            new = [piece]
        else:
            new = list(tokenizer(piece, add_special_tokens=False)["input_ids"])
        ids += new
        mask += [target] * len(new)
    return Encoded(ids, mask)


def _special_ids(tokenizer) -> tuple[int | None, int]:
    """(BOS id or None, EOS id); every inst/plain turn ends with EOS, so it must exist."""
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no EOS token, which templates inst and plain need",
                         field="template")
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


def _inst_segments(tokenizer, messages: list[dict]) -> list[Segment]:
    bos, eos = _special_ids(tokenizer)
    system, turns = _split_system(messages)
    segments: list[Segment] = []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            user = m["content"]
            if i == 0 and system is not None:
                user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            if bos is not None:
                segments.append((bos, False))
            segments.append((f"[INST] {user} [/INST]", False))
        else:
            segments += [(" " + m["content"], True), (eos, True)]
    return segments


def _plain_segments(tokenizer, messages: list[dict]) -> list[Segment]:
    bos, eos = _special_ids(tokenizer)
    system, turns = _split_system(messages)
    segments: list[Segment] = [(bos, False)] if bos is not None else []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            lead = "\n\n" if i > 0 else ("" if system is None else system + "\n\n")
            segments.append((lead + m["content"] + "\n", False))
        else:
            segments += [(m["content"], True), (eos, True)]
    return segments


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except TemplateError as e:
        raise InputError(f"the chat template rejected the conversation: {e}",
                         field="template") from None
    if not isinstance(text, str):
        raise InputError(f"apply_chat_template(tokenize=False) returned "
                         f"{type(text).__name__}, not text", field="template")
    return text


def _chat_segments(tokenizer, messages: list[dict], source: str | None) -> list[Segment]:
    """Split the rendered conversation into masked spans by rendering growing prefixes.

    The generation prompt for ``messages[:i]`` must be a prefix of the render of
    ``messages[:i + 1]``, which must be a prefix of the whole render; what follows the
    generation prompt is the assistant content, then its end-of-turn token (a target).
    """
    full = _render(tokenizer, messages, messages[-1]["role"] != "assistant")
    segments: list[Segment] = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True)
        upto = _render(tokenizer, messages[:i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
            raise InputError("the chat template is not prefix-stable (rendering a conversation "
                             "turn by turn changes earlier text), so targets cannot be located; "
                             "use template inst or plain", path=source, field="template")
        end = len(before) + _target_length(tokenizer, upto[len(before):], m["content"], source)
        segments += [(full[pos:len(before)], False), (full[len(before):end], True)]
        pos = end
    segments.append((full[pos:], False))
    return [(text, target) for text, target in segments if text]


def _target_length(tokenizer, rendered: str, content: str, source: str | None) -> int:
    """Length of the target at the start of ``rendered`` (the text after a generation prompt).

    The target is the content as the template wrote it (as given, or stripped as many
    templates do; whitespace the template puts before it, as Llama-2's " " does, included),
    then the end-of-turn token if one follows, possibly after whitespace (Llama-2's " </s>").
    """
    lead = len(rendered) - len(rendered.lstrip())
    for form in (content, content.strip()):
        for start in (0, lead):
            if rendered.startswith(form, start):
                end = start + len(form)
                rest = rendered[end:]
                gap = len(rest) - len(rest.lstrip())
                token = _end_of_turn(tokenizer, rest[gap:])
                return end + gap + len(token) if token else end
    raise InputError("the chat template rewrites assistant content, so targets cannot be "
                     "located; use template inst or plain", path=source, field="template")


def _end_of_turn(tokenizer, rest: str) -> str:
    """The special token that starts ``rest`` if it can end a turn, or "".

    EOS first (ChatML's <|im_end|>); then any other special token but BOS and padding, because
    some templates end turns with a token that is not EOS (Llama-3's <|eot_id|>) and the model
    must still learn to emit it.
    """
    others = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    others -= {tokenizer.bos_token, tokenizer.pad_token, None}
    for token in [tokenizer.eos_token, *sorted(others, key=len, reverse=True)]:
        if token and rest.startswith(token):
            return token
    return ""
