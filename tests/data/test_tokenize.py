import pytest

from alignkit.data.formats import Conversation, TextDoc
from alignkit.data.templates import Encoded, encode_conversation
from alignkit.data.tokenize import TokenizeReport, pack_documents, tokenize_sft

from .helpers import BOS, EOS, b


def _conv(*turns):
    roles = ["user", "assistant"] * len(turns)
    return Conversation(tuple({"role": r, "content": c} for r, c in zip(roles, turns)), "t:1")


F, T = False, True
# plain layout of ("abcd", "xyz"): BOS a b c d \n | x y z EOS  -> 10 tokens, 4 targets
SHORT = _conv("abcd", "xyz")
SHORT_IDS = [BOS] + b("abcd\n") + b("xyz") + [EOS]


def _one(tok, conv, max_length, truncation):
    out, report = tokenize_sft(tok, [conv], template="plain", max_length=max_length,
                               truncation=truncation)
    return out, report


def test_fitting_example_is_untouched(tok):
    out, report = _one(tok, SHORT, 10, "truncate_left")
    assert out == [Encoded(SHORT_IDS, [F] * 6 + [T] * 4)]
    assert (report.total, report.kept, report.truncated, report.dropped) == (1, 1, 0, {})


def test_truncate_right_keeps_the_head(tok):
    out, report = _one(tok, SHORT, 8, "truncate_right")
    assert out == [Encoded(SHORT_IDS[:8], [F] * 6 + [T] * 2)]  # "xy", no EOS
    assert (report.kept, report.truncated) == (1, 1)


def test_truncate_left_drops_prompt_start_and_keeps_bos(tok):
    out, _ = _one(tok, SHORT, 8, "truncate_left")
    # budget for the prompt: 8 - 1 (BOS) - 4 (xyz EOS) = 3 tokens: "cd\n"
    assert out == [Encoded([BOS] + b("cd\n") + b("xyz") + [EOS], [F] * 4 + [T] * 4)]


def test_truncate_left_response_alone_too_long_cuts_its_end(tok):
    out, _ = _one(tok, SHORT, 3, "truncate_left")
    assert out == [Encoded([BOS] + b("xy"), [F, T, T])]  # no prompt left, no EOS


def test_truncate_left_multi_turn_drops_earlier_turns_first(tok):
    conv = _conv("q1", "a1", "q2", "a2")
    # plain: BOS q1\n | a1 EOS | \n\nq2\n | a2 EOS = 1 + 3 + 3 + 5 + 3 = 15 tokens
    full = encode_conversation(tok, conv, "plain")
    assert len(full.input_ids) == 15
    out, _ = _one(tok, conv, 11, "truncate_left")
    # keeps BOS + the last 10 tokens: "1" EOS (earlier target, still a target) \n\nq2\n a2 EOS
    assert out == [Encoded([BOS] + b("1") + [EOS] + b("\n\nq2\n") + b("a2") + [EOS],
                           [F, T, T, F, F, F, F, F, T, T, T])]


def test_drop_policy_and_no_target_tokens_are_counted(tok):
    convs = [SHORT, _conv("a", "b"), _conv("a long prompt here", "z")]
    out, report = tokenize_sft(tok, convs, template="plain", max_length=8, truncation="drop")
    assert [len(e.input_ids) for e in out] == [5]
    assert report.dropped == {"too_long": 2} and report.summary() == (
        "3 examples: 1 kept (0 truncated), 2 dropped (too_long: 2)")
    # truncate_right of the long prompt keeps no response token at all
    out, report = tokenize_sft(tok, convs, template="plain", max_length=8,
                               truncation="truncate_right")
    assert len(out) == 2 and report.dropped == {"no_target_tokens": 1}
    assert report.summary() == "3 examples: 2 kept (1 truncated), 1 dropped (no_target_tokens: 1)"


def test_lengths_never_exceed_max_length(tok):
    convs = [_conv("p" * n, "r" * m) for n in (1, 5, 20) for m in (1, 5, 20)]
    for truncation in ("truncate_left", "truncate_right"):
        out, report = tokenize_sft(tok, convs, template="inst", max_length=16,
                                   truncation=truncation)
        assert all(len(e.input_ids) <= 16 and not e.loss_mask[0] and any(e.loss_mask)
                   for e in out)
        assert report.total == 9 and report.kept + sum(report.dropped.values()) == 9


def test_auto_template_resolves_to_chat(tok):
    out, _ = tokenize_sft(tok, [SHORT], template="auto", max_length=512,
                          truncation="truncate_left")
    assert out[0] == encode_conversation(tok, SHORT, "chat")


def test_summary_format():
    report = TokenizeReport(total=1000, kept=990, truncated=12,
                            dropped={"too_long": 6, "no_target_tokens": 4})
    assert report.summary() == ("1000 examples: 990 kept (12 truncated), 10 dropped "
                                "(too_long: 6, no_target_tokens: 4)")


def test_bad_arguments(tok):
    with pytest.raises(ValueError, match="truncation"):
        tokenize_sft(tok, [SHORT], template="plain", max_length=8, truncation="middle")


# ---- packing ----

DOCS = [TextDoc("abc", "d:1"), TextDoc("de", "d:2"), TextDoc("fghij", "d:3")]
# BOS abc EOS | BOS de EOS | BOS fghij EOS = 5 + 4 + 7 = 16 tokens
STREAM = [BOS] + b("abc") + [EOS] + [BOS] + b("de") + [EOS] + [BOS] + b("fghij") + [EOS]


def test_pack_documents_exact_blocks(tok):
    blocks, report = pack_documents(tok, DOCS, block_size=5)
    assert [e.input_ids for e in blocks] == [STREAM[0:5], STREAM[5:10], STREAM[10:15]]
    assert all(e.loss_mask == [F, T, T, T, T] for e in blocks)
    assert (report.total, report.kept, report.dropped) == (16, 15, {"partial_block": 1})
    assert report.summary() == "16 tokens: 15 kept, 1 dropped (partial_block: 1)"


@pytest.mark.parametrize("block_size", [2, 3, 7, 16, 17])
def test_pack_conserves_tokens(tok, block_size):
    blocks, report = pack_documents(tok, DOCS, block_size=block_size)
    assert all(len(e.input_ids) == block_size for e in blocks)
    kept = [i for e in blocks for i in e.input_ids]
    assert kept == STREAM[:len(kept)]
    assert report.total == len(STREAM) == len(kept) + report.dropped.get("partial_block", 0)
    assert report.kept == len(kept)
