import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignkit.data.formats import Conversation
from alignkit.data.templates import Encoded, encode_conversation, encode_prompt, resolve_template
from alignkit.errors import InputError

from .helpers import BOS, EOS, b

SYS = {"role": "system", "content": "Be brief."}


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


def _conv(*messages):
    return Conversation(tuple(messages), "t.jsonl:1")


def _expected(*pieces):
    """(ids, is_target) pieces -> Encoded, so expected values read like the layout."""
    ids = [i for p, _ in pieces for i in p]
    mask = [t for p, t in pieces for _ in p]
    return Encoded(ids, mask)


def _with_template(tok, template):
    other = copy.deepcopy(tok)
    other.chat_template = template
    return other


# ---- exact token-level masks, one example per template ----

def test_chat_exact_mask(tok):
    enc = encode_conversation(tok, _conv(_u("hi"), _a("yo")), "chat")
    # ChatML with the tiny template's default system turn; only "yo<|im_end|>" is a target.
    assert enc == _expected(
        ([BOS] + b("system\nYou are a helpful assistant.") + [EOS] + b("\n")
         + [BOS] + b("user\nhi") + [EOS] + b("\n") + [BOS] + b("assistant\n"), False),
        (b("yo") + [EOS], True),
        (b("\n"), False))


def test_inst_exact_mask(tok):
    enc = encode_conversation(tok, _conv(SYS, _u("hi"), _a("yo")), "inst")
    assert enc == _expected(
        ([BOS] + b("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nhi [/INST]"), False),
        (b(" yo") + [EOS], True))


def test_plain_exact_mask(tok):
    enc = encode_conversation(tok, _conv(SYS, _u("hi"), _a("yo")), "plain")
    assert enc == _expected(([BOS] + b("Be brief.\n\nhi\n"), False), (b("yo") + [EOS], True))


MULTI = (_u("q1"), _a("a1"), _u("q2"), _a("a2"))


@pytest.mark.parametrize("template,expected", [
    ("chat", _expected(
        ([BOS] + b("system\nYou are a helpful assistant.") + [EOS] + b("\n")
         + [BOS] + b("user\nq1") + [EOS] + b("\n") + [BOS] + b("assistant\n"), False),
        (b("a1") + [EOS], True),
        (b("\n") + [BOS] + b("user\nq2") + [EOS] + b("\n") + [BOS] + b("assistant\n"), False),
        (b("a2") + [EOS], True), (b("\n"), False))),
    ("inst", _expected(
        ([BOS] + b("[INST] q1 [/INST]"), False), (b(" a1") + [EOS], True),
        ([BOS] + b("[INST] q2 [/INST]"), False), (b(" a2") + [EOS], True))),
    ("plain", _expected(
        ([BOS] + b("q1\n"), False), (b("a1") + [EOS], True),
        (b("\n\nq2\n"), False), (b("a2") + [EOS], True))),
])
def test_multi_turn_masks_only_assistant_turns(tok, template, expected):
    assert encode_conversation(tok, _conv(*MULTI), template) == expected


@pytest.mark.parametrize("template", ["chat", "inst", "plain"])
@pytest.mark.parametrize("messages", [
    [_u("hi")], [SYS, _u("hi")], [_u("q1"), _a("a1"), _u("q2")],
    [SYS, _u("q1"), _a("a1"), _u("q2")]])
def test_prompt_is_the_prefix_of_the_conversation(tok, template, messages):
    prompt = encode_prompt(tok, messages, template)
    full = encode_conversation(tok, _conv(*messages, _a("the answer")), template)
    n = len(prompt)
    assert full.input_ids[:n] == prompt
    # the new answer's targets ("the answer", inst's leading space, EOS) start right after it
    n_new = len(b("the answer")) + (template == "inst") + 1
    assert full.loss_mask[n:n + n_new] == [True] * n_new and sum(full.loss_mask[n:]) == n_new


def test_prompt_must_end_with_user(tok):
    with pytest.raises(InputError, match="last turn must be user"):
        encode_prompt(tok, [_u("q"), _a("a")], "chat")


# ---- template resolution and unusual chat templates ----

def test_resolve_template(tok):
    bare = _with_template(tok, None)
    assert resolve_template("auto", tok) == "chat"
    assert resolve_template("auto", bare) == "inst"
    assert resolve_template("plain", tok) == "plain"
    with pytest.raises(InputError, match="use template inst or plain"):
        resolve_template("chat", bare)
    with pytest.raises(InputError, match="unknown template 'llama'"):
        resolve_template("llama", tok)


def test_template_not_prefix_stable_is_an_error(tok):
    # The turn count in the header changes as the conversation grows.
    counting = _with_template(tok, "{{ messages|length }}{% for m in messages %}"
                                   "{{ m.role + ':' + m.content + eos_token }}{% endfor %}")
    with pytest.raises(InputError) as e:
        encode_conversation(counting, _conv(_u("hi"), _a("yo")), "chat")
    msg = str(e.value)
    assert "prefix-stable" in msg and "t.jsonl:1" in msg and "inst or plain" in msg


def test_template_errors_become_input_errors(tok):
    strict = _with_template(tok, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(InputError, match="roles must alternate"):
        encode_conversation(strict, _conv(_u("hi"), _a("yo")), "chat")


def _targets(tok, enc):
    return tok.decode([i for i, m in zip(enc.input_ids, enc.loss_mask) if m])


def test_llama2_style_template_spaces_and_trimmed_content(tok):
    # Llama-2's layout: ' ' + content.strip() + ' ' + eos after [/INST]; the template trims.
    llama2 = _with_template(tok, (
        "{% for m in messages %}{% if m.role == 'user' %}"
        "{{ bos_token + '[INST] ' + m.content.strip() + ' [/INST]' }}"
        "{% else %}{{ ' ' + m.content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"))
    enc = encode_conversation(llama2, _conv(_u("hi"), _a(" yo \n")), "chat")
    assert _targets(tok, enc) == " yo <|im_end|>"
    assert tok.decode(enc.input_ids) == "<|im_start|>[INST] hi [/INST] yo <|im_end|>"


def test_end_of_turn_token_other_than_eos_is_a_target(tok):
    eot = copy.deepcopy(tok)
    eot.add_special_tokens({"additional_special_tokens": ["<|eot|>"]})
    eot.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content"
                         " + '<|eot|>' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    enc = encode_conversation(eot, _conv(_u("hi"), _a("yo")), "chat")
    assert _targets(eot, enc) == "yo<|eot|>"
    assert enc.input_ids[-1] == eot.convert_tokens_to_ids("<|eot|>") == 259


# ---- property: targets are exactly the response and one end token ----

_text = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user=_text, response=_text, system=st.none() | _text,
       template=st.sampled_from(["chat", "inst", "plain"]))
def test_property_target_count_is_response_plus_eos(tok, user, response, system, template):
    messages = ([] if system is None else [{"role": "system", "content": system}])
    conv = _conv(*messages, _u(user), _a(response))
    enc = encode_conversation(tok, conv, template)
    # inst's target starts with the space after [/INST] (see templates' module docstring).
    target = " " + response if template == "inst" else response
    n_target = len(tok(target, add_special_tokens=False)["input_ids"])
    assert sum(enc.loss_mask) == n_target + 1
    last = max(i for i, m in enumerate(enc.loss_mask) if m)
    assert enc.input_ids[last] == EOS
    prompt = encode_prompt(tok, list(conv.messages[:-1]), template)
    assert enc.input_ids[:len(prompt)] == prompt and not any(enc.loss_mask[:len(prompt)])
